//! Reply verification: each replica's answer stream compared with the primary's, byte
//! for byte at the same offsets, in bounded memory.
//!
//! A deterministic service (Redis, for one) answers the same byte stream to the same
//! request stream. A replica whose answers differ from the primary's has not applied the
//! same writes (or never had the same data): it has diverged, and a failover to it would
//! lose data. The middlebox reads every replica's answers anyway; this module is the
//! comparison it can make of them for free.
//!
//! Memory: only the part of the primary's answer that some replica still has to be
//! compared with is kept, from the slowest comparing replica's offset to the primary's
//! (one shared copy); a replica that answers *ahead* of the primary has its own excess
//! kept until the primary's bytes arrive. Neither may exceed the session's
//! `verify_window_bytes` for one replica: a replica that would need more stops being
//! verified for this session ([`ReplyCheckOutcome::WindowExceeded`]), which is counted
//! and is not a divergence. So one session holds at most `replicas × window` bytes
//! here, on top of its stream buffers (see [`crate::SessionConfig::max_memory`]).
//!
//! Judgement, once per replica and session:
//! - the first byte that differs is a mismatch at its offset ([`Mismatch`], with a short
//!   excerpt of both sides);
//! - a replica that answers more than the primary did, once the primary has closed its
//!   answer (FIN), mismatches at the primary's length;
//! - a replica that answers less (because it was detached, closed its answer early, or
//!   did not finish within the session's drain time) is no mismatch: what it did not say
//!   cannot be compared. A detach
//!   is reported on its own ([`crate::Action::Detached`]).

use std::collections::VecDeque;

/// Bytes of each side shown from the first differing offset.
pub const EXCERPT_BYTES: usize = 32;

/// Capacity the primary's window keeps when empty, so that a replica trailing the
/// primary by a little does not cost an allocation per answer.
const KEEP_CAPACITY: usize = 16 << 10;

/// Where and how a replica's answer first differed from the primary's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Offset in the answer stream (the same for both sides) of the first differing byte.
    pub offset: u64,
    /// Up to [`EXCERPT_BYTES`] of the primary's answer from `offset`; empty when the
    /// primary's answer ended there (the replica answered more).
    pub primary: Vec<u8>,
    /// Up to [`EXCERPT_BYTES`] of the replica's answer from `offset`.
    pub replica: Vec<u8>,
}

/// Why verification of one replica ended early in a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplyCheckOutcome {
    /// The replica's answer differed from the primary's: details in
    /// [`ReplyVerifier::mismatch`]. The replica has diverged.
    Mismatch,
    /// Comparing it would have needed more than the session's verification window (one
    /// side too far ahead of the other); it is not verified for the rest of the session.
    /// Not a divergence.
    WindowExceeded,
}

/// Where the comparison of one replica stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Check {
    Comparing {
        /// Bytes of the replica's answer seen so far.
        offset: u64,
        /// The replica's bytes beyond the primary's answer so far (`offset` minus the
        /// primary's length of them), waiting for the primary's to compare with.
        ahead: VecDeque<u8>,
    },
    Mismatched(Mismatch),
    WindowExceeded,
    /// Detached, or the session no longer reads it.
    Stopped,
}

/// The comparison of every replica's answer with the primary's, for one session.
#[derive(Debug)]
pub struct ReplyVerifier {
    window_bytes: u64,
    /// Bytes of the primary's answer seen so far.
    primary_len: u64,
    /// The primary closed its answer: nothing more will be compared with.
    primary_done: bool,
    /// Stream offset of `window[0]`.
    base: u64,
    /// The primary's answer from `base` to `primary_len`.
    window: VecDeque<u8>,
    checks: Vec<Check>,
    /// Bytes found equal, per replica.
    compared: Vec<u64>,
    /// Replicas still `Comparing`; 0 makes the primary's path a counter update.
    comparing: usize,
}

impl ReplyVerifier {
    /// A verifier for `replicas` replicas, each allowed `window_bytes` of answer held for
    /// it (see the module docs).
    pub fn new(replicas: u16, window_bytes: u64) -> Self {
        let n = usize::from(replicas);
        Self {
            window_bytes,
            primary_len: 0,
            primary_done: false,
            base: 0,
            window: VecDeque::new(),
            checks: vec![
                Check::Comparing {
                    offset: 0,
                    ahead: VecDeque::new(),
                };
                n
            ],
            compared: vec![0; n],
            comparing: n,
        }
    }

    /// The first mismatch of `replica` in this session, if it had one.
    pub fn mismatch(&self, replica: u16) -> Option<&Mismatch> {
        match self.checks.get(usize::from(replica)) {
            Some(Check::Mismatched(m)) => Some(m),
            _ => None,
        }
    }

    /// Bytes of `replica`'s answer found equal to the primary's so far.
    pub fn bytes_compared(&self, replica: u16) -> u64 {
        self.compared
            .get(usize::from(replica))
            .copied()
            .unwrap_or(0)
    }

    /// Whether `replica` is still being compared.
    pub fn is_comparing(&self, replica: u16) -> bool {
        matches!(
            self.checks.get(usize::from(replica)),
            Some(Check::Comparing { .. })
        )
    }

    /// Whether `replica` is still being compared and has answered less than the primary
    /// so far: the rest of its answer is still to come (or will never come).
    pub fn is_behind(&self, replica: u16) -> bool {
        matches!(
            self.checks.get(usize::from(replica)),
            Some(Check::Comparing { offset, .. }) if *offset < self.primary_len
        )
    }

    /// Answer bytes held for the comparison right now.
    pub fn held_bytes(&self) -> u64 {
        let ahead: usize = self
            .checks
            .iter()
            .map(|c| match c {
                Check::Comparing { ahead, .. } => ahead.len(),
                _ => 0,
            })
            .sum();
        (self.window.len() + ahead) as u64
    }

    /// The primary answered `data` (the bytes the session accepted, in order). `report`
    /// is called for every replica whose verification ends here.
    pub fn on_primary(&mut self, data: &[u8], mut report: impl FnMut(u16, ReplyCheckOutcome)) {
        let old_len = self.primary_len;
        self.primary_len += data.len() as u64;
        if self.comparing == 0 {
            self.base = self.primary_len;
            return;
        }
        if data.is_empty() {
            return;
        }
        let budget = self.window_bytes;
        let new_len = self.primary_len;
        for (i, check) in (0u16..).zip(self.checks.iter_mut()) {
            let Check::Comparing { offset, ahead } = check else {
                continue;
            };
            if *offset < new_len && new_len - *offset > budget {
                // The primary would be further ahead of it than the window holds.
                *check = Check::WindowExceeded;
                self.comparing -= 1;
                report(i, ReplyCheckOutcome::WindowExceeded);
                continue;
            }
            if ahead.is_empty() {
                continue;
            }
            // Its bytes beyond `old_len` meet the primary's new ones.
            let overlap = ahead.len().min(data.len());
            let (a, b) = deque_range(ahead, 0, overlap);
            match first_difference(a, b, data.get(..overlap).unwrap_or_default()) {
                Some(k) => {
                    let primary = excerpt(data.get(k..).unwrap_or_default(), &[]);
                    let (ra, rb) = deque_range(ahead, k, EXCERPT_BYTES);
                    let mismatch = Mismatch {
                        offset: old_len + k as u64,
                        primary,
                        replica: excerpt(ra, rb),
                    };
                    if let Some(c) = self.compared.get_mut(usize::from(i)) {
                        *c += k as u64;
                    }
                    *check = Check::Mismatched(mismatch);
                    self.comparing -= 1;
                    report(i, ReplyCheckOutcome::Mismatch);
                }
                None => {
                    ahead.drain(..overlap);
                    if let Some(c) = self.compared.get_mut(usize::from(i)) {
                        *c += overlap as u64;
                    }
                }
            }
        }
        // Kept only while a replica still has to be compared with these bytes.
        let behind = self
            .checks
            .iter()
            .any(|c| matches!(c, Check::Comparing { offset, .. } if *offset < self.primary_len));
        if behind {
            self.window.extend(data);
        } else {
            self.window.clear();
        }
        self.trim();
    }

    /// The primary closed its answer: a replica that has said more has mismatched.
    pub fn on_primary_end(&mut self, mut report: impl FnMut(u16, ReplyCheckOutcome)) {
        self.primary_done = true;
        for i in 0..self.checks.len() {
            let longer = matches!(
                self.checks.get(i),
                Some(Check::Comparing { ahead, .. }) if !ahead.is_empty()
            );
            if longer && let Ok(replica) = u16::try_from(i) {
                self.answered_more(replica, &[]);
                report(replica, ReplyCheckOutcome::Mismatch);
            }
        }
        self.trim();
    }

    /// Replica `replica` answered `data`. `report` is called if its verification ends.
    pub fn on_replica(
        &mut self,
        replica: u16,
        data: &[u8],
        mut report: impl FnMut(u16, ReplyCheckOutcome),
    ) {
        let slot = usize::from(replica);
        let Some(Check::Comparing { offset, ahead }) = self.checks.get_mut(slot) else {
            return;
        };
        let mut rest = data;
        if *offset < self.primary_len {
            // Compare with the primary's bytes kept for it.
            let k = to_usize(self.primary_len - *offset).min(rest.len());
            // A comparing replica is never before `base` (see `trim`).
            let start = to_usize(offset.saturating_sub(self.base));
            let (wa, wb) = deque_range(&self.window, start, k);
            let (head, tail) = rest.split_at(k);
            if let Some(j) = first_difference(wa, wb, head) {
                let (pa, pb) = deque_range(&self.window, start + j, EXCERPT_BYTES);
                let mismatch = Mismatch {
                    offset: *offset + j as u64,
                    primary: excerpt(pa, pb),
                    replica: excerpt(head.get(j..).unwrap_or_default(), tail),
                };
                if let Some(c) = self.compared.get_mut(slot) {
                    *c += j as u64;
                }
                self.end(slot, Check::Mismatched(mismatch));
                report(replica, ReplyCheckOutcome::Mismatch);
                return;
            }
            *offset += k as u64;
            if let Some(c) = self.compared.get_mut(slot) {
                *c += k as u64;
            }
            rest = tail;
        }
        if !rest.is_empty() {
            if self.primary_done {
                self.answered_more(replica, rest);
                report(replica, ReplyCheckOutcome::Mismatch);
                return;
            }
            if (ahead.len() + rest.len()) as u64 > self.window_bytes {
                self.end(slot, Check::WindowExceeded);
                report(replica, ReplyCheckOutcome::WindowExceeded);
                return;
            }
            ahead.extend(rest);
            *offset += rest.len() as u64;
        }
        self.trim();
    }

    /// `replica` is no longer read (detached), or its answer has ended (its FIN): it is
    /// not judged any further.
    pub fn stop(&mut self, replica: u16) {
        let slot = usize::from(replica);
        if matches!(self.checks.get(slot), Some(Check::Comparing { .. })) {
            self.end(slot, Check::Stopped);
        }
    }

    /// The replica's answer goes on past the primary's closed answer: a mismatch at the
    /// primary's length. `more` is what it just said beyond what is held.
    fn answered_more(&mut self, replica: u16, more: &[u8]) {
        let slot = usize::from(replica);
        let Some(Check::Comparing { ahead, .. }) = self.checks.get(slot) else {
            return;
        };
        let (a, b) = deque_range(ahead, 0, EXCERPT_BYTES);
        let mut replica_bytes = excerpt(a, b);
        let room = EXCERPT_BYTES.saturating_sub(replica_bytes.len());
        replica_bytes.extend(more.iter().take(room));
        let mismatch = Mismatch {
            offset: self.primary_len,
            primary: Vec::new(),
            replica: replica_bytes,
        };
        self.end(slot, Check::Mismatched(mismatch));
    }

    fn end(&mut self, slot: usize, state: Check) {
        if let Some(check) = self.checks.get_mut(slot) {
            *check = state;
            self.comparing -= 1;
        }
        self.trim();
    }

    /// Drops the primary's bytes every comparing replica is past.
    fn trim(&mut self) {
        let slowest = self
            .checks
            .iter()
            .filter_map(|c| match c {
                Check::Comparing { offset, .. } => Some(*offset),
                _ => None,
            })
            .min()
            .unwrap_or(self.primary_len)
            .min(self.primary_len);
        let drop = to_usize(slowest.saturating_sub(self.base)).min(self.window.len());
        self.window.drain(..drop);
        self.base = slowest;
        if self.window.is_empty() && self.window.capacity() > KEEP_CAPACITY {
            // A finished burst gives its memory back; a small ring stays for the next.
            self.window.shrink_to(KEEP_CAPACITY);
        }
    }
}

/// `len` bytes (fewer if the deque is shorter) of `d` from `start`, as its two slices.
fn deque_range(d: &VecDeque<u8>, start: usize, len: usize) -> (&[u8], &[u8]) {
    let (a, b) = d.as_slices();
    let end = start.saturating_add(len).min(d.len());
    if start >= end {
        return (&[], &[]);
    }
    if start >= a.len() {
        let from = start - a.len();
        return (&[], b.get(from..end - a.len()).unwrap_or_default());
    }
    let first = a.get(start..end.min(a.len())).unwrap_or_default();
    let second = b.get(..end.saturating_sub(a.len())).unwrap_or_default();
    (first, second)
}

/// Index of the first byte where `a` followed by `b` differs from `other` (same total
/// length), `None` if equal.
fn first_difference(a: &[u8], b: &[u8], other: &[u8]) -> Option<usize> {
    let (oa, ob) = other.split_at(a.len().min(other.len()));
    // Equal slices are the common case: a memcmp says so without a byte loop.
    if a == oa && b.get(..ob.len()).unwrap_or(b) == ob {
        return None;
    }
    a.iter()
        .chain(b)
        .zip(other)
        .position(|(x, y)| x != y)
        .or(Some(other.len().min(a.len() + b.len())))
}

/// Up to [`EXCERPT_BYTES`] of `a` followed by `b`.
fn excerpt(a: &[u8], b: &[u8]) -> Vec<u8> {
    a.iter().chain(b).take(EXCERPT_BYTES).copied().collect()
}

fn to_usize(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcomes(
        f: impl FnOnce(&mut dyn FnMut(u16, ReplyCheckOutcome)),
    ) -> Vec<(u16, ReplyCheckOutcome)> {
        let mut out = Vec::new();
        f(&mut |r, o| out.push((r, o)));
        out
    }

    #[test]
    fn identical_answers_in_any_interleaving_match() {
        let answer: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut v = ReplyVerifier::new(2, 64 << 10);
        let mut out = Vec::new();
        // Replica 0 trails the primary in small pieces, replica 1 runs ahead in big ones.
        for (i, chunk) in answer.chunks(1000).enumerate() {
            v.on_replica(1, chunk, |r, o| out.push((r, o)));
            v.on_primary(chunk, |r, o| out.push((r, o)));
            if i % 2 == 1 {
                let from = (i - 1) * 1000;
                for piece in answer[from..from + 2000].chunks(7) {
                    v.on_replica(0, piece, |r, o| out.push((r, o)));
                }
            }
        }
        v.on_primary_end(|r, o| out.push((r, o)));
        assert_eq!(out, vec![]);
        assert_eq!(v.bytes_compared(0), 10_000);
        assert_eq!(v.bytes_compared(1), 10_000);
        assert!(v.is_comparing(0) && v.is_comparing(1));
        assert_eq!(v.held_bytes(), 0, "nothing kept once everyone has compared");
    }

    #[test]
    fn first_differing_byte_is_found_on_either_side_of_the_race() {
        let primary = b"+OK\r\n$5\r\nhello\r\n".to_vec();
        let mut replica = primary.clone();
        replica[11] = b'X';
        // Replica behind: compared against the kept primary bytes.
        let mut v = ReplyVerifier::new(1, 1024);
        v.on_primary(&primary, |_, _| panic!("nothing to report yet"));
        let out = outcomes(|f| v.on_replica(0, &replica, f));
        assert_eq!(out, vec![(0, ReplyCheckOutcome::Mismatch)]);
        let m = v.mismatch(0).expect("mismatch");
        assert_eq!(m.offset, 11);
        assert_eq!(m.primary, b"llo\r\n");
        assert_eq!(m.replica, b"Xlo\r\n");
        assert_eq!(v.bytes_compared(0), 11);
        assert_eq!(v.held_bytes(), 0);

        // Replica ahead: compared when the primary's bytes arrive.
        let mut v = ReplyVerifier::new(1, 1024);
        v.on_replica(0, &replica, |_, _| panic!("nothing to compare yet"));
        let out = outcomes(|f| v.on_primary(&primary[..8], f));
        assert_eq!(out, vec![]);
        let out = outcomes(|f| v.on_primary(&primary[8..], f));
        assert_eq!(out, vec![(0, ReplyCheckOutcome::Mismatch)]);
        let m = v.mismatch(0).expect("mismatch");
        assert_eq!(m.offset, 11);
        assert_eq!(m.primary, b"llo\r\n");
        assert_eq!(m.replica, b"Xlo\r\n");
    }

    #[test]
    fn excerpts_are_capped() {
        let primary = vec![b'a'; 200];
        let mut replica = primary.clone();
        replica[100] = b'b';
        let mut v = ReplyVerifier::new(1, 1024);
        v.on_primary(&primary, |_, _| {});
        v.on_replica(0, &replica, |_, _| {});
        let m = v.mismatch(0).expect("mismatch");
        assert_eq!(m.offset, 100);
        assert_eq!(m.primary.len(), EXCERPT_BYTES);
        assert_eq!(m.replica.len(), EXCERPT_BYTES);
        assert_eq!(m.replica[0], b'b');
    }

    #[test]
    fn a_replica_saying_more_than_the_closed_primary_mismatches_at_its_end() {
        let mut v = ReplyVerifier::new(2, 1024);
        v.on_primary(b"+OK\r\n", |_, _| {});
        v.on_replica(0, b"+OK\r\n+OK\r\n", |_, _| {});
        v.on_replica(1, b"+OK", |_, _| {});
        let out = outcomes(|f| v.on_primary_end(f));
        assert_eq!(out, vec![(0, ReplyCheckOutcome::Mismatch)]);
        let m = v.mismatch(0).expect("mismatch");
        assert_eq!((m.offset, m.primary.as_slice()), (5, &b""[..]));
        assert_eq!(m.replica, b"+OK\r\n");
        // A shorter answer is no mismatch, but more after the end is.
        assert!(v.is_comparing(1));
        let out = outcomes(|f| v.on_replica(1, b"\r\n-ERR", f));
        assert_eq!(out, vec![(1, ReplyCheckOutcome::Mismatch)]);
        assert_eq!(v.mismatch(1).map(|m| m.offset), Some(5));
        assert_eq!(
            v.mismatch(1).map(|m| m.replica.clone()),
            Some(b"-ERR".to_vec())
        );
    }

    #[test]
    fn a_window_overrun_ends_verification_without_a_mismatch() {
        // Replica 0 silent while the primary answers more than the window.
        let mut v = ReplyVerifier::new(2, 100);
        let out = outcomes(|f| v.on_primary(&[1; 60], f));
        assert_eq!(out, vec![]);
        v.on_replica(1, &[1; 60], |_, _| panic!("in step"));
        let out = outcomes(|f| v.on_primary(&[1; 60], f));
        assert_eq!(out, vec![(0, ReplyCheckOutcome::WindowExceeded)]);
        assert!(v.mismatch(0).is_none());
        assert!(!v.is_comparing(0));
        assert!(v.is_comparing(1));
        assert_eq!(v.held_bytes(), 60, "only what replica 1 still needs");
        // Later bytes from it are ignored.
        v.on_replica(0, &[9; 10], |_, _| panic!("no longer verified"));

        // A replica running too far ahead of the primary is cut off the same way.
        let mut v = ReplyVerifier::new(1, 100);
        v.on_replica(0, &[1; 100], |_, _| panic!("within the window"));
        let out = outcomes(|f| v.on_replica(0, &[1], f));
        assert_eq!(out, vec![(0, ReplyCheckOutcome::WindowExceeded)]);
        assert_eq!(v.held_bytes(), 0);
    }

    #[test]
    fn empty_inputs_change_nothing() {
        let mut v = ReplyVerifier::new(1, 1000);
        v.on_primary(b"+OK\r\n", |_, _| {});
        v.on_primary(b"", |_, _| {});
        v.on_replica(0, b"", |_, _| {});
        v.on_replica(0, b"+OK\r\n", |_, _| panic!("same answer"));
        assert_eq!(v.bytes_compared(0), 5);
    }

    #[test]
    fn a_stopped_replica_frees_the_window() {
        let mut v = ReplyVerifier::new(1, 1000);
        v.on_primary(&[7; 500], |_, _| {});
        assert_eq!(v.held_bytes(), 500);
        v.stop(0);
        assert_eq!(v.held_bytes(), 0);
        assert!(v.mismatch(0).is_none());
        v.on_replica(0, &[8; 10], |_, _| panic!("stopped"));
        v.on_primary(&[7; 500], |_, _| panic!("nobody to compare"));
        assert_eq!(v.held_bytes(), 0);
    }

    #[test]
    fn deque_ranges_cross_the_wrap() {
        let mut d: VecDeque<u8> = VecDeque::with_capacity(8);
        d.extend([0, 0, 0, 0, 0, 0]);
        d.drain(..5);
        d.extend([1, 2, 3, 4, 5]); // wraps around the ring
        let (a, b) = deque_range(&d, 1, 3);
        let joined: Vec<u8> = a.iter().chain(b).copied().collect();
        assert_eq!(joined, vec![1, 2, 3]);
        let (a, b) = deque_range(&d, 4, 100);
        let joined: Vec<u8> = a.iter().chain(b).copied().collect();
        assert_eq!(joined, vec![4, 5]);
        assert_eq!(first_difference(&[1, 2], &[3], &[1, 2, 4]), Some(2));
        assert_eq!(first_difference(&[1, 2], &[3], &[1, 2, 3]), None);
    }
}
