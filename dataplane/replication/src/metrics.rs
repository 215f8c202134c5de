//! Counters kept per session and the manager-wide snapshot built from them.
//!
//! Sessions count only their own traffic in plain integers (no atomics, no sharing: a
//! worker owns its sessions). The manager folds a session's counters into its running
//! totals when the session is removed, and adds the live sessions' counters and gauges
//! when a snapshot is asked for, so gauges fall back to zero once sessions are gone.

use crate::session::DetachReason;

/// Replicas detached, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct DetachCounts {
    /// The replica refused the connection (or failed before it was established).
    pub refused: u64,
    /// An established replica connection was reset or died.
    pub died: u64,
    /// The replica fell further behind than its byte budget.
    pub lagged: u64,
    /// The replica did not connect within the connect timeout.
    pub connect_timeout: u64,
    /// The replica had not caught up when the drain period after the session ended ran out.
    pub drain_timeout: u64,
    /// Its backlog would have grown beyond the spill budget, or its spool could not be
    /// written in time (disk slow or full).
    #[cfg_attr(feature = "serde", serde(default))]
    pub spill_budget: u64,
    /// Its own login failed (refused, unsupported, too slow), or the client's start-up
    /// could not be followed.
    #[cfg_attr(feature = "serde", serde(default))]
    pub login_failed: u64,
}

impl DetachCounts {
    /// Counts one detach.
    pub fn record(&mut self, reason: DetachReason) {
        let slot = match reason {
            DetachReason::Refused => &mut self.refused,
            DetachReason::Died => &mut self.died,
            DetachReason::Lagged => &mut self.lagged,
            DetachReason::ConnectTimeout => &mut self.connect_timeout,
            DetachReason::DrainTimeout => &mut self.drain_timeout,
            DetachReason::SpillBudgetExceeded => &mut self.spill_budget,
            DetachReason::LoginFailed => &mut self.login_failed,
        };
        *slot += 1;
    }

    /// All detaches, whatever the reason.
    pub fn total(&self) -> u64 {
        self.refused
            + self.died
            + self.lagged
            + self.connect_timeout
            + self.drain_timeout
            + self.spill_budget
            + self.login_failed
    }

    /// Adds another set of counts (another session's, another worker's).
    pub fn add(&mut self, o: &Self) {
        self.refused += o.refused;
        self.died += o.died;
        self.lagged += o.lagged;
        self.connect_timeout += o.connect_timeout;
        self.drain_timeout += o.drain_timeout;
        self.spill_budget += o.spill_budget;
        self.login_failed += o.login_failed;
    }
}

/// Monotonic counters of one session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Client bytes accepted by the core.
    pub client_bytes_in: u64,
    /// Client bytes handed to the primary's socket.
    pub primary_bytes_out: u64,
    /// Primary bytes accepted by the core.
    pub primary_bytes_in: u64,
    /// Primary bytes handed to the client's socket.
    pub client_bytes_out: u64,
    /// Client bytes handed to each replica's socket, by replica index.
    pub replica_bytes_out: Vec<u64>,
    /// Client bytes moved to each replica's on-disk spool, by replica index.
    pub replica_bytes_spilled: Vec<u64>,
    /// Of `replica_bytes_out`, the bytes that came from the spool, by replica index.
    pub replica_bytes_replayed: Vec<u64>,
    /// Bytes the replicas sent back, read and discarded.
    pub replica_bytes_dropped: u64,
    /// Replicas detached, by reason.
    pub detached: DetachCounts,
    /// Sessions torn down by the idle timeout (0 or 1 per session).
    pub idle_timeouts: u64,
    /// Sessions reset because the primary refused, died or did not connect (0 or 1).
    pub primary_failures: u64,
    /// Sessions aborted by a client reset (0 or 1).
    pub client_resets: u64,
    /// Inputs the core ignored: events that no longer apply (late events for a side that
    /// is already gone) and invalid calls that returned an error.
    pub ignored_inputs: u64,
}

impl SessionStats {
    pub(crate) fn with_replicas(n: u16) -> Self {
        Self {
            replica_bytes_out: vec![0; usize::from(n)],
            replica_bytes_spilled: vec![0; usize::from(n)],
            replica_bytes_replayed: vec![0; usize::from(n)],
            ..Self::default()
        }
    }

    /// Adds `o` into `self`, growing the per-replica vector if needed.
    pub fn add(&mut self, o: &Self) {
        self.client_bytes_in += o.client_bytes_in;
        self.primary_bytes_out += o.primary_bytes_out;
        self.primary_bytes_in += o.primary_bytes_in;
        self.client_bytes_out += o.client_bytes_out;
        add_per_replica(&mut self.replica_bytes_out, &o.replica_bytes_out);
        add_per_replica(&mut self.replica_bytes_spilled, &o.replica_bytes_spilled);
        add_per_replica(&mut self.replica_bytes_replayed, &o.replica_bytes_replayed);
        self.replica_bytes_dropped += o.replica_bytes_dropped;
        self.detached.add(&o.detached);
        self.idle_timeouts += o.idle_timeouts;
        self.primary_failures += o.primary_failures;
        self.client_resets += o.client_resets;
        self.ignored_inputs += o.ignored_inputs;
    }
}

fn add_per_replica(into: &mut Vec<u64>, from: &[u64]) {
    if into.len() < from.len() {
        into.resize(from.len(), 0);
    }
    for (a, b) in into.iter_mut().zip(from) {
        *a += b;
    }
}

/// A point-in-time view over all sessions of one manager.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Sessions currently open (gauge).
    pub sessions_active: u64,
    /// Sessions ever admitted.
    pub sessions_total: u64,
    /// Sessions refused because the session cap was reached.
    pub sessions_refused_limit: u64,
    /// Sessions refused because their memory reservation would exceed the memory cap.
    pub sessions_refused_memory: u64,
    /// Sessions refused because their configuration was invalid.
    pub sessions_refused_config: u64,
    /// Sessions removed by the caller before they had finished.
    pub sessions_removed_unfinished: u64,
    /// Worst-case buffer memory reserved by the open sessions (gauge).
    pub memory_reserved_bytes: u64,
    /// Bytes buffered (unread by some destination) right now (gauge).
    pub memory_buffered_bytes: u64,
    /// Chunk memory held right now (gauge).
    pub memory_allocated_bytes: u64,
    /// Largest current lag among open sessions, by replica index (gauge).
    pub replica_lag_max_bytes: Vec<u64>,
    /// Counters summed over all sessions, past and present.
    pub totals: SessionStats,
}

impl Metrics {
    /// Sessions refused for any reason.
    pub fn sessions_refused(&self) -> u64 {
        self.sessions_refused_limit + self.sessions_refused_memory + self.sessions_refused_config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adding_grows_per_replica_counters() {
        let mut a = SessionStats::with_replicas(1);
        let mut b = SessionStats::with_replicas(3);
        b.replica_bytes_out[2] = 5;
        b.detached.record(DetachReason::Lagged);
        a.add(&b);
        assert_eq!(a.replica_bytes_out, vec![0, 0, 5]);
        assert_eq!(a.detached.lagged, 1);
        assert_eq!(a.detached.total(), 1);
    }
}
