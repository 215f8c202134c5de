//! Reply verification through the session's public contract: answers read from the
//! replicas are compared with the primary's, and only the first divergence (or a window
//! overrun) per replica is reported.

mod common;

use std::time::Duration;

use common::{Clock, actions, config, connected, drain};
use ncp_replication::{Action, DetachReason, ReplyCheckOutcome, SessionConfig, Side};

fn verifying(replicas: u16, window: u64) -> SessionConfig {
    SessionConfig {
        verify_window_bytes: window,
        ..config(replicas)
    }
}

/// A Redis-like answer stream: `n` bulk replies.
fn answers(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| format!("$6\r\nval{i:03}\r\n").into_bytes())
        .collect()
}

#[test]
fn identical_answers_report_nothing_and_are_counted_as_compared() {
    let clock = Clock::new();
    let mut s = connected(verifying(1, 4096), &clock);
    let answer = answers(50);
    for chunk in answer.chunks(37) {
        s.on_data(Side::Primary, chunk, clock.now()).unwrap();
        drain(&mut s, Side::Client, clock.now());
    }
    for chunk in answer.chunks(101) {
        s.on_data(Side::Replica(0), chunk, clock.now()).unwrap();
    }
    s.on_fin(Side::Primary, clock.now()).unwrap();
    assert!(
        !actions(&mut s)
            .iter()
            .any(|a| matches!(a, Action::ReplyCheck { .. })),
    );
    assert_eq!(s.reply_bytes_compared(0), answer.len() as u64);
    assert_eq!(s.reply_mismatch(0), None);
}

#[test]
fn one_differing_byte_is_reported_once_at_its_offset() {
    let clock = Clock::new();
    let mut s = connected(verifying(2, 4096), &clock);
    let answer = answers(20);
    let mut wrong = answer.clone();
    let at = 123;
    wrong[at] ^= 0x20;
    s.on_data(Side::Primary, &answer, clock.now()).unwrap();
    s.on_data(Side::Replica(1), &answer, clock.now()).unwrap();
    // The replica answers in pieces; the mismatch is in the middle of the second.
    for chunk in wrong.chunks(100) {
        s.on_data(Side::Replica(0), chunk, clock.now()).unwrap();
    }
    let checks: Vec<Action> = actions(&mut s)
        .into_iter()
        .filter(|a| matches!(a, Action::ReplyCheck { .. }))
        .collect();
    assert_eq!(
        checks,
        vec![Action::ReplyCheck {
            replica: 0,
            outcome: ReplyCheckOutcome::Mismatch
        }]
    );
    let m = s.reply_mismatch(0).expect("mismatch recorded");
    assert_eq!(m.offset, at as u64);
    assert_eq!(m.primary.first(), answer.get(at));
    assert_eq!(m.replica.first(), wrong.get(at));
    assert_eq!(
        m.replica.len(),
        32,
        "the rest of its chunk (77 bytes), capped"
    );
    assert_eq!(s.reply_bytes_compared(0), at as u64);
    assert_eq!(s.reply_mismatch(1), None);
    assert_eq!(s.reply_bytes_compared(1), answer.len() as u64);
    // The replica is still part of the session: a mismatch changes no data path.
    assert!(s.replica_is_live(0));
}

#[test]
fn a_replica_answering_slower_than_the_primary_over_many_chunks_stays_in_step() {
    let clock = Clock::new();
    let answer = answers(2000); // ~26 KB
    let mut s = connected(verifying(1, 8192), &clock);
    let mut replica_at = 0;
    for chunk in answer.chunks(512) {
        s.on_data(Side::Primary, chunk, clock.now()).unwrap();
        drain(&mut s, Side::Client, clock.now());
        // The replica trails by ~4 KB, in uneven pieces.
        let target = (replica_at + 500).min(answer.len().saturating_sub(4096).max(replica_at));
        s.on_data(Side::Replica(0), &answer[replica_at..target], clock.now())
            .unwrap();
        replica_at = target;
    }
    s.on_fin(Side::Primary, clock.now()).unwrap();
    s.on_data(Side::Replica(0), &answer[replica_at..], clock.now())
        .unwrap();
    assert!(
        !actions(&mut s)
            .iter()
            .any(|a| matches!(a, Action::ReplyCheck { .. })),
    );
    assert_eq!(s.reply_bytes_compared(0), answer.len() as u64);
}

#[test]
fn an_exceeded_window_stops_verifying_without_a_mismatch() {
    let clock = Clock::new();
    let mut s = connected(verifying(1, 1024), &clock);
    s.on_data(Side::Primary, &[b'x'; 1000], clock.now())
        .unwrap();
    drain(&mut s, Side::Client, clock.now());
    assert!(actions(&mut s).is_empty());
    s.on_data(Side::Primary, &[b'x'; 100], clock.now()).unwrap();
    assert_eq!(
        actions(&mut s),
        vec![Action::ReplyCheck {
            replica: 0,
            outcome: ReplyCheckOutcome::WindowExceeded
        }]
    );
    // Whatever it answers now is not judged.
    s.on_data(Side::Replica(0), b"something else", clock.now())
        .unwrap();
    assert!(actions(&mut s).is_empty());
    assert_eq!(s.reply_mismatch(0), None);
}

#[test]
fn a_detached_replica_is_reported_as_detached_and_not_judged() {
    let clock = Clock::new();
    let mut s = connected(verifying(1, 4096), &clock);
    s.on_data(Side::Primary, b"+OK\r\n", clock.now()).unwrap();
    s.on_reset(Side::Replica(0), clock.now()).unwrap();
    assert_eq!(
        actions(&mut s),
        vec![Action::Detached {
            replica: 0,
            reason: DetachReason::Died
        }]
    );
    // A late answer of the detached replica is dropped unjudged.
    s.on_data(Side::Replica(0), b"-ERR", clock.now()).unwrap();
    s.on_fin(Side::Primary, clock.now()).unwrap();
    assert!(
        !actions(&mut s)
            .iter()
            .any(|a| matches!(a, Action::ReplyCheck { .. }))
    );
    assert_eq!(s.reply_mismatch(0), None);
}

#[test]
fn verification_off_changes_nothing_and_the_window_counts_in_the_reservation() {
    let clock = Clock::new();
    let mut s = connected(config(1), &clock);
    s.on_data(Side::Primary, b"+OK\r\n", clock.now()).unwrap();
    s.on_data(Side::Replica(0), b"-ERR different\r\n", clock.now())
        .unwrap();
    s.on_fin(Side::Primary, clock.now()).unwrap();
    assert!(
        !actions(&mut s)
            .iter()
            .any(|a| matches!(a, Action::ReplyCheck { .. }))
    );
    assert_eq!(s.reply_bytes_compared(0), 0);
    let plain = config(2).max_memory();
    assert_eq!(verifying(2, 1000).max_memory(), plain + 4000);
    assert_eq!(verifying(0, 1000).max_memory(), config(0).max_memory());
    let mut too_big = verifying(1, 2 << 30);
    assert!(too_big.validate().is_err());
    too_big.verify_window_bytes = 1 << 20;
    assert!(too_big.validate().is_ok());
}

/// Client writes, the primary answers everything and both sides close; the replica has
/// all its bytes (our FIN sent) but has not answered yet.
fn ended_before_the_replica_answered(clock: &Clock, answer: &[u8]) -> ncp_replication::Session {
    let mut s = connected(verifying(1, 64 << 10), clock);
    let now = clock.now();
    s.on_data(Side::Client, b"SET k v\r\n", now)
        .expect("client data");
    s.on_fin(Side::Client, now).expect("client FIN");
    drain(&mut s, Side::Primary, now);
    drain(&mut s, Side::Replica(0), now);
    s.on_data(Side::Primary, answer, now).expect("answer");
    s.on_fin(Side::Primary, now).expect("primary FIN");
    drain(&mut s, Side::Client, now);
    let acts = actions(&mut s);
    assert!(acts.contains(&Action::Close(Side::Replica(0))), "{acts:?}");
    assert!(acts.contains(&Action::Close(Side::Client)), "{acts:?}");
    assert!(
        !acts.contains(&Action::Finished),
        "the replica's answer is still owed: {acts:?}"
    );
    s
}

#[test]
fn the_tail_of_a_slow_replicas_answer_is_compared_before_the_session_ends() {
    let mut clock = Clock::new();
    let answer = answers(300);
    let mut s = ended_before_the_replica_answered(&clock, &answer);
    let (head, tail) = answer.split_at(answer.len() - 10);
    let now = clock.advance(Duration::from_millis(500));
    s.on_data(Side::Replica(0), head, now).unwrap();
    assert!(actions(&mut s).is_empty(), "ten bytes still owed");
    s.on_data(Side::Replica(0), tail, now).unwrap();
    assert_eq!(actions(&mut s), vec![Action::Finished]);
    assert_eq!(s.reply_bytes_compared(0), answer.len() as u64);
    assert_eq!(s.reply_mismatch(0), None);
}

#[test]
fn a_wrong_tail_is_a_mismatch_even_after_client_and_primary_are_done() {
    let clock = Clock::new();
    let answer = answers(40);
    let mut s = ended_before_the_replica_answered(&clock, &answer);
    let mut wrong = answer.clone();
    let last = wrong.len() - 3;
    wrong[last] = b'X';
    s.on_data(Side::Replica(0), &wrong, clock.now()).unwrap();
    assert_eq!(
        actions(&mut s),
        vec![
            Action::ReplyCheck {
                replica: 0,
                outcome: ReplyCheckOutcome::Mismatch
            },
            Action::Finished
        ]
    );
    assert_eq!(s.reply_mismatch(0).map(|m| m.offset), Some(last as u64));
}

#[test]
fn an_answer_that_never_comes_ends_at_the_drain_deadline_without_a_detach() {
    let mut clock = Clock::new();
    let answer = answers(10);
    let mut s = ended_before_the_replica_answered(&clock, &answer);
    let deadline = s.poll_timeout().expect("the drain deadline");
    assert_eq!(deadline, clock.now() + config(1).drain_timeout);
    s.handle_timeout(clock.advance(Duration::from_secs(1)));
    assert!(actions(&mut s).is_empty(), "early: nothing yet");
    clock.offset = config(1).drain_timeout;
    s.handle_timeout(clock.now());
    assert_eq!(actions(&mut s), vec![Action::Finished]);
    assert_eq!(s.stats().detached.total(), 0);
    assert_eq!(s.reply_mismatch(0), None);
}

#[test]
fn a_replica_closing_its_short_answer_ends_the_wait_without_a_mismatch() {
    let clock = Clock::new();
    let answer = answers(10);
    let mut s = ended_before_the_replica_answered(&clock, &answer);
    s.on_data(Side::Replica(0), &answer[..7], clock.now())
        .unwrap();
    s.on_fin(Side::Replica(0), clock.now()).unwrap();
    assert_eq!(actions(&mut s), vec![Action::Finished]);
    assert_eq!(s.reply_bytes_compared(0), 7);
    assert_eq!(s.reply_mismatch(0), None);
}
