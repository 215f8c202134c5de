//! One relay worker: a single-threaded mio event loop that owns its listeners, every
//! socket of its sessions and one replication [`Manager`], and carries out the core's I/O
//! contract (see the `ncp_replication` crate docs) with kernel TCP sockets.
//!
//! A turn of the loop: wait for readiness or the next timer; note which sockets became
//! readable/writable; for every session that was touched, move bytes until nothing moves
//! (bounded, so one busy session cannot starve the others); run due timers; expire
//! lingering sockets; publish counters now and then.
//!
//! Recording (a service's `record`, the offline asynchronous mode): the session's
//! recording is opened in [`Worker::admit`]; every read the core accepts from the client
//! (and from the primary, if the service records responses) is handed to the recorder in
//! [`Worker::fill`] right after `on_data`, so the file holds exactly the stream the
//! primary and replicas are given, in order; [`Worker::finish`] ends it as closed or
//! aborted. The recorder's handle only ever `try_send`s into a bounded queue: a recorder
//! that falls behind loses the session's recording (counted), never the worker's time.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, VecDeque},
    io::{self, Read as _, Write as _},
    net::{Shutdown, SocketAddr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use mio::{Events, Interest, Poll, Token, event::Event, net::TcpStream};
use ncp_replication::{Action, Manager, ManagerConfig, Refusal, SessionConfig, SessionId, Side};

use super::{
    conn::{self, Conn, Listener, Role, Slab, SourceBinding},
    stats::{PUBLISH_INTERVAL, ServiceStats, SocketsStats, StatsHandle},
};
use crate::{
    offline::recorder::{RecId, RecordHandle},
    rules::Ipv4Prefix,
};

/// Tokens from here up are listeners (service index added); below are connection slots.
const LISTENER_TOKEN_BASE: usize = usize::MAX / 2;
/// Bytes read from a socket per `read` call.
const READ_CHUNK: usize = 64 * 1024;
/// Reads per side per round, and rounds per session per turn: at most
/// `READS_PER_SIDE * ROUNDS_PER_TURN * READ_CHUNK` (4 MiB) from one side before the
/// other sessions get their turn.
const READS_PER_SIDE: usize = 4;
const ROUNDS_PER_TURN: usize = 16;
/// Connections accepted per listener per turn.
const ACCEPTS_PER_TURN: usize = 64;
/// Back-off after an accept error such as running out of file descriptors.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);
/// Longest sleep, so a stop request is seen promptly.
const MAX_SLEEP: Duration = Duration::from_millis(100);
/// At most one `info` line per replica and interval about detaches: a replica that is
/// down is detached from every new session, and the counters already say how often.
const DETACH_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// One configured service as the workers use it.
#[derive(Clone, Debug)]
pub struct ServicePlan {
    pub name: String,
    pub primary: SocketAddrV4,
    pub clients: Ipv4Prefix,
    pub replicas: Vec<SocketAddrV4>,
    pub session: SessionConfig,
    /// Source address and device for replica connections, if the service names one.
    pub replica_source: Option<SourceBinding>,
    pub listen_port: u16,
    /// The service's recorder, if it records its sessions (shared by all workers).
    pub record: Option<RecordHandle>,
}

/// Everything a worker thread starts from.
#[derive(Debug)]
pub struct WorkerSetup {
    pub index: usize,
    pub services: Arc<[ServicePlan]>,
    /// One listener per service, in service order.
    pub listeners: Vec<std::net::TcpListener>,
    pub manager: ManagerConfig,
    /// Most upstream sockets of finished sessions kept draining at once.
    pub max_lingering: usize,
    pub stats: StatsHandle,
}

/// The sockets of one session, by side (slab slots).
struct Entry {
    service: usize,
    client: Option<usize>,
    primary: Option<usize>,
    replicas: Vec<Option<usize>>,
    /// Already in the ready queue.
    queued: bool,
    /// The session's recording, if its service records and the recorder took it.
    record: Option<RecId>,
}

impl Entry {
    fn slot_mut(&mut self, side: Side) -> Option<&mut Option<usize>> {
        match side {
            Side::Client => Some(&mut self.client),
            Side::Primary => Some(&mut self.primary),
            Side::Replica(i) => self.replicas.get_mut(usize::from(i)),
        }
    }

    fn slot(&self, side: Side) -> Option<usize> {
        match side {
            Side::Client => self.client,
            Side::Primary => self.primary,
            Side::Replica(i) => self.replicas.get(usize::from(i)).copied().flatten(),
        }
    }

    fn take(&mut self, side: Side) -> Option<usize> {
        self.slot_mut(side).and_then(Option::take)
    }

    /// Every socket of the session, client first.
    fn sides(&self, out: &mut Vec<(Side, usize)>) {
        out.clear();
        out.extend(self.client.map(|s| (Side::Client, s)));
        out.extend(self.primary.map(|s| (Side::Primary, s)));
        for (i, slot) in (0u16..).zip(&self.replicas) {
            out.extend(slot.map(|s| (Side::Replica(i), s)));
        }
    }
}

/// Runs one worker until `stop` is set, then resets its open sessions.
pub fn run(setup: WorkerSetup, stop: &AtomicBool) -> anyhow::Result<()> {
    let mut worker = Worker::new(setup)?;
    let result = worker.event_loop(stop);
    worker.shutdown();
    worker.publish();
    result
}

struct Worker {
    index: usize,
    poll: Poll,
    services: Arc<[ServicePlan]>,
    listeners: Vec<Listener>,
    conns: Slab,
    sessions: HashMap<SessionId, Entry>,
    manager: Manager,
    /// Finished sessions' counters, refusals and session totals, per service.
    counters: Vec<ServiceStats>,
    /// Sessions with work to do this turn.
    ready: VecDeque<SessionId>,
    lingering: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    lingering_count: usize,
    lingering_discarded: u64,
    max_lingering: usize,
    next_serial: u64,
    scratch: Box<[u8]>,
    sides: Vec<(Side, usize)>,
    /// Per service and replica: when a detach was last logged at `info`, and how many
    /// were only logged at `debug` since.
    detach_log: Vec<Vec<(Option<Instant>, u64)>>,
    stats: StatsHandle,
}

impl Worker {
    fn new(setup: WorkerSetup) -> anyhow::Result<Self> {
        let poll = Poll::new().context("creating the event loop")?;
        let mut listeners = Vec::with_capacity(setup.listeners.len());
        for (service, std_listener) in setup.listeners.into_iter().enumerate() {
            let mut socket = mio::net::TcpListener::from_std(std_listener);
            poll.registry()
                .register(
                    &mut socket,
                    Token(LISTENER_TOKEN_BASE + service),
                    Interest::READABLE,
                )
                .context("registering a listener")?;
            listeners.push(Listener {
                socket,
                service,
                retry_at: None,
            });
        }
        let counters = setup
            .services
            .iter()
            .map(|s| ServiceStats::new(&s.name, s.primary, s.listen_port, &s.replicas))
            .collect();
        let detach_log = setup
            .services
            .iter()
            .map(|s| vec![(None, 0); s.replicas.len()])
            .collect();
        Ok(Self {
            index: setup.index,
            poll,
            services: setup.services,
            listeners,
            conns: Slab::default(),
            sessions: HashMap::new(),
            manager: Manager::new(setup.manager),
            counters,
            ready: VecDeque::new(),
            lingering: BinaryHeap::new(),
            lingering_count: 0,
            lingering_discarded: 0,
            max_lingering: setup.max_lingering,
            next_serial: 0,
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
            sides: Vec::new(),
            detach_log,
            stats: setup.stats,
        })
    }

    fn event_loop(&mut self, stop: &AtomicBool) -> anyhow::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut next_publish = Instant::now();
        let mut touched = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let timeout = self.sleep_time(now, next_publish);
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("waiting for socket events");
            }
            let now = Instant::now();
            for event in &events {
                self.on_event(event, now);
            }
            for k in 0..self.listeners.len() {
                if self.listeners[k].retry_at.is_some_and(|t| t <= now) {
                    self.accept(k, now);
                }
            }
            // Only the sessions queued so far: those re-queued while driving wait for the
            // next turn, after the next poll, so fresh events are never starved.
            for _ in 0..self.ready.len() {
                let Some(id) = self.ready.pop_front() else {
                    break;
                };
                if let Some(entry) = self.sessions.get_mut(&id) {
                    entry.queued = false;
                    self.drive(id, now);
                }
            }
            if self.manager.poll_timeout().is_some_and(|t| t <= now) {
                self.manager.handle_timeout(now, &mut touched);
                for id in touched.drain(..) {
                    self.apply_actions(id, now);
                    self.drive(id, now);
                }
            }
            self.expire_lingering(now);
            if now >= next_publish {
                self.publish();
                next_publish = now + PUBLISH_INTERVAL;
            }
        }
        Ok(())
    }

    fn sleep_time(&self, now: Instant, next_publish: Instant) -> Duration {
        if !self.ready.is_empty() {
            return Duration::ZERO;
        }
        let mut until = (now + MAX_SLEEP).min(next_publish);
        let timers = [
            self.manager.poll_timeout(),
            self.lingering.peek().map(|Reverse((t, _, _))| *t),
        ];
        let retries = self.listeners.iter().map(|l| l.retry_at);
        for t in timers.into_iter().chain(retries).flatten() {
            until = until.min(t);
        }
        until.saturating_duration_since(now)
    }

    fn on_event(&mut self, event: &Event, now: Instant) {
        let token = event.token().0;
        if token >= LISTENER_TOKEN_BASE {
            self.accept(token - LISTENER_TOKEN_BASE, now);
            return;
        }
        let Some(conn) = self.conns.get_mut(token) else {
            return; // closed earlier in this turn
        };
        // Errors and hang-ups surface through read/write, so they count as readiness.
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            conn.readable = true;
        }
        if event.is_writable() || event.is_write_closed() || event.is_error() {
            conn.writable = true;
        }
        match conn.role {
            Role::Lingering { .. } => self.drain_lingering(token),
            Role::Session { id, side } => {
                if !conn.connected {
                    if conn.writable {
                        self.finish_connect(id, side, token, now);
                    }
                } else if event.is_error() {
                    // Learn about a reset now even if the core's window keeps us from
                    // reading this side.
                    if let Ok(Some(e)) = conn.stream.take_error() {
                        self.lost(id, side, token, &e, now);
                    }
                }
                self.mark(id);
            }
        }
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

    fn accept(&mut self, k: usize, now: Instant) {
        let Some(listener) = self.listeners.get_mut(k) else {
            return;
        };
        listener.retry_at = None;
        let service = listener.service;
        for _ in 0..ACCEPTS_PER_TURN {
            let Some(listener) = self.listeners.get(k) else {
                return;
            };
            match listener.socket.accept() {
                Ok((stream, peer)) => self.admit(service, stream, peer, now),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    tracing::warn!(error = %e, service = %self.services[service].name, "accept failed; retrying shortly");
                    if let Some(l) = self.listeners.get_mut(k) {
                        l.retry_at = Some(now + ACCEPT_RETRY);
                    }
                    return;
                }
            }
        }
        // Budget used up: more may be queued, and no new edge will say so.
        if let Some(l) = self.listeners.get_mut(k) {
            l.retry_at = Some(now);
        }
    }

    /// A new client connection: admit it as a session or reset it.
    fn admit(&mut self, service: usize, stream: TcpStream, peer: SocketAddr, now: Instant) {
        let plan = &self.services[service];
        let allowed = match peer {
            SocketAddr::V4(p) => plan.clients.contains(*p.ip()),
            SocketAddr::V6(_) => false,
        };
        if !allowed {
            tracing::debug!(%peer, service = %plan.name, "connection from outside the clients prefix reset");
            self.counters[service].refused.not_a_client += 1;
            conn::abort(stream);
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
                tracing::debug!(%peer, service = %plan.name, %refusal, "client reset");
                conn::abort(stream);
                return;
            }
        };
        self.counters[service].sessions_total += 1;
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY on a client connection");
        }
        let replicas = vec![None; plan.replicas.len()];
        tracing::debug!(session = %id, %peer, service = %plan.name, "session opened");
        let Some(slot) = self.add_conn(
            stream,
            Role::Session {
                id,
                side: Side::Client,
            },
            true,
        ) else {
            self.manager.remove(id);
            return;
        };
        if let Some(c) = self.conns.get_mut(slot) {
            // Bytes may have arrived before the socket was registered; the first read or
            // write finds out (a spurious attempt just returns WouldBlock).
            c.readable = true;
            c.writable = true;
        }
        let plan = &self.services[service];
        let record = plan.record.as_ref().and_then(|handle| match peer {
            SocketAddr::V4(client) => handle.open_replicated(&plan.name, client, plan.primary),
            SocketAddr::V6(_) => None, // refused above; keeps the match total
        });
        self.sessions.insert(
            id,
            Entry {
                service,
                client: Some(slot),
                primary: None,
                replicas,
                queued: false,
                record,
            },
        );
        self.apply_actions(id, now);
        self.mark(id);
    }

    /// Registers a socket for read and write readiness; `None` (socket closed) on failure.
    fn add_conn(&mut self, stream: TcpStream, role: Role, connected: bool) -> Option<usize> {
        let serial = self.next_serial;
        self.next_serial += 1;
        // The token is the slot, so the socket goes into the slab first and is registered
        // from there.
        let slot = self
            .conns
            .insert(Conn::new(stream, serial, role, connected));
        let registered = match self.conns.get_mut(slot) {
            Some(c) => self.poll.registry().register(
                &mut c.stream,
                Token(slot),
                Interest::READABLE | Interest::WRITABLE,
            ),
            None => return None,
        };
        if let Err(e) = registered {
            tracing::warn!(error = %e, "registering a socket failed; closing it");
            if let Some(c) = self.conns.remove(slot) {
                conn::abort(c.stream);
            }
            return None;
        }
        Some(slot)
    }
}

impl Worker {
    /// A connecting upstream socket became writable: the handshake is over either way.
    fn finish_connect(&mut self, id: SessionId, side: Side, slot: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        match conn::connect_result(&conn.stream) {
            Ok(true) => {
                conn.connected = true;
                if let Some(mut s) = self.manager.session_mut(id) {
                    log_misuse(id, s.on_connected(side, now));
                }
                tracing::debug!(session = %id, ?side, "upstream connected");
            }
            // Spurious wakeup: wait for the next edge.
            Ok(false) => conn.writable = false,
            Err(e) => {
                tracing::debug!(session = %id, ?side, error = %e, "upstream connection failed");
                self.forget(id, side, slot);
                if let Some(mut s) = self.manager.session_mut(id) {
                    log_misuse(id, s.on_refused(side, now));
                }
            }
        }
        self.apply_actions(id, now);
    }

    /// An established connection died (RST, fatal error): the socket is gone, the core is
    /// told, and no `Reset` action will follow for it.
    fn lost(&mut self, id: SessionId, side: Side, slot: usize, error: &io::Error, now: Instant) {
        tracing::debug!(session = %id, ?side, %error, "connection lost");
        self.forget(id, side, slot);
        if let Some(mut s) = self.manager.session_mut(id) {
            log_misuse(id, s.on_reset(side, now));
        }
        self.apply_actions(id, now);
    }

    /// Drops a dead socket and its place in the session.
    fn forget(&mut self, id: SessionId, side: Side, slot: usize) {
        if let Some(entry) = self.sessions.get_mut(&id)
            && entry.slot(side) == Some(slot)
        {
            entry.take(side);
        }
        if let Some(mut c) = self.conns.remove(slot) {
            let _ = self.poll.registry().deregister(&mut c.stream);
        }
    }

    /// Moves bytes for one session until nothing moves or its turn is used up.
    fn drive(&mut self, id: SessionId, now: Instant) {
        let mut sides = std::mem::take(&mut self.sides);
        for _ in 0..ROUNDS_PER_TURN {
            let Some(entry) = self.sessions.get(&id) else {
                break;
            };
            entry.sides(&mut sides);
            let mut moved = false;
            for &(side, slot) in &sides {
                moved |= self.flush(id, side, slot, now);
                moved |= self.fill(id, side, slot, now);
            }
            self.apply_actions(id, now);
            if !moved {
                self.sides = sides;
                return;
            }
        }
        self.sides = sides;
        // Still busy: let the other sessions have a turn first.
        self.mark(id);
    }

    /// Writes what the core has pending for `side`. Returns whether anything happened.
    fn flush(&mut self, id: SessionId, side: Side, slot: usize, now: Instant) -> bool {
        let Some(conn) = self.conns.get_mut(slot) else {
            return false;
        };
        if !conn.is(id, side) || !conn.connected || !conn.writable || conn.write_shut {
            return false;
        }
        let Some(mut s) = self.manager.session_mut(id) else {
            return false;
        };
        let mut moved = false;
        let mut failed = None;
        loop {
            let pending = s.pending(side);
            if pending.is_empty() {
                break;
            }
            match conn.stream.write(pending) {
                Ok(0) => {
                    conn.writable = false;
                    break;
                }
                Ok(n) => {
                    moved = true;
                    if let Err(e) = s.on_sent(side, n, now) {
                        log_misuse::<()>(id, Err(e));
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    conn.writable = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        drop(s);
        if let Some(e) = failed {
            self.lost(id, side, slot, &e, now);
            moved = true;
        }
        moved
    }

    /// Reads from `side` as far as the core's window allows. Returns whether anything
    /// happened.
    fn fill(&mut self, id: SessionId, side: Side, slot: usize, now: Instant) -> bool {
        let Some(conn) = self.conns.get_mut(slot) else {
            return false;
        };
        if !conn.is(id, side) || !conn.connected || !conn.readable || conn.read_eof {
            return false;
        }
        let Some(mut s) = self.manager.session_mut(id) else {
            return false;
        };
        // The session's recording, if it has one; the handle decides which sides' bytes
        // belong in it.
        let record = self.sessions.get(&id).and_then(|e| {
            let rec = e.record.as_ref()?;
            let handle = self.services.get(e.service)?.record.as_ref()?;
            Some((handle, rec))
        });
        let mut moved = false;
        let mut failed = None;
        for _ in 0..READS_PER_SIDE {
            // Client and primary: never read more than the core takes, so the rest waits
            // in the kernel and TCP flow control pushes back on the sender. Replicas: the
            // window is unbounded and everything is dropped.
            let window = s.receive_window(side);
            if window == 0 {
                break; // `readable` stays set: read again when the window reopens
            }
            let want = window.min(self.scratch.len());
            let Some(buf) = self.scratch.get_mut(..want) else {
                break;
            };
            match conn.stream.read(buf) {
                Ok(0) => {
                    conn.read_eof = true;
                    conn.readable = false;
                    moved = true;
                    log_misuse(id, s.on_fin(side, now));
                    break;
                }
                Ok(n) => {
                    moved = true;
                    let data = buf.get(..n).unwrap_or_default();
                    let result = s.on_data(side, data, now);
                    // Exactly what the core took, in the order it took it (a short take
                    // ends the session below; its prefix is still part of the stream).
                    if let (Ok(taken), Some((handle, rec))) = (&result, record) {
                        let accepted = data.get(..*taken).unwrap_or_default();
                        handle.accepted(rec, side, accepted, SystemTime::now());
                    }
                    match result {
                        Ok(taken) if taken == n => {}
                        Ok(taken) => {
                            // Cannot happen while the window is respected; if it did, the
                            // stream would have a hole, so end the session instead.
                            tracing::error!(session = %id, ?side, n, taken, "core took less than its window; resetting the session");
                            failed = Some(io::Error::other("replication core refused bytes"));
                            break;
                        }
                        Err(e) => {
                            log_misuse::<()>(id, Err(e));
                            break;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    conn.readable = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        drop(s);
        if let Some(e) = failed {
            if let Some(c) = self.conns.get_mut(slot) {
                // Make sure the peer learns the stream is broken.
                let _ = socket2::SockRef::from(&c.stream).set_linger(Some(Duration::ZERO));
            }
            self.lost(id, side, slot, &e, now);
            moved = true;
        }
        moved
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
            match action {
                Action::Connect(side) => self.connect(id, side, now),
                Action::Close(side) => {
                    let slot = self.sessions.get(&id).and_then(|e| e.slot(side));
                    if let Some(c) = slot.and_then(|slot| self.conns.get_mut(slot)) {
                        c.write_shut = true;
                        if let Err(e) = c.stream.shutdown(Shutdown::Write) {
                            // Typically the peer is already gone; the read side will say so.
                            tracing::debug!(session = %id, ?side, error = %e, "shutdown failed");
                        }
                    }
                }
                Action::Reset(side) => self.reset(id, side),
                Action::Detached { replica, reason } => {
                    let Some(service) = self.sessions.get(&id).map(|e| e.service) else {
                        continue;
                    };
                    let plan = &self.services[service];
                    let address = plan.replicas.get(usize::from(replica));
                    let log = self
                        .detach_log
                        .get_mut(service)
                        .and_then(|l| l.get_mut(usize::from(replica)));
                    match log {
                        Some((last, quiet))
                            if last
                                .is_none_or(|t| now.duration_since(t) >= DETACH_LOG_INTERVAL) =>
                        {
                            tracing::info!(session = %id, service = %plan.name, replica, address = ?address, ?reason, since_last_logged = *quiet, "replica detached");
                            *last = Some(now);
                            *quiet = 0;
                        }
                        Some((_, quiet)) => {
                            *quiet += 1;
                            tracing::debug!(session = %id, service = %plan.name, replica, ?reason, "replica detached");
                        }
                        None => {}
                    }
                    if let Some(r) = self.counters[service]
                        .replicas
                        .get_mut(usize::from(replica))
                    {
                        r.detached.record(reason);
                    }
                    self.reset(id, Side::Replica(replica));
                }
                Action::Finished => {
                    self.finish(id, now);
                    return;
                }
            }
        }
    }

    /// Starts the connection to an upstream; an immediate failure is reported to the core
    /// as a refusal (its actions are then drained by the caller's loop).
    fn connect(&mut self, id: SessionId, side: Side, now: Instant) {
        let Some(service) = self.sessions.get(&id).map(|e| e.service) else {
            return;
        };
        let plan = &self.services[service];
        let (to, from) = match side {
            Side::Primary => (Some(plan.primary), None),
            Side::Replica(i) => (
                plan.replicas.get(usize::from(i)).copied(),
                plan.replica_source.as_ref(),
            ),
            Side::Client => (None, None),
        };
        let Some(to) = to else {
            tracing::error!(session = %id, ?side, "core asked to connect a side that has no address");
            return;
        };
        let started = conn::connect(to, from).map_err(|e| {
            tracing::debug!(session = %id, ?side, %to, error = %e, "connect failed at once");
        });
        let slot = started
            .ok()
            .and_then(|stream| self.add_conn(stream, Role::Session { id, side }, false));
        match slot {
            Some(slot) => {
                if let Some(e) = self.sessions.get_mut(&id)
                    && let Some(place) = e.slot_mut(side)
                {
                    *place = Some(slot);
                }
            }
            None => {
                if let Some(mut s) = self.manager.session_mut(id) {
                    log_misuse(id, s.on_refused(side, now));
                }
            }
        }
    }

    /// Aborts `side`'s connection with a RST, if it still has one.
    fn reset(&mut self, id: SessionId, side: Side) {
        let slot = self.sessions.get_mut(&id).and_then(|e| e.take(side));
        if let Some(mut c) = slot.and_then(|slot| self.conns.remove(slot)) {
            let _ = self.poll.registry().deregister(&mut c.stream);
            conn::abort(c.stream);
        }
    }

    /// The session is over: release its sockets, fold its counters, end its recording,
    /// forget it.
    fn finish(&mut self, id: SessionId, now: Instant) {
        let Some(mut entry) = self.sessions.remove(&id) else {
            return;
        };
        let record = entry.record.take();
        let linger_until = now + self.services[entry.service].session.drain_timeout;
        let mut sides = Vec::new();
        entry.sides(&mut sides);
        for (side, slot) in sides {
            let Some(c) = self.conns.get_mut(slot) else {
                continue;
            };
            // An upstream that got our FIN may still be answering; closing it with unread
            // bytes would send a RST that can destroy what it has not processed yet.
            let still_talking = side != Side::Client && c.connected && c.write_shut && !c.read_eof;
            if still_talking && self.lingering_count < self.max_lingering {
                c.role = Role::Lingering {
                    until: linger_until,
                };
                self.lingering.push(Reverse((linger_until, slot, c.serial)));
                self.lingering_count += 1;
                self.drain_lingering(slot);
            } else if let Some(mut c) = self.conns.remove(slot) {
                let _ = self.poll.registry().deregister(&mut c.stream);
                drop(c); // orderly close where a FIN was sent; otherwise whatever is due
            }
        }
        let stats = self.manager.remove(id);
        if let Some(stats) = &stats {
            self.counters[entry.service].add_session(stats);
        }
        if let (Some(rec), Some(handle)) = (record, &self.services[entry.service].record) {
            handle.end(rec, stats.as_ref());
        }
        tracing::debug!(session = %id, service = %self.services[entry.service].name, "session finished");
    }

    /// Reads and discards what a lingering socket has; closes it at the peer's FIN.
    fn drain_lingering(&mut self, slot: usize) {
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        let mut done = false;
        // Bounded: a peer that keeps talking is cut off by the deadline instead.
        for _ in 0..READS_PER_SIDE * ROUNDS_PER_TURN {
            match c.stream.read(&mut self.scratch) {
                Ok(0) => {
                    done = true;
                    break;
                }
                Ok(n) => self.lingering_discarded += n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    done = true;
                    break;
                }
            }
        }
        if done {
            self.close_lingering(slot);
        }
    }

    fn close_lingering(&mut self, slot: usize) {
        if let Some(mut c) = self.conns.remove(slot) {
            let _ = self.poll.registry().deregister(&mut c.stream);
            self.lingering_count = self.lingering_count.saturating_sub(1);
        }
    }

    fn expire_lingering(&mut self, now: Instant) {
        while let Some(Reverse((until, slot, serial))) = self.lingering.peek().copied() {
            if until > now {
                break;
            }
            self.lingering.pop();
            let current = self
                .conns
                .get_mut(slot)
                .is_some_and(|c| c.serial == serial && matches!(c.role, Role::Lingering { .. }));
            if current {
                tracing::debug!(slot, "lingering upstream closed at its deadline");
                self.close_lingering(slot);
            }
        }
    }

    /// Stop: every open session is reset on all sides, lingering sockets are closed.
    fn shutdown(&mut self) {
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
                for (_, slot) in sides {
                    if let Some(mut c) = self.conns.remove(slot) {
                        let _ = self.poll.registry().deregister(&mut c.stream);
                        conn::abort(c.stream);
                    }
                }
                if let Some(stats) = self.manager.remove(id) {
                    self.counters[entry.service].add_session(&stats);
                }
            }
        }
        let slots: Vec<usize> = self.conns.slots().collect();
        for slot in slots {
            self.close_lingering(slot);
        }
        self.lingering.clear();
        if open > 0 {
            tracing::info!(
                worker = self.index,
                sessions = open,
                "open sessions reset at stop"
            );
        }
    }

    /// Builds this worker's snapshot and hands it to the stats handle.
    fn publish(&self) {
        let mut services = self.counters.clone();
        let mut buffered = 0;
        for (id, entry) in &self.sessions {
            let (Some(s), Some(svc)) = (self.manager.session(*id), services.get_mut(entry.service))
            else {
                continue;
            };
            buffered += svc.add_live_session(s);
        }
        let metrics = self.manager.metrics();
        let snapshot = SocketsStats {
            workers: 1,
            sessions_active: self.sessions.len() as u64,
            sessions_total: services.iter().map(|s| s.sessions_total).sum(),
            sessions_refused: services.iter().map(|s| s.refused.total()).sum(),
            memory_reserved_bytes: metrics.memory_reserved_bytes,
            memory_buffered_bytes: buffered,
            lingering_sockets: self.lingering_count as u64,
            lingering_bytes_discarded: self.lingering_discarded,
            services,
        };
        self.stats.publish(self.index, snapshot);
    }
}

/// Errors from the core mean the I/O layer broke the contract; they change nothing in the
/// session, so log them loudly and carry on.
fn log_misuse<T>(id: SessionId, result: Result<T, ncp_replication::Error>) {
    if let Err(e) = result {
        tracing::error!(session = %id, error = %e, "replication core rejected an input");
    }
}

#[cfg(test)]
mod tests {
    //! The event loop on loopback, without nftables: clients connect to the listener
    //! directly. The namespace tests in `tests/sockets_mode.rs` cover the redirect.

    use std::{
        io::{Read, Write},
        net::{Shutdown, TcpListener, TcpStream},
        thread,
    };

    use super::*;

    fn v4(addr: SocketAddr) -> SocketAddrV4 {
        match addr {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => panic!("IPv4 expected"),
        }
    }

    /// A worker serving one service on a fresh loopback port, until the flag is set.
    struct Relay {
        port: u16,
        stop: Arc<AtomicBool>,
        stats: StatsHandle,
        thread: Option<thread::JoinHandle<anyhow::Result<()>>>,
    }

    impl Relay {
        fn start(primary: SocketAddrV4, replicas: Vec<SocketAddrV4>, budget: u64) -> Self {
            Self::start_for("127.0.0.0/8", primary, replicas, budget)
        }

        fn start_for(
            clients: &str,
            primary: SocketAddrV4,
            replicas: Vec<SocketAddrV4>,
            budget: u64,
        ) -> Self {
            Self::start_recording(clients, primary, replicas, budget, None)
        }

        fn start_recording(
            clients: &str,
            primary: SocketAddrV4,
            replicas: Vec<SocketAddrV4>,
            budget: u64,
            record: Option<RecordHandle>,
        ) -> Self {
            let listener = conn::listener("127.0.0.1:0".parse().unwrap()).unwrap();
            let port = v4(listener.local_addr().unwrap()).port();
            let session = SessionConfig {
                replica_count: replicas.len() as u16,
                replica_budget_bytes: budget,
                ..SessionConfig::default()
            };
            let plan = ServicePlan {
                name: "test".into(),
                primary,
                clients: clients.parse().unwrap(),
                replicas,
                session,
                replica_source: None,
                listen_port: port,
                record: record.clone(),
            };
            let stats = StatsHandle::new();
            stats.set_recorders(vec![record]);
            let initial = SocketsStats {
                workers: 1,
                services: vec![ServiceStats::new(
                    &plan.name,
                    plan.primary,
                    port,
                    &plan.replicas,
                )],
                ..SocketsStats::default()
            };
            stats.reset(1, &initial);
            let setup = WorkerSetup {
                index: 0,
                services: vec![plan].into(),
                listeners: vec![listener],
                manager: ManagerConfig::default(),
                max_lingering: 16,
                stats: stats.clone(),
            };
            let stop = Arc::new(AtomicBool::new(false));
            let flag = Arc::clone(&stop);
            let thread = Some(thread::spawn(move || run(setup, &flag)));
            Self {
                port,
                stop,
                stats,
                thread,
            }
        }

        fn wait_for(&self, what: &str, ok: impl Fn(&SocketsStats) -> bool) -> SocketsStats {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let s = self.stats.snapshot();
                if ok(&s) {
                    return s;
                }
                assert!(Instant::now() < deadline, "{what}: {s:#?}");
                thread::sleep(Duration::from_millis(20));
            }
        }
    }

    impl Drop for Relay {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                t.join().unwrap().unwrap();
            }
        }
    }

    /// A server that reads everything and then answers `tag` + the byte count.
    fn sink(tag: &'static str) -> (SocketAddrV4, thread::JoinHandle<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = v4(l.local_addr().unwrap());
        let t = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut all = Vec::new();
            s.read_to_end(&mut all).unwrap();
            let _ = s.write_all(format!("{tag}:{}", all.len()).as_bytes());
            all
        });
        (addr, t)
    }

    fn closed_port() -> SocketAddrV4 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        v4(l.local_addr().unwrap())
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn relays_to_primary_and_replica_and_answers_from_the_primary_only() {
        let (primary, p) = sink("primary");
        let (replica, r) = sink("replica");
        let relay = Relay::start(primary, vec![replica], 64 << 20);
        let data = pattern(3 << 20);
        let mut client = TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
        client.write_all(&data).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, format!("primary:{}", data.len()));
        assert!(p.join().unwrap() == data, "primary stream differs");
        assert!(r.join().unwrap() == data, "replica stream differs");
        let s = relay.wait_for("session ends", |s| {
            s.sessions_active == 0 && s.sessions_total == 1
        });
        let svc = &s.services[0];
        assert_eq!(svc.primary_bytes_out, data.len() as u64);
        assert_eq!(svc.replicas[0].bytes_out, data.len() as u64);
        assert_eq!(svc.client_bytes_out, answer.len() as u64);
        assert_eq!(svc.detached.total(), 0);
    }

    #[test]
    fn a_refusing_replica_is_detached_and_the_client_is_still_served() {
        let (primary, p) = sink("primary");
        let relay = Relay::start(primary, vec![closed_port()], 1 << 20);
        let mut client = TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
        client.write_all(b"hello").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "primary:5");
        assert_eq!(p.join().unwrap(), b"hello");
        let s = relay.wait_for("replica detached", |s| {
            s.sessions_active == 0 && s.sessions_total == 1
        });
        assert_eq!(s.services[0].replicas[0].detached.refused, 1);
    }

    #[test]
    fn a_refusing_primary_resets_the_client() {
        let relay = Relay::start(closed_port(), vec![], 1 << 20);
        for _ in 0..20 {
            let mut client = TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
            client
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut buf = [0; 16];
            let e = client.read(&mut buf).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        }
        let s = relay.wait_for("sessions end", |s| {
            s.sessions_active == 0 && s.sessions_total == 20
        });
        assert_eq!(s.services[0].primary_failures, 20);
    }

    #[test]
    fn clients_outside_the_prefix_are_reset() {
        let relay = Relay::start_for("127.0.0.2/32", closed_port(), vec![], 1 << 20);
        let mut client = TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let e = client.read(&mut [0; 16]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        let s = relay.wait_for("refusal counted", |s| s.sessions_refused == 1);
        assert_eq!(s.services[0].refused.not_a_client, 1);
        assert_eq!(s.sessions_total, 0);
    }

    #[test]
    fn a_replica_that_stops_reading_is_cut_loose_without_slowing_the_client() {
        let (primary, p) = sink("primary");
        // Accepts and never reads: only its kernel buffers take bytes.
        let stalled = TcpListener::bind("127.0.0.1:0").unwrap();
        let replica = v4(stalled.local_addr().unwrap());
        let relay = Relay::start(primary, vec![replica], 1 << 20);
        let data = pattern(48 << 20);
        let mut client = TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
        client.write_all(&data).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, format!("primary:{}", data.len()));
        assert!(p.join().unwrap() == data, "primary stream differs");
        let s = relay.wait_for("session ends", |s| {
            s.sessions_active == 0 && s.sessions_total == 1
        });
        assert_eq!(s.services[0].replicas[0].detached.lagged, 1, "{s:#?}");
        drop(stalled);
    }

    /// A server taking `count` connections at once, each read to its end and answered
    /// with its length; returns the streams.
    fn many(count: usize) -> (SocketAddrV4, thread::JoinHandle<Vec<Vec<u8>>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = v4(l.local_addr().unwrap());
        let t = thread::spawn(move || {
            let handlers: Vec<_> = (0..count)
                .map(|_| {
                    let (mut s, _) = l.accept().unwrap();
                    thread::spawn(move || {
                        let mut all = Vec::new();
                        s.read_to_end(&mut all).unwrap();
                        let _ = s.write_all(format!("{}", all.len()).as_bytes());
                        all
                    })
                })
                .collect();
            handlers.into_iter().map(|h| h.join().unwrap()).collect()
        });
        (addr, t)
    }

    #[test]
    fn concurrent_sessions_each_arrive_intact() {
        const STREAMS: usize = 16;
        const EACH: usize = 4 << 20;
        let (primary, p) = many(STREAMS);
        let (replica, r) = many(STREAMS);
        let relay = Relay::start(primary, vec![replica], 8 << 20);
        let started = Instant::now();
        let clients: Vec<_> = (0..STREAMS)
            .map(|i| {
                let port = relay.port;
                thread::spawn(move || {
                    let mut data = pattern(EACH);
                    data[..8].copy_from_slice(&(i as u64).to_le_bytes());
                    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
                    c.write_all(&data).unwrap();
                    c.shutdown(Shutdown::Write).unwrap();
                    let mut answer = String::new();
                    c.read_to_string(&mut answer).unwrap();
                    assert_eq!(answer, EACH.to_string());
                    data
                })
            })
            .collect();
        let mut sent: Vec<Vec<u8>> = clients.into_iter().map(|c| c.join().unwrap()).collect();
        let elapsed = started.elapsed();
        eprintln!(
            "loopback relay: {STREAMS} x {} MiB in {elapsed:.2?}",
            EACH >> 20
        );
        let key = |d: &Vec<u8>| u64::from_le_bytes(d[..8].try_into().unwrap());
        sent.sort_by_key(key);
        for got in [p.join().unwrap(), r.join().unwrap()] {
            let mut got = got;
            got.sort_by_key(key);
            assert!(got == sent, "a stream arrived altered");
        }
        let s = relay.wait_for("sessions end", |s| {
            s.sessions_active == 0 && s.sessions_total == STREAMS as u64
        });
        assert_eq!(s.services[0].detached.total(), 0, "{s:#?}");
    }

    #[test]
    fn a_recording_holds_exactly_the_streams_the_core_accepted() {
        use crate::offline::{
            reader::EndKind,
            testing::{recorded, recorder},
        };
        let (primary, p) = sink("primary");
        let (rec, dir) = recorder("clean", true);
        let relay =
            Relay::start_recording("127.0.0.0/8", primary, vec![], 1 << 20, Some(rec.handle()));
        let data = pattern(5 << 20);
        let mut client = TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
        client.write_all(&data).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        assert!(p.join().unwrap() == data, "primary stream differs");
        let s = relay.wait_for("session ends", |s| {
            s.sessions_active == 0 && s.sessions_total == 1
        });
        let r = s.services[0].recording.unwrap();
        assert_eq!((r.sessions_opened, r.sessions_detached), (1, 0), "{r:?}");
        assert_eq!(r.client_bytes, data.len() as u64);
        assert_eq!(r.server_bytes, answer.len() as u64);
        drop(relay);
        let done = rec.finish();
        assert_eq!(done.write_errors, 0);

        let r = recorded(&dir);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(r.sessions.len(), 1);
        let session = &r.sessions[0];
        assert_eq!(session.meta.service, "test");
        assert_eq!(session.meta.primary, primary);
        assert_eq!(*session.meta.client.ip(), std::net::Ipv4Addr::LOCALHOST);
        assert!(session.client == data, "recorded client stream differs");
        assert_eq!(session.server, answer.as_bytes());
        assert_eq!(session.end, EndKind::Fin);
    }

    #[test]
    fn failed_and_unfinished_sessions_are_recorded_as_reset() {
        use crate::offline::{
            reader::EndKind,
            testing::{recorded, recorder},
        };
        // One session the primary refuses, and one still open when the worker stops.
        let (rec, dir) = recorder("reset", false);
        let refused = Relay::start_recording(
            "127.0.0.0/8",
            closed_port(),
            vec![],
            1 << 20,
            Some(rec.handle()),
        );
        let mut client = TcpStream::connect(("127.0.0.1", refused.port)).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let _ = client.write_all(b"lost");
        assert!(client.read(&mut [0; 16]).is_err());
        refused.wait_for("session ends", |s| {
            s.sessions_total == 1 && s.sessions_active == 0
        });
        drop(refused);

        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let primary = v4(held.local_addr().unwrap());
        let holder = thread::spawn(move || held.accept().map(|(s, _)| s));
        let open =
            Relay::start_recording("127.0.0.0/8", primary, vec![], 1 << 20, Some(rec.handle()));
        // The refused session may or may not have got its bytes in before the reset.
        let before = rec.stats().client_bytes;
        let mut client = TcpStream::connect(("127.0.0.1", open.port)).unwrap();
        client.write_all(b"in flight").unwrap();
        open.wait_for("bytes recorded", |s| {
            s.services[0]
                .recording
                .is_some_and(|r| r.client_bytes >= before + 9)
        });
        drop(open);
        drop(holder.join().unwrap());
        rec.finish();

        let r = recorded(&dir);
        assert_eq!(r.sessions.len(), 2, "{:?}", r.sessions);
        assert_eq!(r.sessions[0].end, EndKind::Reset);
        assert_eq!(r.sessions[1].end, EndKind::Reset);
        assert_eq!(r.sessions[1].client, b"in flight");
    }

    #[test]
    fn stopping_resets_open_sessions() {
        // A primary that accepts and then just holds the connection open.
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let primary = v4(held.local_addr().unwrap());
        let holder = thread::spawn(move || held.accept().map(|(s, _)| s));
        let mut relay = Relay::start(primary, vec![], 1 << 20);
        let mut client = TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
        client.write_all(b"in flight").unwrap();
        relay.wait_for("session open", |s| s.sessions_active == 1);
        relay.stop.store(true, Ordering::Relaxed);
        relay.thread.take().unwrap().join().unwrap().unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let e = client.read(&mut [0; 16]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        let s = relay.stats.snapshot();
        assert_eq!((s.sessions_active, s.sessions_total), (0, 1), "{s:#?}");
        drop(holder.join().unwrap());
    }
}
