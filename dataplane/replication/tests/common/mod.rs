//! Helpers shared by the integration tests: simulated time, a seeded PRNG, action capture.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use ncp_replication::{Action, Session, SessionConfig, Side};

/// xorshift64*: tiny, seeded, good enough to shuffle chunk sizes.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform-ish in `0..=max`.
    pub fn upto(&mut self, max: usize) -> usize {
        (self.next() % (max as u64 + 1)) as usize
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// Simulated clock: a fixed origin plus an offset moved by the test.
pub struct Clock {
    origin: Instant,
    pub offset: Duration,
}

impl Clock {
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
            offset: Duration::ZERO,
        }
    }
    pub fn now(&self) -> Instant {
        self.origin + self.offset
    }
    pub fn advance(&mut self, d: Duration) -> Instant {
        self.offset += d;
        self.now()
    }
}

pub fn actions(s: &mut Session) -> Vec<Action> {
    std::iter::from_fn(|| s.poll_action()).collect()
}

pub fn config(replicas: u16) -> SessionConfig {
    SessionConfig {
        replica_count: replicas,
        replica_budget_bytes: 64 * 1024,
        primary_budget_bytes: 16 * 1024,
        response_budget_bytes: 16 * 1024,
        idle_timeout: Duration::from_secs(60),
        connect_timeout: Duration::from_secs(5),
        drain_timeout: Duration::from_secs(3),
        verify_window_bytes: 0,
        spill_budget_bytes: 0,
        start: None,
    }
}

/// A session with all upstreams connected and the initial `Connect` actions drained.
pub fn connected(cfg: SessionConfig, clock: &Clock) -> Session {
    let mut s = Session::new(cfg, clock.now()).expect("valid config");
    s.on_connected(Side::Primary, clock.now()).expect("primary");
    for i in 0..s.config().replica_count {
        s.on_connected(Side::Replica(i), clock.now())
            .expect("replica");
    }
    let _ = actions(&mut s);
    s
}

/// Hands everything pending for `side` to an unlimited sink and returns it.
pub fn drain(s: &mut Session, side: Side, now: Instant) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let p = s.pending(side).to_vec();
        if p.is_empty() {
            return out;
        }
        out.extend_from_slice(&p);
        s.on_sent(side, p.len(), now).expect("sent");
    }
}
