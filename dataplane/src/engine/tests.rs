//! Engine tests without sockets: two engines joined by an in-memory IP "wire".

use std::{
    cell::Cell,
    collections::VecDeque,
    net::{Ipv4Addr, SocketAddrV4},
    rc::Rc,
    time::{Duration, Instant},
};

use ncp_common::wire::tcp_flags::{ACK as TCP_ACK, SYN as TCP_SYN};

use super::{
    pipe::{Pipe, pipe_pair},
    *,
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 1);
const MIDDLEBOX: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 2);
const PRIMARY: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 200, 50), 7000);

fn ports() -> PortRange {
    PortRange {
        first: 20000,
        last: 20999,
    }
}

/// Seeds of the engines' initial sequence numbers: fixed, so every run replays the same
/// segments.
const CLIENT_SEED: u64 = 0x00c1_1e47;
const MIDDLEBOX_SEED: u64 = 0x0000_b0c5;

/// The most simulated time one idle round skips: a test that waits for a moment of its own
/// (not an engine timer) sees it within this.
const MAX_JUMP: Duration = Duration::from_millis(100);

/// Rounds after which a test that waits on the engines gives up.
const MAX_ROUNDS: usize = 100_000;

thread_local! {
    /// TCP timestamps of this thread's engines, when a test drives them on a simulated
    /// clock: the wall clock would barely move during a simulated minute, so it would
    /// hide a layer that sends a segment with a timestamp older than one sent before.
    pub(crate) static SIMULATED_TSVAL: Cell<Option<u32>> = const { Cell::new(None) };
}

/// The client's default configuration (plain, connects out).
fn client_config() -> EngineConfig {
    EngineConfig::new(CLIENT, ports())
}

/// The middlebox's default configuration: listening on a foreign address.
fn middlebox_config() -> EngineConfig {
    let mut config = EngineConfig::new(MIDDLEBOX, ports());
    config.listen = vec![PRIMARY];
    config.rx_buffer = 64 * 1024;
    config.tx_buffer = 64 * 1024;
    config
}

/// Moves every frame `from`'s engine sent to `to`'s engine, dropping those `loss` picks.
/// `from` and `to` are the far ends of the engines' pipes, so the pair decides when (and
/// whether) each frame crosses, as quinn-proto's test `Pair` does. Returns whether a frame
/// was in flight.
fn carry(from: &Pipe, to: &Pipe, loss: &mut Option<Loss>) -> bool {
    let mut moved = false;
    while let Some(frame) = from.inbox.borrow_mut().pop_front() {
        moved = true;
        if loss.as_mut().is_some_and(Loss::drops_next) {
            continue;
        }
        to.outbox.borrow_mut().push_back(frame);
    }
    moved
}

/// Drops one frame in `one_in` on average, chosen by a seeded generator (xorshift64), so a
/// lossy run is the same run every time. Also the recovery layer's tests' random loss.
pub(crate) struct Loss {
    one_in: u64,
    state: u64,
    dropped: u64,
}

impl Loss {
    /// One drop in `one_in`, from the generator seeded with `seed` (not zero).
    pub(crate) fn new(one_in: u64, seed: u64) -> Self {
        Self {
            one_in,
            state: seed,
            dropped: 0,
        }
    }

    pub(crate) fn drops_next(&mut self) -> bool {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        let drop = self.state.is_multiple_of(self.one_in);
        self.dropped += u64::from(drop);
        drop
    }
}

/// The connection a middlebox accepted in a round, if it accepted one.
fn accepted(events: &[EngineEvent]) -> Option<ConnId> {
    events.iter().find_map(|e| match *e {
        EngineEvent::Accepted { conn, .. } => Some(conn),
        _ => None,
    })
}

/// Two engines joined by an in-memory wire on a simulated clock. Time moves only when the
/// test calls [`Pair::advance`], or when [`Pair::pump`] finds both engines idle and jumps
/// to the earliest timer: retransmissions, delayed ACKs and TIME-WAIT run without real
/// waiting and the same way on every run.
struct Pair {
    client: Engine<Pipe>,
    mb: Engine<Pipe>,
    /// The far end of the client's pipe: its inbox holds what the client sent.
    client_far: Pipe,
    /// The far end of the middlebox's pipe.
    mb_far: Pipe,
    loss: Option<Loss>,
    epoch: Instant,
    clock: Clock,
}

/// The pair's simulated time since it was built; a clone reads the same clock, so a
/// test's closure can look at it while the pair runs.
#[derive(Clone, Default)]
struct Clock(Rc<Cell<Duration>>);

impl Clock {
    fn elapsed(&self) -> Duration {
        self.0.get()
    }
}

impl Pair {
    /// The client and a middlebox listening on the primary's address.
    fn new() -> Self {
        Self::with_configs(client_config(), middlebox_config())
    }

    fn with_configs(client: EngineConfig, mb: EngineConfig) -> Self {
        Self::with_mb_mtu(client, mb, 1500)
    }

    /// With the middlebox's link reporting `mtu`.
    fn with_mb_mtu(client: EngineConfig, mb: EngineConfig, mtu: usize) -> Self {
        let epoch = Instant::now();
        let (client_end, client_far) = pipe_pair();
        let (mut mb_end, mb_far) = pipe_pair();
        mb_end.mtu = mtu;
        Self {
            client: Engine::with_clock(client_end, client, epoch, CLIENT_SEED).unwrap(),
            mb: Engine::with_clock(mb_end, mb, epoch, MIDDLEBOX_SEED).unwrap(),
            client_far,
            mb_far,
            loss: None,
            epoch,
            clock: Clock::default(),
        }
    }

    /// Loses one frame in `one_in` (both ways), with a fixed seed.
    fn lose(&mut self, one_in: u64) {
        self.loss = Some(Loss::new(one_in, 0x5eed_1234_abcd_0001));
    }

    /// Frames the wire has dropped so far.
    fn dropped(&self) -> u64 {
        self.loss.as_ref().map_or(0, |loss| loss.dropped)
    }

    /// The simulated present.
    fn now(&self) -> Instant {
        self.epoch + self.clock.elapsed()
    }

    fn advance(&mut self, dt: Duration) {
        self.clock.0.set(self.clock.elapsed() + dt);
    }

    /// A handle on the simulated clock.
    fn clock(&self) -> Clock {
        self.clock.clone()
    }

    /// One round: each engine polls at the present and its frames cross the wire. Returns
    /// whether anything happened.
    fn round(&mut self, ea: &mut Vec<EngineEvent>, eb: &mut Vec<EngineEvent>) -> bool {
        let now = self.now();
        let client_busy = self.client.poll(now, ea);
        let sent_to_mb = carry(&self.client_far, &self.mb_far, &mut self.loss);
        let mb_busy = self.mb.poll(now, eb);
        let sent_to_client = carry(&self.mb_far, &self.client_far, &mut self.loss);
        client_busy | sent_to_mb | mb_busy | sent_to_client
    }

    /// How long until either engine has something to do without a frame arriving.
    fn next_timer(&mut self) -> Option<Duration> {
        let now = self.now();
        let a = self.client.poll_delay(now);
        let b = self.mb.poll_delay(now);
        a.into_iter().chain(b).min()
    }

    /// Polls both engines until `done` says so, handing it each round's events; when a
    /// round moved nothing, time jumps to the earliest timer (by [`MAX_JUMP`] at most).
    /// Panics after many rounds.
    fn pump(
        &mut self,
        mut done: impl FnMut(
            &mut Engine<Pipe>,
            &mut Engine<Pipe>,
            &[EngineEvent],
            &[EngineEvent],
        ) -> bool,
    ) {
        let mut ea = Vec::new();
        let mut eb = Vec::new();
        for _ in 0..MAX_ROUNDS {
            ea.clear();
            eb.clear();
            let busy = self.round(&mut ea, &mut eb);
            if done(&mut self.client, &mut self.mb, &ea, &eb) {
                return;
            }
            if !busy && let Some(wait) = self.next_timer() {
                self.advance(wait.min(MAX_JUMP));
            }
        }
        panic!("did not finish within {MAX_ROUNDS} rounds");
    }

    /// Polls both engines without time passing until neither has anything left to do now.
    fn drive(&mut self) {
        let mut events = Vec::new();
        for _ in 0..1000 {
            let busy = self.round(&mut events, &mut Vec::new());
            events.clear();
            if !busy && self.next_timer() != Some(Duration::ZERO) {
                return;
            }
        }
        panic!("the engines never settled");
    }

    /// Puts a fresh client engine on a new pipe in place of the old one (which is gone
    /// without a word, as a restarted host is).
    fn replace_client(&mut self, config: EngineConfig) {
        let (client_end, client_far) = pipe_pair();
        self.client = Engine::with_clock(client_end, config, self.epoch, CLIENT_SEED + 1).unwrap();
        self.client_far = client_far;
        // A clock that only moves forward: the new engine's time starts where the pair is.
        self.client.poll(self.now(), &mut Vec::new());
    }

    /// Connects the client to the primary's address and runs until the middlebox has
    /// accepted and the client is connected: (client's connection, middlebox's).
    fn establish(&mut self) -> (ConnId, ConnId) {
        let conn = self.client.connect(PRIMARY).unwrap();
        let mut server = None;
        self.pump(|_, _, ec, em| {
            server = server.or(accepted(em));
            server.is_some() && ec.contains(&EngineEvent::Connected { conn })
        });
        (conn, server.unwrap())
    }

    /// One poll of the middlebox alone, returning its events.
    fn poll_mb(&mut self) -> Vec<EngineEvent> {
        let mut events = Vec::new();
        self.mb.poll(self.now(), &mut events);
        events
    }

    /// One poll of the client alone, returning its events.
    fn poll_client(&mut self) -> Vec<EngineEvent> {
        let mut events = Vec::new();
        self.client.poll(self.now(), &mut events);
        events
    }
}

#[test]
fn accepts_on_a_foreign_address_and_echoes() {
    let mut pair = Pair::new();
    let conn = pair.client.connect(PRIMARY).unwrap();
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut sent = 0;
    let mut echoed = Vec::new();
    let mut accepted = None;
    let mut pending: VecDeque<u8> = VecDeque::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut connected = false;
    pair.pump(|c, m, ec, em| {
        for e in em {
            match *e {
                EngineEvent::Accepted {
                    conn,
                    local,
                    remote,
                } => {
                    assert_eq!(local, PRIMARY, "answered as the primary");
                    assert_eq!(*remote.ip(), CLIENT);
                    accepted = Some(conn);
                }
                EngineEvent::Readable { conn } => loop {
                    let n = m.recv(conn, &mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    pending.extend(&buf[..n]);
                },
                _ => {}
            }
        }
        if let Some(id) = accepted {
            let (front, _) = pending.as_slices();
            if !front.is_empty() {
                let n = m.send(id, front).unwrap();
                pending.drain(..n);
            }
        }
        for e in ec {
            match *e {
                EngineEvent::Connected { conn: id } => {
                    assert_eq!(id, conn);
                    connected = true;
                }
                EngineEvent::Readable { conn: id } => loop {
                    let n = c.recv(id, &mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    echoed.extend_from_slice(&buf[..n]);
                },
                _ => {}
            }
        }
        if connected && sent < data.len() {
            sent += c.send(conn, &data[sent..]).unwrap();
        }
        echoed.len() == data.len()
    });
    assert_eq!(echoed, data);
    assert_eq!(pair.mb.counters().accepted, 1);
    assert_eq!(pair.mb.connections(), 1);
    assert_eq!(pair.mb.half_open(), 0);

    // Clean close from both sides: each sees PeerClosed, then Closed.
    let server = accepted.unwrap();
    pair.client.close(conn).unwrap();
    let mut client_done = false;
    let mut server_done = false;
    let mut server_saw_fin = false;
    pair.pump(|c, m, ec, em| {
        for e in em {
            match *e {
                EngineEvent::PeerClosed { conn } => {
                    assert_eq!(conn, server);
                    server_saw_fin = true;
                    m.close(conn).unwrap();
                }
                EngineEvent::Closed { conn } => {
                    assert!(server_saw_fin);
                    assert_eq!(conn, server);
                    server_done = true;
                }
                EngineEvent::Reset { .. } => panic!("unexpected reset"),
                _ => {}
            }
        }
        for e in ec {
            match *e {
                EngineEvent::Closed { conn: id } => {
                    assert_eq!(id, conn);
                    client_done = true;
                }
                EngineEvent::Reset { .. } => panic!("unexpected reset"),
                _ => {}
            }
        }
        let _ = c;
        client_done && server_done
    });
    assert_eq!(
        pair.mb.send(server, b"x"),
        Err(EngineError::UnknownConnection(server))
    );
    assert_eq!(pair.mb.connections(), 0);
    // The client's port is held through TIME-WAIT.
    assert_eq!(pair.client.ports_in_use(), 1);
}

#[test]
fn connection_to_a_closed_port_is_refused() {
    let mut pair = Pair::new();
    let nobody = SocketAddrV4::new(*PRIMARY.ip(), 7999);
    let conn = pair.client.connect(nobody).unwrap();
    let mut refused = false;
    pair.pump(|_, _, ec, _| {
        refused |= ec.contains(&EngineEvent::Refused { conn });
        refused
    });
    // The port went back once smoltcp was done with the socket.
    pair.poll_client();
    assert_eq!(pair.client.ports_in_use(), 0);
    assert_eq!(pair.client.counters().refused, 1);
}

#[test]
fn abort_resets_the_peer() {
    let mut pair = Pair::new();
    let (conn, server) = pair.establish();
    pair.client.abort(conn).unwrap();
    assert_eq!(
        pair.client.abort(conn),
        Err(EngineError::UnknownConnection(conn))
    );
    let mut reset = false;
    pair.pump(|_, _, ec, em| {
        assert!(ec.is_empty(), "no events after abort: {ec:?}");
        reset |= em.contains(&EngineEvent::Reset { conn: server });
        reset
    });
    assert_eq!(pair.mb.counters().reset, 1);
}

#[test]
fn bursts_of_connection_requests_are_all_accepted() {
    // Bursts of SYNs that arrive in the same poll: each gets a socket of its own.
    let mut pair = Pair::new();
    for _round in 0..3 {
        let conns: Vec<ConnId> = (0..8)
            .map(|_| pair.client.connect(PRIMARY).unwrap())
            .collect();
        let mut connected = 0;
        let mut accepted = 0;
        pair.pump(|_, _, ec, em| {
            for e in ec {
                match e {
                    EngineEvent::Connected { .. } => connected += 1,
                    EngineEvent::Refused { .. } => panic!("refused in a burst"),
                    _ => {}
                }
            }
            accepted += em
                .iter()
                .filter(|e| matches!(e, EngineEvent::Accepted { .. }))
                .count();
            connected == 8 && accepted == 8
        });
        for conn in conns {
            pair.client.abort(conn).unwrap();
        }
    }
    assert_eq!(pair.mb.counters().accepted, 24);
    assert_eq!(pair.mb.half_open(), 0);
}

#[test]
fn bounds_on_connections_and_ports() {
    let (a, _b) = pipe_pair();
    let mut config = EngineConfig::new(
        CLIENT,
        PortRange {
            first: 30000,
            last: 30001,
        },
    );
    config.max_connections = 3;
    let mut engine = Engine::new(a, config).unwrap();
    let target = SocketAddrV4::new(MIDDLEBOX, 9);
    engine.connect(target).unwrap();
    engine.connect(target).unwrap();
    assert_eq!(engine.connect(target), Err(EngineError::NoFreePort));
    let (a, _b) = pipe_pair();
    let mut config = EngineConfig::new(CLIENT, ports());
    config.max_connections = 1;
    let mut engine = Engine::new(a, config).unwrap();
    engine.connect(target).unwrap();
    assert_eq!(engine.connect(target), Err(EngineError::TooManyConnections));
    assert_eq!(
        engine.connect(SocketAddrV4::new(MIDDLEBOX, 0)),
        Err(EngineError::TooManyConnections)
    );
    let (a, _b) = pipe_pair();
    assert!(matches!(
        Engine::new(a, EngineConfig::new(Ipv4Addr::BROADCAST, ports())),
        Err(EngineError::Config(_))
    ));
}

#[test]
fn unknown_ids_are_errors_not_panics() {
    let mut pair = Pair::new();
    let bogus = ConnId(999);
    let mut buf = [0u8; 4];
    assert_eq!(
        pair.client.recv(bogus, &mut buf),
        Err(EngineError::UnknownConnection(bogus))
    );
    assert!(pair.client.send(bogus, b"x").is_err());
    assert!(pair.client.close(bogus).is_err());
    assert!(pair.client.abort(bogus).is_err());
    // Sending before the handshake completes is refused, not buffered.
    let conn = pair.client.connect(PRIMARY).unwrap();
    assert_eq!(
        pair.client.send(conn, b"x"),
        Err(EngineError::NotWritable(conn))
    );
}

#[test]
fn unread_bytes_outlive_a_clean_close() {
    let mut pair = Pair::new();
    let conn = pair.client.connect(PRIMARY).unwrap();
    let mut server = None;
    let mut sent = false;
    let mut closed_server = false;
    let mut client_closed = false;
    // The server reads nothing until both sides have closed.
    pair.pump(|c, m, ec, em| {
        for e in em {
            match *e {
                EngineEvent::Accepted { conn, .. } => server = Some(conn),
                EngineEvent::Readable { conn } if !closed_server => {
                    m.close(conn).unwrap();
                    closed_server = true;
                }
                EngineEvent::Reset { .. } | EngineEvent::Closed { .. } => {
                    panic!("closed before the bytes were read: {e:?}")
                }
                _ => {}
            }
        }
        if ec.contains(&EngineEvent::Connected { conn }) && !sent {
            assert_eq!(c.send(conn, b"hello").unwrap(), 5);
            c.close(conn).unwrap();
            sent = true;
        }
        client_closed |= ec.contains(&EngineEvent::Closed { conn });
        client_closed
    });
    let server = server.unwrap();
    assert_eq!(pair.poll_mb(), vec![EngineEvent::Readable { conn: server }]);
    let mut buf = [0u8; 16];
    assert_eq!(pair.mb.recv(server, &mut buf).unwrap(), 5);
    assert_eq!(&buf[..5], b"hello");
    assert_eq!(
        pair.poll_mb(),
        vec![
            EngineEvent::PeerClosed { conn: server },
            EngineEvent::Closed { conn: server }
        ]
    );
}

#[test]
fn endpoints_can_be_added_and_removed() {
    let mut pair = Pair::new();
    let other = SocketAddrV4::new(*PRIMARY.ip(), 7100);
    pair.mb.listen(other);
    pair.mb.listen(other);
    assert_eq!(pair.mb.listening(), [PRIMARY, other]);
    let conn = pair.client.connect(other).unwrap();
    pair.pump(|_, _, ec, _| ec.contains(&EngineEvent::Connected { conn }));
    pair.mb.unlisten(PRIMARY);
    assert_eq!(pair.mb.listening(), [other]);
    let refused = pair.client.connect(PRIMARY).unwrap();
    pair.pump(|_, _, ec, _| ec.contains(&EngineEvent::Refused { conn: refused }));
}

#[test]
fn a_retransmitted_syn_does_not_open_a_second_socket() {
    let mut pair = Pair::new();
    let second = pair.client.connect(PRIMARY).unwrap();
    pair.poll_client();
    // The SYN arrives twice (a retransmission), back to back.
    let syn = pair
        .client
        .device()
        .outbox
        .borrow()
        .back()
        .cloned()
        .unwrap();
    pair.client.device().outbox.borrow_mut().push_back(syn);
    let mut accepted = 0;
    let mut connected = false;
    let mut connected_at = None;
    let clock = pair.clock();
    pair.pump(|c, _, ec, em| {
        assert!(
            !ec.iter()
                .any(|e| matches!(e, EngineEvent::Reset { .. } | EngineEvent::Refused { .. })),
            "client connection failed: {ec:?}"
        );
        accepted += em
            .iter()
            .filter(|e| matches!(e, EngineEvent::Accepted { .. }))
            .count();
        connected |= ec.contains(&EngineEvent::Connected { conn: second });
        if connected && connected_at.is_none() {
            connected_at = Some(clock.elapsed());
            assert_eq!(c.send(second, b"ping").unwrap(), 4);
        }
        // Let time pass beyond the first retransmission timeout (1 s) so that a late
        // reset would show; well within the idle timeout, which would end the connection.
        connected_at.is_some_and(|at| clock.elapsed() >= at + Duration::from_secs(3))
    });
    assert_eq!(accepted, 1);
    assert_eq!(pair.mb.connections(), 1);
    assert_eq!(pair.mb.half_open(), 0, "no second socket left half-open");
}

/// How long the zero-window tests' readers leave a closed window closed: past the sender's
/// first zero-window probe (one RTO, 1 s at the least), well short of the idle timeout.
const STALL: Duration = Duration::from_secs(3);

/// Gotcha (a) of the design notes: a receive buffer that fills to a zero window must open
/// again once the application reads, even when it reads slowly and late.
#[test]
fn a_zero_window_opens_again_when_the_reader_catches_up() {
    slow_readers_get_everything(false);
}

/// The same with both directions loaded: each side's window updates then travel on
/// segments that also carry data into the other side's closed window.
#[test]
fn zero_windows_both_ways_open_again() {
    slow_readers_get_everything(true);
}

/// Sends 600 kB from the client to the middlebox (and back at the same time when
/// `both_ways`) with readers that read nothing until every sender has been blocked for
/// [`STALL`] (the windows are closed and the senders have probed them), then only a little
/// per round; everything must arrive intact.
fn slow_readers_get_everything(both_ways: bool) {
    let mut pair = Pair::new();
    let conn = pair.client.connect(PRIMARY).unwrap();
    let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
    let back_len = if both_ways { data.len() } else { 0 };
    let (mut sent_c, mut sent_m) = (0, 0);
    let mut server = None;
    let (mut got_c, mut got_m) = (Vec::new(), Vec::new());
    let mut buf = [0u8; 1000];
    let mut stalled_since = None;
    let clock = pair.clock();
    pair.pump(|c, m, ec, em| {
        assert!(
            clock.elapsed() < Duration::from_secs(60),
            "stalled: client got {}, middlebox got {}",
            got_c.len(),
            got_m.len()
        );
        server = server.or(accepted(em));
        let Some(s) = server else { return false };
        if ec.contains(&EngineEvent::Connected { conn }) || sent_c > 0 {
            let a = c.send(conn, &data[sent_c..]).unwrap();
            let b = m.send(s, &data[sent_m..back_len]).unwrap();
            sent_c += a;
            sent_m += b;
            if a == 0 && b == 0 {
                stalled_since.get_or_insert(clock.elapsed());
            }
        }
        if stalled_since.is_some_and(|at| clock.elapsed() >= at + STALL) {
            let n = m.recv(s, &mut buf).unwrap();
            got_m.extend_from_slice(&buf[..n]);
            let n = c.recv(conn, &mut buf).unwrap();
            got_c.extend_from_slice(&buf[..n]);
        }
        got_m.len() == data.len() && got_c.len() == back_len
    });
    assert!(got_m == data && got_c == data[..back_len]);
}

#[test]
fn a_short_time_wait_frees_the_socket_and_port_early() {
    let mut config = client_config();
    config.time_wait = Duration::ZERO;
    let mut mb_config = EngineConfig::new(MIDDLEBOX, ports());
    mb_config.listen = vec![PRIMARY];
    let mut pair = Pair::with_configs(config, mb_config);
    let conn = pair.client.connect(PRIMARY).unwrap();
    let mut closing = false;
    let mut done = false;
    pair.pump(|c, m, ec, em| {
        if ec.contains(&EngineEvent::Connected { conn }) {
            // The client closes first, so it is the side that goes through TIME-WAIT.
            c.close(conn).unwrap();
            closing = true;
        }
        for e in em {
            if let EngineEvent::PeerClosed { conn } = *e {
                m.close(conn).unwrap();
            }
        }
        done |= ec.contains(&EngineEvent::Closed { conn });
        closing && done
    });
    pair.poll_client();
    assert_eq!(pair.client.lingering(), 0, "no TIME-WAIT kept");
    assert_eq!(pair.client.ports_in_use(), 0);
}

/// The MSS option of a TCP segment in an IPv4 packet, if it has one.
fn mss_option(packet: &[u8]) -> Option<u16> {
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    let tcp = packet.get(ihl..)?;
    let header_len = usize::from(tcp.get(12)? >> 4) * 4;
    let mut options = tcp.get(20..header_len)?;
    while let [kind, rest @ ..] = options {
        match kind {
            0 => return None,
            1 => options = rest,
            _ => {
                let len = usize::from(*rest.first()?);
                if *kind == 2 && len == 4 {
                    return Some(u16::from_be_bytes([*rest.get(1)?, *rest.get(2)?]));
                }
                options = options.get(len.max(2)..)?;
            }
        }
    }
    None
}

/// A middlebox link with a smaller MTU (room for a tunnel's tag on the switches' links)
/// makes the middlebox advertise a smaller MSS to clients, so they send segments that
/// still fit once tagged.
#[test]
fn the_advertised_mss_follows_the_links_mtu() {
    for (mtu, mss) in [(1500, 1460), (1496, 1456)] {
        let mut pair = Pair::with_mb_mtu(client_config(), middlebox_config(), mtu);
        pair.client.connect(PRIMARY).unwrap();
        let (mut ec, mut em) = (Vec::new(), Vec::new());
        let now = pair.now();
        pair.client.poll(now, &mut ec);
        carry(&pair.client_far, &pair.mb_far, &mut None);
        pair.mb.poll(now, &mut em);
        // What the middlebox sent, before it crosses the wire.
        let syn_ack = pair
            .mb_far
            .inbox
            .borrow()
            .iter()
            .find(|p| p.get(33).is_some_and(|f| f & 0x12 == 0x12))
            .cloned()
            .expect("the middlebox answered the SYN");
        assert_eq!(mss_option(&syn_ack), Some(mss), "MTU {mtu}");
    }
}

/// An IPv4/TCP header pair from `src` to `dst` with the given flags (checksums left 0:
/// the dispatch does not look at them, smoltcp does).
fn tcp_packet(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src.ip().octets());
    p[16..20].copy_from_slice(&dst.ip().octets());
    p[20..22].copy_from_slice(&src.port().to_be_bytes());
    p[22..24].copy_from_slice(&dst.port().to_be_bytes());
    p[32] = 5 << 4;
    p[33] = flags;
    p
}

#[test]
fn the_dispatch_reads_the_flow_of_a_segment_and_nothing_else() {
    let client = SocketAddrV4::new(CLIENT, 40000);
    let syn = tcp_packet(client, PRIMARY, TCP_SYN);
    let key = FlowKey {
        local: PRIMARY,
        remote: client,
    };
    assert_eq!(segment_of(&syn), Some(Segment { key, syn: true }));
    let syn_ack = tcp_packet(client, PRIMARY, TCP_SYN | TCP_ACK);
    assert_eq!(segment_of(&syn_ack), Some(Segment { key, syn: false }));
    // Options push the TCP header further: the IHL is honoured.
    let mut with_options = vec![0u8; 4];
    with_options.splice(0..0, syn[..20].iter().copied());
    with_options.extend_from_slice(&syn[20..]);
    with_options[0] = 0x46;
    with_options[2..4].copy_from_slice(&44u16.to_be_bytes());
    assert_eq!(segment_of(&with_options), Some(Segment { key, syn: true }));
    // Not TCP, a fragment, a cut header, IPv6, garbage: no flow, and no panic.
    let mut udp = syn.clone();
    udp[9] = 17;
    assert_eq!(segment_of(&udp), None);
    let mut fragment = syn.clone();
    fragment[6] = 0x20; // more fragments
    assert_eq!(segment_of(&fragment), None);
    for cut in 0..syn.len() {
        assert_eq!(segment_of(&syn[..cut]), None, "cut at {cut}");
    }
    let mut v6 = syn.clone();
    v6[0] = 0x60;
    assert_eq!(segment_of(&v6), None);
    let mut bad_ihl = syn.clone();
    bad_ihl[0] = 0x43;
    assert_eq!(segment_of(&bad_ihl), None);
}

#[test]
fn requests_beyond_the_connection_bound_are_reset_and_counted() {
    let mut config = EngineConfig::new(MIDDLEBOX, ports());
    config.listen = vec![PRIMARY];
    config.max_connections = 2;
    let mut pair = Pair::with_configs(client_config(), config);
    let conns: Vec<ConnId> = (0..3)
        .map(|_| pair.client.connect(PRIMARY).unwrap())
        .collect();
    let (mut connected, mut refused) = (0, 0);
    pair.pump(|_, _, ec, _| {
        for e in ec {
            match e {
                EngineEvent::Connected { .. } => connected += 1,
                EngineEvent::Refused { conn } => {
                    assert_eq!(*conn, conns[2], "the third request is the one refused");
                    refused += 1;
                }
                _ => {}
            }
        }
        connected + refused == 3
    });
    assert_eq!((connected, refused), (2, 1));
    assert_eq!(pair.mb.counters().overloaded, 1);
    assert_eq!(pair.mb.connections(), 2);
}

#[test]
fn thousands_of_connections_each_get_their_own_bytes() {
    // Every connection carries its own index; the flow table must hand each segment to
    // its socket among thousands.
    let small = |mut config: EngineConfig| {
        config.rx_buffer = 4096;
        config.tx_buffer = 4096;
        config.max_connections = 5000;
        config
    };
    let mut mb_config = EngineConfig::new(MIDDLEBOX, ports());
    mb_config.listen = vec![PRIMARY];
    let mut pair = Pair::with_configs(small(client_config()), small(mb_config));
    const N: usize = 1000;
    let conns: Vec<ConnId> = (0..N)
        .map(|_| pair.client.connect(PRIMARY).unwrap())
        .collect();
    let mut by_client_port = std::collections::HashMap::new();
    for (i, &c) in conns.iter().enumerate() {
        by_client_port.insert(i, c);
    }
    let mut sent = vec![false; N];
    let mut received: std::collections::HashMap<ConnId, (SocketAddrV4, Vec<u8>)> =
        std::collections::HashMap::new();
    let mut buf = [0u8; 64];
    pair.pump(|c, m, ec, em| {
        for e in ec {
            if let EngineEvent::Connected { conn } = *e {
                let i = conns.iter().position(|&x| x == conn).unwrap();
                let message = format!("connection {i}");
                assert_eq!(c.send(conn, message.as_bytes()).unwrap(), message.len());
                sent[i] = true;
            }
        }
        for e in em {
            match *e {
                EngineEvent::Accepted { conn, remote, .. } => {
                    received.insert(conn, (remote, Vec::new()));
                }
                EngineEvent::Readable { conn } => {
                    let n = m.recv(conn, &mut buf).unwrap();
                    received
                        .get_mut(&conn)
                        .unwrap()
                        .1
                        .extend_from_slice(&buf[..n]);
                }
                _ => {}
            }
        }
        sent.iter().all(|&s| s)
            && received.len() == N
            && received
                .values()
                .all(|(_, bytes)| bytes.starts_with(b"connection "))
            && received.values().map(|(_, b)| b.len()).sum::<usize>()
                == (0..N)
                    .map(|i| format!("connection {i}").len())
                    .sum::<usize>()
    });
    // Each accepted connection got the message of the client connection with its port.
    for (remote, bytes) in received.values() {
        let i = conns
            .iter()
            .position(|&conn| pair.client.endpoints(conn).unwrap().0 == *remote)
            .unwrap();
        assert_eq!(bytes, format!("connection {i}").as_bytes());
    }
    assert_eq!(pair.mb.connections(), N);
    assert_eq!(pair.mb.half_open(), 0);
}

#[test]
fn a_new_connection_may_reuse_the_tuple_of_one_in_time_wait() {
    // The middlebox closes first, so it holds the connection in TIME-WAIT; the client then
    // connects again from the same port, which a kernel client may well do.
    let mut pair = Pair::new();
    let first = pair.client.connect(PRIMARY).unwrap();
    let client_port = pair
        .client
        .endpoints(first)
        .map(|(l, _)| l.port())
        .unwrap_or(0);
    let mut server = None;
    let mut closed = false;
    pair.pump(|c, m, ec, em| {
        for e in em {
            if let EngineEvent::Accepted { conn, .. } = *e {
                server = Some(conn);
                m.close(conn).unwrap();
            }
        }
        for e in ec {
            if let EngineEvent::PeerClosed { conn } = *e {
                c.close(conn).unwrap();
            }
        }
        closed |= em.iter().any(|e| matches!(e, EngineEvent::Closed { .. }));
        closed && ec.contains(&EngineEvent::Closed { conn: first })
    });
    assert_eq!(pair.mb.lingering(), 1, "the middlebox holds TIME-WAIT");
    // Replay the client side's SYN from the same port by hand: a fresh client engine
    // whose only free port is the one used before.
    pair.replace_client(EngineConfig::new(
        CLIENT,
        PortRange {
            first: client_port,
            last: client_port,
        },
    ));
    let second = pair.client.connect(PRIMARY).unwrap();
    let mut connected = false;
    pair.pump(|_, _, ec, _| {
        assert!(
            !ec.contains(&EngineEvent::Refused { conn: second }),
            "the request was refused"
        );
        connected |= ec.contains(&EngineEvent::Connected { conn: second });
        connected
    });
    assert!(connected, "no connection over the reused tuple");
    assert_eq!(pair.mb.counters().reused_tuples, 1);
}

/// A read that finds nothing and a send into a full buffer change nothing, so they must
/// not make the next poll due at once: a worker that tries every side of a stalled session
/// on each round would otherwise spin on a core instead of sleeping until a frame comes.
#[test]
fn calls_that_move_nothing_leave_the_engine_free_to_sleep() {
    let mut pair = Pair::new();
    let (conn, server) = pair.establish();
    pair.drive();

    // Nothing to read.
    let mut buf = [0u8; 1000];
    assert_eq!(pair.mb.recv(server, &mut buf).unwrap(), 0);
    assert_ne!(pair.mb.poll_delay(pair.now()), Some(Duration::ZERO));

    // Fill the middlebox's window and the client's send buffer; nobody reads.
    let data = vec![7u8; 64 * 1024];
    for _ in 0..100 {
        let _ = pair.client.send(conn, &data).unwrap();
        pair.drive();
        if pair.client.send_space(conn).unwrap() == 0 {
            break;
        }
    }
    assert_eq!(
        pair.client.send_space(conn).unwrap(),
        0,
        "the send buffer never filled"
    );
    assert_eq!(pair.client.send(conn, &data).unwrap(), 0);
    assert_ne!(pair.client.poll_delay(pair.now()), Some(Duration::ZERO));

    // A read that takes bytes does make a poll due: the window update must go out.
    assert!(pair.mb.recv(server, &mut buf).unwrap() > 0);
    assert_eq!(pair.mb.poll_delay(pair.now()), Some(Duration::ZERO));
}

/// Sends `len` bytes from the client to the middlebox over a wire that loses one frame in
/// `one_in`, and returns what arrived, how many frames were lost and how long it took.
fn transfer_over_a_lossy_wire(len: usize, one_in: u64) -> (Vec<u8>, Vec<u8>, u64, Duration) {
    let mut pair = Pair::new();
    pair.lose(one_in);
    let conn = pair.client.connect(PRIMARY).unwrap();
    let data: Vec<u8> = (0..len).map(|i| (i % 241) as u8).collect();
    let (mut sent, mut connected, mut server) = (0, false, None);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    pair.pump(|c, m, ec, em| {
        assert!(
            !ec.iter()
                .chain(em)
                .any(|e| matches!(e, EngineEvent::Reset { .. } | EngineEvent::Refused { .. })),
            "a lost frame broke the connection: {ec:?} {em:?}"
        );
        connected |= ec.contains(&EngineEvent::Connected { conn });
        if connected && sent < data.len() {
            sent += c.send(conn, &data[sent..]).unwrap();
        }
        server = server.or(accepted(em));
        if let Some(s) = server {
            loop {
                let n = m.recv(s, &mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
        }
        got.len() == data.len()
    });
    let took = pair.clock().elapsed();
    (data, got, pair.dropped(), took)
}

/// Lost SYNs, data and ACKs are retransmitted on the engine's timers; on simulated time
/// with a seeded loss pattern, the same run happens every time.
#[test]
fn a_lossy_wire_delivers_every_byte_in_order_and_replays_exactly() {
    let (data, got, dropped, took) = transfer_over_a_lossy_wire(300_000, 10);
    assert!(got == data, "got {} of {} bytes", got.len(), data.len());
    assert!(dropped > 10, "the wire lost only {dropped} frames");
    assert!(
        took >= Duration::from_millis(200),
        "recovery took no timer at all ({took:?}): was anything lost?"
    );
    let again = transfer_over_a_lossy_wire(300_000, 10);
    assert_eq!((again.2, again.3), (dropped, took), "a second run differed");
}

/// smoltcp's timeout aborts a connection that has *received* nothing for that long, busy
/// or not; an idle session (a database client between queries) must survive it. The
/// engine keeps idle connections alive with probes that a live peer acknowledges, so only
/// a silent peer runs into the timeout. The client here sends no probes of its own, as a
/// Linux client with default settings does not.
#[test]
fn an_idle_connection_outlives_the_timeout_and_a_silent_peer_does_not() {
    let mut quiet_client = client_config();
    quiet_client.timeout = None;
    let mut pair = Pair::with_configs(quiet_client, middlebox_config());
    let (conn, server) = pair.establish();
    pair.drive();

    // Ten idle minutes, five times the 60 s timeout.
    let clock = pair.clock();
    pair.pump(|_, _, ec, em| {
        for e in ec.iter().chain(em) {
            assert!(
                !matches!(e, EngineEvent::Reset { .. } | EngineEvent::Closed { .. }),
                "idle connection torn down after {:?}: {e:?}",
                clock.elapsed()
            );
        }
        clock.elapsed() >= Duration::from_secs(600)
    });
    assert_eq!(pair.client.send(conn, b"still here").unwrap(), 10);
    let mut got = Vec::new();
    pair.pump(|_, m, _, _| {
        let mut buf = [0u8; 16];
        while let Ok(n @ 1..) = m.recv(server, &mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
        got.len() == 10
    });
    assert_eq!(got, b"still here");

    // A peer that vanishes (its frames no longer arrive) is given up within the timeout
    // plus one probe interval.
    let vanished_at = pair.clock().elapsed();
    pair.lose(1);
    let clock = pair.clock();
    pair.pump(|_, _, _, em| {
        em.contains(&EngineEvent::Reset { conn: server })
            || em.contains(&EngineEvent::Closed { conn: server })
    });
    let given_up_after = clock.elapsed() - vanished_at;
    assert!(
        given_up_after <= Duration::from_secs(90),
        "a vanished peer was kept for {given_up_after:?}"
    );
}
