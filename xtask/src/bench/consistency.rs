//! What knowing whether a replica is in step costs: XDP-mode throughput through NCP with
//! one replica (on the dedicated NIC) in four configurations, measured round by round in
//! turn so the machine's noise hits all of them alike:
//!
//! * (a) reply verification off, no spilling: the reference;
//! * (b) `verify = "replies"`: every answer byte of the replica compared with the
//!   primary's;
//! * (c) a replica that falls behind its memory budget (its Redis stopped with SIGSTOP
//!   for part of the write phase) with spilling on: it is fed from an on-disk spool as it
//!   catches up;
//! * (d) the same slow replica with spilling off: it is detached.
//!
//! Verification only works, and only costs, when the primary's answers are large and the
//! replica's are the same bytes (it stops at the first difference), so the workload is
//! redis-benchmark with 4 KiB values: a write phase (SET, pipelined) and a read phase
//! (GET of the same key, whose 4 KiB answer is identical on both servers).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ncp_testbed::{Testbed, servers::Redis};

use super::{
    Options, median,
    replica::{ReplicaOutcome, first_replica_counters, replica_outcome},
    routes::{self, Replication, Route},
    save_json,
};
use crate::cmd::step;

const PORT: u16 = 6379;
/// Value size of every SET, so every GET's answer is this large too.
const VALUE_BYTES: u32 = 4096;
/// Connections and requests in flight per connection.
const CLIENTS: u32 = 4;
const PIPELINE: u32 = 16;
/// Replica budget of every configuration: four times the data plane's default (4 MiB),
/// which a replica sharing these two cores overran now and then even when it was not
/// stopped; far below what the stopped replica falls behind.
const REPLICA_BUDGET: u64 = 16 << 20;
/// Spool limit of configuration (c): above what the write phase sends, so the replica
/// is never detached for it.
const SPILL_BUDGET: u64 = 2 << 30;
/// Verification window of (b): above what the replica's answers fall behind the
/// primary's here, so every answer byte is compared (the data plane's default, 256 KiB,
/// left sessions unverified from the first lag past it, which would understate the cost).
const VERIFY_WINDOW: u64 = 4 << 20;
/// When, after the write phase starts, the slow replica is stopped, and for how long.
const PAUSE_AFTER: Duration = Duration::from_millis(300);
const PAUSE: Duration = Duration::from_millis(1500);
/// How long a spooled replica may take to catch up after a cell.
const CATCH_UP: Duration = Duration::from_secs(30);

/// One configuration of the service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Config {
    VerifyOff,
    VerifyReplies,
    SlowSpilling,
    SlowDetached,
}

impl Config {
    const ALL: [Config; 4] = [
        Config::VerifyOff,
        Config::VerifyReplies,
        Config::SlowSpilling,
        Config::SlowDetached,
    ];

    fn label(self) -> &'static str {
        match self {
            Config::VerifyOff => "(a) verify off",
            Config::VerifyReplies => "(b) verify = \"replies\"",
            Config::SlowSpilling => "(c) slow replica, spilling",
            Config::SlowDetached => "(d) slow replica, no spilling",
        }
    }

    /// Whether the replica is stopped for part of the write phase.
    fn slow_replica(self) -> bool {
        matches!(self, Config::SlowSpilling | Config::SlowDetached)
    }

    /// The middlebox's service settings for this configuration.
    fn tuning(self, options: &Options) -> routes::Tuning {
        let mut tuning = Options {
            replica_budget: Some(REPLICA_BUDGET),
            spill_budget: (self == Config::SlowSpilling).then_some(SPILL_BUDGET),
            ..options.clone()
        }
        .relay_tuning();
        if self == Config::VerifyReplies {
            let _ = writeln!(
                tuning.service,
                "verify = \"replies\"\nverify_window_bytes = {VERIFY_WINDOW}"
            );
        }
        tuning
    }
}

/// One cell's measurement in one round.
#[derive(Clone, Debug)]
struct Sample {
    /// Requests per second of the write (SET) and the read (GET) phase.
    set_rps: f64,
    get_rps: f64,
    /// What the replica got over both phases.
    replica: ReplicaOutcome,
}

pub fn consistency(bed: &Testbed, bins: &Path, options: &Options) -> anyhow::Result<String> {
    // With --quick the write phase still outlasts the replica's pause.
    let requests: u32 = if options.quick { 50_000 } else { 100_000 };
    let primary = bed.address("primary", "eth0")?;
    let logs = super::run_dir();
    std::fs::create_dir_all(&logs)?;
    let _ = std::fs::remove_dir_all(logs.join("spill"));
    let mut servers = Vec::new();
    let mut samples: BTreeMap<Config, Vec<Sample>> = BTreeMap::new();
    let route = Route::Middlebox {
        dataplane: "xdp".into(),
        replication: Replication::DedicatedNic,
    };
    let outcome = (|| -> anyhow::Result<()> {
        for host in ["primary", "replica"] {
            let log = logs.join(format!("redis-{host}.log"));
            servers.push(Redis::start(bed, host, PORT, &log)?);
            // The key the read phase reads exists on both before any cell, with the
            // value every SET writes.
            redis_benchmark(bed, host, Ipv4Addr::LOCALHOST, "set", 1_000)?;
        }
        let replica_pid = servers[1].id();
        for round in 0..options.repetitions {
            for config in Config::ALL {
                step(&format!(
                    "consistency round {}: {}",
                    round + 1,
                    config.label()
                ));
                let mb = route
                    .enter(bed, bins, PORT, &config.tuning(options))?
                    .context("the route has a middlebox")?;
                let before = first_replica_counters(&mb)?;
                let pauser = config
                    .slow_replica()
                    .then(|| std::thread::spawn(move || pause_replica(replica_pid)));
                let set = redis_benchmark(bed, "source", primary, "set", requests);
                if let Some(pauser) = pauser {
                    let _ = pauser.join();
                }
                let get = redis_benchmark(bed, "source", primary, "get", requests);
                let replica = replica_outcome(&mb, &before, CATCH_UP)?;
                let (set_rps, get_rps) = (set?, get?);
                eprintln!(
                    "      SET {set_rps:.0}/s, GET {get_rps:.0}/s; replica {}",
                    replica_cell(std::slice::from_ref(&replica))
                );
                samples.entry(config).or_default().push(Sample {
                    set_rps,
                    get_rps,
                    replica,
                });
            }
        }
        Ok(())
    })();
    let _ = routes::leave(bed);
    for mut server in servers {
        crate::cmd::stop_child(&mut server, Duration::from_secs(5));
    }
    let _ = std::fs::remove_dir_all(logs.join("spill"));
    outcome?;
    let json: BTreeMap<&str, Vec<serde_json::Value>> = samples
        .iter()
        .map(|(config, rounds)| {
            let rounds = rounds
                .iter()
                .map(|s| {
                    serde_json::json!({"set_rps": s.set_rps, "get_rps": s.get_rps,
                        "replica": s.replica.to_json()})
                })
                .collect();
            (config.label(), rounds)
        })
        .collect();
    save_json(options, "consistency", &serde_json::to_value(json)?)?;
    let md = report(&samples, options, requests);
    eprint!("{md}");
    Ok(md)
}

/// Stops our own replica Redis (pid `pid`) [`PAUSE_AFTER`] into the write phase and lets
/// it go on [`PAUSE`] later.
fn pause_replica(pid: u32) {
    std::thread::sleep(PAUSE_AFTER);
    let pid = pid as libc::pid_t;
    // SAFETY: kill(2) takes plain integers; the pid is our own child's, not yet reaped
    // (the servers are stopped only after every cell).
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    std::thread::sleep(PAUSE);
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
}

/// Runs redis-benchmark in `host` against `server` for `requests` of `test` (`set` or
/// `get`) with [`VALUE_BYTES`] values; its requests per second.
fn redis_benchmark(
    bed: &Testbed,
    host: &str,
    server: Ipv4Addr,
    test: &str,
    requests: u32,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let out = bed.exec(
        host,
        &[
            "timeout",
            "120",
            "redis-benchmark",
            "-h",
            &server.to_string(),
            "-p",
            &PORT.to_string(),
            "-c",
            &CLIENTS.to_string(),
            "-P",
            &PIPELINE.to_string(),
            "-d",
            &VALUE_BYTES.to_string(),
            "-n",
            &requests.to_string(),
            "-t",
            test,
            "--csv",
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = csv_rps(&text, test)
        .with_context(|| format!("redis-benchmark printed no rate for {test}: {text}"))?;
    tracing::debug!(
        "redis-benchmark {test}: {rps:.0}/s in {:?}",
        started.elapsed()
    );
    if rps <= 0.0 {
        bail!("redis-benchmark {test}: rate {rps}");
    }
    Ok(rps)
}

/// The requests per second of `test` in redis-benchmark's `--csv` output
/// (`"SET","12345.67",...`).
fn csv_rps(text: &str, test: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let mut fields = line.split(',').map(|f| f.trim().trim_matches('"'));
        let name = fields.next()?;
        if !name.eq_ignore_ascii_case(test) {
            return None;
        }
        fields.next()?.parse().ok()
    })
}

/// The replica's column over a cell's rounds: ✓ (attached, every byte) or detached, and
/// with it what was spilled, replayed and verified.
fn replica_cell(rounds: &[ReplicaOutcome]) -> String {
    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
    let sum = |f: fn(&ReplicaOutcome) -> u64| rounds.iter().map(f).sum::<u64>();
    let state = if rounds.iter().any(|r| r.detaches > 0) {
        format!("**detached** ({} session(s))", sum(|r| r.detaches))
    } else if rounds.iter().all(ReplicaOutcome::complete) {
        "✓".to_owned()
    } else {
        "**short**".to_owned()
    };
    format!(
        "{state} | {:.1} / {:.1} | {:.1} / {} / {}",
        mib(sum(|r| r.spilled_bytes)),
        mib(sum(|r| r.replayed_bytes)),
        mib(sum(|r| r.verified_bytes)),
        sum(|r| r.mismatches),
        sum(|r| r.window_exceeded)
    )
}

/// The section of BENCHMARKS.md.
fn report(samples: &BTreeMap<Config, Vec<Sample>>, options: &Options, requests: u32) -> String {
    let mut md = String::from(
        "## Cost of reply verification and of spilling: redis-benchmark, one replica\n\n",
    );
    let _ = writeln!(
        md,
        "XDP mode, one replica on the dedicated NIC, links **not capped**: verification is \
         work in the middlebox's worker (holding and comparing every answer byte), which a \
         link cap would hide; here the limit is the machine's two cores, shared by the \
         switch, the middlebox, the client and both servers. `redis-benchmark -c {CLIENTS} \
         -P {PIPELINE} -d {VALUE_BYTES} -n {requests}`, first `-t set` (the write phase), then \
         `-t get` of the same key, whose {VALUE_BYTES}-byte answer is the same on both \
         servers, so verification compares all of it. Configurations in turn within each of \
         {} round(s); median requests/s, its ratio to (a) in brackets (and with several \
         rounds the [lowest–highest] round). In (c) and (d) the replica's Redis is stopped \
         (SIGSTOP) {:.1} s into the write phase for {:.1} s, far beyond its {} MiB memory \
         budget; (c) spills to disk (spill budget {} GiB) and replays when it resumes, (d) \
         has no spilling and is detached. Replica: ✓ stayed attached and got every byte \
         the primary got; spilled / replayed and verified MiB, sessions whose answers \
         differed, and sessions left unverified because one side's answers ran more than the \
         verification window ({} MiB in (b)) ahead of the other's, summed over the rounds (from \
         the middlebox's counters). Once (d)'s replica is detached from a session the \
         middlebox stops copying that session to it and the replica's Redis gets none of \
         its writes, which frees CPU on these shared cores: the likely reason (d) can beat \
         (a).\n",
        options.repetitions,
        PAUSE_AFTER.as_secs_f64(),
        PAUSE.as_secs_f64(),
        REPLICA_BUDGET >> 20,
        SPILL_BUDGET >> 30,
        VERIFY_WINDOW >> 20,
    );
    let _ = writeln!(
        md,
        "| configuration | SET req/s | GET req/s | replica | spilled / replayed MiB | verified MiB / mismatches / unverified |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    let medians = |config: Config, f: fn(&Sample) -> f64| {
        let values: Vec<f64> = samples
            .get(&config)
            .map(|rounds| rounds.iter().map(f).collect())
            .unwrap_or_default();
        (median(&values), values)
    };
    let reference = |f: fn(&Sample) -> f64| medians(Config::VerifyOff, f).0;
    for config in Config::ALL {
        let cell = |f: fn(&Sample) -> f64| {
            let (value, values) = medians(config, f);
            let ratio = reference(f);
            let ratio = if ratio > 0.0 {
                format!(" ({:.2}×)", value / ratio)
            } else {
                String::new()
            };
            format!(
                "{value:.0}{ratio}{}",
                super::spread(&values, |v| format!("{v:.0}"))
            )
        };
        let rounds: Vec<ReplicaOutcome> = samples
            .get(&config)
            .map(|r| r.iter().map(|s| s.replica.clone()).collect())
            .unwrap_or_default();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            config.label(),
            cell(|s| s.set_rps),
            cell(|s| s.get_rps),
            replica_cell(&rounds)
        );
    }
    md.push('\n');
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_read_from_either_csv_layout() {
        let v7 = "\"test\",\"rps\",\"avg_latency_ms\"\n\"SET\",\"12345.68\",\"1.2\"\n";
        assert_eq!(csv_rps(v7, "set"), Some(12345.68));
        assert_eq!(csv_rps("\"GET\",\"99.5\"\n", "get"), Some(99.5));
        assert_eq!(csv_rps(v7, "get"), None);
    }

    #[test]
    fn only_c_spills_and_only_b_verifies() {
        let options = Options::default();
        let c = Config::SlowSpilling.tuning(&options).service;
        assert!(
            c.contains("spill_budget_bytes") && c.contains("spill_dir"),
            "{c}"
        );
        for config in [
            Config::VerifyOff,
            Config::VerifyReplies,
            Config::SlowDetached,
        ] {
            assert!(
                !config.tuning(&options).service.contains("spill"),
                "{config:?}"
            );
        }
        let b = Config::VerifyReplies.tuning(&options).service;
        assert!(b.contains("verify = \"replies\""), "{b}");
        assert!(
            b.contains(&format!("verify_window_bytes = {VERIFY_WINDOW}")),
            "{b}"
        );
        assert!(
            b.contains(&format!("replica_budget_bytes = {REPLICA_BUDGET}")),
            "{b}"
        );
    }

    #[test]
    fn a_detach_in_any_round_marks_the_cell() {
        let kept = ReplicaOutcome {
            primary_bytes: 10,
            replica_bytes: 10,
            spilled_bytes: 3 << 20,
            replayed_bytes: 3 << 20,
            ..ReplicaOutcome::default()
        };
        let cut = ReplicaOutcome {
            detaches: 2,
            ..kept.clone()
        };
        assert_eq!(
            replica_cell(std::slice::from_ref(&kept)),
            "✓ | 3.0 / 3.0 | 0.0 / 0 / 0"
        );
        assert!(replica_cell(&[kept, cut]).starts_with("**detached** (2 session(s))"));
    }
}
