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

use support::{
    PATIENCE, in_netns, scenarios,
    scene::{Mode, Scene, Service},
    serial,
    streams::{exchange, many_shot_server, one_shot_server, send_stream},
    wait_bounded,
};

use std::{
    io::Write,
    net::SocketAddrV4,
    process::{Command, Stdio},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use ncp_dataplane::{
    control::{self, Request, Response},
    sockets::SocketsStats,
};
use ncp_testbed::{Testbed, workload::seeded_bytes};

const STREAM_PORT: u16 = 5001;

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

/// The sockets-mode scene of one service on `port` with the given replica budget: each
/// session reserves about its size from the worker's 1 GiB, so many parallel sessions need
/// a smaller one than the usual 64 MiB.
fn start_scene(prefix: &'static str, port: u16, replica_budget: u64) -> Scene {
    let service = Service::new("svc", port).budget(replica_budget);
    Scene::start(Mode::Sockets, prefix, &[service], "")
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
            in_netns(&netns, move || exchange(to, &data))
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
    let scene = start_scene("nso1", STREAM_PORT, 64 << 20);
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
        s.counters.sessions_total == 1 && s.counters.sessions_active == 0
    });
    let svc = &s.services[0];
    assert_eq!(svc.primary_bytes_out, data.len() as u64, "{s:#?}");
    assert_eq!(svc.replicas[0].bytes_out, data.len() as u64, "{s:#?}");
    assert_eq!(svc.client_bytes_out, answer.len() as u64);
    assert_eq!(svc.detached.total(), 0, "{s:#?}");
    // One relay thread: eth1 only carries the relay's own connections to the replica.
    assert_eq!(s.workers, 1);
    let mut scene = scene;
    scene.stop_middlebox();
}

#[test]
fn redis_workload_leaves_primary_and_replica_with_the_same_data() {
    scenarios::redis_workload_leaves_primary_and_replica_with_the_same_data(
        Mode::Sockets,
        "nso2",
        0x5eed_0002,
    );
}

#[test]
fn killed_replica_is_detached_and_the_primary_completes() {
    scenarios::killed_replica_is_detached_and_the_primary_completes(
        Mode::Sockets,
        "nso3",
        0x5eed_0003,
    );
}

#[test]
fn refusing_primary_resets_clients_promptly_and_leaves_no_session() {
    scenarios::refusing_primary_resets_clients_promptly_and_leaves_no_session(
        Mode::Sockets,
        "nso4",
    );
}

#[test]
fn middlebox_binary_runs_sockets_mode_with_stats_and_cleans_up_on_sigterm() {
    if !ncp_testbed::ready_or_skip("sockets binary", &["nft", "ping"]) {
        return;
    }
    let _serial = serial();
    let mut scene = Scene::network(Mode::Sockets, "nso5", 1);
    let socket = scene.control_socket();
    let config = scene.dir.join("mb.toml");
    let service = Service::new("svc", STREAM_PORT).budget(64 << 20);
    std::fs::write(&config, scene.config(&[service], "")).unwrap();
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
            .filter(|s| s.counters.sessions_total == 1 && s.counters.sessions_active == 0)
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
}

#[test]
fn parallel_streams_are_each_replicated_intact() {
    if !ncp_testbed::ready_or_skip("sockets parallel streams", &["nft", "ping"]) {
        return;
    }
    let _serial = serial();
    const STREAMS: usize = 32;
    const EACH: usize = 1 << 20;
    let mut scene = start_scene("nso6", STREAM_PORT, 4 << 20);
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
        s.counters.sessions_total == STREAMS as u64 && s.counters.sessions_active == 0
    });
    let svc = &s.services[0];
    assert_eq!(svc.primary_bytes_out, (STREAMS * EACH) as u64, "{s:#?}");
    assert_eq!(svc.replicas[0].bytes_out, (STREAMS * EACH) as u64, "{s:#?}");
    assert_eq!(svc.detached.total(), 0, "{s:#?}");
    scene.stop_middlebox();
}
