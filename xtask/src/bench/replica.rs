//! What the replica of a benchmark's service got, read from the middlebox's counters:
//! a replicated figure counts only if the replica stayed attached and received every
//! byte the primary did, so the relay experiments report this beside their numbers.

use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::middlebox::Middlebox;

/// How long the replica may lag behind the primary after a run before a shortfall
/// counts (it is fed from memory; a spooled replica may be given longer).
pub(super) const REPLICA_CATCH_UP: Duration = Duration::from_secs(5);

/// The first service's first replica, in the middlebox's counters (totals since it
/// started, or the change over a run).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct ReplicaOutcome {
    /// Client bytes sent to the primary.
    pub primary_bytes: u64,
    /// Client bytes sent to the replica (live and replayed from spools).
    pub replica_bytes: u64,
    /// Sessions it was detached from, for any reason.
    pub detaches: u64,
    /// Client bytes moved to its on-disk spools.
    pub spilled_bytes: u64,
    /// Of `replica_bytes`, the bytes replayed from its spools.
    pub replayed_bytes: u64,
    /// Answer bytes found equal to the primary's (reply verification).
    pub verified_bytes: u64,
    /// Sessions whose answers differed from the primary's.
    pub mismatches: u64,
    /// Sessions not verified to the end: one side's answer ran further ahead of the
    /// other's than the verification window (not a divergence).
    pub window_exceeded: u64,
}

impl ReplicaOutcome {
    /// Whether it stayed attached and got every byte. More than the primary is fine:
    /// under loss at the primary, the primary's side lags behind.
    pub fn complete(&self) -> bool {
        self.detaches == 0 && self.replica_bytes >= self.primary_bytes
    }

    /// The change from `before` to `self`.
    fn since(&self, before: &ReplicaOutcome) -> ReplicaOutcome {
        ReplicaOutcome {
            primary_bytes: self.primary_bytes.saturating_sub(before.primary_bytes),
            replica_bytes: self.replica_bytes.saturating_sub(before.replica_bytes),
            detaches: self.detaches.saturating_sub(before.detaches),
            spilled_bytes: self.spilled_bytes.saturating_sub(before.spilled_bytes),
            replayed_bytes: self.replayed_bytes.saturating_sub(before.replayed_bytes),
            verified_bytes: self.verified_bytes.saturating_sub(before.verified_bytes),
            mismatches: self.mismatches.saturating_sub(before.mismatches),
            window_exceeded: self.window_exceeded.saturating_sub(before.window_exceeded),
        }
    }

    /// As the experiments' JSON files record it.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "primary_bytes": self.primary_bytes,
            "replica_bytes": self.replica_bytes,
            "detaches": self.detaches,
            "spilled_bytes": self.spilled_bytes,
            "replayed_bytes": self.replayed_bytes,
            "verified_bytes": self.verified_bytes,
            "mismatches": self.mismatches,
            "window_exceeded": self.window_exceeded,
            "complete": self.complete(),
        })
    }
}

/// The middlebox's counters of the service so far.
pub(super) fn replica_counters(mb: &Middlebox) -> anyhow::Result<ReplicaOutcome> {
    let stats = mb.stats().context("reading the middlebox's counters")?;
    outcome_of(&stats)
}

/// [`ReplicaOutcome`] out of the middlebox's stats JSON.
fn outcome_of(stats: &serde_json::Value) -> anyhow::Result<ReplicaOutcome> {
    let service = &stats["replication"]["services"][0];
    let replica = &service["replicas"][0];
    let detaches = replica["detached"].as_object().map_or(0, |reasons| {
        reasons.values().filter_map(|v| v.as_u64()).sum()
    });
    // Verification counters exist only for a service that has replicas; a replica
    // without an entry has had nothing verified.
    let verification = stats["consistency"]
        .as_array()
        .and_then(|list| list.iter().find(|c| c["replica"] == replica["address"]))
        .map(|c| c["verification"].clone())
        .unwrap_or_default();
    let count = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    // A missing byte counter would read as "0 of 0 bytes, complete": refuse it instead.
    Ok(ReplicaOutcome {
        primary_bytes: service["primary_bytes_out"]
            .as_u64()
            .context("middlebox stats without the service's primary_bytes_out")?,
        replica_bytes: replica["bytes_out"]
            .as_u64()
            .context("middlebox stats without the replica's bytes_out")?,
        detaches,
        spilled_bytes: count(&replica["spilled_bytes"]),
        replayed_bytes: count(&replica["replayed_bytes"]),
        verified_bytes: count(&verification["bytes_compared"]),
        mismatches: count(&verification["mismatches"]),
        window_exceeded: count(&verification["window_exceeded"]),
    })
}

/// [`replica_counters`] of a middlebox that has just started: its workers publish their
/// counters a moment after it answers, so a service missing from the first answers is
/// waited for (boundedly) rather than taken for an error.
pub(super) fn first_replica_counters(mb: &Middlebox) -> anyhow::Result<ReplicaOutcome> {
    let deadline = Instant::now() + REPLICA_CATCH_UP;
    loop {
        match replica_counters(mb) {
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("middlebox counters not there yet: {e:#}");
                std::thread::sleep(Duration::from_millis(100));
            }
            done => return done,
        }
    }
}

/// What the replica got during a run compared with the primary, once it has caught up
/// (or `catch_up` has passed: the middlebox never waits for it, so a replica may
/// legitimately finish after the client).
pub(super) fn replica_outcome(
    mb: &Middlebox,
    before: &ReplicaOutcome,
    catch_up: Duration,
) -> anyhow::Result<ReplicaOutcome> {
    let deadline = Instant::now() + catch_up;
    loop {
        let delta = replica_counters(mb)?.since(before);
        if delta.replica_bytes >= delta.primary_bytes
            || delta.detaches > 0
            || Instant::now() > deadline
        {
            return Ok(delta);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_come_from_the_service_and_its_consistency_entry() {
        let stats = serde_json::json!({
            "replication": {"services": [{"primary_bytes_out": 100, "replicas": [{
                "address": "198.18.2.3:6379", "bytes_out": 90, "spilled_bytes": 40,
                "replayed_bytes": 30, "detached": {"lagged": 1, "died": 0}}]}]},
            "consistency": [
                {"replica": "198.18.9.9:6379", "verification": {"bytes_compared": 1, "mismatches": 9}},
                {"replica": "198.18.2.3:6379", "verification": {"bytes_compared": 5000, "mismatches": 2, "window_exceeded": 3}}],
        });
        let o = outcome_of(&stats).unwrap();
        assert_eq!(
            o,
            ReplicaOutcome {
                primary_bytes: 100,
                replica_bytes: 90,
                detaches: 1,
                spilled_bytes: 40,
                replayed_bytes: 30,
                verified_bytes: 5000,
                mismatches: 2,
                window_exceeded: 3,
            }
        );
        assert!(!o.complete());
        let later = ReplicaOutcome {
            primary_bytes: 300,
            replica_bytes: 290,
            ..o.clone()
        };
        assert_eq!(later.since(&o).primary_bytes, 200);
        assert_eq!(later.since(&o).detaches, 0);
    }

    #[test]
    fn stats_without_byte_counters_are_refused() {
        let stats = serde_json::json!({"replication": {"services": []}});
        assert!(outcome_of(&stats).is_err());
    }
}
