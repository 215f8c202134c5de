//! Property-style test: random chunking, random per-destination send sizes, random
//! connect times, seeded. Every destination must receive the client's stream in order and
//! exactly once (a detached replica: a prefix of it), FINs must follow the last byte, and
//! the client's window must depend on the primary alone.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Clock, Rng, actions};
use ncp_replication::{Action, Session, SessionConfig, Side};
use std::time::{Duration, Instant};

struct Run {
    rng: Rng,
    session: Session,
    upload: Vec<u8>,
    download: Vec<u8>,
    /// Bytes each destination got: index 0 primary, 1.. replicas.
    upstream_got: Vec<Vec<u8>>,
    client_got: Vec<u8>,
    connected: Vec<bool>,
    detached: Vec<bool>,
    closed: Vec<bool>,
    client_closed: bool,
    primary_fin: bool,
    finished: bool,
    /// Per-destination speed: most bytes taken per step (0 = stalled replica).
    speed: Vec<usize>,
}

/// Offers `side`'s next chunk of `stream`, of random length, after the `taken` bytes the
/// core has accepted already; checks the core takes as much as `window` allows, and sends
/// the FIN once the whole stream is in.
fn offer_chunk(
    s: &mut Session,
    side: Side,
    stream: &[u8],
    taken: usize,
    window: usize,
    rng: &mut Rng,
    now: Instant,
) {
    let n = 1 + rng.upto(stream.len() - taken - 1);
    let took = s.on_data(side, &stream[taken..taken + n], now).unwrap();
    assert_eq!(took, n.min(window));
    if taken + took == stream.len() {
        s.on_fin(side, now).unwrap();
    }
}

fn side_of(k: usize) -> Side {
    if k == 0 {
        Side::Primary
    } else {
        Side::Replica((k - 1) as u16)
    }
}

impl Run {
    fn new(seed: u64, now: std::time::Instant) -> Self {
        let mut rng = Rng::new(seed);
        let replicas = (seed % 4) as u16;
        let tight = seed.is_multiple_of(3);
        let cfg = SessionConfig {
            replica_count: replicas,
            replica_budget_bytes: if tight {
                1 + rng.upto(20_000) as u64
            } else {
                1 << 20
            },
            primary_budget_bytes: 1 + rng.upto(8_192) as u64,
            response_budget_bytes: 1 + rng.upto(8_192) as u64,
            idle_timeout: Duration::from_secs(3600),
            connect_timeout: Duration::from_secs(3600),
            // Verification rides along on some seeds: it must change nothing on the data path.
            verify_window_bytes: if tight { 4096 } else { 0 },
            spill_budget_bytes: 0,
            start: None,
            // A replica that never reads is cut loose by lag or, for short streams, here.
            drain_timeout: Duration::from_secs(1),
        };
        let session = Session::new(cfg, now).unwrap();
        let upload: Vec<u8> = (0..rng.upto(60_000)).map(|_| rng.next() as u8).collect();
        let download: Vec<u8> = (0..rng.upto(30_000)).map(|_| rng.next() as u8).collect();
        let dests = 1 + usize::from(replicas);
        let mut speed: Vec<usize> = (0..dests).map(|_| 1 + rng.upto(5_000)).collect();
        if tight && replicas > 0 {
            speed[1] = 0; // one replica that never reads
        }
        Self {
            rng,
            session,
            upload,
            download,
            upstream_got: vec![Vec::new(); dests],
            client_got: Vec::new(),
            connected: vec![false; dests],
            detached: vec![false; dests],
            closed: vec![false; dests],
            client_closed: false,
            primary_fin: false,
            finished: false,
            speed,
        }
    }

    fn check_actions(&mut self) {
        for a in actions(&mut self.session) {
            assert!(!self.finished, "action {a:?} after Finished");
            match a {
                Action::Connect(_) => {}
                Action::Close(Side::Client) => {
                    assert_eq!(self.client_got, self.download, "FIN before last byte");
                    self.client_closed = true;
                }
                Action::Close(side) => {
                    let k = match side {
                        Side::Primary => 0,
                        Side::Replica(i) => 1 + usize::from(i),
                        Side::Client => unreachable!(),
                    };
                    assert_eq!(self.upstream_got[k], self.upload, "FIN before last byte");
                    assert!(!self.closed[k]);
                    self.closed[k] = true;
                }
                Action::Detached { replica, .. } => {
                    let k = 1 + usize::from(replica);
                    assert!(!self.detached[k]);
                    self.detached[k] = true;
                }
                Action::Reset(side) => panic!("unexpected reset of {side:?}"),
                Action::ReplyCheck { .. } => {}
                Action::Spill { replica } => {
                    panic!("replica {replica} spilled without a spill budget")
                }
                Action::Finished => self.finished = true,
            }
        }
    }

    fn step(&mut self, now: Instant) {
        self.check_actions();
        let s = &mut self.session;
        // Upstreams connect at random times.
        for k in 0..self.connected.len() {
            if !self.connected[k] && !self.detached[k] && self.rng.chance(20) {
                s.on_connected(side_of(k), now).unwrap();
                self.connected[k] = true;
            }
        }
        // The client offers a random chunk; the window must be the primary's alone.
        let offered = self.upload.len() - s.stats().client_bytes_in as usize;
        if offered > 0 {
            let primary_lag = s.stats().client_bytes_in - self.upstream_got[0].len() as u64;
            let want = (s.config().primary_budget_bytes - primary_lag) as usize;
            assert_eq!(s.receive_window(Side::Client), want);
            let taken = s.stats().client_bytes_in as usize;
            offer_chunk(
                s,
                Side::Client,
                &self.upload,
                taken,
                want,
                &mut self.rng,
                now,
            );
        }
        // The primary answers in random chunks, once connected.
        if self.connected[0] {
            let taken = s.stats().primary_bytes_in as usize;
            if taken < self.download.len() {
                let window = s.receive_window(Side::Primary);
                offer_chunk(
                    s,
                    Side::Primary,
                    &self.download,
                    taken,
                    window,
                    &mut self.rng,
                    now,
                );
            } else if self.download.is_empty() && !self.primary_fin {
                s.on_fin(Side::Primary, now).unwrap();
            }
            self.primary_fin = s.stats().primary_bytes_in as usize == self.download.len();
            // Replicas answer too; always fully accepted.
            for k in 1..self.connected.len() {
                if self.connected[k] && !self.detached[k] {
                    assert_eq!(s.on_data(side_of(k), b"noise", now), Ok(5));
                }
            }
        }
        // Each destination's socket takes a random amount, possibly across chunks.
        for k in 0..self.upstream_got.len() {
            let mut budget = self.rng.upto(self.speed[k]);
            while budget > 0 {
                let p = s.pending(side_of(k));
                if p.is_empty() {
                    break;
                }
                let n = budget.min(p.len());
                self.upstream_got[k].extend_from_slice(&p[..n]);
                s.on_sent(side_of(k), n, now).unwrap();
                budget -= n;
            }
        }
        let mut budget = self.rng.upto(5_000);
        while budget > 0 {
            let p = s.pending(Side::Client);
            if p.is_empty() {
                break;
            }
            let n = budget.min(p.len());
            self.client_got.extend_from_slice(&p[..n]);
            s.on_sent(Side::Client, n, now).unwrap();
            budget -= n;
        }
        assert!(s.allocated_bytes() <= s.config().max_memory());
        self.check_actions();
    }
}

#[test]
fn every_destination_gets_the_stream_in_order_exactly_once() {
    let mut detached = ncp_replication::DetachCounts::default();
    for seed in 1..=300u64 {
        let mut clock = Clock::new();
        let mut run = Run::new(seed, clock.now());
        let mut steps = 0;
        while !run.finished {
            let now = clock.advance(Duration::from_millis(1));
            run.session.handle_timeout(now);
            run.step(now);
            steps += 1;
            assert!(steps < 100_000, "seed {seed}: no progress");
        }
        assert_eq!(run.upstream_got[0], run.upload, "seed {seed}: primary");
        assert_eq!(run.client_got, run.download, "seed {seed}: client");
        for k in 1..run.upstream_got.len() {
            let got = &run.upstream_got[k];
            if run.detached[k] {
                assert_eq!(got[..], run.upload[..got.len()], "seed {seed}: prefix");
            } else {
                assert!(
                    run.closed[k],
                    "seed {seed}: replica {k} neither closed nor detached"
                );
                assert_eq!(got, &run.upload, "seed {seed}: replica {k}");
                assert_eq!(
                    run.session.stats().replica_bytes_out[k - 1],
                    run.upload.len() as u64
                );
            }
        }
        assert!(run.closed[0] && run.client_closed);
        assert_eq!(run.session.allocated_bytes(), 0, "seed {seed}: memory left");
        assert_eq!(run.session.stats().ignored_inputs, 0, "seed {seed}");
        let d = run.session.stats().detached;
        detached.lagged += d.lagged;
        detached.drain_timeout += d.drain_timeout;
    }
    // The seeds exercise both ways a stalled replica is cut loose.
    assert!(
        detached.lagged > 0 && detached.drain_timeout > 0,
        "{detached:?}"
    );
}
