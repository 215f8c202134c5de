//! What one fault did, worked out from the writer's log and the keys the replica holds
//! afterwards. Pure: the driver collects both and hands them here.

use std::collections::HashSet;

/// One write of the fault writer: `SET f:<seq> <seq>` sent at `sent_us` (Unix time in
/// microseconds, the same clock the driver stamps its fault times with).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub seq: u64,
    pub sent_us: u64,
    /// When the primary's `+OK` arrived, or `None` when the write failed (connection
    /// refused or reset, an error reply, no answer within the writer's timeout).
    pub acked_us: Option<u64>,
}

/// Parses the writer's output: one line per write, `ok SEQ SENT ACKED` or
/// `err SEQ SENT REASON…`. Lines of any other shape are counted and skipped.
pub fn parse_log(text: &str) -> (Vec<Write>, usize) {
    let mut writes = Vec::new();
    let mut skipped = 0;
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let parsed = match (f.next(), f.next(), f.next(), f.next()) {
            (Some("ok"), Some(seq), Some(sent), Some(acked)) => {
                match (seq.parse(), sent.parse(), acked.parse()) {
                    (Ok(seq), Ok(sent_us), Ok(acked)) => Some(Write {
                        seq,
                        sent_us,
                        acked_us: Some(acked),
                    }),
                    _ => None,
                }
            }
            (Some("err"), Some(seq), Some(sent), _) => match (seq.parse(), sent.parse()) {
                (Ok(seq), Ok(sent_us)) => Some(Write {
                    seq,
                    sent_us,
                    acked_us: None,
                }),
                _ => None,
            },
            _ => None,
        };
        match parsed {
            Some(w) => writes.push(w),
            None => skipped += 1,
        }
    }
    (writes, skipped)
}

/// The sequence numbers in the replica's key list (`f:<seq>`, one key per line).
pub fn replica_keys(text: &str) -> HashSet<u64> {
    text.lines()
        .filter_map(|k| k.trim().strip_prefix("f:")?.parse().ok())
        .collect()
}

/// A fault's effect, as RELIABILITY.md reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub writes: usize,
    /// Writes the client saw fail.
    pub client_errors: usize,
    /// The longest time between two acknowledged writes from the fault on (seconds).
    pub longest_stall_s: f64,
    /// Acknowledged writes sent from the fault on that the replica does not hold.
    pub replica_missed: usize,
    /// Acknowledged writes from before the fault the replica no longer holds (it lost its
    /// memory in a restart).
    pub lost_before_fault: usize,
    /// From the repair (or the fault, if nothing needed repairing) to the first
    /// acknowledged write from which on the replica held every acknowledged write:
    /// replication (and the client) back. `None` when it never came back within the run.
    pub back_after_s: Option<f64>,
}

/// Works out a fault's outcome from the writes, the replica's keys, the time the fault
/// began and the time it was repaired (both Unix microseconds).
pub fn outcome(
    writes: &[Write],
    on_replica: &HashSet<u64>,
    fault_us: u64,
    repair_us: u64,
) -> Outcome {
    let acked: Vec<&Write> = writes.iter().filter(|w| w.acked_us.is_some()).collect();
    let missing = |w: &&&Write| !on_replica.contains(&w.seq);
    let replica_missed = acked
        .iter()
        .filter(|w| w.sent_us >= fault_us)
        .filter(missing)
        .count();
    let lost_before_fault = acked
        .iter()
        .filter(|w| w.sent_us < fault_us)
        .filter(missing)
        .count();
    let mut longest_us = 0;
    let mut last = fault_us;
    for w in &acked {
        let at = w.acked_us.unwrap_or_default();
        if at >= fault_us {
            longest_us = longest_us.max(at - last);
            last = at;
        }
    }
    // Replication is back with the first acknowledged write, sent after the repair and
    // after the last write the replica missed, that the replica holds (all later ones
    // being held too, it stayed back).
    let last_missed = acked
        .iter()
        .filter(|w| w.sent_us >= fault_us)
        .filter(missing)
        .map(|w| w.seq)
        .max();
    let back_after_s = acked
        .iter()
        .filter(|w| w.sent_us >= repair_us && last_missed.is_none_or(|m| w.seq > m))
        .find(|w| on_replica.contains(&w.seq))
        .map(|w| (w.sent_us - repair_us) as f64 / 1e6);
    Outcome {
        writes: writes.len(),
        client_errors: writes.len() - acked.len(),
        longest_stall_s: longest_us as f64 / 1e6,
        replica_missed,
        lost_before_fault,
        back_after_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(seq: u64, sent_ms: u64, ok: bool) -> Write {
        Write {
            seq,
            sent_us: sent_ms * 1000,
            acked_us: ok.then_some(sent_ms * 1000 + 500),
        }
    }

    #[test]
    fn the_log_parses_and_odd_lines_are_counted() {
        let (writes, skipped) =
            parse_log("ok 1 1000 1400\nerr 2 2000 connection reset\nbanner\nok x 1 2\n");
        assert_eq!(
            writes,
            vec![
                Write {
                    seq: 1,
                    sent_us: 1000,
                    acked_us: Some(1400)
                },
                Write {
                    seq: 2,
                    sent_us: 2000,
                    acked_us: None
                },
            ]
        );
        assert_eq!(skipped, 2);
        assert_eq!(
            replica_keys("f:1\nf:7\nother\nf:x\n"),
            HashSet::from([1, 7])
        );
    }

    #[test]
    fn an_outage_counts_the_missed_writes_and_the_time_back_from_the_repair() {
        // Writes every 100 ms; fault at 1.0 s, repaired at 2.0 s; the replica misses the
        // writes sent at 1.0 to 2.4 s, the one at 1.5 s failed at the client.
        let writes: Vec<Write> = (0..40).map(|i| w(i, i * 100, i != 15)).collect();
        let held: HashSet<u64> = (0..40).filter(|i| !(10..=24).contains(i)).collect();
        let o = outcome(&writes, &held, 1_000_000, 2_000_000);
        assert_eq!(o.writes, 40);
        assert_eq!(o.client_errors, 1);
        assert_eq!(
            o.replica_missed, 14,
            "15 missed, one of them never acknowledged"
        );
        assert_eq!(o.lost_before_fault, 0);
        assert_eq!(
            o.back_after_s,
            Some(0.5),
            "first held write after the gap: 2.5 s"
        );
        assert!(
            (o.longest_stall_s - 0.2).abs() < 1e-9,
            "{}",
            o.longest_stall_s
        );
    }

    #[test]
    fn a_replica_that_never_comes_back_and_one_that_never_left() {
        let writes: Vec<Write> = (0..10).map(|i| w(i, i * 100, true)).collect();
        let early: HashSet<u64> = (0..3).collect();
        let gone = outcome(&writes, &early, 250_000, 400_000);
        assert_eq!(gone.replica_missed, 7);
        assert_eq!(gone.back_after_s, None);
        let all: HashSet<u64> = (0..10).collect();
        let fine = outcome(&writes, &all, 250_000, 400_000);
        assert_eq!((fine.replica_missed, fine.back_after_s), (0, Some(0.0)));
        // Nothing missed, but nothing acknowledged either for a while after the repair.
        let stalled: Vec<Write> = (0..10)
            .map(|i| w(i, i * 100, !(3..=7).contains(&i)))
            .collect();
        let o = outcome(&stalled, &all, 250_000, 400_000);
        assert_eq!((o.replica_missed, o.client_errors), (0, 5));
        assert_eq!(
            o.back_after_s,
            Some(0.4),
            "the first answered write after the repair"
        );
        // A replica restarted empty loses what it held before the fault.
        let late: HashSet<u64> = (5..10).collect();
        assert_eq!(
            outcome(&writes, &late, 450_000, 600_000).lost_before_fault,
            5
        );
    }
}
