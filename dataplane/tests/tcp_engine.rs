//! Privileged integration tests of the TCP engine over AF_XDP: two network namespaces
//! joined by a veth pair. Namespace A holds real kernel TCP endpoints; namespace B holds
//! the XDP program, one AF_XDP socket and an engine thread that terminates A's connection
//! to a foreign address (198.18.200.50:7000, which nobody owns) as that address.
//!
//! These need root, `ip`, `ethtool` and AF_XDP. When something is missing they print
//! `skipped: <why>` and pass, except under CI=true, where that is a failure.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step should fail the test"
)]

use std::{
    collections::{HashMap, VecDeque},
    io::{Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use ncp_dataplane::{
    config::{PortRange, XdpAttachMode},
    engine::{ConnId, Engine, EngineConfig, EngineCounters, EngineEvent},
    rules::{Ipv4Prefix, RedirectRule},
    xdp::device::{DeviceConfig, DeviceCounters, MacAddr, XskDevice},
    xdp::steering::Steering,
    xdp::xsk::{XskCounters, XskOptions, XskSocket},
};
use ncp_testbed::workload::seeded_bytes;

const A_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 1);
const B_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 2);
const PRIMARY: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 200, 50), 7000);
const SERVER: SocketAddrV4 = SocketAddrV4::new(A_ADDR, 7001);
/// The engine's ports for outgoing connections. They lie below the kernel's ephemeral
/// range (32768-60999 by default), so B's kernel never picks one of them for itself; the
/// frames for them are redirected to the engine anyway, so the kernel never sees them.
const OWNED: PortRange = PortRange {
    first: 20000,
    last: 20999,
};
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether this machine can run `what` (named in the skip message); under CI=true a
/// missing piece is a failure.
fn ready(what: &str) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid(2) has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root".to_owned());
    }
    for tool in ["ip", "ethtool"] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            missing.push(format!("`{tool}` on PATH"));
        }
    }
    // SAFETY: plain socket(2) probe; the descriptor is closed right away.
    let fd = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW, 0) };
    if fd < 0 {
        missing.push(format!(
            "AF_XDP sockets ({})",
            std::io::Error::last_os_error()
        ));
    } else {
        // SAFETY: closing the descriptor just opened.
        unsafe { libc::close(fd) };
    }
    if missing.is_empty() {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    assert!(!ci, "{what}: CI=true but missing {}", missing.join(", "));
    let _ = writeln!(
        std::io::stderr(),
        "skipped: {what}: missing {}",
        missing.join(", ")
    );
    false
}

fn run(argv: &[&str]) {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} failed: {}",
        argv.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mac_string(mac: MacAddr) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Moves the calling thread into a named network namespace.
fn enter_netns(name: &str) {
    ncp_testbed::Netns::open(name).unwrap().enter().unwrap();
}

/// What the engine thread reports when it stops.
#[derive(Debug)]
struct EngineReport {
    engine: EngineCounters,
    device: DeviceCounters,
    socket: XskCounters,
}

/// The two namespaces, their veth pair and the engine thread; all removed on drop, also
/// when the test fails half-way.
struct Scene {
    ns_a: String,
    ns_b: String,
    stop: Arc<AtomicBool>,
    engine: Option<JoinHandle<EngineReport>>,
}

impl Scene {
    /// The scene [`Scene::new`] builds, or `None` (having said why, naming the scene)
    /// when this machine cannot run it; under CI=true a missing piece fails the test
    /// instead (see [`ready`]).
    fn if_ready(tag: &str, index: u8) -> Option<Scene> {
        ready(&format!("scene {tag}")).then(|| Scene::new(tag, index))
    }

    /// `tag` keeps concurrently running tests apart (namespaces, interfaces, MACs).
    fn new(tag: &str, index: u8) -> Scene {
        let scene = Scene {
            ns_a: format!("nce-{tag}-a"),
            ns_b: format!("nce-{tag}-b"),
            stop: Arc::new(AtomicBool::new(false)),
            engine: None,
        };
        scene.remove_namespaces();
        let (va, vb) = (format!("nce{tag}a"), format!("nce{tag}b"));
        let (mac_a, mac_b) = (Self::mac_a(index), Self::mac_b(index));
        run(&["ip", "netns", "add", &scene.ns_a]);
        run(&["ip", "netns", "add", &scene.ns_b]);
        run(&[
            "ip",
            "link",
            "add",
            &va,
            "address",
            &mac_string(mac_a),
            "netns",
            &scene.ns_a,
            "type",
            "veth",
            "peer",
            "name",
            &vb,
            "address",
            &mac_string(mac_b),
            "netns",
            &scene.ns_b,
        ]);
        for (ns, dev, addr) in [(&scene.ns_a, &va, A_ADDR), (&scene.ns_b, &vb, B_ADDR)] {
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                dev,
            ]);
            run(&["ip", "-n", ns, "link", "set", dev, "up"]);
            // Checksum offload would leave partial checksums that smoltcp rejects.
            run(&["ip", "netns", "exec", ns, "ethtool", "-K", dev, "tx", "off"]);
        }
        // A sends frames for the foreign address straight to B's MAC, as the redirection
        // switch would.
        let primary = PRIMARY.ip().to_string();
        run(&[
            "ip",
            "-n",
            &scene.ns_a,
            "route",
            "add",
            &format!("{primary}/32"),
            "dev",
            &va,
        ]);
        run(&[
            "ip",
            "-n",
            &scene.ns_a,
            "neigh",
            "replace",
            &primary,
            "lladdr",
            &mac_string(mac_b),
            "dev",
            &va,
            "nud",
            "permanent",
        ]);
        scene
    }

    fn mac_a(index: u8) -> MacAddr {
        [0x02, 0x4e, 0x43, 0x45, index, 0x0a]
    }

    fn mac_b(index: u8) -> MacAddr {
        [0x02, 0x4e, 0x43, 0x45, index, 0x0b]
    }

    fn remove_namespaces(&self) {
        for ns in [&self.ns_a, &self.ns_b] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    /// Starts the engine thread in B running `app`, and waits until it is ready.
    fn start_engine(&mut self, tag: &str, index: u8, mut app: impl App + Send + 'static) {
        let ns_b = self.ns_b.clone();
        let interface = format!("nce{tag}b");
        let stop = self.stop.clone();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let mac = Self::mac_b(index);
        let handle = std::thread::spawn(move || {
            enter_netns(&ns_b);
            let setup = || -> Result<(Steering, Engine<XskDevice>), String> {
                let mut steering =
                    Steering::attach(&interface, XdpAttachMode::Auto).map_err(|e| e.to_string())?;
                steering
                    .insert_rule(&RedirectRule {
                        id: 1,
                        source: Ipv4Prefix::new(A_ADDR, 32).map_err(|e| e.to_string())?,
                        source_port: None,
                        destination: *PRIMARY.ip(),
                        destination_port: PRIMARY.port(),
                    })
                    .map_err(|e| e.to_string())?;
                steering
                    .set_owned_endpoints(B_ADDR, OWNED)
                    .map_err(|e| e.to_string())?;
                let socket = XskSocket::open(&XskOptions {
                    interface: interface.clone(),
                    queue: 0,
                    frames: 4096,
                    zero_copy: false,
                })
                .map_err(|e| e.to_string())?;
                steering
                    .register_socket(0, socket.raw_fd())
                    .map_err(|e| e.to_string())?;
                let device =
                    XskDevice::new(socket, &DeviceConfig::new(mac)).map_err(|e| e.to_string())?;
                let mut config = EngineConfig::new(B_ADDR, OWNED);
                config.listen = vec![PRIMARY];
                let engine = Engine::new(device, config).map_err(|e| e.to_string())?;
                Ok((steering, engine))
            };
            let (steering, mut engine) = match setup() {
                Ok(parts) => {
                    let _ = ready_tx.send(Ok(()));
                    parts
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    panic!("engine set-up failed");
                }
            };
            let mut events = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let now = Instant::now();
                let mut active = engine.poll(now, &mut events);
                for event in events.drain(..) {
                    app.on_event(&mut engine, event);
                }
                active |= app.pump(&mut engine);
                if !active {
                    // Sleep until a frame arrives or smoltcp's next timer, at most 5 ms so
                    // the stop flag is seen.
                    let delay = engine
                        .poll_delay(Instant::now())
                        .unwrap_or(Duration::from_millis(5))
                        .min(Duration::from_millis(5));
                    let ms = i32::try_from(delay.as_millis()).unwrap_or(5);
                    if ms > 0 {
                        engine
                            .device()
                            .wait(ms)
                            .expect("waiting on the AF_XDP socket");
                    }
                }
            }
            let report = EngineReport {
                engine: engine.counters(),
                device: engine.device().counters(),
                socket: engine.device().socket_counters(),
            };
            drop(engine);
            drop(steering);
            report
        });
        self.engine = Some(handle);
        match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("engine set-up failed: {e}"),
            Err(e) => panic!("engine never became ready: {e}"),
        }
    }

    /// Stops the engine thread and returns its counters.
    fn stop_engine(&mut self) -> EngineReport {
        self.stop.store(true, Ordering::Relaxed);
        self.engine
            .take()
            .expect("engine running")
            .join()
            .expect("engine thread")
    }

    /// Runs `f` on a thread inside namespace A.
    fn in_a<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
        let ns = self.ns_a.clone();
        std::thread::spawn(move || {
            enter_netns(&ns);
            f()
        })
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.engine.take() {
            let _ = handle.join();
        }
        self.remove_namespaces();
    }
}

/// The application on top of the engine, driven by the engine thread's loop.
trait App {
    fn on_event(&mut self, engine: &mut Engine<XskDevice>, event: EngineEvent);
    /// Moves buffered bytes; returns whether it did anything.
    fn pump(&mut self, engine: &mut Engine<XskDevice>) -> bool;
}

/// Bytes waiting to be written to one connection, bounded only by the test's data size:
/// the engine's receive buffers are always drained completely (see the engine docs).
#[derive(Default)]
struct Outbox {
    bytes: VecDeque<u8>,
    /// The source side finished: send FIN once the bytes are out.
    finish: bool,
    finished: bool,
}

impl Outbox {
    /// Reads everything `from` has into the outbox.
    fn drain_from(&mut self, engine: &mut Engine<XskDevice>, from: ConnId) {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = engine.recv(from, &mut buf).unwrap_or(0);
            if n == 0 {
                break;
            }
            self.bytes.extend(&buf[..n]);
        }
    }

    /// Writes what the send buffer of `to` takes; closes `to` after the last byte.
    fn flush_to(&mut self, engine: &mut Engine<XskDevice>, to: ConnId) -> bool {
        let mut moved = false;
        while !self.bytes.is_empty() {
            let (front, _) = self.bytes.as_slices();
            let n = engine.send(to, front).unwrap_or(0);
            if n == 0 {
                break;
            }
            self.bytes.drain(..n);
            moved = true;
        }
        if self.finish && !self.finished && self.bytes.is_empty() {
            self.finished = true;
            let _ = engine.close(to);
            moved = true;
        }
        moved
    }
}

/// Echoes every accepted connection back to its client.
#[derive(Default)]
struct Echo {
    conns: HashMap<ConnId, Outbox>,
    /// A slow reader: reads nothing until this long after the accept...
    hold: Duration,
    /// ...and then at most this many bytes per event (0: everything).
    chunk: usize,
    accepted_at: HashMap<ConnId, Instant>,
}

impl App for Echo {
    fn on_event(&mut self, engine: &mut Engine<XskDevice>, event: EngineEvent) {
        match event {
            EngineEvent::Accepted { conn, local, .. } => {
                assert_eq!(local, PRIMARY, "accepted as the primary");
                self.conns.insert(conn, Outbox::default());
                self.accepted_at.insert(conn, Instant::now());
            }
            EngineEvent::Readable { conn } => {
                let held = self
                    .accepted_at
                    .get(&conn)
                    .is_some_and(|at| at.elapsed() < self.hold);
                if let Some(out) = self.conns.get_mut(&conn)
                    && !held
                {
                    if self.chunk == 0 {
                        out.drain_from(engine, conn);
                    } else {
                        let mut buf = vec![0u8; self.chunk];
                        let n = engine.recv(conn, &mut buf).unwrap_or(0);
                        out.bytes.extend(&buf[..n]);
                    }
                }
            }
            EngineEvent::PeerClosed { conn } => {
                if let Some(out) = self.conns.get_mut(&conn) {
                    out.finish = true;
                }
            }
            EngineEvent::Closed { conn } | EngineEvent::Reset { conn } => {
                self.conns.remove(&conn);
            }
            _ => {}
        }
    }

    fn pump(&mut self, engine: &mut Engine<XskDevice>) -> bool {
        let mut moved = false;
        for (&conn, out) in self.conns.iter_mut() {
            moved |= out.flush_to(engine, conn);
        }
        moved
    }
}

/// A one-connection-per-client relay: each accepted client gets its own connection to
/// the upstream server, and bytes flow both ways.
struct Relay {
    upstream: SocketAddrV4,
    /// Each connection's partner.
    peer: HashMap<ConnId, ConnId>,
    /// Bytes waiting to be written to the connection named by the key.
    outbox: HashMap<ConnId, Outbox>,
    /// Upstream connections still in their handshake.
    connecting: Vec<ConnId>,
}

impl Relay {
    fn new(upstream: SocketAddrV4) -> Self {
        Self {
            upstream,
            peer: HashMap::new(),
            outbox: HashMap::new(),
            connecting: Vec::new(),
        }
    }

    fn forget(&mut self, conn: ConnId) {
        self.outbox.remove(&conn);
        self.connecting.retain(|&c| c != conn);
        if let Some(other) = self.peer.remove(&conn) {
            self.peer.remove(&other);
        }
    }
}

impl App for Relay {
    fn on_event(&mut self, engine: &mut Engine<XskDevice>, event: EngineEvent) {
        match event {
            EngineEvent::Accepted { conn, .. } => {
                let up = engine.connect(self.upstream).expect("connect upstream");
                self.peer.insert(conn, up);
                self.peer.insert(up, conn);
                self.outbox.insert(conn, Outbox::default());
                self.outbox.insert(up, Outbox::default());
                self.connecting.push(up);
            }
            EngineEvent::Connected { conn } => self.connecting.retain(|&c| c != conn),
            EngineEvent::Readable { conn } => {
                if let Some(&other) = self.peer.get(&conn)
                    && let Some(out) = self.outbox.get_mut(&other)
                {
                    out.drain_from(engine, conn);
                }
            }
            EngineEvent::PeerClosed { conn } => {
                if let Some(&other) = self.peer.get(&conn)
                    && let Some(out) = self.outbox.get_mut(&other)
                {
                    out.finish = true;
                }
            }
            EngineEvent::Refused { conn } | EngineEvent::Reset { conn } => {
                if let Some(&other) = self.peer.get(&conn) {
                    let _ = engine.abort(other);
                }
                self.forget(conn);
            }
            EngineEvent::Closed { conn } => {
                self.outbox.remove(&conn);
            }
            _ => {}
        }
    }

    fn pump(&mut self, engine: &mut Engine<XskDevice>) -> bool {
        let mut moved = false;
        for (&conn, out) in self.outbox.iter_mut() {
            if !self.connecting.contains(&conn) {
                moved |= out.flush_to(engine, conn);
            }
        }
        moved
    }
}

fn connect_with_retry(target: SocketAddrV4) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect_timeout(&SocketAddr::V4(target), Duration::from_secs(3)) {
            Ok(stream) => {
                stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
                return stream;
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("connect to {target}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("connect to {target}: {e}"),
        }
    }
}

/// Sends `data` on a writer thread while reading everything back until EOF.
fn exchange(stream: TcpStream, data: Vec<u8>) -> Vec<u8> {
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        writer.write_all(&data).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut reader = stream;
    let mut received = Vec::new();
    reader.read_to_end(&mut received).unwrap();
    sender.join().unwrap();
    received
}

#[test]
fn engine_echoes_a_kernel_client_as_the_foreign_address() {
    let Some(mut scene) = Scene::if_ready("echo", 1) else {
        return;
    };
    scene.start_engine("echo", 1, Echo::default());

    // 8 MiB by default; NCP_ECHO_MIB makes it longer for a throughput look.
    let mib = std::env::var("NCP_ECHO_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(8);
    let data = seeded_bytes(0x5eed, mib << 20);
    let expected = data.clone();
    let client = scene.in_a(move || {
        let stream = connect_with_retry(PRIMARY);
        let local = stream.local_addr().unwrap();
        let peer = stream.peer_addr().unwrap();
        let started = Instant::now();
        let echoed = exchange(stream, data);
        (local, peer, echoed, started.elapsed())
    });
    let (local, peer, echoed, elapsed) = client.join().unwrap();
    assert_eq!(peer, SocketAddr::V4(PRIMARY));
    assert_eq!(local.ip(), std::net::IpAddr::V4(A_ADDR));
    assert_eq!(echoed.len(), expected.len(), "echo length");
    if let Some(at) = echoed.iter().zip(&expected).position(|(a, b)| a != b) {
        panic!("echo differs first at byte {at}");
    }
    let report = scene.stop_engine();
    let mb = expected.len() as f64 / 1e6;
    eprintln!(
        "echo: {mb:.1} MB each way in {elapsed:?} ({:.0} MB/s each way); {report:?}",
        mb / elapsed.as_secs_f64()
    );
    assert_eq!(report.engine.accepted, 1);
    assert_eq!(report.engine.reset, 0);
    assert_eq!(report.device.tx_no_neighbour, 0, "A's MAC was learned");
    assert_eq!(report.socket.rx_bad_desc, 0);
}

#[test]
fn engine_relays_between_a_kernel_client_and_a_kernel_server() {
    let Some(mut scene) = Scene::if_ready("relay", 2) else {
        return;
    };

    // The upstream server in A: reads the whole request, then answers and closes.
    let request = seeded_bytes(0x1234, 3 << 20);
    let answer = seeded_bytes(0xabcd, 2 << 20);
    let (bound_tx, bound_rx) = mpsc::channel();
    let server_answer = answer.clone();
    let server = scene.in_a(move || {
        let listener = TcpListener::bind(SERVER).unwrap();
        bound_tx.send(()).unwrap();
        let (mut stream, from) = listener.accept().unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).unwrap();
        stream.write_all(&server_answer).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        // Wait for the relay's FIN so the close is clean on both sides.
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        (from, got)
    });
    bound_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    scene.start_engine("relay", 2, Relay::new(SERVER));

    let client_request = request.clone();
    let client = scene.in_a(move || {
        let stream = connect_with_retry(PRIMARY);
        exchange(stream, client_request)
    });
    let got_answer = client.join().unwrap();
    let (from, got_request) = server.join().unwrap();

    match from {
        SocketAddr::V4(from) => {
            assert_eq!(*from.ip(), B_ADDR, "upstream connection from B's address");
            assert!(
                (OWNED.first..=OWNED.last).contains(&from.port()),
                "port {} outside the owned range",
                from.port()
            );
        }
        SocketAddr::V6(from) => panic!("unexpected peer {from}"),
    }
    assert!(
        got_request == request,
        "server got the client's exact bytes"
    );
    assert!(got_answer == answer, "client got the server's exact answer");
    let report = scene.stop_engine();
    eprintln!("relay: {report:?}");
    assert_eq!(report.engine.accepted, 1);
    assert_eq!(report.engine.connected, 1);
    assert_eq!(report.engine.reset, 0);
}

#[test]
fn engine_takes_a_burst_of_kernel_clients() {
    let Some(mut scene) = Scene::if_ready("burst", 3) else {
        return;
    };
    // The SYNs of all clients arrive within a few frames of each other; each gets a
    // socket of its own.
    scene.start_engine("burst", 3, Echo::default());
    const CLIENTS: usize = 32;
    let barrier = Arc::new(std::sync::Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let barrier = barrier.clone();
            scene.in_a(move || {
                let data = seeded_bytes(i as u64 + 1, 256 << 10);
                barrier.wait();
                // No retry: a refused connection fails the test.
                let stream =
                    TcpStream::connect_timeout(&SocketAddr::V4(PRIMARY), Duration::from_secs(5))
                        .unwrap_or_else(|e| panic!("client {i}: {e}"));
                stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
                let echoed = exchange(stream, data.clone());
                assert!(echoed == data, "client {i}: echo differs");
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
    let report = scene.stop_engine();
    eprintln!("burst: {report:?}");
    assert_eq!(report.engine.accepted, CLIENTS as u64);
    assert_eq!(report.engine.reset, 0);
}

#[test]
fn engine_recovers_from_a_full_receive_buffer() {
    let Some(mut scene) = Scene::if_ready("zwin", 4) else {
        return;
    };
    // The engine reads nothing for a while, so its 256 KiB receive buffer fills and it
    // advertises a zero window to the kernel client, then reads in small bites.
    scene.start_engine(
        "zwin",
        4,
        Echo {
            hold: Duration::from_millis(1500),
            chunk: 4096,
            ..Echo::default()
        },
    );
    let data = seeded_bytes(0x2e80, 4 << 20);
    let expected = data.clone();
    let client = scene.in_a(move || exchange(connect_with_retry(PRIMARY), data));
    let echoed = client.join().unwrap();
    assert_eq!(echoed.len(), expected.len());
    assert!(echoed == expected, "echo differs");
    let report = scene.stop_engine();
    eprintln!("zero window: {report:?}");
    assert_eq!(report.engine.reset, 0);
}
