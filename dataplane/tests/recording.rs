//! Recording as a replication target (offline asynchronous mode) through either data
//! plane, on the paper's test bed: the source's connections to the primary are steered to
//! the middlebox (a static neighbour entry standing in for the controller's redirect),
//! which serves them from the primary and records the client streams to pcapng.
//!
//! - a Redis workload is recorded, the middlebox stopped (which flushes the files), and
//!   the files replayed with the `ncp-replay` binary into a fresh redis on the replica
//!   host: its `DEBUG DIGEST` must equal the primary's; `tshark` must see the recorded
//!   client stream byte for byte as the client sent it;
//! - iperf3 through the middlebox with and without recording, printed side by side (for
//!   information: on the two-core test machine the Open vSwitch userspace datapath sets
//!   the pace, so no timing is asserted).
//!
//! Each runs once per mode. Sockets mode: the relay runs in this process on a thread
//! moved into the middlebox's namespace. XDP mode: `ncp-middlebox run` runs as a process
//! there. Servers and clients run as processes in the hosts' namespaces. Each test has its
//! own test bed prefix (`nr1`, `nr2` for sockets mode, `nrx1`, `nrx2` for XDP mode) and
//! they run one at a time. They need root, Open vSwitch, the tools they name and, in
//! sockets mode, nftables (XDP mode: AF_XDP); when those are missing the tests print
//! `skipped: …` and return, except under CI=true, where that is a failure.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step should fail the test"
)]

mod support;

use support::{
    run_fed,
    scene::{Mode, Scene, Service},
    serial, tshark_follow_client,
};

use std::{
    io::Write,
    path::PathBuf,
    process::Command,
    thread,
    time::{Duration, Instant},
};

const IPERF_PORT: u16 = 5201;
/// Redis writes in the recorded workload.
const WRITES: usize = 100_000;

/// Runs `command` with `input` on its stdin, at most `limit`; returns (success, stdout,
/// stderr).
fn run_with_input(
    command: Command,
    input: Vec<u8>,
    limit: Duration,
    what: &str,
) -> (bool, String, String) {
    run_fed(
        command,
        move |mut stdin| stdin.write_all(&input),
        limit,
        what,
    )
}

/// A directory under the system's temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "ncp-recording-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// The recordings in it, in recording order (their names sort that way).
    fn files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "pcapng"))
            .collect();
        files.sort();
        files
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The configuration (TOML) of one service `name` for the primary's `port`, no
/// replicas; `record` is the TOML of its `record` field or empty for none. eth1 is the
/// replication NIC, as in the paper, so XDP mode runs one worker, on eth0, rather than a
/// second one on eth1 that no client reaches.
fn config(scene: &Scene, name: &'static str, port: u16, record: &str) -> String {
    let service = Service {
        replicated: false,
        record: record.to_owned(),
        ..Service::new(name, port)
    };
    scene.config(&[service], "")
}

/// A real `DEBUG DIGEST` answer: 40 hex digits and not the empty data set's zeros.
fn assert_real_digest(digest: &str, whose: &str) {
    assert!(
        digest.len() == 40 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
        "{whose}: not a digest: {digest:?}"
    );
    assert_ne!(digest, "0".repeat(40), "{whose}: empty data set");
}

/// What `redis-cli --pipe` appends to its input: an `ECHO` of 20 random bytes, whose
/// answer tells it the server has processed everything before (led by a CRLF in case the
/// input did not end with one).
fn is_pipe_trailer(bytes: &[u8]) -> bool {
    let head = b"\r\n*2\r\n$4\r\nECHO\r\n$20\r\n";
    bytes.len() == head.len() + 20 + 2 && bytes.starts_with(head) && bytes.ends_with(b"\r\n")
}

#[test]
fn a_recorded_redis_workload_replays_into_a_fresh_replica_with_the_same_digest() {
    recorded_redis_workload_replays("nr1", Mode::Sockets);
}

#[test]
fn xdp_a_recorded_redis_workload_replays_into_a_fresh_replica_with_the_same_digest() {
    recorded_redis_workload_replays("nrx1", Mode::Xdp);
}

/// A Redis workload recorded through the middlebox in `mode` (recording instead of live
/// replicas), replayed with `ncp-replay` into a replica started afterwards: the replica's
/// `DEBUG DIGEST` is the primary's, and `tshark` follows the recorded client stream as
/// the client sent it.
fn recorded_redis_workload_replays(prefix: &'static str, mode: Mode) {
    let needed = mode.tools(&["ping", "redis-server", "redis-cli", "tshark"]);
    if !ncp_testbed::ready_or_skip("recording redis", &needed) {
        return;
    }
    let _serial = serial();
    let rec = TempDir::new(prefix);
    let mut scene = Scene::network(mode, prefix, 1);
    // Recording instead of live replicas: the service has none.
    let config = config(
        &scene,
        "kv",
        support::redis::PORT,
        &format!("record = {{ dir = {:?} }}", rec.0.display().to_string()),
    );
    scene.start_redis("primary");
    scene.start_middlebox(&config);

    let workload = ncp_testbed::workload::redis_writes(WRITES, 0x5eed_7001);
    let primary = scene.primary.to_string();
    let port = support::redis::PORT.to_string();
    let started = Instant::now();
    let (ok, out, err) = run_with_input(
        scene
            .bed
            .command(
                "source",
                &["redis-cli", "-h", &primary, "-p", &port, "--pipe"],
            )
            .unwrap(),
        workload.clone(),
        Duration::from_secs(180),
        "redis-cli --pipe",
    );
    let elapsed = started.elapsed();
    assert!(ok, "redis-cli --pipe failed: {out}{err}");
    assert!(
        out.contains(&format!("errors: 0, replies: {WRITES}")),
        "{out}{err}"
    );

    let s = scene.stats_when("the session ends", |s| {
        s.counters.sessions_total == 1 && s.counters.sessions_active == 0
    });
    let client_bytes_in = s.services[0].client_bytes_in;
    // Queued for the file by the time the session ended, so already final.
    let r = s.services[0].recording.unwrap();
    let digest_primary = scene.redis("primary", &["DEBUG", "DIGEST"]);
    let keys = scene.redis("primary", &["DBSIZE"]);
    scene.stop_middlebox();
    eprintln!(
        "recording redis ({mode:?}): {WRITES} writes ({} bytes) through the middlebox in {elapsed:.2?}; recording {r:?}",
        workload.len()
    );
    assert_eq!(
        (r.sessions_opened, r.sessions_refused, r.sessions_detached),
        (1, 0, 0),
        "{r:?}"
    );
    assert_eq!(r.write_errors, 0, "{r:?}");
    assert_eq!(r.client_bytes, client_bytes_in, "{s:#?}");
    assert_eq!(r.server_bytes, 0, "responses are not recorded by default");
    let files = rec.files();
    assert_eq!(
        files.len(),
        1,
        "one file below the rotation size: {files:?}"
    );

    // (b) What an operator's tool sees: the first session's client bytes are what the
    // client sent — the workload, and the ECHO redis-cli adds at the end.
    let followed = tshark_follow_client(&files[0]);
    assert_eq!(followed.len() as u64, client_bytes_in);
    assert!(
        followed.starts_with(&workload),
        "tshark's client stream differs from the workload"
    );
    assert!(
        is_pipe_trailer(&followed[workload.len()..]),
        "unexpected bytes after the workload: {:?}",
        String::from_utf8_lossy(&followed[workload.len()..])
    );

    // (a) Replay from the middlebox host over the replication network into a replica
    // started only now, after the recording.
    scene.start_redis("replica");
    assert_eq!(
        scene.redis("replica", &["DBSIZE"]),
        "0",
        "replica not fresh"
    );
    let replica = scene.bed.address("replica", "eth1").unwrap();
    let to = format!("{replica}:{}", support::redis::PORT);
    let mut argv = vec![env!("CARGO_BIN_EXE_ncp-replay").to_owned()];
    argv.extend(files.iter().map(|f| f.display().to_string()));
    argv.extend(["--to", &to, "--pace", "fast", "--json"].map(str::to_owned));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let started = Instant::now();
    let (ok, out, err) = run_with_input(
        scene.bed.command("middlebox", &argv).unwrap(),
        Vec::new(),
        Duration::from_secs(180),
        "ncp-replay",
    );
    let replay_time = started.elapsed();
    assert!(ok, "ncp-replay failed: {out}\n{err}");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["sessions_replayed"], 1, "{summary}");
    assert_eq!(summary["sessions_failed"], 0, "{summary}");
    assert_eq!(summary["sessions_incomplete"], 0, "{summary}");
    assert_eq!(summary["bytes_sent"], client_bytes_in, "{summary}");

    // The replay waited for the answers, so the replica has applied everything.
    let digest_replica = scene.redis("replica", &["DEBUG", "DIGEST"]);
    eprintln!(
        "recording redis ({mode:?}): replayed in {replay_time:.2?}; DBSIZE {keys}; DEBUG DIGEST primary {digest_primary} replayed replica {digest_replica}"
    );
    assert_real_digest(&digest_primary, "primary");
    assert_real_digest(&digest_replica, "replayed replica");
    assert_eq!(digest_primary, digest_replica);
}

/// Receiver-side throughput of an `iperf3 -J` run, bits per second, or why there is
/// none (iperf3's own error, or an unreadable report).
fn iperf_bps(json: &str) -> Result<f64, String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| format!("no throughput: {}", v["error"]))
}

#[test]
fn iperf_through_the_relay_with_and_without_recording() {
    iperf_with_and_without_recording("nr2", Mode::Sockets, 2);
}

#[test]
fn xdp_iperf_through_the_middlebox_with_and_without_recording() {
    iperf_with_and_without_recording("nrx2", Mode::Xdp, 3);
}

/// iperf3 through the middlebox in `mode` without and with recording, alternated for
/// `rounds` rounds each, printed side by side. Only correctness is asserted (recording
/// happened and was accounted for): timings on the shared two-core machine are reported,
/// not judged.
fn iperf_with_and_without_recording(prefix: &'static str, mode: Mode, rounds: usize) {
    if !ncp_testbed::ready_or_skip("recording iperf", &mode.tools(&["ping", "ss", "iperf3"])) {
        return;
    }
    let _serial = serial();
    let rec = TempDir::new(prefix);
    let mut scene = Scene::network(mode, prefix, 1);
    let port = IPERF_PORT.to_string();
    scene.spawn("primary", &["iperf3", "-s", "-p", &port]);
    scene.wait_listening("primary", IPERF_PORT);
    let primary = scene.primary.to_string();
    // Recorded files are cut at 256 MiB so a fast run still leaves files of a handy size.
    let record = format!(
        "record = {{ dir = {:?}, rotate_bytes = 268435456 }}",
        rec.0.display().to_string()
    );
    // Alternated, so a drift of the shared machine shows as such rather than as a
    // difference between the two.
    let plain = ("middlebox only", "");
    let recorded = ("middlebox + recording", record.as_str());
    let mut results = Vec::new();
    for (label, record) in [plain, recorded].repeat(rounds) {
        scene.start_middlebox(&config(&scene, "iperf", IPERF_PORT, record));
        // The middlebox may still be starting. iperf3 3.12 exits with 0 also when it could
        // not connect (the error is in its JSON), so the report decides, not the status.
        let deadline = Instant::now() + Duration::from_secs(20);
        let bps = loop {
            let (ok, out, err) = run_with_input(
                scene
                    .bed
                    .command(
                        "source",
                        &["iperf3", "-c", &primary, "-p", &port, "-t", "3", "-J"],
                    )
                    .unwrap(),
                Vec::new(),
                Duration::from_secs(60),
                "iperf3 client",
            );
            let measured = if ok { iperf_bps(&out) } else { Err(err) };
            match measured {
                Ok(bps) => break bps,
                Err(why) => assert!(Instant::now() < deadline, "iperf3 failed ({why}): {out}"),
            }
            thread::sleep(Duration::from_millis(500));
        };
        let s = scene.stats_when("iperf3's sessions end", |s| s.counters.sessions_active == 0);
        scene.stop_middlebox();
        let gbps = bps / 1e9;
        results.push((
            label,
            gbps,
            s.services[0].client_bytes_in,
            s.services[0].recording,
        ));
    }
    eprintln!("recording iperf ({mode:?}): iperf3 -t 3 through the middlebox (no replicas)");
    for (label, gbps, bytes, recording) in &results {
        eprintln!("  {label:<22} {gbps:6.2} Gbit/s  client bytes {bytes}  recording {recording:?}");
    }
    let mean = |i: usize| {
        let picked: Vec<f64> = results.iter().skip(i).step_by(2).map(|r| r.1).collect();
        picked.iter().sum::<f64>() / picked.len() as f64
    };
    eprintln!(
        "  mean over {rounds} rounds: {:.2} Gbit/s without, {:.2} Gbit/s with recording",
        mean(0),
        mean(1)
    );
    let files = rec.files();
    let on_disk: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    eprintln!(
        "  recorded: {} file(s), {on_disk} bytes on disk",
        files.len()
    );
    // Not timing, only that recording happened and was accounted for.
    for (i, (_, _, client_bytes_in, recording)) in results.iter().enumerate() {
        if i % 2 == 0 {
            assert!(recording.is_none());
            continue;
        }
        let r = recording.unwrap();
        assert!(r.sessions_opened >= 2, "{r:?}"); // iperf3's control and data connections
        assert_eq!(r.write_errors, 0, "{r:?}");
        // A recorder that cannot keep up detaches sessions instead of slowing the relay;
        // only then may it hold less than the relay took.
        if r.sessions_detached == 0 {
            assert_eq!(r.client_bytes, *client_bytes_in, "{r:?}");
        } else {
            assert!(r.client_bytes <= *client_bytes_in, "{r:?}");
        }
    }
    assert!(!files.is_empty());
}
