//! Sockets mode's transport for the replication [`Driver`]: kernel TCP sockets under one
//! mio event loop per worker, which owns its listeners and every socket of its sessions.
//!
//! A turn of the loop: wait for readiness or the next timer; note which sockets became
//! readable/writable, finish connects, take listeners' new connections (bounded per turn)
//! and hand all that to the driver as [`Event`]s; the driver moves bytes for the touched
//! sessions, runs due timers and expires lingering sockets; counters are published now
//! and then. Readiness is remembered per socket because mio is edge-triggered: a side
//! held back by the core's window stays readable and is read again once the window
//! reopens.

use std::{
    io::{self, Read as _, Write as _},
    net::{Shutdown, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use mio::{Events, Interest, Poll, Token, net::TcpStream};
use ncp_replication::{ManagerConfig, Side};

use super::conn::{self, Conn, Listener, Slab, SourceBinding};
use crate::driver::{
    Addressed, Driver, Event, PUBLISH_INTERVAL, Received, Sent, Transport,
    stats::{SocketsStats, StatsHandle},
};

/// Tokens from here up are listeners (service index added); below are connection slots.
const LISTENER_TOKEN_BASE: usize = usize::MAX / 2;
/// Connections accepted per listener per turn.
const ACCEPTS_PER_TURN: usize = 64;
/// Back-off after an accept error such as running out of file descriptors.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);
/// Longest sleep, so a stop request is seen promptly.
const MAX_SLEEP: Duration = Duration::from_millis(100);

/// One configured service as the workers use it: replicas are connected from the
/// service's source binding, if it names one.
pub type ServicePlan = crate::driver::ServicePlan<Option<SourceBinding>>;

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

/// Runs one worker until `stop` is set, then resets its open sessions.
pub fn run(setup: WorkerSetup, stop: &AtomicBool) -> anyhow::Result<()> {
    let sockets = Sockets::new(setup.listeners)?;
    let mut driver = Driver::new(
        sockets,
        setup.services.to_vec(),
        setup.manager,
        setup.max_lingering,
    );
    let result = event_loop(&mut driver, setup.index, &setup.stats, stop);
    let open = driver.shutdown();
    if open > 0 {
        tracing::info!(worker = setup.index, sessions = open, "worker stopped");
    }
    setup
        .stats
        .publish(setup.index, SocketsStats::from(driver.snapshot()));
    result
}

fn event_loop(
    driver: &mut Driver<Sockets>,
    index: usize,
    stats: &StatsHandle,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let mut readiness = Events::with_capacity(1024);
    let mut events = Vec::new();
    let mut next_publish = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let timeout = sleep_time(driver, now, next_publish);
        let sockets = driver.transport_mut();
        if let Err(e) = sockets.poll.poll(&mut readiness, Some(timeout)) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("waiting for socket events");
        }
        let now = Instant::now();
        sockets.translate(&readiness, now, &mut events);
        driver.turn(now, &mut events);
        if now >= next_publish {
            stats.publish(index, SocketsStats::from(driver.snapshot()));
            next_publish = now + PUBLISH_INTERVAL;
        }
    }
    Ok(())
}

/// How long the loop may wait for readiness: not at all while sessions are queued,
/// otherwise until the next timer, listener retry or publication.
fn sleep_time(driver: &Driver<Sockets>, now: Instant, next_publish: Instant) -> Duration {
    if driver.is_busy() {
        return Duration::ZERO;
    }
    let mut until = (now + MAX_SLEEP).min(next_publish);
    let retries = driver.transport().listeners.iter().map(|l| l.retry_at);
    for t in retries.chain([driver.next_timer()]).flatten() {
        until = until.min(t);
    }
    until.saturating_duration_since(now)
}

/// A worker's listeners and sockets as a [`Transport`]; a connection is named by its
/// slab slot, which is also its poll token.
pub struct Sockets {
    poll: Poll,
    listeners: Vec<Listener>,
    conns: Slab,
    /// Slots of connections that failed in the last translation (see [`Conn::dead`]).
    dead: Vec<usize>,
}

impl Sockets {
    fn new(listeners: Vec<std::net::TcpListener>) -> anyhow::Result<Self> {
        let poll = Poll::new().context("creating the event loop")?;
        let mut registered = Vec::with_capacity(listeners.len());
        for (service, std_listener) in listeners.into_iter().enumerate() {
            let mut socket = mio::net::TcpListener::from_std(std_listener);
            poll.registry()
                .register(
                    &mut socket,
                    Token(LISTENER_TOKEN_BASE + service),
                    Interest::READABLE,
                )
                .context("registering a listener")?;
            registered.push(Listener {
                socket,
                service,
                retry_at: None,
            });
        }
        Ok(Self {
            poll,
            listeners: registered,
            conns: Slab::default(),
            dead: Vec::new(),
        })
    }

    /// Turns readiness into driver events: remembers it per socket, finishes connects,
    /// reports errors, and accepts on listeners that are ready or due for a retry.
    fn translate(&mut self, readiness: &Events, now: Instant, out: &mut Vec<Event<usize>>) {
        // The driver has handled the previous batch, which reported these failures.
        for slot in std::mem::take(&mut self.dead) {
            if self.conns.get(slot).is_some_and(|c| c.dead) {
                drop(self.conns.remove(slot));
            }
        }
        for event in readiness {
            let token = event.token().0;
            if token >= LISTENER_TOKEN_BASE {
                self.accept(token - LISTENER_TOKEN_BASE, now, out);
                continue;
            }
            let Some(c) = self.conns.get_mut(token) else {
                continue; // closed earlier in this turn
            };
            // Errors and hang-ups surface through read/write, so they count as readiness.
            if event.is_readable() || event.is_read_closed() || event.is_error() {
                c.readable = true;
            }
            if event.is_writable() || event.is_write_closed() || event.is_error() {
                c.writable = true;
            }
            if !c.connected {
                if c.writable {
                    // A connecting socket became writable: the handshake is over either way.
                    match conn::connect_result(&c.stream) {
                        Ok(true) => {
                            c.connected = true;
                            out.push(Event::Connected(token));
                        }
                        // Spurious wakeup: wait for the next edge.
                        Ok(false) => c.writable = false,
                        Err(e) => {
                            tracing::debug!(slot = token, error = %e, "upstream connection failed");
                            self.bury(token);
                            out.push(Event::Refused(token));
                            continue;
                        }
                    }
                }
            } else if event.is_error()
                && let Ok(Some(e)) = c.stream.take_error()
            {
                // Learn about a reset now even if the core's window keeps us from reading
                // this side.
                tracing::debug!(slot = token, error = %e, "connection lost");
                self.bury(token);
                out.push(Event::Reset(token));
                continue;
            }
            out.push(Event::Active(token));
        }
        for k in 0..self.listeners.len() {
            if self.listeners[k].retry_at.is_some_and(|t| t <= now) {
                self.accept(k, now, out);
            }
        }
    }

    fn accept(&mut self, k: usize, now: Instant, out: &mut Vec<Event<usize>>) {
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
                Ok((stream, remote)) => {
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "TCP_NODELAY on a client connection");
                    }
                    let Some(slot) = self.add(stream, true) else {
                        continue;
                    };
                    if let Some(c) = self.conns.get_mut(slot) {
                        // Bytes may have arrived before the socket was registered; the
                        // first read or write finds out (a spurious attempt just returns
                        // WouldBlock).
                        c.readable = true;
                        c.writable = true;
                    }
                    out.push(Event::Accepted {
                        conn: slot,
                        to: Addressed::Service(service),
                        remote,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    tracing::warn!(error = %e, service, "accept failed; retrying shortly");
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

    /// Registers a socket for read and write readiness; `None` (socket reset) on failure.
    fn add(&mut self, stream: TcpStream, connected: bool) -> Option<usize> {
        // The token is the slot, so the socket goes into the slab first and is registered
        // from there.
        let slot = self.conns.insert(Conn::new(stream, connected));
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

    /// Takes a socket out of the loop; dropping it closes it. A dead one is freed by the
    /// next translation instead.
    fn close(&mut self, slot: usize) -> Option<TcpStream> {
        if self.conns.get(slot).is_none_or(|c| c.dead) {
            return None;
        }
        let mut c = self.conns.remove(slot)?;
        deregister(&self.poll, slot, &mut c.stream);
        Some(c.stream)
    }

    /// A connection failed and is reported as such in this batch: out of the loop at once,
    /// its slot freed only in the next translation, after the driver has seen the report
    /// (a connect in between must not get the same slot and with it the report).
    fn bury(&mut self, slot: usize) {
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        c.dead = true;
        deregister(&self.poll, slot, &mut c.stream);
        self.dead.push(slot);
    }
}

/// One read or write on a non-blocking socket, retried while a signal interrupts it:
/// `Some(n)` bytes moved, or `None` when the socket would block.
fn nonblocking(mut op: impl FnMut() -> io::Result<usize>) -> io::Result<Option<usize>> {
    loop {
        match op() {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn deregister(poll: &Poll, slot: usize, stream: &mut TcpStream) {
    if let Err(e) = poll.registry().deregister(stream) {
        // Closing the descriptor removes it from the epoll set anyway.
        tracing::debug!(slot, error = %e, "deregistering a socket");
    }
}

impl Transport for Sockets {
    type Conn = usize;
    type Route = Option<SourceBinding>;
    const ROUNDS_PER_PASS: usize = 16;

    fn connect(
        &mut self,
        to: SocketAddrV4,
        route: Option<&Option<SourceBinding>>,
    ) -> io::Result<usize> {
        let stream = conn::connect(to, route.and_then(Option::as_ref))?;
        self.add(stream, false)
            .ok_or_else(|| io::Error::other("registering the socket failed"))
    }

    fn read(&mut self, slot: usize, buf: &mut [u8]) -> Received {
        let Some(c) = self.conns.get_mut(slot) else {
            return Received::Nothing;
        };
        if !c.connected || !c.readable || c.read_eof || c.dead {
            return Received::Nothing;
        }
        match nonblocking(|| c.stream.read(buf)) {
            Ok(Some(0)) => {
                c.read_eof = true;
                c.readable = false;
                Received::Eof
            }
            Ok(Some(n)) => Received::Data(n),
            Ok(None) => {
                c.readable = false;
                Received::Nothing
            }
            Err(e) => Received::Broken(e),
        }
    }

    fn write(&mut self, slot: usize, data: &[u8]) -> Sent {
        let Some(c) = self.conns.get_mut(slot) else {
            return Sent::Full;
        };
        if !c.connected || !c.writable || c.write_shut || c.dead {
            return Sent::Full;
        }
        match nonblocking(|| c.stream.write(data)) {
            // A socket that takes nothing is full, like one that would block.
            Ok(Some(0) | None) => {
                c.writable = false;
                Sent::Full
            }
            Ok(Some(n)) => Sent::Wrote(n),
            Err(e) => Sent::Broken(e),
        }
    }

    fn shutdown_write(&mut self, slot: usize) -> io::Result<()> {
        let Some(c) = self.conns.get_mut(slot).filter(|c| !c.dead) else {
            return Ok(()); // gone already; its event says so
        };
        c.write_shut = true;
        c.stream.shutdown(Shutdown::Write)
    }

    fn abort(&mut self, slot: usize) {
        if let Some(stream) = self.close(slot) {
            conn::abort(stream);
        }
    }

    fn release(&mut self, slot: usize) {
        // The kernel finishes an orderly close on its own where a FIN was sent; otherwise
        // it does whatever is due (a RST with unread bytes).
        drop(self.close(slot));
    }

    fn may_linger(&self, slot: usize, side: Side) -> bool {
        // An upstream that got our FIN may still be answering; closing it with unread
        // bytes would send a RST that can destroy what it has not processed yet. A client
        // is past that: the kernel delivers what we queued for it after close.
        side != Side::Client
            && self
                .conns
                .get(slot)
                .is_some_and(|c| c.connected && !c.read_eof && !c.dead)
    }
}

#[cfg(test)]
mod tests {
    //! The event loop on loopback, without nftables: clients connect to the listener
    //! directly. The namespace tests in `tests/sockets_mode.rs` cover the redirect.

    use std::{
        io::{Read, Write},
        net::{Shutdown, SocketAddr, TcpListener, TcpStream},
        thread,
    };

    use ncp_replication::SessionConfig;

    use super::*;
    use crate::{driver::ServiceStats, offline::recorder::RecordHandle};

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
            let listener = conn::listener("127.0.0.1:0".parse().unwrap(), None).unwrap();
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
                replica_route: None,
                listen_port: port,
                record: record.clone(),
                consistency: Default::default(),
                spill_dir: None,
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

        /// Waits until `sessions` sessions were admitted and all of them have ended.
        fn wait_sessions_done(&self, sessions: u64) -> SocketsStats {
            self.wait_for("sessions end", |s| {
                s.counters.sessions_active == 0 && s.counters.sessions_total == sessions
            })
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

    /// A client's whole session through the relay on `port`: sends `data`, half-closes
    /// and returns what comes back.
    fn exchange(port: u16, data: &[u8]) -> String {
        let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        client.write_all(data).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        answer
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
        let answer = exchange(relay.port, &data);
        assert_eq!(answer, format!("primary:{}", data.len()));
        assert!(p.join().unwrap() == data, "primary stream differs");
        assert!(r.join().unwrap() == data, "replica stream differs");
        let s = relay.wait_sessions_done(1);
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
        let answer = exchange(relay.port, b"hello");
        assert_eq!(answer, "primary:5");
        assert_eq!(p.join().unwrap(), b"hello");
        let s = relay.wait_sessions_done(1);
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
        let s = relay.wait_sessions_done(20);
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
        let s = relay.wait_for("refusal counted", |s| s.counters.sessions_refused == 1);
        assert_eq!(s.services[0].refused.not_a_client, 1);
        assert_eq!(s.counters.sessions_total, 0);
    }

    #[test]
    fn a_replica_that_stops_reading_is_cut_loose_without_slowing_the_client() {
        let (primary, p) = sink("primary");
        // Accepts and never reads: only its kernel buffers take bytes.
        let stalled = TcpListener::bind("127.0.0.1:0").unwrap();
        let replica = v4(stalled.local_addr().unwrap());
        let relay = Relay::start(primary, vec![replica], 1 << 20);
        let data = pattern(48 << 20);
        let answer = exchange(relay.port, &data);
        assert_eq!(answer, format!("primary:{}", data.len()));
        assert!(p.join().unwrap() == data, "primary stream differs");
        let s = relay.wait_sessions_done(1);
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
                    assert_eq!(exchange(port, &data), EACH.to_string());
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
        let s = relay.wait_sessions_done(STREAMS as u64);
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
        let answer = exchange(relay.port, &data);
        assert!(p.join().unwrap() == data, "primary stream differs");
        let s = relay.wait_sessions_done(1);
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
        refused.wait_sessions_done(1);
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
        relay.wait_for("session open", |s| s.counters.sessions_active == 1);
        relay.stop.store(true, Ordering::Relaxed);
        relay.thread.take().unwrap().join().unwrap().unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let e = client.read(&mut [0; 16]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        let s = relay.stats.snapshot();
        assert_eq!(
            (s.counters.sessions_active, s.counters.sessions_total),
            (0, 1),
            "{s:#?}"
        );
        drop(holder.join().unwrap());
    }
}
