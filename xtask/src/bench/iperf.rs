//! Paper Fig. 6: iperf3 throughput per parallel-stream count in four modes — direct;
//! through the middlebox without replication; with one replica on the shared NIC; with
//! one replica on the dedicated replication NIC — with every link limited by tc to
//! 200 Mbit/s (the paper's regime: links, not CPUs, the limit), to 1 Gbit/s (the paper's
//! nominal rate, above what this test bed's switch carries) and unlimited. Reported as
//! throughput and slowdown versus direct, measured in the same round.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::Path,
    time::Duration,
};

use anyhow::Context as _;
use ncp_testbed::Testbed;

use super::{
    Options, median,
    routes::{self, Replication, Route},
    save_json,
};
use crate::cmd::step;

pub(super) const PORT: u16 = 5201;

/// What the replica got over a path's runs, in the log: a replicated figure counts only
/// if the replica stayed attached (spilling shows how often it fell behind its memory).
fn log_replica(mb: &crate::middlebox::Middlebox) {
    let Ok(r) = super::replica::replica_counters(mb) else {
        return;
    };
    eprintln!(
        "      replica: {} of {} bytes, spilled {} replayed {}, detaches {}",
        r.replica_bytes, r.primary_bytes, r.spilled_bytes, r.replayed_bytes, r.detaches
    );
}

pub fn iperf(bed: &Testbed, bins: &Path, options: &Options) -> anyhow::Result<String> {
    let streams: &[u32] = if options.quick {
        &[1, 8, 32]
    } else {
        &[1, 2, 4, 8, 16, 32, 64]
    };
    let seconds = if options.quick { "2" } else { "4" };
    let primary = bed.address("primary", "eth0")?;
    let paths = Route::all(
        &options.dataplanes,
        &[
            Replication::None,
            Replication::SharedNic,
            Replication::DedicatedNic,
        ],
    );

    let servers = start_servers(bed)?;

    // Samples in bit/s, and in bit/s per busy middlebox core.
    let mut results = Samples::new();
    let mut per_core = Samples::new();
    // Cells in which the middlebox detached the replica in some round.
    let mut detached: BTreeMap<&'static str, BTreeSet<(String, u32)>> = BTreeMap::new();
    let outcome = (|| -> anyhow::Result<()> {
        for (regime, cap) in routes::REGIMES {
            routes::limit_links(bed, cap)?;
            for round in 0..options.repetitions {
                for path in &paths {
                    step(&format!("{regime}, round {}: {}", round + 1, path.label()));
                    let mb = path.enter(bed, bins, PORT, &options.relay_tuning())?;
                    for &n in streams {
                        let cpu_before = mb.as_ref().and_then(|m| m.cpu_seconds());
                        let replica_before = replica_detaches(mb.as_ref());
                        let started = std::time::Instant::now();
                        // A failed run is recorded as 0 and reported, not fatal: one bad
                        // cell should not throw away the rest of a long benchmark.
                        let bps = match run_iperf(bed, primary, n, seconds) {
                            Ok(bps) => bps,
                            Err(e) => {
                                eprintln!("      -P {n:<2} failed: {e:#}");
                                0.0
                            }
                        };
                        eprintln!("      -P {n:<2} {:.3} Gbit/s", bps / 1e9);
                        // Throughput per middlebox core: what one core of relaying carries.
                        if let (Some(before), Some(after)) =
                            (cpu_before, mb.as_ref().and_then(|m| m.cpu_seconds()))
                        {
                            let cores = (after - before) / started.elapsed().as_secs_f64();
                            if cores > 0.0 && bps > 0.0 {
                                super::add_sample(
                                    &mut per_core,
                                    regime,
                                    path.label(),
                                    n,
                                    bps / cores,
                                );
                            }
                        }
                        super::add_sample(&mut results, regime, path.label(), n, bps);
                        if let (Some(before), Some(after)) =
                            (replica_before, replica_detaches(mb.as_ref()))
                            && after > before
                        {
                            detached
                                .entry(regime)
                                .or_default()
                                .insert((path.label(), n));
                        }
                    }
                    if let Some(mb) = &mb {
                        log_replica(mb);
                    }
                }
            }
        }
        Ok(())
    })();
    let _ = routes::limit_links(bed, None);
    let _ = routes::leave(bed);
    stop_servers(servers);
    outcome?;

    let mut md = String::from("## Throughput (paper Fig. 6): iperf3, one replica\n\n");
    let _ = writeln!(
        md,
        "Median of {} round(s) of {seconds} s per cell, Gbit/s; slowdown versus direct in the same regime; with several rounds, [lowest–highest] round.\n",
        options.repetitions
    );
    for (regime, _) in routes::REGIMES {
        let Some(by_path) = results.get(regime) else {
            continue;
        };
        let why = if regime == routes::REGIMES[0].0 {
            " (the paper's regime: the links, not the CPUs or the switch, are the limit)"
        } else {
            ""
        };
        let _ = writeln!(md, "### Links {regime}{why}\n");
        let labels: Vec<String> = paths.iter().map(Route::label).collect();
        super::versus_direct_table(&mut md, "streams", streams, &labels, by_path, |bps| {
            format!("{:.3}", bps / 1e9)
        });
        if let Some(cells) = detached.get(regime) {
            let cells: Vec<String> = cells
                .iter()
                .map(|(label, n)| format!("{label} at {n} stream(s)"))
                .collect();
            let _ = writeln!(
                md,
                "Replica **detached** (it fell more than its budget behind, so these figures \
                 are not fully replicated ones) in some round of: {}.\n",
                cells.join("; ")
            );
        }
        let plot = streams_plot(
            format!("iperf-{}", file_name(regime)),
            format!("iperf3 throughput, links {regime}"),
            "Gbit/s",
        );
        md.push_str(&super::save_versus_direct_plot(
            options, &plot, streams, &labels, by_path,
        )?);
    }
    let _ = writeln!(
        md,
        "### Relay throughput per middlebox core\n\nGbit/s carried per CPU-second of the middlebox process (all its threads). \
         **Caveat:** this misses the kernel's softirq time (sockets mode's TCP receive and \
         send work, and the veth receive path of both modes) whenever it runs outside the \
         middlebox process, which flatters sockets mode, and it runs over the software \
         switch; `cargo xtask bench relay` counts the whole machine and the bench's own \
         tasks on a switchless bed instead.\n"
    );
    let relay_labels: Vec<String> = paths
        .iter()
        .filter(|p| !matches!(p, Route::Direct))
        .map(Route::label)
        .collect();
    for (regime, _) in routes::REGIMES {
        let Some(by_path) = per_core.get(regime) else {
            continue;
        };
        let _ = writeln!(md, "Links {regime}:\n");
        let _ = writeln!(md, "| streams | {} |", relay_labels.join(" | "));
        let _ = writeln!(md, "|---|{}", "---|".repeat(relay_labels.len()));
        for &n in streams {
            let cells: Vec<String> = relay_labels
                .iter()
                .map(|label| {
                    let v = by_path
                        .get(label)
                        .and_then(|m| m.get(&n))
                        .map_or(0.0, |v| median(v));
                    if v == 0.0 {
                        "—".to_owned()
                    } else {
                        format!("{:.2}", v / 1e9)
                    }
                })
                .collect();
            let _ = writeln!(md, "| {n} | {} |", cells.join(" | "));
        }
        md.push('\n');
        let plot = streams_plot(
            format!("iperf-per-core-{}", file_name(regime)),
            format!("relay throughput per middlebox core, links {regime}"),
            "Gbit/s per CPU-second",
        );
        md.push_str(&super::save_versus_direct_plot(
            options,
            &plot,
            streams,
            &relay_labels,
            by_path,
        )?);
    }
    save_json(
        options,
        "iperf",
        &serde_json::json!({ "throughput_bps": results, "bps_per_middlebox_core": per_core }),
    )?;
    eprint!("{md}");
    Ok(md)
}

/// Sessions the replica was detached from so far, for a route with a replica.
fn replica_detaches(mb: Option<&crate::middlebox::Middlebox>) -> Option<u64> {
    super::replica::replica_counters(mb?)
        .ok()
        .map(|r| r.detaches)
}

/// Samples by link regime, path label and parallel streams.
type Samples = super::Cells<f64>;

/// A plot of samples in bit/s, shown in Gbit/s, against the parallel streams of a run.
fn streams_plot(name: String, title: String, y_label: &'static str) -> super::LinePlot {
    super::LinePlot {
        name,
        title,
        x_label: "parallel streams (-P)",
        y_label,
        scale: 1e-9,
    }
}

/// Starts a real iperf3 server on the primary and a discard sink on the replica, so that
/// what the replica receives is exactly the client's stream and nothing it answers
/// matters.
pub(super) fn start_servers(bed: &Testbed) -> anyhow::Result<Vec<std::process::Child>> {
    let servers = vec![
        bed.spawn("primary", &["iperf3", "-s", "-p", &PORT.to_string()])?,
        bed.spawn(
            "replica",
            &[
                "socat",
                "-u",
                &format!("TCP-LISTEN:{PORT},fork,reuseaddr,backlog=256"),
                "OPEN:/dev/null",
            ],
        )?,
    ];
    for host in ["primary", "replica"] {
        bed.wait_listening(host, PORT, Duration::from_secs(20))?;
    }
    Ok(servers)
}

pub(super) fn stop_servers(servers: Vec<std::process::Child>) {
    for mut server in servers {
        let _ = server.kill();
        let _ = server.wait();
    }
}

/// Runs an iperf3 client on the source against the primary; its received throughput in
/// bit/s.
pub(super) fn run_iperf(
    bed: &Testbed,
    primary: std::net::Ipv4Addr,
    streams: u32,
    seconds: &str,
) -> anyhow::Result<f64> {
    run_iperf_paced(bed, primary, streams, seconds, None).map(|run| run.bps)
}

/// What the primary received in one iperf3 run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct IperfRun {
    /// Received throughput, bit/s.
    pub bps: f64,
    /// Bytes received.
    pub bytes: u64,
}

/// [`run_iperf`] with every stream paced to `stream_bps` bit/s (iperf3's `-b`, which
/// applies per stream), or unpaced (None); also returns the bytes received.
pub(super) fn run_iperf_paced(
    bed: &Testbed,
    primary: std::net::Ipv4Addr,
    streams: u32,
    seconds: &str,
    stream_bps: Option<u64>,
) -> anyhow::Result<IperfRun> {
    let primary = primary.to_string();
    let port = PORT.to_string();
    let streams = streams.to_string();
    let rate = stream_bps.map(|bps| bps.to_string());
    let mut argv = vec![
        "iperf3",
        "-c",
        &primary,
        "-p",
        &port,
        "-P",
        &streams,
        "-t",
        seconds,
        "-J",
        "--connect-timeout",
        "5000",
    ];
    if let Some(rate) = &rate {
        argv.extend(["-b", rate]);
    }
    let out = bed.exec("source", &argv)?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    let received = &report["end"]["sum_received"];
    Ok(IperfRun {
        bps: received["bits_per_second"]
            .as_f64()
            .with_context(|| format!("iperf3 report without a throughput: {}", report["error"]))?,
        bytes: received["bytes"]
            .as_u64()
            .context("iperf3 report without a byte count")?,
    })
}

/// A regime's name as a file-name part ("1 Gbit/s" → "1gbit", "unlimited").
fn file_name(regime: &str) -> String {
    regime
        .to_lowercase()
        .replace("/s", "")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect()
}
