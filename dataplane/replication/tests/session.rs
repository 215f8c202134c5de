//! Behaviour of one session: data paths, FIN/RST propagation, detaches, timeouts.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Clock, actions, config, connected, drain};
use ncp_replication::{Action, DetachReason, Error, Session, Side};

#[test]
fn new_session_asks_to_connect_every_upstream() {
    let clock = Clock::new();
    let mut s = Session::new(config(2), clock.now()).unwrap();
    assert_eq!(
        actions(&mut s),
        vec![
            Action::Connect(Side::Primary),
            Action::Connect(Side::Replica(0)),
            Action::Connect(Side::Replica(1)),
        ]
    );
}

#[test]
fn client_bytes_reach_primary_and_replicas_in_order() {
    let clock = Clock::new();
    let mut s = connected(config(2), &clock);
    let now = clock.now();
    assert_eq!(s.on_data(Side::Client, b"hello ", now), Ok(6));
    assert_eq!(s.on_data(Side::Client, b"world", now), Ok(5));
    assert_eq!(drain(&mut s, Side::Primary, now), b"hello world");
    assert_eq!(drain(&mut s, Side::Replica(0), now), b"hello world");
    // Partial send: the rest stays pending.
    assert_eq!(s.pending(Side::Replica(1)), b"hello world");
    s.on_sent(Side::Replica(1), 3, now).unwrap();
    assert_eq!(s.pending(Side::Replica(1)), b"lo world");
    assert_eq!(s.replica_lag(1), Some(8));
    assert_eq!(s.replica_lag(0), Some(0));
    assert_eq!(drain(&mut s, Side::Replica(1), now), b"lo world");
    assert!(s.pending(Side::Client).is_empty());
    let st = s.stats();
    assert_eq!(st.client_bytes_in, 11);
    assert_eq!(st.primary_bytes_out, 11);
    assert_eq!(st.replica_bytes_out, vec![11, 11]);
    assert_eq!(s.buffered_bytes(), 0);
    assert_eq!(s.allocated_bytes(), 0);
}

#[test]
fn primary_answers_go_to_client_and_replica_answers_are_dropped() {
    let clock = Clock::new();
    let mut s = connected(config(1), &clock);
    let now = clock.now();
    assert_eq!(s.on_data(Side::Primary, b"answer", now), Ok(6));
    assert_eq!(s.receive_window(Side::Replica(0)), usize::MAX);
    assert_eq!(s.on_data(Side::Replica(0), b"replica answer", now), Ok(14));
    assert_eq!(drain(&mut s, Side::Client, now), b"answer");
    assert!(s.pending(Side::Replica(0)).is_empty());
    assert_eq!(s.stats().replica_bytes_dropped, 14);
    assert_eq!(s.stats().client_bytes_out, 6);
}

#[test]
fn client_fin_reaches_each_upstream_after_its_bytes() {
    let clock = Clock::new();
    let mut s = connected(config(1), &clock);
    let now = clock.now();
    s.on_data(Side::Client, b"req", now).unwrap();
    s.on_fin(Side::Client, now).unwrap();
    assert_eq!(s.receive_window(Side::Client), 0);
    assert!(
        actions(&mut s).is_empty(),
        "no FIN before the bytes are out"
    );
    drain(&mut s, Side::Primary, now);
    assert_eq!(actions(&mut s), vec![Action::Close(Side::Primary)]);
    drain(&mut s, Side::Replica(0), now);
    assert_eq!(actions(&mut s), vec![Action::Close(Side::Replica(0))]);
    assert_eq!(
        s.on_data(Side::Client, b"x", now),
        Err(Error::DataAfterFin(Side::Client))
    );
    // The primary may still answer after the client's half-close.
    assert_eq!(s.on_data(Side::Primary, b"resp", now), Ok(4));
    assert_eq!(drain(&mut s, Side::Client, now), b"resp");
}

#[test]
fn primary_fin_reaches_client_after_its_bytes_and_session_finishes() {
    let clock = Clock::new();
    let mut s = connected(config(1), &clock);
    let now = clock.now();
    s.on_data(Side::Primary, b"bye", now).unwrap();
    s.on_fin(Side::Primary, now).unwrap();
    assert_eq!(s.receive_window(Side::Primary), 0);
    assert!(actions(&mut s).is_empty());
    drain(&mut s, Side::Client, now);
    assert_eq!(actions(&mut s), vec![Action::Close(Side::Client)]);
    // Client keeps sending after the server's half-close; it still reaches everyone.
    s.on_data(Side::Client, b"more", now).unwrap();
    s.on_fin(Side::Client, now).unwrap();
    assert_eq!(drain(&mut s, Side::Replica(0), now), b"more");
    assert_eq!(actions(&mut s), vec![Action::Close(Side::Replica(0))]);
    assert!(!s.is_finished());
    assert_eq!(drain(&mut s, Side::Primary, now), b"more");
    assert_eq!(
        actions(&mut s),
        vec![Action::Close(Side::Primary), Action::Finished]
    );
    assert!(s.is_finished());
    assert_eq!(s.poll_timeout(), None);
}

#[test]
fn fin_before_primary_connects_is_delivered_after_connect() {
    let clock = Clock::new();
    let mut s = Session::new(config(0), clock.now()).unwrap();
    let _ = actions(&mut s);
    let now = clock.now();
    assert_eq!(s.on_data(Side::Client, b"early", now), Ok(5));
    s.on_fin(Side::Client, now).unwrap();
    assert!(
        s.pending(Side::Primary).is_empty(),
        "nothing sent before connect"
    );
    assert!(actions(&mut s).is_empty());
    s.on_connected(Side::Primary, now).unwrap();
    assert_eq!(drain(&mut s, Side::Primary, now), b"early");
    assert_eq!(actions(&mut s), vec![Action::Close(Side::Primary)]);
}

#[test]
fn client_data_before_primary_connects_is_bounded_by_the_primary_budget() {
    let clock = Clock::new();
    let mut cfg = config(1);
    cfg.primary_budget_bytes = 1000;
    let mut s = Session::new(cfg, clock.now()).unwrap();
    let now = clock.now();
    assert_eq!(s.receive_window(Side::Client), 1000);
    assert_eq!(s.on_data(Side::Client, &[7; 1500], now), Ok(1000));
    assert_eq!(s.receive_window(Side::Client), 0);
    assert_eq!(s.on_data(Side::Client, &[7; 10], now), Ok(0));
    s.on_connected(Side::Primary, now).unwrap();
    s.on_sent(Side::Primary, 400, now).unwrap();
    assert_eq!(s.receive_window(Side::Client), 400);
}

#[test]
fn client_reset_aborts_primary_and_replicas() {
    let clock = Clock::new();
    let mut s = connected(config(2), &clock);
    let now = clock.now();
    s.on_data(Side::Client, b"partial", now).unwrap();
    s.on_reset(Side::Client, now).unwrap();
    assert_eq!(
        actions(&mut s),
        vec![
            Action::Reset(Side::Primary),
            Action::Reset(Side::Replica(0)),
            Action::Reset(Side::Replica(1)),
            Action::Finished,
        ]
    );
    assert_eq!(s.stats().client_resets, 1);
    assert_eq!(s.allocated_bytes(), 0);
    // Late events are ignored, not errors.
    assert_eq!(s.on_data(Side::Client, b"late", now), Ok(0));
    assert_eq!(s.on_reset(Side::Primary, now), Ok(()));
    assert!(actions(&mut s).is_empty());
}

#[test]
fn primary_reset_resets_client_and_closes_replicas_after_their_bytes() {
    let clock = Clock::new();
    let mut s = connected(config(1), &clock);
    let now = clock.now();
    s.on_data(Side::Client, b"payload", now).unwrap();
    s.on_data(Side::Primary, b"unsent", now).unwrap();
    s.on_reset(Side::Primary, now).unwrap();
    assert_eq!(actions(&mut s), vec![Action::Reset(Side::Client)]);
    assert!(s.pending(Side::Client).is_empty());
    assert_eq!(s.receive_window(Side::Client), 0);
    assert_eq!(s.stats().primary_failures, 1);
    // The replica still gets what the client sent, then a FIN.
    assert_eq!(drain(&mut s, Side::Replica(0), now), b"payload");
    assert_eq!(
        actions(&mut s),
        vec![Action::Close(Side::Replica(0)), Action::Finished]
    );
}

#[test]
fn primary_refusal_resets_client() {
    let clock = Clock::new();
    let mut s = Session::new(config(0), clock.now()).unwrap();
    let _ = actions(&mut s);
    s.on_refused(Side::Primary, clock.now()).unwrap();
    assert_eq!(
        actions(&mut s),
        vec![Action::Reset(Side::Client), Action::Finished]
    );
}

#[test]
fn primary_connect_timeout_resets_client_and_primary() {
    let mut clock = Clock::new();
    let mut s = Session::new(config(1), clock.now()).unwrap();
    s.on_connected(Side::Replica(0), clock.now()).unwrap();
    let _ = actions(&mut s);
    let deadline = s.poll_timeout().unwrap();
    assert_eq!(deadline, clock.now() + Duration::from_secs(5));
    s.handle_timeout(clock.advance(Duration::from_secs(4)));
    assert!(actions(&mut s).is_empty(), "early call is harmless");
    s.handle_timeout(clock.advance(Duration::from_secs(1)));
    assert_eq!(
        actions(&mut s),
        vec![
            Action::Reset(Side::Primary),
            Action::Reset(Side::Client),
            Action::Close(Side::Replica(0)),
            Action::Finished,
        ]
    );
    assert_eq!(s.stats().idle_timeouts, 0);
}

#[test]
fn replica_refusal_and_death_detach_only_that_replica() {
    let clock = Clock::new();
    let mut s = Session::new(config(3), clock.now()).unwrap();
    let now = clock.now();
    let _ = actions(&mut s);
    s.on_connected(Side::Primary, now).unwrap();
    s.on_refused(Side::Replica(0), now).unwrap();
    s.on_connected(Side::Replica(1), now).unwrap();
    s.on_connected(Side::Replica(2), now).unwrap();
    s.on_reset(Side::Replica(1), now).unwrap();
    assert_eq!(
        actions(&mut s),
        vec![
            Action::Detached {
                replica: 0,
                reason: DetachReason::Refused
            },
            Action::Detached {
                replica: 1,
                reason: DetachReason::Died
            },
        ]
    );
    assert!(!s.replica_is_live(0) && !s.replica_is_live(1) && s.replica_is_live(2));
    s.on_data(Side::Client, b"abc", now).unwrap();
    assert!(s.pending(Side::Replica(1)).is_empty());
    assert_eq!(drain(&mut s, Side::Replica(2), now), b"abc");
    assert_eq!(drain(&mut s, Side::Primary, now), b"abc");
    let d = s.stats().detached;
    assert_eq!((d.refused, d.died, d.total()), (1, 1, 2));
}

#[test]
fn replica_fin_does_not_detach_it() {
    let clock = Clock::new();
    let mut s = connected(config(1), &clock);
    let now = clock.now();
    s.on_fin(Side::Replica(0), now).unwrap();
    s.on_data(Side::Client, b"x", now).unwrap();
    assert!(actions(&mut s).is_empty());
    assert_eq!(drain(&mut s, Side::Replica(0), now), b"x");
}

#[test]
fn lagging_replica_is_detached_and_never_slows_the_client() {
    let clock = Clock::new();
    let mut cfg = config(1);
    cfg.replica_budget_bytes = 10_000;
    cfg.primary_budget_bytes = 4_000;
    let mut s = connected(cfg.clone(), &clock);
    let now = clock.now();
    let mut sent = 0;
    // The replica takes nothing; the primary takes everything.
    while sent + 3_000 <= 10_000 {
        assert_eq!(s.receive_window(Side::Client), 4_000);
        sent += s.on_data(Side::Client, &[1; 3_000], now).unwrap();
        drain(&mut s, Side::Primary, now);
        assert!(actions(&mut s).is_empty(), "within budget at {sent}");
    }
    assert_eq!(s.replica_lag(0), Some(9_000));
    s.on_data(Side::Client, &[1; 3_000], now).unwrap();
    assert_eq!(
        actions(&mut s),
        vec![Action::Detached {
            replica: 0,
            reason: DetachReason::Lagged
        }]
    );
    assert_eq!(s.replica_lag(0), None);
    assert!(s.allocated_bytes() <= cfg.max_memory());
    drain(&mut s, Side::Primary, now);
    assert_eq!(s.buffered_bytes(), 0);
    assert_eq!(s.stats().detached.lagged, 1);
}

#[test]
fn replica_connect_timeout_detaches_it() {
    let mut clock = Clock::new();
    let mut s = Session::new(config(2), clock.now()).unwrap();
    let now = clock.now();
    s.on_connected(Side::Primary, now).unwrap();
    s.on_connected(Side::Replica(1), now).unwrap();
    let _ = actions(&mut s);
    s.on_data(Side::Client, b"data", now).unwrap();
    assert_eq!(
        s.replica_lag(0),
        Some(4),
        "unconnected replica keeps its bytes"
    );
    s.handle_timeout(clock.advance(Duration::from_secs(5)));
    assert_eq!(
        actions(&mut s),
        vec![Action::Detached {
            replica: 0,
            reason: DetachReason::ConnectTimeout
        }]
    );
    // Connect deadline no longer matters; idle timeout is next.
    assert_eq!(s.poll_timeout(), Some(now + Duration::from_secs(60)));
}

#[test]
fn idle_session_is_reset_on_both_sides() {
    let mut clock = Clock::new();
    let mut s = connected(config(1), &clock);
    clock.advance(Duration::from_secs(30));
    s.on_data(Side::Client, b"ping", clock.now()).unwrap();
    // Activity moved the deadline.
    assert_eq!(
        s.poll_timeout(),
        Some(clock.now() + Duration::from_secs(60))
    );
    s.handle_timeout(clock.advance(Duration::from_secs(59)));
    assert!(actions(&mut s).is_empty());
    s.handle_timeout(clock.advance(Duration::from_secs(1)));
    assert_eq!(
        actions(&mut s),
        vec![
            Action::Reset(Side::Client),
            Action::Reset(Side::Primary),
            Action::Reset(Side::Replica(0)),
            Action::Finished,
        ]
    );
    assert_eq!(s.stats().idle_timeouts, 1);
}

#[test]
fn slow_replica_gets_drain_time_then_is_detached() {
    let mut clock = Clock::new();
    let mut s = connected(config(2), &clock);
    let now = clock.now();
    s.on_data(Side::Client, b"tail", now).unwrap();
    s.on_fin(Side::Client, now).unwrap();
    s.on_fin(Side::Primary, now).unwrap();
    drain(&mut s, Side::Primary, now);
    drain(&mut s, Side::Replica(0), now);
    assert_eq!(
        actions(&mut s),
        vec![
            Action::Close(Side::Client),
            Action::Close(Side::Primary),
            Action::Close(Side::Replica(0)),
        ]
    );
    // Replica 1 is still owed 4 bytes: the session drains, bounded in time.
    assert_eq!(s.poll_timeout(), Some(now + Duration::from_secs(3)));
    s.on_sent(Side::Replica(1), 2, clock.advance(Duration::from_secs(1)))
        .unwrap();
    s.handle_timeout(clock.advance(Duration::from_secs(2)));
    assert_eq!(
        actions(&mut s),
        vec![
            Action::Detached {
                replica: 1,
                reason: DetachReason::DrainTimeout
            },
            Action::Finished,
        ]
    );
}

#[test]
fn replica_that_catches_up_while_draining_gets_its_fin() {
    let clock = Clock::new();
    let mut s = connected(config(1), &clock);
    let now = clock.now();
    s.on_data(Side::Client, b"abc", now).unwrap();
    s.on_fin(Side::Client, now).unwrap();
    s.on_fin(Side::Primary, now).unwrap();
    drain(&mut s, Side::Primary, now);
    let _ = actions(&mut s);
    assert!(!s.is_finished());
    assert_eq!(drain(&mut s, Side::Replica(0), now), b"abc");
    assert_eq!(
        actions(&mut s),
        vec![Action::Close(Side::Replica(0)), Action::Finished]
    );
}

#[test]
fn primary_window_is_bounded_by_the_response_budget() {
    let clock = Clock::new();
    let mut s = connected(config(0), &clock);
    let now = clock.now();
    assert_eq!(s.on_data(Side::Primary, &[0; 20_000], now), Ok(16 * 1024));
    assert_eq!(s.receive_window(Side::Primary), 0);
    s.on_sent(Side::Client, 1000, now).unwrap();
    assert_eq!(s.receive_window(Side::Primary), 1000);
}

#[test]
fn invalid_inputs_return_errors_and_change_nothing() {
    let clock = Clock::new();
    let mut s = Session::new(config(1), clock.now()).unwrap();
    let now = clock.now();
    let _ = actions(&mut s);
    assert_eq!(
        s.on_data(Side::Replica(9), b"x", now),
        Err(Error::UnknownReplica(9))
    );
    assert_eq!(
        s.on_connected(Side::Replica(1), now),
        Err(Error::UnknownReplica(1))
    );
    assert_eq!(
        s.on_sent(Side::Replica(u16::MAX), 1, now),
        Err(Error::UnknownReplica(u16::MAX))
    );
    assert_eq!(
        s.on_connected(Side::Client, now),
        Err(Error::NotApplicable(Side::Client))
    );
    assert_eq!(
        s.on_refused(Side::Client, now),
        Err(Error::NotApplicable(Side::Client))
    );
    assert_eq!(
        s.on_data(Side::Primary, b"x", now),
        Err(Error::NotConnected(Side::Primary))
    );
    s.on_connected(Side::Primary, now).unwrap();
    s.on_data(Side::Client, b"ab", now).unwrap();
    assert_eq!(
        s.on_sent(Side::Primary, 3, now),
        Err(Error::SentTooMuch {
            side: Side::Primary,
            sent: 3,
            pending: 2
        })
    );
    assert_eq!(s.pending(Side::Primary), b"ab");
    assert!(s.pending(Side::Replica(5)).is_empty());
    assert_eq!(s.receive_window(Side::Replica(5)), 0);
    s.on_fin(Side::Primary, now).unwrap();
    assert_eq!(
        s.on_data(Side::Primary, b"x", now),
        Err(Error::DataAfterFin(Side::Primary))
    );
    // The primary's FIN itself was valid and reaches the client.
    assert_eq!(actions(&mut s), vec![Action::Close(Side::Client)]);
    assert_eq!(s.stats().ignored_inputs, 8);
}

#[test]
fn extreme_timeouts_do_not_panic() {
    let clock = Clock::new();
    let mut cfg = config(1);
    cfg.idle_timeout = Duration::MAX;
    cfg.connect_timeout = Duration::MAX;
    cfg.drain_timeout = Duration::MAX;
    let mut s = Session::new(cfg, clock.now()).unwrap();
    assert_eq!(s.poll_timeout(), None);
    s.handle_timeout(clock.now());
    cfg = config(1);
    cfg.idle_timeout = Duration::ZERO;
    let mut s = connected(cfg, &clock);
    s.handle_timeout(clock.now());
    assert_eq!(actions(&mut s).last(), Some(&Action::Finished));
}

#[test]
fn stalled_replicas_never_change_what_the_client_may_send() {
    // Same primary behaviour, with and without two replicas that never read: the client
    // sees exactly the same windows and acceptance.
    let clock = Clock::new();
    let now = clock.now();
    let mut plain = connected(config(0), &clock);
    let mut replicated = connected(config(2), &clock);
    let mut rng = common::Rng::new(42);
    for _ in 0..500 {
        let chunk = vec![3u8; rng.upto(9_000)];
        let take = rng.upto(6_000);
        for s in [&mut plain, &mut replicated] {
            s.on_data(Side::Client, &chunk, now).unwrap();
            let n = take.min(s.pending(Side::Primary).len());
            s.on_sent(Side::Primary, n, now).unwrap();
        }
        assert_eq!(
            plain.receive_window(Side::Client),
            replicated.receive_window(Side::Client)
        );
        assert_eq!(
            plain.stats().client_bytes_in,
            replicated.stats().client_bytes_in
        );
    }
    // The stalled replicas were cut loose instead.
    assert_eq!(replicated.stats().detached.lagged, 2);
    assert!(replicated.allocated_bytes() <= replicated.config().max_memory());
}
