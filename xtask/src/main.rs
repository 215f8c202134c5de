//! `cargo xtask`: NCP's developer and operator tasks.

mod bench;
mod ci;
mod cmd;
mod demo;
mod deploy;
mod e2e;
mod fuzz;
mod middlebox;
mod setup;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use ncp_testbed::{DEFAULT_PREFIX, Testbed, Topology, UpOptions};

/// NCP's tasks: install prerequisites, run CI, manage the test bed, run the demo and the
/// benchmarks. Everything that touches the network needs root.
#[derive(Parser, Debug)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand, Debug)]
enum Task {
    /// Install everything NCP needs (apt packages, rust-src, bpf-linker, cargo-fuzz);
    /// idempotent.
    Setup,
    /// Everything CI checks: setup, fmt, clippy, unit and privileged integration tests,
    /// a short fuzzing run.
    Ci,
    /// Coverage-guided fuzzing of the parsers (cargo-fuzz, nightly): each target in turn,
    /// from the seeds in fuzz/seeds; prints executions, coverage and crashes per target
    /// and fails with the reproducer's path when one crashes.
    Fuzz {
        /// Targets to run (repeatable; default: all of them).
        #[arg(long = "target", value_name = "NAME")]
        targets: Vec<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// Bring a test bed (namespaces + Open vSwitch bridges) up or down.
    Testbed {
        #[command(subcommand)]
        action: TestbedAction,
    },
    /// The main job: NCP end to end on the built-in test bed (paper topology) — the
    /// controller steers a Redis client's session into the middlebox, which replicates it;
    /// prints where the redirect went, throughput direct versus through NCP, and the
    /// primary's and replica's digests.
    Demo {
        /// Leave everything running afterwards.
        #[arg(long)]
        keep: bool,
    },
    /// The fault matrix on the demo's test bed: each fault (middlebox, replica, primary,
    /// ncpd, ovs-vswitchd and bridge crashes, an impostor switch, a hostile OpenFlow
    /// peer) strikes while a client writes steadily; the table of what the client saw, how
    /// long until replication was back and what the replica missed goes to RELIABILITY.md
    /// (RELIABILITY.md.partial for some faults only). Fails if a middlebox restart takes
    /// more than 3 s to resume replication.
    Faults {
        /// Faults to run (default: all, in the order listed here).
        #[arg(value_enum)]
        faults: Vec<e2e::Fault>,
    },
    /// The fault matrix's client, run by it inside the source host: `SET f:<n>` every
    /// interval to TARGET, a new session every PER_SESSION writes, one line per write.
    #[command(hide = true)]
    FaultWriter {
        #[arg(long)]
        target: std::net::SocketAddr,
        #[arg(long)]
        seconds: u64,
        #[arg(long, default_value_t = 10)]
        interval_ms: u64,
        #[arg(long, default_value_t = 50)]
        per_session: u64,
    },
    /// The steering-only demo: XDP counters moving under generated and real traffic.
    DemoSteering {
        /// Leave the test bed and the middlebox running afterwards.
        #[arg(long)]
        keep: bool,
    },
    /// Validate a middlebox configuration, build in release mode and run it on the NIC
    /// queues it names, workers pinned to the configured cores.
    Deploy {
        /// Middlebox configuration (TOML); see `ncp-middlebox check --help`.
        #[arg(long)]
        config: PathBuf,
        /// Run inside this network namespace (e.g. a test-bed host: ncp-middlebox).
        #[arg(long)]
        netns: Option<String>,
    },
    /// Benchmarks, side by side in one run; results in bench-results/.
    Bench {
        /// Experiments to run (default: all; only a run of all of them rewrites
        /// BENCHMARKS.md, others write BENCHMARKS.md.partial). The test bed's prefix is
        /// `NCP_BENCH_PREFIX` (default `ncpb`).
        #[arg(value_enum)]
        experiments: Vec<bench::Experiment>,
        /// Rounds per measurement.
        #[arg(long, default_value_t = 1)]
        repetitions: u32,
        /// Middlebox data planes to measure, comma-separated (xdp, sockets).
        #[arg(long, value_delimiter = ',', default_value = "xdp,sockets")]
        dataplane: Vec<String>,
        /// Fewer stream counts and shorter runs.
        #[arg(long)]
        quick: bool,
        /// Per-connection TCP buffer (bytes) of XDP mode's connections in the iperf,
        /// httperf, pgbench and relay experiments: the config's `[tcp] buffer_bytes`. A single
        /// stream is bounded by buffer / round-trip time, so this is the knob to try when
        /// one stream falls short of the link. Default: the data plane's own (64 KiB).
        #[arg(long, value_name = "BYTES")]
        tcp_buffer: Option<u32>,
        /// Who repairs lost segments of XDP mode's connections in the iperf, httperf and
        /// pgbench experiments: the config's `[tcp] loss_recovery` (`ncp`: NCP's recovery
        /// layer; `smoltcp`: smoltcp's alone). Default: the data plane's own (ncp). The
        /// loss experiment sets it per column.
        #[arg(long, value_enum, value_name = "RECOVERY")]
        loss_recovery: Option<bench::LossRecovery>,
        /// The service's `replica_budget_bytes` in the iperf, httperf and pgbench
        /// experiments (default: the data plane's own, 4 MiB).
        #[arg(long, value_name = "BYTES")]
        replica_budget: Option<u64>,
        /// Spill replicas beyond their budget to disk (a directory of the run), at most
        /// BYTES per replica and session, in the iperf, httperf, pgbench and relay experiments
        /// (default: no spilling).
        #[arg(long, value_name = "BYTES")]
        spill_budget: Option<u64>,
        /// Relay experiment only: instead of the table, profile XDP mode with one replica
        /// during one unthrottled iperf3 -P 8 run (`perf record --call-graph dwarf` on the
        /// middlebox) and write bench-results/profile/NAME.folded, NAME.svg (flame graph,
        /// inferno) and NAME.txt (top self-time entries).
        #[arg(long, value_name = "NAME")]
        profile: Option<String>,
        /// How XDP mode's workers wait for frames in the relay experiments: the config's
        /// top-level `poll` (`sleep`: poll(2) with need-wakeup; `busy`: spin on the rings,
        /// a core per worker). Default: the data plane's own (sleep).
        #[arg(long, value_parser = ["sleep", "busy"])]
        poll: Option<String>,
    },
    /// The scale benchmark's sink, run by it inside a test-bed host: accepts connections
    /// on LISTEN, discards what they send, reports counters on stdout, exits when stdin
    /// closes.
    #[command(hide = true)]
    ScaleSink {
        /// Address to listen on.
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
}

#[derive(Subcommand, Debug)]
enum TestbedAction {
    /// Create the hosts, switches and links of a topology file (a second `up` is fine).
    Up {
        /// Topology file, e.g. testbed/paper.toml or testbed/tree.toml.
        #[arg(long, default_value = "testbed/paper.toml")]
        topology: PathBuf,
        /// Prefix of every name created.
        #[arg(long, default_value = DEFAULT_PREFIX)]
        prefix: String,
    },
    /// Remove everything a test bed with this prefix created, also after a crash.
    Down {
        /// Prefix given to `up`.
        #[arg(long, default_value = DEFAULT_PREFIX)]
        prefix: String,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().task {
        Task::Setup => setup::setup(),
        Task::Ci => ci::ci(),
        Task::Fuzz { targets, seconds } => fuzz::fuzz(&targets, seconds.max(1)),
        Task::Testbed { action } => testbed(action),
        Task::Demo { keep } => e2e::demo(keep),
        Task::DemoSteering { keep } => demo::demo(keep),
        Task::Faults { faults } => e2e::faults(&faults),
        Task::FaultWriter {
            target,
            seconds,
            interval_ms,
            per_session,
        } => e2e::writer_main(
            target,
            seconds,
            std::time::Duration::from_millis(interval_ms.max(1)),
            per_session,
        ),
        Task::Deploy { config, netns } => deploy::deploy(&config, netns.as_deref()),
        Task::ScaleSink { listen } => bench::scale_sink(listen),
        Task::Bench {
            experiments,
            repetitions,
            dataplane,
            quick,
            tcp_buffer,
            loss_recovery,
            replica_budget,
            spill_budget,
            profile,
            poll,
        } => {
            let options = bench::Options {
                repetitions: repetitions.max(1),
                dataplanes: dataplane,
                quick,
                tcp_buffer,
                loss_recovery,
                replica_budget,
                spill_budget,
                profile,
                poll,
                ..bench::Options::default()
            };
            bench::bench(
                if experiments.is_empty() {
                    <bench::Experiment as clap::ValueEnum>::value_variants()
                } else {
                    &experiments
                },
                &options,
            )
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn testbed(action: TestbedAction) -> anyhow::Result<()> {
    match action {
        TestbedAction::Up { topology, prefix } => {
            let topo = Topology::load(&topology)?;
            let bed = Testbed::up(&topo, &UpOptions::with_prefix(&prefix))?;
            for host in &topo.hosts {
                for iface in &host.interfaces {
                    println!(
                        "{:<12} {:<5} {:<16} {}  (netns {})",
                        host.name,
                        iface.name,
                        bed.address(&host.name, &iface.name)?,
                        ncp_testbed::Mac(bed.mac(&host.name, &iface.name)?),
                        bed.netns(&host.name)?
                    );
                }
            }
            println!(
                "test bed `{prefix}` is up; tear down with: cargo xtask testbed down --prefix {prefix}"
            );
            Ok(())
        }
        TestbedAction::Down { prefix } => {
            let report = Testbed::down(&prefix)?;
            if report.is_empty() {
                println!("test bed `{prefix}`: nothing to remove");
            } else {
                println!(
                    "test bed `{prefix}` removed: {} namespaces, {} bridges, {} links, {} processes ended{}",
                    report.namespaces.len(),
                    report.bridges.len(),
                    report.links.len(),
                    report.killed.len(),
                    if report.ovs_stopped {
                        "; Open vSwitch stopped (the test bed had started it)"
                    } else {
                        ""
                    }
                );
            }
            Ok(())
        }
    }
}
