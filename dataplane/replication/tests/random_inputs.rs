//! Arbitrary call sequences, including invalid indices, oversized `on_sent`, events out of
//! order and time jumping back and forth: the session must never panic, never exceed its
//! memory bound, and keep its action stream well formed.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Clock, Rng};
use ncp_replication::{Action, Session, SessionConfig, Side};

fn random_side(rng: &mut Rng, replicas: u16) -> Side {
    match rng.upto(3) {
        0 => Side::Client,
        1 => Side::Primary,
        // Sometimes out of range on purpose.
        _ => Side::Replica(rng.upto(usize::from(replicas) + 1) as u16),
    }
}

#[test]
fn arbitrary_inputs_never_break_the_session() {
    let data = vec![0x5a; 70_000];
    for seed in 1..=400u64 {
        let mut rng = Rng::new(seed);
        let mut clock = Clock::new();
        clock.advance(Duration::from_secs(100));
        let replicas = rng.upto(3) as u16;
        let replica_budget = 1 + rng.upto(40_000) as u64;
        let cfg = SessionConfig {
            replica_count: replicas,
            replica_budget_bytes: replica_budget,
            primary_budget_bytes: 1 + rng.upto(40_000) as u64,
            response_budget_bytes: 1 + rng.upto(40_000) as u64,
            idle_timeout: Duration::from_millis(rng.upto(5_000) as u64),
            connect_timeout: Duration::from_millis(rng.upto(5_000) as u64),
            drain_timeout: Duration::from_millis(rng.upto(5_000) as u64),
            // Every other seed verifies replies (outside the rng, so the inputs stay the
            // same): each replica is judged at most once, whatever comes.
            verify_window_bytes: if seed % 2 == 0 {
                1 + seed * 97 % 5_000
            } else {
                0
            },
            // Every third seed spills, to a spool of one to three memory budgets.
            spill_budget_bytes: if seed % 3 == 0 {
                replica_budget * (1 + seed % 3)
            } else {
                0
            },
            // Every fifth seed runs PostgreSQL's or Redis's start on random bytes: refused
            // start-ups and failed logins must not panic either.
            start: (seed % 5 == 0).then(|| {
                std::sync::Arc::new(ncp_replication::start::StartConfig {
                    protocol: if seed % 10 == 0 {
                        ncp_replication::start::Protocol::Postgres
                    } else {
                        ncp_replication::start::Protocol::Redis
                    },
                    replicas: vec![ncp_replication::start::ReplicaCredentials {
                        user: None,
                        password: Some(ncp_replication::start::Secret::new("pw")),
                        database: None,
                    }],
                })
            }),
        };
        let mut s = Session::new(cfg.clone(), clock.now()).unwrap();
        let mut finished = false;
        let mut per_side: HashMap<String, usize> = HashMap::new();
        for _ in 0..300 {
            // Time mostly moves forward, sometimes backward (a caller bug must not panic).
            let now = if rng.chance(5) {
                clock.now() - Duration::from_millis(rng.upto(50_000) as u64)
            } else {
                clock.advance(Duration::from_millis(rng.upto(400) as u64))
            };
            let side = random_side(&mut rng, replicas);
            match rng.upto(7) {
                0 => drop(s.on_connected(side, now)),
                1 => drop(s.on_refused(side, now)),
                2 if rng.chance(30) => drop(s.on_reset(side, now)),
                3 if rng.chance(30) => drop(s.on_fin(side, now)),
                4 => {
                    let n = rng.upto(data.len());
                    if let Ok(took) = s.on_data(side, &data[..n], now) {
                        assert!(took <= n);
                    }
                }
                5 => {
                    let pending = s.pending(side).len();
                    let n = if rng.chance(10) {
                        pending + 1 + rng.upto(10)
                    } else {
                        rng.upto(pending)
                    };
                    let _ = s.on_sent(side, n, now);
                }
                6 if rng.chance(10) => {
                    let _ = s.spill_failed(rng.upto(usize::from(replicas) + 1) as u16, now);
                }
                _ => s.handle_timeout(now),
            }
            assert!(s.allocated_bytes() <= cfg.max_memory(), "seed {seed}");
            let _ = s.receive_window(side);
            let _ = s.poll_timeout();
            while let Some(a) = s.poll_action() {
                assert!(!finished, "seed {seed}: {a:?} after Finished");
                // Each action at most once per side; a Reset may follow a Close (the side
                // was half-closed, then the session was aborted) but nothing follows a
                // Reset or a Detached.
                let key = match a {
                    Action::Connect(x) => format!("connect {x:?}"),
                    Action::Close(x) => {
                        assert!(
                            !per_side.contains_key(&format!("gone {x:?}")),
                            "seed {seed}"
                        );
                        format!("close {x:?}")
                    }
                    Action::Reset(x) => format!("gone {x:?}"),
                    Action::Detached { replica, .. } => {
                        format!("gone {:?}", Side::Replica(replica))
                    }
                    Action::ReplyCheck { replica, .. } => format!("check {replica}"),
                    Action::Spill { replica } => {
                        // Taken at once, as the contract asks; a later spill may come
                        // again once the outbox was emptied.
                        assert!(cfg.spills(), "seed {seed}: spill without a spill budget");
                        assert!(!s.take_spill(replica).is_empty(), "seed {seed}");
                        continue;
                    }
                    Action::Finished => {
                        finished = true;
                        "finished".into()
                    }
                };
                let count = per_side.entry(key.clone()).or_default();
                *count += 1;
                assert_eq!(*count, 1, "seed {seed}: {key} twice");
            }
        }
        if finished {
            assert_eq!(s.allocated_bytes(), 0);
            assert_eq!(s.poll_timeout(), None);
        }
    }
}
