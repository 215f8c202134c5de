//! Engine tests without sockets: two engines joined by an in-memory IP "wire".

use std::{
    collections::VecDeque,
    net::{Ipv4Addr, SocketAddrV4},
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

/// The "client" engine (plain, connects out) and the middlebox engine listening on a
/// foreign address.
fn pair() -> (Engine<Pipe>, Engine<Pipe>) {
    let (a, b) = pipe_pair();
    let client = Engine::new(a, EngineConfig::new(CLIENT, ports())).unwrap();
    let mut config = EngineConfig::new(MIDDLEBOX, ports());
    config.listen = vec![PRIMARY];
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
    let (mut client, mut mb) = pair();
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
    assert_eq!(mb.connections(), 1);
    assert_eq!(mb.half_open(), 0);

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
    let (mut client, mut mb) = pair();
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
    let (mut client, mut mb) = pair();
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
fn bursts_of_connection_requests_are_all_accepted() {
    // Bursts of SYNs that arrive in the same poll: each gets a socket of its own.
    let (mut client, mut mb) = pair();
    for _round in 0..3 {
        let conns: Vec<ConnId> = (0..8).map(|_| client.connect(PRIMARY).unwrap()).collect();
        let mut connected = 0;
        let mut accepted = 0;
        pump(&mut client, &mut mb, |_, _, ec, em| {
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
            client.abort(conn).unwrap();
        }
    }
    assert_eq!(mb.counters().accepted, 24);
    assert_eq!(mb.half_open(), 0);
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
    let (mut client, _mb) = pair();
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
    let (mut client, mut mb) = pair();
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
    let (mut client, mut mb) = pair();
    let other = SocketAddrV4::new(*PRIMARY.ip(), 7100);
    mb.listen(other);
    mb.listen(other);
    assert_eq!(mb.listening(), [PRIMARY, other]);
    let conn = client.connect(other).unwrap();
    pump(&mut client, &mut mb, |_, _, ec, _| {
        ec.contains(&EngineEvent::Connected { conn })
    });
    mb.unlisten(PRIMARY);
    assert_eq!(mb.listening(), [other]);
    let refused = client.connect(PRIMARY).unwrap();
    pump(&mut client, &mut mb, |_, _, ec, _| {
        ec.contains(&EngineEvent::Refused { conn: refused })
    });
}

#[test]
fn a_retransmitted_syn_does_not_open_a_second_socket() {
    let (mut client, mut mb) = pair();
    let mut events = Vec::new();
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
}

/// Gotcha (a) of the design notes: a receive buffer that fills to a zero window must open
/// again once the application reads, even when it reads slowly and late.
#[test]
fn a_zero_window_opens_again_when_the_reader_catches_up() {
    let (mut client, mut mb) = pair();
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
    let (mut client, mut mb) = pair();
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
    let (a, b) = pipe_pair();
    let mut client = Engine::new(a, EngineConfig::new(CLIENT, ports())).unwrap();
    let mut config = EngineConfig::new(MIDDLEBOX, ports());
    config.listen = vec![PRIMARY];
    config.max_connections = 2;
    let mut mb = Engine::new(b, config).unwrap();
    let conns: Vec<ConnId> = (0..3).map(|_| client.connect(PRIMARY).unwrap()).collect();
    let (mut connected, mut refused) = (0, 0);
    pump(&mut client, &mut mb, |_, _, ec, _| {
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
    assert_eq!(mb.counters().overloaded, 1);
    assert_eq!(mb.connections(), 2);
}

#[test]
fn thousands_of_connections_each_get_their_own_bytes() {
    // Every connection carries its own index; the flow table must hand each segment to
    // its socket among thousands.
    let (a, b) = pipe_pair();
    let mut config = EngineConfig::new(CLIENT, ports());
    config.rx_buffer = 4096;
    config.tx_buffer = 4096;
    config.max_connections = 5000;
    let mut client = Engine::new(a, config).unwrap();
    let mut config = EngineConfig::new(MIDDLEBOX, ports());
    config.listen = vec![PRIMARY];
    config.rx_buffer = 4096;
    config.tx_buffer = 4096;
    config.max_connections = 5000;
    let mut mb = Engine::new(b, config).unwrap();
    const N: usize = 1000;
    let conns: Vec<ConnId> = (0..N).map(|_| client.connect(PRIMARY).unwrap()).collect();
    let mut by_client_port = std::collections::HashMap::new();
    for (i, &c) in conns.iter().enumerate() {
        by_client_port.insert(i, c);
    }
    let mut sent = vec![false; N];
    let mut received: std::collections::HashMap<ConnId, (SocketAddrV4, Vec<u8>)> =
        std::collections::HashMap::new();
    let mut buf = [0u8; 64];
    pump(&mut client, &mut mb, |c, m, ec, em| {
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
            .position(|&conn| client.endpoints(conn).unwrap().0 == *remote)
            .unwrap();
        assert_eq!(bytes, format!("connection {i}").as_bytes());
    }
    assert_eq!(mb.connections(), N);
    assert_eq!(mb.half_open(), 0);
}

#[test]
fn a_new_connection_may_reuse_the_tuple_of_one_in_time_wait() {
    // The middlebox closes first, so it holds the connection in TIME-WAIT; the client then
    // connects again from the same port, which a kernel client may well do.
    let (mut client, mut mb) = pair();
    let first = client.connect(PRIMARY).unwrap();
    let client_port = client.endpoints(first).map(|(l, _)| l.port()).unwrap_or(0);
    let mut server = None;
    let mut closed = false;
    pump(&mut client, &mut mb, |c, m, ec, em| {
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
    assert_eq!(mb.lingering(), 1, "the middlebox holds TIME-WAIT");
    // Replay the client side's SYN from the same port by hand: a fresh client engine
    // whose only free port is the one used before.
    let (a, b) = pipe_pair();
    let mut again = Engine::new(
        a,
        EngineConfig::new(
            CLIENT,
            PortRange {
                first: client_port,
                last: client_port,
            },
        ),
    )
    .unwrap();
    // Wire the new client to the same middlebox: move frames by hand between the pipes.
    let second = again.connect(PRIMARY).unwrap();
    let mut connected = false;
    for _ in 0..1000 {
        let mut events = Vec::new();
        again.poll(Instant::now(), &mut events);
        connected |= events.contains(&EngineEvent::Connected { conn: second });
        assert!(
            !events.contains(&EngineEvent::Refused { conn: second }),
            "the request was refused"
        );
        while let Some(frame) = b.inbox.borrow_mut().pop_front() {
            mb.device().inbox.borrow_mut().push_back(frame);
        }
        let mut events = Vec::new();
        mb.poll(Instant::now(), &mut events);
        while let Some(frame) = mb.device().outbox.borrow_mut().pop_front() {
            b.outbox.borrow_mut().push_back(frame);
        }
        if connected {
            break;
        }
    }
    assert!(connected, "no connection over the reused tuple");
    assert_eq!(mb.counters().reused_tuples, 1);
}

/// Polls both engines without time passing until neither has anything left to do now.
fn settle(a: &mut Engine<Pipe>, b: &mut Engine<Pipe>) {
    let mut events = Vec::new();
    for _ in 0..1000 {
        let now = Instant::now();
        let busy = a.poll(now, &mut events) | b.poll(now, &mut events);
        events.clear();
        if !busy
            && a.poll_delay(now) != Some(Duration::ZERO)
            && b.poll_delay(now) != Some(Duration::ZERO)
        {
            return;
        }
    }
    panic!("the engines never settled");
}

/// A read that finds nothing and a send into a full buffer change nothing, so they must
/// not make the next poll due at once: a worker that tries every side of a stalled session
/// on each round would otherwise spin on a core instead of sleeping until a frame comes.
#[test]
fn calls_that_move_nothing_leave_the_engine_free_to_sleep() {
    let (mut client, mut mb) = pair();
    let conn = client.connect(PRIMARY).unwrap();
    let mut server = None;
    pump(&mut client, &mut mb, |_, _, _, em| {
        for e in em {
            if let EngineEvent::Accepted { conn, .. } = *e {
                server = Some(conn);
            }
        }
        server.is_some()
    });
    let server = server.unwrap();
    settle(&mut client, &mut mb);

    // Nothing to read.
    let mut buf = [0u8; 1000];
    assert_eq!(mb.recv(server, &mut buf).unwrap(), 0);
    assert_ne!(mb.poll_delay(Instant::now()), Some(Duration::ZERO));

    // Fill the middlebox's window and the client's send buffer; nobody reads.
    let data = vec![7u8; 64 * 1024];
    for _ in 0..100 {
        let _ = client.send(conn, &data).unwrap();
        settle(&mut client, &mut mb);
        if client.send_space(conn).unwrap() == 0 {
            break;
        }
    }
    assert_eq!(
        client.send_space(conn).unwrap(),
        0,
        "the send buffer never filled"
    );
    assert_eq!(client.send(conn, &data).unwrap(), 0);
    assert_ne!(client.poll_delay(Instant::now()), Some(Duration::ZERO));

    // A read that takes bytes does make a poll due: the window update must go out.
    assert!(mb.recv(server, &mut buf).unwrap() > 0);
    assert_eq!(mb.poll_delay(Instant::now()), Some(Duration::ZERO));
}
