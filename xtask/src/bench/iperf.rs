//! Paper Fig. 6: iperf3 throughput per parallel-stream count in four modes — direct;
//! through the middlebox without replication; with one replica on the shared NIC; with
//! one replica on the dedicated replication NIC — with every link limited to 1 Gbit/s by
//! tc (the paper's regime) and unlimited. Reported as throughput and slowdown versus
//! direct, measured in the same round.

use std::{collections::BTreeMap, fmt::Write as _, path::Path, time::Duration};

use anyhow::Context as _;
use ncp_testbed::{Mac, Testbed};

use super::{Options, median, save_json};
use crate::{cmd::step, middlebox::Middlebox};

const PORT: u16 = 5201;
const HOSTS: [&str; 4] = ["source", "primary", "replica", "middlebox"];

/// How the source reaches the primary in one measurement.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Route {
    Direct,
    /// Through the middlebox (`dataplane` = `xdp` or `sockets`).
    Middlebox {
        dataplane: String,
        replication: Replication,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Replication {
    None,
    SharedNic,
    DedicatedNic,
}

impl Route {
    fn label(&self) -> String {
        match self {
            Route::Direct => "direct".into(),
            Route::Middlebox {
                dataplane,
                replication,
            } => format!(
                "{dataplane}: {}",
                match replication {
                    Replication::None => "no replication",
                    Replication::SharedNic => "replica, shared NIC",
                    Replication::DedicatedNic => "replica, dedicated NIC",
                }
            ),
        }
    }
}

pub fn iperf(bed: &Testbed, bins: &Path, options: &Options) -> anyhow::Result<String> {
    let streams: &[u32] = if options.quick {
        &[1, 8, 32]
    } else {
        &[1, 2, 4, 8, 16, 32, 64]
    };
    let seconds = if options.quick { "2" } else { "4" };
    let source = bed.address("source", "eth0")?;
    let primary = bed.address("primary", "eth0")?;
    let primary_mac = Mac(bed.mac("primary", "eth0")?).to_string();
    let mb_mac = Mac(bed.mac("middlebox", "eth0")?).to_string();
    let mut paths = vec![Route::Direct];
    for dataplane in &options.dataplanes {
        for replication in [
            Replication::None,
            Replication::SharedNic,
            Replication::DedicatedNic,
        ] {
            paths.push(Route::Middlebox {
                dataplane: dataplane.clone(),
                replication,
            });
        }
    }

    // The primary runs a real iperf3 server; the replica a discard sink, so that what it
    // receives is exactly the client's stream and nothing it answers matters.
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
    std::thread::sleep(Duration::from_millis(500));

    // results[regime][path label][streams] = samples (bit/s)
    let mut results: BTreeMap<&str, BTreeMap<String, BTreeMap<u32, Vec<f64>>>> = BTreeMap::new();
    let outcome = (|| -> anyhow::Result<()> {
        for regime in ["1 Gbit/s", "unlimited"] {
            limit_links(bed, regime == "1 Gbit/s")?;
            for round in 0..options.repetitions {
                for path in &paths {
                    step(&format!("{regime}, round {}: {}", round + 1, path.label()));
                    let _mb = match path {
                        Route::Direct => {
                            steer(bed, primary, &primary_mac)?;
                            None
                        }
                        Route::Middlebox {
                            dataplane,
                            replication,
                        } => {
                            steer(bed, primary, &mb_mac)?;
                            Some(start_middlebox(
                                bed,
                                bins,
                                dataplane,
                                *replication,
                                source,
                                primary,
                            )?)
                        }
                    };
                    for &n in streams {
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
                        results
                            .entry(regime)
                            .or_default()
                            .entry(path.label())
                            .or_default()
                            .entry(n)
                            .or_default()
                            .push(bps);
                    }
                }
            }
        }
        Ok(())
    })();
    let _ = limit_links(bed, false);
    let _ = steer(bed, primary, &primary_mac);
    for mut server in servers {
        let _ = server.kill();
        let _ = server.wait();
    }
    outcome?;

    let mut md = String::from("## Throughput (paper Fig. 6): iperf3, one replica\n\n");
    let _ = writeln!(
        md,
        "Median of {} round(s) of {seconds} s per cell, Gbit/s; slowdown versus direct in the same regime.\n",
        options.repetitions
    );
    for (regime, by_path) in &results {
        let _ = writeln!(md, "### Links {regime}\n");
        let labels: Vec<String> = paths.iter().map(Route::label).collect();
        let _ = writeln!(md, "| streams | {} |", labels.join(" | "));
        let _ = writeln!(md, "|---|{}", "---|".repeat(labels.len()));
        for &n in streams {
            let direct = by_path
                .get("direct")
                .and_then(|m| m.get(&n))
                .map_or(0.0, |v| median(v));
            let cells: Vec<String> = labels
                .iter()
                .map(|label| {
                    let value = by_path
                        .get(label)
                        .and_then(|m| m.get(&n))
                        .map_or(0.0, |v| median(v));
                    if value == 0.0 {
                        "failed".to_owned()
                    } else if label == "direct" || direct == 0.0 {
                        format!("{:.3}", value / 1e9)
                    } else {
                        format!(
                            "{:.3} ({:+.1} %)",
                            value / 1e9,
                            (value / direct - 1.0) * 100.0
                        )
                    }
                })
                .collect();
            let _ = writeln!(md, "| {n} | {} |", cells.join(" | "));
        }
        md.push('\n');
    }
    save_json("iperf", &serde_json::to_value(&results)?)?;
    eprint!("{md}");
    Ok(md)
}

/// Sends the source's frames for the primary to `mac` (the primary's own, or the
/// middlebox's: what the controller's redirect rule does on a real switch).
fn steer(bed: &Testbed, primary: std::net::Ipv4Addr, mac: &str) -> anyhow::Result<()> {
    bed.exec(
        "source",
        &[
            "ip",
            "neigh",
            "replace",
            &primary.to_string(),
            "lladdr",
            mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    )?;
    Ok(())
}

/// Puts (or removes) a 1 Gbit/s token bucket on every host interface.
fn limit_links(bed: &Testbed, limited: bool) -> anyhow::Result<()> {
    for host in HOSTS {
        for iface in ["eth0", "eth1"] {
            if limited {
                bed.exec(
                    host,
                    &[
                        "tc", "qdisc", "replace", "dev", iface, "root", "tbf", "rate", "1gbit",
                        "burst", "512kb", "latency", "50ms",
                    ],
                )?;
            } else {
                let _ = bed
                    .command(host, &["tc", "qdisc", "del", "dev", iface, "root"])?
                    .output();
            }
        }
    }
    Ok(())
}

fn start_middlebox(
    bed: &Testbed,
    bins: &Path,
    dataplane: &str,
    replication: Replication,
    source: std::net::Ipv4Addr,
    primary: std::net::Ipv4Addr,
) -> anyhow::Result<Middlebox> {
    let mb0 = bed.address("middlebox", "eth0")?;
    let mb1 = bed.address("middlebox", "eth1")?;
    let (replicas, extra) = match replication {
        Replication::None => (String::new(), String::new()),
        Replication::SharedNic => (
            format!("\"{}:{PORT}\"", bed.address("replica", "eth0")?),
            String::new(),
        ),
        Replication::DedicatedNic => (
            format!("\"{}:{PORT}\"", bed.address("replica", "eth1")?),
            "replica_interface = \"eth1\"\n".to_owned(),
        ),
    };
    let socket = Path::new("/run/ncp-bench/iperf.sock");
    let config = format!(
        "control_socket = \"{}\"\n\
         [[interfaces]]\nname = \"eth0\"\naddress = \"{mb0}\"\nqueues = [{{ queue = 0, core = 1 }}]\n\
         [[interfaces]]\nname = \"eth1\"\naddress = \"{mb1}\"\nqueues = [{{ queue = 0, core = 1 }}]\n\
         [[services]]\nname = \"iperf\"\nprimary = \"{primary}:{PORT}\"\nclients = \"{source}/32\"\n\
         replicas = [{replicas}]\n{extra}",
        socket.display()
    );
    Middlebox::start_mode(bed, "middlebox", bins, &config, socket, dataplane)
}

fn run_iperf(
    bed: &Testbed,
    primary: std::net::Ipv4Addr,
    streams: u32,
    seconds: &str,
) -> anyhow::Result<f64> {
    let out = bed.exec(
        "source",
        &[
            "iperf3",
            "-c",
            &primary.to_string(),
            "-p",
            &PORT.to_string(),
            "-P",
            &streams.to_string(),
            "-t",
            seconds,
            "-J",
            "--connect-timeout",
            "5000",
        ],
    )?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 report without a throughput")
}
