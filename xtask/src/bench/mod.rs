//! `cargo xtask bench`: measurements, side by side in one run (this machine is shared and
//! noisy, so only ratios from the same run mean much). Results go to `bench-results/`
//! (JSON per experiment, SVG plots, the report as `report.md`) and the report to
//! `BENCHMARKS.md`. A run of only some experiments writes `BENCHMARKS.md.partial` and
//! `bench-results/partial/` instead, so it never replaces the full report with a part of
//! it.

mod consistency;
mod httperf;
mod iperf;
mod loss;
mod pgbench;
mod plot;
mod profile;
mod relay;
mod replica;
mod routes;
mod scale;
mod steering;

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

use clap::ValueEnum as _;
use ncp_testbed::{Testbed, Topology, UpOptions};

use crate::{cmd::step, middlebox, setup};

pub use scale::sink_main as scale_sink;

/// Results folder of a run of every experiment (committed with BENCHMARKS.md).
const RESULTS_DIR: &str = "bench-results";

/// XDP mode's per-connection TCP buffer when `[tcp]` does not set one (the data plane's
/// default), written out when a `[tcp]` table is needed for another setting.
const DEFAULT_TCP_BUFFER: u32 = 64 * 1024;

/// Test-bed prefix when `NCP_BENCH_PREFIX` is not set.
const DEFAULT_PREFIX: &str = "ncpb";

/// The test-bed prefix of this run: `NCP_BENCH_PREFIX` or `ncpb`. Bringing the bench's
/// test bed up first tears down whatever carries the prefix, so two people benchmarking on
/// one machine need different ones.
pub(crate) fn prefix() -> String {
    std::env::var("NCP_BENCH_PREFIX")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| DEFAULT_PREFIX.to_owned())
}

/// Scratch directory of this prefix's runs (control sockets, web root, database), kept
/// apart per prefix for the same reason as the test bed.
pub(crate) fn run_dir() -> PathBuf {
    PathBuf::from("/run/ncp-bench").join(prefix())
}

/// Which experiment to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Experiment {
    /// AF_XDP receive rate of a matching flow (packet generator), and the pass-through
    /// cost of steering on an unmatched iperf3 flow.
    Steering,
    /// Paper Fig. 6: iperf3 throughput per stream count, direct versus through the
    /// middlebox without and with replication (shared and dedicated NIC), at 1 Gbit/s
    /// (tc) and unlimited.
    Iperf,
    /// Paper Fig. 7: httperf connection lifetime, direct versus through the middlebox.
    Httperf,
    /// A database workload (the paper's RUBiS stand-in): pgbench tps and latency per mode.
    Pgbench,
    /// 1,000 and 10,000 concurrent sessions on one worker: memory per session, time to
    /// open them, and throughput with every one of them sending.
    Scale,
    /// iperf3 under random loss (nftables) at the primary's or the client's ingress,
    /// links at 200 Mbit/s: direct versus XDP mode with each loss recovery and sockets
    /// mode, and whether the replica kept up.
    Loss,
    /// The cost of reply verification and of spilling on XDP-mode throughput
    /// (redis-benchmark, 4 KiB values, links uncapped): verify off, verify replies, a
    /// replica stopped past its memory budget with and without spilling.
    Consistency,
    /// What relaying costs the whole machine, without Open vSwitch in the path: iperf3
    /// -P 1, 8 and 32 (5 s each), unthrottled and paced to 500 Mbit/s, direct versus each
    /// data plane with one replica, on a switchless bed (in-kernel bridge for source,
    /// primary and middlebox; a plain veth to the replica; 198.19.20.0/24 and
    /// 198.19.21.0/24 in the bench's namespaces). Reports Gbit/s, busy CPU of all cores
    /// (/proc/stat) per Gbit relayed, the middlebox's share (minus direct's) and whether
    /// the replica stayed attached.
    Relay,
}

/// Who repairs lost segments of XDP mode's TCP connections: the config's
/// `[tcp] loss_recovery`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LossRecovery {
    /// NCP's own recovery layer under smoltcp (the data plane's default).
    Ncp,
    /// smoltcp's own retransmission alone.
    Smoltcp,
}

impl LossRecovery {
    /// The value as the middlebox config spells it.
    pub fn config_value(self) -> &'static str {
        match self {
            LossRecovery::Ncp => "ncp",
            LossRecovery::Smoltcp => "smoltcp",
        }
    }
}

/// Options common to all experiments.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Rounds per measurement.
    pub repetitions: u32,
    /// Middlebox implementations to measure (`xdp`, `sockets`).
    pub dataplanes: Vec<String>,
    /// Fewer stream counts and shorter runs.
    pub quick: bool,
    /// `[tcp] buffer_bytes` of the middlebox in the relay experiments (None: its default).
    pub tcp_buffer: Option<u32>,
    /// `[tcp] loss_recovery` of XDP mode in the relay experiments (None: its default).
    pub loss_recovery: Option<LossRecovery>,
    /// The service's `replica_budget_bytes` in the relay experiments (None: its default).
    pub replica_budget: Option<u64>,
    /// The service's `spill_budget_bytes` in the relay experiments, spilling to a
    /// directory of the run (None: no spilling).
    pub spill_budget: Option<u64>,
    /// Profile XDP mode instead of measuring (relay experiment only): one -P 8 run under
    /// `perf record`, written as `bench-results/profile/<name>.{folded,svg,txt}`.
    pub profile: Option<String>,
    /// The middlebox's top-level `poll` in the relay experiments (None: its default).
    pub poll: Option<String>,
    /// Where JSON, plots and the report go: `bench-results/` for a run of every
    /// experiment, `bench-results/partial/` for a run of some. Set by [`bench`] from the
    /// experiments it runs.
    pub results_dir: PathBuf,
}

impl Options {
    /// Middlebox settings of the relay experiments (iperf, httperf, pgbench, relay).
    pub fn relay_tuning(&self) -> routes::Tuning {
        self.relay_tuning_with(self.loss_recovery)
    }

    /// [`Options::relay_tuning`] with `loss_recovery` in place of the option's, for an
    /// experiment that compares recoveries. Both settings share one `[tcp]` table: TOML
    /// rejects a table defined twice.
    pub fn relay_tuning_with(&self, loss_recovery: Option<LossRecovery>) -> routes::Tuning {
        let mut service = String::new();
        if let Some(bytes) = self.replica_budget {
            let _ = writeln!(service, "replica_budget_bytes = {bytes}");
        }
        if let Some(bytes) = self.spill_budget {
            let dir = run_dir().join("spill");
            let _ = writeln!(
                service,
                "spill_dir = \"{}\"\nspill_budget_bytes = {bytes}",
                dir.display()
            );
        }
        let top = self
            .poll
            .as_ref()
            .map_or(String::new(), |p| format!("poll = \"{p}\"\n"));
        if self.tcp_buffer.is_none() && loss_recovery.is_none() {
            return routes::Tuning {
                service,
                top,
                ..routes::Tuning::default()
            };
        }
        // A `[tcp]` table written here spells out the buffer size even when it is the
        // data plane's default, so a results file shows what was measured. smoltcp's own
        // congestion control is named only where it runs: without the recovery layer.
        let mut tcp = format!(
            "[tcp]\nbuffer_bytes = {}\n",
            self.tcp_buffer.unwrap_or(DEFAULT_TCP_BUFFER)
        );
        if let Some(recovery) = loss_recovery {
            if recovery == LossRecovery::Smoltcp {
                tcp.push_str("congestion_control = \"cubic\"\n");
            }
            let _ = writeln!(tcp, "loss_recovery = \"{}\"", recovery.config_value());
        }
        routes::Tuning {
            ports: None,
            top,
            tables: tcp,
            service,
        }
    }
}

/// Runs the chosen experiments on one test bed and writes BENCHMARKS.md.
pub fn bench(experiments: &[Experiment], options: &Options) -> anyhow::Result<()> {
    // A run of some experiments keeps its files apart, so the committed results of the
    // last full run (which BENCHMARKS.md shows) stay as they were.
    let options = &Options {
        results_dir: if is_complete(experiments) {
            PathBuf::from(RESULTS_DIR)
        } else {
            Path::new(RESULTS_DIR).join("partial")
        },
        ..options.clone()
    };
    std::fs::create_dir_all(&options.results_dir)
        .with_context(|| format!("creating {}", options.results_dir.display()))?;
    setup::setup()?;
    let bins = middlebox::build_release(&["ncp-dataplane"])?;
    let topology = Topology::load("testbed/paper.toml")?;
    let prefix = prefix();
    let _ = Testbed::down(&prefix);
    step(&format!(
        "bringing up the paper test bed for benchmarks (prefix `{prefix}`)"
    ));
    let bed = Testbed::up(&topology, &UpOptions::with_prefix(&prefix))?;
    let mut report = String::new();
    let mut result = Ok(());
    for experiment in experiments {
        let section = match experiment {
            Experiment::Steering => steering::steering(&bed, &bins, options),
            Experiment::Iperf => iperf::iperf(&bed, &bins, options),
            Experiment::Httperf => httperf::httperf(&bed, &bins, options),
            Experiment::Pgbench => pgbench::pgbench(&bed, &bins, options),
            Experiment::Scale => scale::scale(&bed, &bins, options),
            Experiment::Loss => loss::loss(&bed, &bins, options),
            Experiment::Consistency => consistency::consistency(&bed, &bins, options),
            Experiment::Relay => relay::relay(&bed, &bins, options),
        };
        match section {
            Ok(markdown) => report.push_str(&markdown),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    step("tearing down");
    Testbed::down(&prefix)?;
    result?;
    write_benchmarks_md(experiments, options, &report)
}

fn write_benchmarks_md(
    experiments: &[Experiment],
    options: &Options,
    body: &str,
) -> anyhow::Result<()> {
    let mut doc = String::from("# NCP benchmarks\n\n");
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let names: Vec<String> = experiments
        .iter()
        .map(|e| format!("{e:?}").to_lowercase())
        .collect();
    let _ = writeln!(
        doc,
        "Produced by one run of `cargo xtask bench {} --repetitions {}{}{}{}{}` on {cores} cores ({cpu}), \
         Linux {}, hosts in network namespaces joined by Open vSwitch (userspace datapath) bridges. \
         The machine is shared and noisy: compare the numbers within a table (measured side by \
         side, alternating), not across runs.\n",
        names.join(" "),
        options.repetitions,
        if options.quick { " --quick" } else { "" },
        if options.dataplanes.is_empty() {
            String::new()
        } else {
            format!(" --dataplane {}", options.dataplanes.join(","))
        },
        options
            .tcp_buffer
            .map_or(String::new(), |bytes| format!(" --tcp-buffer {bytes}")),
        options.loss_recovery.map_or(String::new(), |r| format!(
            " --loss-recovery {}",
            r.config_value()
        )),
        kernel.trim()
    );
    doc.push_str(body);
    // BENCHMARKS.md is the report of one run of every experiment; a run of some of them
    // would otherwise drop the others' sections.
    let complete = is_complete(experiments);
    let path = if complete {
        "BENCHMARKS.md"
    } else {
        "BENCHMARKS.md.partial"
    };
    // The report links its plots relative to the repository root; the copy in the results
    // folder sits next to them.
    let copy = options.results_dir.join("report.md");
    std::fs::write(
        &copy,
        doc.replace(&format!("]({}/", options.results_dir.display()), "](./"),
    )
    .with_context(|| format!("writing {}", copy.display()))?;
    std::fs::write(path, doc)?;
    if complete {
        eprintln!("    wrote {path}");
    } else {
        eprintln!("    wrote {path} (not every experiment ran, so BENCHMARKS.md stays as it was)");
    }
    Ok(())
}

/// The range of several samples as ` [lowest–highest]`, each shown with `show` (empty for
/// fewer than two: a single round has no spread).
pub(crate) fn spread(values: &[f64], show: impl Fn(f64) -> String) -> String {
    if values.len() < 2 {
        return String::new();
    }
    let low = values.iter().copied().fold(f64::INFINITY, f64::min);
    let high = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!(" [{}–{}]", show(low), show(high))
}

/// Median of a sample (0 for none).
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Appends a Markdown table: one row per entry of `rows`, one column per route label, each
/// cell the median of its samples shown with `show`, for routes other than direct the
/// change versus direct in the same row, and with several samples their range (the
/// spread over repetitions). A median of 0 is a failed measurement.
pub(crate) fn versus_direct_table(
    md: &mut String,
    row_name: &str,
    rows: &[u32],
    labels: &[String],
    samples: &std::collections::BTreeMap<String, std::collections::BTreeMap<u32, Vec<f64>>>,
    show: impl Fn(f64) -> String,
) {
    let cell = |label: &str, row: u32| {
        samples
            .get(label)
            .and_then(|m| m.get(&row))
            .map_or(0.0, |v| median(v))
    };
    let spread = |label: &str, row: u32| {
        samples
            .get(label)
            .and_then(|m| m.get(&row))
            .map_or(String::new(), |values| spread(values, &show))
    };
    let _ = writeln!(md, "| {row_name} | {} |", labels.join(" | "));
    let _ = writeln!(md, "|---|{}", "---|".repeat(labels.len()));
    for &row in rows {
        let direct = cell("direct", row);
        let cells: Vec<String> = labels
            .iter()
            .map(|label| {
                let value = cell(label, row);
                let range = spread(label, row);
                if value == 0.0 {
                    "failed".to_owned()
                } else if label == "direct" || direct == 0.0 {
                    format!("{}{range}", show(value))
                } else {
                    format!(
                        "{} ({:+.1} %){range}",
                        show(value),
                        (value / direct - 1.0) * 100.0
                    )
                }
            })
            .collect();
        let _ = writeln!(md, "| {row} | {} |", cells.join(" | "));
    }
    md.push('\n');
}

/// Samples by route label and row (stream or connection count).
pub(crate) type ByRoute<T> =
    std::collections::BTreeMap<String, std::collections::BTreeMap<u32, Vec<T>>>;

/// Samples by link regime, route label and row.
pub(crate) type Cells<T> = std::collections::BTreeMap<&'static str, ByRoute<T>>;

/// Adds a sample to its cell of `into`.
pub(crate) fn add_sample<T>(
    into: &mut Cells<T>,
    regime: &'static str,
    route: String,
    row: u32,
    value: T,
) {
    into.entry(regime)
        .or_default()
        .entry(route)
        .or_default()
        .entry(row)
        .or_default()
        .push(value);
}

/// Samples by route and row as JSON (`{route: {row: [sample, ...]}}`), each sample as
/// `to_json` writes it.
pub(crate) fn by_route_json<T>(
    by_route: &ByRoute<T>,
    to_json: impl Fn(&T) -> serde_json::Value,
) -> serde_json::Value {
    by_route
        .iter()
        .map(|(label, rows)| {
            let rows: serde_json::Map<String, serde_json::Value> = rows
                .iter()
                .map(|(row, samples)| (row.to_string(), samples.iter().map(&to_json).collect()))
                .collect();
            (label.clone(), serde_json::Value::from(rows))
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Writes one experiment's JSON next to the others.
pub(crate) fn save_json(
    options: &Options,
    name: &str,
    value: &serde_json::Value,
) -> anyhow::Result<()> {
    let path = options.results_dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("    wrote {}", path.display());
    Ok(())
}

/// Writes a plot into the results folder and returns the Markdown that shows it (paths
/// relative to the repository root, where BENCHMARKS.md lives).
pub(crate) fn save_svg(
    options: &Options,
    name: &str,
    alt: &str,
    svg: &str,
) -> anyhow::Result<String> {
    let path = options.results_dir.join(format!("{name}.svg"));
    std::fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("    wrote {}", path.display());
    Ok(format!("![{alt}]({})\n\n", path.display()))
}

/// What a [`save_versus_direct_plot`] draws and where it goes.
pub(crate) struct LinePlot {
    /// File name without `.svg`.
    pub name: String,
    pub title: String,
    pub x_label: &'static str,
    pub y_label: &'static str,
    /// Factor from the samples' unit to the plotted one (bit/s → Gbit/s: 1e-9).
    pub scale: f64,
}

/// Plots the medians of a [`versus_direct_table`]'s samples as a line chart (one line
/// per route, x the rows; a failed median of 0 leaves a gap), saves it and returns the
/// Markdown that shows it.
pub(crate) fn save_versus_direct_plot(
    options: &Options,
    plot: &LinePlot,
    rows: &[u32],
    labels: &[String],
    samples: &std::collections::BTreeMap<String, std::collections::BTreeMap<u32, Vec<f64>>>,
) -> anyhow::Result<String> {
    let xs: Vec<String> = rows.iter().map(u32::to_string).collect();
    let series: Vec<self::plot::Series> = labels
        .iter()
        .map(|label| self::plot::Series {
            label: label.clone(),
            values: rows
                .iter()
                .map(|row| {
                    let m = samples
                        .get(label)
                        .and_then(|m| m.get(row))
                        .map_or(0.0, |v| median(v));
                    (m > 0.0).then_some(m * plot.scale)
                })
                .collect(),
        })
        .collect();
    let svg = self::plot::line_chart(&plot.title, plot.x_label, plot.y_label, &xs, &series);
    save_svg(options, &plot.name, &plot.title, &svg)
}

fn is_complete(experiments: &[Experiment]) -> bool {
    Experiment::value_variants()
        .iter()
        .all(|e| experiments.contains(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_poll_mode_is_a_top_level_key_whatever_tables_follow() {
        for tcp_buffer in [None, Some(1 << 20)] {
            let options = Options {
                poll: Some("busy".into()),
                tcp_buffer,
                ..Options::default()
            };
            let t = options.relay_tuning();
            assert_eq!(t.top, "poll = \"busy\"\n");
            // Written before the first table header, so TOML reads it at the top level.
            assert!(!t.top.contains('['), "{t:?}");
        }
        assert_eq!(Options::default().relay_tuning().top, "");
    }
}
