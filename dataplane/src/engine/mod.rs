//! A per-worker TCP engine: one smoltcp [`Interface`] in any-IP mode over one device.
//!
//! It terminates clients' connections addressed to a *foreign* address (the primary's,
//! whose frames the XDP program steers here) and answers as that address, and it opens
//! connections of its own from the data plane's address and owned port range. The caller
//! (a worker) drives it sans-IO style:
//!
//! ```text
//! loop {
//!     engine.poll(Instant::now(), &mut events);   // frames in, frames out, events
//!     for event in events.drain(..) {             // react: recv / send / connect / close
//!         ...                                     // on Readable: recv until it returns 0
//!     }
//!     if idle { poll(engine.device().readiness_fd(), min(engine.poll_delay(now), cap)) }
//! }
//! ```
//!
//! Connections are named by [`ConnId`]s that are never reused. After [`EngineEvent::Closed`],
//! [`EngineEvent::Reset`] or [`EngineEvent::Refused`], or after [`Engine::abort`], an id is
//! dead: calls with it return [`EngineError::UnknownConnection`].
//!
//! Two smoltcp behaviours shape the design:
//! - a zero-window receive buffer can stall a connection for good, so `Readable` is
//!   level-triggered (repeated on every poll while bytes wait) and the caller is expected
//!   to drain it completely into its own bounded queues each time;
//! - an interface offers every packet to every socket of the set it is given, and polls
//!   every socket of it for output. So each socket lives in a set of its own: a 4-tuple
//!   flow table picks the one socket a packet is for, a connection request to a listened
//!   endpoint gets a fresh socket on the spot (no listener pool to run dry under a burst
//!   of SYNs, and a retransmitted SYN finds the socket that answered the first one), and
//!   a poll visits only the sockets with news: a packet, a call of the caller's, a timer.
//!   The cost per packet and per poll does not grow with the number of connections.

mod ports;

use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    hash::{BuildHasher, Hasher},
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use ncp_common::wire::TcpSegment;
use rustc_hash::FxHashMap;
use smoltcp::{
    iface::{Config, Interface, PollIngressSingleResult, PollResult, SocketHandle, SocketSet},
    phy::Device,
    socket::tcp::{self, CongestionControl, State},
    time::{Duration as SmolDuration, Instant as SmolInstant},
    wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint},
};

use self::ports::PortAllocator;
use crate::config::PortRange;

/// What the engine needs from a device beyond smoltcp's trait. Device layers
/// ([`crate::xdp::layers`]) implement it by wrapping another `EngineDevice`.
pub trait EngineDevice: Device {
    /// Called once at the start of every [`Engine::poll`], with its time: a layer with
    /// timers of its own (e.g. retransmissions) fires them here.
    fn start_round(&mut self, _now: SmolInstant) {}

    /// When a layer's own timer is next due, so that [`Engine::poll_delay`] lets the
    /// caller sleep no longer. `None`: no timer.
    fn poll_at(&self) -> Option<SmolInstant> {
        None
    }

    /// Called once at the end of every [`Engine::poll`]: a point to push out what was
    /// queued during the round (e.g. the AF_XDP `sendto` kick).
    fn flush(&mut self) {}

    /// The IPv4 packet the next `receive` will hand over, if one waits. The engine reads
    /// its 4-tuple to pick the one socket smoltcp gets to see it with.
    fn peek_packet(&mut self) -> Option<&[u8]>;

    /// A descriptor that becomes readable when frames arrive, for the caller's poll set
    /// while it sleeps. `None` for a device that never needs waiting on (an in-memory
    /// pipe).
    fn readiness_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
}

/// Keep-alive probes sent to an idle peer within one [`EngineConfig::timeout`]: three
/// chances to answer (a probe or its answer can be lost) before the connection is given up.
const KEEP_ALIVES_PER_TIMEOUT: u32 = 3;

/// How to build an engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The data plane's own address: the source of outgoing connections.
    pub own_addr: Ipv4Addr,
    /// Local ports for outgoing connections (the owned range, which the kernel must not
    /// use on `own_addr`).
    pub ports: PortRange,
    /// Service endpoints to accept connections on, usually foreign (the primary's).
    pub listen: Vec<SocketAddrV4>,
    /// Receive buffer per connection, bytes. Above 64 KiB smoltcp scales the window.
    pub rx_buffer: usize,
    /// Send buffer per connection, bytes.
    pub tx_buffer: usize,
    /// Bound on connections (accepted, outgoing, half-open and closing together): beyond
    /// it, connection requests are reset and `connect` fails.
    pub max_connections: usize,
    /// Frames taken in per poll before sending and reporting: small enough that the
    /// caller drains receive buffers before they fill, large enough to amortise a round.
    pub rx_budget: usize,
    /// Abort a connection whose peer has sent nothing for this long. An idle connection
    /// is probed (keep-alive) at a third of it, so a live peer always answers in time.
    pub timeout: Option<Duration>,
    /// Disable Nagle's algorithm (the default): a relay forwards what it has at once.
    pub nodelay: bool,
    /// How long a cleanly closed connection keeps its socket (buffers included) and, for
    /// outgoing ones, its port in TIME-WAIT. smoltcp's own is 10 s; a shorter one frees
    /// memory sooner under connection churn, at the price of answering a late
    /// retransmitted FIN with a reset instead of an ACK.
    pub time_wait: Duration,
    /// Congestion control of every connection. smoltcp's default is none: a sender then
    /// fills the peer's whole window at once, which a switch that drops bursts (OVS's
    /// userspace datapath does) punishes with timeouts.
    pub congestion_control: CongestionControl,
}

impl EngineConfig {
    /// A configuration with defaults: 256 KiB buffers, 1024 connections, 64 frames per
    /// poll, 60 s timeout, no Nagle, CUBIC congestion control.
    pub fn new(own_addr: Ipv4Addr, ports: PortRange) -> Self {
        Self {
            own_addr,
            ports,
            listen: Vec::new(),
            rx_buffer: 256 * 1024,
            tx_buffer: 256 * 1024,
            max_connections: 1024,
            rx_budget: 64,
            timeout: Some(Duration::from_secs(60)),
            nodelay: true,
            time_wait: Duration::from_secs(10),
            congestion_control: CongestionControl::None,
        }
    }
}

/// A connection's name, unique for the engine's lifetime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn#{}", self.0)
    }
}

/// What happened during a poll.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineEvent {
    /// A client's connection to a listened endpoint completed its handshake.
    Accepted {
        /// The new connection.
        conn: ConnId,
        /// The endpoint the client addressed (e.g. the primary's address and port).
        local: SocketAddrV4,
        /// The client.
        remote: SocketAddrV4,
    },
    /// An outgoing connection is established.
    Connected {
        /// The connection.
        conn: ConnId,
    },
    /// An outgoing connection failed (reset or timed out before it was established). The
    /// id is dead.
    Refused {
        /// The connection.
        conn: ConnId,
    },
    /// Bytes wait in the receive buffer. Repeated each poll until drained.
    Readable {
        /// The connection.
        conn: ConnId,
    },
    /// Room opened in the send buffer after a `send` that did not take everything.
    Writable {
        /// The connection.
        conn: ConnId,
    },
    /// The peer sent FIN and every byte before it has been read.
    PeerClosed {
        /// The connection.
        conn: ConnId,
    },
    /// Both directions finished cleanly. The id is dead.
    Closed {
        /// The connection.
        conn: ConnId,
    },
    /// The connection was reset by the peer or timed out. The id is dead; unread bytes
    /// are lost.
    Reset {
        /// The connection.
        conn: ConnId,
    },
}

/// Failures of engine calls.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EngineError {
    /// The id was never handed out or is dead.
    #[error("{0} is not an open connection")]
    UnknownConnection(ConnId),
    /// The connection cannot send anymore (closed by us, or not established yet).
    #[error("{0} cannot send in its current state")]
    NotWritable(ConnId),
    /// Every port of the owned range is in use.
    #[error("no free local port in the owned range")]
    NoFreePort,
    /// `max_connections` reached.
    #[error("connection limit reached")]
    TooManyConnections,
    /// The remote endpoint is not usable (port 0, unspecified address).
    #[error("cannot connect to {0}")]
    Unaddressable(SocketAddrV4),
    /// The configuration cannot work.
    #[error("invalid engine configuration: {0}")]
    Config(String),
}

/// Counters of the engine. Published as they are in the stats, where counters newer than
/// a reader's snapshot default to zero.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct EngineCounters {
    /// Connections accepted.
    pub accepted: u64,
    /// Outgoing connections established.
    pub connected: u64,
    /// Outgoing connections refused or timed out.
    pub refused: u64,
    /// Connections reset or timed out after being established.
    pub reset: u64,
    /// Connections closed cleanly.
    pub closed: u64,
    /// Handshakes that failed before an accept (back to listening or closed).
    pub half_open_failed: u64,
    /// Connection requests reset because `max_connections` was reached.
    pub overloaded: u64,
    /// TCP segments that belong to no connection (smoltcp answers them with a reset).
    pub strays: u64,
    /// Connection requests that took over the 4-tuple of a finished connection still
    /// lingering (TIME-WAIT, or a reset to send).
    pub reused_tuples: u64,
}

/// A TCP connection's 4-tuple as its own socket sees it: our end first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct FlowKey {
    pub(crate) local: SocketAddrV4,
    pub(crate) remote: SocketAddrV4,
}

/// What the engine reads from a received packet before smoltcp does: whose it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    /// The receiving socket's view of the 4-tuple (destination = our end).
    pub(crate) key: FlowKey,
    /// A connection request: SYN without ACK.
    syn: bool,
}

/// Reads the 4-tuple and the SYN flag of an IPv4/TCP packet with the one parser
/// ([`ncp_common::wire`]). `None` for anything else (other protocols, fragments, bad
/// lengths, truncated headers): smoltcp decides what to do with it, with no socket in
/// reach. Never panics, whatever the bytes.
pub(crate) fn segment_of(packet: &[u8]) -> Option<Segment> {
    let segment = TcpSegment::parse(packet, 0).ok()??;
    Some(Segment {
        key: FlowKey {
            local: segment.dst,
            remote: segment.src,
        },
        syn: segment.is_connection_request(),
    })
}

/// Where the next received packet goes.
enum Route {
    /// The device has no packet waiting.
    NoPacket,
    /// To the socket in this slot.
    Socket(usize),
    /// To no socket: smoltcp answers it as it sees fit (a reset, for TCP).
    NoSocket,
}

/// Where a socket stands in the engine's bookkeeping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Took a connection request for a listened endpoint; the handshake is under way.
    HalfOpen,
    /// A connection the caller names.
    Conn(ConnId),
    /// The caller let go of it but smoltcp still needs it (an RST to send, TIME-WAIT).
    /// `since`: when the caller let go (for TIME-WAIT, about when it entered it).
    Lingering { since: std::time::Instant },
}

/// One TCP socket in a socket set of its own. smoltcp offers every packet to every
/// socket of the set it is given and polls every one of them for output; a set of one,
/// found through the flow table, makes both O(1) per packet whatever the number of
/// connections.
struct Sock {
    set: SocketSet<'static>,
    handle: SocketHandle,
    key: FlowKey,
    /// Our port from the owned range, for outgoing connections.
    port: Option<u16>,
    role: Role,
    /// The wake-up time (µs since the engine's epoch) this socket holds in `timers`.
    timer: Option<i64>,
    /// Queued in `dirty` for the next egress and state check.
    dirty: bool,
    /// The last collect round that looked at it (a socket can be queued twice).
    checked: u64,
}

impl Sock {
    fn tcp(&self) -> &tcp::Socket<'static> {
        self.set.get::<tcp::Socket>(self.handle)
    }

    fn tcp_mut(&mut self) -> &mut tcp::Socket<'static> {
        self.set.get_mut::<tcp::Socket>(self.handle)
    }
}

/// A connection the caller knows about.
#[derive(Debug)]
struct Conn {
    sock: usize,
    /// Whether `Accepted`/`Connected` has been reported.
    established: bool,
    /// The socket state seen at the end of the previous check (or after our own calls
    /// that change it), to tell a clean close from a reset.
    last: State,
    /// A send did not take everything: report `Writable` when room opens.
    want_write: bool,
    peer_closed: bool,
}

/// The TCP engine of one worker. Not `Send` when the device is not (an AF_XDP device is
/// created and used on its worker's thread).
pub struct Engine<D: EngineDevice> {
    device: D,
    iface: Interface,
    config: EngineConfig,
    endpoints: Vec<SocketAddrV4>,
    /// Sockets by slot; a freed slot is reused (its timer entry goes with it).
    socks: Vec<Option<Sock>>,
    free_slots: Vec<usize>,
    /// 4-tuple → slot: the dispatch in front of smoltcp.
    flows: HashMap<FlowKey, usize>,
    /// By the engine's own ids: a fast hasher (the flows above are keyed by tuples a
    /// peer chooses and keep the standard keyed one).
    conns: FxHashMap<ConnId, Conn>,
    /// Sockets to poll for output and to check for news in the next round: those that
    /// received a packet, that the caller touched or whose timer fired.
    dirty: Vec<usize>,
    /// Connections whose unread bytes are reported again next round (`Readable` is
    /// level-triggered); a caller that holds back reading may still sleep meanwhile.
    rechecks: Vec<usize>,
    /// Collect rounds so far.
    round: u64,
    /// (wake-up time in µs since `epoch`, slot), earliest first.
    timers: BTreeSet<(i64, usize)>,
    /// Gets the packets no socket owns, so smoltcp answers them (usually with a reset).
    no_socket: SocketSet<'static>,
    half_open: usize,
    lingering: usize,
    /// The last poll left a received packet with the device (see `poll`).
    held_back: bool,
    ports: PortAllocator,
    next_id: u64,
    epoch: std::time::Instant,
    /// The time of the current (or last) poll.
    now: std::time::Instant,
    counters: EngineCounters,
}

fn v4(endpoint: IpEndpoint) -> Option<SocketAddrV4> {
    match endpoint.addr {
        IpAddress::Ipv4(addr) => Some(SocketAddrV4::new(addr, endpoint.port)),
        #[allow(
            unreachable_patterns,
            reason = "IPv6 exists only when a feature enables it"
        )]
        _ => None,
    }
}

fn endpoint(addr: SocketAddrV4) -> IpEndpoint {
    IpEndpoint::new(IpAddress::Ipv4(*addr.ip()), addr.port())
}

/// Milliseconds of the wall clock, as TCP timestamps (RFC 7323: any clock that ticks
/// between 1 ms and 1 s and only moves forward).
fn wall_clock_millis() -> u32 {
    #[cfg(test)]
    if let Some(millis) = tests::SIMULATED_TSVAL.get() {
        return millis;
    }
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    // The timestamp wraps like the sequence space; only its low bits matter.
    (millis & u128::from(u32::MAX)) as u32
}

/// States in which the peer's FIN has been received.
fn fin_received(state: State) -> bool {
    matches!(
        state,
        State::CloseWait | State::LastAck | State::Closing | State::TimeWait
    )
}

impl<D: EngineDevice> Engine<D> {
    /// Builds the interface and starts listening on the configured endpoints.
    pub fn new(device: D, config: EngineConfig) -> Result<Self, EngineError> {
        // Seeds initial sequence numbers; it only needs to differ between runs.
        let random_seed = std::hash::RandomState::new().build_hasher().finish();
        Self::with_clock(device, config, std::time::Instant::now(), random_seed)
    }

    /// [`Engine::new`] with its time origin and random seed given: tests drive the engine
    /// on a simulated clock that starts at `epoch` and want the same sequence numbers on
    /// every run, so that timer and retransmission paths replay exactly.
    pub(crate) fn with_clock(
        mut device: D,
        config: EngineConfig,
        epoch: std::time::Instant,
        random_seed: u64,
    ) -> Result<Self, EngineError> {
        let own = config.own_addr;
        if own.is_unspecified() || own.is_broadcast() || own.is_multicast() {
            return Err(EngineError::Config(format!(
                "own address {own} is not unicast"
            )));
        }
        if config.rx_buffer == 0 || config.tx_buffer == 0 || config.rx_budget == 0 {
            return Err(EngineError::Config(
                "buffer sizes and rx_budget must be positive".into(),
            ));
        }
        let mut iface_config = Config::new(HardwareAddress::Ip);
        iface_config.random_seed = random_seed;
        let mut iface = Interface::new(iface_config, &mut device, SmolInstant::ZERO);
        iface.update_ip_addrs(|addrs| {
            // One address always fits: the vector holds at least one entry.
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(own), 32));
        });
        // Any-IP: accept segments addressed to any destination (the XDP program already
        // chose which frames come here), and answer from the address they were sent to.
        // smoltcp documents any-IP as "a route whose gateway is one of our addresses", so
        // the default route points at our own address; 0.14 also accepts without it.
        iface.set_any_ip(true);
        let _ = iface.routes_mut().add_default_ipv4_route(own);
        let mut endpoints = Vec::new();
        for &addr in &config.listen {
            if !endpoints.contains(&addr) {
                endpoints.push(addr);
            }
        }
        Ok(Self {
            device,
            iface,
            endpoints,
            socks: Vec::new(),
            free_slots: Vec::new(),
            flows: HashMap::new(),
            conns: FxHashMap::default(),
            dirty: Vec::new(),
            rechecks: Vec::new(),
            round: 0,
            timers: BTreeSet::new(),
            no_socket: SocketSet::new(Vec::new()),
            half_open: 0,
            lingering: 0,
            held_back: false,
            ports: PortAllocator::new(config.ports),
            config,
            next_id: 1,
            epoch,
            now: epoch,
            counters: EngineCounters::default(),
        })
    }

    fn timestamp(&self, now: std::time::Instant) -> SmolInstant {
        let micros = now.saturating_duration_since(self.epoch).as_micros();
        SmolInstant::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
    }

    fn new_socket(&self) -> tcp::Socket<'static> {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; self.config.rx_buffer]),
            tcp::SocketBuffer::new(vec![0; self.config.tx_buffer]),
        );
        socket.set_nagle_enabled(!self.config.nodelay);
        socket.set_timeout(self.config.timeout.map(SmolDuration::from));
        // smoltcp's timeout counts from the last segment *received*, so on its own it
        // would abort every session that is merely idle (a database client between
        // queries) after `timeout`. Keep-alive probes a third of the way in make a live
        // peer answer, so only a peer that stopped answering reaches the timeout.
        socket.set_keep_alive(
            self.config
                .timeout
                .map(|timeout| SmolDuration::from(timeout / KEEP_ALIVES_PER_TIMEOUT)),
        );
        socket.set_congestion_control(self.config.congestion_control);
        // Timestamps from the wall clock keep growing across restarts of the data plane.
        // A server still holding one of our earlier connections in TIME-WAIT (it closed
        // first, as web servers do) takes a new SYN on the same ports only when its
        // timestamp is newer (or, without timestamps, when its random ISN happens to be
        // above the old sequence: half the time). Without this, every other upstream
        // connection after a restart waited a 1 s SYN retransmission.
        socket.set_tsval_generator(Some(wall_clock_millis));
        socket
    }

    /// Sockets that count against `max_connections`.
    fn load(&self) -> usize {
        self.socks.len() - self.free_slots.len()
    }

    /// Puts `socket` in a set of its own under `key` and returns its slot.
    fn insert(
        &mut self,
        socket: tcp::Socket<'static>,
        key: FlowKey,
        port: Option<u16>,
        role: Role,
    ) -> usize {
        let mut set = SocketSet::new(Vec::with_capacity(1));
        let handle = set.add(socket);
        let sock = Sock {
            set,
            handle,
            key,
            port,
            role,
            timer: None,
            dirty: false,
            checked: 0,
        };
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.socks[slot] = Some(sock);
                slot
            }
            None => {
                self.socks.push(Some(sock));
                self.socks.len() - 1
            }
        };
        self.flows.insert(key, slot);
        slot
    }

    /// Drops the socket in `slot` with its flow entry, timer and port.
    fn free(&mut self, slot: usize) {
        let Some(sock) = self.socks.get_mut(slot).and_then(Option::take) else {
            return;
        };
        if let Some(at) = sock.timer {
            self.timers.remove(&(at, slot));
        }
        if self.flows.get(&sock.key) == Some(&slot) {
            self.flows.remove(&sock.key);
        }
        if let Some(port) = sock.port {
            self.ports.release(port);
        }
        match sock.role {
            Role::HalfOpen => self.half_open -= 1,
            Role::Lingering { .. } => self.lingering -= 1,
            Role::Conn(_) => {}
        }
        self.free_slots.push(slot);
    }

    fn mark_dirty(&mut self, slot: usize) {
        if let Some(Some(sock)) = self.socks.get_mut(slot)
            && !sock.dirty
        {
            sock.dirty = true;
            self.dirty.push(slot);
        }
    }

    /// Hands a socket the caller named over to smoltcp's remaining needs.
    fn linger(&mut self, slot: usize) {
        if let Some(Some(sock)) = self.socks.get_mut(slot) {
            sock.role = Role::Lingering { since: self.now };
            self.lingering += 1;
        }
        self.mark_dirty(slot);
    }

    /// Starts accepting connections to `addr` too (no-op when already listening).
    pub fn listen(&mut self, addr: SocketAddrV4) {
        if !self.endpoints.contains(&addr) {
            self.endpoints.push(addr);
        }
    }

    /// Stops accepting new connections to `addr`. Connections already accepted, and
    /// handshakes under way, go on.
    pub fn unlisten(&mut self, addr: SocketAddrV4) {
        self.endpoints.retain(|&e| e != addr);
    }

    fn alloc_id(&mut self) -> ConnId {
        let id = ConnId(self.next_id);
        self.next_id += 1;
        id
    }

    /// Who gets the next received packet: its connection's socket, a new socket for a
    /// connection request to a listened endpoint, or none.
    fn route(&mut self) -> Route {
        let Some(packet) = self.device.peek_packet() else {
            return Route::NoPacket;
        };
        let Some(segment) = segment_of(packet) else {
            return Route::NoSocket;
        };
        if let Some(&slot) = self.flows.get(&segment.key) {
            let lingering = self
                .socks
                .get(slot)
                .and_then(Option::as_ref)
                .is_some_and(|s| matches!(s.role, Role::Lingering { .. }));
            if !(segment.syn && lingering) {
                return Route::Socket(slot);
            }
            // A new connection from a port whose previous connection we still hold in
            // TIME-WAIT (or with a reset to send): the client has moved on, so the old
            // socket goes and the request gets a socket of its own, as a kernel would
            // let a new SYN take over a TIME-WAIT connection.
            self.counters.reused_tuples += 1;
            self.free(slot);
        }
        if !segment.syn || !self.endpoints.contains(&segment.key.local) {
            self.counters.strays += 1;
            tracing::debug!(local = %segment.key.local, remote = %segment.key.remote, "segment of no connection");
            return Route::NoSocket;
        }
        if self.load() >= self.config.max_connections {
            // smoltcp resets the request: a clear refusal the client sees at once.
            self.counters.overloaded += 1;
            return Route::NoSocket;
        }
        let mut socket = self.new_socket();
        let listen = IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(*segment.key.local.ip())),
            port: segment.key.local.port(),
        };
        // Port 0 cannot be listened on; nothing sensible can connect there either.
        if socket.listen(listen).is_err() {
            return Route::NoSocket;
        }
        self.half_open += 1;
        Route::Socket(self.insert(socket, segment.key, None, Role::HalfOpen))
    }

    /// Takes in up to `rx_budget` frames, sends what the sockets have to send, pushes it
    /// out, and appends what happened to `events`. Returns whether anything was done (a
    /// caller with nothing to do may then sleep; see [`Engine::poll_delay`]).
    pub fn poll(&mut self, now: std::time::Instant, events: &mut Vec<EngineEvent>) -> bool {
        let ts = self.timestamp(now);
        self.now = self.now.max(now);
        let before = events.len();
        let mut active = false;
        self.device.start_round(ts);
        self.iface.poll_maintenance(ts);
        while let Some(&(at, slot)) = self.timers.first() {
            if at > ts.total_micros() {
                break;
            }
            self.timers.remove(&(at, slot));
            if let Some(Some(sock)) = self.socks.get_mut(slot) {
                sock.timer = None;
            }
            self.mark_dirty(slot);
        }
        self.held_back = false;
        for _ in 0..self.config.rx_budget {
            // Only a packet seen here may be handed over: one that arrives between the look
            // and the hand-over must wait for the next round, or it would reach smoltcp
            // without its socket (and be answered with a reset).
            let target = match self.route() {
                Route::NoPacket => break,
                Route::Socket(slot) => Some(slot),
                Route::NoSocket => None,
            };
            let set = match target.and_then(|slot| self.socks.get_mut(slot)?.as_mut()) {
                Some(sock) => &mut sock.set,
                None => &mut self.no_socket,
            };
            match self.iface.poll_ingress_single(ts, &mut self.device, set) {
                PollIngressSingleResult::None => {
                    // A packet was peeked but not handed over (the device had no transmit
                    // frame for an answer): it left the ring, so the descriptor will not
                    // wake a sleeping caller for it.
                    self.held_back = true;
                    break;
                }
                _ => active = true,
            }
            if let Some(slot) = target {
                self.mark_dirty(slot);
            }
        }
        // Each egress round lets a socket emit at most one segment: repeat until quiet.
        // The bound only guards against a device that accepts frames forever.
        for &slot in &self.dirty {
            let Some(Some(sock)) = self.socks.get_mut(slot) else {
                continue;
            };
            for _ in 0..4096 {
                match self.iface.poll_egress(ts, &mut self.device, &mut sock.set) {
                    PollResult::None => break,
                    PollResult::SocketStateChanged => active = true,
                }
            }
        }
        self.device.flush();
        self.collect(ts, events);
        // Readable is repeated while bytes wait; it alone is not news, so a caller that
        // cannot drain right now may still sleep until the next frame or timer.
        active
            || events[before..]
                .iter()
                .any(|e| !matches!(e, EngineEvent::Readable { .. }))
    }

    /// How long the caller may sleep before the next poll is due (retransmissions, delayed
    /// ACKs, TIME-WAIT, sockets with news), when no frame arrives first. `None`: no timer
    /// is pending.
    pub fn poll_delay(&mut self, now: std::time::Instant) -> Option<Duration> {
        if !self.dirty.is_empty() || self.held_back {
            return Some(Duration::ZERO);
        }
        let now = self.timestamp(now).total_micros();
        let sockets = self.timers.first().map(|&(at, _)| at);
        let device = self.device.poll_at().map(|at| at.total_micros());
        let at = sockets.into_iter().chain(device).min()?;
        Some(Duration::from_micros(
            u64::try_from(at.saturating_sub(now)).unwrap_or(0),
        ))
    }

    /// Turns the state of the sockets that may have changed into events, frees finished
    /// sockets and sets each survivor's next wake-up.
    fn collect(&mut self, ts: SmolInstant, events: &mut Vec<EngineEvent>) {
        self.round += 1;
        let mut dirty = std::mem::take(&mut self.dirty);
        let rechecks = std::mem::take(&mut self.rechecks);
        for &slot in dirty.iter().chain(&rechecks) {
            let Some(Some(sock)) = self.socks.get_mut(slot) else {
                continue;
            };
            if sock.checked == self.round {
                continue;
            }
            sock.checked = self.round;
            sock.dirty = false;
            if sock.role == Role::HalfOpen {
                self.check_half_open(slot, events);
            }
            let role = self
                .socks
                .get(slot)
                .and_then(Option::as_ref)
                .map(|s| s.role);
            if let Some(Role::Conn(id)) = role
                && self.check_conn(id, events)
            {
                self.rechecks.push(slot);
            }
            if let Some(Some(sock)) = self.socks.get(slot)
                && matches!(sock.role, Role::Lingering { .. })
            {
                self.check_lingering(slot);
            }
            self.rearm_timer(slot, ts);
        }
        // Keep the allocation; marks made during this pass (a connection that just ended
        // may still have an RST or a FIN-ACK to send) are for the next poll.
        dirty.clear();
        dirty.append(&mut self.dirty);
        self.dirty = dirty;
    }

    /// Sets the socket's wake-up to smoltcp's next deadline for it (and, for TIME-WAIT,
    /// the engine's own).
    fn rearm_timer(&mut self, slot: usize, ts: SmolInstant) {
        let time_wait_ends = |since: std::time::Instant| {
            let end = since + self.config.time_wait;
            i64::try_from(end.saturating_duration_since(self.epoch).as_micros()).unwrap_or(i64::MAX)
        };
        let Some(Some(sock)) = self.socks.get_mut(slot) else {
            return;
        };
        if let Some(at) = sock.timer.take() {
            self.timers.remove(&(at, slot));
        }
        let smol = self
            .iface
            .poll_at(ts, &sock.set)
            .map(|at| at.total_micros());
        let time_wait = match sock.role {
            Role::Lingering { since } if sock.tcp().state() == State::TimeWait => {
                Some(time_wait_ends(since))
            }
            _ => None,
        };
        let at = match (smol, time_wait) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(at) = at {
            sock.timer = Some(at);
            self.timers.insert((at, slot));
        }
    }

    fn check_half_open(&mut self, slot: usize, events: &mut Vec<EngineEvent>) {
        let Some(Some(sock)) = self.socks.get_mut(slot) else {
            return;
        };
        let socket = sock.tcp();
        match socket.state() {
            State::SynReceived => {}
            State::Listen | State::Closed => {
                // The handshake was reset or timed out (or the request never reached the
                // socket). A listener would wait for a next SYN; this one was only ever
                // meant for this 4-tuple.
                self.counters.half_open_failed += 1;
                self.free(slot);
            }
            _ => {
                let (Some(local), Some(remote)) = (
                    socket.local_endpoint().and_then(v4),
                    socket.remote_endpoint().and_then(v4),
                ) else {
                    // Not IPv4: cannot happen with this feature set; drop it quietly.
                    sock.tcp_mut().abort();
                    self.half_open -= 1;
                    self.linger(slot);
                    return;
                };
                let conn = ConnId(self.next_id);
                self.next_id += 1;
                sock.role = Role::Conn(conn);
                self.half_open -= 1;
                self.counters.accepted += 1;
                events.push(EngineEvent::Accepted {
                    conn,
                    local,
                    remote,
                });
                // `last` stays Established so that a FIN or RST already processed is
                // reported by the connection check right after this one.
                self.conns.insert(
                    conn,
                    Conn {
                        sock: slot,
                        established: true,
                        last: State::Established,
                        want_write: false,
                        peer_closed: false,
                    },
                );
            }
        }
    }

    /// Reports what changed on connection `id`. Returns whether bytes still wait to be
    /// read (the connection is then checked again next poll).
    fn check_conn(&mut self, id: ConnId, events: &mut Vec<EngineEvent>) -> bool {
        let Some(conn) = self.conns.get_mut(&id) else {
            return false;
        };
        let slot = conn.sock;
        let Some(Some(sock)) = self.socks.get(slot) else {
            return false;
        };
        let socket = sock.tcp();
        let state = socket.state();
        if !conn.established {
            match state {
                State::SynSent | State::SynReceived => {
                    conn.last = state;
                    return false;
                }
                State::Closed | State::TimeWait | State::Listen => {
                    self.counters.refused += 1;
                    events.push(EngineEvent::Refused { conn: id });
                    self.conns.remove(&id);
                    self.linger(slot);
                    return false;
                }
                _ => {
                    conn.established = true;
                    self.counters.connected += 1;
                    events.push(EngineEvent::Connected { conn: id });
                }
            }
        }
        let unread = socket.recv_queue();
        if unread > 0 {
            events.push(EngineEvent::Readable { conn: id });
        }
        if conn.want_write && socket.can_send() {
            conn.want_write = false;
            events.push(EngineEvent::Writable { conn: id });
        }
        let graceful = state == State::TimeWait
            || (state == State::Closed && matches!(conn.last, State::LastAck | State::TimeWait));
        if unread == 0 && !conn.peer_closed && (fin_received(state) || graceful) {
            conn.peer_closed = true;
            events.push(EngineEvent::PeerClosed { conn: id });
        }
        if state == State::Closed || state == State::TimeWait {
            if graceful {
                // Bytes the caller has not read yet are still delivered first. `last` is
                // left alone so the close is still seen as clean next time.
                if unread > 0 {
                    return true;
                }
                self.counters.closed += 1;
                events.push(EngineEvent::Closed { conn: id });
            } else {
                self.counters.reset += 1;
                events.push(EngineEvent::Reset { conn: id });
            }
            self.conns.remove(&id);
            self.linger(slot);
            return false;
        }
        conn.last = state;
        unread > 0
    }

    /// Frees a lingering socket once smoltcp is done with it (closed, with no RST left to
    /// send) or it has spent the configured TIME-WAIT.
    fn check_lingering(&mut self, slot: usize) {
        let Some(Some(sock)) = self.socks.get(slot) else {
            return;
        };
        let Role::Lingering { since } = sock.role else {
            return;
        };
        let socket = sock.tcp();
        let done = match socket.state() {
            State::Closed => socket.remote_endpoint().is_none(),
            State::TimeWait => self.now.saturating_duration_since(since) >= self.config.time_wait,
            _ => false,
        };
        if done {
            self.free(slot);
        }
    }

    /// Opens a connection from our own address and a port of the owned range to `remote`.
    /// [`EngineEvent::Connected`] or [`EngineEvent::Refused`] follows.
    pub fn connect(&mut self, remote: SocketAddrV4) -> Result<ConnId, EngineError> {
        if self.load() >= self.config.max_connections {
            return Err(EngineError::TooManyConnections);
        }
        if remote.port() == 0 || remote.ip().is_unspecified() {
            return Err(EngineError::Unaddressable(remote));
        }
        let port = self.ports.alloc().ok_or(EngineError::NoFreePort)?;
        let local = SocketAddrV4::new(self.config.own_addr, port);
        let mut socket = self.new_socket();
        if socket
            .connect(self.iface.context(), endpoint(remote), endpoint(local))
            .is_err()
        {
            self.ports.release(port);
            return Err(EngineError::Unaddressable(remote));
        }
        let conn = self.alloc_id();
        let slot = self.insert(
            socket,
            FlowKey { local, remote },
            Some(port),
            Role::Conn(conn),
        );
        self.conns.insert(
            conn,
            Conn {
                sock: slot,
                established: false,
                last: State::SynSent,
                want_write: false,
                peer_closed: false,
            },
        );
        self.mark_dirty(slot);
        Ok(conn)
    }

    fn sock(&self, conn: ConnId) -> Result<&Sock, EngineError> {
        self.conns
            .get(&conn)
            .and_then(|c| self.socks.get(c.sock)?.as_ref())
            .ok_or(EngineError::UnknownConnection(conn))
    }

    /// The connection's slot, marked for the next poll (a call that changes the socket
    /// may give smoltcp something to send: data, a window update, a FIN).
    fn touch(&mut self, conn: ConnId) -> Result<usize, EngineError> {
        let slot = self.slot(conn)?;
        self.mark_dirty(slot);
        Ok(slot)
    }

    /// The connection's slot.
    fn slot(&self, conn: ConnId) -> Result<usize, EngineError> {
        Ok(self
            .conns
            .get(&conn)
            .ok_or(EngineError::UnknownConnection(conn))?
            .sock)
    }

    fn socket_mut(&mut self, slot: usize) -> Option<&mut tcp::Socket<'static>> {
        Some(self.socks.get_mut(slot)?.as_mut()?.tcp_mut())
    }

    /// Reads up to `buf.len()` bytes. `Ok(0)`: nothing buffered right now (or the peer
    /// finished, which [`EngineEvent::PeerClosed`] reports).
    pub fn recv(&mut self, conn: ConnId, buf: &mut [u8]) -> Result<usize, EngineError> {
        let slot = self.slot(conn)?;
        let socket = self
            .socket_mut(slot)
            .ok_or(EngineError::UnknownConnection(conn))?;
        // Errors mean "nothing to read in this state", which is what 0 says.
        let n = socket.recv_slice(buf).unwrap_or(0);
        // Only a read that took bytes can open the window (a window update to send). A
        // read that found nothing changes nothing: marking the socket anyway would make
        // `poll_delay` zero, and a caller that tries every side of a stalled session on
        // every round would then spin instead of sleeping until the next frame.
        if n > 0 {
            self.mark_dirty(slot);
        }
        Ok(n)
    }

    /// Bytes waiting to be read.
    pub fn recv_queue(&self, conn: ConnId) -> Result<usize, EngineError> {
        Ok(self.sock(conn)?.tcp().recv_queue())
    }

    /// Queues as much of `data` as the send buffer takes and returns how much that was.
    /// When it is less than `data.len()`, [`EngineEvent::Writable`] reports the room.
    pub fn send(&mut self, conn: ConnId, data: &[u8]) -> Result<usize, EngineError> {
        let slot = self.slot(conn)?;
        let socket = self
            .socket_mut(slot)
            .ok_or(EngineError::UnknownConnection(conn))?;
        let sent = socket
            .send_slice(data)
            .map_err(|_| EngineError::NotWritable(conn))?;
        // As for `recv`: only queued bytes give smoltcp something to send. A send into a
        // full buffer (waiting for the peer's ACKs) must leave the engine free to sleep.
        if sent > 0 {
            self.mark_dirty(slot);
        }
        if sent < data.len()
            && let Some(entry) = self.conns.get_mut(&conn)
        {
            entry.want_write = true;
        }
        Ok(sent)
    }

    /// Room in the send buffer right now.
    pub fn send_space(&self, conn: ConnId) -> Result<usize, EngineError> {
        let socket = self.sock(conn)?.tcp();
        if !socket.may_send() {
            return Ok(0);
        }
        Ok(socket.send_capacity() - socket.send_queue())
    }

    /// Bytes queued for sending and not yet acknowledged by the peer.
    pub fn send_queue(&self, conn: ConnId) -> Result<usize, EngineError> {
        Ok(self.sock(conn)?.tcp().send_queue())
    }

    /// The connection's local and remote endpoints.
    pub fn endpoints(&self, conn: ConnId) -> Result<(SocketAddrV4, SocketAddrV4), EngineError> {
        let socket = self.sock(conn)?.tcp();
        match (
            socket.local_endpoint().and_then(v4),
            socket.remote_endpoint().and_then(v4),
        ) {
            (Some(local), Some(remote)) => Ok((local, remote)),
            _ => Err(EngineError::UnknownConnection(conn)),
        }
    }

    /// Sends FIN after the queued bytes. Reading goes on until the peer closes too
    /// ([`EngineEvent::Closed`] ends it).
    pub fn close(&mut self, conn: ConnId) -> Result<(), EngineError> {
        let slot = self.touch(conn)?;
        let socket = self
            .socket_mut(slot)
            .ok_or(EngineError::UnknownConnection(conn))?;
        socket.close();
        let state = socket.state();
        // Record our own transition, so the next check does not mistake e.g. LAST-ACK →
        // CLOSED for a reset.
        if let Some(entry) = self.conns.get_mut(&conn) {
            entry.last = state;
        }
        if state == State::Closed {
            // Closing before the handshake finished drops the connection outright.
            self.conns.remove(&conn);
            self.linger(slot);
        }
        Ok(())
    }

    /// Resets the connection (RST) and forgets it: no more events for this id.
    pub fn abort(&mut self, conn: ConnId) -> Result<(), EngineError> {
        let entry = self
            .conns
            .remove(&conn)
            .ok_or(EngineError::UnknownConnection(conn))?;
        if let Some(socket) = self.socket_mut(entry.sock) {
            socket.abort();
        }
        self.linger(entry.sock);
        Ok(())
    }

    /// Connections the caller can name.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Sockets the caller no longer names that smoltcp still holds (TIME-WAIT, an RST to
    /// send).
    pub fn lingering(&self) -> usize {
        self.lingering
    }

    /// Handshakes under way (SYN received, not yet accepted).
    pub fn half_open(&self) -> usize {
        self.half_open
    }

    /// Endpoints connections are accepted on.
    pub fn listening(&self) -> &[SocketAddrV4] {
        &self.endpoints
    }

    /// Local ports of the owned range in use (including TIME-WAIT).
    pub fn ports_in_use(&self) -> usize {
        self.ports.in_use()
    }

    /// Counters so far.
    pub fn counters(&self) -> EngineCounters {
        self.counters
    }

    /// The device (e.g. to wait on its descriptor or read its counters).
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, mutably (e.g. to seed its neighbour table).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }
}

#[cfg(test)]
pub(crate) mod pipe;
#[cfg(test)]
pub(crate) mod tests;
