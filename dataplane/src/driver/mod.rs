//! The replication driver: the sans-IO core ([`ncp_replication`]) carried out over any
//! data plane's TCP connections, written once. A data plane supplies a [`Transport`]
//! (open, read, write, half-close, abort, events); its event loop polls the transport
//! for [`Event`]s and hands them to [`Driver::turn`]. XDP mode's transport is the
//! smoltcp engines of a worker's links ([`crate::xdp::transport`]); sockets mode's is a mio
//! loop over kernel sockets ([`crate::sockets`]).
//!
//! The I/O contract of the core (see the `ncp_replication` crate docs) maps onto the
//! transport like this:
//! - `Accepted` → pick the service (by listener or local endpoint), check the client
//!   prefix, `Manager::open_with`; a refusal aborts the client (RST) and is counted.
//! - `Action::Connect` → [`Transport::connect`] (replicas through the service's route);
//!   `Connected`/`Refused`/`Reset`/FIN → `on_connected`/`on_refused`/`on_reset`/`on_fin`.
//! - reading ("fill"): at most `receive_window(side)` → `on_data` (replicas: everything,
//!   counted and dropped by the core); writing ("flush"): `pending` → write → `on_sent`.
//! - `Close` → [`Transport::shutdown_write`] (FIN), `Reset`/`Detached` →
//!   [`Transport::abort`] (RST), `Finished` → `Manager::remove`. Half-closed connections
//!   the transport says are worth it *linger* after their session: they are read and
//!   discarded until the peer closes or the drain timeout passes, so a replica that is
//!   still answering never gets a RST that could cost it bytes it already received.
//!
//! Recording (a service's `record`, the offline asynchronous mode): the session's
//! recording is opened when the client is accepted, before the session is known to
//! anything else; every read the core accepted from the client (and from the primary,
//! when the service records responses) goes to the recorder right after `on_data`, so the
//! file holds exactly the stream the primary and replicas are given; it ends with the
//! session, as closed or aborted from the session's final counters, and as aborted at
//! shutdown. The handle only `try_send`s into a bounded queue: a recorder that falls
//! behind costs the session its recording (counted), never the worker its time.
//!
//! Consistency: detaches and reply mismatches (a service's `verify`) are written to the
//! service plan's [`ConsistencyBook`], shared by all workers, which says per replica
//! whether it is still in step with its primary (see [`consistency`]).
//!
//! Spilling (a service's `spill_dir`): a replica that falls more than its memory budget
//! behind has its backlog handed out by the core (`Action::Spill`); the driver appends it
//! to the replica's spool ([`spool`]), a file written by a thread of its own so the
//! worker never waits for the disk, and feeds the replica from the spool before any
//! newer byte while the core says it has spooled bytes. An append the spooler refuses
//! (its writer too far behind, the disk full) detaches the replica at once, as the core's
//! spill budget does; either way it is marked diverged. A spool's file goes with its
//! episode, its replica or its session.
//!
//! Time is only what the caller passes in, so tests drive it with a simulated clock.
//! Counters are plain integers owned by the driver; [`Driver::snapshot`] copies them
//! (see [`stats`]).

pub mod consistency;
mod plan;
pub mod spool;
pub mod stats;
#[cfg(test)]
mod tests;
mod transport;

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, VecDeque},
    io,
    net::SocketAddr,
    time::{Instant, SystemTime},
};

use ncp_replication::{
    Action, DetachReason, Manager, ManagerConfig, Refusal, ReplyCheckOutcome, Session, SessionId,
    Side,
};
use rustc_hash::FxHashMap;

pub use consistency::ConsistencyBook;
pub use plan::{ServicePlan, manager_config};
pub use stats::{
    DriverCounters, DropStats, PUBLISH_INTERVAL, ServiceStats, WorkerReplicationStats,
};
pub use transport::{Addressed, Event, Received, Sent, Transport};

use crate::offline::recorder::RecId;
use spool::{SpoolRead, Spooler};

/// An input of the replication core about one side of a session (a connection event).
type SideInput = fn(&mut Session, Side, Instant) -> Result<(), ncp_replication::Error>;

/// Bytes read from a connection per read call.
const READ_CHUNK: usize = 64 * 1024;
/// Reads per side per round; with [`Transport::ROUNDS_PER_PASS`] rounds per drive, a busy
/// session moves at most `READS_PER_SIDE * ROUNDS_PER_PASS * READ_CHUNK` from one side
/// before the other sessions get their turn.
const READS_PER_SIDE: usize = 4;
/// At most one `info` line per replica and interval about detaches: a replica that is
/// down is detached from every new session, and the counters already say how often.
const DETACH_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The connection of one side of a session.
#[derive(Clone, Copy, Debug)]
struct Slot<C> {
    conn: C,
    /// `Action::Close` was carried out: at the session's end it may linger.
    closing: bool,
}

/// The connections of one session, by side.
#[derive(Debug)]
struct Entry<C> {
    service: usize,
    client: Option<Slot<C>>,
    primary: Option<Slot<C>>,
    replicas: Vec<Option<Slot<C>>>,
    /// Already in the ready queue.
    queued: bool,
    /// The session's recording, if its service records and the recorder took it.
    record: Option<RecId>,
}

impl<C: Copy> Entry<C> {
    fn slot_mut(&mut self, side: Side) -> Option<&mut Option<Slot<C>>> {
        match side {
            Side::Client => Some(&mut self.client),
            Side::Primary => Some(&mut self.primary),
            Side::Replica(i) => self.replicas.get_mut(usize::from(i)),
        }
    }

    /// Every side that has a connection, client first.
    fn sides(&self, out: &mut Vec<(Side, Slot<C>)>) {
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

/// When a replica's detach was last logged at `info`, and how many were only logged at
/// `debug` since.
#[derive(Clone, Copy, Debug, Default)]
struct DetachLog {
    last: Option<Instant>,
    quiet: u64,
}

/// Drives one worker's sessions over a transport. See the module docs.
pub struct Driver<T: Transport> {
    transport: T,
    services: Vec<ServicePlan<T::Route>>,
    manager: Manager,
    // Keyed by the data plane's own ids, which no peer chooses: a fast hasher.
    sessions: FxHashMap<SessionId, Entry<T::Conn>>,
    conns: FxHashMap<T::Conn, Owner>,
    /// Sessions with work to do.
    ready: VecDeque<SessionId>,
    lingering: BinaryHeap<Reverse<(Instant, T::Conn)>>,
    lingering_count: usize,
    max_lingering: usize,
    lingering_discarded: u64,
    /// Finished sessions' counters, refusals and session totals, per service.
    counters: Vec<ServiceStats>,
    drops: DropStats,
    /// Per service and replica.
    detach_log: Vec<Vec<DetachLog>>,
    touched: Vec<SessionId>,
    sides: Vec<(Side, Slot<T::Conn>)>,
    scratch: Box<[u8]>,
    /// The spools of replicas that spill (`None` when no service spills).
    spooler: Option<Spooler>,
    /// A replica in the session being driven waits for its spool's writer.
    spool_waiting: bool,
}

impl<T: Transport> Driver<T> {
    /// A driver over `transport` for `services`, with at most `max_lingering` upstreams
    /// of finished sessions draining at once.
    pub fn new(
        transport: T,
        services: Vec<ServicePlan<T::Route>>,
        manager: ManagerConfig,
        max_lingering: usize,
    ) -> Self {
        let counters = services
            .iter()
            .map(|s| ServiceStats::new(&s.name, s.primary, s.listen_port, &s.replicas))
            .collect();
        for s in &services {
            s.consistency.register(&s.name, &s.replicas);
        }
        let detach_log = services
            .iter()
            .map(|s| vec![DetachLog::default(); s.replicas.len()])
            .collect();
        let spooler = spooler_for(&services);
        Self {
            transport,
            services,
            manager: Manager::new(manager),
            sessions: FxHashMap::default(),
            conns: FxHashMap::default(),
            ready: VecDeque::new(),
            lingering: BinaryHeap::new(),
            lingering_count: 0,
            max_lingering,
            lingering_discarded: 0,
            counters,
            drops: DropStats::default(),
            detach_log,
            touched: Vec::new(),
            sides: Vec::new(),
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
            spooler,
            spool_waiting: false,
        }
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// The transport, to poll it for events.
    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }

    /// The services, in configuration order.
    pub fn services(&self) -> &[ServicePlan<T::Route>] {
        &self.services
    }

    /// Sessions open right now.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Whether sessions wait to be driven: the caller should not sleep.
    pub fn is_busy(&self) -> bool {
        !self.ready.is_empty()
    }

    /// The earliest session timer or lingering deadline.
    pub fn next_timer(&self) -> Option<Instant> {
        let lingering = self.lingering.peek().map(|Reverse((t, _))| *t);
        match (self.manager.poll_timeout(), lingering) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Handles `events` (drained), moves bytes for the sessions that need it, runs due
    /// timers and expires lingering connections. Returns whether anything happened or
    /// is still to do (if not, the caller may sleep until [`Driver::next_timer`] or the
    /// transport's next event).
    pub fn turn(&mut self, now: Instant, events: &mut Vec<Event<T::Conn>>) -> bool {
        let mut active = !events.is_empty();
        for event in events.drain(..) {
            self.handle(event, now);
        }
        // Only the sessions queued so far: those re-queued while driving wait until the
        // transport has been polled again, so fresh events are never starved.
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
        active || !self.ready.is_empty()
    }

    /// Handles one transport event.
    pub fn handle(&mut self, event: Event<T::Conn>, now: Instant) {
        let conn = match event {
            Event::Accepted { conn, to, remote } => {
                self.accept(conn, to, remote, now);
                return;
            }
            Event::Connected(conn)
            | Event::Refused(conn)
            | Event::Reset(conn)
            | Event::PeerClosed(conn)
            | Event::Closed(conn)
            | Event::Active(conn) => conn,
        };
        let Some(owner) = self.conns.get(&conn).copied() else {
            // Released by us earlier in this turn; the transport has forgotten it too.
            return;
        };
        let (id, side) = match owner {
            Owner::Lingering { .. } => {
                self.on_lingering_event(conn, event);
                return;
            }
            Owner::Session { id, side } => (id, side),
        };
        if matches!(
            event,
            Event::Refused(_) | Event::Reset(_) | Event::Closed(_)
        ) {
            self.forget(conn, id, side);
        }
        // The core's input for the event, and what the log calls it.
        let input: Option<(SideInput, &str)> = match event {
            Event::Connected(_) => Some((Session::on_connected, "upstream connected")),
            Event::Refused(_) => Some((Session::on_refused, "upstream refused")),
            Event::Reset(_) => Some((Session::on_reset, "connection reset")),
            // Reported only once every byte before the FIN was read, and every byte read
            // went to the core: the FIN is in order.
            Event::PeerClosed(_) => Some((Session::on_fin, "peer closed")),
            // Closed: the FIN came before and ours was sent (Close): nothing left to tell
            // the core. Active: the drive does the work.
            Event::Closed(_) | Event::Active(_) | Event::Accepted { .. } => None,
        };
        if let Some((input, what)) = input {
            tracing::debug!(session = %id, ?side, "{what}");
            self.tell_core(id, side, now, input);
        }
        self.apply_actions(id, now);
        self.mark(id);
    }

    fn on_lingering_event(&mut self, conn: T::Conn, event: Event<T::Conn>) {
        match event {
            Event::Active(_) | Event::PeerClosed(_) => self.drain_lingering(conn),
            Event::Closed(_) | Event::Reset(_) | Event::Refused(_) => {
                // The transport has released it already.
                self.conns.remove(&conn);
                self.lingering_count = self.lingering_count.saturating_sub(1);
            }
            Event::Connected(_) | Event::Accepted { .. } => {}
        }
    }

    /// Drops a dead connection from the tables (the transport has released it).
    fn forget(&mut self, conn: T::Conn, id: SessionId, side: Side) {
        self.conns.remove(&conn);
        if let Some(entry) = self.sessions.get_mut(&id)
            && let Some(place) = entry.slot_mut(side)
            && place.is_some_and(|s| s.conn == conn)
        {
            *place = None;
        }
    }

    /// A client's handshake completed: admit it as a session or reset it.
    fn accept(&mut self, conn: T::Conn, to: Addressed, remote: SocketAddr, now: Instant) {
        let service = match to {
            Addressed::Service(i) => (i < self.services.len()).then_some(i),
            Addressed::Endpoint(local) => self.services.iter().position(|s| s.primary == local),
        };
        let Some(service) = service else {
            self.drops.not_a_service += 1;
            tracing::debug!(?to, %remote, "connection to no service reset");
            self.transport.abort(conn);
            return;
        };
        let plan = &self.services[service];
        let client = match remote {
            SocketAddr::V4(client) if plan.clients.contains(*client.ip()) => client,
            _ => {
                // Only the service's clients are steered or redirected here; anything else
                // arrived another way (another rule, the listening port directly) and is
                // not ours to replicate.
                self.counters[service].refused.not_a_client += 1;
                tracing::debug!(%remote, service = %plan.name, "connection from outside the clients prefix reset");
                self.transport.abort(conn);
                return;
            }
        };
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
                self.transport.abort(conn);
                return;
            }
        };
        self.counters[service].sessions_total += 1;
        tracing::debug!(session = %id, %remote, service = %plan.name, "session opened");
        let record = plan
            .record
            .as_ref()
            .and_then(|handle| handle.open_replicated(&plan.name, client, plan.primary));
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
            conn,
            Owner::Session {
                id,
                side: Side::Client,
            },
        );
        self.apply_actions(id, now);
        self.mark(id);
    }

    /// Queues a session for a drive (once).
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
        self.spool_waiting = false;
        for _ in 0..T::ROUNDS_PER_PASS {
            let Some(entry) = self.sessions.get(&id) else {
                exhausted = false;
                break;
            };
            entry.sides(&mut sides);
            let mut moved = false;
            for &(side, slot) in &sides {
                moved |= self.flush(id, side, slot.conn, now);
                moved |= self.fill(id, side, slot.conn, now);
            }
            self.apply_actions(id, now);
            any |= moved;
            if !moved {
                exhausted = false;
                break;
            }
        }
        self.sides = sides;
        // A replica whose next bytes are still on their way to its spool is fed on a
        // later turn (the writer needs no more than a page-cache copy).
        if exhausted || self.spool_waiting {
            // Still busy: the other sessions and the transport get a turn first.
            self.mark(id);
        }
        any
    }

    /// Hands what the core has pending for `side` to its connection. Returns whether
    /// anything happened.
    fn flush(&mut self, id: SessionId, side: Side, conn: T::Conn, now: Instant) -> bool {
        let Some(mut s) = self.manager.session_mut(id) else {
            return false;
        };
        let mut moved = false;
        let mut rejected = None;
        let mut broken = None;
        loop {
            // A replica with spooled bytes gets them first, in order, from the disk.
            if let Side::Replica(i) = side
                && s.spool_pending(i) > 0
            {
                let key = (id, i);
                let want = usize::try_from(s.spool_pending(i))
                    .unwrap_or(usize::MAX)
                    .min(self.scratch.len());
                let (Some(spooler), Some(buf)) =
                    (self.spooler.as_mut(), self.scratch.get_mut(..want))
                else {
                    break;
                };
                let n = match spooler.read(key, buf) {
                    SpoolRead::Data(n) => n,
                    SpoolRead::NotYet => {
                        self.spool_waiting = true;
                        break;
                    }
                    SpoolRead::Failed => {
                        self.drops.spill_failed += 1;
                        tracing::debug!(session = %id, replica = i, "spool unreadable: replica detached");
                        if let Err(e) = s.spill_failed(i, now) {
                            rejected = Some(e);
                        }
                        break;
                    }
                };
                match self.transport.write(conn, buf.get(..n).unwrap_or_default()) {
                    Sent::Wrote(w) => {
                        moved = true;
                        if let Err(e) = s.on_sent(side, w, now) {
                            rejected = Some(e);
                            break;
                        }
                        spooler.consumed(key, w);
                        if w < n {
                            break;
                        }
                    }
                    Sent::Full => break,
                    Sent::Broken(e) => {
                        broken = Some(e);
                        break;
                    }
                }
                continue;
            }
            let pending = s.pending(side);
            if pending.is_empty() {
                break;
            }
            let len = pending.len();
            match self.transport.write(conn, pending) {
                Sent::Wrote(n) => {
                    moved = true;
                    if let Err(e) = s.on_sent(side, n, now) {
                        rejected = Some(e);
                        break;
                    }
                    if n < len {
                        break; // the send buffer is full: an event says when it has room
                    }
                }
                Sent::Full => break,
                Sent::Broken(e) => {
                    broken = Some(e);
                    break;
                }
            }
        }
        drop(s);
        self.after_io(id, side, conn, rejected, broken, now) || moved
    }

    /// Reads from `side` as far as the core's window allows, and hands what the core
    /// took to the session's recording. Returns whether anything happened.
    fn fill(&mut self, id: SessionId, side: Side, conn: T::Conn, now: Instant) -> bool {
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
        let mut rejected = None;
        let mut broken = None;
        for _ in 0..READS_PER_SIDE {
            // Client and primary: never more than the core takes, so the rest waits in
            // the transport's buffer and TCP flow control pushes back on the sender.
            // Replicas: unbounded; the core counts and drops their bytes.
            let window = s.receive_window(side);
            if window == 0 {
                break; // read again when the window reopens
            }
            let want = window.min(self.scratch.len());
            let Some(buf) = self.scratch.get_mut(..want) else {
                break;
            };
            let n = match self.transport.read(conn, buf) {
                Received::Data(n) => n,
                Received::Nothing => break,
                Received::Eof => {
                    moved = true;
                    if let Err(e) = s.on_fin(side, now) {
                        rejected = Some(e);
                    }
                    break;
                }
                Received::Broken(e) => {
                    broken = Some(e);
                    break;
                }
            };
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
                    broken = Some(io::Error::other("replication core refused bytes"));
                    break;
                }
                Err(e) => {
                    rejected = Some(e);
                    break;
                }
            }
        }
        drop(s);
        self.after_io(id, side, conn, rejected, broken, now) || moved
    }

    /// What a read or write pass left to do: count an input the core rejected, tear down
    /// a connection that broke. Returns whether one broke (which is progress too).
    fn after_io(
        &mut self,
        id: SessionId,
        side: Side,
        conn: T::Conn,
        rejected: Option<ncp_replication::Error>,
        broken: Option<io::Error>,
        now: Instant,
    ) -> bool {
        if let Some(e) = rejected {
            self.core_rejected(id, e);
        }
        let Some(e) = broken else {
            return false;
        };
        self.lost(id, side, conn, &e, now);
        true
    }

    /// A connection broke under a read or write: it is aborted (so the peer learns the
    /// stream is broken) and the core told; no `Reset` action follows for it.
    fn lost(&mut self, id: SessionId, side: Side, conn: T::Conn, error: &io::Error, now: Instant) {
        tracing::debug!(session = %id, ?side, %error, "connection lost");
        self.transport.abort(conn);
        self.forget(conn, id, side);
        self.tell_core(id, side, now, Session::on_reset);
    }

    /// Gives the core an input about one side of session `id` (if the session still
    /// exists); an input it rejects is counted and logged.
    fn tell_core(&mut self, id: SessionId, side: Side, now: Instant, input: SideInput) {
        let result = self
            .manager
            .session_mut(id)
            .map(|mut s| input(&mut s, side, now));
        if let Some(Err(e)) = result {
            self.core_rejected(id, e);
        }
    }

    /// Errors from the core mean the driver broke the contract; they change nothing in
    /// the session, so they are counted and logged loudly, and the driver carries on.
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
                    let slot = self
                        .sessions
                        .get_mut(&id)
                        .and_then(|e| e.slot_mut(side))
                        .and_then(|s| s.as_mut());
                    if let Some(slot) = slot {
                        slot.closing = true;
                        // Typically the peer is already gone; its event or the next read
                        // says so.
                        if let Err(e) = self.transport.shutdown_write(slot.conn) {
                            tracing::debug!(session = %id, ?side, error = %e, "shutdown failed");
                        }
                    }
                }
                Action::Reset(side) => self.reset(id, side),
                Action::Spill { replica } => self.spill(id, service, replica, now),
                Action::Detached { replica, reason } => {
                    if let Some(spooler) = &mut self.spooler {
                        spooler.remove((id, replica));
                    }
                    self.log_detach(id, service, replica, reason, now);
                    if let Some(r) = self.counters[service]
                        .replicas
                        .get_mut(usize::from(replica))
                    {
                        r.detached.record(reason);
                    }
                    let plan = &self.services[service];
                    if let Some(&address) = plan.replicas.get(usize::from(replica)) {
                        plan.consistency.detached(&plan.name, address, reason);
                    }
                    self.reset(id, Side::Replica(replica));
                }
                Action::ReplyCheck { replica, outcome } => {
                    self.reply_checked(id, service, replica, outcome);
                }
                Action::Finished => {
                    self.finish(id, now);
                    return;
                }
            }
        }
    }

    /// Appends what the core spilled for a replica to its spool; if the spooler cannot
    /// take it, the replica is detached (the core is told the spool failed).
    fn spill(&mut self, id: SessionId, service: usize, replica: u16, now: Instant) {
        let Some(mut s) = self.manager.session_mut(id) else {
            return;
        };
        let bytes = s.take_spill(replica);
        let result = match (&mut self.spooler, &self.services[service].spill_dir) {
            (Some(spooler), Some(dir)) => spooler
                .append((id, replica), dir, bytes)
                .map_err(|e| e.to_string()),
            _ => Err("no spool for this service".to_owned()),
        };
        let Err(error) = result else {
            return;
        };
        self.drops.spill_failed += 1;
        tracing::debug!(session = %id, replica, %error, "spill refused: replica detached");
        if let Err(e) = s.spill_failed(replica, now) {
            drop(s);
            self.core_rejected(id, e);
        }
    }

    /// A replica's answers stopped being verified in this session: a mismatch diverges
    /// it, an overrun window is only counted.
    fn reply_checked(
        &mut self,
        id: SessionId,
        service: usize,
        replica: u16,
        outcome: ReplyCheckOutcome,
    ) {
        let plan = &self.services[service];
        let Some(&address) = plan.replicas.get(usize::from(replica)) else {
            return;
        };
        match outcome {
            ReplyCheckOutcome::Mismatch => {
                let mismatch = self
                    .manager
                    .session(id)
                    .and_then(|s| s.reply_mismatch(replica).cloned());
                if let Some(m) = mismatch {
                    tracing::debug!(session = %id, service = %plan.name, %address, offset = m.offset, "reply mismatch");
                    plan.consistency.mismatch(&plan.name, address, &m);
                }
            }
            ReplyCheckOutcome::WindowExceeded => {
                tracing::debug!(session = %id, service = %plan.name, %address, "verification window exceeded: the replica's answers are not verified for the rest of this session");
                plan.consistency.window_exceeded(&plan.name, address);
            }
        }
    }

    fn log_detach(
        &mut self,
        id: SessionId,
        service: usize,
        replica: u16,
        reason: DetachReason,
        now: Instant,
    ) {
        let plan = &self.services[service];
        let address = plan.replicas.get(usize::from(replica));
        let log = self
            .detach_log
            .get_mut(service)
            .and_then(|l| l.get_mut(usize::from(replica)));
        match log {
            Some(log)
                if log
                    .last
                    .is_none_or(|t| now.duration_since(t) >= DETACH_LOG_INTERVAL) =>
            {
                let why = self
                    .manager
                    .session(id)
                    .and_then(|s| s.login_error(replica).map(str::to_owned));
                tracing::info!(session = %id, service = %plan.name, replica, address = ?address, ?reason, why, since_last_logged = log.quiet, "replica detached");
                log.last = Some(now);
                log.quiet = 0;
            }
            Some(log) => {
                log.quiet += 1;
                tracing::debug!(session = %id, service = %plan.name, replica, ?reason, "replica detached");
            }
            None => {}
        }
    }

    /// Starts the connection to an upstream; an immediate failure is reported to the core
    /// as a refusal (its actions are then drained by the caller's loop).
    fn connect(&mut self, id: SessionId, service: usize, side: Side, now: Instant) {
        let plan = &self.services[service];
        let (to, route) = match side {
            Side::Primary => (Some(plan.primary), None),
            Side::Replica(i) => (
                plan.replicas.get(usize::from(i)).copied(),
                Some(&plan.replica_route),
            ),
            Side::Client => (None, None),
        };
        let Some(to) = to else {
            tracing::error!(session = %id, ?side, "core asked to connect a side without an address");
            return;
        };
        match self.transport.connect(to, route) {
            Ok(conn) => {
                if let Some(place) = self.sessions.get_mut(&id).and_then(|e| e.slot_mut(side)) {
                    *place = Some(Slot {
                        conn,
                        closing: false,
                    });
                }
                self.conns.insert(conn, Owner::Session { id, side });
            }
            Err(e) => {
                self.drops.connect_failed += 1;
                tracing::debug!(session = %id, ?side, %to, error = %e, "connect failed at once");
                self.tell_core(id, side, now, Session::on_refused);
            }
        }
    }

    /// Aborts `side`'s connection (RST), if it still has one.
    fn reset(&mut self, id: SessionId, side: Side) {
        let slot = self
            .sessions
            .get_mut(&id)
            .and_then(|e| e.slot_mut(side))
            .and_then(Option::take);
        if let Some(slot) = slot {
            self.conns.remove(&slot.conn);
            self.transport.abort(slot.conn);
        }
    }

    /// The session is over: its half-closed upstreams linger where the transport says so,
    /// everything else is released, its counters are folded into the service's, its
    /// recording ends.
    fn finish(&mut self, id: SessionId, now: Instant) {
        let Some(mut entry) = self.sessions.remove(&id) else {
            return;
        };
        if let Some(spooler) = &mut self.spooler {
            spooler.remove_session(id);
        }
        let service = entry.service;
        let until = now + self.services[service].session.drain_timeout;
        let mut sides = std::mem::take(&mut self.sides);
        entry.sides(&mut sides);
        for &(side, slot) in &sides {
            self.conns.remove(&slot.conn);
            if !(slot.closing && self.transport.may_linger(slot.conn, side)) {
                self.transport.release(slot.conn);
            } else if self.lingering_count < self.max_lingering {
                self.conns.insert(slot.conn, Owner::Lingering { until });
                self.lingering.push(Reverse((until, slot.conn)));
                self.lingering_count += 1;
                self.drain_lingering(slot.conn);
            } else {
                self.drops.lingering_overflow += 1;
                self.transport.release(slot.conn);
            }
        }
        self.sides = sides;
        let plan = &self.services[service];
        if plan.session.verifies_replies()
            && let Some(s) = self.manager.session(id)
        {
            for (i, &address) in (0u16..).zip(&plan.replicas) {
                plan.consistency
                    .compared(&plan.name, address, s.reply_bytes_compared(i));
            }
        }
        let stats = self.manager.remove(id);
        if let Some(stats) = &stats {
            self.counters[service].add_session(stats);
        }
        if let (Some(rec), Some(handle)) = (entry.record.take(), &self.services[service].record) {
            handle.end(rec, stats.as_ref());
        }
        tracing::debug!(session = %id, service = %self.services[service].name, "session finished");
    }

    /// Reads and discards what a lingering connection has; releases it at the peer's FIN
    /// or an error.
    fn drain_lingering(&mut self, conn: T::Conn) {
        let mut done = false;
        // Bounded: a peer that keeps talking is cut off by the deadline instead.
        for _ in 0..READS_PER_SIDE * T::ROUNDS_PER_PASS {
            match self.transport.read(conn, &mut self.scratch) {
                Received::Data(n) => self.lingering_discarded += n as u64,
                Received::Nothing => break,
                Received::Eof | Received::Broken(_) => {
                    done = true;
                    break;
                }
            }
        }
        if done && self.conns.remove(&conn).is_some() {
            self.lingering_count = self.lingering_count.saturating_sub(1);
            self.transport.release(conn);
        }
    }

    fn expire_lingering(&mut self, now: Instant) {
        while let Some(Reverse((until, conn))) = self.lingering.peek().copied() {
            if until > now {
                break;
            }
            self.lingering.pop();
            // The same handle may have been released and reused since; only the entry
            // this deadline was set for expires.
            if let Some(Owner::Lingering { until: u }) = self.conns.get(&conn)
                && *u == until
            {
                self.conns.remove(&conn);
                self.lingering_count = self.lingering_count.saturating_sub(1);
                self.transport.release(conn);
                tracing::debug!(?conn, "lingering upstream released at its deadline");
            }
        }
    }

    /// This driver's counters right now (without a queue or links: the data plane adds
    /// them); a service's recording counters are read from its (shared) recorder at this
    /// moment.
    pub fn snapshot(&self) -> WorkerReplicationStats {
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
        WorkerReplicationStats {
            counters: DriverCounters {
                sessions_active: self.sessions.len() as u64,
                sessions_total: services.iter().map(|s| s.sessions_total).sum(),
                sessions_refused: services.iter().map(|s| s.refused.total()).sum::<u64>()
                    + self.drops.not_a_service,
                memory_reserved_bytes: metrics.memory_reserved_bytes,
                memory_buffered_bytes: buffered,
                drops: self.drops,
            },
            lingering_connections: self.lingering_count as u64,
            lingering_bytes_discarded: self.lingering_discarded,
            services,
            ..WorkerReplicationStats::default()
        }
    }

    /// Stop: every open session is reset on all sides (and its recording ended as
    /// aborted), lingering connections are released. Returns how many sessions were open.
    pub fn shutdown(&mut self) -> usize {
        let ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        let open = ids.len();
        let mut sides = std::mem::take(&mut self.sides);
        for id in ids {
            let Some(mut entry) = self.sessions.remove(&id) else {
                continue;
            };
            if let Some(spooler) = &mut self.spooler {
                spooler.remove_session(id);
            }
            // Reset at stop: the recording says so too.
            if let (Some(rec), Some(handle)) =
                (entry.record.take(), &self.services[entry.service].record)
            {
                handle.abort(rec);
            }
            entry.sides(&mut sides);
            for &(_, slot) in &sides {
                self.conns.remove(&slot.conn);
                self.transport.abort(slot.conn);
            }
            if let Some(stats) = self.manager.remove(id) {
                self.counters[entry.service].add_session(&stats);
            }
        }
        self.sides = sides;
        // What is left lingers.
        for (conn, _) in std::mem::take(&mut self.conns) {
            self.transport.release(conn);
        }
        self.lingering.clear();
        self.lingering_count = 0;
        self.ready.clear();
        if open > 0 {
            tracing::info!(sessions = open, "open sessions reset at stop");
        }
        open
    }
}

/// The spooler of a driver whose services spill (none otherwise), after the spill
/// directories were cleared of what stopped middleboxes left behind. Its writer may fall
/// behind by two of the largest spills, and at least [`spool::MIN_QUEUED_BYTES`].
/// Without a writer thread every spill fails, and replicas are detached as before.
fn spooler_for<R>(services: &[ServicePlan<R>]) -> Option<Spooler> {
    for dir in services.iter().filter_map(|s| s.spill_dir.as_deref()) {
        let removed = spool::remove_orphans(dir);
        if removed > 0 {
            tracing::info!(dir = %dir.display(), removed, "spool files of stopped middleboxes removed");
        }
    }
    let largest = services
        .iter()
        .filter(|s| s.spill_dir.is_some() && s.session.spills())
        .map(|s| {
            s.session
                .replica_budget_bytes
                .saturating_add(s.session.primary_budget_bytes)
        })
        .max()?;
    match Spooler::new(spool::MIN_QUEUED_BYTES.max(largest.saturating_mul(2))) {
        Ok(spooler) => Some(spooler),
        Err(e) => {
            tracing::error!(error = %e, "spool writer not started: replicas that fall behind are detached");
            None
        }
    }
}
