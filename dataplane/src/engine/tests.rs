//! Engine tests without sockets: two engines joined by an in-memory IP "wire".

use std::{
    cell::RefCell,
    collections::VecDeque,
    net::{Ipv4Addr, SocketAddrV4},
    rc::Rc,
    time::{Duration, Instant},
};

use smoltcp::phy::{self, DeviceCapabilities, Medium};

use super::*;

type Queue = Rc<RefCell<VecDeque<Vec<u8>>>>;

/// One end of an in-memory IP link.
struct Pipe {
    inbox: Queue,
    outbox: Queue,
}

fn pipe_pair() -> (Pipe, Pipe) {
    let ab: Queue = Rc::default();
    let ba: Queue = Rc::default();
    (
        Pipe {
            inbox: ba.clone(),
            outbox: ab.clone(),
        },
        Pipe {
            inbox: ab,
            outbox: ba,
        },
    )
}

struct PipeRx(Vec<u8>);
struct PipeTx(Queue);

impl phy::RxToken for PipeRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for PipeTx {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0; len];
        let r = f(&mut buf);
        self.0.borrow_mut().push_back(buf);
        r
    }
}

impl phy::Device for Pipe {
    type RxToken<'a> = PipeRx;
    type TxToken<'a> = PipeTx;

    fn receive(
        &mut self,
        _: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let frame = self.inbox.borrow_mut().pop_front()?;
        Some((PipeRx(frame), PipeTx(self.outbox.clone())))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        Some(PipeTx(self.outbox.clone()))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = 1500;
        caps
    }
}

impl EngineDevice for Pipe {}

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 1);
const MIDDLEBOX: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 2);
const PRIMARY: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 200, 50), 7000);

fn ports() -> PortRange {
    PortRange {
        first: 20000,
        last: 20999,
    }
}

/// The "client" engine (plain, connects out) and the middlebox engine listening on a
/// foreign address.
fn pair(listeners: usize) -> (Engine<Pipe>, Engine<Pipe>) {
    let (a, b) = pipe_pair();
    let client = Engine::new(a, EngineConfig::new(CLIENT, ports())).unwrap();
    let mut config = EngineConfig::new(MIDDLEBOX, ports());
    config.listen = vec![PRIMARY];
    config.listeners_per_endpoint = listeners;
    config.rx_buffer = 64 * 1024;
    config.tx_buffer = 64 * 1024;
    let middlebox = Engine::new(b, config).unwrap();
    (client, middlebox)
}

/// Polls both engines until `done` says so (or panics after many rounds).
fn pump(
    a: &mut Engine<Pipe>,
    b: &mut Engine<Pipe>,
    mut step: impl FnMut(&mut Engine<Pipe>, &mut Engine<Pipe>, &[EngineEvent], &[EngineEvent]) -> bool,
) {
    let mut ea = Vec::new();
    let mut eb = Vec::new();
    for _ in 0..100_000 {
        ea.clear();
        eb.clear();
        a.poll(Instant::now(), &mut ea);
        b.poll(Instant::now(), &mut eb);
        if step(a, b, &ea, &eb) {
            return;
        }
    }
    panic!("did not finish");
}

#[test]
fn accepts_on_a_foreign_address_and_echoes() {
    let (mut client, mut mb) = pair(2);
    let conn = client.connect(PRIMARY).unwrap();
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut sent = 0;
    let mut echoed = Vec::new();
    let mut accepted = None;
    let mut pending: VecDeque<u8> = VecDeque::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut connected = false;
    pump(&mut client, &mut mb, |c, m, ec, em| {
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
    assert_eq!(mb.counters().accepted, 1);
    assert_eq!(mb.listeners(), 2, "the pool was re-armed after the accept");

    // Clean close from both sides: each sees PeerClosed, then Closed.
    let server = accepted.unwrap();
    client.close(conn).unwrap();
    let mut client_done = false;
    let mut server_done = false;
    let mut server_saw_fin = false;
    pump(&mut client, &mut mb, |c, m, ec, em| {
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
        mb.send(server, b"x"),
        Err(EngineError::UnknownConnection(server))
    );
    assert_eq!(mb.connections(), 0);
    // The client's port is held through TIME-WAIT.
    assert_eq!(client.ports_in_use(), 1);
}

#[test]
fn connection_to_a_closed_port_is_refused() {
    let (mut client, mut mb) = pair(1);
    let nobody = SocketAddrV4::new(*PRIMARY.ip(), 7999);
    let conn = client.connect(nobody).unwrap();
    let mut refused = false;
    pump(&mut client, &mut mb, |_, _, ec, _| {
        refused |= ec.contains(&EngineEvent::Refused { conn });
        refused
    });
    // The port went back once smoltcp was done with the socket.
    let mut events = Vec::new();
    client.poll(Instant::now(), &mut events);
    assert_eq!(client.ports_in_use(), 0);
    assert_eq!(client.counters().refused, 1);
}

#[test]
fn abort_resets_the_peer() {
    let (mut client, mut mb) = pair(1);
    let conn = client.connect(PRIMARY).unwrap();
    let mut server = None;
    pump(&mut client, &mut mb, |_, _, ec, em| {
        for e in em {
            if let EngineEvent::Accepted { conn, .. } = *e {
                server = Some(conn);
            }
        }
        server.is_some() && ec.contains(&EngineEvent::Connected { conn })
    });
    let server = server.unwrap();
    client.abort(conn).unwrap();
    assert_eq!(
        client.abort(conn),
        Err(EngineError::UnknownConnection(conn))
    );
    let mut reset = false;
    pump(&mut client, &mut mb, |_, _, ec, em| {
        assert!(ec.is_empty(), "no events after abort: {ec:?}");
        reset |= em.contains(&EngineEvent::Reset { conn: server });
        reset
    });
    assert_eq!(mb.counters().reset, 1);
}

#[test]
fn listener_pool_is_rearmed_for_successive_bursts() {
    // One listener, bursts of eight SYNs that arrive in the same poll: re-arming after
    // each SYN gives every one of them a listener.
    let (mut client, mut mb) = pair(1);
    for _round in 0..3 {
        let conns: Vec<ConnId> = (0..8).map(|_| client.connect(PRIMARY).unwrap()).collect();
        let mut connected = 0;
        let mut accepted = 0;
        pump(&mut client, &mut mb, |_, _, ec, em| {
            for e in ec {
                match e {
                    EngineEvent::Connected { .. } => connected += 1,
                    EngineEvent::Refused { .. } => panic!("refused: pool not re-armed"),
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
            client.abort(conn).unwrap();
        }
    }
    assert_eq!(mb.counters().accepted, 24);
    assert_eq!(mb.listeners(), 1);
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
    let (mut client, _mb) = pair(1);
    let bogus = ConnId(999);
    let mut buf = [0u8; 4];
    assert_eq!(
        client.recv(bogus, &mut buf),
        Err(EngineError::UnknownConnection(bogus))
    );
    assert!(client.send(bogus, b"x").is_err());
    assert!(client.close(bogus).is_err());
    assert!(client.abort(bogus).is_err());
    // Sending before the handshake completes is refused, not buffered.
    let conn = client.connect(PRIMARY).unwrap();
    assert_eq!(client.send(conn, b"x"), Err(EngineError::NotWritable(conn)));
}

#[test]
fn unread_bytes_outlive_a_clean_close() {
    let (mut client, mut mb) = pair(1);
    let conn = client.connect(PRIMARY).unwrap();
    let mut server = None;
    let mut sent = false;
    let mut closed_server = false;
    let mut client_closed = false;
    // The server reads nothing until both sides have closed.
    pump(&mut client, &mut mb, |c, m, ec, em| {
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
    let mut events = Vec::new();
    mb.poll(Instant::now(), &mut events);
    assert_eq!(events, vec![EngineEvent::Readable { conn: server }]);
    let mut buf = [0u8; 16];
    assert_eq!(mb.recv(server, &mut buf).unwrap(), 5);
    assert_eq!(&buf[..5], b"hello");
    events.clear();
    mb.poll(Instant::now(), &mut events);
    assert_eq!(
        events,
        vec![
            EngineEvent::PeerClosed { conn: server },
            EngineEvent::Closed { conn: server }
        ]
    );
}

#[test]
fn endpoints_can_be_added_and_removed() {
    let (mut client, mut mb) = pair(2);
    let other = SocketAddrV4::new(*PRIMARY.ip(), 7100);
    mb.listen(other);
    mb.listen(other);
    assert_eq!(mb.listeners(), 4);
    let conn = client.connect(other).unwrap();
    pump(&mut client, &mut mb, |_, _, ec, _| {
        ec.contains(&EngineEvent::Connected { conn })
    });
    mb.unlisten(PRIMARY);
    assert_eq!(mb.listeners(), 2);
    let refused = client.connect(PRIMARY).unwrap();
    pump(&mut client, &mut mb, |_, _, ec, _| {
        ec.contains(&EngineEvent::Refused { conn: refused })
    });
}

#[test]
fn a_retransmitted_syn_does_not_open_a_second_socket() {
    let (mut client, mut mb) = pair(1);
    // First connection: its socket takes slot 0; the re-armed listener the next slot.
    let first = client.connect(PRIMARY).unwrap();
    pump(&mut client, &mut mb, |_, _, ec, _| {
        ec.contains(&EngineEvent::Connected { conn: first })
    });
    // Reset it so that slot 0 becomes free: the next re-armed listener lands there,
    // ahead of the next connection's half-open socket in smoltcp's scan order.
    client.abort(first).unwrap();
    pump(&mut client, &mut mb, |_, m, _, em| {
        em.iter().any(|e| matches!(e, EngineEvent::Reset { .. })) && m.connections() == 0
    });
    let mut events = Vec::new();
    mb.poll(Instant::now(), &mut events);

    let second = client.connect(PRIMARY).unwrap();
    client.poll(Instant::now(), &mut events);
    // The SYN arrives twice (a retransmission), back to back.
    let syn = client.device().outbox.borrow().back().cloned().unwrap();
    client.device().outbox.borrow_mut().push_back(syn);
    let mut accepted = 0;
    let mut connected = false;
    let mut rounds = 0;
    pump(&mut client, &mut mb, |c, _, ec, em| {
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
        if connected {
            rounds += 1;
        }
        // Let a few more rounds pass so a late reset would show.
        if rounds == 1 {
            assert_eq!(c.send(second, b"ping").unwrap(), 4);
        }
        rounds > 20
    });
    assert_eq!(accepted, 1);
    assert_eq!(mb.connections(), 1);
    assert_eq!(mb.half_open(), 0, "no second socket left half-open");
    assert_eq!(mb.counters().duplicate_syn, 1);
}

/// Gotcha (a) of the design notes: a receive buffer that fills to a zero window must open
/// again once the application reads, even when it reads slowly and late.
#[test]
fn a_zero_window_opens_again_when_the_reader_catches_up() {
    let (mut client, mut mb) = pair(1);
    let conn = client.connect(PRIMARY).unwrap();
    let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
    let mut sent = 0;
    let mut server = None;
    let mut got = Vec::new();
    let mut buf = [0u8; 1000];
    let mut stalled_rounds = 0;
    let started = Instant::now();
    pump(&mut client, &mut mb, |c, m, ec, em| {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "stalled at {} bytes",
            got.len()
        );
        for e in em {
            if let EngineEvent::Accepted { conn, .. } = *e {
                server = Some(conn);
            }
        }
        if ec.contains(&EngineEvent::Connected { conn }) || sent > 0 {
            let n = c.send(conn, &data[sent..]).unwrap();
            sent += n;
            if n == 0 {
                stalled_rounds += 1;
            }
        }
        // Read nothing until the sender has been blocked for a while (the window is
        // closed), then only a little per round.
        if let Some(s) = server
            && stalled_rounds > 50
        {
            let n = m.recv(s, &mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        got.len() == data.len()
    });
    assert!(got == data);
}

/// The same with both directions loaded: each side's window updates then travel on
/// segments that also carry data into the other side's closed window.
#[test]
fn zero_windows_both_ways_open_again() {
    let (mut client, mut mb) = pair(1);
    let conn = client.connect(PRIMARY).unwrap();
    let data: Vec<u8> = (0..600_000u32).map(|i| (i % 253) as u8).collect();
    let (mut sent_c, mut sent_m) = (0, 0);
    let mut server = None;
    let (mut got_c, mut got_m) = (Vec::new(), Vec::new());
    let mut buf = [0u8; 1000];
    let mut stalled_rounds = 0;
    let started = Instant::now();
    pump(&mut client, &mut mb, |c, m, ec, em| {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "stalled: client got {}, middlebox got {}",
            got_c.len(),
            got_m.len()
        );
        for e in em {
            if let EngineEvent::Accepted { conn, .. } = *e {
                server = Some(conn);
            }
        }
        let Some(s) = server else { return false };
        if ec.contains(&EngineEvent::Connected { conn }) || sent_c > 0 {
            let a = c.send(conn, &data[sent_c..]).unwrap();
            let b = m.send(s, &data[sent_m..]).unwrap();
            sent_c += a;
            sent_m += b;
            if a == 0 && b == 0 {
                stalled_rounds += 1;
            }
        }
        if stalled_rounds > 50 {
            let n = m.recv(s, &mut buf).unwrap();
            got_m.extend_from_slice(&buf[..n]);
            let n = c.recv(conn, &mut buf).unwrap();
            got_c.extend_from_slice(&buf[..n]);
        }
        got_c.len() == data.len() && got_m.len() == data.len()
    });
    assert!(got_c == data && got_m == data);
}

#[test]
fn a_short_time_wait_frees_the_socket_and_port_early() {
    let (a, b) = pipe_pair();
    let mut config = EngineConfig::new(CLIENT, ports());
    config.time_wait = Duration::ZERO;
    let mut client = Engine::new(a, config).unwrap();
    let mut config = EngineConfig::new(MIDDLEBOX, ports());
    config.listen = vec![PRIMARY];
    let mut mb = Engine::new(b, config).unwrap();
    let conn = client.connect(PRIMARY).unwrap();
    let mut closing = false;
    let mut done = false;
    pump(&mut client, &mut mb, |c, m, ec, em| {
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
    let mut events = Vec::new();
    client.poll(Instant::now(), &mut events);
    assert_eq!(client.lingering(), 0, "no TIME-WAIT kept");
    assert_eq!(client.ports_in_use(), 0);
}
