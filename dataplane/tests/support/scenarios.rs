//! Replication scenarios that both data planes must pass, written once: each mode's test
//! file names a test per scenario and calls it with its [`Mode`] and test-bed prefix.

use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpStream},
    sync::{Arc, MutexGuard, mpsc},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use ncp_dataplane::driver::consistency::{ConsistencyState, ReplicaConsistency};
use ncp_dataplane::driver::spool::spool_files;
use ncp_testbed::workload::{redis_writes, seeded_bytes};

use super::{
    PATIENCE, in_netns,
    redis::{self, run_pipe},
    scene::{Mode, Scene, Service, wait_until},
    serial,
    streams::{gated_server, one_shot_server, send_stream},
};

/// Commands of the redis workloads.
const COMMANDS: usize = 100_000;

/// A port nothing listens on, on the primary or on the replica.
pub const CLOSED_PORT: u16 = 7000;

/// The replica budget each mode's scenes have always used.
fn replica_budget(mode: Mode) -> u64 {
    match mode {
        Mode::Sockets => 64 << 20,
        Mode::Xdp => 16 << 20,
    }
}

/// The scene of one replicated service on `port`.
fn start(mode: Mode, prefix: &'static str, name: &'static str, port: u16) -> Scene {
    let service = Service::new(name, port).budget(replica_budget(mode));
    Scene::start(mode, prefix, &[service], "")
}

/// The scene of the redis scenarios (one at a time, see [`serial`]): a redis on the
/// primary and one on the replica, whose index [`Scene::kill`] takes. `None` when the
/// machine cannot run the test named `what`.
fn redis_scene(
    mode: Mode,
    prefix: &'static str,
    what: &str,
) -> Option<(MutexGuard<'static, ()>, Scene, usize)> {
    if !mode.ready_or_skip(what, &["ping", "redis-server", "redis-cli"]) {
        return None;
    }
    let serial = serial();
    let mut scene = start(mode, prefix, "redis", redis::PORT);
    scene.start_redis("primary");
    let replica = scene.start_redis("replica");
    Some((serial, scene, replica))
}

/// `total_connections_received` from `INFO stats`.
fn connections_received(scene: &Scene, host: &str) -> u64 {
    let info = scene.redis(host, &["INFO", "stats"]);
    info.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no total_connections_received in {info}"))
}

/// A redis workload through the middlebox leaves the primary and the replica with the
/// same data, and the replica heard from nobody but the middlebox.
pub fn redis_workload_leaves_primary_and_replica_with_the_same_data(
    mode: Mode,
    prefix: &'static str,
    seed: u64,
) {
    let Some((_serial, mut scene, _)) = redis_scene(mode, prefix, "redis") else {
        return;
    };
    let mb1 = scene.bed.address("middlebox", "eth1").unwrap();
    let before = connections_received(&scene, "replica");
    let workload = redis_writes(COMMANDS, seed);
    let len = workload.len() as u64;

    let started = Instant::now();
    let pipe = {
        let command = scene.pipe_command();
        thread::spawn(move || {
            run_pipe(command, move |mut stdin| {
                stdin.write_all(&workload).unwrap();
            })
        })
    };
    // While the session runs, the replica's only remote client is the middlebox's
    // replication address.
    scene.stats_when("session starts", |s| {
        s.counters.sessions_total == 1 && s.services[0].replicas[0].bytes_out > 0
    });
    let clients = scene.redis("replica", &["CLIENT", "LIST"]);
    let remote: Vec<&str> = clients
        .lines()
        .filter_map(|l| l.split_whitespace().find_map(|f| f.strip_prefix("addr=")))
        .filter(|a| !a.starts_with("127.0.0.1:"))
        .collect();
    let out = pipe.join().unwrap();
    let elapsed = started.elapsed();
    assert!(out.contains("errors: 0, replies: 100000"), "{out}");
    assert!(
        remote.iter().all(|a| a.starts_with(&format!("{mb1}:"))),
        "replica clients: {clients}"
    );

    // The replica's connection lingers after the session until the replica closes it.
    let s = scene.stats_when("session ends and its connections are closed", |s| {
        s.counters.sessions_total == 1
            && s.counters.sessions_active == 0
            && s.lingering_connections == 0
    });
    let svc = &s.services[0];
    // redis-cli --pipe ends the stream with an ECHO of its own, hence "at least".
    assert!(svc.primary_bytes_out >= len, "{s:#?}");
    assert_eq!(svc.primary_bytes_out, svc.client_bytes_in, "{s:#?}");
    assert_eq!(svc.replicas[0].bytes_out, svc.primary_bytes_out, "{s:#?}");
    assert_eq!(svc.detached.total(), 0, "{s:#?}");

    // Connections the replica took since `before`: the middlebox's, the CLIENT LIST
    // above and the INFO below (counted while it runs).
    let after = connections_received(&scene, "replica");
    let from_middlebox = after - before - 2;
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
        "{} redis: {COMMANDS} commands ({len} bytes) in {elapsed:.2?}; DBSIZE {keys}; DEBUG DIGEST primary {primary} replica {replica}; replica connections during the run {from_middlebox} (remote clients seen: {remote:?})",
        mode.name()
    );
    assert_eq!(
        from_middlebox, 1,
        "someone besides the middlebox talked to the replica"
    );
    assert_eq!(primary.len(), 40, "unexpected digest {primary:?}");
    assert_ne!(primary, "0".repeat(40), "primary is empty");
    assert_eq!(primary, replica);
    scene.stop_middlebox();
}

/// A replica killed mid-session is detached; the primary gets the whole workload and ends
/// with the data of a direct run.
pub fn killed_replica_is_detached_and_the_primary_completes(
    mode: Mode,
    prefix: &'static str,
    seed: u64,
) {
    let Some((_serial, mut scene, replica_redis)) = redis_scene(mode, prefix, "replica killed")
    else {
        return;
    };
    let workload = redis_writes(COMMANDS, seed);
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
    assert_eq!(s.counters.sessions_active, 1);
    scene.kill(replica_redis);
    killed_tx.send(()).unwrap();
    let out = pipe.join().unwrap();
    assert!(out.contains("errors: 0, replies: 100000"), "{out}");

    let s = scene.stats_when("session ends", |s| {
        s.counters.sessions_total == 1 && s.counters.sessions_active == 0
    });
    let svc = &s.services[0];
    assert!(svc.primary_bytes_out >= len, "{s:#?}");
    assert_eq!(svc.primary_bytes_out, svc.client_bytes_in, "{s:#?}");
    assert_eq!(svc.replicas[0].detached.total(), 1, "{s:#?}");
    assert!(svc.replicas[0].bytes_out < len, "{s:#?}");
    assert!(svc.replicas[0].bytes_out < svc.primary_bytes_out, "{s:#?}");
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
        "{} replica killed: detached {:?}, replica was handed {} of {len} bytes; DBSIZE {}; digest primary {primary} reference {expected}",
        mode.name(),
        svc.replicas[0].detached,
        svc.replicas[0].bytes_out,
        scene.redis("primary", &["DBSIZE"]),
    );
    assert_eq!(primary.len(), 40, "unexpected digest {primary:?}");
    assert_eq!(primary, expected, "primary differs from a direct run");
    scene.stop_middlebox();
}

/// A primary that refuses every connection: each client is reset promptly, every session
/// ends and none is left behind.
pub fn refusing_primary_resets_clients_promptly_and_leaves_no_session(
    mode: Mode,
    prefix: &'static str,
) {
    if !mode.ready_or_skip("primary refusing", &["ping"]) {
        return;
    }
    let _serial = serial();
    let mut scene = start(mode, prefix, "closed", CLOSED_PORT);
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
    let s = scene.stats_when("all sessions end", |s| {
        s.counters.sessions_total == CONNECTIONS as u64 && s.counters.sessions_active == 0
    });
    let svc = &s.services[0];
    eprintln!(
        "{} primary refusing: {CONNECTIONS} connections reset in {total:.2?} (slowest {slowest:.2?}); sessions active {}, primary failures {}, replica detaches {:?}, lingering {}",
        mode.name(),
        s.counters.sessions_active,
        svc.primary_failures,
        svc.replicas[0].detached,
        s.lingering_connections
    );
    assert!(slowest < Duration::from_secs(2), "a reset took {slowest:?}");
    assert_eq!(svc.primary_failures, CONNECTIONS as u64, "{s:#?}");
    assert_eq!(s.counters.sessions_refused, 0, "{s:#?}");
    assert_eq!(svc.primary_bytes_out, 0);
    if mode == Mode::Sockets {
        // The relay dials the replicas alongside the primary, so each session also met a
        // refusing replica; XDP mode's count is printed above.
        assert_eq!(
            svc.replicas[0].detached.total(),
            CONNECTIONS as u64,
            "every replica connection was refused too: {s:#?}"
        );
    }
    scene.stop_middlebox();
}

/// A replica that was written to behind the middlebox's back is found out by the answers:
/// in step through a workload (after the operator's reset at start), diverged at the
/// offset of the first differing answer once a GET of that key goes through the
/// middlebox, in step again after the operator's reset.
pub fn a_replica_written_behind_the_middlebox_is_found_diverged_by_its_answers(
    mode: Mode,
    prefix: &'static str,
    seed: u64,
) {
    if !mode.ready_or_skip("divergence", &["ping", "redis-server", "redis-cli"]) {
        return;
    }
    let _serial = serial();
    let service = Service::new("redis", redis::PORT)
        .budget(replica_budget(mode))
        .verify_replies();
    let mut scene = Scene::start(mode, prefix, &[service], "");
    scene.start_redis("primary");
    scene.start_redis("replica");
    let replica = SocketAddrV4::new(scene.replica, redis::PORT);
    let is_replica = move |r: &ReplicaConsistency| r.service == "redis" && r.replica == replica;

    // The middlebox cannot know what the replica missed before it started.
    let r = scene.consistency_when("unknown at start", |r| is_replica(r));
    assert_eq!(r.state, ConsistencyState::Unknown, "{r:#?}");
    assert!(r.reasons.unknown_since_start);
    scene.reset_replica("redis", replica);
    scene.consistency_when("in step after the reset", |r| {
        is_replica(r) && r.state == ConsistencyState::InStep
    });

    // A workload: the replica answers what the primary answers.
    const WRITES: usize = 2000;
    let out = run_pipe(scene.pipe_command(), move |mut stdin| {
        stdin.write_all(&redis_writes(WRITES, seed)).unwrap();
    });
    assert!(
        out.contains(&format!("errors: 0, replies: {WRITES}")),
        "{out}"
    );
    scene.stats_when("the workload's session ends", |s| {
        s.counters.sessions_total == 1 && s.counters.sessions_active == 0
    });
    let r = scene.consistency_when("answers compared", |r| {
        is_replica(r) && r.verification.bytes_compared > 0
    });
    assert_eq!(r.state, ConsistencyState::InStep, "{r:#?}");
    assert_eq!(r.verification.mismatches, 0, "{r:#?}");

    // A key only the replica has: its answer to the GET differs from the primary's nil.
    assert_eq!(
        scene.redis("replica", &["SET", "diverged", "replica-only"]),
        "OK"
    );
    let to = SocketAddrV4::new(scene.primary, redis::PORT);
    let (close_tx, close_rx) = mpsc::channel::<()>();
    let client = in_netns(&scene.bed.netns("source").unwrap(), move || {
        let mut stream = TcpStream::connect_timeout(&to.into(), PATIENCE).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream.write_all(b"GET diverged\r\n").unwrap();
        let mut answer = [0u8; 64];
        let n = stream.read(&mut answer).unwrap();
        // Open until the test has seen the verdict: the replica's answer is judged while
        // its session runs.
        let _ = close_rx.recv_timeout(PATIENCE);
        answer[..n].to_vec()
    });
    let r = scene.consistency_when("diverged by the GET's answer", |r| {
        is_replica(r) && r.state == ConsistencyState::Diverged
    });
    close_tx.send(()).unwrap();
    assert_eq!(
        client.join().unwrap(),
        b"$-1\r\n",
        "the client got the primary's nil"
    );
    eprintln!("{} divergence: {r:#?}", mode.name());
    assert_eq!(r.reasons.reply_mismatch, 1, "{r:#?}");
    assert_eq!(r.reasons.detached.total(), 0, "{r:#?}");
    assert_eq!(r.last_reason.as_deref(), Some("reply mismatch at offset 1"));
    let first = r
        .first_mismatch
        .as_ref()
        .expect("the first mismatch is kept");
    assert_eq!(first.offset, 1, "{r:#?}");
    assert_eq!(first.primary, "-1\\r\\n");
    assert_eq!(first.replica, "12\\r\\nreplica-only\\r\\n");

    // The operator re-cloned it (here: removed the key) and says so.
    scene.redis("replica", &["DEL", "diverged"]);
    scene.reset_replica("redis", replica);
    let r = scene.consistency_when("in step after the second reset", |r| {
        is_replica(r) && r.state == ConsistencyState::InStep
    });
    assert_eq!(
        r.verification.mismatches, 1,
        "totals survive a reset: {r:#?}"
    );
    assert_eq!(r.verification.operator_resets, 2, "{r:#?}");
    scene.stop_middlebox();
}

/// Port of the spilling scenarios' service.
const SPILL_PORT: u16 = 5301;
/// Their replica's memory budget: far below what the client sends.
const SPILL_MEMORY_BUDGET: u64 = 256 << 10;
/// What the client sends in them.
const SPILL_STREAM: usize = 24 << 20;

/// A scene whose one service spills its replica to a directory of its own.
struct SpillScene {
    _serial: MutexGuard<'static, ()>,
    scene: Scene,
    dir: std::path::PathBuf,
}

/// A stream in flight through a [`SpillScene`]: the client sends [`SPILL_STREAM`]
/// seeded bytes while the replica's server accepts and then reads nothing until
/// [`Stalled::release`].
struct Stalled {
    data: Arc<Vec<u8>>,
    primary: JoinHandle<Vec<u8>>,
    gate: mpsc::Sender<()>,
    replica: JoinHandle<(Vec<u8>, bool)>,
    client: JoinHandle<(String, Duration)>,
}

/// What the ends of a [`Stalled`] stream got once it was released.
struct Released {
    /// From the client's connect to the server's close.
    took: Duration,
    primary_got: Vec<u8>,
    replica_got: Vec<u8>,
    /// The replica's stream ended cleanly (`false`: reset, i.e. detached).
    replica_clean: bool,
}

impl SpillScene {
    /// Starts the scene, with `spill_budget` per session, and the stalled stream through
    /// it; `None` if the bed is not ready (a skip).
    fn stalled(
        mode: Mode,
        prefix: &'static str,
        what: &str,
        spill_budget: u64,
        seed: u64,
    ) -> Option<(Self, Stalled)> {
        if !mode.ready_or_skip(what, &["ping"]) {
            return None;
        }
        let serial = serial();
        let dir = std::env::temp_dir().join(format!(
            "ncp-spill-{prefix}-{}-{}",
            mode.name(),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let service = Service::new("bulk", SPILL_PORT)
            .budget(SPILL_MEMORY_BUDGET)
            .spill(&dir, spill_budget);
        let scene = Scene::start(mode, prefix, &[service], "");
        let data = Arc::new(seeded_bytes(seed, SPILL_STREAM));
        let primary = one_shot_server(&scene.bed, "primary", SPILL_PORT, "primary");
        let (gate, gated) = mpsc::channel();
        let replica = gated_server(&scene.bed, "replica", SPILL_PORT, gated);
        let to = SocketAddrV4::new(scene.primary, SPILL_PORT);
        let client = {
            let (data, bed) = (Arc::clone(&data), scene.bed.clone());
            thread::spawn(move || send_stream(&bed, "source", to, data))
        };
        let stalled = Stalled {
            data,
            primary,
            gate,
            replica,
            client,
        };
        Some((
            Self {
                _serial: serial,
                scene,
                dir,
            },
            stalled,
        ))
    }

    /// Waits until the spool files are gone, then removes the directory.
    fn assert_spool_removed(&self) {
        wait_until("the spool files are removed", PATIENCE, || {
            spool_files(&self.dir).is_empty()
        });
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Stalled {
    /// Lets the replica read and waits for every end. The client is answered by the
    /// primary, which got every byte the client sent.
    fn release(self) -> Released {
        self.gate.send(()).unwrap();
        let (answer, took) = self.client.join().unwrap();
        assert_eq!(answer, format!("primary {SPILL_STREAM}\n"));
        let primary_got = self.primary.join().unwrap();
        assert!(primary_got == *self.data, "the primary got other bytes");
        let (replica_got, replica_clean) = self.replica.join().unwrap();
        Released {
            took,
            primary_got,
            replica_got,
            replica_clean,
        }
    }
}

/// A replica that stops reading for far longer than its memory budget lasts, while the
/// client keeps writing, is not detached: its backlog goes to its spool and it catches
/// up from there once it reads again, ending with exactly the bytes the primary got; the
/// client is not held up; the spool files are gone afterwards.
pub fn a_stalled_replica_spills_and_catches_up_with_every_byte(
    mode: Mode,
    prefix: &'static str,
    seed: u64,
) {
    let Some((run, stalled)) =
        SpillScene::stalled(mode, prefix, "stalled replica spills", 256 << 20, seed)
    else {
        return;
    };
    // The replica stays stopped until its spool holds many memory budgets' worth.
    let s = run.scene.stats_when("the stalled replica spills", |s| {
        s.services[0].replicas[0].spilled_bytes >= 16 * SPILL_MEMORY_BUDGET
    });
    assert_eq!(s.services[0].replicas[0].detached.total(), 0, "{s:#?}");
    let Released {
        took,
        primary_got,
        replica_got: got,
        replica_clean: clean,
    } = stalled.release();
    assert!(
        clean,
        "the replica's stream was reset after {} bytes",
        got.len()
    );
    assert_eq!(
        got.len(),
        SPILL_STREAM,
        "the replica got a different length"
    );
    assert!(
        got == primary_got,
        "the replica got other bytes than the primary"
    );

    let s = run.scene.stats_when("the session ends", |s| {
        s.counters.sessions_total == 1 && s.counters.sessions_active == 0
    });
    let r = &s.services[0].replicas[0];
    eprintln!(
        "{} stalled replica: client done in {took:?}; spilled {} B, replayed {} B, sent {} B",
        mode.name(),
        r.spilled_bytes,
        r.replayed_bytes,
        r.bytes_out
    );
    assert!(
        r.spilled_bytes > 0 && r.replayed_bytes == r.spilled_bytes,
        "{s:#?}"
    );
    assert_eq!(r.bytes_out, SPILL_STREAM as u64, "{s:#?}");
    assert_eq!(r.detached.total(), 0, "{s:#?}");
    assert_eq!(s.counters.drops.spill_failed, 0, "{s:#?}");
    let c = run.scene.consistency_when("the replica's state", |_| true);
    assert_eq!(c.reasons.detached.total(), 0, "{c:#?}");
    assert_ne!(c.state, ConsistencyState::Diverged, "{c:#?}");
    run.assert_spool_removed();
}

/// With a spill budget too small for the replica's backlog, the stalled replica is
/// detached after all, for that reason, and marked diverged; the primary still gets
/// every byte and the spool files are gone.
pub fn a_replica_beyond_its_spill_budget_is_detached_and_diverged(
    mode: Mode,
    prefix: &'static str,
    seed: u64,
) {
    let Some((run, stalled)) = SpillScene::stalled(
        mode,
        prefix,
        "replica beyond its spill budget",
        4 * SPILL_MEMORY_BUDGET,
        seed,
    ) else {
        return;
    };
    let s = run
        .scene
        .stats_when("the replica is detached beyond its spill budget", |s| {
            s.services[0].replicas[0].detached.spill_budget == 1
        });
    assert!(s.services[0].replicas[0].spilled_bytes > 0, "{s:#?}");
    let Released {
        replica_got: got,
        replica_clean: clean,
        ..
    } = stalled.release();
    assert!(
        !clean || got.len() < SPILL_STREAM,
        "a detached replica got everything"
    );

    let c = run.scene.consistency_when("the replica is diverged", |r| {
        r.state == ConsistencyState::Diverged
    });
    assert_eq!(c.reasons.detached.spill_budget, 1, "{c:#?}");
    assert!(
        c.last_reason
            .as_deref()
            .is_some_and(|t| t.contains("spill budget exceeded")),
        "{c:#?}"
    );
    run.assert_spool_removed();
}
