//! `cargo xtask faults`: the fault matrix. The demo's test bed (paper topology, OVS
//! bridges under ncpd over TLS, the XDP middlebox, Redis on the primary and the replica,
//! replication 1 with reply verification) carries a steady client — a write every 10 ms
//! in sessions of 50 writes ([`writer`]) — while one fault at a time strikes 3.25 s in
//! (mid-session) and is repaired where it needs repairing. For each fault the table says what the
//! client saw (failed writes, the longest time without an answer), how long after the
//! repair replication was back (the replica held every later write), and how many
//! acknowledged writes the replica missed. The table goes to RELIABILITY.md (a run of some
//! faults only writes RELIABILITY.md.partial).
//!
//! Why these measures: the client's view is what an operator's users feel; "back after"
//! covers rules and replication together (a redirect without a working replica leg does
//! not count); "missed" is the data the replica lacks and the controller must report as
//! diverged. Writes are plain `SET`s so that a missed write shows as a missing key.

mod outcome;
mod writer;

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, TcpStream};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use ncp_testbed::{Testbed, workload};

use super::{OPENFLOW, PREFIX, REDIS_PORT, Scene, WORK};
use crate::{cmd::step, middlebox::Middlebox, setup};
use outcome::{Outcome, outcome, parse_log, replica_keys};
use writer::now_us;
pub use writer::writer_main;

/// Length of each fault's run, when the fault strikes, and the writer's pace.
const RUN: Duration = Duration::from_secs(12);
/// Mid-session (sessions take half a second): a fault right at a session's end would hit
/// a connection that is closing anyway.
const FAULT_AT: Duration = Duration::from_millis(3250);
const INTERVAL: Duration = Duration::from_millis(10);
const WRITES_PER_SESSION: u64 = 50;
/// Middlebox restart to replication resumed: the limit.
const MIDDLEBOX_BACK_LIMIT_S: f64 = 3.0;
/// Size of the tmpfs the middlebox records into (the recording-disk-full fault fills it).
const RECORDING_DISK: &str = "size=4m";

/// One fault of the matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// The middlebox process killed (SIGKILL) mid-session, restarted a second later.
    MiddleboxRestart,
    /// The replica's Redis killed (SIGKILL) mid-session, restarted (empty) 2 s later.
    ReplicaKilled,
    /// The replica's Redis stopped (SIGSTOP) for 3 s mid-session, then continued.
    ReplicaStopped,
    /// The replica's TCP connections from the middlebox aborted (`ss -K`) mid-session.
    ReplicaReset,
    /// The primary's Redis killed (SIGKILL), restarted (empty) a second later.
    PrimaryRestart,
    /// ncpd killed (SIGKILL) in the middle of reinstalling a wiped switch's rules,
    /// restarted a second later from its state file.
    NcpdKilled,
    /// ovs-vswitchd killed (SIGKILL) and restarted: every flow table gone, every switch
    /// reconnects.
    VswitchdRestart,
    /// The redirecting switch's bridge deleted and re-created (same datapath id, ports).
    BridgeRecreated,
    /// The middlebox's recording disk (a 4 MiB tmpfs) filled up for 3 s, then freed.
    RecordingDiskFull,
    /// A process claims the redirecting switch's datapath id on the OpenFlow port without
    /// a switch certificate.
    ImpostorSwitch,
    /// A peer sends 64 KiB of garbage to the OpenFlow port.
    HostilePeer,
}

impl Fault {
    fn name(self) -> String {
        use clap::ValueEnum as _;
        self.to_possible_value()
            .map_or_else(|| format!("{self:?}"), |v| v.get_name().to_owned())
    }
}

/// One row of the table.
struct Row {
    fault: Fault,
    /// What was done, in the table's words.
    action: String,
    outcome: Outcome,
    /// What else the run showed (controller counters, the replica's reported state).
    note: String,
}

/// Runs the chosen faults (all when `only` is empty) and writes the table.
pub fn faults(only: &[Fault]) -> anyhow::Result<()> {
    use clap::ValueEnum as _;
    setup::setup()?;
    let chosen: Vec<Fault> = if only.is_empty() {
        Fault::value_variants().to_vec()
    } else {
        only.to_vec()
    };
    let bins = crate::middlebox::build_release(&["ncp-dataplane", "ncp-controller"])?;
    let mut scene = Scene::bring_up(bins)?;
    let rows = run_matrix(&mut scene, &chosen);
    drop(scene);
    step("tearing down");
    Testbed::down(PREFIX)?;
    let rows = rows?;
    let table = render(&rows);
    println!("\n{table}");
    let path = if only.is_empty() {
        "RELIABILITY.md"
    } else {
        "RELIABILITY.md.partial"
    };
    std::fs::write(path, &table).with_context(|| format!("writing {path}"))?;
    println!("written to {path}");
    let slow = rows.iter().find(|r| {
        r.fault == Fault::MiddleboxRestart
            && r.outcome
                .back_after_s
                .is_none_or(|s| s > MIDDLEBOX_BACK_LIMIT_S)
    });
    if let Some(r) = slow {
        bail!(
            "middlebox restart: replication back after {:?} s, the limit is {MIDDLEBOX_BACK_LIMIT_S} s",
            r.outcome.back_after_s
        );
    }
    Ok(())
}

/// The processes a fault acts on, besides what the scene holds.
struct Matrix<'a> {
    scene: &'a mut Scene,
    config: String,
    middlebox: Middlebox,
    primary_redis: Child,
    replica_redis: Child,
    primary: Ipv4Addr,
    /// The recording directory, a tmpfs of its own.
    recording: RecordingDisk,
}

impl Drop for Matrix<'_> {
    fn drop(&mut self) {
        for child in [&mut self.primary_redis, &mut self.replica_redis] {
            crate::cmd::stop_child(child, Duration::from_secs(5));
        }
        self.middlebox.stop();
    }
}

/// A small tmpfs mounted for the middlebox's recording (unmounted on drop), so that
/// filling it fills nothing else.
struct RecordingDisk {
    dir: std::path::PathBuf,
}

impl RecordingDisk {
    fn mount() -> anyhow::Result<Self> {
        let dir = std::path::PathBuf::from(format!("{WORK}/recording"));
        std::fs::create_dir_all(&dir)?;
        let path = dir.to_str().context("recording path")?;
        // A run that died before unmounting left its tmpfs here: not stacked on.
        let _ = ncp_testbed::cmd::run(&["umount", path]);
        ncp_testbed::cmd::run(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            RECORDING_DISK,
            "ncp-faults",
            path,
        ])?;
        Ok(Self { dir })
    }

    /// Writes a filler file until the disk is full; returns its path and size.
    fn fill(&self) -> anyhow::Result<(std::path::PathBuf, u64)> {
        let path = self.dir.join("filler");
        let mut f = std::fs::File::create(&path)?;
        let chunk = vec![0u8; 64 << 10];
        let mut written = 0u64;
        while let Ok(n) = f.write(&chunk) {
            if n == 0 {
                break;
            }
            written += n as u64;
        }
        Ok((path, written))
    }
}

impl Drop for RecordingDisk {
    fn drop(&mut self) {
        if let Some(path) = self.dir.to_str() {
            let _ = ncp_testbed::cmd::run(&["umount", path]);
        }
    }
}

fn run_matrix(scene: &mut Scene, chosen: &[Fault]) -> anyhow::Result<Vec<Row>> {
    scene.start_ncpd()?;
    step(
        "starting the middlebox, Redis on the primary and the replica, replication 1 \
         recorded into a 4 MiB tmpfs",
    );
    let recording = RecordingDisk::mount()?;
    let config = scene.middlebox_config()?;
    let middlebox = scene.start_middlebox(&config)?;
    let primary_redis = scene.start_redis("primary")?;
    let replica_redis = scene.start_redis("replica")?;
    let record_dir = recording.dir.to_str().context("recording path")?.to_owned();
    scene.replicate_with(&middlebox, &["--record", &record_dir])?;
    let primary = scene.bed.address("primary", "eth0")?;
    let mut m = Matrix {
        scene,
        config,
        middlebox,
        primary_redis,
        replica_redis,
        primary,
        recording,
    };
    let mut rows = Vec::new();
    for (n, fault) in chosen.iter().enumerate() {
        step(&format!(
            "fault {}/{}: {} ({} s of writes, the fault at {:.2} s)",
            n + 1,
            chosen.len(),
            fault.name(),
            RUN.as_secs(),
            FAULT_AT.as_secs_f64()
        ));
        let row = m.run(*fault)?;
        eprintln!(
            "    client errors {}, longest stall {:.2} s, replica missed {}, back after {}",
            row.outcome.client_errors,
            row.outcome.longest_stall_s,
            row.outcome.replica_missed,
            back_text(row.outcome.back_after_s)
        );
        rows.push(row);
    }
    Ok(rows)
}

impl Matrix<'_> {
    fn run(&mut self, fault: Fault) -> anyhow::Result<Row> {
        self.ready_for_next()?;
        let exe = std::env::current_exe().context("locating the xtask binary")?;
        let exe = exe.to_str().context("non-UTF-8 xtask path")?;
        let target = format!("{}:{REDIS_PORT}", self.primary);
        let writer = self
            .scene
            .bed
            .command(
                "source",
                &[
                    exe,
                    "fault-writer",
                    "--target",
                    &target,
                    "--seconds",
                    &RUN.as_secs().to_string(),
                    "--interval-ms",
                    &INTERVAL.as_millis().to_string(),
                    "--per-session",
                    &WRITES_PER_SESSION.to_string(),
                ],
            )?
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the fault writer")?;
        std::thread::sleep(FAULT_AT);
        let fault_us = now_us();
        let injected = self.inject(fault);
        let out = writer
            .wait_with_output()
            .context("waiting for the fault writer")?;
        let (action, repair_us, mut note) = injected?;
        let (writes, skipped) = parse_log(&String::from_utf8_lossy(&out.stdout));
        if writes.is_empty() {
            bail!("the fault writer wrote nothing ({skipped} odd lines)");
        }
        let held = self.replica_keys_settled()?;
        let o = outcome(&writes, &held, fault_us, repair_us);
        if let Ok(state) = self.scene.replica_consistency() {
            let state = state["state"].as_str().unwrap_or("?").to_owned();
            note = join(&note, &format!("controller reports the replica {state}"));
        }
        Ok(Row {
            fault,
            action,
            outcome: o,
            note,
        })
    }

    /// Before each fault: every process up, replication installed, both databases empty
    /// (flushed directly, not through NCP) and the replica marked in step.
    fn ready_for_next(&mut self) -> anyhow::Result<()> {
        self.scene.wait_for(
            "the replication to be installed",
            Duration::from_secs(30),
            |s| {
                let v = s.ncpctl(&["status", "--json"]).ok()?;
                v.as_array()?.first()?["installed"].as_bool()?.then_some(())
            },
        )?;
        for host in ["primary", "replica"] {
            self.scene.redis(host, &["FLUSHALL"])?;
        }
        let replica = self.scene.bed.address("replica", "eth1")?;
        let _ = self.scene.mark_in_step(replica);
        Ok(())
    }

    /// The replica's `f:*` keys once it has stopped changing (the middlebox may still be
    /// draining what it queued for the replica when the writer ends).
    fn replica_keys_settled(&self) -> anyhow::Result<std::collections::HashSet<u64>> {
        let count = |s: &Scene| s.redis("replica", &["DBSIZE"]).ok();
        let mut last = count(self.scene);
        let _ = self
            .scene
            .wait_for("the replica to settle", Duration::from_secs(10), |s| {
                let now = count(s);
                let same = now == last && now.is_some();
                last = now;
                same.then_some(())
            });
        let out = self
            .scene
            .redis("replica", &["--scan", "--pattern", "f:*"])?;
        Ok(replica_keys(&out))
    }

    /// Kills `host`'s Redis (SIGKILL, as a crash), waits `down`, starts it again (empty);
    /// returns the restart's time (Unix microseconds).
    fn crash_redis(&mut self, host: &str, down: Duration) -> anyhow::Result<u64> {
        let redis = if host == "primary" {
            &mut self.primary_redis
        } else {
            &mut self.replica_redis
        };
        kill(redis, libc::SIGKILL);
        let _ = redis.wait();
        std::thread::sleep(down);
        let repair = now_us();
        *redis = self.scene.start_redis(host)?;
        Ok(repair)
    }

    /// Strikes `fault` and repairs it; returns what was done, the repair's time (Unix
    /// microseconds) and what the fault itself showed.
    fn inject(&mut self, fault: Fault) -> anyhow::Result<(String, u64, String)> {
        let at = now_us();
        Ok(match fault {
            Fault::MiddleboxRestart => {
                self.middlebox.kill();
                std::thread::sleep(Duration::from_secs(1));
                let repair = now_us();
                self.middlebox = self.scene.start_middlebox(&self.config)?;
                let ready = (now_us() - repair) as f64 / 1e6;
                (
                    "middlebox SIGKILL, restarted after 1 s".into(),
                    repair,
                    format!("new middlebox ready {ready:.1} s after its start"),
                )
            }
            Fault::ReplicaKilled => (
                "replica Redis SIGKILL, restarted empty after 2 s".into(),
                self.crash_redis("replica", Duration::from_secs(2))?,
                String::new(),
            ),
            Fault::ReplicaStopped => {
                kill(&self.replica_redis, libc::SIGSTOP);
                std::thread::sleep(Duration::from_secs(3));
                kill(&self.replica_redis, libc::SIGCONT);
                (
                    "replica Redis SIGSTOP for 3 s, then SIGCONT".into(),
                    now_us(),
                    String::new(),
                )
            }
            Fault::ReplicaReset => {
                let port = format!(":{REDIS_PORT}");
                let out = self.scene.bed.exec(
                    "replica",
                    &[
                        "ss",
                        "-K",
                        "-t",
                        "-n",
                        "state",
                        "established",
                        "sport",
                        "=",
                        &port,
                    ],
                )?;
                let aborted = String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| l.contains(&port))
                    .count();
                (
                    "the replica's connections aborted (ss -K)".into(),
                    at,
                    format!("{aborted} connection(s) aborted"),
                )
            }
            Fault::PrimaryRestart => (
                "primary Redis SIGKILL, restarted empty after 1 s".into(),
                self.crash_redis("primary", Duration::from_secs(1))?,
                String::new(),
            ),
            Fault::NcpdKilled => {
                // Wiping a switch makes ncpd reinstall its rules; it dies in the middle.
                self.scene.bed.recreate_bridge("prod")?;
                let pid = self.scene.ncpd.context("ncpd is not running")?;
                ncp_testbed::cmd::kill(pid, libc::SIGKILL);
                std::thread::sleep(Duration::from_secs(1));
                let repair = now_us();
                self.scene.start_ncpd()?;
                (
                    "bridge `prod` re-created, ncpd SIGKILL during its reinstall, \
                     restarted after 1 s"
                        .into(),
                    repair,
                    String::new(),
                )
            }
            Fault::VswitchdRestart => {
                let took = self.scene.bed.crash_vswitchd()?;
                (
                    "ovs-vswitchd SIGKILL, restarted".into(),
                    now_us(),
                    format!(
                        "new ovs-vswitchd answered after {:.1} s",
                        took.as_secs_f64()
                    ),
                )
            }
            Fault::BridgeRecreated => {
                self.scene.bed.recreate_bridge("prod")?;
                (
                    "bridge `prod` deleted and re-created".into(),
                    now_us(),
                    String::new(),
                )
            }
            Fault::RecordingDiskFull => {
                let recording = |m: &Middlebox| {
                    m.stats()
                        .ok()
                        .map(|s| s["replication"]["services"][0]["recording"].clone())
                        .filter(|r| r.is_object())
                };
                let before = recording(&self.middlebox).context("the service's recording")?;
                let (filler, size) = self.recording.fill()?;
                std::thread::sleep(Duration::from_secs(3));
                let full = recording(&self.middlebox).unwrap_or_default();
                std::fs::remove_file(&filler)?;
                let repair = now_us();
                let delta = |r: &serde_json::Value, k: &str| {
                    r[k].as_u64()
                        .unwrap_or(0)
                        .saturating_sub(before[k].as_u64().unwrap_or(0))
                };
                // Recording resumes once the disk has room: new bytes reach a file.
                let resumed = self
                    .scene
                    .wait_for("the recording to resume", Duration::from_secs(8), |_| {
                        let now = recording(&self.middlebox)?;
                        (delta(&now, "bytes_written") > delta(&full, "bytes_written"))
                            .then(|| (now_us() - repair) as f64 / 1e6)
                    })
                    .map_or_else(
                        |_| "did NOT resume".into(),
                        |s| format!("resumed {s:.1} s after"),
                    );
                (
                    "recording tmpfs filled for 3 s, then freed".into(),
                    repair,
                    format!(
                        "filler {} KiB; while full: {} failed writes, {} recorded sessions cut \
                         loose; recording {resumed}",
                        size >> 10,
                        delta(&full, "write_errors"),
                        delta(&full, "sessions_detached")
                    ),
                )
            }
            Fault::ImpostorSwitch | Fault::HostilePeer => {
                let refused = |s: &Scene| {
                    s.ncpctl(&["metrics"])
                        .ok()
                        .and_then(|m| m["tls_refused"].as_u64())
                };
                let before = refused(self.scene).context("ncpd's metrics")?;
                let bytes = if fault == Fault::ImpostorSwitch {
                    let dpid = self.scene.bed.dpid("prod")?;
                    impostor_hello(dpid)
                } else {
                    workload::seeded_bytes(0x0bad_f00d, 64 << 10)
                };
                let answered = poke_openflow(&bytes);
                let counted = self
                    .scene
                    .wait_for("ncpd to count the refusal", Duration::from_secs(5), |s| {
                        refused(s).filter(|n| *n > before)
                    })
                    .map_or_else(
                        |e| format!("NOT COUNTED ({e})"),
                        |n| format!("+{}", n - before),
                    );
                let switches = self
                    .scene
                    .ncpctl(&["topology"])
                    .ok()
                    .and_then(|t| t["switches"].as_array().map(Vec::len))
                    .unwrap_or(0);
                (
                    if fault == Fault::ImpostorSwitch {
                        "plain-TCP HELLO + FEATURES_REPLY claiming `prod`'s datapath id".into()
                    } else {
                        "64 KiB of garbage to the OpenFlow port".into()
                    },
                    at,
                    format!(
                        "refused at the TLS layer ({counted}); the peer got {answered} byte(s) \
                         back; switches still connected: {switches}"
                    ),
                )
            }
        })
    }
}

/// Sends `bytes` to ncpd's OpenFlow port and reads what comes back until it closes (at
/// most a few seconds); returns how many bytes came back.
fn poke_openflow(bytes: &[u8]) -> usize {
    let Ok(mut s) = TcpStream::connect(OPENFLOW) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = s.write_all(bytes);
    let mut back = Vec::new();
    let _ = s.take(1 << 20).read_to_end(&mut back);
    back.len()
}

/// An OpenFlow 1.3 HELLO followed by a FEATURES_REPLY claiming `dpid`, in plain TCP.
fn impostor_hello(dpid: u64) -> Vec<u8> {
    let mut m = vec![4, 0, 0, 8, 0, 0, 0, 1];
    m.extend_from_slice(&[4, 6, 0, 32, 0, 0, 0, 2]);
    m.extend_from_slice(&dpid.to_be_bytes());
    m.extend_from_slice(&[0; 16]);
    m
}

fn kill(child: &Child, signal: i32) {
    ncp_testbed::cmd::kill(child.id() as i32, signal);
}

fn join(a: &str, b: &str) -> String {
    if a.is_empty() {
        b.to_owned()
    } else {
        format!("{a}; {b}")
    }
}

fn back_text(s: Option<f64>) -> String {
    match s {
        Some(s) => format!("{s:.1} s"),
        None => "NOT BACK within the run".into(),
    }
}

/// RELIABILITY.md.
fn render(rows: &[Row]) -> String {
    let mut t = String::from(
        "# Fault matrix\n\n\
         Made by `cargo xtask faults` on the built-in test bed (testbed/paper.toml: OVS \
         userspace bridges under ncpd over TLS, the XDP middlebox, Redis on the primary and \
         the replica, replication 1 with reply verification). During each fault a client in \
         the source host writes `SET f:<n>` every 10 ms, 50 writes per TCP session, for 12 s; \
         the fault strikes 3.25 s in, in the middle of a session. \"Back after\" runs from the repair (for faults without one, \
         from the fault) to the first write from which on the replica held every acknowledged \
         write. \"Replica missed\" counts acknowledged writes sent from the fault on that the \
         replica does not hold; a replica restarted empty also loses what it held before \
         (shown in the notes). Figures come from one run on a shared 2-core machine.\n\n\
         | fault | what was done | client: failed writes / longest stall | back after | \
         replica missed | notes |\n|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let o = &r.outcome;
        let mut note = r.note.clone();
        if o.lost_before_fault > 0 {
            note = join(
                &note,
                &format!(
                    "{} earlier writes lost with the replica's memory",
                    o.lost_before_fault
                ),
            );
        }
        t.push_str(&format!(
            "| {} | {} | {} of {} / {:.2} s | {} | {} | {} |\n",
            r.fault.name(),
            r.action,
            o.client_errors,
            o.writes,
            o.longest_stall_s,
            back_text(o.back_after_s),
            o.replica_missed,
            note
        ));
    }
    t
}
