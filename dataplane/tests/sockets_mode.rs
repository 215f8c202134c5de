//! Privileged tests of the kernel-socket relay (`--mode sockets`) on the paper's test bed:
//! the source host talks to the primary's address, a static neighbour entry sends those
//! frames to the middlebox, whose nftables rule redirects them to the relay; the relay
//! copies the stream to the primary (production network) and the replica (replication
//! network, through `replica_interface = "eth1"`).
//!
//! The relay runs in this test process, on a thread moved into the middlebox's network
//! namespace (its worker threads and the `nft` it runs inherit that namespace). Small Rust
//! clients and servers run the same way in the other hosts' namespaces; redis runs as
//! real processes started with `ip netns exec`. One test runs the `ncp-middlebox` binary
//! instead, to check the wiring (control-socket stats, clean stop on SIGTERM).
//!
//! Each test has its own test bed prefix (`nso1`…`nso6`) and they run one at a time.
//! Throughput figures they print are for information only: on the two-core test machine
//! the Open vSwitch userspace datapath, which carries every byte three times on the relay
//! path (to the middlebox, to the primary, to the replica), sets the pace.
//!
//! They need root, Open vSwitch, nftables (and redis for two of them). When those are
//! missing the tests print `skipped: …` and return, except under CI=true, where that is a
//! failure.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step should fail the test"
)]

mod support;

use support::{in_netns, redis, serial, wait_bounded};

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use ncp_dataplane::{
    config::Config,
    control::{self, Request, Response},
    sockets::{self, SocketsStats, StatsHandle},
};
use ncp_testbed::{
    Testbed, Topology, UpOptions,
    workload::{redis_writes as redis_workload, seeded_bytes},
};

const STREAM_PORT: u16 = 5001;
const CLOSED_PORT: u16 = 7000;
/// Upper bound for anything a test waits on.
const PATIENCE: Duration = Duration::from_secs(60);

fn sha256(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// The paper test bed, the redirect toward the middlebox and a running relay; everything
/// (relay, servers started through [`Scene::spawn`], namespaces, bridges) goes on drop.
struct Scene {
    bed: Testbed,
    prefix: &'static str,
    stop: Arc<AtomicBool>,
    stats: StatsHandle,
    relay: Option<JoinHandle<anyhow::Result<()>>>,
    children: Vec<Child>,
    primary: Ipv4Addr,
}

impl Scene {
    /// Brings the bed up and starts the relay (in this process) for one service on
    /// `port`, replicated to the replica's replication-network address.
    fn start(prefix: &'static str, port: u16) -> Scene {
        Scene::start_with_budget(prefix, port, 64 << 20)
    }

    /// [`Scene::start`] with the replica budget given: each session reserves about its
    /// size from the worker's 1 GiB, so many parallel sessions need a smaller one.
    fn start_with_budget(prefix: &'static str, port: u16, replica_budget: u64) -> Scene {
        let mut scene = Scene::network(prefix);
        let config = scene.config_toml(port, "").replace(
            "replica_budget_bytes = 67108864",
            &format!("replica_budget_bytes = {replica_budget}"),
        );
        let config = Config::parse(&config).unwrap();
        let (stop, stats) = (Arc::clone(&scene.stop), scene.stats.clone());
        let netns = scene.bed.netns("middlebox").unwrap();
        scene.relay = Some(in_netns(&netns, move || {
            sockets::run(&config, stop, &stats)
        }));
        let deadline = Instant::now() + PATIENCE;
        while !scene.nft_table_present() || scene.stats.snapshot().workers == 0 {
            assert!(
                !scene.relay.as_ref().unwrap().is_finished(),
                "relay exited at start: {:?}",
                scene.relay.take().unwrap().join()
            );
            assert!(Instant::now() < deadline, "relay did not come up");
            thread::sleep(Duration::from_millis(50));
        }
        scene
    }

    /// The test bed and the steering toward the middlebox, no relay yet.
    fn network(prefix: &'static str) -> Scene {
        let topology =
            Topology::load(Path::new(env!("CARGO_MANIFEST_DIR")).join("../testbed/paper.toml"))
                .unwrap();
        let _ = Testbed::down(prefix);
        let bed = Testbed::up(&topology, &UpOptions::with_prefix(prefix)).unwrap();
        let primary = bed.address("primary", "eth0").unwrap();
        let replica = bed.address("replica", "eth1").unwrap();
        let mb0 = bed.address("middlebox", "eth0").unwrap();
        let scene = Scene {
            bed,
            prefix,
            stop: Arc::new(AtomicBool::new(false)),
            stats: StatsHandle::new(),
            relay: None,
            children: Vec::new(),
            primary,
        };

        // The network's part: frames for the primary leave the source toward the
        // middlebox's production NIC (the controller's redirect rule in production).
        let mac = scene.bed.mac("middlebox", "eth0").unwrap();
        let mac = mac.map(|b| format!("{b:02x}")).join(":");
        scene
            .bed
            .exec(
                "source",
                &[
                    "ip",
                    "neigh",
                    "replace",
                    &primary.to_string(),
                    "lladdr",
                    &mac,
                    "dev",
                    "eth0",
                    "nud",
                    "permanent",
                ],
            )
            .unwrap();
        // The userspace datapath needs a moment after the ports appear.
        scene.ping("source", mb0);
        scene.ping("middlebox", primary);
        scene.ping("middlebox", replica);

        scene
    }

    /// Configuration of one service on `port` (plus `extra` top-level lines).
    fn config_toml(&self, port: u16, extra: &str) -> String {
        let address = |host: &str, iface: &str| self.bed.address(host, iface).unwrap();
        let (mb0, mb1) = (address("middlebox", "eth0"), address("middlebox", "eth1"));
        let (primary, replica) = (self.primary, address("replica", "eth1"));
        format!(
            r#"{extra}
[[interfaces]]
name = "eth0"
address = "{mb0}"
queues = [{{ queue = 0 }}]

[[interfaces]]
name = "eth1"
address = "{mb1}"
queues = [{{ queue = 0 }}]

[[services]]
name = "svc"
primary = "{primary}:{port}"
clients = "198.18.1.0/24"
replicas = ["{replica}:{port}"]
replica_interface = "eth1"
replica_budget_bytes = 67108864
connect_timeout_secs = 5
"#
        )
    }

    fn nft_table_present(&self) -> bool {
        self.bed
            .exec("middlebox", &["nft", "list", "table", "ip", "ncp_sockets"])
            .is_ok()
    }

    fn ping(&self, host: &str, to: Ipv4Addr) {
        let to = to.to_string();
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Err(e) = self.bed.exec(host, &["ping", "-c", "1", "-W", "1", &to]) {
            assert!(Instant::now() < deadline, "{host} cannot ping {to}: {e}");
            thread::sleep(Duration::from_millis(200));
        }
    }

    fn spawn(&mut self, host: &str, argv: &[&str]) -> usize {
        let child = self
            .bed
            .command(host, argv)
            .unwrap()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(child);
        self.children.len() - 1
    }

    /// Kills one child started with [`Scene::spawn`] (by its pid, via `Child::kill`).
    fn kill(&mut self, index: usize) {
        let child = &mut self.children[index];
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Stats once `done` holds, failing after [`PATIENCE`].
    fn stats_when(&self, what: &str, done: impl Fn(&SocketsStats) -> bool) -> SocketsStats {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let s = self.stats.snapshot();
            if done(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "{what}: {s:#?}");
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the relay and checks that it cleaned up its nftables table.
    fn stop_relay(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(relay) = self.relay.take() {
            relay.join().unwrap().unwrap();
        }
        assert!(!self.nft_table_present(), "nftables table left after stop");
    }

    /// A redis with nothing persisted and `DEBUG` allowed from its own host.
    fn start_redis(&mut self, host: &str) -> usize {
        let argv = redis::server_argv();
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let index = self.spawn(host, &argv);
        redis::wait_ready(&self.bed, host);
        index
    }

    /// One redis command against the server on `host` itself (not through the middlebox).
    fn redis(&self, host: &str, args: &[&str]) -> String {
        redis::cli(&self.bed, host, args)
    }

    /// `redis-cli --pipe` from the source to the primary's address: through the middlebox.
    fn pipe_command(&self) -> Command {
        redis::pipe_from_source(&self.bed, self.primary)
    }
}

/// Runs a `redis-cli --pipe` command fed by `feed` (which gets its stdin) and returns its
/// output; fails if it fails or takes longer than three minutes.
fn run_pipe(
    mut command: Command,
    feed: impl FnOnce(std::process::ChildStdin) + Send + 'static,
) -> String {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let feeder = thread::spawn(move || feed(stdin));
    let mut stdout = child.stdout.take().unwrap();
    let reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let status = wait_bounded(&mut child, Duration::from_secs(180), "redis-cli --pipe");
    let fed = feeder.join();
    let out = reader.join().unwrap();
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    assert!(fed.is_ok(), "feeding redis-cli failed; it said: {out}{err}");
    assert!(status.success(), "redis-cli --pipe failed: {out}{err}");
    out
}

impl Drop for Scene {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(relay) = self.relay.take() {
            let _ = relay.join();
        }
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Err(e) = Testbed::down(self.prefix) {
            eprintln!("test bed teardown failed: {e}");
        }
    }
}

/// A server in `host`'s namespace taking one connection: it reads the whole stream,
/// answers `<tag> <length>` and returns what it read. Ready when the function returns.
fn one_shot_server(bed: &Testbed, host: &str, port: u16, tag: &'static str) -> JoinHandle<Vec<u8>> {
    let (ready, bound) = mpsc::channel();
    let server = in_netns(&bed.netns(host).unwrap(), move || {
        let listener = TcpListener::bind(("0.0.0.0", port)).unwrap();
        ready.send(()).unwrap();
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        let _ = s.write_all(format!("{tag} {}\n", all.len()).as_bytes());
        all
    });
    bound.recv_timeout(PATIENCE).unwrap();
    server
}

/// A server in `host`'s namespace taking `count` connections at once: each is read to
/// its end and answered `<tag> <length>`; returns the streams in arrival order.
fn many_shot_server(
    bed: &Testbed,
    host: &str,
    port: u16,
    count: usize,
    tag: &'static str,
) -> JoinHandle<Vec<Vec<u8>>> {
    let (ready, bound) = mpsc::channel();
    let server = in_netns(&bed.netns(host).unwrap(), move || {
        let listener = TcpListener::bind(("0.0.0.0", port)).unwrap();
        ready.send(()).unwrap();
        let handlers: Vec<JoinHandle<Vec<u8>>> = (0..count)
            .map(|_| {
                let (mut s, _) = listener.accept().unwrap();
                thread::spawn(move || {
                    s.set_read_timeout(Some(PATIENCE)).unwrap();
                    let mut all = Vec::new();
                    s.read_to_end(&mut all).unwrap();
                    let _ = s.write_all(format!("{tag} {}\n", all.len()).as_bytes());
                    all
                })
            })
            .collect();
        handlers.into_iter().map(|h| h.join().unwrap()).collect()
    });
    bound.recv_timeout(PATIENCE).unwrap();
    server
}

/// From `host`: sends `data` to `to`, half-closes, reads the answer to the end. Returns
/// the answer and the time from connect to the server's close.
fn send_stream(
    bed: &Testbed,
    host: &str,
    to: SocketAddrV4,
    data: Arc<Vec<u8>>,
) -> (String, Duration) {
    in_netns(&bed.netns(host).unwrap(), move || {
        let started = Instant::now();
        let mut s = TcpStream::connect_timeout(&to.into(), Duration::from_secs(10)).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s.set_write_timeout(Some(PATIENCE)).unwrap();
        s.write_all(&data).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        (answer, started.elapsed())
    })
    .join()
    .unwrap()
}

/// From the source: all `streams` to `to` at once, each half-closed and answered
/// `primary <each>`. Returns the time until the last answer.
fn send_parallel(
    bed: &Testbed,
    to: SocketAddrV4,
    streams: &[Arc<Vec<u8>>],
    each: usize,
) -> Duration {
    let netns = bed.netns("source").unwrap();
    let started = Instant::now();
    let clients: Vec<_> = streams
        .iter()
        .map(|data| {
            let data = Arc::clone(data);
            in_netns(&netns, move || {
                let mut s =
                    TcpStream::connect_timeout(&to.into(), Duration::from_secs(10)).unwrap();
                s.set_read_timeout(Some(PATIENCE)).unwrap();
                s.set_write_timeout(Some(PATIENCE)).unwrap();
                s.write_all(&data).unwrap();
                s.shutdown(Shutdown::Write).unwrap();
                let mut answer = String::new();
                s.read_to_string(&mut answer).unwrap();
                answer
            })
        })
        .collect();
    for c in clients {
        assert_eq!(c.join().unwrap(), format!("primary {each}\n"));
    }
    started.elapsed()
}

fn mib_per_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / f64::from(1 << 20) / elapsed.as_secs_f64()
}

#[test]
fn byte_stream_reaches_primary_and_replica_identically() {
    if !ncp_testbed::ready_or_skip("sockets byte stream", &["nft", "ping", "sha256sum"]) {
        return;
    }
    let _serial = serial();
    let scene = Scene::start("nso1", STREAM_PORT);
    let primary_server = one_shot_server(&scene.bed, "primary", STREAM_PORT, "primary");
    let replica_server = one_shot_server(&scene.bed, "replica", STREAM_PORT, "replica");

    let data = Arc::new(seeded_bytes(0x5eed_0001, 20 << 20));
    let to = SocketAddrV4::new(scene.primary, STREAM_PORT);
    let (answer, elapsed) = send_stream(&scene.bed, "source", to, Arc::clone(&data));
    let at_primary = primary_server.join().unwrap();
    let at_replica = replica_server.join().unwrap();

    // Only the primary's answer reaches the client; both servers got the same stream.
    assert_eq!(answer, format!("primary {}\n", data.len()));
    let digests = [sha256(&data), sha256(&at_primary), sha256(&at_replica)];
    // For comparison only: the same stream straight to the primary over the replication
    // network (one switch, no relay).
    let direct_server = one_shot_server(&scene.bed, "primary", STREAM_PORT + 1, "direct");
    let direct_to = SocketAddrV4::new(
        scene.bed.address("primary", "eth1").unwrap(),
        STREAM_PORT + 1,
    );
    let (_, direct) = send_stream(&scene.bed, "source", direct_to, Arc::clone(&data));
    assert!(direct_server.join().unwrap() == *data);
    eprintln!(
        "sockets byte stream: {} MiB through the relay in {elapsed:.2?} ({:.1} MiB/s; direct, \
         no relay: {:.1} MiB/s); sha256 sent {} primary {} replica {}",
        data.len() >> 20,
        mib_per_s(data.len(), elapsed),
        mib_per_s(data.len(), direct),
        digests[0],
        digests[1],
        digests[2]
    );
    assert_eq!(at_primary.len(), data.len());
    assert_eq!(at_replica.len(), data.len());
    assert!(at_primary == *data, "primary got a different stream");
    assert!(at_replica == *data, "replica got a different stream");
    assert_eq!(digests[0], digests[1]);
    assert_eq!(digests[0], digests[2]);

    let s = scene.stats_when("session ends", |s| {
        s.sessions_total == 1 && s.sessions_active == 0
    });
    let svc = &s.services[0];
    assert_eq!(svc.primary_bytes_out, data.len() as u64, "{s:#?}");
    assert_eq!(svc.replicas[0].bytes_out, data.len() as u64, "{s:#?}");
    assert_eq!(svc.client_bytes_out, answer.len() as u64);
    assert_eq!(svc.detached.total(), 0, "{s:#?}");
    // One relay thread: eth1 only carries the relay's own connections to the replica.
    assert_eq!(s.workers, 1);
    let mut scene = scene;
    scene.stop_relay();
}

#[test]
fn redis_workload_leaves_primary_and_replica_with_the_same_data() {
    if !ncp_testbed::ready_or_skip(
        "sockets redis",
        &["nft", "ping", "redis-server", "redis-cli"],
    ) {
        return;
    }
    let _serial = serial();
    let mut scene = Scene::start("nso2", redis::PORT);
    scene.start_redis("primary");
    scene.start_redis("replica");
    let workload = redis_workload(100_000, 0x5eed_0002);
    let len = workload.len() as u64;

    let started = Instant::now();
    let out = run_pipe(scene.pipe_command(), move |mut stdin| {
        stdin.write_all(&workload).unwrap();
    });
    let elapsed = started.elapsed();
    assert!(out.contains("errors: 0, replies: 100000"), "{out}");

    // The replica's connection lingers after the session until the replica closes it.
    let s = scene.stats_when("session ends and its sockets are closed", |s| {
        s.sessions_total == 1 && s.sessions_active == 0 && s.lingering_sockets == 0
    });
    let svc = &s.services[0];
    // redis-cli --pipe ends the stream with an ECHO of its own, hence "at least".
    assert!(svc.primary_bytes_out >= len, "{s:#?}");
    assert_eq!(svc.primary_bytes_out, svc.client_bytes_in, "{s:#?}");
    assert_eq!(svc.replicas[0].bytes_out, svc.primary_bytes_out, "{s:#?}");
    assert_eq!(svc.detached.total(), 0, "{s:#?}");

    // The replica processes on its own schedule: give it a moment to catch up.
    let primary = scene.redis("primary", &["DEBUG", "DIGEST"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut replica = scene.redis("replica", &["DEBUG", "DIGEST"]);
    while replica != primary && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
        replica = scene.redis("replica", &["DEBUG", "DIGEST"]);
    }
    let keys = scene.redis("primary", &["DBSIZE"]);
    eprintln!(
        "sockets redis: 100000 commands ({len} bytes) in {elapsed:.2?}; DBSIZE {keys}; DEBUG DIGEST primary {primary} replica {replica}"
    );
    assert_eq!(primary.len(), 40, "unexpected digest {primary:?}");
    assert_ne!(primary, "0".repeat(40), "primary is empty");
    assert_eq!(primary, replica);
    scene.stop_relay();
}

#[test]
fn killed_replica_is_detached_and_the_primary_completes() {
    if !ncp_testbed::ready_or_skip(
        "sockets replica killed",
        &["nft", "ping", "redis-server", "redis-cli"],
    ) {
        return;
    }
    let _serial = serial();
    let mut scene = Scene::start("nso3", redis::PORT);
    scene.start_redis("primary");
    let replica_redis = scene.start_redis("replica");
    let workload = redis_workload(100_000, 0x5eed_0003);
    let len = workload.len() as u64;
    // Cut at a command boundary: the first half is whole commands.
    let half = workload
        .windows(3)
        .enumerate()
        .skip(workload.len() / 2)
        .find(|(_, w)| w == b"\n*2" || w == b"\n*3" || w == b"\n*4")
        .map(|(i, _)| i + 1)
        .unwrap();

    // The feeder sends the first half, waits until the replica is dead, sends the rest.
    let (killed_tx, killed_rx) = mpsc::channel::<()>();
    let body = workload.clone();
    let pipe = {
        let command = scene.pipe_command();
        thread::spawn(move || {
            run_pipe(command, move |mut stdin| {
                stdin.write_all(&body[..half]).unwrap();
                stdin.flush().unwrap();
                killed_rx.recv_timeout(PATIENCE).unwrap();
                stdin.write_all(&body[half..]).unwrap();
            })
        })
    };
    // Kill the replica once it has been handed the whole first half: mid-session for sure.
    let s = scene.stats_when("first half reaches the replica", |s| {
        s.services[0].replicas[0].bytes_out >= half as u64
    });
    assert_eq!(s.sessions_active, 1);
    scene.kill(replica_redis);
    killed_tx.send(()).unwrap();
    let out = pipe.join().unwrap();
    assert!(out.contains("errors: 0, replies: 100000"), "{out}");

    let s = scene.stats_when("session ends", |s| {
        s.sessions_total == 1 && s.sessions_active == 0
    });
    let svc = &s.services[0];
    assert!(svc.primary_bytes_out >= len, "{s:#?}");
    assert_eq!(svc.primary_bytes_out, svc.client_bytes_in, "{s:#?}");
    assert_eq!(svc.replicas[0].detached.total(), 1, "{s:#?}");
    assert!(svc.replicas[0].bytes_out < len, "{s:#?}");
    assert_eq!(svc.primary_failures, 0);

    // Reference: the same workload straight into a fresh redis on the replica host.
    scene.start_redis("replica");
    let port = redis::PORT.to_string();
    let direct = scene
        .bed
        .command(
            "replica",
            &["redis-cli", "-h", "127.0.0.1", "-p", &port, "--pipe"],
        )
        .unwrap();
    let reference = workload;
    let out = run_pipe(direct, move |mut stdin| {
        stdin.write_all(&reference).unwrap();
    });
    assert!(out.contains("errors: 0, replies: 100000"), "{out}");
    let primary = scene.redis("primary", &["DEBUG", "DIGEST"]);
    let expected = scene.redis("replica", &["DEBUG", "DIGEST"]);
    eprintln!(
        "sockets replica killed: detached {:?}, replica was handed {} of {len} bytes; DBSIZE {}; digest primary {primary} reference {expected}",
        svc.replicas[0].detached,
        svc.replicas[0].bytes_out,
        scene.redis("primary", &["DBSIZE"]),
    );
    assert_eq!(primary.len(), 40, "unexpected digest {primary:?}");
    assert_eq!(primary, expected, "primary differs from a direct run");
    scene.stop_relay();
}

#[test]
fn refusing_primary_resets_clients_promptly_and_leaves_no_session() {
    if !ncp_testbed::ready_or_skip("sockets primary refusing", &["nft", "ping"]) {
        return;
    }
    let _serial = serial();
    // Nothing listens on this port, on the primary or on the replica.
    let mut scene = Scene::start("nso4", CLOSED_PORT);
    let to = SocketAddrV4::new(scene.primary, CLOSED_PORT);
    const CONNECTIONS: usize = 1000;
    let client = in_netns(&scene.bed.netns("source").unwrap(), move || {
        let mut slowest = Duration::ZERO;
        let started = Instant::now();
        for i in 0..CONNECTIONS {
            let t = Instant::now();
            let outcome = match TcpStream::connect_timeout(&to.into(), Duration::from_secs(5)) {
                Err(e) => e.kind(),
                Ok(mut s) => {
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    match s.read(&mut [0; 64]) {
                        Ok(n) => panic!("connection {i}: read {n} bytes instead of a reset"),
                        Err(e) => e.kind(),
                    }
                }
            };
            assert!(
                matches!(
                    outcome,
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionRefused
                ),
                "connection {i}: {outcome:?}"
            );
            slowest = slowest.max(t.elapsed());
        }
        (started.elapsed(), slowest)
    });
    let (total, slowest) = client.join().unwrap();
    eprintln!(
        "sockets primary refusing: {CONNECTIONS} connections reset in {total:.2?} (slowest {slowest:.2?})"
    );
    assert!(slowest < Duration::from_secs(2), "a reset took {slowest:?}");

    let s = scene.stats_when("all sessions end", |s| {
        s.sessions_total == CONNECTIONS as u64 && s.sessions_active == 0
    });
    let svc = &s.services[0];
    assert_eq!(svc.primary_failures, CONNECTIONS as u64, "{s:#?}");
    assert_eq!(s.sessions_refused, 0);
    assert_eq!(svc.primary_bytes_out, 0);
    assert_eq!(
        svc.replicas[0].detached.total(),
        CONNECTIONS as u64,
        "every replica connection was refused too: {s:#?}"
    );
    scene.stop_relay();
}

#[test]
fn middlebox_binary_runs_sockets_mode_with_stats_and_cleans_up_on_sigterm() {
    if !ncp_testbed::ready_or_skip("sockets binary", &["nft", "ping"]) {
        return;
    }
    let _serial = serial();
    let mut scene = Scene::network("nso5");
    let dir = std::env::temp_dir().join("ncp-sockets-nso5");
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("mb.sock");
    let config = dir.join("mb.toml");
    let extra = format!("control_socket = \"{}\"", socket.display());
    std::fs::write(&config, scene.config_toml(STREAM_PORT, &extra)).unwrap();
    let middlebox = scene.spawn(
        "middlebox",
        &[
            env!("CARGO_BIN_EXE_ncp-middlebox"),
            "run",
            "--mode",
            "sockets",
            "--config",
            config.to_str().unwrap(),
        ],
    );
    let stats = || -> Option<SocketsStats> {
        match control::call(&socket, &Request::Stats).ok()? {
            Response::Stats(s) => serde_json::from_value(s.replication?).ok(),
            _ => None,
        }
    };
    let deadline = Instant::now() + PATIENCE;
    while !scene.nft_table_present() || stats().is_none_or(|s| s.workers == 0) {
        assert!(Instant::now() < deadline, "ncp-middlebox did not come up");
        thread::sleep(Duration::from_millis(100));
    }

    let primary_server = one_shot_server(&scene.bed, "primary", STREAM_PORT, "primary");
    let replica_server = one_shot_server(&scene.bed, "replica", STREAM_PORT, "replica");
    let data = Arc::new(seeded_bytes(0x5eed_0005, 1 << 20));
    let to = SocketAddrV4::new(scene.primary, STREAM_PORT);
    let (answer, _) = send_stream(&scene.bed, "source", to, Arc::clone(&data));
    assert_eq!(answer, format!("primary {}\n", data.len()));
    assert!(primary_server.join().unwrap() == *data);
    assert!(replica_server.join().unwrap() == *data);
    let deadline = Instant::now() + PATIENCE;
    let s = loop {
        let s = stats();
        if let Some(s) = s
            .as_ref()
            .filter(|s| s.sessions_total == 1 && s.sessions_active == 0)
        {
            break s.clone();
        }
        assert!(
            Instant::now() < deadline,
            "stats never showed the session: {s:#?}"
        );
        thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(s.services[0].replicas[0].bytes_out, data.len() as u64);

    // SIGTERM (by pid) stops it cleanly: exit status 0, redirect table gone.
    let pid = i32::try_from(scene.children[middlebox].id()).unwrap();
    // SAFETY: kill(2) with a pid of a child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = wait_bounded(
        &mut scene.children[middlebox],
        Duration::from_secs(20),
        "ncp-middlebox after SIGTERM",
    );
    assert!(status.success(), "ncp-middlebox exited with {status}");
    assert!(
        !scene.nft_table_present(),
        "nftables table left after SIGTERM"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn parallel_streams_are_each_replicated_intact() {
    if !ncp_testbed::ready_or_skip("sockets parallel streams", &["nft", "ping"]) {
        return;
    }
    let _serial = serial();
    const STREAMS: usize = 32;
    const EACH: usize = 1 << 20;
    let mut scene = Scene::start_with_budget("nso6", STREAM_PORT, 4 << 20);
    let primary_server = many_shot_server(&scene.bed, "primary", STREAM_PORT, STREAMS, "primary");
    let replica_server = many_shot_server(&scene.bed, "replica", STREAM_PORT, STREAMS, "replica");

    // Each stream starts with its index, so the servers' copies can be matched up.
    let streams: Vec<Arc<Vec<u8>>> = (0..STREAMS)
        .map(|i| {
            let mut data = seeded_bytes(0x5eed_0600 + i as u64, EACH);
            data[..8].copy_from_slice(&(i as u64).to_le_bytes());
            Arc::new(data)
        })
        .collect();
    let to = SocketAddrV4::new(scene.primary, STREAM_PORT);
    let elapsed = send_parallel(&scene.bed, to, &streams, EACH);
    for (host, server) in [("primary", primary_server), ("replica", replica_server)] {
        let mut got = server.join().unwrap();
        assert_eq!(got.len(), STREAMS, "{host}");
        got.sort_by_key(|d| u64::from_le_bytes(d[..8].try_into().unwrap()));
        for (i, (a, b)) in got.iter().zip(&streams).enumerate() {
            assert!(a == &**b, "{host}: stream {i} differs");
        }
    }
    // For comparison only: the same streams straight to the primary, no relay.
    let direct_server =
        many_shot_server(&scene.bed, "primary", STREAM_PORT + 1, STREAMS, "primary");
    let direct_to = SocketAddrV4::new(
        scene.bed.address("primary", "eth1").unwrap(),
        STREAM_PORT + 1,
    );
    let direct = send_parallel(&scene.bed, direct_to, &streams, EACH);
    assert_eq!(direct_server.join().unwrap().len(), STREAMS);
    eprintln!(
        "sockets parallel: {STREAMS} streams x {} MiB through the relay in {elapsed:.2?} ({:.1} MiB/s in total; direct, no relay: {:.1} MiB/s), each intact at primary and replica",
        EACH >> 20,
        mib_per_s(STREAMS * EACH, elapsed),
        mib_per_s(STREAMS * EACH, direct)
    );
    let s = scene.stats_when("sessions end", |s| {
        s.sessions_total == STREAMS as u64 && s.sessions_active == 0
    });
    let svc = &s.services[0];
    assert_eq!(svc.primary_bytes_out, (STREAMS * EACH) as u64, "{s:#?}");
    assert_eq!(svc.replicas[0].bytes_out, (STREAMS * EACH) as u64, "{s:#?}");
    assert_eq!(svc.detached.total(), 0, "{s:#?}");
    scene.stop_relay();
}
