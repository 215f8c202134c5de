//! The XDP-mode replication driver: the sans-IO core ([`ncp_replication`]) carried out
//! over a worker's user-space TCP engines ([`crate::engine`]).
//!
//! One [`Replicator`] belongs to one worker thread. It owns that worker's
//! [`Manager`] and one or more *links*: a link is an [`Engine`] over one AF_XDP socket.
//! Link 0 is the interface the clients' frames arrive on; it listens on every service's
//! primary endpoint (any-IP: it answers as the primary) and connects to the primaries
//! from the interface's own address. When a service names a `replica_interface` (the
//! paper's separate replication NIC), its replicas are connected through a further link
//! on that interface, so replica traffic never touches the production NIC.
//!
//! The I/O contract of the core (see the `ncp_replication` crate docs) maps onto engine
//! events and calls like this:
//! - `Accepted` → pick the service by local endpoint and client prefix, `open_with`; a
//!   refusal aborts the client (RST) and is counted.
//! - `Action::Connect` → `engine.connect` on the side's link; `Connected`/`Refused`/
//!   `Reset`/`PeerClosed` → `on_connected`/`on_refused`/`on_reset`/`on_fin`.
//! - `Readable` → `recv` at most `receive_window(side)` → `on_data` (replicas: everything,
//!   counted and dropped by the core); pending bytes → `send` → `on_sent`.
//! - `Close` → `close` (FIN), `Reset`/`Detached` → `abort` (RST), `Finished` →
//!   `Manager::remove`. Upstream connections that were sent a FIN *linger* after their
//!   session: they are read and discarded until the peer closes or the drain timeout
//!   passes, so a replica that is still answering never gets a RST that could cost it
//!   bytes it already received.
//!
//! Next hops: the devices do L2 themselves and never speak ARP. A client's MAC is learned
//! from its SYN. For the primaries and replicas the worker asks the kernel at start (an
//! empty UDP datagram to the discard port makes it ARP; the reply reaches the kernel
//! because the XDP program passes ARP) and copies the entry from `/proc/net/arp` (this
//! namespace's table) into the device, so the first SYN upstream has a MAC to go to. An
//! upstream still unknown when a session connects to it is resolved the same way in the
//! background; smoltcp's SYN retransmission covers the wait.
//!
//! The connection table here is a hash map keyed by (link, [`ConnId`]), so finding a
//! session for an event is O(1); the engine below finds a packet's socket by its 4-tuple,
//! so neither cost grows with the number of sessions.
//!
//! Recording (a service's `record`, the offline asynchronous mode) works as in the sockets
//! relay, through the same [`RecordHandle`] calls: the session's recording is opened when
//! the client is accepted, before the session is known to anything else; every read the
//! core accepted from the client (and from the primary, when the service records
//! responses) goes to the recorder right after `on_data`, so the file holds exactly the
//! stream the primary and replicas are given; it ends with the session, as closed or
//! aborted from the session's final counters, and as aborted at shutdown. The handle only
//! `try_send`s into a bounded queue: a recorder that falls behind costs the session its
//! recording (counted), never the worker its time.
//!
//! Counters are plain integers owned by the worker and published as a
//! [`WorkerReplicationStats`] snapshot every [`PUBLISH_INTERVAL`]; a service's recording
//! counters are read from its (shared) recorder at that moment.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, VecDeque},
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant, SystemTime},
};

use ncp_replication::{Action, Manager, ManagerConfig, Refusal, SessionConfig, SessionId, Side};
use serde::{Deserialize, Serialize};

use crate::{
    config::{Config, ServiceConfig},
    device::{MacAddr, XskDevice},
    engine::{ConnId, Engine, EngineDevice, EngineEvent},
    offline::recorder::{RecId, RecordHandle},
    rules::Ipv4Prefix,
    sockets::ServiceStats,
};

/// How often a worker refreshes its published snapshot.
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(100);
/// Bytes read from a connection per `recv` call.
const READ_CHUNK: usize = 64 * 1024;
/// Reads per side per round and rounds per session per pass: a busy session moves at most
/// `READS_PER_SIDE * ROUNDS_PER_PASS * READ_CHUNK` from one side before the others (and
/// the engines) get their turn.
const READS_PER_SIDE: usize = 4;
const ROUNDS_PER_PASS: usize = 8;
/// At most one `info` line per replica and interval about detaches; counters say the rest.
const DETACH_LOG_INTERVAL: Duration = Duration::from_secs(1);
/// How often an unresolved next hop is looked up in the kernel's neighbour table, how
/// often the kernel is asked again to resolve it, and when we stop trying.
const NEIGHBOUR_CHECK: Duration = Duration::from_millis(20);
const NEIGHBOUR_RETRIGGER: Duration = Duration::from_secs(1);
const NEIGHBOUR_GIVE_UP: Duration = Duration::from_secs(30);

/// Index of a worker's link (engine); 0 is the client-facing one.
pub type LinkId = usize;
/// The link clients arrive on and primaries are reached through.
pub const CLIENT_LINK: LinkId = 0;

/// What the replicator needs from a device besides the engine's trait: the neighbour
/// table, so upstream next hops can be seeded before the first SYN.
pub trait Neighbours {
    /// The MAC known for `ip`.
    fn neighbour(&self, ip: Ipv4Addr) -> Option<MacAddr>;
    /// Records how to reach `ip`.
    fn learn(&mut self, ip: Ipv4Addr, mac: MacAddr);
}

impl Neighbours for XskDevice {
    fn neighbour(&self, ip: Ipv4Addr) -> Option<MacAddr> {
        XskDevice::neighbour(self, ip)
    }
    fn learn(&mut self, ip: Ipv4Addr, mac: MacAddr) {
        XskDevice::learn(self, ip, mac);
    }
}

/// One configured service as a worker uses it.
#[derive(Clone, Debug)]
pub struct ServicePlan {
    /// Name for logs and stats.
    pub name: String,
    /// The endpoint clients address; listened on (any-IP) and connected to.
    pub primary: SocketAddrV4,
    /// Clients whose connections are replicated; others are reset.
    pub clients: Ipv4Prefix,
    /// Replica endpoints, by replica index.
    pub replicas: Vec<SocketAddrV4>,
    /// The core's per-session configuration.
    pub session: SessionConfig,
    /// Link the replicas are connected through.
    pub replica_link: LinkId,
    /// The service's recorder, if it records its sessions (shared by all workers).
    pub record: Option<RecordHandle>,
}

impl ServicePlan {
    /// The plan for `service`, with replicas on `replica_link`. Without a recorder: the
    /// runtime hands out the service's recorder when it starts one (checking a
    /// configuration starts none).
    pub fn new(service: &ServiceConfig, replica_link: LinkId) -> Self {
        Self {
            name: service.name.clone(),
            primary: service.primary,
            clients: service.clients,
            replicas: service.replicas.clone(),
            session: service.session_config(),
            replica_link,
            record: None,
        }
    }
}

/// The manager limits of one worker, from the configuration's `[limits]`.
pub fn manager_config(config: &Config) -> ManagerConfig {
    ManagerConfig {
        max_sessions: config.limits.max_sessions,
        max_memory_bytes: config.limits.max_buffer_bytes,
        ..ManagerConfig::default()
    }
}

/// Frames, neighbours and TCP counters of one link, for the stats.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LinkStats {
    /// Interface of the link.
    pub interface: String,
    /// Connections the worker can name (sessions' and lingering).
    pub connections: u64,
    /// Owned ports in use for upstream connections.
    pub ports_in_use: u64,
    /// Connections accepted from clients.
    pub accepted: u64,
    /// Upstream connections established.
    pub connected: u64,
    /// Upstream connection attempts refused or timed out.
    pub refused: u64,
    /// Established connections reset or timed out.
    pub reset: u64,
    /// Connections closed cleanly.
    pub closed: u64,
    /// Client handshakes that failed before an accept.
    pub half_open_failed: u64,
    /// Frames dropped on transmit because the next hop's MAC was unknown.
    pub tx_no_neighbour: u64,
    /// Frames dropped on transmit because no UMEM frame or ring slot was free (TCP
    /// retransmits them).
    pub tx_no_frame: u64,
    /// Received frames that were not IPv4 or were truncated.
    pub rx_dropped: u64,
    /// Connection requests reset because the connection bound was reached.
    #[serde(default)]
    pub overloaded: u64,
    /// TCP segments of no connection (answered with a reset).
    #[serde(default)]
    pub strays: u64,
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

/// Events and inputs the replicator dropped, by reason.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DropStats {
    /// Accepted connections whose local endpoint is no service's primary (reset).
    pub not_a_service: u64,
    /// Upstream connects the engine refused at once (no port, connection bound).
    pub connect_failed: u64,
    /// Inputs the replication core rejected (a driver bug if ever non-zero).
    pub core_rejected: u64,
    /// Lingering connections aborted because too many were lingering already.
    pub lingering_overflow: u64,
}

/// Counters of one worker, published for the control socket.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkerReplicationStats {
    /// Client-facing interface.
    pub interface: String,
    /// Queue served.
    pub queue: u32,
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
    /// Upstream connections of finished sessions still draining (gauge).
    pub lingering_connections: u64,
    /// Bytes read and discarded from lingering connections.
    pub lingering_bytes_discarded: u64,
    /// Drops by reason.
    pub drops: DropStats,
    /// Per link (engine), client-facing first.
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
    /// Sessions open right now (gauge).
    pub sessions_active: u64,
    /// Sessions ever admitted.
    pub sessions_total: u64,
    /// Client connections reset at accept time.
    pub sessions_refused: u64,
    /// Worst-case buffer memory reserved by open sessions (gauge).
    pub memory_reserved_bytes: u64,
    /// Bytes buffered in the replication core right now (gauge).
    pub memory_buffered_bytes: u64,
    /// Upstream connections of finished sessions still draining (gauge).
    pub lingering_connections: u64,
    /// Drops by reason, summed.
    pub drops: DropStats,
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
            total.sessions_active += w.sessions_active;
            total.sessions_total += w.sessions_total;
            total.sessions_refused += w.sessions_refused;
            total.memory_reserved_bytes += w.memory_reserved_bytes;
            total.memory_buffered_bytes += w.memory_buffered_bytes;
            total.lingering_connections += w.lingering_connections;
            total.drops.not_a_service += w.drops.not_a_service;
            total.drops.connect_failed += w.drops.connect_failed;
            total.drops.core_rejected += w.drops.core_rejected;
            total.drops.lingering_overflow += w.drops.lingering_overflow;
            if total.services.is_empty() {
                total.services = w.services.clone();
            } else {
                for (a, b) in total.services.iter_mut().zip(&w.services) {
                    a.merge(b);
                }
            }
        }
        total.per_worker = workers;
        total
    }
}

/// One engine of the worker and the interface it runs on.
pub struct Link<D: EngineDevice> {
    /// Interface name (for stats and the kernel neighbour lookup).
    pub interface: String,
    /// The engine.
    pub engine: Engine<D>,
}

/// The connection of one side of a session.
#[derive(Clone, Copy, Debug)]
struct Slot {
    conn: ConnId,
    /// `Action::Close` was carried out: at the session's end it may linger.
    closing: bool,
}

/// The connections of one session, by side.
#[derive(Debug)]
struct Entry {
    service: usize,
    client: Option<Slot>,
    primary: Option<Slot>,
    replicas: Vec<Option<Slot>>,
    /// Already in the ready queue.
    queued: bool,
    /// The session's recording, if its service records and the recorder took it.
    record: Option<RecId>,
}

impl Entry {
    fn slot_mut(&mut self, side: Side) -> Option<&mut Option<Slot>> {
        match side {
            Side::Client => Some(&mut self.client),
            Side::Primary => Some(&mut self.primary),
            Side::Replica(i) => self.replicas.get_mut(usize::from(i)),
        }
    }

    /// Every side that has a connection, client first.
    fn sides(&self, out: &mut Vec<(Side, Slot)>) {
        out.clear();
        out.extend(self.client.map(|s| (Side::Client, s)));
        out.extend(self.primary.map(|s| (Side::Primary, s)));
        for (i, slot) in (0u16..).zip(&self.replicas) {
            out.extend(slot.map(|s| (Side::Replica(i), s)));
        }
    }
}

/// Who a connection belongs to.
#[derive(Clone, Copy, Debug)]
enum Owner {
    Session {
        id: SessionId,
        side: Side,
    },
    /// A finished session's upstream draining until `until`.
    Lingering {
        until: Instant,
    },
}

/// An upstream next hop whose MAC the device does not know yet.
#[derive(Debug)]
struct Unresolved {
    link: LinkId,
    ip: Ipv4Addr,
    since: Instant,
    triggered: Instant,
    next_check: Instant,
}

/// Drives one worker's sessions over its links. See the module docs.
pub struct Replicator<D: EngineDevice + Neighbours> {
    links: Vec<Link<D>>,
    services: Vec<ServicePlan>,
    manager: Manager,
    sessions: HashMap<SessionId, Entry>,
    conns: HashMap<(LinkId, ConnId), Owner>,
    ready: VecDeque<SessionId>,
    lingering: BinaryHeap<Reverse<(Instant, LinkId, ConnId)>>,
    lingering_count: usize,
    max_lingering: usize,
    lingering_discarded: u64,
    unresolved: Vec<Unresolved>,
    counters: Vec<ServiceStats>,
    drops: DropStats,
    detach_log: Vec<Vec<Option<Instant>>>,
    events: Vec<EngineEvent>,
    touched: Vec<SessionId>,
    sides: Vec<(Side, Slot)>,
    scratch: Box<[u8]>,
}

impl<D: EngineDevice + Neighbours> Replicator<D> {
    /// A replicator over `links` (link 0 faces the clients) for `services`.
    pub fn new(links: Vec<Link<D>>, services: Vec<ServicePlan>, manager: ManagerConfig) -> Self {
        let counters = services
            .iter()
            .map(|s| ServiceStats::new(&s.name, s.primary, s.primary.port(), &s.replicas))
            .collect();
        let detach_log = services
            .iter()
            .map(|s| vec![None; s.replicas.len()])
            .collect();
        let max_lingering = manager.max_sessions;
        Self {
            links,
            services,
            manager: Manager::new(manager),
            sessions: HashMap::new(),
            conns: HashMap::new(),
            ready: VecDeque::new(),
            lingering: BinaryHeap::new(),
            lingering_count: 0,
            max_lingering,
            lingering_discarded: 0,
            unresolved: Vec::new(),
            counters,
            drops: DropStats::default(),
            detach_log,
            events: Vec::new(),
            touched: Vec::new(),
            sides: Vec::new(),
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
        }
    }

    /// The links, client-facing first.
    pub fn links(&self) -> &[Link<D>] {
        &self.links
    }

    /// Sessions open right now.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Resolves every upstream's next hop through the kernel before traffic starts, so
    /// the first SYN to a primary or replica is not dropped for want of a MAC. Waits at
    /// most `limit`; what is still unknown then keeps being retried in the background.
    pub fn resolve_upstreams(&mut self, limit: Duration) {
        let now = Instant::now();
        let mut wanted = Vec::new();
        for plan in &self.services {
            wanted.push((CLIENT_LINK, *plan.primary.ip()));
            for r in &plan.replicas {
                wanted.push((plan.replica_link, *r.ip()));
            }
        }
        for (link, ip) in wanted {
            self.want_neighbour(link, ip, now);
        }
        let deadline = now + limit;
        while !self.unresolved.is_empty() && Instant::now() < deadline {
            std::thread::sleep(NEIGHBOUR_CHECK);
            self.check_neighbours(Instant::now());
        }
        for u in &self.unresolved {
            tracing::warn!(ip = %u.ip, interface = %self.links[u.link].interface, "next hop not resolved yet; connections to it wait for the kernel's ARP");
        }
    }

    /// Polls every link's engine and handles what happened, then moves bytes for the
    /// sessions that need it, runs due timers and expires lingering connections. Returns
    /// whether anything happened (if not, the caller may sleep; see
    /// [`Replicator::sleep_bound`]).
    pub fn turn(&mut self, now: Instant) -> bool {
        let mut active = false;
        for link in 0..self.links.len() {
            let mut events = std::mem::take(&mut self.events);
            active |= self.links[link].engine.poll(now, &mut events);
            for event in events.drain(..) {
                self.on_event(link, event, now);
            }
            self.events = events;
        }
        // Only the sessions queued so far: those re-queued while driving wait until the
        // engines have been polled again.
        for _ in 0..self.ready.len() {
            let Some(id) = self.ready.pop_front() else {
                break;
            };
            if let Some(entry) = self.sessions.get_mut(&id) {
                entry.queued = false;
                active |= self.drive(id, now);
            }
        }
        if self.manager.poll_timeout().is_some_and(|t| t <= now) {
            let mut touched = std::mem::take(&mut self.touched);
            self.manager.handle_timeout(now, &mut touched);
            for id in touched.drain(..) {
                self.apply_actions(id, now);
                self.mark(id);
                active = true;
            }
            self.touched = touched;
        }
        self.expire_lingering(now);
        if !self.unresolved.is_empty() {
            self.check_neighbours(now);
        }
        active || !self.ready.is_empty()
    }

    /// How long the worker may sleep when [`Replicator::turn`] found nothing to do: until
    /// the earliest engine timer, session timer or background check.
    pub fn sleep_bound(&mut self, now: Instant, cap: Duration) -> Duration {
        let mut bound = cap;
        for link in &mut self.links {
            if let Some(d) = link.engine.poll_delay(now) {
                bound = bound.min(d);
            }
        }
        let timers = [
            self.manager.poll_timeout(),
            self.lingering.peek().map(|Reverse((t, _, _))| *t),
            self.unresolved.iter().map(|u| u.next_check).min(),
        ];
        for t in timers.into_iter().flatten() {
            bound = bound.min(t.saturating_duration_since(now));
        }
        bound
    }

    fn on_event(&mut self, link: LinkId, event: EngineEvent, now: Instant) {
        let conn = match event {
            EngineEvent::Accepted {
                conn,
                local,
                remote,
            } => {
                self.accept(link, conn, local, remote, now);
                return;
            }
            EngineEvent::Connected { conn }
            | EngineEvent::Refused { conn }
            | EngineEvent::Readable { conn }
            | EngineEvent::Writable { conn }
            | EngineEvent::PeerClosed { conn }
            | EngineEvent::Closed { conn }
            | EngineEvent::Reset { conn } => conn,
        };
        let Some(owner) = self.conns.get(&(link, conn)).copied() else {
            // Aborted by us earlier in this turn; the engine has forgotten it too.
            return;
        };
        let (id, side) = match owner {
            Owner::Lingering { .. } => {
                self.on_lingering_event(link, conn, event);
                return;
            }
            Owner::Session { id, side } => (id, side),
        };
        let dead = matches!(
            event,
            EngineEvent::Refused { .. } | EngineEvent::Closed { .. } | EngineEvent::Reset { .. }
        );
        if dead {
            self.forget(link, conn, id, side);
        }
        let result = match event {
            EngineEvent::Connected { .. } => {
                tracing::debug!(session = %id, ?side, "upstream connected");
                self.manager
                    .session_mut(id)
                    .map(|mut s| s.on_connected(side, now))
            }
            EngineEvent::Refused { .. } => {
                tracing::debug!(session = %id, ?side, "upstream refused");
                self.manager
                    .session_mut(id)
                    .map(|mut s| s.on_refused(side, now))
            }
            EngineEvent::Reset { .. } => {
                tracing::debug!(session = %id, ?side, "connection reset");
                self.manager
                    .session_mut(id)
                    .map(|mut s| s.on_reset(side, now))
            }
            EngineEvent::PeerClosed { .. } => {
                // The engine reports it only once every byte before the FIN was read, and
                // every byte read went to the core: the FIN is in order.
                self.manager
                    .session_mut(id)
                    .map(|mut s| s.on_fin(side, now))
            }
            // Closed: the FIN came before (PeerClosed) and ours was sent (Close): nothing
            // left to tell the core. Readable/Writable: the drive below does the work.
            _ => None,
        };
        if let Some(Err(e)) = result {
            self.core_rejected(id, e);
        }
        self.apply_actions(id, now);
        self.mark(id);
    }

    fn on_lingering_event(&mut self, link: LinkId, conn: ConnId, event: EngineEvent) {
        match event {
            EngineEvent::Readable { .. } => {
                let engine = &mut self.links[link].engine;
                while let Ok(n) = engine.recv(conn, &mut self.scratch) {
                    if n == 0 {
                        break;
                    }
                    self.lingering_discarded += n as u64;
                }
            }
            EngineEvent::Closed { .. }
            | EngineEvent::Reset { .. }
            | EngineEvent::Refused { .. } => {
                self.conns.remove(&(link, conn));
                self.lingering_count = self.lingering_count.saturating_sub(1);
            }
            _ => {}
        }
    }

    /// Drops a dead connection from the tables (the engine has already forgotten it).
    fn forget(&mut self, link: LinkId, conn: ConnId, id: SessionId, side: Side) {
        self.conns.remove(&(link, conn));
        if let Some(entry) = self.sessions.get_mut(&id)
            && let Some(place) = entry.slot_mut(side)
            && place.is_some_and(|s| s.conn == conn)
        {
            *place = None;
        }
    }

    fn link_of(&self, service: usize, side: Side) -> LinkId {
        match side {
            Side::Replica(_) => self
                .services
                .get(service)
                .map_or(CLIENT_LINK, |s| s.replica_link),
            Side::Client | Side::Primary => CLIENT_LINK,
        }
    }

    /// A client's handshake completed: admit it as a session or reset it.
    fn accept(
        &mut self,
        link: LinkId,
        conn: ConnId,
        local: SocketAddrV4,
        remote: SocketAddrV4,
        now: Instant,
    ) {
        let engine = &mut self.links[link].engine;
        let by_endpoint = self
            .services
            .iter()
            .position(|s| s.primary == local && link == CLIENT_LINK);
        let Some(service) = by_endpoint else {
            self.drops.not_a_service += 1;
            tracing::debug!(%local, %remote, "connection to no service's primary reset");
            let _ = engine.abort(conn);
            return;
        };
        let plan = &self.services[service];
        if !plan.clients.contains(*remote.ip()) {
            // The XDP rule only steers the service's clients here; anything else arrived
            // through another rule and is not ours to replicate.
            self.counters[service].refused.not_a_client += 1;
            tracing::debug!(%remote, service = %plan.name, "connection from outside the clients prefix reset");
            let _ = engine.abort(conn);
            return;
        }
        let id = match self.manager.open_with(plan.session.clone(), now) {
            Ok(id) => id,
            Err(refusal) => {
                let refused = &mut self.counters[service].refused;
                match refusal {
                    Refusal::SessionLimit => refused.session_limit += 1,
                    Refusal::MemoryLimit { .. } => refused.memory_limit += 1,
                    Refusal::InvalidConfig(_) => refused.invalid_config += 1,
                }
                tracing::debug!(%remote, service = %plan.name, %refusal, "client reset");
                let _ = engine.abort(conn);
                return;
            }
        };
        self.counters[service].sessions_total += 1;
        tracing::debug!(session = %id, %remote, service = %plan.name, "session opened");
        let record = plan
            .record
            .as_ref()
            .and_then(|handle| handle.open_replicated(&plan.name, remote, plan.primary));
        self.sessions.insert(
            id,
            Entry {
                service,
                client: Some(Slot {
                    conn,
                    closing: false,
                }),
                primary: None,
                replicas: vec![None; plan.replicas.len()],
                queued: false,
                record,
            },
        );
        self.conns.insert(
            (link, conn),
            Owner::Session {
                id,
                side: Side::Client,
            },
        );
        self.apply_actions(id, now);
        self.mark(id);
    }

    /// Queues a session for a drive in this turn (once).
    fn mark(&mut self, id: SessionId) {
        if let Some(entry) = self.sessions.get_mut(&id)
            && !entry.queued
        {
            entry.queued = true;
            self.ready.push_back(id);
        }
    }

    /// Moves bytes for one session until nothing moves or its pass is used up. Returns
    /// whether anything moved.
    fn drive(&mut self, id: SessionId, now: Instant) -> bool {
        let mut sides = std::mem::take(&mut self.sides);
        let mut any = false;
        let mut exhausted = true;
        for _ in 0..ROUNDS_PER_PASS {
            let Some(entry) = self.sessions.get(&id) else {
                exhausted = false;
                break;
            };
            let service = entry.service;
            entry.sides(&mut sides);
            let mut moved = false;
            for &(side, slot) in &sides {
                let link = self.link_of(service, side);
                moved |= self.flush(id, side, link, slot.conn, now);
                moved |= self.fill(id, side, link, slot.conn, now);
            }
            self.apply_actions(id, now);
            any |= moved;
            if !moved {
                exhausted = false;
                break;
            }
        }
        self.sides = sides;
        if exhausted {
            // Still busy: the other sessions and the engines get a turn first.
            self.mark(id);
        }
        any
    }

    /// Hands what the core has pending for `side` to its connection.
    fn flush(
        &mut self,
        id: SessionId,
        side: Side,
        link: LinkId,
        conn: ConnId,
        now: Instant,
    ) -> bool {
        let Some(mut s) = self.manager.session_mut(id) else {
            return false;
        };
        let engine = &mut self.links[link].engine;
        let mut moved = false;
        let mut rejected = None;
        loop {
            let pending = s.pending(side);
            if pending.is_empty() {
                break;
            }
            let len = pending.len();
            // Not established yet, already closed by us, or gone: nothing is sent, and the
            // event that changes that (Connected, Reset) brings us back.
            let Ok(n) = engine.send(conn, pending) else {
                break;
            };
            if n == 0 {
                break;
            }
            moved = true;
            if let Err(e) = s.on_sent(side, n, now) {
                rejected = Some(e);
                break;
            }
            if n < len {
                break; // the send buffer is full: `Writable` follows
            }
        }
        drop(s);
        if let Some(e) = rejected {
            self.core_rejected(id, e);
        }
        moved
    }

    /// Reads from `side` as far as the core's window allows.
    fn fill(
        &mut self,
        id: SessionId,
        side: Side,
        link: LinkId,
        conn: ConnId,
        now: Instant,
    ) -> bool {
        let Some(mut s) = self.manager.session_mut(id) else {
            return false;
        };
        let engine = &mut self.links[link].engine;
        // The session's recording, if it has one; the handle decides which sides' bytes
        // belong in it.
        let record = self.sessions.get(&id).and_then(|e| {
            let rec = e.record.as_ref()?;
            let handle = self.services.get(e.service)?.record.as_ref()?;
            Some((handle, rec))
        });
        let mut moved = false;
        let mut broken = false;
        let mut rejected = None;
        for _ in 0..READS_PER_SIDE {
            // Client and primary: never more than the core takes, so the rest waits in
            // smoltcp's buffer and TCP flow control pushes back on the sender. Replicas:
            // unbounded; the core counts and drops their bytes.
            let window = s.receive_window(side);
            if window == 0 {
                break;
            }
            let want = window.min(self.scratch.len());
            let Some(buf) = self.scratch.get_mut(..want) else {
                break;
            };
            let n = match engine.recv(conn, buf) {
                Ok(n) => n,
                Err(_) => break,
            };
            if n == 0 {
                break;
            }
            moved = true;
            let data = buf.get(..n).unwrap_or_default();
            let result = s.on_data(side, data, now);
            // Exactly what the core took, in the order it took it (a short take breaks
            // the connection below; its prefix is still part of the stream).
            if let (Ok(taken), Some((handle, rec))) = (&result, record) {
                let accepted = data.get(..*taken).unwrap_or_default();
                handle.accepted(rec, side, accepted, SystemTime::now());
            }
            match result {
                Ok(taken) if taken == n => {}
                Ok(taken) => {
                    // Cannot happen while the window is respected; if it did, the stream
                    // would have a hole, so the connection is torn down instead.
                    tracing::error!(session = %id, ?side, n, taken, "core took less than its window; resetting the connection");
                    broken = true;
                    break;
                }
                Err(e) => {
                    rejected = Some(e);
                    break;
                }
            }
        }
        if broken {
            let _ = engine.abort(conn);
            if let Err(e) = s.on_reset(side, now) {
                rejected = Some(e);
            }
        }
        drop(s);
        if broken {
            self.forget(link, conn, id, side);
        }
        if let Some(e) = rejected {
            self.core_rejected(id, e);
        }
        moved
    }

    fn core_rejected(&mut self, id: SessionId, e: ncp_replication::Error) {
        self.drops.core_rejected += 1;
        tracing::error!(session = %id, error = %e, "replication core rejected an input");
    }

    /// Carries out everything the session asks for, in order, until its queue is empty.
    fn apply_actions(&mut self, id: SessionId, now: Instant) {
        loop {
            let action = match self.manager.session_mut(id) {
                Some(mut s) => s.poll_action(),
                None => return,
            };
            let Some(action) = action else {
                return;
            };
            let Some(service) = self.sessions.get(&id).map(|e| e.service) else {
                // Only after Finished, which ends the loop below.
                return;
            };
            match action {
                Action::Connect(side) => self.connect(id, service, side, now),
                Action::Close(side) => {
                    let link = self.link_of(service, side);
                    let slot = self
                        .sessions
                        .get_mut(&id)
                        .and_then(|e| e.slot_mut(side))
                        .and_then(|s| s.as_mut());
                    if let Some(slot) = slot {
                        slot.closing = true;
                        // An error means the connection is already gone; its event says so.
                        if let Err(e) = self.links[link].engine.close(slot.conn) {
                            tracing::debug!(session = %id, ?side, error = %e, "close");
                        }
                    }
                }
                Action::Reset(side) => self.reset(id, service, side),
                Action::Detached { replica, reason } => {
                    self.log_detach(id, service, replica, reason, now);
                    if let Some(r) = self.counters[service]
                        .replicas
                        .get_mut(usize::from(replica))
                    {
                        r.detached.record(reason);
                    }
                    self.reset(id, service, Side::Replica(replica));
                }
                Action::Finished => {
                    self.finish(id, now);
                    return;
                }
            }
        }
    }

    fn log_detach(
        &mut self,
        id: SessionId,
        service: usize,
        replica: u16,
        reason: ncp_replication::DetachReason,
        now: Instant,
    ) {
        let plan = &self.services[service];
        let address = plan.replicas.get(usize::from(replica));
        let last = self
            .detach_log
            .get_mut(service)
            .and_then(|l| l.get_mut(usize::from(replica)));
        match last {
            Some(last) if last.is_none_or(|t| now.duration_since(t) >= DETACH_LOG_INTERVAL) => {
                *last = Some(now);
                tracing::info!(session = %id, service = %plan.name, replica, address = ?address, ?reason, "replica detached");
            }
            _ => {
                tracing::debug!(session = %id, service = %plan.name, replica, ?reason, "replica detached");
            }
        }
    }

    /// Opens the connection to an upstream; an immediate failure is a refusal.
    fn connect(&mut self, id: SessionId, service: usize, side: Side, now: Instant) {
        let plan = &self.services[service];
        let to = match side {
            Side::Primary => Some(plan.primary),
            Side::Replica(i) => plan.replicas.get(usize::from(i)).copied(),
            Side::Client => None,
        };
        let Some(to) = to else {
            tracing::error!(session = %id, ?side, "core asked to connect a side without an address");
            return;
        };
        let link = self.link_of(service, side);
        self.want_neighbour(link, *to.ip(), now);
        match self.links[link].engine.connect(to) {
            Ok(conn) => {
                if let Some(place) = self.sessions.get_mut(&id).and_then(|e| e.slot_mut(side)) {
                    *place = Some(Slot {
                        conn,
                        closing: false,
                    });
                }
                self.conns.insert((link, conn), Owner::Session { id, side });
            }
            Err(e) => {
                self.drops.connect_failed += 1;
                tracing::debug!(session = %id, ?side, %to, error = %e, "connect failed at once");
                let result = self
                    .manager
                    .session_mut(id)
                    .map(|mut s| s.on_refused(side, now));
                if let Some(Err(e)) = result {
                    self.core_rejected(id, e);
                }
            }
        }
    }

    /// Aborts `side`'s connection (RST), if it still has one.
    fn reset(&mut self, id: SessionId, service: usize, side: Side) {
        let link = self.link_of(service, side);
        let slot = self
            .sessions
            .get_mut(&id)
            .and_then(|e| e.slot_mut(side))
            .and_then(Option::take);
        if let Some(slot) = slot {
            self.conns.remove(&(link, slot.conn));
            let _ = self.links[link].engine.abort(slot.conn);
        }
    }

    /// The session is over: its closing upstreams linger, everything else is aborted, its
    /// counters are folded into the service's, its recording ends.
    fn finish(&mut self, id: SessionId, now: Instant) {
        let Some(mut entry) = self.sessions.remove(&id) else {
            return;
        };
        let service = entry.service;
        let until = now + self.services[service].session.drain_timeout;
        let mut sides = std::mem::take(&mut self.sides);
        entry.sides(&mut sides);
        for &(side, slot) in &sides {
            let link = self.link_of(service, side);
            let key = (link, slot.conn);
            if slot.closing && self.lingering_count < self.max_lingering {
                self.conns.insert(key, Owner::Lingering { until });
                self.lingering.push(Reverse((until, link, slot.conn)));
                self.lingering_count += 1;
            } else {
                if slot.closing {
                    self.drops.lingering_overflow += 1;
                }
                self.conns.remove(&key);
                let _ = self.links[link].engine.abort(slot.conn);
            }
        }
        self.sides = sides;
        let stats = self.manager.remove(id);
        if let Some(stats) = &stats {
            self.counters[service].add_session(stats);
        }
        if let (Some(rec), Some(handle)) = (entry.record.take(), &self.services[service].record) {
            handle.end(rec, stats.as_ref());
        }
        tracing::debug!(session = %id, "session finished");
    }

    fn expire_lingering(&mut self, now: Instant) {
        while let Some(Reverse((until, link, conn))) = self.lingering.peek().copied() {
            if until > now {
                break;
            }
            self.lingering.pop();
            if let Some(Owner::Lingering { until: u }) = self.conns.get(&(link, conn))
                && *u == until
            {
                self.conns.remove(&(link, conn));
                self.lingering_count = self.lingering_count.saturating_sub(1);
                let _ = self.links[link].engine.abort(conn);
                tracing::debug!(%conn, "lingering upstream aborted at its deadline");
            }
        }
    }

    /// Makes sure the device of `link` will know `ip`'s MAC: if it does not yet, the
    /// kernel is asked to resolve it and its neighbour table is watched.
    fn want_neighbour(&mut self, link: LinkId, ip: Ipv4Addr, now: Instant) {
        let Some(l) = self.links.get(link) else {
            return;
        };
        if l.engine.device().neighbour(ip).is_some()
            || self.unresolved.iter().any(|u| u.link == link && u.ip == ip)
        {
            return;
        }
        trigger_kernel_resolution(ip);
        self.unresolved.push(Unresolved {
            link,
            ip,
            since: now,
            triggered: now,
            next_check: now,
        });
    }

    fn check_neighbours(&mut self, now: Instant) {
        let mut table: Option<Vec<(Ipv4Addr, MacAddr, String)>> = None;
        let links = &mut self.links;
        self.unresolved.retain_mut(|u| {
            if u.next_check > now {
                return true;
            }
            let Some(link) = links.get_mut(u.link) else {
                return false;
            };
            if link.engine.device().neighbour(u.ip).is_some() {
                return false; // learned from a frame meanwhile
            }
            let entries = table.get_or_insert_with(kernel_neighbours);
            let found = entries
                .iter()
                .find(|(ip, _, dev)| *ip == u.ip && *dev == link.interface);
            if let Some((ip, mac, _)) = found {
                link.engine.device_mut().learn(*ip, *mac);
                tracing::debug!(%ip, interface = %link.interface, "next hop seeded from the kernel's neighbour table");
                return false;
            }
            if now.duration_since(u.since) >= NEIGHBOUR_GIVE_UP {
                tracing::warn!(ip = %u.ip, interface = %link.interface, "giving up resolving a next hop");
                return false;
            }
            if now.duration_since(u.triggered) >= NEIGHBOUR_RETRIGGER {
                trigger_kernel_resolution(u.ip);
                u.triggered = now;
            }
            u.next_check = now + NEIGHBOUR_CHECK;
            true
        });
    }

    /// This worker's counters right now.
    pub fn snapshot(&self, interface: &str, queue: u32) -> WorkerReplicationStats {
        let mut services = self.counters.clone();
        for (svc, plan) in services.iter_mut().zip(&self.services) {
            svc.read_recording(plan.record.as_ref());
        }
        let mut buffered = 0;
        for (id, entry) in &self.sessions {
            let (Some(s), Some(svc)) = (self.manager.session(*id), services.get_mut(entry.service))
            else {
                continue;
            };
            buffered += svc.add_live_session(s);
        }
        let metrics = self.manager.metrics();
        let links = self
            .links
            .iter()
            .map(|l| {
                let e = l.engine.counters();
                LinkStats {
                    interface: l.interface.clone(),
                    connections: l.engine.connections() as u64,
                    ports_in_use: l.engine.ports_in_use() as u64,
                    accepted: e.accepted,
                    connected: e.connected,
                    refused: e.refused,
                    reset: e.reset,
                    closed: e.closed,
                    half_open_failed: e.half_open_failed,
                    overloaded: e.overloaded,
                    strays: e.strays,
                    ..LinkStats::default()
                }
            })
            .collect();
        WorkerReplicationStats {
            interface: interface.to_owned(),
            queue,
            sessions_active: self.sessions.len() as u64,
            sessions_total: services.iter().map(|s| s.sessions_total).sum(),
            sessions_refused: services.iter().map(|s| s.refused.total()).sum::<u64>()
                + self.drops.not_a_service,
            memory_reserved_bytes: metrics.memory_reserved_bytes,
            memory_buffered_bytes: buffered,
            lingering_connections: self.lingering_count as u64,
            lingering_bytes_discarded: self.lingering_discarded,
            drops: self.drops,
            links,
            services,
        }
    }

    /// Stop: every open session is reset on all sides (and its recording ended as
    /// aborted), lingering connections aborted, and the engines polled once more so the
    /// RSTs leave.
    pub fn shutdown(&mut self, now: Instant) {
        let ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        let open = ids.len();
        for id in ids {
            if let Some(mut entry) = self.sessions.remove(&id) {
                // Reset at stop: the recording says so too.
                if let (Some(rec), Some(handle)) =
                    (entry.record.take(), &self.services[entry.service].record)
                {
                    handle.abort(rec);
                }
                let mut sides = Vec::new();
                entry.sides(&mut sides);
                for (side, slot) in sides {
                    let link = self.link_of(entry.service, side);
                    let _ = self.links[link].engine.abort(slot.conn);
                }
                if let Some(stats) = self.manager.remove(id) {
                    self.counters[entry.service].add_session(&stats);
                }
            }
        }
        for ((link, conn), _) in self.conns.drain() {
            if let Some(l) = self.links.get_mut(link) {
                let _ = l.engine.abort(conn);
            }
        }
        self.lingering.clear();
        self.lingering_count = 0;
        let mut events = Vec::new();
        for link in &mut self.links {
            link.engine.poll(now, &mut events);
            events.clear();
        }
        if open > 0 {
            tracing::info!(sessions = open, "open sessions reset at stop");
        }
    }
}

/// Fills in the device-level counters of a snapshot (only an AF_XDP device has them).
pub fn add_device_counters(stats: &mut WorkerReplicationStats, links: &[Link<XskDevice>]) {
    for (s, l) in stats.links.iter_mut().zip(links) {
        let c = l.engine.device().counters();
        s.tx_no_neighbour = c.tx_no_neighbour;
        s.tx_no_frame = c.tx_no_frame;
        s.rx_dropped = c.rx_not_ipv4 + c.rx_truncated + c.rx_malformed;
        if let Some(h) = l.engine.device().handover_counters() {
            s.handed_out = h.handed_out;
            s.handed_in = h.handed_in;
            s.handover_dropped = h.dropped;
        }
    }
}

/// Asks the kernel to resolve `ip`'s link-layer address: an empty UDP datagram to the
/// discard port makes it ARP for the next hop (the reply reaches the kernel, as the XDP
/// program passes ARP). Chosen over running ARP in the data plane: the kernel already
/// owns the interface's address and its neighbour table, and this needs no raw socket.
/// The datagram itself is harmless (discard port; at worst an ICMP port unreachable).
fn trigger_kernel_resolution(ip: Ipv4Addr) {
    let sent = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).and_then(|s| s.send_to(&[], (ip, 9)));
    if let Err(e) = sent {
        tracing::debug!(%ip, error = %e, "could not trigger neighbour resolution");
    }
}

/// The kernel's complete IPv4 neighbour entries of this network namespace, from
/// `/proc/net/arp`: (address, MAC, device).
fn kernel_neighbours() -> Vec<(Ipv4Addr, MacAddr, String)> {
    match std::fs::read_to_string("/proc/net/arp") {
        Ok(text) => parse_proc_arp(&text),
        Err(e) => {
            tracing::debug!(error = %e, "reading /proc/net/arp");
            Vec::new()
        }
    }
}

/// ATF_COM: the entry is complete (has a MAC).
const ATF_COM: u32 = 0x2;

fn parse_proc_arp(text: &str) -> Vec<(Ipv4Addr, MacAddr, String)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let ip: Ipv4Addr = f.next()?.parse().ok()?;
            let _hw_type = f.next()?;
            let flags = u32::from_str_radix(f.next()?.trim_start_matches("0x"), 16).ok()?;
            let mac = parse_mac(f.next()?)?;
            let _mask = f.next()?;
            let dev = f.next()?.to_owned();
            (flags & ATF_COM != 0 && mac != [0; 6]).then_some((ip, mac, dev))
        })
        .collect()
}

fn parse_mac(text: &str) -> Option<MacAddr> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    //! The replicator over in-memory IP links: a "network" engine plays client and
    //! primary on link 0, another plays the replica on link 1.

    use super::*;
    use crate::{
        config::PortRange,
        engine::{
            EngineConfig,
            pipe::{Pipe, pipe_pair},
        },
    };

    impl Neighbours for Pipe {
        fn neighbour(&self, _: Ipv4Addr) -> Option<MacAddr> {
            Some([2, 0, 0, 0, 0, 1]) // an IP link needs none
        }
        fn learn(&mut self, _: Ipv4Addr, _: MacAddr) {}
    }

    const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
    const MB0: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 4);
    const MB1: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 4);
    const PRIMARY: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 2), 80);
    const REPLICA: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 2, 3), 80);
    const PORTS: PortRange = PortRange {
        first: 20000,
        last: 20999,
    };

    fn engine(pipe: Pipe, own: Ipv4Addr, listen: Vec<SocketAddrV4>) -> Engine<Pipe> {
        let mut config = EngineConfig::new(own, PORTS);
        config.listen = listen;
        config.rx_buffer = 64 * 1024;
        config.tx_buffer = 64 * 1024;
        Engine::new(pipe, config).unwrap()
    }

    /// What the servers on the far side of the links do with a connection: read it to
    /// its end, then answer `answer` and close.
    #[derive(Default)]
    struct Server {
        conn: Option<ConnId>,
        got: Vec<u8>,
        answered: bool,
        closed: bool,
    }

    impl Server {
        fn on(&mut self, e: &mut Engine<Pipe>, event: EngineEvent, answer: &[u8]) {
            match event {
                EngineEvent::Accepted { conn, .. } => self.conn = Some(conn),
                EngineEvent::Readable { conn } => {
                    let mut buf = [0; 8192];
                    while let Ok(n @ 1..) = e.recv(conn, &mut buf) {
                        self.got.extend_from_slice(&buf[..n]);
                    }
                }
                EngineEvent::PeerClosed { conn } if !self.answered => {
                    self.answered = true;
                    assert_eq!(e.send(conn, answer).unwrap(), answer.len());
                    e.close(conn).unwrap();
                }
                EngineEvent::Closed { .. } | EngineEvent::Reset { .. } => self.closed = true,
                _ => {}
            }
        }
    }

    fn replicator(
        net0: Pipe,
        net1: Pipe,
        primary: SocketAddrV4,
        record: Option<RecordHandle>,
    ) -> Replicator<Pipe> {
        let service = ServiceConfig {
            name: "svc".into(),
            primary,
            clients: "198.18.1.0/24".parse().unwrap(),
            replicas: vec![REPLICA],
            replica_interface: Some("eth1".into()),
            replica_budget_bytes: 4 << 20,
            primary_budget_bytes: 1 << 20,
            idle_timeout_secs: 30,
            connect_timeout_secs: 5,
            record: None,
        };
        let links = vec![
            Link {
                interface: "eth0".into(),
                engine: engine(net0, MB0, vec![primary]),
            },
            Link {
                interface: "eth1".into(),
                engine: engine(net1, MB1, Vec::new()),
            },
        ];
        let mut plan = ServicePlan::new(&service, 1);
        plan.record = record;
        Replicator::new(links, vec![plan], ManagerConfig::default())
    }

    /// The middlebox with a client and the primary on the far side of link 0 and the
    /// replica on the far side of link 1, all stepped together in one thread.
    struct Bed {
        mb: Replicator<Pipe>,
        side0: Engine<Pipe>,
        side1: Engine<Pipe>,
        /// The client's connection (to the primary's address, which the middlebox answers).
        client: ConnId,
        /// What the client sends, how much of it went out, and whether it closes after.
        data: Vec<u8>,
        sent: usize,
        close_when_sent: bool,
        /// What the client received, and whether its connection has ended.
        answer: Vec<u8>,
        client_done: bool,
        primary: Server,
        replica: Server,
        events: Vec<EngineEvent>,
    }

    impl Bed {
        fn new(record: Option<RecordHandle>, data: Vec<u8>, close_when_sent: bool) -> Self {
            let (net0, mb0) = pipe_pair();
            let (net1, mb1) = pipe_pair();
            let mut side0 = engine(net0, CLIENT, vec![PRIMARY]);
            let client = side0.connect(PRIMARY).unwrap();
            Self {
                mb: replicator(mb0, mb1, PRIMARY, record),
                side0,
                side1: engine(net1, REPLICA.ip().to_owned(), vec![REPLICA]),
                client,
                data,
                sent: 0,
                close_when_sent,
                answer: Vec::new(),
                client_done: false,
                primary: Server::default(),
                replica: Server::default(),
                events: Vec::new(),
            }
        }

        /// One round: the middlebox's turn, then the far sides handle what reached them
        /// and the client sends what fits.
        fn step(&mut self) {
            let now = Instant::now();
            self.mb.turn(now);
            let client = self.client;
            self.side0.poll(now, &mut self.events);
            for event in self.events.drain(..) {
                match event {
                    EngineEvent::Connected { conn } | EngineEvent::Writable { conn }
                        if conn == client => {}
                    EngineEvent::Readable { conn } if conn == client => {
                        let mut buf = [0; 256];
                        while let Ok(n @ 1..) = self.side0.recv(conn, &mut buf) {
                            self.answer.extend_from_slice(&buf[..n]);
                        }
                    }
                    EngineEvent::Closed { conn } | EngineEvent::Reset { conn }
                        if conn == client =>
                    {
                        self.client_done = true;
                    }
                    EngineEvent::PeerClosed { conn } if conn == client => {}
                    other => self.primary.on(&mut self.side0, other, b"from primary"),
                }
            }
            if self.sent < self.data.len()
                && let Ok(n) = self.side0.send(client, &self.data[self.sent..])
            {
                self.sent += n;
                if self.sent == self.data.len() && self.close_when_sent {
                    self.side0.close(client).unwrap();
                }
            }
            self.side1.poll(now, &mut self.events);
            for event in self.events.drain(..) {
                self.replica.on(&mut self.side1, event, b"from replica");
            }
        }

        /// A bed whose client has sent `data` without closing, and whose primary has all
        /// of it: every byte went through the core.
        fn delivered(record: Option<RecordHandle>, data: &[u8]) -> Self {
            let mut bed = Self::new(record, data.to_vec(), false);
            let done = bed.run_until(|b| b.primary.got.len() == data.len());
            let got = bed.primary.got.len();
            assert!(done, "the primary got {got} of {} bytes", data.len());
            bed
        }

        /// Steps until `done` holds; false if it never did within a generous bound.
        fn run_until(&mut self, done: impl Fn(&Self) -> bool) -> bool {
            for _ in 0..200_000 {
                self.step();
                if done(self) {
                    return true;
                }
            }
            false
        }
    }

    fn pattern(len: u32) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn copies_the_client_stream_to_primary_and_replica_and_answers_from_the_primary() {
        let data = pattern(300_000);
        let mut bed = Bed::new(None, data.clone(), true);
        bed.run_until(|b| b.client_done && b.replica.closed && b.mb.sessions() == 0);
        assert!(bed.client_done, "the client's connection did not end");
        assert_eq!(
            bed.answer, b"from primary",
            "only the primary answers the client"
        );
        assert!(bed.primary.got == data, "primary stream differs");
        assert!(bed.replica.got == data, "replica stream differs");
        assert_eq!(bed.mb.sessions(), 0);
        let s = bed.mb.snapshot("eth0", 0);
        let svc = &s.services[0];
        assert_eq!(svc.sessions_total, 1);
        assert_eq!(svc.primary_bytes_out, data.len() as u64);
        assert_eq!(svc.replicas[0].bytes_out, data.len() as u64);
        assert_eq!(svc.client_bytes_out, 12);
        assert_eq!(svc.replica_bytes_dropped, 12);
        assert_eq!(svc.detached.total(), 0);
        assert_eq!(svc.recording, None, "the service does not record");
        assert_eq!(
            s.links[1].connected, 1,
            "the replica is reached through link 1"
        );
        assert_eq!(s.links[0].connected, 1);
    }

    #[test]
    fn a_recording_holds_exactly_the_streams_the_core_accepted() {
        use crate::offline::{reader::EndKind, testing};
        let (rec, dir) = testing::recorder("xdp-clean", true);
        let data = pattern(300_000);
        let mut bed = Bed::new(Some(rec.handle()), data.clone(), true);
        let ended = bed.run_until(|b| b.client_done && b.replica.closed && b.mb.sessions() == 0);
        assert!(ended, "the session did not end");
        assert!(bed.primary.got == data, "primary stream differs");
        let s = bed.mb.snapshot("eth0", 0);
        let svc = &s.services[0];
        let r = svc.recording.unwrap();
        assert_eq!((r.sessions_opened, r.sessions_detached), (1, 0), "{r:?}");
        // What the core took from each side is what the recorder was given.
        assert_eq!(r.client_bytes, svc.client_bytes_in);
        assert_eq!(r.client_bytes, data.len() as u64);
        assert_eq!(r.server_bytes, svc.primary_bytes_in);
        assert_eq!(
            r.server_bytes, 12,
            "the primary's answer, not the replica's"
        );
        assert_eq!(rec.finish().write_errors, 0);

        let r = testing::recorded(&dir);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(r.sessions.len(), 1);
        let session = &r.sessions[0];
        assert_eq!(session.meta.service, "svc");
        assert_eq!(session.meta.primary, PRIMARY);
        assert_eq!(*session.meta.client.ip(), CLIENT);
        assert!(session.client == data, "recorded client stream differs");
        assert_eq!(session.server, b"from primary");
        assert_eq!(session.end, EndKind::Fin);
    }

    #[test]
    fn aborted_and_unfinished_sessions_are_recorded_as_reset() {
        use crate::offline::{reader::EndKind, testing};
        let (rec, dir) = testing::recorder("xdp-reset", false);
        let first = pattern(50_000);
        // The client resets its session once the primary has everything it sent, so the
        // whole stream was accepted before the reset.
        let mut aborted = Bed::delivered(Some(rec.handle()), &first);
        aborted.side0.abort(aborted.client).unwrap();
        let ended = aborted.run_until(|b| b.mb.sessions() == 0);
        assert!(ended, "the reset session did not end");
        assert_eq!(aborted.mb.snapshot("eth0", 0).services[0].client_resets, 1);

        // A second session still open when its worker stops.
        let second = pattern(20_000);
        let mut open = Bed::delivered(Some(rec.handle()), &second);
        assert_eq!(open.mb.sessions(), 1);
        open.mb.shutdown(Instant::now());
        assert_eq!(open.mb.sessions(), 0);
        rec.finish();

        let r = testing::recorded(&dir);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(r.sessions.len(), 2, "{:?}", r.sessions);
        assert!(r.sessions[0].client == first, "first stream differs");
        assert_eq!(r.sessions[0].end, EndKind::Reset);
        assert!(r.sessions[1].client == second, "second stream differs");
        assert_eq!(r.sessions[1].end, EndKind::Reset);
        assert!(
            r.sessions.iter().all(|s| s.server.is_empty()),
            "no responses asked for"
        );
    }

    #[test]
    fn a_client_outside_the_prefix_is_reset_and_counted() {
        let (net0, mb0) = pipe_pair();
        let (_net1, mb1) = pipe_pair();
        let mut mb = replicator(mb0, mb1, PRIMARY, None);
        let mut outsider = engine(net0, Ipv4Addr::new(198, 18, 9, 9), Vec::new());
        let conn = outsider.connect(PRIMARY).unwrap();
        let mut events = Vec::new();
        let mut reset = false;
        for _ in 0..10_000 {
            mb.turn(Instant::now());
            outsider.poll(Instant::now(), &mut events);
            reset |= events
                .drain(..)
                .any(|e| e == EngineEvent::Reset { conn } || e == EngineEvent::Refused { conn });
            if reset {
                break;
            }
        }
        assert!(reset, "the outsider was not reset");
        let s = mb.snapshot("eth0", 0);
        assert_eq!(s.services[0].refused.not_a_client, 1);
        assert_eq!(s.sessions_refused, 1);
        assert_eq!(s.sessions_total, 0);
    }

    #[test]
    fn proc_arp_keeps_complete_entries_only() {
        let text = "IP address       HW type     Flags       HW address            Mask     Device\n\
                    198.18.1.2       0x1         0x2         02:00:c6:12:01:02     *        eth0\n\
                    198.18.2.3       0x1         0x0         00:00:00:00:00:00     *        eth1\n\
                    198.18.2.9       0x1         0x6         02:00:c6:12:02:09     *        eth1\n\
                    garbage line\n";
        let entries = parse_proc_arp(text);
        assert_eq!(
            entries,
            vec![
                (
                    Ipv4Addr::new(198, 18, 1, 2),
                    [2, 0, 0xc6, 0x12, 1, 2],
                    "eth0".to_owned()
                ),
                (
                    Ipv4Addr::new(198, 18, 2, 9),
                    [2, 0, 0xc6, 0x12, 2, 9],
                    "eth1".to_owned()
                ),
            ]
        );
        assert_eq!(parse_mac("02:00:c6:12:01"), None);
        assert_eq!(parse_mac("02:00:c6:12:01:02:03"), None);
    }
}
