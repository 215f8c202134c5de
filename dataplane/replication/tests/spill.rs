//! Spilling: a replica that falls behind its memory budget has its backlog moved to an
//! on-disk spool (simulated here by a vector) instead of being detached, is fed from the
//! spool before any newer byte, and is detached only beyond the spill budget.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Clock, actions, config, connected, drain};
use ncp_replication::{Action, DetachReason, Error, Session, SessionConfig, Side};

const BUDGET: u64 = 64 * 1024;

fn spilling(spill_budget: u64) -> SessionConfig {
    SessionConfig {
        spill_budget_bytes: spill_budget,
        ..config(1)
    }
}

/// The stream the client sends: every byte tells its offset apart from its neighbours'.
fn stream(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// What the I/O layer does: the spool file of replica 0, and where the replica is in it.
#[derive(Default)]
struct Spool {
    bytes: Vec<u8>,
    read: usize,
}

impl Spool {
    /// Carries out the session's actions: spills are appended, everything else returned.
    fn act(&mut self, s: &mut Session) -> Vec<Action> {
        let mut other = Vec::new();
        for a in actions(s) {
            match a {
                Action::Spill { replica: 0 } => self.bytes.extend(s.take_spill(0)),
                a => other.push(a),
            }
        }
        other
    }

    /// Feeds the replica what the spool holds for it, in slices of at most `step`.
    fn replay(&mut self, s: &mut Session, step: usize, now: Instant) -> Vec<u8> {
        let mut out = Vec::new();
        while s.replica_spooled(0) > 0 {
            // Nothing from memory while the spool is not empty.
            assert!(s.pending(Side::Replica(0)).is_empty());
            let n = step.min(self.bytes.len() - self.read);
            out.extend_from_slice(&self.bytes[self.read..self.read + n]);
            s.on_sent(Side::Replica(0), n, now).unwrap();
            self.read += n;
        }
        // Emptied: the I/O layer starts a new file next time.
        self.bytes.clear();
        self.read = 0;
        out
    }
}

/// Sends `data` from the client in reads of 16 KiB (the primary budget), the primary
/// taking everything at once; the replica reads nothing.
fn client_sends(s: &mut Session, spool: &mut Spool, data: &[u8], now: Instant) -> Vec<Action> {
    let mut other = Vec::new();
    for piece in data.chunks(16 * 1024) {
        assert_eq!(s.on_data(Side::Client, piece, now), Ok(piece.len()));
        assert_eq!(drain(s, Side::Primary, now).len(), piece.len());
        other.extend(spool.act(s));
    }
    other
}

/// A session connected at the clock's start whose client sent `data` (see
/// [`client_sends`]) while the replica read nothing; returns it with its spool and the
/// actions other than spills.
fn behind(clock: &Clock, cfg: SessionConfig, data: &[u8]) -> (Session, Spool, Vec<Action>) {
    let mut s = connected(cfg, clock);
    let mut spool = Spool::default();
    let other = client_sends(&mut s, &mut spool, data, clock.now());
    (s, spool, other)
}

#[test]
fn a_replica_beyond_its_memory_budget_spills_instead_of_being_detached() {
    let clock = Clock::new();
    let data = stream(3 * BUDGET as usize);
    let (s, spool, other) = behind(&clock, spilling(4 * BUDGET), &data);
    assert!(other.is_empty(), "{other:?}");
    assert!(s.replica_is_live(0));
    // Memory never holds more than the budget for it; the rest went to the spool, the
    // oldest bytes first.
    assert!(s.buffered_bytes() <= BUDGET, "{}", s.buffered_bytes());
    assert!(!spool.bytes.is_empty());
    assert_eq!(spool.bytes, data[..spool.bytes.len()]);
    assert_eq!(s.replica_spooled(0), spool.bytes.len() as u64);
    assert_eq!(s.replica_lag(0), Some(data.len() as u64));
    assert_eq!(
        s.stats().replica_bytes_spilled,
        vec![spool.bytes.len() as u64]
    );
    assert_eq!(s.stats().detached.total(), 0);
    assert!(s.allocated_bytes() <= s.config().max_memory());
}

#[test]
fn a_spilled_replica_catches_up_from_the_spool_before_newer_bytes_in_order() {
    let mut clock = Clock::new();
    let data = stream(5 * BUDGET as usize + 1234);
    let half = data.len() / 2;
    let now = clock.now();
    let (mut s, mut spool, _) = behind(&clock, spilling(8 * BUDGET), &data[..half]);
    assert!(s.replica_spooled(0) > 0);

    // The replica wakes up while the client keeps writing: the spool first, then memory.
    let mut got = spool.replay(&mut s, 5000, now);
    got.extend(drain(&mut s, Side::Replica(0), now));
    assert_eq!(got, data[..half]);
    assert_eq!(s.replica_lag(0), Some(0));

    // Falls behind again: a new spool, and the same order.
    let now = clock.advance(Duration::from_millis(10));
    client_sends(&mut s, &mut spool, &data[half..], now);
    s.on_fin(Side::Client, now).unwrap();
    // The primary has everything and gets its FIN; the replica not before the spool is
    // replayed.
    assert_eq!(spool.act(&mut s), vec![Action::Close(Side::Primary)]);
    got.extend(spool.replay(&mut s, 7000, now));
    got.extend(drain(&mut s, Side::Replica(0), now));
    assert_eq!(got, data);
    assert_eq!(spool.act(&mut s), vec![Action::Close(Side::Replica(0))]);

    let st = s.stats();
    assert_eq!(st.replica_bytes_out, vec![data.len() as u64]);
    assert_eq!(st.replica_bytes_replayed, st.replica_bytes_spilled);
    assert!(st.replica_bytes_replayed[0] > 0);
    assert_eq!(st.detached.total(), 0);
}

#[test]
fn beyond_the_spill_budget_the_replica_is_detached() {
    let clock = Clock::new();
    // Room for one spill of a memory budget (plus a read), not for a second.
    let data = stream(4 * BUDGET as usize);
    let (s, _, other) = behind(&clock, spilling(BUDGET + 16 * 1024), &data);
    assert_eq!(
        other,
        vec![Action::Detached {
            replica: 0,
            reason: DetachReason::SpillBudgetExceeded
        }]
    );
    assert!(!s.replica_is_live(0));
    assert_eq!(s.replica_spooled(0), 0, "a detached replica has no spool");
    assert_eq!(s.stats().detached.spill_budget, 1);
    // The client was never held back: everything reached the primary.
    assert_eq!(s.stats().primary_bytes_out, data.len() as u64);
    assert!(s.stats().replica_bytes_spilled[0] <= BUDGET + 16 * 1024);
}

#[test]
fn a_spool_that_cannot_be_written_detaches_the_replica() {
    let clock = Clock::new();
    let now = clock.now();
    let (mut s, _, _) = behind(&clock, spilling(8 * BUDGET), &stream(2 * BUDGET as usize));
    assert!(s.replica_spooled(0) > 0);
    s.spill_failed(0, now).unwrap();
    assert_eq!(
        actions(&mut s),
        vec![Action::Detached {
            replica: 0,
            reason: DetachReason::SpillBudgetExceeded
        }]
    );
    // Late or invalid reports change nothing.
    s.spill_failed(0, now).unwrap();
    assert_eq!(s.spill_failed(3, now), Err(Error::UnknownReplica(3)));
    assert!(actions(&mut s).is_empty());
    assert_eq!(s.stats().detached.total(), 1);
}

#[test]
fn spilling_is_off_by_default_and_lag_still_detaches() {
    let clock = Clock::new();
    let (_, spool, other) = behind(&clock, config(1), &stream(2 * BUDGET as usize));
    assert_eq!(
        other,
        vec![Action::Detached {
            replica: 0,
            reason: DetachReason::Lagged
        }]
    );
    assert!(spool.bytes.is_empty());
}

#[test]
fn a_replica_still_connecting_spills_and_is_fed_only_once_connected() {
    let clock = Clock::new();
    let now = clock.now();
    let mut s = Session::new(spilling(8 * BUDGET), now).unwrap();
    s.on_connected(Side::Primary, now).unwrap();
    let _ = actions(&mut s);
    let mut spool = Spool::default();
    let data = stream(2 * BUDGET as usize);
    client_sends(&mut s, &mut spool, &data, now);
    assert!(s.replica_spooled(0) > 0);
    assert_eq!(s.spool_pending(0), 0, "not connected yet");
    assert_eq!(
        s.on_sent(Side::Replica(0), 1, now),
        Err(Error::NotConnected(Side::Replica(0)))
    );
    s.on_connected(Side::Replica(0), now).unwrap();
    assert_eq!(s.spool_pending(0), s.replica_spooled(0));
    let mut got = spool.replay(&mut s, 4096, now);
    got.extend(drain(&mut s, Side::Replica(0), now));
    assert_eq!(got, data);
}

#[test]
fn replaying_more_than_the_spool_holds_is_rejected() {
    let clock = Clock::new();
    let now = clock.now();
    let (mut s, _, _) = behind(&clock, spilling(8 * BUDGET), &stream(2 * BUDGET as usize));
    let spooled = s.replica_spooled(0);
    let too_many = usize::try_from(spooled).unwrap() + 1;
    assert!(matches!(
        s.on_sent(Side::Replica(0), too_many, now),
        Err(Error::SentTooMuch { .. })
    ));
    assert_eq!(s.replica_spooled(0), spooled);
}

#[test]
fn a_spilled_replica_that_does_not_catch_up_in_the_drain_time_is_detached() {
    let mut clock = Clock::new();
    let now = clock.now();
    let (mut s, mut spool, _) = behind(&clock, spilling(8 * BUDGET), &stream(2 * BUDGET as usize));
    s.on_fin(Side::Client, now).unwrap();
    s.on_fin(Side::Primary, now).unwrap();
    assert!(!spool.act(&mut s).is_empty()); // the primary's and the client's FINs
    assert!(!s.is_finished());
    let later = clock.advance(Duration::from_secs(10));
    s.handle_timeout(later);
    assert_eq!(
        spool.act(&mut s),
        vec![
            Action::Detached {
                replica: 0,
                reason: DetachReason::DrainTimeout
            },
            Action::Finished
        ]
    );
}
