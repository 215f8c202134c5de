//! Whether each replica is still a faithful copy of its primary, per service and
//! replica, across sessions and workers.
//!
//! A replica that missed writes keeps answering later sessions and looks healthy; a
//! failover to it would lose data silently. So every event that can cost a replica
//! writes marks it *diverged* (since the first such event, with a count per reason) until
//! an operator who has re-cloned it says otherwise ([`ConsistencyBook::reset`]):
//! - detached from a session (refused, died, lagged beyond its budget, connect or drain
//!   timeout): it did not receive the whole stream the primary did;
//! - reply mismatch: its answer differed from the primary's (reply verification, see
//!   [`ncp_replication::verify`]).
//!
//! At start every replica is *unknown*, not in step: the middlebox cannot know what was
//! written while it was not replicating (before it started, or while it was down). The
//! operator's reset after cloning (or the controller's, when it creates a replication)
//! is what says "in step". A divergence overrides unknown.
//!
//! One book is shared by every worker of both data planes (an `Arc<Mutex<…>>`): only
//! these rare events take its lock (a detach, a mismatch, the end of a verified
//! session), never a byte of the data path, and a reset applies to all workers at once.

use std::{
    collections::BTreeMap,
    net::SocketAddrV4,
    sync::{Arc, Mutex, MutexGuard},
    time::{SystemTime, UNIX_EPOCH},
};

use ncp_replication::{DetachReason, Mismatch};
use serde::{Deserialize, Serialize};

use super::stats::DetachStats;

/// What the middlebox knows about a replica.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConsistencyState {
    /// Nothing has cost it writes since an operator marked it in step.
    InStep,
    /// Not known: writes may have reached only the primary before the middlebox started.
    #[default]
    Unknown,
    /// It missed writes or answered differently: see the reasons.
    Diverged,
}

impl ConsistencyState {
    /// How `ncp-middlebox stats` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InStep => "in-step",
            Self::Unknown => "unknown",
            Self::Diverged => "diverged",
        }
    }
}

/// Why a replica is not in step, counted since it last was (or since start).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DivergenceReasons {
    /// It has not been marked in step since the middlebox started replicating to it.
    #[serde(default)]
    pub unknown_since_start: bool,
    /// Sessions it was detached from, by reason.
    #[serde(default)]
    pub detached: DetachStats,
    /// Sessions in which its answer differed from the primary's.
    #[serde(default)]
    pub reply_mismatch: u64,
}

/// The first differing answer, as shown to an operator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MismatchReport {
    /// Offset of the first differing byte in the session's answer stream.
    pub offset: u64,
    /// The primary's answer from there (escaped; empty: its answer ended there).
    pub primary: String,
    /// The replica's answer from there (escaped).
    pub replica: String,
    /// When it was seen (ms since the Unix epoch).
    pub at_unix_ms: u64,
}

impl MismatchReport {
    fn new(m: &Mismatch) -> Self {
        Self {
            offset: m.offset,
            primary: m.primary.escape_ascii().to_string(),
            replica: m.replica.escape_ascii().to_string(),
            at_unix_ms: unix_ms(SystemTime::now()),
        }
    }
}

/// Reply verification's counters for one replica, since the middlebox started (a reset
/// keeps them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerificationTotals {
    /// Answer bytes found equal to the primary's.
    pub bytes_compared: u64,
    /// Sessions whose answers differed.
    pub mismatches: u64,
    /// Sessions in which it could not be verified to the end because one side's answer
    /// ran further ahead than the window (not a divergence).
    pub window_exceeded: u64,
    /// Times an operator marked it in step.
    pub operator_resets: u64,
}

/// The consistency of one replica of one service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaConsistency {
    /// Service name.
    pub service: String,
    /// The replica's address.
    pub replica: SocketAddrV4,
    /// Where it stands.
    pub state: ConsistencyState,
    /// When that state began (ms since the Unix epoch).
    pub since_unix_ms: u64,
    /// Why it is not in step (cleared when marked in step).
    #[serde(default)]
    pub reasons: DivergenceReasons,
    /// The latest reason, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reason: Option<String>,
    /// The first reply mismatch since it was last in step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_mismatch: Option<MismatchReport>,
    /// Reply verification counters since start.
    #[serde(default)]
    pub verification: VerificationTotals,
}

impl ReplicaConsistency {
    fn unknown(service: &str, replica: SocketAddrV4, since: SystemTime) -> Self {
        Self {
            service: service.to_owned(),
            replica,
            state: ConsistencyState::Unknown,
            since_unix_ms: unix_ms(since),
            reasons: DivergenceReasons {
                unknown_since_start: true,
                ..DivergenceReasons::default()
            },
            last_reason: Some(
                "not marked in step since the middlebox began replicating to it: writes made before \
                 are unknown"
                    .into(),
            ),
            first_mismatch: None,
            verification: VerificationTotals::default(),
        }
    }

    /// Marks it diverged (keeping the first time it did) with `reason`; returns whether
    /// it was not diverged before.
    fn diverge(&mut self, reason: String) -> bool {
        let newly = self.state != ConsistencyState::Diverged;
        if newly {
            self.state = ConsistencyState::Diverged;
            self.since_unix_ms = unix_ms(SystemTime::now());
        }
        self.last_reason = Some(reason);
        newly
    }
}

/// Why [`ConsistencyBook::reset`] did nothing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("service {service} has no replica {replica}")]
pub struct UnknownReplica {
    /// The service asked for.
    pub service: String,
    /// The replica asked for.
    pub replica: SocketAddrV4,
}

type Entries = BTreeMap<String, BTreeMap<SocketAddrV4, ReplicaConsistency>>;

/// The consistency of every configured replica; clones share it. See the module docs.
#[derive(Clone, Debug, Default)]
pub struct ConsistencyBook {
    entries: Arc<Mutex<Entries>>,
}

impl ConsistencyBook {
    /// An empty book, started now.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds the replicas of `service` it does not know yet, as unknown from now (the
    /// middlebox's start, or the service change that added them).
    pub fn register(&self, service: &str, replicas: &[SocketAddrV4]) {
        let mut entries = self.lock();
        let per_service = entries.entry(service.to_owned()).or_default();
        for &r in replicas {
            per_service
                .entry(r)
                .or_insert_with(|| ReplicaConsistency::unknown(service, r, SystemTime::now()));
        }
    }

    /// Forgets every replica `keep` says is no longer configured.
    pub fn retain(&self, mut keep: impl FnMut(&str, SocketAddrV4) -> bool) {
        let mut entries = self.lock();
        for (service, replicas) in entries.iter_mut() {
            replicas.retain(|r, _| keep(service, *r));
        }
        entries.retain(|_, replicas| !replicas.is_empty());
    }

    /// The replica was detached from a session: it did not get the whole stream.
    pub fn detached(&self, service: &str, replica: SocketAddrV4, reason: DetachReason) {
        self.update(service, replica, |r| {
            r.reasons.detached.record(reason);
            let newly = r.diverge(format!("detached from a session: {}", describe(reason)));
            if newly {
                tracing::warn!(service, %replica, ?reason, "replica diverged: detached from a session, it missed part of the stream");
            }
        });
    }

    /// The replica's answer in a session differed from the primary's.
    pub fn mismatch(&self, service: &str, replica: SocketAddrV4, mismatch: &Mismatch) {
        let report = MismatchReport::new(mismatch);
        self.update(service, replica, |r| {
            r.reasons.reply_mismatch += 1;
            r.verification.mismatches += 1;
            let newly = r.diverge(format!("reply mismatch at offset {}", mismatch.offset));
            if newly {
                tracing::warn!(service, %replica, offset = mismatch.offset, primary = %report.primary, replica_answer = %report.replica, "replica diverged: its answer differs from the primary's");
            } else {
                tracing::debug!(service, %replica, offset = mismatch.offset, "reply mismatch of a diverged replica");
            }
            if r.first_mismatch.is_none() {
                r.first_mismatch = Some(report);
            }
        });
    }

    /// A session could not verify the replica to the end (not a divergence).
    pub fn window_exceeded(&self, service: &str, replica: SocketAddrV4) {
        self.update(service, replica, |r| r.verification.window_exceeded += 1);
    }

    /// A verifying session ended having found `bytes` of the replica's answer equal.
    pub fn compared(&self, service: &str, replica: SocketAddrV4, bytes: u64) {
        if bytes > 0 {
            self.update(service, replica, |r| r.verification.bytes_compared += bytes);
        }
    }

    /// An operator says the replica is in step again (after re-cloning it): its reasons
    /// are cleared, its totals kept. Returns the state it replaces.
    pub fn reset(
        &self,
        service: &str,
        replica: SocketAddrV4,
    ) -> Result<ReplicaConsistency, UnknownReplica> {
        let mut entries = self.lock();
        let Some(r) = entries.get_mut(service).and_then(|s| s.get_mut(&replica)) else {
            return Err(UnknownReplica {
                service: service.to_owned(),
                replica,
            });
        };
        let before = r.clone();
        r.state = ConsistencyState::InStep;
        r.since_unix_ms = unix_ms(SystemTime::now());
        r.reasons = DivergenceReasons::default();
        r.last_reason = None;
        r.first_mismatch = None;
        r.verification.operator_resets += 1;
        tracing::info!(service, %replica, was = before.state.as_str(), reason = ?before.last_reason, "replica marked in step by the operator");
        Ok(before)
    }

    /// Every replica, by service name and address.
    pub fn report(&self) -> Vec<ReplicaConsistency> {
        self.lock()
            .values()
            .flat_map(|replicas| replicas.values().cloned())
            .collect()
    }

    fn update(
        &self,
        service: &str,
        replica: SocketAddrV4,
        f: impl FnOnce(&mut ReplicaConsistency),
    ) {
        let mut entries = self.lock();
        let per_service = entries.entry(service.to_owned()).or_default();
        let r = per_service
            .entry(replica)
            .or_insert_with(|| ReplicaConsistency::unknown(service, replica, SystemTime::now()));
        f(r);
    }
}

fn describe(reason: DetachReason) -> &'static str {
    match reason {
        DetachReason::Refused => "it refused the connection",
        DetachReason::Died => "its connection was reset or died",
        DetachReason::Lagged => "it lagged beyond its budget",
        DetachReason::ConnectTimeout => "it did not connect in time",
        DetachReason::DrainTimeout => "it had not caught up when the session's drain time ran out",
        DetachReason::SpillBudgetExceeded => {
            "spill budget exceeded: its backlog outgrew its spool, or the spool could not be written"
        }
        DetachReason::LoginFailed => "its own login failed (see the middlebox's log for why)",
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: SocketAddrV4 = SocketAddrV4::new(std::net::Ipv4Addr::new(198, 18, 2, 3), 6379);
    const B: SocketAddrV4 = SocketAddrV4::new(std::net::Ipv4Addr::new(198, 18, 2, 4), 6379);

    fn state(book: &ConsistencyBook, replica: SocketAddrV4) -> ReplicaConsistency {
        book.report()
            .into_iter()
            .find(|r| r.replica == replica)
            .expect("registered")
    }

    #[test]
    fn replicas_start_unknown_and_only_a_reset_puts_them_in_step() {
        let book = ConsistencyBook::new();
        book.register("redis", &[A, B]);
        book.register("redis", &[A]); // again: no change
        assert_eq!(book.report().len(), 2);
        assert_eq!(state(&book, A).state, ConsistencyState::Unknown);
        assert!(state(&book, A).reasons.unknown_since_start);
        book.compared("redis", A, 100);
        assert_eq!(state(&book, A).state, ConsistencyState::Unknown);
        let before = book.reset("redis", A).expect("known");
        assert_eq!(before.state, ConsistencyState::Unknown);
        let a = state(&book, A);
        assert_eq!(a.state, ConsistencyState::InStep);
        assert_eq!(a.reasons, DivergenceReasons::default());
        assert_eq!(a.verification.bytes_compared, 100);
        assert_eq!(a.verification.operator_resets, 1);
        assert!(
            book.reset("redis", "198.18.9.9:1".parse().unwrap())
                .is_err()
        );
        assert!(book.reset("other", A).is_err());
    }

    #[test]
    fn detaches_and_mismatches_diverge_with_reasons_until_reset() {
        let book = ConsistencyBook::new();
        book.register("redis", &[A, B]);
        book.reset("redis", A).unwrap();
        book.reset("redis", B).unwrap();
        book.detached("redis", A, DetachReason::Lagged);
        book.detached("redis", A, DetachReason::Lagged);
        let mismatch = Mismatch {
            offset: 42,
            primary: b"$3\r\nold\r\n".to_vec(),
            replica: b"$3\r\nnew\r\n".to_vec(),
        };
        book.mismatch("redis", A, &mismatch);
        book.window_exceeded("redis", B);
        let a = state(&book, A);
        assert_eq!(a.state, ConsistencyState::Diverged);
        assert_eq!(a.reasons.detached.lagged, 2);
        assert_eq!(a.reasons.reply_mismatch, 1);
        assert_eq!(
            a.last_reason.as_deref(),
            Some("reply mismatch at offset 42")
        );
        let first = a.first_mismatch.as_ref().expect("kept");
        assert_eq!(first.offset, 42);
        assert_eq!(first.primary, "$3\\r\\nold\\r\\n");
        assert_eq!(first.replica, "$3\\r\\nnew\\r\\n");
        let b = state(&book, B);
        assert_eq!(
            b.state,
            ConsistencyState::InStep,
            "a window overrun is no divergence"
        );
        assert_eq!(b.verification.window_exceeded, 1);

        book.reset("redis", A).unwrap();
        let a = state(&book, A);
        assert_eq!(a.state, ConsistencyState::InStep);
        assert_eq!(a.first_mismatch, None);
        assert_eq!(a.verification.mismatches, 1, "totals survive a reset");
        let json = serde_json::to_string(&a).unwrap();
        assert!(json.contains("\"state\":\"in-step\""), "{json}");
    }

    #[test]
    fn clones_share_one_book_and_retain_forgets_removed_replicas() {
        let book = ConsistencyBook::new();
        let worker = book.clone();
        worker.register("redis", &[A, B]);
        worker.detached("redis", B, DetachReason::Refused);
        assert_eq!(state(&book, B).state, ConsistencyState::Diverged);
        book.retain(|_, r| r == A);
        assert_eq!(book.report().len(), 1);
        book.retain(|_, _| false);
        assert!(book.report().is_empty());
    }
}
