//! What relaying costs the machine, without the software switch in the way: iperf3
//! through the middlebox on a switchless bed, direct versus both data planes with one
//! replica, counted as whole-machine busy CPU per Gbit relayed.
//!
//! # The bed
//!
//! Built inside the paper test bed's namespaces (so the hosts, the middlebox helpers and
//! the servers are the same), on addresses of its own:
//!
//! ```text
//!   source rel0 ─┐
//!  primary rel0 ─┼─ in-kernel bridge (namespace <prefix>-relaylan)   198.19.20.0/24
//! middlebox rel0 ┘
//! middlebox rel1 ─── plain veth ─── replica rel0                      198.19.21.0/24
//! ```
//!
//! The source reaches the primary by a pinned neighbour entry: the primary's MAC
//! (direct) or the middlebox's (through it), as the controller's redirect does on a real
//! switch. No Open vSwitch carries a byte of these runs.
//!
//! Why the production side is a bridge and not a plain veth chain
//! (source ─ middlebox ─ primary): XDP mode reaches the primaries through the interface
//! the clients' frames arrive on (its link 0, see `dataplane/src/xdp/transport.rs`), and
//! with a `replica_interface` it takes exactly one client-facing interface
//! (`runtime::plan_workers`). On a chain the primary would sit behind a second
//! client-side NIC, which XDP mode cannot use, so client, primary and middlebox share one
//! segment. An in-kernel bridge costs one cheap forwarding step per frame and per hop,
//! charged alike to the direct runs and the relayed ones; its namespace turns off
//! `br_netfilter`, so bridged frames do not run through iptables. The replica has a
//! link to itself, so the replication side is a plain veth pair (the paper's dedicated
//! NIC). Every veth has tx checksum offload off, as on the paper bed (user-space TCP
//! rejects partial checksums).
//!
//! # The figures
//!
//! Each cell is one iperf3 run from the source to the primary, and two CPU counts around
//! it, each divided by the Gbit the primary received:
//! - the whole machine: every core's busy time from `/proc/stat` (user + nice + system +
//!   irq + softirq + steal), so the kernel's relay work in softirq context counts,
//!   whoever it is done for. The machine is shared, and whatever else runs meanwhile
//!   (another engineer's build) lands here too;
//! - the bench's own tasks: the processes in the bed's namespaces, the iperf3 client and
//!   the kernel's softirq threads ([`task_ticks`]). This kernel has no IRQ time
//!   accounting, so softirq work done in a process's context is charged to that process
//!   and counted here; softirq work that interrupts someone else's process is not.
//!   `/proc/<pid>/stat` scales its times to the scheduler's exact run time, while
//!   `/proc/stat` counts tick samples, so at light load the two differ by a few ticks.
//!
//! The report also shows how many cores other work kept busy during each run (the
//! machine's count minus the own tasks'), so a reader can tell a clean machine figure
//! from one a concurrent build inflated.
//!
//! The middlebox's share is a route's figure minus the direct run's in the same regime and
//! stream count. Routes alternate within each round, so drift hits them alike.

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr, path::Path, time::Instant};

use anyhow::Context as _;
use ncp_testbed::{Mac, Testbed, cmd as sys};

use super::{
    Options,
    iperf::{self, IperfRun, PORT},
    median, profile,
    replica::{self, ReplicaOutcome},
    routes::{Nic, Replication, Route, Wiring},
    save_json, spread,
};
use crate::{
    cmd::step,
    middlebox::{Middlebox, ProcessTicks, worker_counter},
};

/// Parallel streams per run.
const STREAMS: [u32; 3] = [1, 8, 32];

/// The paced regime's total rate. Below what both data planes carried unthrottled in the
/// issue's bridge measurement (0.64-1.14 Gbit/s), so the rate, not the relay, sets how
/// much is relayed and every route does the same work per second.
const PACED_MBIT: u64 = 500;

/// A regime: its name and the total rate iperf3 paces the streams to (None: unpaced).
type Regime = (&'static str, Option<u64>);

const REGIMES: [Regime; 2] = [
    ("unthrottled", None),
    ("paced to 500 Mbit/s", Some(PACED_MBIT)),
];

/// Host numbers on both networks, as on the paper bed.
const HOSTS: [(&str, u8); 4] = [
    ("source", 1),
    ("primary", 2),
    ("replica", 3),
    ("middlebox", 4),
];

/// The production network's third octet (198.19.20.0/24) and the replication network's.
const PRODUCTION: u8 = 20;
const REPLICATION: u8 = 21;

fn address(network: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, network, host)
}

/// MACs spell the address out, as on the paper bed: 02:00:c6:13:<network>:<host>.
fn mac(network: u8, host: u8) -> Mac {
    Mac([0x02, 0x00, 0xc6, 0x13, network, host])
}

fn host_number(host: &str) -> anyhow::Result<u8> {
    HOSTS
        .iter()
        .find(|(name, _)| *name == host)
        .map(|&(_, n)| n)
        .with_context(|| format!("no host `{host}` on the relay bed"))
}

/// Busy and idle time of all cores together, in clock ticks, from `/proc/stat`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct CpuTimes {
    /// user + nice + system + irq + softirq + steal.
    pub busy: u64,
    /// idle + iowait.
    pub idle: u64,
}

impl CpuTimes {
    /// Parses the aggregate `cpu` line of `/proc/stat` (user nice system idle iowait irq
    /// softirq steal ...; guest time is already inside user and nice). Kernels before
    /// 2.6.11 had no steal field; fewer than seven fields is an error.
    pub fn parse(proc_stat: &str) -> anyhow::Result<CpuTimes> {
        let line = proc_stat
            .lines()
            .find(|l| l.split_whitespace().next() == Some("cpu"))
            .context("/proc/stat has no aggregate `cpu` line")?;
        let fields: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse::<u64>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("/proc/stat: not a number in `{line}`"))?;
        if fields.len() < 7 {
            anyhow::bail!("/proc/stat: `{line}` has fewer than 7 time fields");
        }
        let field = |i: usize| fields.get(i).copied().unwrap_or(0);
        Ok(CpuTimes {
            busy: field(0) + field(1) + field(2) + field(5) + field(6) + field(7),
            idle: field(3) + field(4),
        })
    }

    /// The machine's counters now.
    fn read() -> anyhow::Result<CpuTimes> {
        CpuTimes::parse(&std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?)
    }

    /// Busy ticks from `before` to `self`.
    pub fn busy_since(&self, before: &CpuTimes) -> u64 {
        self.busy.saturating_sub(before.busy)
    }
}

/// One iperf3 run on one route.
#[derive(Clone, Debug, Default, PartialEq)]
struct Sample {
    /// What the primary received (None: the run failed).
    run: Option<IperfRun>,
    /// Busy CPU time of all cores over the run, seconds.
    busy_seconds: f64,
    /// CPU time of the bench's own tasks over the run ([`task_ticks`] and the iperf3
    /// client), seconds.
    task_seconds: f64,
    /// Wall time of the run, seconds.
    wall_seconds: f64,
    /// What the replica got meanwhile (routes through the middlebox).
    replica: Option<ReplicaOutcome>,
}

impl Sample {
    /// Busy core-seconds of the whole machine per Gbit the primary received.
    /// What the replica got, for the progress lines (empty for direct runs).
    fn replica_note(&self) -> String {
        self.replica.as_ref().map_or(String::new(), |r| {
            format!(
                "; replica {} of {} bytes, {} detach(es)",
                r.replica_bytes, r.primary_bytes, r.detaches
            )
        })
    }

    fn core_seconds_per_gbit(&self) -> Option<f64> {
        self.per_gbit(self.busy_seconds)
    }

    /// Core-seconds of the bench's own tasks per Gbit the primary received.
    fn task_seconds_per_gbit(&self) -> Option<f64> {
        self.per_gbit(self.task_seconds)
    }

    /// Cores kept busy by everything else on the machine meanwhile: the machine's busy
    /// time beyond the bench's own tasks, per second of the run (0 when the two
    /// counts, tick samples against scheduler run time, put it below zero).
    fn others_cores(&self) -> Option<f64> {
        (self.wall_seconds > 0.0)
            .then(|| ((self.busy_seconds - self.task_seconds) / self.wall_seconds).max(0.0))
    }

    fn per_gbit(&self, seconds: f64) -> Option<f64> {
        let gbit = self.run?.bytes as f64 * 8.0 / 1e9;
        (gbit > 0.0).then(|| seconds / gbit)
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "bits_per_second": self.run.map(|r| r.bps),
            "bytes": self.run.map(|r| r.bytes),
            "busy_core_seconds": self.busy_seconds,
            "wall_seconds": self.wall_seconds,
            "busy_core_seconds_per_gbit": self.core_seconds_per_gbit(),
            "own_task_core_seconds": self.task_seconds,
            "own_task_core_seconds_per_gbit": self.task_seconds_per_gbit(),
            "other_work_cores": self.others_cores(),
            "replica": self.replica.as_ref().map(ReplicaOutcome::to_json),
        })
    }
}

/// Samples by regime, route label and stream count.
type Cells = super::Cells<Sample>;

/// The relay bed on top of the paper bed's hosts; dropping it removes it.
struct RelayBed<'a> {
    bed: &'a Testbed,
    lan: String,
}

impl<'a> RelayBed<'a> {
    fn up(bed: &'a Testbed) -> anyhow::Result<Self> {
        let lan = format!("{}-relaylan", super::prefix());
        let relay = RelayBed { bed, lan };
        // A bed left by a crashed run goes first (Testbed::down would also remove it, by
        // its prefix).
        relay.remove();
        relay.build()?;
        Ok(relay)
    }

    fn build(&self) -> anyhow::Result<()> {
        let lan = self.lan.as_str();
        ncp_testbed::create_namespace(lan)?;
        // br_netfilter's switches are per namespace and start on; where the module is not
        // loaded there is nothing to turn off.
        if Path::new("/proc/sys/net/bridge").exists() {
            sys::run(&[
                "ip",
                "netns",
                "exec",
                lan,
                "sysctl",
                "-q",
                "-w",
                "net.bridge.bridge-nf-call-iptables=0",
                "net.bridge.bridge-nf-call-ip6tables=0",
                "net.bridge.bridge-nf-call-arptables=0",
            ])?;
        }
        sys::run(&["ip", "-n", lan, "link", "add", "br0", "type", "bridge"])?;
        sys::run(&["ip", "-n", lan, "link", "set", "br0", "up"])?;
        for host in ["source", "primary", "middlebox"] {
            let ns = self.bed.netns(host)?;
            sys::run(&[
                "ip", "-n", lan, "link", "add", host, "type", "veth", "peer", "name", "rel0",
                "netns", &ns,
            ])?;
            sys::run(&["ip", "-n", lan, "link", "set", host, "master", "br0"])?;
            sys::run(&[
                "ip", "netns", "exec", lan, "ethtool", "-K", host, "tx", "off",
            ])?;
            sys::run(&["ip", "-n", lan, "link", "set", host, "up"])?;
            self.configure(host, "rel0", PRODUCTION)?;
        }
        let mb_ns = self.bed.netns("middlebox")?;
        let replica_ns = self.bed.netns("replica")?;
        sys::run(&[
            "ip",
            "-n",
            &mb_ns,
            "link",
            "add",
            "rel1",
            "type",
            "veth",
            "peer",
            "name",
            "rel0",
            "netns",
            &replica_ns,
        ])?;
        self.configure("middlebox", "rel1", REPLICATION)?;
        self.configure("replica", "rel0", REPLICATION)?;
        Ok(())
    }

    /// Address, MAC, no tx checksum offload, up: a host's end of a relay-bed link.
    fn configure(&self, host: &str, iface: &str, network: u8) -> anyhow::Result<()> {
        let n = host_number(host)?;
        let cidr = format!("{}/24", address(network, n));
        let mac = mac(network, n).to_string();
        for argv in [
            vec!["ip", "link", "set", iface, "address", &mac],
            vec!["ip", "addr", "add", &cidr, "dev", iface],
            vec!["ethtool", "-K", iface, "tx", "off"],
            vec!["ip", "link", "set", iface, "up"],
        ] {
            self.bed.exec(host, &argv)?;
        }
        Ok(())
    }

    /// Where the routes' ends are on this bed.
    fn wiring(&self) -> anyhow::Result<Wiring> {
        let nic = |name: &str, network: u8| -> anyhow::Result<Nic> {
            let n = host_number("middlebox")?;
            Ok(Nic {
                name: name.to_owned(),
                address: address(network, n),
                mac: mac(network, n),
            })
        };
        Ok(Wiring {
            source_nic: "rel0".into(),
            source: address(PRODUCTION, host_number("source")?),
            primary: address(PRODUCTION, host_number("primary")?),
            primary_mac: mac(PRODUCTION, host_number("primary")?),
            client_nic: nic("rel0", PRODUCTION)?,
            replication_nic: nic("rel1", REPLICATION)?,
            replica_shared: None,
            replica_dedicated: address(REPLICATION, host_number("replica")?),
        })
    }

    /// Deletes the bridge's namespace (its veths and their host ends go with it) and the
    /// replica's link; what is already gone is fine.
    fn remove(&self) {
        let _ = sys::run(&["ip", "netns", "del", &self.lan]);
        if let Ok(ns) = self.bed.netns("middlebox") {
            let _ = sys::run(&["ip", "-n", &ns, "link", "del", "rel1"]);
        }
    }
}

impl Drop for RelayBed<'_> {
    fn drop(&mut self) {
        self.remove();
    }
}

pub fn relay(bed: &Testbed, bins: &Path, options: &Options) -> anyhow::Result<String> {
    let seconds = if options.quick { "2" } else { "5" };
    let routes = Route::all(&options.dataplanes, &[Replication::DedicatedNic]);
    step("building the switchless relay bed (in-kernel bridge, plain veth to the replica)");
    let relay = RelayBed::up(bed)?;
    let wiring = relay.wiring()?;
    let servers = iperf::start_servers(bed)?;
    if let Some(name) = &options.profile {
        let outcome = profile_xdp(bed, &wiring, bins, options, name, seconds);
        iperf::stop_servers(servers);
        return outcome.map(|()| String::new());
    }
    let mut cells = Cells::new();
    let outcome = (|| -> anyhow::Result<()> {
        for round in 0..options.repetitions {
            for &(regime, rate) in &REGIMES {
                for route in &routes {
                    step(&format!(
                        "relay, {regime}, round {}: {}",
                        round + 1,
                        route.label()
                    ));
                    let mb = route.enter_on(bed, &wiring, bins, PORT, &options.relay_tuning())?;
                    for n in STREAMS {
                        let stream_bps = rate.map(|mbit| mbit * 1_000_000 / u64::from(n));
                        let sample =
                            measure(bed, mb.as_ref(), wiring.primary, n, seconds, stream_bps)?;
                        let show = |c: Option<f64>| c.map_or("—".into(), |c| format!("{c:.2}"));
                        eprintln!(
                            "      -P {n:<2} {:.3} Gbit/s, core-s per Gbit: machine {}, own tasks {}{}",
                            sample.run.map_or(0.0, |r| r.bps / 1e9),
                            show(sample.core_seconds_per_gbit()),
                            show(sample.task_seconds_per_gbit()),
                            sample.replica_note()
                        );
                        super::add_sample(&mut cells, regime, route.label(), n, sample);
                    }
                }
            }
        }
        Ok(())
    })();
    iperf::stop_servers(servers);
    drop(relay);
    outcome?;

    let labels: Vec<String> = routes.iter().map(Route::label).collect();
    let md = report(&cells, &labels, seconds, options.repetitions);
    let json: serde_json::Map<String, serde_json::Value> = cells
        .iter()
        .map(|(regime, by_route)| {
            (
                (*regime).to_owned(),
                super::by_route_json(by_route, Sample::to_json),
            )
        })
        .collect();
    save_json(
        options,
        "relay",
        &serde_json::json!({
            "seconds": seconds,
            "paced_mbit_per_s": PACED_MBIT,
            "cells": json,
        }),
    )?;
    eprint!("{md}");
    Ok(md)
}

/// The streams of the profiled run: where XDP mode's share per Gbit was highest among the
/// counts that still carry about a Gbit.
const PROFILE_STREAMS: u32 = 8;

/// `--profile NAME`: one unthrottled run through XDP mode with one replica, the middlebox
/// under `perf record` meanwhile (see `profile.rs`).
fn profile_xdp(
    bed: &Testbed,
    wiring: &Wiring,
    bins: &Path,
    options: &Options,
    name: &str,
    seconds: &str,
) -> anyhow::Result<()> {
    let route = Route::Middlebox {
        dataplane: "xdp".into(),
        replication: Replication::DedicatedNic,
    };
    step(&format!(
        "profiling {} at -P {PROFILE_STREAMS}",
        route.label()
    ));
    let mb = route
        .enter_on(bed, wiring, bins, PORT, &options.relay_tuning())?
        .context("the XDP route has a middlebox")?;
    let tx = |stats: &serde_json::Value| {
        [
            worker_counter(stats, "tx_frames"),
            worker_counter(stats, "tx_kicks"),
        ]
    };
    let before = tx(&mb.stats()?);
    let recording = profile::Recording::start(&mb, name)?;
    let sample = measure(
        bed,
        Some(&mb),
        wiring.primary,
        PROFILE_STREAMS,
        seconds,
        None,
    );
    recording.finish()?;
    let sample = sample?;
    let after = tx(&mb.stats()?);
    let (frames, kicks) = (
        after[0].saturating_sub(before[0]),
        after[1].saturating_sub(before[1]),
    );
    eprintln!(
        "      -P {PROFILE_STREAMS} {:.3} Gbit/s under perf{}; {frames} frames sent with {kicks} sendto kicks ({:.1} per kick)",
        sample.run.map_or(0.0, |r| r.bps / 1e9),
        sample.replica_note(),
        frames as f64 / kicks.max(1) as f64
    );
    Ok(())
}

/// One iperf3 run with the machine's busy time around it and, through a middlebox, what
/// the replica got meanwhile. A failed run is recorded (and reported), not fatal.
fn measure(
    bed: &Testbed,
    mb: Option<&Middlebox>,
    primary: Ipv4Addr,
    streams: u32,
    seconds: &str,
    stream_bps: Option<u64>,
) -> anyhow::Result<Sample> {
    let replica_before = mb.map(replica::first_replica_counters).transpose()?;
    let tasks_before = task_ticks(bed)?;
    let client_before = reaped_children();
    let cpu_before = CpuTimes::read()?;
    let started = Instant::now();
    let run = iperf::run_iperf_paced(bed, primary, streams, seconds, stream_bps);
    let wall_seconds = started.elapsed().as_secs_f64();
    let busy_ticks = CpuTimes::read()?.busy_since(&cpu_before);
    let client_ticks = reaped_children().saturating_sub(client_before);
    let task_ticks = grown(&tasks_before, &task_ticks(bed)?) + client_ticks;
    let run = run
        .map_err(|e| eprintln!("      -P {streams:<2} failed: {e:#}"))
        .ok();
    let replica = match (mb, replica_before) {
        (Some(mb), Some(before)) => Some(replica::replica_outcome(
            mb,
            &before,
            replica::REPLICA_CATCH_UP,
        )?),
        _ => None,
    };
    let hz = crate::middlebox::clock_ticks_per_second();
    Ok(Sample {
        run,
        busy_seconds: busy_ticks as f64 / hz,
        task_seconds: task_ticks as f64 / hz,
        wall_seconds,
        replica,
    })
}

/// CPU ticks so far of the tasks that do this bench's work, by pid: every process in the
/// bed's namespaces (iperf3's server, the replica's sink, the middlebox) with the
/// children they reaped, and the kernel's softirq threads (`ksoftirqd/N`), which take
/// over receive work deferred by any of them. Without IRQ time accounting (this
/// kernel's) softirq work done in a process's context is in that process's own time.
fn task_ticks(bed: &Testbed) -> anyhow::Result<BTreeMap<i32, u64>> {
    let mut pids = Vec::new();
    for (host, _) in HOSTS {
        pids.extend(bed.pids(host)?);
    }
    for entry in std::fs::read_dir("/proc").context("listing /proc")? {
        let Some(pid) = entry?
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.starts_with("ksoftirqd/") {
            pids.push(pid);
        }
    }
    Ok(pids
        .into_iter()
        .filter_map(|pid| ProcessTicks::of(pid).map(|t| (pid, t.own + t.reaped_children)))
        .collect())
}

/// Ticks the tasks of `after` gained since `before`; a task that started in between
/// counts whole, one that ended in between is lost unless a counted parent reaped it.
fn grown(before: &BTreeMap<i32, u64>, after: &BTreeMap<i32, u64>) -> u64 {
    after
        .iter()
        .map(|(pid, &ticks)| ticks.saturating_sub(before.get(pid).copied().unwrap_or(0)))
        .sum()
}

/// CPU ticks of the children this process has waited for: the iperf3 client of a run
/// (it runs outside the bed's namespaces' process lists once it has exited).
fn reaped_children() -> u64 {
    i32::try_from(std::process::id())
        .ok()
        .and_then(ProcessTicks::of)
        .map_or(0, |t| t.reaped_children)
}

/// A cost figure of one row, over its rounds.
#[derive(Clone, Debug, Default, PartialEq)]
struct Cost {
    /// Per successful round, core-seconds per Gbit.
    per_gbit: Vec<f64>,
    /// The median minus direct's (routes through the middlebox, when both have figures).
    share: Option<f64>,
}

impl Cost {
    fn of(
        samples: &[Sample],
        direct: &[Sample],
        is_direct: bool,
        metric: fn(&Sample) -> Option<f64>,
    ) -> Cost {
        let per_gbit: Vec<f64> = samples.iter().filter_map(metric).collect();
        let direct: Vec<f64> = direct.iter().filter_map(metric).collect();
        let share = (!is_direct && !per_gbit.is_empty() && !direct.is_empty())
            .then(|| median(&per_gbit) - median(&direct));
        Cost { per_gbit, share }
    }

    /// The figure and the share as two table cells.
    fn cells(&self) -> (String, String) {
        let figure = if self.per_gbit.is_empty() {
            "—".to_owned()
        } else {
            median_with_spread(&self.per_gbit, 2)
        };
        (
            figure,
            self.share.map_or("—".to_owned(), |s| format!("{s:+.2}")),
        )
    }
}

/// One row of the report: a route at a stream count, over its rounds.
#[derive(Clone, Debug, PartialEq)]
struct Row {
    streams: u32,
    route: String,
    /// Per round, Gbit/s (0 for a failed run).
    gbps: Vec<f64>,
    /// Busy CPU of the whole machine.
    machine: Cost,
    /// CPU of the bench's own tasks.
    tasks: Cost,
    /// Per round, cores busy with other work during the run.
    others_cores: Vec<f64>,
    /// Rounds in which the replica stayed attached and got every byte, of the rounds
    /// with a replica.
    replica_complete: Option<(usize, usize)>,
}

/// The rows of one regime's table, stream count by stream count, routes in `labels`'
/// order.
fn rows(by_route: &super::ByRoute<Sample>, labels: &[String]) -> Vec<Row> {
    let samples = |label: &str, n: u32| {
        by_route
            .get(label)
            .and_then(|m| m.get(&n))
            .map_or(&[][..], Vec::as_slice)
    };
    let mut rows = Vec::new();
    for n in STREAMS {
        let direct = samples("direct", n);
        for label in labels {
            let own = samples(label, n);
            let is_direct = label == "direct";
            let with_replica: Vec<&ReplicaOutcome> =
                own.iter().filter_map(|s| s.replica.as_ref()).collect();
            rows.push(Row {
                streams: n,
                route: label.clone(),
                gbps: own
                    .iter()
                    .map(|s| s.run.map_or(0.0, |r| r.bps / 1e9))
                    .collect(),
                machine: Cost::of(own, direct, is_direct, Sample::core_seconds_per_gbit),
                tasks: Cost::of(own, direct, is_direct, Sample::task_seconds_per_gbit),
                others_cores: own.iter().filter_map(Sample::others_cores).collect(),
                replica_complete: (!with_replica.is_empty()).then(|| {
                    (
                        with_replica.iter().filter(|r| r.complete()).count(),
                        with_replica.len(),
                    )
                }),
            });
        }
    }
    rows
}

/// The experiment's section of BENCHMARKS.md.
fn report(cells: &Cells, labels: &[String], seconds: &str, repetitions: u32) -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut md = String::from("## Relay cost on a switchless bed (whole machine)\n\n");
    let _ = writeln!(
        md,
        "`cargo xtask bench relay`: iperf3 from the source to the primary for {seconds} s per \
         cell, {repetitions} round(s), one replica on the middlebox's second NIC; no Open \
         vSwitch in the path (an in-kernel bridge joins source, primary and middlebox, a plain \
         veth pair the middlebox and the replica; why in `xtask/src/bench/relay.rs`). CPU per \
         Gbit the primary received, counted two ways: *machine* is every core's busy time \
         (user, nice, system, irq, softirq, steal from /proc/stat) over the run; *own tasks* \
         is the CPU time of the bench's processes (iperf3 client and server, the replica's \
         sink, the middlebox) and the kernel's softirq threads. The middlebox's share is a \
         route's figure minus direct's at the same stream count. Medians, with several rounds \
         [lowest–highest]. The machine has {cores} cores and is **shared**: other people's \
         work running meanwhile is in the machine figures (a saturated machine reads about \
         {cores} core-s per second whatever we do) and slows our runs; the own-tasks figures \
         leave it out, and the column *other work meanwhile* says how many cores the rest \
         kept busy (machine minus own tasks, per second). Where that is near 0 the two counts \
         agree; the own-tasks count is the scheduler's run time, the machine's is tick \
         samples, so at light load they differ by a few ticks. Compare within a table, not \
         across runs.\n"
    );
    for (regime, _) in REGIMES {
        let Some(by_route) = cells.get(regime) else {
            continue;
        };
        let _ = writeln!(md, "### {regime}\n");
        md.push_str(&table(&rows(by_route, labels)));
    }
    md
}

/// A regime's table from its rows.
fn table(rows: &[Row]) -> String {
    let mut md = String::from(
        "| streams | route | Gbit/s | machine: busy core-s per Gbit | machine: middlebox share | own tasks: core-s per Gbit | own tasks: middlebox share | other work meanwhile (cores) | replica attached, every byte |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let gbps = if row.gbps.iter().all(|&g| g == 0.0) {
            "failed".to_owned()
        } else {
            median_with_spread(&row.gbps, 3)
        };
        let (machine, machine_share) = row.machine.cells();
        let (tasks, tasks_share) = row.tasks.cells();
        let replica = row
            .replica_complete
            .map_or("—".to_owned(), |(complete, of)| {
                if complete == of {
                    format!("yes ({of} of {of} rounds)")
                } else {
                    format!("**no** in {} of {of} rounds", of - complete)
                }
            });
        let others = if row.others_cores.is_empty() {
            "—".to_owned()
        } else {
            median_with_spread(&row.others_cores, 2)
        };
        let _ = writeln!(
            md,
            "| {} | {} | {gbps} | {machine} | {machine_share} | {tasks} | {tasks_share} | {others} | {replica} |",
            row.streams, row.route
        );
    }
    md.push('\n');
    md
}

/// A table cell: the median of `values` and, with several rounds, their range, both with
/// `decimals` digits.
fn median_with_spread(values: &[f64], decimals: usize) -> String {
    format!(
        "{:.decimals$}{}",
        median(values),
        spread(values, |v| format!("{v:.decimals$}"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROC_STAT: &str = "cpu  3528578 118833 632996 2028237 30818 11 94366 2860 0 0\n\
                             cpu0 1674660 57033 305120 1116988 10462 0 51869 1417 0 0\n\
                             intr 1 2 3\n";

    #[test]
    fn busy_time_is_every_non_idle_field_of_the_aggregate_line() {
        let t = CpuTimes::parse(PROC_STAT).unwrap();
        assert_eq!(t.busy, 3528578 + 118833 + 632996 + 11 + 94366 + 2860);
        assert_eq!(t.idle, 2028237 + 30818);
        let later = CpuTimes {
            busy: t.busy + 250,
            idle: t.idle + 10,
        };
        assert_eq!(later.busy_since(&t), 250);
        assert_eq!(t.busy_since(&later), 0);
    }

    #[test]
    fn proc_stat_without_a_usable_cpu_line_is_refused() {
        assert!(CpuTimes::parse("cpu0 1 2 3 4 5 6 7 8\n").is_err());
        assert!(CpuTimes::parse("cpu 1 2 3\n").is_err());
        assert!(CpuTimes::parse("cpu 1 2 x 4 5 6 7 8\n").is_err());
        // Before steal existed: seven fields, steal counts as 0.
        assert_eq!(
            CpuTimes::parse("cpu 1 2 3 4 5 6 7\n").unwrap().busy,
            1 + 2 + 3 + 6 + 7
        );
    }

    /// A run that moved `gbit` with the machine `busy_seconds` busy, half of it the
    /// bench's own tasks.
    fn sample(gbit: f64, busy_seconds: f64, replica: Option<(u64, u64, u64)>) -> Sample {
        let bytes = (gbit * 1e9 / 8.0) as u64;
        Sample {
            run: Some(IperfRun {
                bps: gbit * 1e9 / 5.0,
                bytes,
            }),
            busy_seconds,
            task_seconds: busy_seconds / 2.0,
            wall_seconds: 5.0,
            replica: replica.map(|(primary_bytes, replica_bytes, detaches)| ReplicaOutcome {
                primary_bytes,
                replica_bytes,
                detaches,
                ..ReplicaOutcome::default()
            }),
        }
    }

    #[test]
    fn the_share_is_the_routes_cost_minus_directs_and_replica_rounds_are_counted() {
        let labels = vec![
            "direct".to_owned(),
            "xdp: replica, dedicated NIC".to_owned(),
        ];
        let mut by_route = super::super::ByRoute::<Sample>::new();
        // Direct: 10 Gbit for 4 core-s (0.4 per Gbit), twice.
        by_route
            .entry(labels[0].clone())
            .or_default()
            .insert(1, vec![sample(10.0, 4.0, None), sample(10.0, 4.0, None)]);
        // Through the middlebox: 2 Gbit for 3 and for 5 core-s (1.5 and 2.5 per Gbit,
        // median 2.0); the replica fell short in the second round.
        by_route.entry(labels[1].clone()).or_default().insert(
            1,
            vec![
                sample(2.0, 3.0, Some((100, 100, 0))),
                sample(2.0, 5.0, Some((100, 90, 0))),
            ],
        );
        let rows = rows(&by_route, &labels);
        let direct = &rows[0];
        assert_eq!(direct.streams, 1);
        assert_eq!(direct.machine.share, None);
        assert_eq!(direct.replica_complete, None);
        let relayed = &rows[1];
        assert_eq!(relayed.machine.per_gbit, vec![1.5, 2.5]);
        let share = relayed.machine.share.unwrap();
        assert!((share - 1.6).abs() < 1e-9, "{share}");
        let share = relayed.tasks.share.unwrap();
        assert!((share - 0.8).abs() < 1e-9, "{share}");
        assert_eq!(relayed.replica_complete, Some((1, 2)));
        // Stream counts without samples still get rows, shown as failed.
        assert_eq!(rows.len(), STREAMS.len() * labels.len());
        let md = table(&rows);
        assert!(md.contains("| 1 | xdp: replica, dedicated NIC | 0.400 [0.400–0.400] | 2.00 [1.50–2.50] | +1.60 | 1.00 [0.75–1.25] | +0.80 | 0.40 [0.30–0.50] | **no** in 1 of 2 rounds |"), "{md}");
        assert!(
            md.contains("| 8 | direct | failed | — | — | — | — | — | — |"),
            "{md}"
        );
    }

    #[test]
    fn a_failed_run_has_no_cost_figure() {
        let failed = Sample {
            busy_seconds: 3.0,
            ..Sample::default()
        };
        assert_eq!(failed.core_seconds_per_gbit(), None);
        // 3 busy core-s, none of it ours, over no time at all: no rate.
        assert_eq!(failed.others_cores(), None);
        // Own tasks counted above the machine (run time against tick samples): no
        // negative load.
        let over = Sample {
            busy_seconds: 1.0,
            task_seconds: 1.5,
            wall_seconds: 5.0,
            ..Sample::default()
        };
        assert_eq!(over.others_cores(), Some(0.0));
        assert_eq!(sample(2.0, 3.0, None).core_seconds_per_gbit(), Some(1.5));
    }

    #[test]
    fn tasks_count_what_they_gained_and_new_ones_whole() {
        let before = BTreeMap::from([(10, 100), (11, 50), (12, 7)]);
        // 10 gained 30, 11 is unchanged, 12 ended, 13 started and used 5.
        let after = BTreeMap::from([(10, 130), (11, 50), (13, 5)]);
        assert_eq!(grown(&before, &after), 35);
        assert_eq!(grown(&after, &after), 0);
    }
}
