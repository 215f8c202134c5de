//! Paper Fig. 7: average connection lifetime of short HTTP connections (one request per
//! connection) against a web server on the primary, direct versus through the middlebox,
//! with the paper's workload: a working set of five files of 1, 10, 30, 50 and 70 KB
//! (`--wset=5,0.2`), 20 new connections per second, 100 to 500 connections.

use std::{collections::BTreeMap, fmt::Write as _, path::Path, time::Duration};

use anyhow::Context as _;
use ncp_testbed::Testbed;

use super::{
    Options,
    routes::{self, Replication, Route},
    save_json,
};
use crate::cmd::step;

const PORT: u16 = 8080;
/// httperf's `--wset=5` asks for /0.html … /4.html.
const FILE_KB: [usize; 5] = [1, 10, 30, 50, 70];

pub fn httperf(bed: &Testbed, bins: &Path, options: &Options) -> anyhow::Result<String> {
    let connections: &[u32] = if options.quick {
        &[100]
    } else {
        &[100, 300, 500]
    };
    let web_root = super::run_dir().join("www");
    std::fs::create_dir_all(&web_root)?;
    for (i, kb) in FILE_KB.iter().enumerate() {
        std::fs::write(web_root.join(format!("{i}.html")), vec![b'x'; kb * 1024])?;
    }
    let web_root = web_root.to_str().context("non-UTF-8 web root")?;
    // Namespaces share the file system, so one web root serves both servers.
    let mut servers = Vec::new();
    for host in ["primary", "replica"] {
        servers.push(bed.spawn(
            host,
            &[
                "python3",
                "-m",
                "http.server",
                &PORT.to_string(),
                "--directory",
                web_root,
            ],
        )?);
    }
    std::thread::sleep(Duration::from_secs(1));
    let routes = Route::all(
        &options.dataplanes,
        &[Replication::None, Replication::DedicatedNic],
    );
    let primary = bed.address("primary", "eth0")?;

    // lifetimes[route label][connections] = samples (ms)
    let mut lifetimes: BTreeMap<String, BTreeMap<u32, Vec<f64>>> = BTreeMap::new();
    let outcome = (|| -> anyhow::Result<()> {
        for round in 0..options.repetitions {
            for route in &routes {
                step(&format!("httperf round {}: {}", round + 1, route.label()));
                let _mb = route.enter(bed, bins, PORT, &options.relay_tuning())?;
                for &n in connections {
                    let ms = match run_httperf(bed, primary, n) {
                        Ok(ms) => ms,
                        Err(e) => {
                            eprintln!("      {n} connections failed: {e:#}");
                            0.0
                        }
                    };
                    eprintln!("      {n} connections: average lifetime {ms:.2} ms");
                    lifetimes
                        .entry(route.label())
                        .or_default()
                        .entry(n)
                        .or_default()
                        .push(ms);
                }
            }
        }
        Ok(())
    })();
    let _ = routes::leave(bed);
    for mut server in servers {
        let _ = server.kill();
        let _ = server.wait();
    }
    outcome?;

    let mut md = String::from(
        "## Connection lifetime (paper Fig. 7): httperf, one request per connection\n\n",
    );
    let _ = writeln!(
        md,
        "`--wset=5,0.2 --rate=20`, files of 1/10/30/50/70 KB served by Python's http.server on \
         the primary (and the replica); median over {} round(s) of the average connection \
         lifetime in ms, the increase versus direct, and with several rounds [lowest–highest].\n",
        options.repetitions
    );
    let labels: Vec<String> = routes.iter().map(Route::label).collect();
    super::versus_direct_table(
        &mut md,
        "connections",
        connections,
        &labels,
        &lifetimes,
        |ms| format!("{ms:.2}"),
    );
    save_json(options, "httperf", &serde_json::to_value(&lifetimes)?)?;
    let plot = super::LinePlot {
        name: "httperf".into(),
        title: "httperf: average connection lifetime".into(),
        x_label: "connections",
        y_label: "ms",
        scale: 1.0,
    };
    md.push_str(&super::save_versus_direct_plot(
        options,
        &plot,
        connections,
        &labels,
        &lifetimes,
    )?);
    eprint!("{md}");
    Ok(md)
}

/// Runs httperf from the source and returns the average connection lifetime in ms.
fn run_httperf(
    bed: &Testbed,
    primary: std::net::Ipv4Addr,
    connections: u32,
) -> anyhow::Result<f64> {
    let out = bed.exec(
        "source",
        &[
            "httperf",
            "--server",
            &primary.to_string(),
            "--port",
            &PORT.to_string(),
            "--wset=5,0.2",
            "--rate=20",
            "--num-conns",
            &connections.to_string(),
            "--num-calls",
            "1",
            "--timeout",
            "5",
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    if let Some(errors) = text.lines().find(|l| l.starts_with("Errors: total")) {
        let total: u64 = errors
            .split_whitespace()
            .nth(2)
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        if total > 0 {
            anyhow::bail!("httperf reported errors: {errors}");
        }
    }
    // "Connection time [ms]: min 1.0 avg 8.3 max 17.9 median 5.5 stddev 7.3"
    text.lines()
        .find(|l| l.starts_with("Connection time [ms]: min"))
        .and_then(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let at = words.iter().position(|w| *w == "avg")?;
            words.get(at + 1)?.parse().ok()
        })
        .context("httperf printed no connection lifetime")
}
