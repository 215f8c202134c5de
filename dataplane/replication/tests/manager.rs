//! The manager: admission caps, ids, timers over sessions, metrics.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Clock, config, drain};
use ncp_replication::{
    Action, DetachReason, Manager, ManagerConfig, Refusal, SessionConfig, SessionId, Side,
};

fn manager(max_sessions: usize, max_memory_bytes: u64) -> Manager {
    Manager::new(ManagerConfig {
        max_sessions,
        max_memory_bytes,
        session: config(1),
    })
}

fn take_actions(m: &mut Manager, id: SessionId) -> Vec<Action> {
    let mut s = m.session_mut(id).unwrap();
    std::iter::from_fn(|| s.poll_action()).collect()
}

#[test]
fn session_cap_refuses_clearly_and_frees_on_remove() {
    let clock = Clock::new();
    let mut m = manager(2, u64::MAX);
    let a = m.open(clock.now()).unwrap();
    let b = m.open(clock.now()).unwrap();
    assert_ne!(a, b);
    assert_eq!(m.open(clock.now()), Err(Refusal::SessionLimit));
    assert_eq!(m.metrics().sessions_refused_limit, 1);
    assert_eq!(m.metrics().sessions_refused(), 1);
    m.remove(a).unwrap();
    let c = m.open(clock.now()).unwrap();
    assert!(c > b, "ids are never reused");
    assert_eq!(m.metrics().sessions_total, 3);
    assert_eq!(m.metrics().sessions_active, 2);
}

#[test]
fn memory_cap_counts_worst_case_reservations() {
    let clock = Clock::new();
    let per_session = config(1).max_memory();
    // A lighter flow: no replicas, so only the primary budget counts.
    let light = SessionConfig {
        replica_count: 0,
        ..config(0)
    };
    let spare = light.max_memory();
    assert!(spare < per_session);
    let mut m = manager(100, 2 * per_session + spare);
    let a = m.open(clock.now()).unwrap();
    m.open(clock.now()).unwrap();
    assert_eq!(
        m.open(clock.now()),
        Err(Refusal::MemoryLimit {
            needed: per_session,
            available: spare
        })
    );
    m.open_with(light, clock.now()).unwrap();
    let metrics = m.metrics();
    assert_eq!(metrics.sessions_refused_memory, 1);
    assert_eq!(metrics.memory_reserved_bytes, 2 * per_session + spare);
    m.remove(a);
    assert!(m.open(clock.now()).is_ok());
}

#[test]
fn invalid_session_config_is_refused_and_counted() {
    let clock = Clock::new();
    let mut m = manager(10, u64::MAX);
    let bad = SessionConfig {
        primary_budget_bytes: 0,
        ..config(1)
    };
    assert!(matches!(
        m.open_with(bad, clock.now()),
        Err(Refusal::InvalidConfig(_))
    ));
    assert_eq!(m.metrics().sessions_refused_config, 1);
    assert!(m.is_empty());
}

#[test]
fn metrics_add_up_and_gauges_return_to_zero() {
    let clock = Clock::new();
    let now = clock.now();
    let mut m = manager(10, u64::MAX);
    let mut ids = Vec::new();
    for _ in 0..3 {
        let id = m.open(now).unwrap();
        let mut s = m.session_mut(id).unwrap();
        s.on_connected(Side::Primary, now).unwrap();
        s.on_connected(Side::Replica(0), now).unwrap();
        s.on_data(Side::Client, &[1; 1000], now).unwrap();
        drain(&mut s, Side::Primary, now);
        s.on_sent(Side::Replica(0), 400, now).unwrap();
        s.on_data(Side::Replica(0), b"ignored", now).unwrap();
        drop(s);
        ids.push(id);
    }
    let live = m.metrics();
    assert_eq!(live.sessions_active, 3);
    assert_eq!(live.totals.client_bytes_in, 3000);
    assert_eq!(live.totals.primary_bytes_out, 3000);
    assert_eq!(live.totals.replica_bytes_out, vec![1200]);
    assert_eq!(live.totals.replica_bytes_dropped, 21);
    assert_eq!(live.replica_lag_max_bytes, vec![600]);
    assert_eq!(live.memory_buffered_bytes, 1800);
    assert!(live.memory_allocated_bytes > 0);

    // Session 0 ends cleanly, session 1 loses its replica, session 2 is reset.
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    {
        let mut s = m.session_mut(a).unwrap();
        s.on_fin(Side::Client, now).unwrap();
        s.on_fin(Side::Primary, now).unwrap();
        drain(&mut s, Side::Replica(0), now);
    }
    assert_eq!(take_actions(&mut m, a).last(), Some(&Action::Finished));
    m.session_mut(b)
        .unwrap()
        .on_reset(Side::Replica(0), now)
        .unwrap();
    m.session_mut(b)
        .unwrap()
        .on_reset(Side::Client, now)
        .unwrap();
    m.session_mut(c)
        .unwrap()
        .on_reset(Side::Client, now)
        .unwrap();
    for id in [b, c] {
        assert_eq!(take_actions(&mut m, id).last(), Some(&Action::Finished));
    }
    for id in ids {
        m.remove(id).unwrap();
    }
    let done = m.metrics();
    assert_eq!(done.sessions_active, 0);
    assert_eq!(done.memory_reserved_bytes, 0);
    assert_eq!(done.memory_buffered_bytes, 0);
    assert_eq!(done.memory_allocated_bytes, 0);
    assert_eq!(done.replica_lag_max_bytes, Vec::<u64>::new());
    assert_eq!(done.sessions_total, 3);
    assert_eq!(done.sessions_removed_unfinished, 0);
    assert_eq!(done.totals.client_bytes_in, 3000);
    assert_eq!(done.totals.replica_bytes_out, vec![1800]);
    assert_eq!(done.totals.detached.died, 1);
    assert_eq!(done.totals.client_resets, 2);
    assert_eq!(m.poll_timeout(), None, "no stale wakeups once empty");
}

#[test]
fn removing_a_running_session_is_counted() {
    let clock = Clock::new();
    let mut m = manager(10, u64::MAX);
    let id = m.open(clock.now()).unwrap();
    assert!(m.remove(id).is_some());
    assert!(m.remove(id).is_none());
    assert!(m.session(id).is_none());
    assert!(m.session_mut(id).is_none());
    assert_eq!(m.metrics().sessions_removed_unfinished, 1);
}

#[test]
fn timers_fire_through_the_manager() {
    let mut clock = Clock::new();
    let mut m = manager(10, u64::MAX);
    let t0 = clock.now();
    // Session a never gets its replica connected; session b is fully connected.
    let a = m.open(t0).unwrap();
    m.session_mut(a)
        .unwrap()
        .on_connected(Side::Primary, t0)
        .unwrap();
    let b = m.open(t0).unwrap();
    {
        let mut s = m.session_mut(b).unwrap();
        s.on_connected(Side::Primary, t0).unwrap();
        s.on_connected(Side::Replica(0), t0).unwrap();
    }
    let _ = take_actions(&mut m, a);
    let _ = take_actions(&mut m, b);
    // Both sessions start with the connect deadline (5 s).
    assert_eq!(m.poll_timeout(), Some(t0 + Duration::from_secs(5)));
    let mut touched = Vec::new();
    m.handle_timeout(clock.advance(Duration::from_secs(5)), &mut touched);
    touched.sort();
    assert_eq!(touched, vec![a, b]);
    assert_eq!(
        take_actions(&mut m, a),
        vec![Action::Detached {
            replica: 0,
            reason: DetachReason::ConnectTimeout
        }]
    );
    assert!(take_actions(&mut m, b).is_empty(), "b had nothing due");
    // Next: idle timeouts at 60 s. Keep b busy at 30 s: only a idles out at 60 s.
    assert_eq!(m.poll_timeout(), Some(t0 + Duration::from_secs(60)));
    let t30 = clock.advance(Duration::from_secs(25));
    m.session_mut(b)
        .unwrap()
        .on_data(Side::Client, b"x", t30)
        .unwrap();
    touched.clear();
    m.handle_timeout(clock.advance(Duration::from_secs(30)), &mut touched);
    touched.sort();
    // b's registered deadline was early (timers may be early, never late): it is asked,
    // finds nothing due, and registers its real deadline.
    assert_eq!(touched, vec![a, b]);
    assert!(take_actions(&mut m, b).is_empty());
    assert_eq!(take_actions(&mut m, a).last(), Some(&Action::Finished));
    m.remove(a);
    assert_eq!(m.poll_timeout(), Some(t30 + Duration::from_secs(60)));
    touched.clear();
    m.handle_timeout(clock.advance(Duration::from_secs(30)), &mut touched);
    assert_eq!(touched, vec![b]);
    assert_eq!(take_actions(&mut m, b).last(), Some(&Action::Finished));
    m.remove(b);
    let metrics = m.metrics();
    assert_eq!(metrics.totals.idle_timeouts, 2);
    assert_eq!(metrics.totals.detached.connect_timeout, 1);
    assert_eq!(metrics.sessions_active, 0);
}

#[test]
fn many_touches_keep_the_timer_heap_small() {
    // Idle deadlines move later on every byte; that must not pile up heap entries. The
    // heap is private, so check behaviour: after many touches, one wakeup suffices.
    let mut clock = Clock::new();
    let mut m = manager(10, u64::MAX);
    let id = m.open(clock.now()).unwrap();
    for _ in 0..10_000 {
        let now = clock.advance(Duration::from_millis(1));
        let mut s = m.session_mut(id).unwrap();
        let _ = s.on_connected(Side::Primary, now);
        s.on_data(Side::Client, b"y", now).unwrap();
        drain(&mut s, Side::Primary, now);
    }
    let mut touched = Vec::new();
    let mut wakeups = 0;
    while let Some(t) = m.poll_timeout() {
        wakeups += 1;
        m.handle_timeout(t, &mut touched);
        assert!(wakeups < 10, "timer entries piled up");
    }
    assert!(m.session(id).unwrap().is_finished());
}
