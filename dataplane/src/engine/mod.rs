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
//!     if idle { engine.device().wait(min(engine.poll_delay(now), cap)) }
//! }
//! ```
//!
//! Connections are named by [`ConnId`]s that are never reused. After [`EngineEvent::Closed`],
//! [`EngineEvent::Reset`] or [`EngineEvent::Refused`], or after [`Engine::abort`], an id is
//! dead: calls with it return [`EngineError::UnknownConnection`].
//!
//! Two smoltcp behaviours shape the API:
//! - a zero-window receive buffer can stall a connection for good, so `Readable` is
//!   level-triggered (repeated on every poll while bytes wait) and the caller is expected
//!   to drain it completely into its own bounded queues each time;
//! - a listening socket takes exactly one connection and there is no backlog, so each
//!   service endpoint has a pool of listening sockets, re-armed as soon as one of them
//!   takes a SYN (checked after every frame that carried one, not once per poll, so a
//!   burst of SYNs in one batch of frames finds a listener for each).

mod ports;

use std::{
    collections::BTreeMap,
    fmt,
    hash::{BuildHasher, Hasher},
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use smoltcp::{
    iface::{Config, Interface, PollIngressSingleResult, PollResult, SocketHandle, SocketSet},
    phy::Device,
    socket::tcp::{self, State},
    time::{Duration as SmolDuration, Instant as SmolInstant},
    wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint},
};

use self::ports::PortAllocator;
use crate::config::PortRange;

/// What the engine needs from a device beyond smoltcp's trait: a point to push out what
/// was queued during a poll round (e.g. the AF_XDP `sendto` kick).
pub trait EngineDevice: Device {
    /// Called once at the end of every [`Engine::poll`].
    fn flush(&mut self) {}

    /// Whether a TCP connection request (SYN without ACK) was received since the last
    /// call. After one, the engine re-arms its listeners before taking the next frame, so
    /// a burst of SYNs needs no more listeners than arrive between two frames (one). A
    /// device that cannot tell returns true: the engine then checks after every frame.
    fn take_syn_seen(&mut self) -> bool {
        true
    }
}

impl EngineDevice for crate::device::XskDevice {
    fn flush(&mut self) {
        crate::device::XskDevice::flush(self);
    }

    fn take_syn_seen(&mut self) -> bool {
        crate::device::XskDevice::take_syn_seen(self)
    }
}

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
    /// Listening sockets kept armed per endpoint. Listeners are re-armed after every
    /// received SYN (when the device reports SYNs, as [`crate::device::XskDevice`] does),
    /// so one or two take any burst; each costs its buffers up front.
    pub listeners_per_endpoint: usize,
    /// Receive buffer per connection, bytes. Above 64 KiB smoltcp scales the window.
    pub rx_buffer: usize,
    /// Send buffer per connection, bytes.
    pub tx_buffer: usize,
    /// Bound on connections (accepted, outgoing, half-open and closing together); pools
    /// are not re-armed and `connect` fails beyond it.
    pub max_connections: usize,
    /// Frames taken in per poll before sending and reporting: small enough that the
    /// caller drains receive buffers before they fill, large enough to amortise a round.
    pub rx_budget: usize,
    /// Abort a connection whose sent data or SYN stays unacknowledged this long.
    pub timeout: Option<Duration>,
    /// Disable Nagle's algorithm (the default): a relay forwards what it has at once.
    pub nodelay: bool,
    /// How long a cleanly closed connection keeps its socket (buffers included) and, for
    /// outgoing ones, its port in TIME-WAIT. smoltcp's own is 10 s; a shorter one frees
    /// memory sooner under connection churn, at the price of answering a late
    /// retransmitted FIN with a reset instead of an ACK.
    pub time_wait: Duration,
}

impl EngineConfig {
    /// A configuration with defaults: 256 KiB buffers, 2 listeners per endpoint, 1024
    /// connections, 64 frames per poll, 60 s timeout, no Nagle.
    pub fn new(own_addr: Ipv4Addr, ports: PortRange) -> Self {
        Self {
            own_addr,
            ports,
            listen: Vec::new(),
            listeners_per_endpoint: 2,
            rx_buffer: 256 * 1024,
            tx_buffer: 256 * 1024,
            max_connections: 1024,
            rx_budget: 64,
            timeout: Some(Duration::from_secs(60)),
            nodelay: true,
            time_wait: Duration::from_secs(10),
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

/// Counters of the engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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
    /// Retransmitted SYNs dropped because their connection already had a socket.
    pub duplicate_syn: u64,
}

/// A connection the caller knows about.
#[derive(Debug)]
struct Conn {
    handle: SocketHandle,
    /// Our port from the owned range, for outgoing connections.
    port: Option<u16>,
    /// Whether `Accepted`/`Connected` has been reported.
    established: bool,
    /// The socket state seen at the end of the previous poll (or after our own calls
    /// that change it), to tell a clean close from a reset.
    last: State,
    /// A send did not take everything: report `Writable` when room opens.
    want_write: bool,
    peer_closed: bool,
}

/// A socket the caller no longer names but smoltcp still needs: an RST to send after an
/// abort, or TIME-WAIT after a clean close. Removed once smoltcp is done with it.
#[derive(Debug)]
struct Lingering {
    handle: SocketHandle,
    port: Option<u16>,
    /// When the caller let go of it (for a TIME-WAIT socket: about when it entered it).
    since: std::time::Instant,
}

/// A listening socket that took a SYN and waits for the handshake to complete.
#[derive(Debug)]
struct HalfOpen {
    handle: SocketHandle,
    endpoint: usize,
}

#[derive(Debug)]
struct Endpoint {
    addr: SocketAddrV4,
    listeners: Vec<SocketHandle>,
}

/// The TCP engine of one worker. Not `Send` when the device is not (an AF_XDP device is
/// created and used on its worker's thread).
pub struct Engine<D: EngineDevice> {
    device: D,
    iface: Interface,
    sockets: SocketSet<'static>,
    config: EngineConfig,
    endpoints: Vec<Endpoint>,
    half_open: Vec<HalfOpen>,
    conns: BTreeMap<ConnId, Conn>,
    lingering: Vec<Lingering>,
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

/// States in which the peer's FIN has been received.
fn fin_received(state: State) -> bool {
    matches!(
        state,
        State::CloseWait | State::LastAck | State::Closing | State::TimeWait
    )
}

impl<D: EngineDevice> Engine<D> {
    /// Builds the interface and arms the listeners.
    pub fn new(mut device: D, config: EngineConfig) -> Result<Self, EngineError> {
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
        let epoch = std::time::Instant::now();
        let mut iface_config = Config::new(HardwareAddress::Ip);
        // Seeds initial sequence numbers; it only needs to differ between runs.
        iface_config.random_seed = std::hash::RandomState::new().build_hasher().finish();
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

        let mut engine = Self {
            device,
            iface,
            sockets: SocketSet::new(Vec::new()),
            endpoints: config
                .listen
                .iter()
                .map(|&addr| Endpoint {
                    addr,
                    listeners: Vec::new(),
                })
                .collect(),
            ports: PortAllocator::new(config.ports),
            config,
            half_open: Vec::new(),
            conns: BTreeMap::new(),
            lingering: Vec::new(),
            next_id: 1,
            epoch,
            now: epoch,
            counters: EngineCounters::default(),
        };
        for index in 0..engine.endpoints.len() {
            engine.top_up(index);
        }
        Ok(engine)
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
        socket
    }

    /// Sockets that count against `max_connections`.
    fn load(&self) -> usize {
        self.conns.len() + self.half_open.len() + self.lingering.len()
    }

    /// Arms listeners on endpoint `index` up to the pool size, within the connection bound.
    fn top_up(&mut self, index: usize) {
        let Some(endpoint) = self.endpoints.get(index) else {
            return;
        };
        let addr = endpoint.addr;
        let mut missing = self
            .config
            .listeners_per_endpoint
            .saturating_sub(endpoint.listeners.len());
        while missing > 0 && self.load() < self.config.max_connections {
            let mut socket = self.new_socket();
            let listen = IpListenEndpoint {
                addr: Some(IpAddress::Ipv4(*addr.ip())),
                port: addr.port(),
            };
            if socket.listen(listen).is_err() {
                // Port 0: nothing can ever connect there.
                return;
            }
            let handle = self.sockets.add(socket);
            self.endpoints[index].listeners.push(handle);
            missing -= 1;
        }
    }

    /// Starts accepting connections to `addr` too (no-op when already listening).
    pub fn listen(&mut self, addr: SocketAddrV4) {
        if self.endpoints.iter().any(|e| e.addr == addr) {
            return;
        }
        self.endpoints.push(Endpoint {
            addr,
            listeners: Vec::new(),
        });
        self.top_up(self.endpoints.len() - 1);
    }

    /// Stops accepting new connections to `addr`. Connections already accepted, and
    /// handshakes under way, go on.
    pub fn unlisten(&mut self, addr: SocketAddrV4) {
        let Some(index) = self.endpoints.iter().position(|e| e.addr == addr) else {
            return;
        };
        let endpoint = self.endpoints.remove(index);
        for handle in endpoint.listeners {
            self.sockets.remove(handle);
        }
        // Half-open sockets name endpoints by index: re-point or orphan them.
        for half in &mut self.half_open {
            if half.endpoint == index {
                half.endpoint = usize::MAX;
            } else if half.endpoint > index && half.endpoint != usize::MAX {
                half.endpoint -= 1;
            }
        }
    }

    fn alloc_id(&mut self) -> ConnId {
        let id = ConnId(self.next_id);
        self.next_id += 1;
        id
    }

    /// Takes in up to `rx_budget` frames, sends what the sockets have to send, pushes it
    /// out, and appends what happened to `events`. Returns whether anything was done (a
    /// caller with nothing to do may then sleep; see [`Engine::poll_delay`]).
    pub fn poll(&mut self, now: std::time::Instant, events: &mut Vec<EngineEvent>) -> bool {
        let ts = self.timestamp(now);
        self.now = self.now.max(now);
        let before = events.len();
        let mut active = false;
        self.iface.poll_maintenance(ts);
        // smoltcp hands each segment to the first socket that accepts it, scanning the whole
        // socket set per packet. With many connections per worker, this is where a 4-tuple
        // → socket map (and a per-endpoint listener lookup) would dispatch instead; it would
        // also stop a retransmitted SYN from reaching a fresh listener ahead of the
        // half-open socket that already answered it.
        for _ in 0..self.config.rx_budget {
            match self
                .iface
                .poll_ingress_single(ts, &mut self.device, &mut self.sockets)
            {
                PollIngressSingleResult::None => break,
                _ => active = true,
            }
            if self.device.take_syn_seen() {
                self.rearm_listeners();
            }
        }
        // Each egress round lets every socket emit at most one segment: repeat until quiet.
        // The bound only guards against a device that accepts frames forever.
        for _ in 0..4096 {
            match self
                .iface
                .poll_egress(ts, &mut self.device, &mut self.sockets)
            {
                PollResult::None => break,
                PollResult::SocketStateChanged => active = true,
            }
        }
        self.device.flush();
        self.collect(events);
        // Readable is repeated while bytes wait; it alone is not news, so a caller that
        // cannot drain right now may still sleep until the next frame or timer.
        active
            || events[before..]
                .iter()
                .any(|e| !matches!(e, EngineEvent::Readable { .. }))
    }

    /// How long the caller may sleep before the next poll is due (retransmissions, delayed
    /// ACKs, TIME-WAIT), when no frame arrives first. `None`: no timer is pending.
    pub fn poll_delay(&mut self, now: std::time::Instant) -> Option<Duration> {
        let ts = self.timestamp(now);
        let smol = self
            .iface
            .poll_delay(ts, &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()));
        let time_wait = self
            .lingering
            .iter()
            .filter(|l| self.sockets.get::<tcp::Socket>(l.handle).state() == State::TimeWait)
            .map(|l| (l.since + self.config.time_wait).saturating_duration_since(now))
            .min();
        match (smol, time_wait) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Turns socket state into events, re-arms listeners and frees finished sockets.
    fn collect(&mut self, events: &mut Vec<EngineEvent>) {
        self.collect_listeners();
        self.collect_half_open(events);
        self.collect_conns(events);
        self.collect_lingering();
        for index in 0..self.endpoints.len() {
            self.top_up(index);
        }
    }

    /// Replaces listeners that took a SYN. Cheap enough to run after every SYN: it looks
    /// at the listening sockets only (smoltcp itself scans every socket per frame).
    fn rearm_listeners(&mut self) {
        self.collect_listeners();
        for index in 0..self.endpoints.len() {
            self.top_up(index);
        }
    }

    fn collect_listeners(&mut self) {
        let mut taken = Vec::new();
        for (index, endpoint) in self.endpoints.iter_mut().enumerate() {
            let sockets = &self.sockets;
            endpoint.listeners.retain(|&handle| {
                if sockets.get::<tcp::Socket>(handle).state() == State::Listen {
                    return true;
                }
                taken.push((handle, index));
                false
            });
        }
        for (handle, endpoint) in taken {
            if self.is_duplicate(handle) {
                // A retransmitted SYN of a connection that already has a socket reached a
                // listener that sits before that socket in smoltcp's scan order. Answering
                // it would send the client a second SYN-ACK from a second socket: one of
                // the two then hangs half-open until it times out, or the client's ACK
                // reaches the wrong one and the connection is reset. smoltcp has not
                // answered yet (a SYN is answered on egress), so dropping the socket drops
                // the duplicate silently; the original socket retransmits its SYN-ACK.
                self.sockets.remove(handle);
                self.counters.duplicate_syn += 1;
                continue;
            }
            self.half_open.push(HalfOpen { handle, endpoint });
        }
    }

    /// Whether another live half-open or accepted socket has `handle`'s 4-tuple. Linear,
    /// and only run per connection request; a 4-tuple map would make it O(1).
    fn is_duplicate(&self, handle: SocketHandle) -> bool {
        let socket = self.sockets.get::<tcp::Socket>(handle);
        let tuple = (socket.local_endpoint(), socket.remote_endpoint());
        if tuple.1.is_none() {
            return false;
        }
        let same = |other: SocketHandle| {
            let s = self.sockets.get::<tcp::Socket>(other);
            other != handle
                && s.state() != State::Closed
                && (s.local_endpoint(), s.remote_endpoint()) == tuple
        };
        self.half_open.iter().any(|h| same(h.handle)) || self.conns.values().any(|c| same(c.handle))
    }

    fn collect_half_open(&mut self, events: &mut Vec<EngineEvent>) {
        let mut index = 0;
        while index < self.half_open.len() {
            let HalfOpen { handle, endpoint } = self.half_open[index];
            let socket = self.sockets.get::<tcp::Socket>(handle);
            let state = socket.state();
            match state {
                State::SynReceived => index += 1,
                State::Listen => {
                    // The handshake was reset: the socket listens again; keep it if the
                    // pool has room.
                    self.half_open.swap_remove(index);
                    self.counters.half_open_failed += 1;
                    match self.endpoints.get_mut(endpoint) {
                        Some(e) if e.listeners.len() < self.config.listeners_per_endpoint => {
                            e.listeners.push(handle);
                        }
                        // Pool full, or the endpoint is no longer listened on.
                        _ => {
                            self.sockets.remove(handle);
                        }
                    }
                }
                State::Closed => {
                    self.half_open.swap_remove(index);
                    self.counters.half_open_failed += 1;
                    self.lingering.push(Lingering {
                        handle,
                        port: None,
                        since: self.now,
                    });
                }
                _ => {
                    self.half_open.swap_remove(index);
                    let (Some(local), Some(remote)) = (
                        socket.local_endpoint().and_then(v4),
                        socket.remote_endpoint().and_then(v4),
                    ) else {
                        // Not IPv4: cannot happen with this feature set; drop it quietly.
                        self.sockets.get_mut::<tcp::Socket>(handle).abort();
                        self.lingering.push(Lingering {
                            handle,
                            port: None,
                            since: self.now,
                        });
                        continue;
                    };
                    let conn = self.alloc_id();
                    self.counters.accepted += 1;
                    events.push(EngineEvent::Accepted {
                        conn,
                        local,
                        remote,
                    });
                    // `last` stays Established so that a FIN or RST already processed is
                    // reported by the connection pass right after this one.
                    self.conns.insert(
                        conn,
                        Conn {
                            handle,
                            port: None,
                            established: true,
                            last: State::Established,
                            want_write: false,
                            peer_closed: false,
                        },
                    );
                }
            }
        }
    }

    fn collect_conns(&mut self, events: &mut Vec<EngineEvent>) {
        let mut finished = Vec::new();
        for (&id, conn) in self.conns.iter_mut() {
            let socket = self.sockets.get::<tcp::Socket>(conn.handle);
            let state = socket.state();
            if !conn.established {
                match state {
                    State::SynSent | State::SynReceived => {
                        conn.last = state;
                        continue;
                    }
                    State::Closed | State::TimeWait | State::Listen => {
                        self.counters.refused += 1;
                        events.push(EngineEvent::Refused { conn: id });
                        finished.push(id);
                        continue;
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
                || (state == State::Closed
                    && matches!(conn.last, State::LastAck | State::TimeWait));
            if unread == 0 && !conn.peer_closed && (fin_received(state) || graceful) {
                conn.peer_closed = true;
                events.push(EngineEvent::PeerClosed { conn: id });
            }
            if state == State::Closed || state == State::TimeWait {
                if graceful {
                    // Bytes the caller has not read yet are still delivered first. `last`
                    // is left alone so the close is still seen as clean next time.
                    if unread > 0 {
                        continue;
                    }
                    self.counters.closed += 1;
                    events.push(EngineEvent::Closed { conn: id });
                } else {
                    self.counters.reset += 1;
                    events.push(EngineEvent::Reset { conn: id });
                }
                finished.push(id);
                continue;
            }
            conn.last = state;
        }
        for id in finished {
            if let Some(conn) = self.conns.remove(&id) {
                self.lingering.push(Lingering {
                    handle: conn.handle,
                    port: conn.port,
                    since: self.now,
                });
            }
        }
    }

    /// Frees sockets smoltcp is done with (closed, with no RST left to send) and those
    /// that have spent the configured TIME-WAIT.
    fn collect_lingering(&mut self) {
        let sockets = &mut self.sockets;
        let ports = &mut self.ports;
        let now = self.now;
        let time_wait = self.config.time_wait;
        self.lingering.retain(|entry| {
            let socket = sockets.get::<tcp::Socket>(entry.handle);
            let done = match socket.state() {
                State::Closed => socket.remote_endpoint().is_none(),
                State::TimeWait => now.saturating_duration_since(entry.since) >= time_wait,
                _ => false,
            };
            if done {
                sockets.remove(entry.handle);
                if let Some(port) = entry.port {
                    ports.release(port);
                }
            }
            !done
        });
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
        let mut socket = self.new_socket();
        let local = IpEndpoint::new(IpAddress::Ipv4(self.config.own_addr), port);
        let target = IpEndpoint::new(IpAddress::Ipv4(*remote.ip()), remote.port());
        if socket.connect(self.iface.context(), target, local).is_err() {
            self.ports.release(port);
            return Err(EngineError::Unaddressable(remote));
        }
        let handle = self.sockets.add(socket);
        let conn = self.alloc_id();
        self.conns.insert(
            conn,
            Conn {
                handle,
                port: Some(port),
                established: false,
                last: State::SynSent,
                want_write: false,
                peer_closed: false,
            },
        );
        Ok(conn)
    }

    fn conn(&self, conn: ConnId) -> Result<&Conn, EngineError> {
        self.conns
            .get(&conn)
            .ok_or(EngineError::UnknownConnection(conn))
    }

    /// Reads up to `buf.len()` bytes. `Ok(0)`: nothing buffered right now (or the peer
    /// finished, which [`EngineEvent::PeerClosed`] reports).
    pub fn recv(&mut self, conn: ConnId, buf: &mut [u8]) -> Result<usize, EngineError> {
        let handle = self.conn(conn)?.handle;
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        // Errors mean "nothing to read in this state", which is what 0 says.
        Ok(socket.recv_slice(buf).unwrap_or(0))
    }

    /// Bytes waiting to be read.
    pub fn recv_queue(&self, conn: ConnId) -> Result<usize, EngineError> {
        let handle = self.conn(conn)?.handle;
        Ok(self.sockets.get::<tcp::Socket>(handle).recv_queue())
    }

    /// Queues as much of `data` as the send buffer takes and returns how much that was.
    /// When it is less than `data.len()`, [`EngineEvent::Writable`] reports the room.
    pub fn send(&mut self, conn: ConnId, data: &[u8]) -> Result<usize, EngineError> {
        let entry = self
            .conns
            .get_mut(&conn)
            .ok_or(EngineError::UnknownConnection(conn))?;
        let socket = self.sockets.get_mut::<tcp::Socket>(entry.handle);
        let sent = socket
            .send_slice(data)
            .map_err(|_| EngineError::NotWritable(conn))?;
        if sent < data.len() {
            entry.want_write = true;
        }
        Ok(sent)
    }

    /// Room in the send buffer right now.
    pub fn send_space(&self, conn: ConnId) -> Result<usize, EngineError> {
        let handle = self.conn(conn)?.handle;
        let socket = self.sockets.get::<tcp::Socket>(handle);
        if !socket.may_send() {
            return Ok(0);
        }
        Ok(socket.send_capacity() - socket.send_queue())
    }

    /// Bytes queued for sending and not yet acknowledged by the peer.
    pub fn send_queue(&self, conn: ConnId) -> Result<usize, EngineError> {
        let handle = self.conn(conn)?.handle;
        Ok(self.sockets.get::<tcp::Socket>(handle).send_queue())
    }

    /// The connection's local and remote endpoints.
    pub fn endpoints(&self, conn: ConnId) -> Result<(SocketAddrV4, SocketAddrV4), EngineError> {
        let handle = self.conn(conn)?.handle;
        let socket = self.sockets.get::<tcp::Socket>(handle);
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
        let entry = self
            .conns
            .get_mut(&conn)
            .ok_or(EngineError::UnknownConnection(conn))?;
        let socket = self.sockets.get_mut::<tcp::Socket>(entry.handle);
        socket.close();
        let state = socket.state();
        // Record our own transition, so the next poll does not mistake e.g. LAST-ACK →
        // CLOSED for a reset.
        entry.last = state;
        if state == State::Closed {
            // Closing before the handshake finished drops the connection outright.
            if let Some(entry) = self.conns.remove(&conn) {
                self.lingering.push(Lingering {
                    handle: entry.handle,
                    port: entry.port,
                    since: self.now,
                });
            }
        }
        Ok(())
    }

    /// Resets the connection (RST) and forgets it: no more events for this id.
    pub fn abort(&mut self, conn: ConnId) -> Result<(), EngineError> {
        let entry = self
            .conns
            .remove(&conn)
            .ok_or(EngineError::UnknownConnection(conn))?;
        self.sockets.get_mut::<tcp::Socket>(entry.handle).abort();
        self.lingering.push(Lingering {
            handle: entry.handle,
            port: entry.port,
            since: self.now,
        });
        Ok(())
    }

    /// Connections the caller can name.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Sockets the caller no longer names that smoltcp still holds (TIME-WAIT, an RST to
    /// send).
    pub fn lingering(&self) -> usize {
        self.lingering.len()
    }

    /// Handshakes under way (SYN received, not yet accepted).
    pub fn half_open(&self) -> usize {
        self.half_open.len()
    }

    /// Listening sockets armed right now, over all endpoints.
    pub fn listeners(&self) -> usize {
        self.endpoints.iter().map(|e| e.listeners.len()).sum()
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
mod tests;
