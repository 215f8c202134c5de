//! Paper Fig. 7: average connection lifetime of short HTTP connections (one request per
//! connection) against a web server on the primary, direct versus through the middlebox,
//! with the paper's workload: a working set of five files of 1, 10, 30, 50 and 70 KB
//! (`--wset=5,0.2`), 20 new connections per second, 100 to 500 connections; with links
//! capped at 200 Mbit/s (the paper's regime) and uncapped. The lifetime is also broken
//! down by phase (httperf's own timings): handshake (connect), request to the first
//! answer byte (response), the rest of the answer (transfer), and the remainder (close).

use std::{collections::BTreeMap, fmt::Write as _, path::Path, time::Duration};

use anyhow::Context as _;
use ncp_testbed::Testbed;

use super::{
    Options,
    routes::{self, Replication, Route},
    save_json,
};

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
    for host in ["primary", "replica"] {
        bed.wait_listening(host, PORT, Duration::from_secs(20))?;
    }
    let routes = Route::all(
        &options.dataplanes,
        &[Replication::None, Replication::DedicatedNic],
    );
    let primary = bed.address("primary", "eth0")?;

    // lifetimes[regime][route label][connections] = samples (ms)
    let mut lifetimes = super::Cells::<f64>::new();
    // phases[regime][route label] = every run's breakdown
    let mut phases: BTreeMap<&str, ByRoute<Vec<Lifetime>>> = BTreeMap::new();
    let outcome = routes::for_each_cell(
        bed,
        bins,
        "httperf",
        (&REGIMES, &routes, options.repetitions),
        PORT,
        &options.relay_tuning(),
        |regime, route| {
            for &n in connections {
                let lifetime = match run_httperf(bed, primary, n) {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("      {n} connections failed: {e:#}");
                        Lifetime::default()
                    }
                };
                eprintln!(
                    "      {n} connections: average lifetime {:.2} ms (connect {:.2}, response {:.2}, transfer {:.2})",
                    lifetime.total, lifetime.connect, lifetime.response, lifetime.transfer
                );
                super::add_sample(&mut lifetimes, regime, route.label(), n, lifetime.total);
                if lifetime.total > 0.0 {
                    phases
                        .entry(regime)
                        .or_default()
                        .entry(route.label())
                        .or_default()
                        .push(lifetime);
                }
            }
            Ok(())
        },
    );
    for mut server in servers {
        let _ = server.kill();
        let _ = server.wait();
    }
    let replicas = outcome?;

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
    for (regime, _) in REGIMES {
        let Some(by_route) = lifetimes.get(regime) else {
            continue;
        };
        let _ = writeln!(md, "### Links {regime}\n");
        super::versus_direct_table(
            &mut md,
            "connections",
            connections,
            &labels,
            by_route,
            |ms| format!("{ms:.2}"),
        );
        let plot = super::LinePlot {
            name: format!(
                "httperf-{}",
                if regime == "unlimited" {
                    "unlimited"
                } else {
                    "200mbit"
                }
            ),
            title: format!("httperf: average connection lifetime, links {regime}"),
            x_label: "connections",
            y_label: "ms",
            scale: 1.0,
        };
        md.push_str(&super::save_versus_direct_plot(
            options,
            &plot,
            connections,
            &labels,
            by_route,
        )?);
        md.push_str(&routes::replica_line(&replicas, regime));
        if let Some(by_route) = phases.get(regime) {
            phase_table(&mut md, &labels, by_route);
        }
    }
    save_json(
        options,
        "httperf",
        &serde_json::json!({
            "lifetime_ms": lifetimes,
            "phases_ms": phases
                .iter()
                .map(|(regime, by_route)| {
                    let by_route: BTreeMap<&String, Vec<serde_json::Value>> = by_route
                        .iter()
                        .map(|(route, runs)| (route, runs.iter().map(|l| l.to_json()).collect()))
                        .collect();
                    (*regime, by_route)
                })
                .collect::<BTreeMap<_, _>>(),
            "replica": routes::replica_json(&replicas),
        }),
    )?;
    eprint!("{md}");
    Ok(md)
}

/// The links regimes of this experiment: the paper's and uncapped.
const REGIMES: [routes::Regime; 2] = routes::PAPER_AND_UNCAPPED;

/// Values by route label.
type ByRoute<T> = BTreeMap<String, T>;

/// One phase's length in a run's breakdown.
type Phase = fn(&Lifetime) -> f64;

/// One httperf run's average connection lifetime and its phases, in ms.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Lifetime {
    total: f64,
    /// TCP handshake.
    connect: f64,
    /// From the request to the first byte of the answer.
    response: f64,
    /// The rest of the answer.
    transfer: f64,
}

impl Lifetime {
    fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "total": self.total,
            "connect": self.connect,
            "response": self.response,
            "transfer": self.transfer,
        })
    }

    /// What is left of the lifetime after the three measured phases: mostly the close.
    fn close(&self) -> f64 {
        (self.total - self.connect - self.response - self.transfer).max(0.0)
    }
}

/// Medians of each phase per route, and each phase's increase over direct: which part of
/// the connection the middlebox lengthens.
fn phase_table(md: &mut String, labels: &[String], by_route: &ByRoute<Vec<Lifetime>>) {
    let phases: [(&str, Phase); 5] = [
        ("handshake (connect)", |l| l.connect),
        ("request to first answer byte", |l| l.response),
        ("rest of the answer (transfer)", |l| l.transfer),
        ("close and the rest", Lifetime::close),
        ("whole lifetime", |l| l.total),
    ];
    let medians = |label: &str, phase: Phase| {
        by_route
            .get(label)
            .map(|v| super::median(&v.iter().map(phase).collect::<Vec<_>>()))
    };
    let _ = writeln!(
        md,
        "Lifetime by phase (median over every run of the regime, ms; increase over direct):\n"
    );
    let _ = writeln!(md, "| phase | {} |", labels.join(" | "));
    let _ = writeln!(md, "|---|{}", "---|".repeat(labels.len()));
    for (name, phase) in phases {
        let direct = medians("direct", phase);
        let cells: Vec<String> = labels
            .iter()
            .map(|label| match (medians(label, phase), direct) {
                (Some(v), Some(d)) if label != "direct" => format!("{v:.2} ({:+.2})", v - d),
                (Some(v), _) => format!("{v:.2}"),
                (None, _) => "—".to_owned(),
            })
            .collect();
        let _ = writeln!(md, "| {name} | {} |", cells.join(" | "));
    }
    md.push('\n');
}

/// Runs httperf from the source and returns the average connection lifetime and phases.
fn run_httperf(
    bed: &Testbed,
    primary: std::net::Ipv4Addr,
    connections: u32,
) -> anyhow::Result<Lifetime> {
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
    parse_lifetime(&text).context("httperf printed no connection lifetime")
}

/// httperf's timings: "Connection time [ms]: min 1.0 avg 8.3 …", "Connection time [ms]:
/// connect 0.2" and "Reply time [ms]: response 1.6 transfer 5.2".
fn parse_lifetime(text: &str) -> Option<Lifetime> {
    let value_after = |prefix: &str, key: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.starts_with(prefix))?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let at = words.iter().position(|w| *w == key)?;
        words.get(at + 1)?.parse().ok()
    };
    Some(Lifetime {
        total: value_after("Connection time [ms]: min", "avg")?,
        connect: value_after("Connection time [ms]: connect", "connect")?,
        response: value_after("Reply time [ms]: response", "response")?,
        transfer: value_after("Reply time [ms]: response", "transfer")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn httperfs_timings_give_the_phases() {
        let text = "Connection rate: 20.0 conn/s (50.0 ms/conn, <=3 concurrent connections)\n\
                    Connection time [ms]: min 1.1 avg 8.4 max 17.9 median 5.5 stddev 7.3\n\
                    Connection time [ms]: connect 0.3\n\
                    Connection length [replies/conn]: 1.000\n\
                    Reply time [ms]: response 1.6 transfer 5.2\n";
        let l = parse_lifetime(text).expect("parsed");
        assert_eq!(
            (l.total, l.connect, l.response, l.transfer),
            (8.4, 0.3, 1.6, 5.2)
        );
        assert!((l.close() - 1.3).abs() < 1e-9);
        assert_eq!(parse_lifetime("Errors: total 3"), None);
    }
}
