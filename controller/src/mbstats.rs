//! What ncpd reads from a middlebox's `stats` answer: the per-replica consistency state
//! the middlebox keeps, the replicas' lag and detaches, and the XDP and worker counters.
//!
//! The types here are the controller's own, lenient reading of the middlebox's answer:
//! every field has a default and unknown fields are ignored, so an older middlebox
//! (without the `consistency` field) or a newer one (with fields added) still parses. The
//! answer carries more than this (per-worker replication counters); what is not read is
//! not kept.
//!
//! ```text
//! > {"cmd":"stats"}
//! < {"result":"stats","interfaces":[…],"workers":[…],"replication":{"services":[…]},"consistency":[…]}
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddrV4;

use serde::{Deserialize, Serialize};

use crate::middlebox::PushError;

/// The request line.
pub const STATS_REQUEST: &str = "{\"cmd\":\"stats\"}\n";

/// Longest stats answer read: it grows with workers, services and replicas, so it gets a
/// larger bound than the one-word answers of pushes.
pub const MAX_STATS_ANSWER: u64 = 4 * 1024 * 1024;

/// One replica's consistency as the middlebox reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MbReplica {
    /// Service name (`r<replication id>` for services the controller pushed).
    pub service: String,
    pub replica: SocketAddrV4,
    /// `in-step`, `unknown` or `diverged`; anything else reads as unknown.
    pub state: String,
    /// When that state began (ms since the Unix epoch).
    #[serde(default)]
    pub since_unix_ms: u64,
    #[serde(default)]
    pub reasons: MbReasons,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_mismatch: Option<MbMismatch>,
    #[serde(default)]
    pub verification: MbVerification,
}

/// Why the middlebox says a replica is not in step.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MbReasons {
    #[serde(default)]
    pub unknown_since_start: bool,
    /// Sessions it was detached from, by reason (`lagged`, `died`, …).
    #[serde(default)]
    pub detached: BTreeMap<String, u64>,
    #[serde(default)]
    pub reply_mismatch: u64,
}

/// The first differing answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MbMismatch {
    #[serde(default)]
    pub offset: u64,
    #[serde(default)]
    pub primary: String,
    #[serde(default)]
    pub replica: String,
    #[serde(default)]
    pub at_unix_ms: u64,
}

/// Reply verification counters since the middlebox started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MbVerification {
    #[serde(default)]
    pub bytes_compared: u64,
    #[serde(default)]
    pub mismatches: u64,
    #[serde(default)]
    pub window_exceeded: u64,
    #[serde(default)]
    pub operator_resets: u64,
}

/// XDP verdict counters of one interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct MbInterface {
    pub name: String,
    /// Verdict name → frames.
    #[serde(default)]
    pub xdp: BTreeMap<String, u64>,
}

/// Counters of one worker.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct MbWorker {
    pub interface: String,
    pub queue: u32,
    #[serde(default)]
    pub rx_frames: u64,
    #[serde(default)]
    pub rx_bytes: u64,
}

/// A replica's replication counters (XDP mode reports them; other modes may not).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaCounters {
    /// Largest current lag among open sessions.
    pub lag_bytes: u64,
    /// Detaches since start, by reason.
    pub detached: BTreeMap<String, u64>,
}

/// What one stats answer told.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MiddleboxReport {
    pub interfaces: Vec<MbInterface>,
    pub workers: Vec<MbWorker>,
    pub consistency: Vec<MbReplica>,
    /// By (service, replica).
    pub counters: BTreeMap<(String, SocketAddrV4), ReplicaCounters>,
}

impl MiddleboxReport {
    /// The consistency entry of `replica` of `service`.
    pub fn replica(&self, service: &str, replica: SocketAddrV4) -> Option<&MbReplica> {
        self.consistency
            .iter()
            .find(|r| r.service == service && r.replica == replica)
    }
}

#[derive(Deserialize)]
struct StatsAnswer {
    result: String,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    interfaces: Vec<MbInterface>,
    #[serde(default)]
    workers: Vec<MbWorker>,
    #[serde(default)]
    replication: Option<serde_json::Value>,
    #[serde(default)]
    consistency: Vec<MbReplica>,
}

#[derive(Deserialize, Default)]
struct ReplicationPart {
    #[serde(default)]
    services: Vec<ServicePart>,
}

#[derive(Deserialize)]
struct ServicePart {
    name: String,
    #[serde(default)]
    replicas: Vec<ReplicaPart>,
}

#[derive(Deserialize)]
struct ReplicaPart {
    address: SocketAddrV4,
    #[serde(default)]
    lag_bytes: u64,
    #[serde(default)]
    detached: BTreeMap<String, u64>,
}

/// Reads a stats answer line. A `replication` part of another shape (another mode's
/// stats) is left out rather than failing the whole answer: the consistency state is what
/// matters most.
pub fn parse_stats(line: &str) -> Result<MiddleboxReport, PushError> {
    let line = line.trim_end_matches(['\n', '\r']);
    let short = || line.chars().take(200).collect::<String>();
    let a: StatsAnswer = serde_json::from_str(line)
        .map_err(|e| PushError::Malformed(format!("{e}: {}", short())))?;
    match a.result.as_str() {
        "stats" => {}
        "error" => {
            return Err(PushError::Refused(
                a.message.unwrap_or_else(|| "(no message)".to_string()),
            ));
        }
        _ => return Err(PushError::Malformed(short())),
    }
    let mut counters = BTreeMap::new();
    let replication = a
        .replication
        .and_then(|v| ReplicationPart::deserialize(v).ok())
        .unwrap_or_default();
    for s in replication.services {
        for r in s.replicas {
            counters.insert(
                (s.name.clone(), r.address),
                ReplicaCounters {
                    lag_bytes: r.lag_bytes,
                    detached: r.detached,
                },
            );
        }
    }
    Ok(MiddleboxReport {
        interfaces: a.interfaces,
        workers: a.workers,
        consistency: a.consistency,
        counters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_consistency_counters_and_tolerates_old_and_new_middleboxes() {
        let line = r#"{"result":"stats","interfaces":[{"name":"eth0","mode":"driver","xdp":{"redirected":5,"passed":2,"unparsed":0,"no_socket":0,"redirect_failed":0}}],
            "workers":[{"interface":"eth0","queue":0,"core":null,"rx_frames":7,"rx_bytes":900,"loss_recovery":{}}],
            "replication":{"workers":1,"services":[{"name":"r1","primary":"198.18.1.2:6379","replicas":[{"address":"198.18.2.3:6379","bytes_out":1,"lag_bytes":4096,"live_sessions":1,"detached":{"refused":0,"died":1,"lagged":2,"connect_timeout":0,"drain_timeout":0}}]}]},
            "consistency":[{"service":"r1","replica":"198.18.2.3:6379","state":"diverged","since_unix_ms":1000,
              "reasons":{"unknown_since_start":false,"detached":{"lagged":2,"died":1},"reply_mismatch":1},
              "last_reason":"reply mismatch at offset 42","first_mismatch":{"offset":42,"primary":"+OK","replica":"-ERR","at_unix_ms":1200},
              "verification":{"bytes_compared":10,"mismatches":1,"window_exceeded":0,"operator_resets":0},"future_field":1}]}"#;
        let r = parse_stats(&line.replace('\n', " ")).expect("parses");
        assert_eq!(r.interfaces[0].xdp["redirected"], 5);
        assert_eq!(r.workers[0].rx_frames, 7);
        let a: SocketAddrV4 = "198.18.2.3:6379".parse().expect("addr");
        let c = r.replica("r1", a).expect("entry");
        assert_eq!(c.state, "diverged");
        assert_eq!(c.reasons.detached["lagged"], 2);
        assert_eq!(c.first_mismatch.as_ref().map(|m| m.offset), Some(42));
        assert_eq!(r.counters[&("r1".to_string(), a)].lag_bytes, 4096);

        // A middlebox from before the consistency state, in a mode with other stats.
        let old = parse_stats(
            r#"{"result":"stats","interfaces":[],"workers":[],"replication":{"sessions":3}}"#,
        )
        .expect("old answer");
        assert!(old.consistency.is_empty() && old.counters.is_empty());

        assert_eq!(
            parse_stats(r#"{"result":"error","message":"busy"}"#),
            Err(PushError::Refused("busy".into()))
        );
        assert!(matches!(
            parse_stats("{\"result\":\"done\"}"),
            Err(PushError::Malformed(_))
        ));
        assert!(matches!(
            parse_stats("nonsense"),
            Err(PushError::Malformed(_))
        ));
        assert!(matches!(
            parse_stats(
                r#"{"result":"stats","consistency":[{"service":"r1","replica":"not an address","state":"x"}]}"#
            ),
            Err(PushError::Malformed(_))
        ));
    }
}
