//! Experiment 3 (the paper ran RUBiS on MySQL): a database workload per mode — pgbench
//! against PostgreSQL on the primary, directly and through the middlebox without and with
//! a replica (a second cluster on the replica host, over the replication NIC); throughput
//! (transactions per second) and average latency.

use std::{collections::BTreeMap, fmt::Write as _, path::Path, time::Duration};

use anyhow::Context as _;
use ncp_testbed::{
    Testbed,
    servers::{PG_BIN, Postgres},
};

use super::{
    Options, median,
    routes::{self, Replication, Route},
    save_json,
};

const PORT: u16 = 5432;

pub fn pgbench(bed: &Testbed, bins: &Path, options: &Options) -> anyhow::Result<String> {
    let seconds = if options.quick { "5" } else { "15" };
    let clients = "4";
    let data = super::run_dir().join("pg");
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data)?;
    let mut servers = Vec::new();
    for host in ["primary", "replica"] {
        let (_, child) = Postgres::start(bed, host, PORT, &data)?;
        servers.push(child);
    }
    let primary = bed.address("primary", "eth0")?;
    let routes = Route::all(
        &options.dataplanes,
        &[Replication::None, Replication::DedicatedNic],
    );
    // results[regime][route] = [(tps, latency ms)]
    let mut results: BTreeMap<&str, BTreeMap<String, Vec<Run>>> = BTreeMap::new();
    let outcome = routes::for_each_cell(
        bed,
        bins,
        "pgbench",
        (&REGIMES, &routes, options.repetitions),
        PORT,
        &options.relay_tuning(),
        |regime, route| {
            // Every route starts from the same freshly initialised tables.
            run(bed, primary, &["-i", "-s", "2", "-q"])?;
            let out = run(
                bed,
                primary,
                &["-c", clients, "-j", "2", "-T", seconds, "--random-seed=7"],
            )?;
            let (tps, latency) = parse(&out).context("pgbench printed no tps/latency")?;
            eprintln!("      {tps:.1} tps, {latency:.2} ms average latency");
            results
                .entry(regime)
                .or_default()
                .entry(route.label())
                .or_default()
                .push((tps, latency));
            Ok(())
        },
    );
    for mut server in servers {
        // Postgres shuts down on SIGTERM within half a second here.
        crate::cmd::stop_child(&mut server, Duration::from_millis(500));
    }
    let _ = std::fs::remove_dir_all(&data);
    let replicas = outcome?;

    let mut md = String::from("## Database workload (instead of the paper's RUBiS): pgbench\n\n");
    let _ = writeln!(
        md,
        "PostgreSQL 15 on the primary (and a second cluster on the replica host, reached over \
         the replication NIC); `pgbench -c {clients} -j 2 -T {seconds}` (TPC-B-like), scale 2; \
         median over {} round(s); links capped at 200 Mbit/s (the paper's regime) and uncapped.\n",
        options.repetitions
    );
    let mut json = serde_json::Map::new();
    for (regime, _) in REGIMES {
        let Some(by_route) = results.get(regime) else {
            continue;
        };
        let _ = writeln!(md, "### Links {regime}\n");
        let _ = writeln!(md, "| route | tps | versus direct | average latency (ms) |");
        let _ = writeln!(md, "|---|---|---|---|");
        let direct = by_route
            .get("direct")
            .map_or(0.0, |v| median(&v.iter().map(|r| r.0).collect::<Vec<_>>()));
        // Median tps per route, for the table and the plot.
        let mut bars: Vec<(String, f64)> = Vec::new();
        for route in &routes {
            let label = route.label();
            let samples = by_route.get(&label).cloned().unwrap_or_default();
            let tps_samples: Vec<f64> = samples.iter().map(|r| r.0).collect();
            let tps = median(&tps_samples);
            let range = super::spread(&tps_samples, |v| format!("{v:.1}"));
            let latency = median(&samples.iter().map(|r| r.1).collect::<Vec<_>>());
            let versus = if direct > 0.0 && label != "direct" {
                format!("{:+.1} %", (tps / direct - 1.0) * 100.0)
            } else {
                "—".into()
            };
            let _ = writeln!(
                md,
                "| {label} | {tps:.1}{range} | {versus} | {latency:.2} |"
            );
            bars.push((label, tps));
        }
        md.push('\n');
        md.push_str(&routes::replica_line(&replicas, regime));
        let runs: BTreeMap<&String, Vec<serde_json::Value>> = by_route
            .iter()
            .map(|(k, v)| {
                (
                    k,
                    v.iter()
                        .map(|(t, l)| serde_json::json!({"tps": t, "latency_ms": l}))
                        .collect(),
                )
            })
            .collect();
        json.insert(regime.to_owned(), serde_json::to_value(runs)?);
        let name = if regime == "unlimited" {
            "pgbench-unlimited"
        } else {
            "pgbench"
        };
        let title = format!("pgbench: transactions per second, links {regime}");
        md.push_str(&super::save_svg(
            options,
            name,
            &title,
            &super::plot::bar_chart(&title, "tps", &bars),
        )?);
    }
    json.insert("replica".to_owned(), routes::replica_json(&replicas));
    save_json(options, "pgbench", &serde_json::Value::Object(json))?;
    eprint!("{md}");
    Ok(md)
}

/// One run: (tps, average latency in ms).
type Run = (f64, f64);

/// The links regimes of this experiment: the paper's and uncapped.
const REGIMES: [routes::Regime; 2] = routes::PAPER_AND_UNCAPPED;

fn run(bed: &Testbed, primary: std::net::Ipv4Addr, args: &[&str]) -> anyhow::Result<String> {
    let pgbench = format!("{PG_BIN}/pgbench");
    let host = primary.to_string();
    let port = PORT.to_string();
    // No SSL/GSS negotiation: a replica would find the startup message already queued
    // behind the SSLRequest and refuse the connection (see dataplane/tests/postgres_xdp.rs).
    let mut argv: Vec<&str> = vec!["env", "PGSSLMODE=disable", "PGGSSENCMODE=disable", &pgbench];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["-h", &host, "-p", &port, "-U", "postgres", "postgres"]);
    let out = bed.exec("source", &argv)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// (tps, average latency in ms) from pgbench's report.
fn parse(report: &str) -> Option<(f64, f64)> {
    let number = |prefix: &str| {
        report
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split('=').nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    Some((number("tps")?, number("latency average")?))
}
