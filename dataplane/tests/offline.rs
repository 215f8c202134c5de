//! Offline mode: pcapng writer ↔ reader, tshark's view of our files, damaged files,
//! recorder rotation and overflow, and replay into real servers (a local sink and
//! `redis-server` on 127.0.0.1).
//!
//! External tools (tshark, redis-server, redis-cli) are skipped with a visible line when
//! missing, except under `CI=true`, where a missing tool is a failure.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers fail the test on any error"
)]

mod support;

use support::{output_ok, tshark, tshark_follow_client};

use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use ncp_dataplane::offline::SessionMeta;
use ncp_dataplane::offline::pcapng::{FormatErrorKind, PcapngWriter, WriterOptions};
use ncp_dataplane::offline::reader::{EndKind, read_bytes, read_files};
use ncp_dataplane::offline::recorder::{Recorder, RecorderConfig};
use ncp_dataplane::offline::replay::{Outcome, Pace, Progress, ReplayConfig, replay};

/// Deterministic pseudo-random numbers (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A scratch directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "ncp-offline-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// True if `tool` runs; under CI a missing tool fails the test instead.
fn have_tool(tool: &str, test: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{tool} is required under CI=true ({test})"
        );
        println!("SKIP {test}: {tool} not installed");
    }
    ok
}

fn meta(i: u64, service: &str) -> SessionMeta {
    SessionMeta {
        service: service.to_string(),
        client: SocketAddrV4::new([198, 18, (i >> 8) as u8, i as u8].into(), 40_000 + i as u16),
        primary: "198.18.200.1:6379".parse().unwrap(),
        start_ns: 1_764_000_000_000_000_000 + i * 1_000_000,
    }
}

/// What a synthetic session should contain.
#[derive(Clone, Debug)]
struct Expected {
    meta: SessionMeta,
    client: Vec<u8>,
    server: Vec<u8>,
    end: EndKind,
}

/// Writes `n` interleaved random sessions (some empty, some with answers, some reset, one
/// left open) and returns the file and what each session holds.
fn random_recording(seed: u64, n: u64) -> (Vec<u8>, Vec<Expected>) {
    let mut rng = Rng(seed);
    let mut w = PcapngWriter::new(Vec::new(), WriterOptions::default()).unwrap();
    let mut live = Vec::new();
    let mut expected = Vec::new();
    let mut ts = 1_764_000_000_000_000_000u64;
    for i in 0..n {
        let m = meta(i, if i % 2 == 0 { "kv" } else { "web" });
        let s = w.open(i, &m, m.start_ns).unwrap();
        expected.push(Expected {
            meta: m,
            client: Vec::new(),
            server: Vec::new(),
            end: EndKind::Fin,
        });
        // Session i gets this many writes; 0 makes an empty session.
        let writes = if i % 5 == 0 { 0 } else { 1 + rng.below(12) };
        live.push((i as usize, s, writes));
    }
    while !live.is_empty() {
        let k = rng.below(live.len() as u64) as usize;
        ts += 1_000 + rng.below(1_000_000);
        let (idx, s, left) = &mut live[k];
        if *left == 0 {
            let e = &mut expected[*idx];
            match rng.below(10) {
                0 => {
                    w.abort(s, false, ts).unwrap();
                    e.end = EndKind::Reset;
                }
                1 if *idx == 3 => e.end = EndKind::Unterminated,
                _ => w.close(s, ts).unwrap(),
            }
            live.swap_remove(k);
            continue;
        }
        *left -= 1;
        let len = match rng.below(4) {
            0 => rng.below(10) as usize,
            1 => 1460,
            _ => rng.below(9000) as usize,
        };
        let data = rng.bytes(len);
        if rng.below(3) == 0 {
            w.server_data(s, &data, ts).unwrap();
            expected[*idx].server.extend_from_slice(&data);
        } else {
            w.client_data(s, &data, ts).unwrap();
            expected[*idx].client.extend_from_slice(&data);
        }
    }
    (w.into_inner(), expected)
}

#[test]
fn writer_reader_round_trip_random_sessions() {
    for seed in [1u64, 0xDEAD_BEEF, 42] {
        let (bytes, expected) = random_recording(seed, 40);
        let rec = read_bytes(&bytes);
        assert!(rec.errors.is_empty(), "{:?}", rec.errors);
        assert_eq!(rec.sessions.len(), expected.len());
        assert_eq!(rec.stats.orphan_segments, 0);
        assert_eq!(rec.stats.gap_bytes, 0);
        for (got, want) in rec.sessions.iter().zip(&expected) {
            assert_eq!(got.meta, want.meta);
            assert_eq!(got.client, want.client, "client bytes of {:?}", want.meta);
            assert_eq!(got.server, want.server, "server bytes of {:?}", want.meta);
            assert_eq!(got.end, want.end, "end of {:?}", want.meta);
            assert!(!got.continued);
        }
        assert!(
            expected
                .iter()
                .any(|e| e.client.is_empty() && e.server.is_empty())
        );
    }
}

#[test]
fn microsecond_and_raw_ip_files_read_back() {
    use ncp_dataplane::offline::pcapng::{LinkLayer, TsResolution};
    let opts = WriterOptions {
        link: LinkLayer::RawIpv4,
        resolution: TsResolution::Micro,
    };
    let mut w = PcapngWriter::new(Vec::new(), opts).unwrap();
    let m = meta(1, "x");
    let mut s = w.open(9, &m, m.start_ns).unwrap();
    w.client_data(&mut s, b"hello", m.start_ns + 5_000).unwrap();
    w.close(&mut s, m.start_ns + 6_000).unwrap();
    let rec = read_bytes(&w.into_inner());
    assert_eq!(rec.sessions.len(), 1);
    assert_eq!(rec.sessions[0].client, b"hello");
    assert_eq!(rec.sessions[0].recorded_id, Some(9));
}

#[test]
fn tshark_follows_the_first_stream_and_sees_no_errors() {
    if !have_tool("tshark", "tshark_follows_the_first_stream") {
        return;
    }
    let dir = TempDir::new("tshark");
    let mut rng = Rng(7);
    let mut w = PcapngWriter::new(Vec::new(), WriterOptions::default()).unwrap();
    let (m0, m1) = (meta(1, "kv"), meta(2, "kv"));
    let mut s0 = w.open(1, &m0, m0.start_ns).unwrap();
    let mut s1 = w.open(2, &m1, m1.start_ns).unwrap();
    let mut client0 = Vec::new();
    let mut ts = m1.start_ns;
    for i in 0..40 {
        ts += 10_000;
        let len = rng.below(5000) as usize;
        let d = rng.bytes(len);
        match i % 3 {
            0 => {
                w.client_data(&mut s0, &d, ts).unwrap();
                client0.extend_from_slice(&d);
            }
            1 => w.server_data(&mut s0, &d, ts).unwrap(),
            _ => w.client_data(&mut s1, &d, ts).unwrap(),
        }
    }
    w.close(&mut s0, ts + 1).unwrap();
    w.abort(&mut s1, false, ts + 2).unwrap();
    let file = dir.path().join("two.pcapng");
    std::fs::write(&file, w.into_inner()).unwrap();

    assert_eq!(tshark_follow_client(&file), client0);

    // With checksum validation on, nothing is bad, malformed, or odd to TCP analysis.
    let flagged = tshark(
        &file,
        &[
            "-o",
            "tcp.check_checksum:TRUE",
            "-o",
            "ip.check_checksum:TRUE",
            "-Y",
            // Warnings and errors, except the one a deliberate RST earns.
            "tcp.checksum.status != 1 || ip.checksum.status != 1 || _ws.malformed \
             || (_ws.expert.severity >= 6291456 && tcp.flags.reset == 0)",
        ],
    );
    assert!(
        flagged.trim().is_empty(),
        "tshark flags packets:\n{flagged}"
    );

    // The metadata is visible as a packet comment.
    let out = Command::new("tshark")
        .arg("-r")
        .arg(&file)
        .args(["-Y", "frame.comment", "-T", "fields", "-e", "frame.comment"])
        .output()
        .unwrap();
    let comments = String::from_utf8_lossy(&out.stdout);
    assert_eq!(comments.lines().count(), 2, "{comments}");
    assert!(comments.contains("\"service\":\"kv\""), "{comments}");
}

#[test]
fn truncated_files_keep_intact_sessions_and_name_the_offset() {
    let (bytes, expected) = random_recording(99, 12);
    let full = read_bytes(&bytes);
    assert!(full.errors.is_empty());
    // Block boundaries, to tell a clean cut from one inside a block.
    let mut bounds = vec![0usize];
    let mut at = 0usize;
    while at < bytes.len() {
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        at += len;
        bounds.push(at);
    }
    let mut cuts: Vec<usize> = (0..bytes.len()).step_by(97).collect();
    cuts.extend(bounds.iter().copied().take(60));
    cuts.extend(
        bounds
            .iter()
            .map(|b| b + 1)
            .filter(|&b| b < bytes.len())
            .take(60),
    );
    for cut in cuts {
        let rec = read_bytes(&bytes[..cut]);
        if bounds.contains(&cut) {
            assert!(
                rec.errors.is_empty(),
                "cut {cut} at a block boundary: {:?}",
                rec.errors
            );
        } else {
            assert_eq!(rec.errors.len(), 1, "cut {cut}");
            let e = &rec.errors[0].error;
            let block_start = *bounds.iter().filter(|&&b| b <= cut).max().unwrap() as u64;
            assert!(
                matches!(e.kind, FormatErrorKind::Truncated { .. }),
                "cut {cut}: {e}"
            );
            assert_eq!(e.offset, block_start, "cut {cut}: {e}");
            assert!(
                rec.errors[0]
                    .to_string()
                    .contains(&format!("byte offset {block_start}"))
            );
        }
        // Whatever was returned is a prefix of the truth, session by session.
        for (got, want) in rec.sessions.iter().zip(&expected) {
            assert_eq!(got.meta, want.meta);
            assert!(want.client.starts_with(&got.client), "cut {cut}");
            assert!(want.server.starts_with(&got.server), "cut {cut}");
        }
    }
    // A cut right after the last block of a session keeps that session whole.
    let rec = read_bytes(&bytes[..bytes.len() - 1]);
    let whole = rec
        .sessions
        .iter()
        .zip(&expected)
        .filter(|(g, w)| g.client == w.client)
        .count();
    assert!(whole >= expected.len() - 1);
}

#[test]
fn corrupt_length_fields_are_reported_without_huge_allocations() {
    let (bytes, expected) = random_recording(5, 6);
    // Find the 40th block.
    let mut at = 0usize;
    for _ in 0..40 {
        at += u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
    }
    for (bad, want) in [
        (0xFFFF_FFF0u32, "exceeds the limit"),
        (0x7FFF_FFFC, "exceeds the limit"),
        (10, "invalid block length"),
        (13, "invalid block length"),
        (64, "does not match trailing length"),
    ] {
        let mut b = bytes.clone();
        b[at + 4..at + 8].copy_from_slice(&bad.to_le_bytes());
        let rec = read_bytes(&b);
        assert_eq!(rec.errors.len(), 1, "length {bad}");
        let msg = rec.errors[0].to_string();
        assert!(msg.contains(&format!("byte offset {at}")), "{msg}");
        assert!(msg.contains(want), "{msg}");
        // Sessions opened before the damage are still there, as prefixes.
        assert!(!rec.sessions.is_empty());
        for (got, want) in rec.sessions.iter().zip(&expected) {
            assert!(want.client.starts_with(&got.client));
        }
    }
    // Garbage and empty input.
    assert!(read_bytes(b"").errors.is_empty());
    let rec = read_bytes(b"GET / HTTP/1.1\r\n\r\n");
    assert!(rec.errors[0].to_string().contains("not a pcapng file"));
    let mut rng = Rng(3);
    for _ in 0..200 {
        let mut b = bytes.clone();
        for _ in 0..4 {
            let i = rng.below(b.len() as u64) as usize;
            b[i] = rng.next() as u8;
        }
        let _ = read_bytes(&b); // must not panic
    }
}

fn recorder_config(dir: &Path, queue: usize) -> RecorderConfig {
    RecorderConfig {
        dir: dir.to_path_buf(),
        file_prefix: "rec".into(),
        rotate_bytes: 0,
        rotate_secs: 0,
        queue_capacity: queue,
        record_responses: true,
    }
}

fn pcapng_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pcapng"))
        .collect();
    v.sort();
    v
}

#[test]
fn recorder_rotates_and_sessions_continue_across_files() {
    let dir = TempDir::new("rotate");
    let mut cfg = recorder_config(dir.path(), 4096);
    cfg.rotate_bytes = 64 * 1024;
    let rec = Recorder::start(cfg).unwrap();
    let mut rng = Rng(11);
    let mut want: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut ids = Vec::new();
    let workers: Vec<_> = (0..2).map(|_| rec.handle()).collect();
    for i in 0..6u64 {
        ids.push(workers[i as usize % 2].open_session(meta(i, "kv")).unwrap());
        want.push((Vec::new(), Vec::new()));
    }
    for round in 0..60 {
        for (i, id) in ids.iter().enumerate() {
            let len = rng.below(3000) as usize;
            let d = rng.bytes(len);
            let h = &workers[i % 2];
            if round % 4 == 3 {
                h.server_bytes(id, &d, SystemTime::now());
                want[i].1.extend_from_slice(&d);
            } else {
                h.client_bytes(id, &d, SystemTime::now());
                want[i].0.extend_from_slice(&d);
            }
        }
        // Give the writer time to notice the size and rotate mid-session.
        std::thread::sleep(Duration::from_millis(2));
    }
    for (i, id) in ids.into_iter().enumerate() {
        if i == 5 {
            workers[1].abort(id);
        } else {
            workers[i % 2].close(id);
        }
    }
    let stats = rec.finish();
    assert_eq!(stats.sessions_detached, 0, "{stats:?}");
    assert_eq!(stats.sessions_opened, 6);
    let files = pcapng_files(dir.path());
    assert!(files.len() >= 3, "expected rotation, got {files:?}");
    assert_eq!(stats.files as usize, files.len());

    let all = read_files(&files);
    assert!(all.errors.is_empty(), "{:?}", all.errors);
    assert_eq!(all.sessions.len(), 6);
    for (i, s) in all.sessions.iter().enumerate() {
        assert_eq!(s.client, want[i].0, "session {i}");
        assert_eq!(s.server, want[i].1, "session {i}");
        assert_eq!(s.end, if i == 5 { EndKind::Reset } else { EndKind::Fin });
    }
    // A later file alone still yields the sessions, marked as continued, with suffixes.
    let last = read_files(&files[files.len() - 1..]);
    assert!(last.errors.is_empty());
    assert!(!last.sessions.is_empty());
    for s in &last.sessions {
        assert!(s.continued);
        let i = all.sessions.iter().position(|a| a.meta == s.meta).unwrap();
        assert!(want[i].0.ends_with(&s.client));
    }
}

/// Chunks the overflow test pushes in session `k`.
fn burst(k: u64) -> usize {
    if k.is_multiple_of(2) { 20 } else { 400 }
}

#[test]
fn recorder_overflow_detaches_without_blocking() {
    let dir = TempDir::new("overflow");
    let rec = Recorder::start(recorder_config(dir.path(), 64)).unwrap();
    let h = rec.handle();
    let data = vec![0x5au8; 1400];
    let t0 = Instant::now();
    let mut sessions = 0;
    let mut calls = 0u64;
    let mut slowest = Duration::ZERO;
    // Keep opening sessions and pushing bytes until some recording has been cut loose, and
    // for at least 50 sessions so that some also get through whole.
    while (h.stats().sessions_detached == 0 || sessions < 50) && sessions < 10_000 {
        let Some(id) = h.open_session(meta(sessions, "burst")) else {
            sessions += 1;
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        sessions += 1;
        // Short bursts fit the queue, long ones overflow it.
        for _ in 0..burst(sessions - 1) {
            let t = Instant::now();
            h.client_bytes(&id, &data, SystemTime::now());
            slowest = slowest.max(t.elapsed());
            calls += 1;
        }
        h.close(id);
        // Let the writer catch up between bursts, so later sessions get recorded too.
        std::thread::sleep(Duration::from_millis(5));
    }
    let elapsed = t0.elapsed();
    let stats = rec.finish();
    println!(
        "overflow: {sessions} sessions, {calls} calls in {elapsed:?}, slowest call {slowest:?}, {stats:?}"
    );
    assert!(stats.sessions_detached > 0, "{stats:?}");
    assert!(stats.sessions_opened > stats.sessions_detached, "{stats:?}");
    // The file ends detached sessions with an annotated reset, after an intact prefix.
    let all = read_files(&pcapng_files(dir.path()));
    assert!(all.errors.is_empty(), "{:?}", all.errors);
    let detached = all
        .sessions
        .iter()
        .filter(|s| s.end == EndKind::Detached)
        .count();
    assert_eq!(detached as u64, stats.sessions_detached);
    assert_eq!(all.sessions.len() as u64, stats.sessions_opened);
    for s in all.sessions {
        assert!(s.client.iter().all(|&b| b == 0x5a));
        assert!(s.client.len().is_multiple_of(1400));
        if s.end == EndKind::Fin {
            let k = u64::from(s.meta.client.port() - 40_000);
            assert_eq!(s.client.len(), burst(k) * 1400);
        }
    }
}

/// Accepts one connection, reads `limit` bytes, then closes; returns what it read.
fn closing_sink(limit: usize) -> (std::net::SocketAddr, std::thread::JoinHandle<usize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; limit];
        let mut got = 0;
        while got < limit {
            match s.read(&mut buf[got..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        got
    });
    (addr, h)
}

/// A recording of one session (id 1) whose client sends each of `writes` at its offset
/// (ns after the session's start) and closes at `close_at`; with the file length after
/// each write, for tests that cut the file at a known block.
fn one_session(service: &str, writes: &[(&[u8], u64)], close_at: u64) -> (Vec<u8>, Vec<u64>) {
    let mut w = PcapngWriter::new(Vec::new(), WriterOptions::default()).unwrap();
    let m = meta(1, service);
    let mut s = w.open(1, &m, m.start_ns).unwrap();
    let mut lengths = Vec::with_capacity(writes.len());
    for (data, at) in writes {
        w.client_data(&mut s, data, m.start_ns + at).unwrap();
        lengths.push(w.bytes_written());
    }
    w.close(&mut s, m.start_ns + close_at).unwrap();
    (w.into_inner(), lengths)
}

#[test]
fn replay_reports_a_target_that_closes_early() {
    let dir = TempDir::new("early");
    let chunk = [1u8; 10_000];
    let (bytes, _) = one_session("kv", &[(&chunk[..], 1); 400], 2);
    let file = dir.path().join("big.pcapng");
    std::fs::write(&file, bytes).unwrap();

    let (addr, sink) = closing_sink(1000);
    let mut cfg = ReplayConfig::new(addr);
    cfg.pace = Pace::Fast;
    let sum = replay(&[file], &cfg, Arc::new(Progress::default()));
    assert_eq!(sink.join().unwrap(), 1000);
    assert_eq!(sum.sessions_replayed, 1);
    assert_eq!(sum.sessions_failed, 1);
    let r = &sum.sessions[0];
    assert!(
        matches!(r.outcome, Outcome::TargetClosedEarly(_)),
        "{:?}",
        r.outcome
    );
    assert_eq!(r.bytes_recorded, 4_000_000);
    assert!(r.bytes_sent < 4_000_000);
}

/// Collects what every connection sends, with the time each connection was accepted.
/// Per connection: when it was accepted, everything it sent, whether it ended in a reset.
type Collected = Vec<(Instant, Vec<u8>, bool)>;

/// Peak number of connections the sink had open at once.
static SINK_PEAK: AtomicU64 = AtomicU64::new(0);

fn collecting_sink(conns: usize) -> (std::net::SocketAddr, std::thread::JoinHandle<Collected>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let open = Arc::new(AtomicU64::new(0));
    let h = std::thread::spawn(move || {
        let mut readers = Vec::new();
        for _ in 0..conns {
            let (mut s, _) = l.accept().unwrap();
            let at = Instant::now();
            let now_open = open.fetch_add(1, Ordering::SeqCst) + 1;
            SINK_PEAK.fetch_max(now_open, Ordering::SeqCst);
            let open = Arc::clone(&open);
            readers.push(std::thread::spawn(move || {
                let mut v = Vec::new();
                let reset = s.read_to_end(&mut v).is_err();
                open.fetch_sub(1, Ordering::SeqCst);
                (at, v, reset)
            }));
        }
        readers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    (addr, h)
}

#[test]
fn replay_keeps_order_filters_and_original_pacing() {
    let dir = TempDir::new("pace");
    let mut w = PcapngWriter::new(Vec::new(), WriterOptions::default()).unwrap();
    let t0 = 1_764_000_000_000_000_000u64;
    let ms = 1_000_000u64;
    let (ma, mut mb, mut mc) = (meta(1, "kv"), meta(2, "kv"), meta(3, "other"));
    mb.start_ns = t0 + 100 * ms;
    mc.start_ns = t0 + 50 * ms;
    let ma = SessionMeta { start_ns: t0, ..ma };
    let mut a = w.open(1, &ma, ma.start_ns).unwrap();
    w.client_data(&mut a, b"a1-", t0 + ms).unwrap();
    let mut c = w.open(3, &mc, mc.start_ns).unwrap();
    w.client_data(&mut c, b"not me", mc.start_ns + ms).unwrap();
    let mut b = w.open(2, &mb, mb.start_ns).unwrap();
    w.client_data(&mut b, b"b1-", t0 + 110 * ms).unwrap();
    w.client_data(&mut a, b"a2-", t0 + 200 * ms).unwrap();
    w.client_data(&mut b, b"b2", t0 + 300 * ms).unwrap();
    w.client_data(&mut a, b"a3", t0 + 300 * ms).unwrap();
    w.close(&mut a, t0 + 301 * ms).unwrap();
    w.close(&mut b, t0 + 301 * ms).unwrap();
    w.close(&mut c, t0 + 301 * ms).unwrap();
    let file = dir.path().join("pace.pcapng");
    std::fs::write(&file, w.into_inner()).unwrap();

    let (addr, sink) = collecting_sink(2);
    let mut cfg = ReplayConfig::new(addr);
    cfg.filter.service = Some("kv".into());
    let start = Instant::now();
    let sum = replay(
        std::slice::from_ref(&file),
        &cfg,
        Arc::new(Progress::default()),
    );
    let took = start.elapsed();
    let got = sink.join().unwrap();
    assert_eq!(sum.sessions_seen, 3);
    assert_eq!(sum.sessions_filtered, 1);
    assert_eq!(sum.sessions_replayed, 2);
    assert_eq!(sum.sessions_failed, 0, "{:?}", sum.sessions);
    let mut payloads: Vec<&[u8]> = got.iter().map(|(_, v, _)| v.as_slice()).collect();
    payloads.sort();
    assert_eq!(payloads, vec![&b"a1-a2-a3"[..], &b"b1-b2"[..]]);
    // Session b connected about 100 ms after a (lower bound only: sleeps never end early).
    // Session b was recorded 100 ms after a, and the replay clock starts no earlier than
    // `start`, so b cannot have connected sooner than that (sleeps never end early).
    let b_at = got.iter().find(|c| c.1.starts_with(b"b1")).unwrap().0;
    let b_after = b_at.saturating_duration_since(start);
    assert!(
        b_after >= Duration::from_millis(100),
        "b connected after {b_after:?}"
    );
    assert!(took >= Duration::from_millis(300), "took {took:?}");
    println!("original pace: recorded span 301 ms, replay took {took:?}");

    // Fast mode with a client-prefix filter picks only session b.
    let (addr, sink) = collecting_sink(1);
    let mut cfg = ReplayConfig::new(addr);
    cfg.pace = Pace::Fast;
    cfg.filter.client = Some((*mb.client.ip(), 32));
    let sum = replay(&[file], &cfg, Arc::new(Progress::default()));
    let got = sink.join().unwrap();
    assert_eq!(sum.sessions_replayed, 1);
    assert_eq!(got[0].1, b"b1-b2");
}

/// A `redis-server` on a free 127.0.0.1 port, killed (by pid) when dropped.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start() -> Redis {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            // DEBUG DIGEST is refused unless enabled (redis ≥ 7).
            .args(["--enable-debug-command", "local"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let r = Redis { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if r.cli(&["PING"]).trim() == "PONG" {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {port} did not come up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .stderr(Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn resp(args: &[&str]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        v.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    v
}

/// `n` RESP-encoded writes over many keys, each key family keeping one type.
fn redis_commands(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity(n * 48);
    for _ in 0..n {
        let k = rng.below(5000);
        let v = rng.next() % 1_000_000;
        let cmd = match rng.below(10) {
            0..=2 => resp(&["SET", &format!("s:{k}"), &format!("v{v}")]),
            3 | 4 => resp(&["INCR", &format!("c:{}", k % 500)]),
            5 | 6 => resp(&["LPUSH", &format!("l:{}", k % 800), &format!("{v}")]),
            7 | 8 => resp(&[
                "HSET",
                &format!("h:{}", k % 300),
                &format!("f{}", v % 50),
                &format!("{v}"),
            ]),
            _ => match rng.below(3) {
                0 => resp(&["DEL", &format!("s:{k}")]),
                1 => resp(&["DEL", &format!("l:{}", k % 800)]),
                _ => resp(&["DEL", &format!("h:{}", k % 300)]),
            },
        };
        out.extend_from_slice(&cmd);
    }
    out
}

#[test]
fn replay_into_redis_matches_direct_pipe() {
    if !have_tool("redis-server", "replay_into_redis")
        || !have_tool("redis-cli", "replay_into_redis")
    {
        return;
    }
    let dir = TempDir::new("redis");
    let cmds = redis_commands(100_000, 2026);

    // Record the session the way a worker would: client writes of varying size.
    let mut cfg = recorder_config(dir.path(), 1 << 16);
    cfg.record_responses = false;
    let rec = Recorder::start(cfg).unwrap();
    let h = rec.handle();
    let id = h.open_session(meta(7, "redis")).unwrap();
    let mut rng = Rng(77);
    let mut at = 0;
    while at < cmds.len() {
        let n = (1 + rng.below(16_000) as usize).min(cmds.len() - at);
        h.client_bytes(&id, &cmds[at..at + n], SystemTime::now());
        at += n;
    }
    h.close(id);
    let stats = rec.finish();
    assert_eq!(stats.sessions_detached, 0);
    let files = pcapng_files(dir.path());
    let file_bytes: u64 = files.iter().map(|f| f.metadata().unwrap().len()).sum();

    let replayed = Redis::start();
    let direct = Redis::start();

    let out = output_ok(
        Command::new(env!("CARGO_BIN_EXE_ncp-replay"))
            .args(&files)
            .args([
                "--to",
                &format!("127.0.0.1:{}", replayed.port),
                "--pace",
                "fast",
                "--json",
            ]),
        "ncp-replay",
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["sessions_replayed"], 1);
    assert_eq!(summary["sessions_failed"], 0);
    assert_eq!(summary["bytes_sent"], cmds.len() as u64);
    let secs = summary["seconds"].as_f64().unwrap();
    println!(
        "replay throughput: {} bytes (100000 commands, {} recorded in {file_bytes} file bytes) in {secs:.3} s = {:.1} MB/s, {:.0} commands/s; {} answer bytes",
        cmds.len(),
        files.len(),
        cmds.len() as f64 / secs / 1e6,
        100_000.0 / secs,
        summary["answer_bytes"]
    );

    let mut pipe = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &direct.port.to_string(), "--pipe"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    pipe.stdin.take().unwrap().write_all(&cmds).unwrap();
    assert!(pipe.wait().unwrap().success());

    let (a, b) = (
        replayed.cli(&["DEBUG", "DIGEST"]),
        direct.cli(&["DEBUG", "DIGEST"]),
    );
    let is_digest =
        |d: &str| d.trim().len() == 40 && d.trim().bytes().all(|c| c.is_ascii_hexdigit());
    assert!(is_digest(&a) && is_digest(&b), "not digests: {a:?} {b:?}");
    assert_ne!(a.trim(), "0".repeat(40), "empty data set");
    assert_eq!(a, b, "DEBUG DIGEST differs");
    let keys: u64 = replayed.cli(&["DBSIZE"]).trim().parse().unwrap();
    assert!(keys > 1000, "{keys} keys");
}

#[test]
fn replay_binary_reports_damage_and_replays_what_is_intact() {
    let dir = TempDir::new("damaged");
    let (mut bytes, lengths) = one_session("kv", &[(b"intact bytes", 1), (b"lost bytes", 2)], 3);
    let good_len = lengths[0];
    // Cut the file inside the block that holds "lost bytes".
    bytes.truncate(good_len as usize + 30);
    let file = dir.path().join("cut.pcapng");
    std::fs::write(&file, &bytes).unwrap();

    let (addr, sink) = collecting_sink(1);
    let out = Command::new(env!("CARGO_BIN_EXE_ncp-replay"))
        .arg(&file)
        .args(["--to", &addr.to_string(), "--pace", "fast"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("byte offset {good_len}")),
        "{stderr}"
    );
    assert!(stderr.contains("truncated block"), "{stderr}");
    let got = sink.join().unwrap();
    assert_eq!(got[0].1, b"intact bytes");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("replayed 1 sessions"), "{stdout}");
}

#[test]
fn replay_over_the_session_limit_waits_instead_of_deadlocking() {
    // 30 sessions all open before any sends or ends, replayed with room for 4 at a time:
    // sessions 5.. must wait in memory while the first four still need later events.
    let dir = TempDir::new("limit");
    let mut w = PcapngWriter::new(Vec::new(), WriterOptions::default()).unwrap();
    let n = 30u64;
    let mut sessions: Vec<_> = (0..n)
        .map(|i| {
            let m = meta(i, "kv");
            w.open(i, &m, m.start_ns).unwrap()
        })
        .collect();
    for round in 0..3u8 {
        for (i, s) in sessions.iter_mut().enumerate() {
            w.client_data(s, &[i as u8, round], 1).unwrap();
        }
    }
    for (i, s) in sessions.iter_mut().enumerate() {
        if i == 7 {
            w.abort(s, false, 2).unwrap();
        } else {
            w.close(s, 2).unwrap();
        }
    }
    let file = dir.path().join("many.pcapng");
    std::fs::write(&file, w.into_inner()).unwrap();

    SINK_PEAK.store(0, Ordering::SeqCst);
    let (addr, sink) = collecting_sink(n as usize);
    let mut cfg = ReplayConfig::new(addr);
    cfg.pace = Pace::Fast;
    cfg.max_sessions = 4;
    let sum = replay(&[file], &cfg, Arc::new(Progress::default()));
    let got = sink.join().unwrap();
    assert_eq!(sum.sessions_replayed, n);
    assert_eq!(sum.sessions_failed, 0, "{:?}", sum.sessions);
    assert_eq!(sum.bytes_sent, n * 6);
    // The replay itself never had more than 4 sessions open, and used all 4.
    assert_eq!(sum.peak_sessions, 4);
    // The target may count one more: the replay's thread of the reset session ends right
    // after its RST, so the next session can connect before the target's reader has seen
    // that reset. Ends by FIN wait for the target's own close, so they never overlap.
    let peak = SINK_PEAK.load(Ordering::SeqCst);
    assert!(peak <= 5, "{peak} connections at once");
    let mut seen: Vec<Vec<u8>> = got.iter().map(|(_, v, _)| v.clone()).collect();
    seen.sort();
    for (i, v) in seen.iter().enumerate() {
        assert_eq!(v, &[i as u8, 0, i as u8, 1, i as u8, 2]);
    }
    // The reset session was reset toward the target too; the others ended with a FIN.
    let resets: Vec<u8> = got.iter().filter(|c| c.2).map(|c| c.1[0]).collect();
    assert_eq!(resets, vec![7]);
    assert_eq!(sum.sessions[7].recorded_end, EndKind::Reset);
}

#[test]
fn recorder_rotates_by_time_and_files_read_while_recording() {
    let dir = TempDir::new("timerot");
    let mut cfg = recorder_config(dir.path(), 1024);
    cfg.rotate_secs = 1;
    let rec = Recorder::start(cfg).unwrap();
    let h = rec.handle();
    let id = h.open_session(meta(1, "kv")).unwrap();
    let mut sent = Vec::new();
    let mut rng = Rng(21);
    let start = Instant::now();
    let mut checked_live = false;
    while start.elapsed() < Duration::from_millis(2300) {
        let len = rng.below(4000) as usize;
        let d = rng.bytes(len);
        h.client_bytes(&id, &d, SystemTime::now());
        sent.extend_from_slice(&d);
        std::thread::sleep(Duration::from_millis(50));
        if !checked_live && start.elapsed() > Duration::from_millis(1500) {
            // The recorder is still running: what it flushed is already readable and a
            // prefix of what was sent. A flush may be under way at this very moment, so the
            // last file may end in a partial block, which the reader must just report.
            let files = pcapng_files(dir.path());
            let live = read_files(&files);
            assert!(live.errors.len() <= 1, "{:?}", live.errors);
            for e in &live.errors {
                assert!(
                    matches!(e.error.kind, FormatErrorKind::Truncated { .. }),
                    "{e}"
                );
            }
            assert_eq!(live.sessions.len(), 1);
            assert!(sent.starts_with(&live.sessions[0].client));
            assert!(!live.sessions[0].client.is_empty(), "nothing flushed");
            assert_eq!(live.sessions[0].end, EndKind::Unterminated);
            checked_live = true;
        }
    }
    h.close(id);
    let stats = rec.finish();
    let files = pcapng_files(dir.path());
    assert!(files.len() >= 2, "{files:?}");
    assert_eq!(stats.files as usize, files.len());
    let all = read_files(&files);
    assert!(all.errors.is_empty());
    assert_eq!(all.sessions[0].client, sent);
    assert_eq!(all.sessions[0].end, EndKind::Fin);
    assert!(checked_live);
}

/// A discard server: accepts any number of connections and reads them to the end.
fn discard_sink() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s, &mut std::io::sink());
            });
        }
    });
    addr
}

/// Throughput of the whole path (file → reader → sessions → kernel TCP) on a larger
/// recording. Information only; run with
/// `cargo test --release -p ncp-dataplane --test offline -- --ignored --nocapture`.
#[test]
#[ignore = "large recording; run explicitly for a throughput figure"]
fn replay_throughput_large_recording() {
    let dir = TempDir::new("throughput");
    let file = dir.path().join("big.pcapng");
    let (sessions, per_session) = (192u64, 1usize << 20);
    let t = Instant::now();
    {
        let f = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
        let mut w = PcapngWriter::new(f, WriterOptions::default()).unwrap();
        let mut rng = Rng(9);
        let chunk = rng.bytes(16 * 1024);
        // 16 sessions at a time, each written in 16 KiB client writes.
        for group in 0..sessions / 16 {
            let mut live: Vec<_> = (0..16)
                .map(|j| {
                    let m = meta(group * 16 + j, "bulk");
                    w.open(group * 16 + j, &m, m.start_ns).unwrap()
                })
                .collect();
            for _ in 0..per_session / chunk.len() {
                for s in &mut live {
                    w.client_data(s, &chunk, 1).unwrap();
                }
            }
            for s in &mut live {
                w.close(s, 2).unwrap();
            }
        }
        w.flush().unwrap();
    }
    let file_len = file.metadata().unwrap().len();
    println!(
        "wrote {file_len} bytes of pcapng for {} MiB of client data in {:?}",
        (sessions as usize * per_session) >> 20,
        t.elapsed()
    );
    let t = Instant::now();
    let rec = read_files(std::slice::from_ref(&file));
    println!(
        "read back {} sessions in {:?} ({:.0} MB/s of file)",
        rec.sessions.len(),
        t.elapsed(),
        file_len as f64 / t.elapsed().as_secs_f64() / 1e6
    );
    drop(rec);

    let mut cfg = ReplayConfig::new(discard_sink());
    cfg.pace = Pace::Fast;
    cfg.max_sessions = 64;
    let sum = replay(&[file], &cfg, Arc::new(Progress::default()));
    assert_eq!(sum.sessions_failed, 0);
    assert_eq!(sum.bytes_sent, sessions * per_session as u64);
    println!(
        "replay throughput: {} sessions, {} bytes in {:.2} s = {:.0} MB/s",
        sum.sessions_replayed,
        sum.bytes_sent,
        sum.seconds,
        sum.bytes_sent as f64 / sum.seconds / 1e6
    );

    // Many short sessions: what a connection-per-request workload costs the replay.
    let small = dir.path().join("small.pcapng");
    let (count, each) = (10_000u64, 1024usize);
    {
        let f = std::io::BufWriter::new(std::fs::File::create(&small).unwrap());
        let mut w = PcapngWriter::new(f, WriterOptions::default()).unwrap();
        let request = Rng(11).bytes(each);
        for i in 0..count {
            let m = meta(i, "short");
            let mut s = w.open(i, &m, m.start_ns).unwrap();
            w.client_data(&mut s, &request, 1).unwrap();
            w.close(&mut s, 2).unwrap();
        }
        w.flush().unwrap();
    }
    let sum = replay(&[small], &cfg, Arc::new(Progress::default()));
    assert_eq!(sum.sessions_failed, 0);
    assert_eq!(sum.sessions_replayed, count);
    assert_eq!(sum.bytes_sent, count * each as u64);
    println!(
        "replay of short sessions: {} sessions of {each} bytes in {:.2} s = {:.0} sessions/s",
        sum.sessions_replayed,
        sum.seconds,
        sum.sessions_replayed as f64 / sum.seconds
    );
}

#[test]
fn replay_accepts_a_target_that_closes_after_everything_was_sent() {
    // Like an HTTP/1.0 exchange: the server closes once it has the request, while the
    // recorded client only closes 200 ms later.
    let dir = TempDir::new("closes-after");
    let (bytes, _) = one_session("web", &[(b"GET /\r\n\r\n", 1_000_000)], 200_000_000);
    let file = dir.path().join("http.pcapng");
    std::fs::write(&file, bytes).unwrap();

    let (addr, sink) = closing_sink(9);
    let sum = replay(
        &[file],
        &ReplayConfig::new(addr),
        Arc::new(Progress::default()),
    );
    assert_eq!(sink.join().unwrap(), 9);
    assert_eq!(sum.sessions_failed, 0, "{:?}", sum.sessions);
    assert_eq!(sum.bytes_sent, 9);
}
