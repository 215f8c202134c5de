//! Replication counters of both data planes and the snapshots they publish.
//!
//! The [`super::Driver`] keeps its counters in plain integers (it owns its sessions,
//! nothing is shared on the data path) and hands out a [`WorkerReplicationStats`]
//! snapshot. XDP mode adds its queue and links and publishes it as it is, summed into a
//! [`ReplicationStats`]; sockets mode copies it, every [`PUBLISH_INTERVAL`] and when a
//! worker stops, as a [`SocketsStats`] into a mutex that the [`StatsHandle`] reads. A
//! snapshot is therefore at most that old; reading it never blocks a worker for longer
//! than one struct copy. The field names are what `ncp-middlebox stats` prints.
//!
//! Recording counters are the exception: a service's recorder is shared by all workers
//! and keeps its own atomic counters, so the handle reads them at snapshot time instead
//! of adding up per-worker copies (which would count every session once per worker).

use std::{
    net::SocketAddrV4,
    sync::{Arc, Mutex},
    time::Duration,
};

use ncp_replication::{DetachCounts, SessionStats};
use serde::{Deserialize, Serialize};

use crate::{
    engine::EngineCounters,
    offline::recorder::{RecordHandle, RecorderStats},
};

/// How often a worker refreshes its published snapshot.
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(100);

/// Everything `ncp-middlebox stats` shows for the socket relay: totals over all workers
/// and one entry per configured service.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SocketsStats {
    /// Worker threads (each with its own event loop and listeners).
    pub workers: u64,
    /// Sessions, buffer memory and drops, summed over the workers.
    #[serde(flatten)]
    pub counters: DriverCounters,
    /// Upstream sockets of finished sessions still draining their peer's last bytes
    /// before they are closed (gauge).
    pub lingering_sockets: u64,
    /// Bytes read and discarded from lingering sockets.
    pub lingering_bytes_discarded: u64,
    /// Per service, in configuration order.
    pub services: Vec<ServiceStats>,
}

impl From<WorkerReplicationStats> for SocketsStats {
    /// One sockets-mode worker's snapshot (it has no links to report).
    fn from(d: WorkerReplicationStats) -> Self {
        Self {
            workers: 1,
            counters: d.counters,
            lingering_sockets: d.lingering_connections,
            lingering_bytes_discarded: d.lingering_bytes_discarded,
            services: d.services,
        }
    }
}

/// The counters every snapshot of a driver carries, per worker and summed: its sessions,
/// their buffer memory and what it dropped. Flattened into each snapshot type, so the
/// field names are the ones `ncp-middlebox stats` prints at the top level.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DriverCounters {
    /// Sessions open right now (gauge).
    pub sessions_active: u64,
    /// Sessions ever admitted.
    pub sessions_total: u64,
    /// Client connections reset at accept time, for any reason.
    pub sessions_refused: u64,
    /// Worst-case buffer memory reserved by open sessions (gauge).
    pub memory_reserved_bytes: u64,
    /// Bytes buffered in the replication core right now (gauge).
    pub memory_buffered_bytes: u64,
    /// Drops by reason.
    #[serde(default)]
    pub drops: DropStats,
}

impl DriverCounters {
    /// Adds another worker's counters (gauges add up too: each worker has its own
    /// sessions).
    fn add(&mut self, o: &Self) {
        self.sessions_active += o.sessions_active;
        self.sessions_total += o.sessions_total;
        self.sessions_refused += o.sessions_refused;
        self.memory_reserved_bytes += o.memory_reserved_bytes;
        self.memory_buffered_bytes += o.memory_buffered_bytes;
        self.drops.add(&o.drops);
    }
}

/// Events and inputs a driver dropped, by reason.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DropStats {
    /// Accepted connections whose local endpoint is no service's primary (reset).
    pub not_a_service: u64,
    /// Upstream connects that failed at once (no port, connection bound, socket error).
    pub connect_failed: u64,
    /// Inputs the replication core rejected (a driver bug if ever non-zero).
    pub core_rejected: u64,
    /// Lingering connections closed at once because too many were lingering already.
    pub lingering_overflow: u64,
    /// Spills the spooler could not take or write (its writer too far behind, the disk
    /// full or failing): each detached its replica.
    #[serde(default)]
    pub spill_failed: u64,
}

impl DropStats {
    fn add(&mut self, o: &Self) {
        self.not_a_service += o.not_a_service;
        self.connect_failed += o.connect_failed;
        self.core_rejected += o.core_rejected;
        self.lingering_overflow += o.lingering_overflow;
        self.spill_failed += o.spill_failed;
    }
}

/// Frames, neighbours and TCP counters of one XDP-mode link, for the stats.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LinkStats {
    /// Interface of the link.
    pub interface: String,
    /// Connections the worker can name (sessions' and lingering).
    pub connections: u64,
    /// Owned ports in use for upstream connections.
    pub ports_in_use: u64,
    /// The link's TCP engine's connection counters, as the engine counts them.
    #[serde(flatten)]
    pub tcp: EngineCounters,
    /// Frames dropped on transmit because the next hop's MAC was unknown.
    pub tx_no_neighbour: u64,
    /// Frames dropped on transmit because no UMEM frame or ring slot was free (TCP
    /// retransmits them).
    pub tx_no_frame: u64,
    /// Received frames that were not IPv4 or were truncated.
    pub rx_dropped: u64,
    /// Frames passed to the worker that owns them (several workers per NIC).
    #[serde(default)]
    pub handed_out: u64,
    /// Frames other workers passed to this one.
    #[serde(default)]
    pub handed_in: u64,
    /// Frames dropped because their owner's hand-over queue was full.
    #[serde(default)]
    pub handover_dropped: u64,
}

/// One worker's replication counters: what its [`super::Driver`] counts, plus (XDP mode)
/// the queue it serves and its links. XDP mode publishes it as it is, sockets mode as a
/// [`SocketsStats`].
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkerReplicationStats {
    /// Client-facing interface (XDP mode).
    pub interface: String,
    /// Queue served (XDP mode).
    pub queue: u32,
    /// Sessions, buffer memory and drops.
    #[serde(flatten)]
    pub counters: DriverCounters,
    /// Upstream connections of finished sessions still draining (gauge).
    pub lingering_connections: u64,
    /// Bytes read and discarded from lingering connections.
    pub lingering_bytes_discarded: u64,
    /// Per link (engine), client-facing first (XDP mode).
    pub links: Vec<LinkStats>,
    /// Per service, in configuration order.
    pub services: Vec<ServiceStats>,
}

/// Everything `ncp-middlebox stats` shows about replication in XDP mode: totals over the
/// workers plus each worker's own view.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplicationStats {
    /// Workers reporting.
    pub workers: u64,
    /// Sessions, buffer memory and drops, summed.
    #[serde(flatten)]
    pub counters: DriverCounters,
    /// Upstream connections of finished sessions still draining (gauge).
    pub lingering_connections: u64,
    /// Per service, summed over workers (lag: the largest).
    pub services: Vec<ServiceStats>,
    /// Per worker.
    pub per_worker: Vec<WorkerReplicationStats>,
}

impl ReplicationStats {
    /// Sums worker snapshots (same services, same order).
    pub fn from_workers(workers: Vec<WorkerReplicationStats>) -> Self {
        let mut total = Self {
            workers: workers.len() as u64,
            ..Self::default()
        };
        for w in &workers {
            total.counters.add(&w.counters);
            total.lingering_connections += w.lingering_connections;
            merge_services(&mut total.services, &w.services);
        }
        total.per_worker = workers;
        total
    }
}

/// Folds one worker's per-service counters into a total (same services, same order).
fn merge_services(total: &mut Vec<ServiceStats>, worker: &[ServiceStats]) {
    if total.is_empty() {
        *total = worker.to_vec();
    } else {
        for (a, b) in total.iter_mut().zip(worker) {
            a.merge(b);
        }
    }
}

/// Counters of one replicated service.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceStats {
    /// Service name from the configuration.
    pub name: String,
    /// The primary clients address.
    pub primary: SocketAddrV4,
    /// Local port the redirected connections arrive on.
    pub listen_port: u16,
    /// Sessions open right now (gauge).
    pub sessions_active: u64,
    /// Sessions ever admitted.
    pub sessions_total: u64,
    /// Client connections reset at accept time, by reason.
    pub refused: RefusalStats,
    /// Client bytes accepted by the relay.
    pub client_bytes_in: u64,
    /// Client bytes handed to the primary's socket.
    pub primary_bytes_out: u64,
    /// Primary bytes accepted by the relay.
    pub primary_bytes_in: u64,
    /// Primary bytes handed to the client's socket.
    pub client_bytes_out: u64,
    /// Bytes the replicas answered, read and discarded.
    pub replica_bytes_dropped: u64,
    /// Sessions reset because the primary refused, died or did not connect.
    pub primary_failures: u64,
    /// Sessions aborted by a client reset.
    pub client_resets: u64,
    /// Sessions reset by the idle timeout.
    pub idle_timeouts: u64,
    /// Replica detaches of all replicas, by reason.
    pub detached: DetachStats,
    /// Per replica, in configuration order.
    pub replicas: Vec<ReplicaStats>,
    /// The service's recording, if it has one (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recording: Option<RecordingStats>,
}

/// Counters of a service's recorder, all since start: the recorder's own snapshot type,
/// published as it is.
pub type RecordingStats = RecorderStats;

/// Counters of one replica of a service.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplicaStats {
    /// The replica's address.
    pub address: SocketAddrV4,
    /// Client bytes handed to this replica's sockets.
    pub bytes_out: u64,
    /// Largest current lag (bytes still owed) among open sessions (gauge).
    pub lag_bytes: u64,
    /// Open sessions in which this replica still takes part (gauge).
    pub live_sessions: u64,
    /// Times this replica was cut loose from a session, by reason (`spill_budget`: its
    /// spool would have outgrown the spill budget, or could not be written).
    pub detached: DetachStats,
    /// Client bytes moved to this replica's on-disk spools.
    #[serde(default)]
    pub spilled_bytes: u64,
    /// Of `bytes_out`, the bytes replayed from its spools.
    #[serde(default)]
    pub replayed_bytes: u64,
}

/// Client connections reset at accept time, by reason.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RefusalStats {
    /// The worker's session cap was reached.
    pub session_limit: u64,
    /// The worker's buffer memory cap was reached.
    pub memory_limit: u64,
    /// The service's session configuration was rejected by the core.
    pub invalid_config: u64,
    /// The peer is outside the service's `clients` prefix (it reached the listening port
    /// directly rather than through the redirect).
    pub not_a_client: u64,
}

impl RefusalStats {
    /// All refusals.
    pub fn total(&self) -> u64 {
        self.session_limit + self.memory_limit + self.invalid_config + self.not_a_client
    }

    fn add(&mut self, o: &Self) {
        self.session_limit += o.session_limit;
        self.memory_limit += o.memory_limit;
        self.invalid_config += o.invalid_config;
        self.not_a_client += o.not_a_client;
    }
}

/// Replica detaches by reason: the replication core's own counters, published as they are.
pub type DetachStats = DetachCounts;

impl ServiceStats {
    pub(crate) fn new(
        name: &str,
        primary: SocketAddrV4,
        listen_port: u16,
        replicas: &[SocketAddrV4],
    ) -> Self {
        Self {
            name: name.to_owned(),
            primary,
            listen_port,
            sessions_active: 0,
            sessions_total: 0,
            refused: RefusalStats::default(),
            client_bytes_in: 0,
            primary_bytes_out: 0,
            primary_bytes_in: 0,
            client_bytes_out: 0,
            replica_bytes_dropped: 0,
            primary_failures: 0,
            client_resets: 0,
            idle_timeouts: 0,
            detached: DetachStats::default(),
            replicas: replicas
                .iter()
                .map(|&address| ReplicaStats {
                    address,
                    bytes_out: 0,
                    lag_bytes: 0,
                    live_sessions: 0,
                    detached: DetachStats::default(),
                    spilled_bytes: 0,
                    replayed_bytes: 0,
                })
                .collect(),
            recording: None,
        }
    }

    /// Adds one session's counters (a finished one, or a live one for a snapshot).
    pub(crate) fn add_session(&mut self, s: &SessionStats) {
        self.client_bytes_in += s.client_bytes_in;
        self.primary_bytes_out += s.primary_bytes_out;
        self.primary_bytes_in += s.primary_bytes_in;
        self.client_bytes_out += s.client_bytes_out;
        self.replica_bytes_dropped += s.replica_bytes_dropped;
        self.primary_failures += s.primary_failures;
        self.client_resets += s.client_resets;
        self.idle_timeouts += s.idle_timeouts;
        self.detached.add(&s.detached);
        for (i, r) in self.replicas.iter_mut().enumerate() {
            let at = |v: &[u64]| v.get(i).copied().unwrap_or(0);
            r.bytes_out += at(&s.replica_bytes_out);
            r.spilled_bytes += at(&s.replica_bytes_spilled);
            r.replayed_bytes += at(&s.replica_bytes_replayed);
        }
    }

    /// Adds a session that is still running to a snapshot: its counters so far, one active
    /// session, and per replica the worst lag and whether it is still attached. Returns
    /// the bytes the session holds buffered. Both data planes build their snapshots with
    /// this, so a gauge means the same in either mode.
    pub(crate) fn add_live_session(&mut self, s: &ncp_replication::Session) -> u64 {
        self.sessions_active += 1;
        self.add_session(s.stats());
        for (i, r) in (0u16..).zip(self.replicas.iter_mut()) {
            r.lag_bytes = r.lag_bytes.max(s.replica_lag(i).unwrap_or(0));
            if s.replica_is_live(i) {
                r.live_sessions += 1;
            }
        }
        s.buffered_bytes()
    }

    /// Reads the counters of the service's recorder, if it has one. A recorder is shared
    /// by all of a service's workers and counts for all of them, so its counters are read
    /// where a snapshot is taken and never added up across workers (see [`Self::merge`]).
    pub(crate) fn read_recording(&mut self, record: Option<&RecordHandle>) {
        self.recording = record.map(RecordHandle::stats);
    }

    /// Folds another worker's view of the same service into this one. `recording` is kept
    /// as it is: every worker of a service reads the same recorder.
    pub(crate) fn merge(&mut self, o: &Self) {
        self.sessions_active += o.sessions_active;
        self.sessions_total += o.sessions_total;
        self.refused.add(&o.refused);
        self.client_bytes_in += o.client_bytes_in;
        self.primary_bytes_out += o.primary_bytes_out;
        self.primary_bytes_in += o.primary_bytes_in;
        self.client_bytes_out += o.client_bytes_out;
        self.replica_bytes_dropped += o.replica_bytes_dropped;
        self.primary_failures += o.primary_failures;
        self.client_resets += o.client_resets;
        self.idle_timeouts += o.idle_timeouts;
        self.detached.add(&o.detached);
        for (a, b) in self.replicas.iter_mut().zip(&o.replicas) {
            a.bytes_out += b.bytes_out;
            a.lag_bytes = a.lag_bytes.max(b.lag_bytes);
            a.live_sessions += b.live_sessions;
            a.detached.add(&b.detached);
            a.spilled_bytes += b.spilled_bytes;
            a.replayed_bytes += b.replayed_bytes;
        }
    }
}

impl SocketsStats {
    /// Folds another worker's snapshot into this one (same services, same order).
    fn merge(&mut self, o: &Self) {
        self.workers += o.workers;
        self.counters.add(&o.counters);
        self.lingering_sockets += o.lingering_sockets;
        self.lingering_bytes_discarded += o.lingering_bytes_discarded;
        merge_services(&mut self.services, &o.services);
    }
}

/// Shared view of the socket relay's counters: clone it, hand one clone to
/// [`crate::sockets::run`] and
/// read [`StatsHandle::snapshot`] from anywhere (the control socket, a test).
#[derive(Clone, Debug, Default)]
pub struct StatsHandle {
    slots: Arc<Mutex<Vec<SocketsStats>>>,
    /// Per service (configuration order): its recorder, read at snapshot time. A handle
    /// outlives its recorder's writer harmlessly: the counters stay readable, final.
    recorders: Arc<Mutex<Vec<Option<RecordHandle>>>>,
    /// The replicas' consistency, which `run` hands to every worker's services.
    consistency: super::ConsistencyBook,
}

impl StatsHandle {
    /// An empty handle (the snapshot is all zeros until `run` starts its workers).
    pub fn new() -> Self {
        Self::default()
    }

    /// Totals over all workers as last published (at most [`PUBLISH_INTERVAL`] old).
    pub fn snapshot(&self) -> SocketsStats {
        let slots = self
            .slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut total = SocketsStats::default();
        for s in slots.iter() {
            total.merge(s);
        }
        drop(slots);
        let recorders = self
            .recorders
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for (svc, rec) in total.services.iter_mut().zip(recorders.iter()) {
            svc.read_recording(rec.as_ref());
        }
        total
    }

    /// The replicas' consistency (shared with the workers).
    pub fn consistency(&self) -> &super::ConsistencyBook {
        &self.consistency
    }

    /// Sets the services' recorders (called by `run` before the workers start; `None` for
    /// a service that does not record).
    pub(crate) fn set_recorders(&self, recorders: Vec<Option<RecordHandle>>) {
        *self
            .recorders
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = recorders;
    }

    /// Makes room for `workers` snapshots (called once by `run`, before the workers start).
    pub(crate) fn reset(&self, workers: usize, initial: &SocketsStats) {
        let mut slots = self
            .slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *slots = vec![initial.clone(); workers];
    }

    /// Stores worker `index`'s latest snapshot.
    pub(crate) fn publish(&self, index: usize, snapshot: SocketsStats) {
        let mut slots = self
            .slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(slot) = slots.get_mut(index) {
            *slot = snapshot;
        }
    }
}

#[cfg(test)]
mod tests {
    use ncp_replication::DetachReason;

    use super::*;

    fn service() -> ServiceStats {
        ServiceStats::new(
            "svc",
            "198.18.1.2:80".parse().unwrap(),
            40000,
            &["198.18.2.3:80".parse().unwrap()],
        )
    }

    #[test]
    fn snapshots_of_workers_add_up_and_lag_takes_the_max() {
        let handle = StatsHandle::new();
        let mut base = SocketsStats {
            workers: 1,
            services: vec![service()],
            ..SocketsStats::default()
        };
        handle.reset(2, &base);
        base.counters.sessions_active = 2;
        base.services[0].sessions_active = 2;
        base.services[0].replicas[0].lag_bytes = 10;
        base.services[0].replicas[0]
            .detached
            .record(DetachReason::Died);
        handle.publish(0, base.clone());
        base.services[0].replicas[0].lag_bytes = 7;
        handle.publish(1, base);
        handle.publish(5, SocketsStats::default()); // unknown worker: ignored

        let s = handle.snapshot();
        assert_eq!(s.workers, 2);
        assert_eq!(s.counters.sessions_active, 4);
        assert_eq!(s.services[0].sessions_active, 4);
        assert_eq!(s.services[0].replicas[0].lag_bytes, 10);
        assert_eq!(s.services[0].replicas[0].detached.died, 2);
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"listen_port\":40000"), "{json}");
    }

    #[test]
    fn flattened_counters_keep_their_top_level_names() {
        let mut worker = WorkerReplicationStats {
            links: vec![LinkStats::default()],
            ..WorkerReplicationStats::default()
        };
        worker.counters.sessions_active = 3;
        worker.links[0].tcp.accepted = 2;
        let total = ReplicationStats::from_workers(vec![worker.clone()]);
        let json = serde_json::to_value(&total).unwrap();
        assert_eq!(json["sessions_active"], 3, "{json}");
        assert_eq!(json["drops"]["not_a_service"], 0, "{json}");
        assert_eq!(json["per_worker"][0]["links"][0]["accepted"], 2, "{json}");
        let back: ReplicationStats = serde_json::from_value(json).unwrap();
        assert_eq!(back, total);
    }

    #[test]
    fn session_counters_fold_into_the_service() {
        let mut svc = service();
        let mut stats = SessionStats {
            primary_bytes_out: 5,
            replica_bytes_out: vec![3, 9], // a second index the service lacks is ignored
            ..SessionStats::default()
        };
        stats.detached.record(DetachReason::Lagged);
        svc.add_session(&stats);
        svc.add_session(&stats);
        assert_eq!(svc.primary_bytes_out, 10);
        assert_eq!(svc.replicas[0].bytes_out, 6);
        assert_eq!(svc.detached.lagged, 2);
        assert_eq!(svc.detached.total(), 2);
    }
}
