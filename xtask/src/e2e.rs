//! `cargo xtask demo`: NCP end to end on the built-in test bed (the paper's Fig. 5).
//!
//! The switches are Open vSwitch bridges driven by the NCP controller (`ncpd`); the
//! middlebox runs the XDP/AF_XDP data plane; the primary and the replica run Redis. The
//! operator's only act is two `ncpctl` calls: register the middlebox, create the
//! replication. The controller installs the redirect on the switch its planner picks and
//! pushes the service to the middlebox; a deterministic Redis workload from the source
//! then runs once directly and once through NCP, and the report compares throughput and
//! the primary's and replica's `DEBUG DIGEST`. A second scene replicates PostgreSQL with
//! SCRAM logins and a replica with credentials of its own ([`postgres`]).

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ncp_testbed::{
    OvsSsl, Plan, Testbed, Topology, UpOptions, prometheus::Prometheus, servers::Redis, workload,
};

use crate::{cmd::step, middlebox::Middlebox, setup};

mod faults;
mod postgres;

pub use faults::{Fault, faults, writer_main};

const PREFIX: &str = "ncp";
const OPENFLOW: &str = "127.0.0.1:6653";
const API: &str = "127.0.0.1:8653";
const REDIS_PORT: u16 = 6379;
const COMMANDS: usize = 100_000;
const WORK: &str = "/run/ncp-demo";

/// Runs the demo; with `keep` everything stays up for a look around.
pub fn demo(keep: bool) -> anyhow::Result<()> {
    setup::setup()?;
    let bins = crate::middlebox::build_release(&["ncp-dataplane", "ncp-controller"])?;
    let mut scene = Scene::bring_up(bins)?;
    let result = scene.run();
    if keep && result.is_ok() {
        println!(
            "\nLeft running (prefix `{PREFIX}`). Look around:\n  \
             NCP_TOKEN={} {}/ncpctl --api {API} status\n  \
             {}/ncp-middlebox stats --socket {WORK}/mb.sock\n  \
             ovs-ofctl -O OpenFlow13 dump-flows {PREFIX}-prod\n  \
             ip netns exec {PREFIX}-source redis-cli -h 198.18.1.2 INCR hello\n\
             Tear down with: cargo xtask testbed down --prefix {PREFIX} (and end the pids above)",
            scene.token,
            scene.bins.display(),
            scene.bins.display()
        );
        for p in &scene.processes {
            println!("  pid {}", p.id());
        }
        if let Some(p) = &scene.prometheus {
            println!(
                "  pid {} (Prometheus on http://{}, files in {})",
                p.pid(),
                p.addr(),
                p.dir().display()
            );
        }
        std::mem::forget(scene);
        return Ok(());
    }
    drop(scene);
    step("tearing down");
    Testbed::down(PREFIX)?;
    result
}

struct Scene {
    bed: Testbed,
    bins: PathBuf,
    processes: Vec<Child>,
    token: String,
    /// The OpenFlow PKI (`ncpctl pki` layout: cacert.pem, ctl-cert.pem, ...).
    pki: PathBuf,
    /// A real Prometheus scraping ncpd's `/metrics` (stopped and removed on drop).
    prometheus: Option<Prometheus>,
    /// The running ncpd's pid (its child is in `processes`).
    ncpd: Option<i32>,
}

/// Runs `ncpctl` (`command`, with any options already given) with `args`; fails with its
/// standard error, returns its standard output.
fn run_ncpctl(mut command: Command, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let out = command.args(args).output().context("running ncpctl")?;
    if !out.status.success() {
        bail!(
            "ncpctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// Makes the OpenFlow PKI in `dir` with `ncpctl pki`, as an operator would: a CA, ncpd's
/// certificate, and one certificate for the test bed's ovs-vswitchd granting the
/// datapath ids of all its bridges. Returns what `ovs-vsctl set-ssl` takes.
fn make_pki(bins: &Path, topology: &Topology, dir: &Path) -> anyhow::Result<OvsSsl> {
    step("making the OpenFlow PKI (ncpctl pki): a CA, ncpd's and the switches' certificates");
    let _ = std::fs::remove_dir_all(dir);
    let dir_arg = dir.to_str().context("non-UTF-8 PKI path")?;
    let dpids: Vec<String> = Plan::new(topology, PREFIX)?
        .bridges
        .iter()
        .map(|b| format!("{:#x}", b.dpid))
        .collect();
    let mut switch = vec!["pki", "switch", "--dir", dir_arg, "--name", "ovs"];
    for d in &dpids {
        switch.extend(["--dpid", d.as_str()]);
    }
    for argv in [vec!["pki", "init", "--dir", dir_arg], switch] {
        run_ncpctl(Command::new(bins.join("ncpctl")), &argv)?;
    }
    Ok(OvsSsl {
        privkey: dir.join("ovs-privkey.pem"),
        cert: dir.join("ovs-cert.pem"),
        cacert: dir.join("cacert.pem"),
    })
}

impl Drop for Scene {
    fn drop(&mut self) {
        for child in self.processes.iter_mut().rev() {
            crate::cmd::stop_child(child, Duration::from_secs(5));
        }
    }
}

/// One replica's consistency as `ncpctl status` words it, or why it is not known.
fn consistency_line(r: &anyhow::Result<serde_json::Value>) -> String {
    match r {
        Ok(r) => r["summary"]
            .as_str()
            .or_else(|| r["state"].as_str())
            .unwrap_or("?")
            .to_owned(),
        Err(e) => format!("NOT REPORTED ({e})"),
    }
}

/// The PromQL selector of `metric` for replication #1's replica at `replica`.
fn replica_series(metric: &str, replica: Ipv4Addr) -> String {
    format!("{metric}{{replication=\"1\",replica=\"{replica}:{REDIS_PORT}\"}}")
}

/// A value read from Prometheus and how long it took to show, or why it did not.
fn scraped_line(r: &anyhow::Result<(f64, Duration)>) -> String {
    match r {
        Ok((value, took)) => format!("{value} (seen after {:.1} s)", took.as_secs_f64()),
        Err(e) => format!("NOT SCRAPED ({e})"),
    }
}

/// A fresh API token for this run (the controller accepts it through NCP_TOKEN).
fn token() -> String {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id());
    workload::seeded_bytes(seed, 16)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Scene {
    /// A fresh work directory and the paper's test bed with its switches under a TLS
    /// controller port (the PKI made with `ncpctl pki`); nothing started on it yet.
    fn bring_up(bins: PathBuf) -> anyhow::Result<Scene> {
        let _ = std::fs::remove_dir_all(WORK);
        std::fs::create_dir_all(WORK)?;
        let _ = Testbed::down(PREFIX);
        step(
            "bringing up the paper's test bed (testbed/paper.toml), switches under the NCP controller",
        );
        let topology = Topology::load("testbed/paper.toml")?;
        let port: u16 = OPENFLOW
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .context("OpenFlow port")?;
        let pki = Testbed::pki_dir(PREFIX);
        let ssl = make_pki(&bins, &topology, &pki)?;
        let bed = Testbed::up(
            &topology,
            &UpOptions {
                controller_port: Some(port),
                controller_tls: Some(ssl),
                ..UpOptions::with_prefix(PREFIX)
            },
        )?;
        Ok(Scene {
            bed,
            bins,
            processes: Vec::new(),
            token: token(),
            pki,
            prometheus: None,
            ncpd: None,
        })
    }

    fn run(&mut self) -> anyhow::Result<()> {
        let source = self.bed.address("source", "eth0")?;
        let primary = self.bed.address("primary", "eth0")?;
        let replica = self.bed.address("replica", "eth1")?;
        let mb = self.bed.address("middlebox", "eth0")?;

        self.start_ncpd()?;
        step("starting Prometheus (loopback only) scraping ncpd's /metrics every second");
        self.prometheus = Some(Prometheus::start(API.parse()?, &self.token)?);

        step("starting the middlebox (XDP + AF_XDP workers) on eth0 and its replication NIC eth1");
        let config = self.middlebox_config()?;
        let mut middlebox = self.start_middlebox(&config)?;

        step("starting Redis on the primary and on the replica");
        let primary_redis = self.start_redis("primary")?;
        self.processes.push(primary_redis);
        let mut replica_redis = self.start_redis("replica")?;

        let workload_path = format!("{WORK}/workload.resp");
        std::fs::write(
            &workload_path,
            workload::redis_writes(COMMANDS, 0x0dec_0de5),
        )?;

        step(&format!(
            "workload 1/2: {COMMANDS} Redis writes from the source, directly to the primary (after a warm-up run)"
        ));
        self.pipe(primary, &workload_path, COMMANDS)?;
        self.redis("primary", &["FLUSHALL"])?;
        let direct = self.pipe(primary, &workload_path, COMMANDS)?;
        self.redis("primary", &["FLUSHALL"])?;

        let status = self.replicate(&middlebox)?;

        step(&format!(
            "workload 2/2: the same {COMMANDS} writes, now through NCP"
        ));
        let through = self.pipe(primary, &workload_path, COMMANDS)?;

        step("comparing the primary's and the replica's data");
        let primary_digest = self.redis("primary", &["DEBUG", "DIGEST"])?;
        let replica_digest = self
            .wait_for("the replica to catch up", Duration::from_secs(30), |s| {
                let d = s.redis("replica", &["DEBUG", "DIGEST"]).ok()?;
                (d == primary_digest).then_some(d)
            })
            .or_else(|_| self.redis("replica", &["DEBUG", "DIGEST"]))?;
        let keys = self.redis("primary", &["DBSIZE"])?;
        let stats = middlebox.stats()?;
        // The replica started empty with the primary and the digests agree, so the
        // operator can vouch for it: until then it is `unknown` (the middlebox cannot
        // know what was written before it began replicating).
        let equal = primary_digest == replica_digest && primary_digest.len() == 40;
        let unvouched = self.replica_consistency();
        let vouched = if equal {
            step(
                "the digests agree: the operator marks the replica in step (ncpctl replica reset)",
            );
            self.mark_in_step(replica)
        } else {
            Err(anyhow::anyhow!("not marked: the digests differ"))
        };
        step("asking Prometheus for the replica's state and the middlebox's counters");
        let in_step = self.scraped(
            &replica_series("ncp_replica_in_step", replica),
            "the replica in step",
            |v| v == 1.0,
        );
        let rx_frames = self.scraped(
            "sum(ncp_middlebox_worker_rx_frames_total)",
            "frames taken by the middlebox's workers",
            |v| v > 0.0,
        );
        let redirected = self.scraped(
            "sum(ncp_middlebox_xdp_frames_total{verdict=\"redirected\"})",
            "frames redirected by the XDP program",
            |v| v > 0.0,
        );

        let dpid = status["redirection_switch"].as_u64();
        let switch = dpid
            .and_then(|d| {
                ["prod", "repl"]
                    .into_iter()
                    .find(|s| self.bed.dpid(s).ok() == Some(d))
            })
            .unwrap_or("?");
        println!("\n====================== NCP demo report ======================");
        println!(
            "replication #1: tcp {source} -> {primary}:{REDIS_PORT}, replica {replica}:{REDIS_PORT}, middlebox {mb}"
        );
        println!(
            "redirect rule: on switch `{switch}` (dpid {}), the last switch shared by the\n  \
             source->primary and source->middlebox routes (lowest common ancestor seen from the source)",
            dpid.map_or("?".to_owned(), |d| format!("{d:#x}"))
        );
        let metrics = self.ncpctl(&["metrics"])?;
        let ovs_target =
            ncp_testbed::cmd::stdout(&["ovs-vsctl", "get-controller", &self.bed.bridge("prod")?])?;
        println!(
            "OpenFlow: both switches connected to `{}` with their certificate; \
             peers refused at the TLS layer: {}",
            ovs_target.trim(),
            metrics["tls_refused"]
        );
        println!(
            "workload: {COMMANDS} Redis writes (SET/INCR/LPUSH/HSET/DEL) with redis-cli --pipe"
        );
        println!(
            "  direct:        {:>8.2} s  {:>10.0} commands/s",
            direct.as_secs_f64(),
            COMMANDS as f64 / direct.as_secs_f64()
        );
        println!(
            "  through NCP:   {:>8.2} s  {:>10.0} commands/s  ({:+.1} % time)",
            through.as_secs_f64(),
            COMMANDS as f64 / through.as_secs_f64(),
            (through.as_secs_f64() / direct.as_secs_f64() - 1.0) * 100.0
        );
        println!("  keys on the primary: {keys}");
        println!("DEBUG DIGEST primary: {primary_digest}");
        println!("DEBUG DIGEST replica: {replica_digest}");
        println!(
            "Prometheus (scraping ncpd /metrics, query API on {}):",
            self.prometheus
                .as_ref()
                .map_or("?".into(), |p| p.addr().to_string())
        );
        println!(
            "replica's state: {} until the operator marked it in step, then {}",
            consistency_line(&unvouched),
            consistency_line(&vouched)
        );
        println!(
            "  ncp_replica_in_step (replica):                 {}",
            scraped_line(&in_step)
        );
        println!(
            "  ncp_middlebox_worker_rx_frames_total (sum):    {}",
            scraped_line(&rx_frames)
        );
        println!(
            "  ncp_middlebox_xdp_frames_total (redirected):   {}",
            scraped_line(&redirected)
        );
        let service = &stats["replication"]["services"][0];
        let replica_stats = &service["replicas"][0];
        println!(
            "middlebox: {} session(s); {} bytes to the primary, {} to the replica (lag {} bytes), \
             {} bytes of replica answers dropped; replica detached: {}",
            service["sessions_total"],
            service["primary_bytes_out"],
            replica_stats["bytes_out"],
            replica_stats["lag_bytes"],
            service["replica_bytes_dropped"],
            replica_stats["detached"]
        );
        println!(
            "verdict: {}",
            if equal {
                "replica in step with the primary"
            } else {
                "DIGESTS DIFFER"
            }
        );
        println!("=============================================================");
        if !equal {
            bail!("the replica's data differs from the primary's");
        }
        if vouched.is_err() || in_step.is_err() || rx_frames.is_err() || redirected.is_err() {
            bail!("Prometheus did not return the series the demo expects (see above)");
        }
        self.divergence_drill(primary, replica)?;
        self.postgres_scene(&middlebox, source, mb)?;

        step("drill 1/2: the replica dies in the middle of a workload");
        // The client sends half the workload, the replica dies, the client sends the rest:
        // the session is certainly in flight when the replica goes.
        let drill = workload::redis_writes(COMMANDS, 0x0dec_0de6);
        let (first, rest) = drill.split_at(drill.len() / 2);
        let mut pipe = self.spawn_pipe(primary, Stdio::piped())?;
        let mut stdin = pipe.stdin.take().context("redis-cli's stdin")?;
        std::io::Write::write_all(&mut stdin, first)?;
        std::thread::sleep(Duration::from_millis(500));
        // SAFETY: signals our own child by pid.
        unsafe { libc::kill(replica_redis.id() as i32, libc::SIGKILL) };
        let _ = replica_redis.wait();
        std::thread::sleep(Duration::from_millis(200));
        std::io::Write::write_all(&mut stdin, rest)?;
        drop(stdin);
        let out = pipe.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let client_ok = text.contains(&format!("errors: 0, replies: {COMMANDS}"));
        let detached = self.wait_for(
            "the middlebox to detach the replica",
            Duration::from_secs(15),
            |_| {
                let stats = middlebox.stats().ok()?;
                let d = &stats["replication"]["services"][0]["replicas"][0]["detached"];
                let total: u64 = [
                    "died",
                    "refused",
                    "lagged",
                    "connect_timeout",
                    "drain_timeout",
                    "spill_budget",
                ]
                .iter()
                .map(|k| d[*k].as_u64().unwrap_or(0))
                .sum();
                (total > 0).then(|| d.clone())
            },
        );

        let after_kill = self.wait_diverged_by("detached");

        step("drill 2/2: the middlebox dies; the controller fails open, then restores replication");
        let replica_redis = self.start_redis("replica")?;
        self.processes.push(replica_redis);
        middlebox.kill();
        let killed = Instant::now();
        let fail_open = self.wait_for(
            "a direct connection from the source to the primary",
            Duration::from_secs(15),
            |s| {
                // Through NCP the primary sees the middlebox as its client; directly, the source.
                let reply = s
                    .bed
                    .exec(
                        "source",
                        &[
                            "timeout",
                            "0.5",
                            "redis-cli",
                            "-h",
                            &primary.to_string(),
                            "-p",
                            "6379",
                            "CLIENT",
                            "LIST",
                        ],
                    )
                    .ok()?;
                String::from_utf8_lossy(&reply.stdout)
                    .contains(&format!("addr={source}:"))
                    .then(|| killed.elapsed())
            },
        )?;
        let during_outage = self.wait_diverged_by("fail-open");
        let mut middlebox = self.start_middlebox(&config)?;
        let back = Instant::now();
        self.wait_for(
            "the controller to push the service again",
            Duration::from_secs(30),
            |_| middlebox.services().ok()?.contains("r1").then_some(()),
        )?;
        let resumed = self.wait_for("replication to resume", Duration::from_secs(30), |s| {
            let _ = s.bed.exec(
                "source",
                &[
                    "timeout",
                    "2",
                    "redis-cli",
                    "-h",
                    &primary.to_string(),
                    "-p",
                    "6379",
                    "SET",
                    "after-recovery",
                    "yes",
                ],
            );
            (s.redis("replica", &["GET", "after-recovery"]).ok()? == "yes").then(|| back.elapsed())
        });
        // The new middlebox's own view once the controller has polled it (it knows
        // nothing of the writes made while it was down).
        let after_restart = self
            .wait_for(
                "the controller to poll the restarted middlebox",
                Duration::from_secs(15),
                |s| {
                    let r = s.replica_consistency().ok()?;
                    r["middlebox"]["state"].is_string().then_some(r)
                },
            )
            .or_else(|_| self.replica_consistency());
        middlebox.stop();

        println!("\n-------------------------- drills --------------------------");
        println!(
            "replica killed mid-workload: client {}; replica detached: {}",
            if client_ok {
                "finished all writes without an error"
            } else {
                "SAW ERRORS"
            },
            detached
                .as_ref()
                .map_or_else(|e| format!("NOT REPORTED ({e})"), |d| d.to_string())
        );
        println!(
            "  state it leaves behind (controller): {}",
            consistency_line(&after_kill)
        );
        println!(
            "middlebox killed: the source reached the primary directly after {:.1} s (fail-open, limit 3 s)",
            fail_open.as_secs_f64()
        );
        match &resumed {
            Ok(t) => println!(
                "middlebox restarted: replication resumed after {:.1} s",
                t.as_secs_f64()
            ),
            Err(e) => println!("middlebox restarted: replication DID NOT RESUME ({e})"),
        }
        println!(
            "  state while the middlebox was down (controller): {}",
            consistency_line(&during_outage)
        );
        println!(
            "  state after its restart (controller): {}; the new middlebox's own view: {}",
            consistency_line(&after_restart),
            after_restart
                .as_ref()
                .ok()
                .and_then(|r| r["middlebox"]["state"].as_str())
                .unwrap_or("none")
        );
        println!("=============================================================");
        if !client_ok
            || detached.is_err()
            || after_kill.is_err()
            || during_outage.is_err()
            || resumed.is_err()
            || fail_open > Duration::from_secs(3)
        {
            bail!("a failure drill did not behave as it should (see above)");
        }
        Ok(())
    }

    /// A key written on the replica behind NCP's back, then commands through NCP that
    /// read it: the middlebox sees the replica answer differently and the controller
    /// reports the replica diverged with the offset of the first differing answer byte.
    /// Then the operator's repair: the key deleted on the replica (the digests agree
    /// again) and `ncpctl replica reset`, so that the drills after this one start in step.
    fn divergence_drill(&self, primary: Ipv4Addr, replica: Ipv4Addr) -> anyhow::Result<()> {
        const KEY: &str = "behind-ncp";
        const VALUE: &str = "written-on-the-replica-only";
        let before = self.replica_consistency();
        step(
            "divergence drill: a key written on the replica behind NCP's back, then commands through NCP",
        );
        self.redis("replica", &["SET", KEY, VALUE])?;
        // Two writes (`+OK\r\n` each from both), the read the two answer differently
        // (`$-1\r\n`, no such key, from the primary), more traffic after it.
        let commands: [&[&str]; 6] = [
            &["SET", "drill:a", "1"],
            &["SET", "drill:b", "2"],
            &["GET", KEY],
            &["GET", "drill:a"],
            &["INCR", "drill:c"],
            &["GET", "drill:b"],
        ];
        let get_starts_at = 2 * "+OK\r\n".len();
        let replica_answer = format!("${}\r\n{VALUE}\r\n", VALUE.len());
        let same = "$-1\r\n"
            .bytes()
            .zip(replica_answer.bytes())
            .take_while(|(p, r)| p == r)
            .count();
        let expected_offset = (get_starts_at + same) as u64;
        let path = format!("{WORK}/divergence.resp");
        std::fs::write(
            &path,
            commands
                .iter()
                .flat_map(|c| workload::redis_command(c))
                .collect::<Vec<u8>>(),
        )?;
        self.pipe(primary, &path, commands.len())?;
        let flagged = self.wait_diverged_by("reply mismatch");
        let mismatch = flagged
            .as_ref()
            .map(|r| r["middlebox"]["first_mismatch"].clone())
            .unwrap_or_default();
        let offset = mismatch["offset"].as_u64();
        let scraped_diverged = self.scraped(
            &replica_series("ncp_replica_diverged", replica),
            "the replica diverged",
            |v| v == 1.0,
        );

        step(
            "repairing the replica: the key deleted on it, digests compared, ncpctl replica reset",
        );
        self.redis("replica", &["DEL", KEY])?;
        let primary_digest = self.redis("primary", &["DEBUG", "DIGEST"])?;
        let digests = self.wait_for(
            "the replica's digest to equal the primary's again",
            Duration::from_secs(30),
            |s| (s.redis("replica", &["DEBUG", "DIGEST"]).ok()? == primary_digest).then_some(()),
        );
        let reset = self.mark_in_step(replica);
        let scraped_in_step = self
            .scraped(
                &replica_series("ncp_replica_in_step", replica),
                "the replica in step after the reset",
                |v| v == 1.0,
            )
            .and_then(|in_step| {
                self.scraped(
                    &replica_series("ncp_replica_diverged", replica),
                    "the replica no longer diverged after the reset",
                    |v| v == 0.0,
                )?;
                Ok(in_step)
            });

        println!("\n--------------------- divergence drill ---------------------");
        println!("before: {}", consistency_line(&before));
        println!(
            "wrote `{KEY}` on the replica directly (redis-cli in its namespace), then through NCP:"
        );
        let listed: Vec<String> = commands.iter().map(|c| c.join(" ")).collect();
        println!(
            "  {}  (the client got the primary's answers, no error)",
            listed.join(" | ")
        );
        println!(
            "controller (ncpctl status --json): {}",
            consistency_line(&flagged)
        );
        println!(
            "first differing answer byte: offset {} of the session's answer stream \
             (expected {expected_offset}: the GET's answer starts at {get_starts_at})",
            offset.map_or("NOT REPORTED".to_owned(), |o| o.to_string()),
        );
        // The middlebox's excerpts are already escaped: printed as they are.
        let excerpt = |side: &str| mismatch[side].as_str().unwrap_or("?").to_owned();
        println!("  primary's answer from there: {}", excerpt("primary"));
        println!("  replica's answer from there: {}", excerpt("replica"));
        println!(
            "repair: key deleted on the replica, digests {}; after `ncpctl replica reset`: {}",
            if digests.is_ok() {
                "equal again"
            } else {
                "STILL DIFFER"
            },
            consistency_line(&reset)
        );
        println!(
            "Prometheus: ncp_replica_diverged during the drill: {}; ncp_replica_in_step after the reset: {} (diverged back to 0)",
            scraped_line(&scraped_diverged),
            scraped_line(&scraped_in_step)
        );
        if flagged.is_err()
            || offset != Some(expected_offset)
            || digests.is_err()
            || reset.is_err()
            || scraped_diverged.is_err()
            || scraped_in_step.is_err()
        {
            bail!("the divergence drill did not behave as it should (see above)");
        }
        Ok(())
    }

    /// `ncpctl replica reset` of replication #1's replica, as an operator who knows it
    /// holds the primary's data; returns its consistency entry once the controller
    /// reports it in step.
    fn mark_in_step(&self, replica: Ipv4Addr) -> anyhow::Result<serde_json::Value> {
        self.ncpctl(&[
            "replica",
            "reset",
            "--replication",
            "1",
            "--replica",
            &format!("{replica}:{REDIS_PORT}"),
        ])?;
        self.wait_for(
            "the replica to be reported in step",
            Duration::from_secs(20),
            |s| {
                let r = s.replica_consistency().ok()?;
                (r["state"] == "in-step").then_some(r)
            },
        )
    }

    /// Waits (boundedly) until Prometheus's answer to `promql` is one series whose value
    /// satisfies `ok`; returns that value and how long the wait took.
    fn scraped(
        &self,
        promql: &str,
        what: &str,
        ok: impl Fn(f64) -> bool,
    ) -> anyhow::Result<(f64, Duration)> {
        let prometheus = self
            .prometheus
            .as_ref()
            .context("Prometheus is not running")?;
        let (samples, took) = prometheus.wait_for(
            promql,
            what,
            Duration::from_secs(20),
            |samples| matches!(samples, [one] if ok(one.value)),
        )?;
        Ok((samples[0].value, took))
    }

    /// Waits for the controller to report replication #1's replica diverged with a reason
    /// that mentions `reason`; returns its consistency entry.
    fn wait_diverged_by(&self, reason: &str) -> anyhow::Result<serde_json::Value> {
        self.wait_for(
            &format!("the controller to report the replica diverged ({reason})"),
            Duration::from_secs(20),
            |s| {
                let r = s.replica_consistency().ok()?;
                (r["state"] == "diverged" && r["summary"].as_str()?.contains(reason)).then_some(r)
            },
        )
    }

    /// The controller's consistency view of replication #1's replica, from
    /// `ncpctl status --json`.
    fn replica_consistency(&self) -> anyhow::Result<serde_json::Value> {
        let status = self.ncpctl(&["status", "--json"])?;
        status[0]["replica_states"]
            .get(0)
            .cloned()
            .context("ncpctl status --json has no consistency entry for the replica")
    }

    fn start_redis(&self, host: &str) -> anyhow::Result<Child> {
        let log = format!("{WORK}/redis-{host}.log");
        Ok(Redis::start(&self.bed, host, REDIS_PORT, Path::new(&log))?)
    }

    /// Starts `redis-cli --pipe` from the source reading `stdin`, without waiting.
    fn spawn_pipe(&self, primary: Ipv4Addr, stdin: Stdio) -> anyhow::Result<Child> {
        Ok(self
            .bed
            .command(
                "source",
                &[
                    "redis-cli",
                    "-h",
                    &primary.to_string(),
                    "-p",
                    "6379",
                    "--pipe",
                ],
            )?
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?)
    }

    /// Starts the middlebox in its host with `config`, its control socket in [`WORK`].
    /// Starts ncpd (OpenFlow over TLS with the bed's PKI, state in the work directory)
    /// and waits until both switches are connected.
    fn start_ncpd(&mut self) -> anyhow::Result<()> {
        step("starting the controller (ncpd), OpenFlow over TLS with switch certificates");
        let pki = |f: &str| self.pki.join(f).display().to_string();
        let ncpd = Command::new(self.bins.join("ncpd"))
            .args([
                "--tls-cert",
                &pki("ctl-cert.pem"),
                "--tls-key",
                &pki("ctl-privkey.pem"),
                "--tls-ca",
                &pki("cacert.pem"),
            ])
            .args([
                "--listen",
                OPENFLOW,
                "--api",
                API,
                "--state",
                &format!("{WORK}/controller.json"),
            ])
            .args(["--reconcile-secs", "5"])
            .env("NCP_TOKEN", &self.token)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(format!("{WORK}/ncpd.log"))?)
            .stderr(std::fs::File::create(format!("{WORK}/ncpd.err"))?)
            .spawn()
            .context("starting ncpd")?;
        self.ncpd = Some(ncpd.id() as i32);
        self.processes.push(ncpd);
        self.wait_for("both switches to connect", Duration::from_secs(20), |s| {
            let t = s.ncpctl(&["topology"]).ok()?;
            (t["switches"].as_array()?.len() == 2).then_some(())
        })?;
        Ok(())
    }

    /// The middlebox's configuration: one worker on core 1 for each of its NICs.
    fn middlebox_config(&self) -> anyhow::Result<String> {
        let mb = self.bed.address("middlebox", "eth0")?;
        let mb1 = self.bed.address("middlebox", "eth1")?;
        Ok(format!(
            "control_socket = \"{WORK}/mb.sock\"\n\
             [[interfaces]]\nname = \"eth0\"\naddress = \"{mb}\"\nqueues = [{{ queue = 0, core = 1 }}]\n\
             [[interfaces]]\nname = \"eth1\"\naddress = \"{mb1}\"\nqueues = [{{ queue = 0, core = 1 }}]\n"
        ))
    }

    /// Registers the middlebox and creates replication 1 (source to the primary's Redis,
    /// one replica, replies verified); waits until it is installed and the middlebox
    /// serves it. Returns its status.
    fn replicate(&self, middlebox: &Middlebox) -> anyhow::Result<serde_json::Value> {
        self.replicate_with(middlebox, &[])
    }

    /// [`Scene::replicate`] with more `ncpctl add` options.
    fn replicate_with(
        &self,
        middlebox: &Middlebox,
        extra: &[&str],
    ) -> anyhow::Result<serde_json::Value> {
        let source = self.bed.address("source", "eth0")?;
        let primary = self.bed.address("primary", "eth0")?;
        let replica = self.bed.address("replica", "eth1")?;
        let mb = self.bed.address("middlebox", "eth0")?;
        step("ncpctl: register the middlebox, create the replication");
        self.ncpctl(&[
            "middlebox",
            "add",
            "--ip",
            &mb.to_string(),
            "--control",
            &format!("unix:{WORK}/mb.sock"),
            "--replica-interface",
            "eth1",
        ])?;
        let (source, mb) = (source.to_string(), mb.to_string());
        let primary = format!("{primary}:{REDIS_PORT}");
        let replica = format!("{replica}:{REDIS_PORT}");
        let mut add = vec![
            "add",
            "--id",
            "1",
            "--source",
            &source,
            "--primary",
            &primary,
            "--middlebox",
            &mb,
            "--replica",
            &replica,
            "--verify",
            "replies",
        ];
        add.extend_from_slice(extra);
        self.ncpctl(&add)?;
        let status = self.wait_for(
            "the replication to be installed",
            Duration::from_secs(30),
            |s| {
                let v = s.ncpctl(&["status", "--json"]).ok()?;
                let r = v.as_array()?.first()?.clone();
                r["installed"].as_bool()?.then_some(r)
            },
        )?;
        let pushed = self.wait_for(
            "the controller to push the service to the middlebox",
            Duration::from_secs(20),
            |_| {
                let services = middlebox.services().ok()?;
                services.contains("r1").then_some(services)
            },
        )?;
        eprintln!("    middlebox now serves: {}", pushed.trim());
        Ok(status)
    }

    fn start_middlebox(&self, config: &str) -> anyhow::Result<Middlebox> {
        Middlebox::start(
            &self.bed,
            "middlebox",
            &self.bins,
            config,
            Path::new(&format!("{WORK}/mb.sock")),
        )
    }

    fn ncpctl(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut command = Command::new(self.bins.join("ncpctl"));
        command.args(["--api", API]).env("NCP_TOKEN", &self.token);
        let stdout = run_ncpctl(command, args)?;
        Ok(serde_json::from_slice(&stdout).unwrap_or(serde_json::Value::Null))
    }

    fn redis(&self, host: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut argv = vec!["redis-cli", "-p", "6379"];
        argv.extend_from_slice(args);
        let out = self.bed.exec(host, &argv)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Feeds the workload file of `commands` commands to `redis-cli --pipe` from the
    /// source; fails unless every one was answered without an error; returns the time.
    fn pipe(&self, primary: Ipv4Addr, path: &str, commands: usize) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let out = self
            .spawn_pipe(primary, std::fs::File::open(path)?.into())?
            .wait_with_output()?;
        let elapsed = start.elapsed();
        let text = String::from_utf8_lossy(&out.stdout);
        if !text.contains(&format!("errors: 0, replies: {commands}")) {
            bail!("redis-cli --pipe: {}", text.trim());
        }
        eprintln!("    {}", text.lines().last().unwrap_or_default());
        Ok(elapsed)
    }

    fn wait_for<T>(
        &self,
        what: &str,
        limit: Duration,
        mut probe: impl FnMut(&Self) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(v) = probe(self) {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!("gave up waiting for {what} after {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
