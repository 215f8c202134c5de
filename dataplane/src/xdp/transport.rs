//! XDP mode's transport for the replication [`Driver`]: a worker's user-space TCP
//! engines ([`crate::engine`]), one per *link*, and the [`Replicator`] that drives them.
//!
//! One [`Replicator`] belongs to one worker thread. A link is an [`Engine`] over one
//! AF_XDP socket. Link 0 is the interface the clients' frames arrive on; it listens on
//! every service's primary endpoint (any-IP: it answers as the primary) and connects to
//! the primaries from the interface's own address. When a service names a
//! `replica_interface` (the paper's separate replication NIC), its replicas are connected
//! through a further link on that interface (the plan's route), so replica traffic never
//! touches the production NIC.
//!
//! Engine events map onto driver events one to one (`Readable`/`Writable` are
//! [`Event::Active`]); an engine reports the peer's FIN as `PeerClosed` rather than
//! through a read. Upstream next hops are resolved through the kernel's neighbour table
//! ([`crate::xdp::neighbours`]) before the first connect to them.
//!
//! The driver's connection table is a hash map keyed by (link, [`ConnId`]), so finding a
//! session for an event is O(1); the engine below finds a packet's socket by its 4-tuple,
//! so neither cost grows with the number of sessions.

use std::{
    io,
    net::{SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use ncp_replication::{ManagerConfig, Side};

pub use crate::driver::{
    PUBLISH_INTERVAL, manager_config,
    stats::{DropStats, LinkStats, ReplicationStats, WorkerReplicationStats},
};
use crate::{
    driver::{Addressed, Driver, Event, Received, Sent, Transport},
    engine::{ConnId, Engine, EngineDevice, EngineEvent},
    xdp::neighbours::{NEIGHBOUR_CHECK, Neighbours, Resolver},
};

/// Index of a worker's link (engine); 0 is the client-facing one.
pub type LinkId = usize;
/// The link clients arrive on and primaries are reached through.
pub const CLIENT_LINK: LinkId = 0;

/// One configured service as an XDP worker uses it: replicas are reached through a link.
pub type ServicePlan = crate::driver::ServicePlan<LinkId>;

/// One engine of the worker and the interface it runs on.
pub struct Link<D: EngineDevice> {
    /// Interface name (for stats and the kernel neighbour lookup).
    pub interface: String,
    /// The engine.
    pub engine: Engine<D>,
}

/// A connection of one of a worker's engines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkConn {
    /// The link whose engine holds it.
    pub link: LinkId,
    /// The engine's name for it.
    pub conn: ConnId,
}

/// The worker's engines as a [`Transport`].
pub struct Links<D: EngineDevice> {
    links: Vec<Link<D>>,
    neighbours: Resolver,
    /// The time of the last poll: when a next hop was first wanted.
    now: Instant,
    engine_events: Vec<EngineEvent>,
}

impl<D: EngineDevice + Neighbours> Links<D> {
    fn engine(&mut self, link: LinkId) -> Option<&mut Engine<D>> {
        self.links.get_mut(link).map(|l| &mut l.engine)
    }

    /// Polls every engine and translates what happened. Returns whether any engine did
    /// anything.
    fn poll(&mut self, now: Instant, out: &mut Vec<Event<LinkConn>>) -> bool {
        self.now = now;
        let mut active = false;
        for (link, l) in self.links.iter_mut().enumerate() {
            active |= l.engine.poll(now, &mut self.engine_events);
            for event in self.engine_events.drain(..) {
                let on = |conn| LinkConn { link, conn };
                out.push(match event {
                    EngineEvent::Accepted {
                        conn,
                        local,
                        remote,
                    } => {
                        if link != CLIENT_LINK {
                            // Engines of replica links listen on nothing, so this cannot
                            // happen; if it did, no service is reached this way.
                            tracing::warn!(%local, %remote, link, "connection accepted on a replica link reset");
                            if let Err(e) = l.engine.abort(conn) {
                                tracing::debug!(error = %e, "abort");
                            }
                            continue;
                        }
                        Event::Accepted {
                            conn: on(conn),
                            to: Addressed::Endpoint(local),
                            remote: SocketAddr::V4(remote),
                        }
                    }
                    EngineEvent::Connected { conn } => Event::Connected(on(conn)),
                    EngineEvent::Refused { conn } => Event::Refused(on(conn)),
                    EngineEvent::Readable { conn } | EngineEvent::Writable { conn } => {
                        Event::Active(on(conn))
                    }
                    EngineEvent::PeerClosed { conn } => Event::PeerClosed(on(conn)),
                    EngineEvent::Closed { conn } => Event::Closed(on(conn)),
                    EngineEvent::Reset { conn } => Event::Reset(on(conn)),
                });
            }
        }
        active
    }
}

impl<D: EngineDevice + Neighbours> Transport for Links<D> {
    type Conn = LinkConn;
    type Route = LinkId;
    const ROUNDS_PER_PASS: usize = 8;

    fn connect(&mut self, to: SocketAddrV4, route: Option<&LinkId>) -> io::Result<LinkConn> {
        let link = route.copied().unwrap_or(CLIENT_LINK);
        let Some(l) = self.links.get_mut(link) else {
            return Err(io::Error::other(format!("no link {link}")));
        };
        self.neighbours
            .want(link, l.engine.device(), *to.ip(), self.now);
        let conn = l.engine.connect(to).map_err(io::Error::other)?;
        Ok(LinkConn { link, conn })
    }

    fn read(&mut self, c: LinkConn, buf: &mut [u8]) -> Received {
        match self.engine(c.link).map(|e| e.recv(c.conn, buf)) {
            Some(Ok(n @ 1..)) => Received::Data(n),
            // Nothing buffered, or a connection that is gone: its event says which (the
            // FIN comes as `PeerClosed`).
            _ => Received::Nothing,
        }
    }

    fn write(&mut self, c: LinkConn, data: &[u8]) -> Sent {
        match self.engine(c.link).map(|e| e.send(c.conn, data)) {
            Some(Ok(n @ 1..)) => Sent::Wrote(n),
            // Full, not established yet, closed by us, or gone: the event that changes
            // that (Writable, Connected, Reset) brings us back.
            _ => Sent::Full,
        }
    }

    fn shutdown_write(&mut self, c: LinkConn) -> io::Result<()> {
        let engine = self
            .engine(c.link)
            .ok_or_else(|| io::Error::other(format!("no link {}", c.link)))?;
        engine.close(c.conn).map_err(io::Error::other)
    }

    fn abort(&mut self, c: LinkConn) {
        if let Some(engine) = self.engine(c.link)
            && let Err(e) = engine.abort(c.conn)
        {
            // The engine forgets a connection when it dies and reports that as an event,
            // which the driver may not have seen yet: there is nothing left to reset.
            tracing::debug!(conn = %c.conn, error = %e, "abort of a connection already gone");
        }
    }

    fn release(&mut self, c: LinkConn) {
        // smoltcp completes no close on its own once we stop polling a connection for
        // the driver, so what the driver gives up is reset (see `may_linger`).
        self.abort(c);
    }

    fn may_linger(&self, _: LinkConn, _: Side) -> bool {
        // An aborted smoltcp connection loses what is still queued, our FIN included: a
        // half-closed connection of any side stays until it is closed or times out.
        true
    }
}

/// Drives one worker's sessions over its links: the [`Driver`] over [`Links`] and the
/// engine polling around it.
pub struct Replicator<D: EngineDevice + Neighbours> {
    driver: Driver<Links<D>>,
    events: Vec<Event<LinkConn>>,
}

impl<D: EngineDevice + Neighbours> Replicator<D> {
    /// A replicator over `links` (link 0 faces the clients) for `services`.
    pub fn new(links: Vec<Link<D>>, services: Vec<ServicePlan>, manager: ManagerConfig) -> Self {
        let max_lingering = manager.max_sessions;
        let links = Links {
            links,
            neighbours: Resolver::default(),
            now: Instant::now(),
            engine_events: Vec::new(),
        };
        Self {
            driver: Driver::new(links, services, manager, max_lingering),
            events: Vec::new(),
        }
    }

    /// The links, client-facing first.
    pub fn links(&self) -> &[Link<D>] {
        &self.driver.transport().links
    }

    /// Sessions open right now.
    pub fn sessions(&self) -> usize {
        self.driver.sessions()
    }

    /// Resolves every upstream's next hop through the kernel before traffic starts, so
    /// the first SYN to a primary or replica is not dropped for want of a MAC. Waits at
    /// most `limit`; what is still unknown then keeps being retried in the background.
    pub fn resolve_upstreams(&mut self, limit: Duration) {
        let now = Instant::now();
        let mut wanted = Vec::new();
        for plan in self.driver.services() {
            wanted.push((CLIENT_LINK, *plan.primary.ip()));
            for r in &plan.replicas {
                wanted.push((plan.replica_route, *r.ip()));
            }
        }
        let t = self.driver.transport_mut();
        for (link, ip) in wanted {
            if let Some(l) = t.links.get(link) {
                t.neighbours.want(link, l.engine.device(), ip, now);
            }
        }
        let deadline = now + limit;
        while !t.neighbours.is_done() && Instant::now() < deadline {
            std::thread::sleep(NEIGHBOUR_CHECK);
            t.neighbours.check(Instant::now(), &mut t.links);
        }
        for (link, ip) in t.neighbours.pending() {
            let interface = t.links.get(link).map(|l| l.interface.as_str());
            tracing::warn!(%ip, ?interface, "next hop not resolved yet; connections to it wait for the kernel's ARP");
        }
    }

    /// Polls every link's engine and hands what happened to the driver, which moves
    /// bytes, runs due timers and expires lingering connections; then checks pending
    /// next hops. Returns whether anything happened (if not, the caller may sleep; see
    /// [`Replicator::sleep_bound`]).
    pub fn turn(&mut self, now: Instant) -> bool {
        let mut active = self.driver.transport_mut().poll(now, &mut self.events);
        active |= self.driver.turn(now, &mut self.events);
        let t = self.driver.transport_mut();
        if !t.neighbours.is_done() {
            t.neighbours.check(now, &mut t.links);
        }
        active
    }

    /// How long the worker may sleep when [`Replicator::turn`] found nothing to do: until
    /// the earliest engine timer, session timer or background check.
    pub fn sleep_bound(&mut self, now: Instant, cap: Duration) -> Duration {
        if self.driver.is_busy() {
            return Duration::ZERO;
        }
        let mut bound = cap;
        let timer = self.driver.next_timer();
        let t = self.driver.transport_mut();
        for link in &mut t.links {
            if let Some(d) = link.engine.poll_delay(now) {
                bound = bound.min(d);
            }
        }
        for at in [timer, t.neighbours.next_check()].into_iter().flatten() {
            bound = bound.min(at.saturating_duration_since(now));
        }
        bound
    }

    /// This worker's counters right now.
    pub fn snapshot(&self, interface: &str, queue: u32) -> WorkerReplicationStats {
        let links = self
            .links()
            .iter()
            .map(|l| LinkStats {
                interface: l.interface.clone(),
                connections: l.engine.connections() as u64,
                ports_in_use: l.engine.ports_in_use() as u64,
                tcp: l.engine.counters(),
                ..LinkStats::default()
            })
            .collect();
        WorkerReplicationStats {
            interface: interface.to_owned(),
            queue,
            links,
            ..self.driver.snapshot()
        }
    }

    /// Stop: every open session is reset on all sides (and its recording ended as
    /// aborted), lingering connections aborted, and the engines polled once more so the
    /// RSTs leave.
    pub fn shutdown(&mut self, now: Instant) {
        self.driver.shutdown();
        let t = self.driver.transport_mut();
        for link in &mut t.links {
            link.engine.poll(now, &mut t.engine_events);
            t.engine_events.clear();
        }
    }
}

/// Fills in the device-level counters of a snapshot (only an AF_XDP device has them).
pub fn add_device_counters(
    stats: &mut WorkerReplicationStats,
    links: &[Link<crate::xdp::worker::WorkerDevice>],
) {
    for (s, l) in stats.links.iter_mut().zip(links) {
        let c = l.engine.device().inner().inner().counters();
        s.tx_no_neighbour = c.tx_no_neighbour;
        s.tx_no_frame = c.tx_no_frame;
        s.rx_dropped = c.rx_not_ipv4 + c.rx_truncated + c.rx_malformed;
        if let Some(h) = l.engine.device().inner().handover_counters() {
            s.handed_out = h.handed_out;
            s.handed_in = h.handed_in;
            s.handover_dropped = h.dropped;
        }
    }
}

#[cfg(test)]
mod tests {
    //! The replicator over in-memory IP links: a "network" engine plays client and
    //! primary on link 0, another plays the replica on link 1.

    use std::net::Ipv4Addr;

    use super::*;
    use crate::{
        config::{PortRange, ServiceConfig},
        engine::{
            EngineConfig,
            pipe::{Pipe, pipe_pair},
        },
        offline::recorder::RecordHandle,
        xdp::device::MacAddr,
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
            verify: crate::config::Verify::Off,
            verify_window_bytes: 0,
            spill_dir: None,
            spill_budget_bytes: 0,
            protocol: None,
            credentials: Default::default(),
            tunnel_overhead_bytes: 0,
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
            s.links[1].tcp.connected, 1,
            "the replica is reached through link 1"
        );
        assert_eq!(s.links[0].tcp.connected, 1);
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
        assert_eq!(s.counters.sessions_refused, 1);
        assert_eq!(s.counters.sessions_total, 0);
    }
}
