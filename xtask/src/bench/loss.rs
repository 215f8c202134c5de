//! iperf3 under random packet loss: an nftables rule drops a share of the TCP segments at
//! the primary's ingress (the client's data) or, separately, at the client's (the
//! primary's acknowledgements), with every link at 200 Mbit/s and the replica on the
//! dedicated NIC. Direct versus XDP mode with each loss recovery and sockets mode, the
//! ratio to direct in the same round, and for each replicated cell whether the replica
//! stayed attached and received every byte the primary did.
//!
//! There is no netem on the test bed, so the loss is `numgen random` in an input chain.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use ncp_testbed::Testbed;

use super::{
    LossRecovery, Options,
    iperf::{PORT, run_iperf, start_servers, stop_servers},
    median,
    replica::{REPLICA_CATCH_UP, ReplicaOutcome, first_replica_counters, replica_outcome},
    routes::{self, Replication, Route},
    save_json,
};
use crate::{cmd::step, middlebox::Middlebox};

/// Link rate: what the test bed's software switch carries with room to spare, so the
/// loss, not the switch, is what the columns differ in.
const LINK_MBIT: u32 = routes::PAPER_LINK_MBIT;

/// Where the segments are dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Site {
    /// The primary's input: the client's data segments.
    Primary,
    /// The client's input: the primary's acknowledgements.
    Client,
}

impl Site {
    fn host(self) -> &'static str {
        match self {
            Site::Primary => "primary",
            Site::Client => "source",
        }
    }

    /// The nftables match of the iperf3 segments arriving at this site.
    fn port_match(self) -> &'static str {
        match self {
            Site::Primary => "dport",
            Site::Client => "sport",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Site::Primary => "primary's ingress (client data)",
            Site::Client => "client's ingress (acknowledgements)",
        }
    }
}

/// One column: a route and, for XDP mode, its loss recovery.
struct Column {
    route: Route,
    recovery: Option<LossRecovery>,
}

impl Column {
    fn label(&self) -> String {
        match (&self.route, self.recovery) {
            (Route::Middlebox { dataplane, .. }, Some(r)) => {
                format!("{dataplane} ({})", r.config_value())
            }
            (Route::Middlebox { dataplane, .. }, None) => dataplane.clone(),
            (Route::Direct, _) => "direct".into(),
        }
    }
}

/// One cell's measurement in one round.
#[derive(Clone, Debug)]
struct Sample {
    bps: f64,
    /// Through the middlebox only: what the replica got compared with the primary.
    replica: Option<ReplicaOutcome>,
}

impl Sample {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "bps": self.bps,
            "replica": self.replica.as_ref().map(ReplicaOutcome::to_json),
        })
    }
}

/// Samples by (site, loss in per mille), column label and streams.
type Cells = BTreeMap<(Site, u32), super::ByRoute<Sample>>;

pub fn loss(bed: &Testbed, bins: &Path, options: &Options) -> anyhow::Result<String> {
    let streams: &[u32] = &[1, 8];
    let seconds = if options.quick { "3" } else { "5" };
    // Per mille; 0 is the same at both sites, so it is measured once.
    let losses: &[u32] = if options.quick { &[10] } else { &[0, 1, 10] };
    let mut cases = Vec::new();
    for &per_mille in losses {
        for site in [Site::Primary, Site::Client] {
            if per_mille > 0 || site == Site::Primary {
                cases.push((site, per_mille));
            }
        }
    }
    let columns = columns(options);
    let primary = bed.address("primary", "eth0")?;

    let servers = start_servers(bed)?;
    let mut cells = Cells::new();
    let outcome = (|| -> anyhow::Result<()> {
        routes::limit_links(bed, Some(LINK_MBIT))?;
        for round in 0..options.repetitions {
            for &(site, per_mille) in &cases {
                for column in &columns {
                    step(&format!(
                        "loss {} at the {}, round {}: {}",
                        percent(per_mille),
                        site.describe(),
                        round + 1,
                        column.label()
                    ));
                    let mb = column.route.enter(
                        bed,
                        bins,
                        PORT,
                        &options.relay_tuning_with(column.recovery),
                    )?;
                    for &n in streams {
                        let sample = measure(bed, mb.as_ref(), site, per_mille, || {
                            run_iperf(bed, primary, n, seconds)
                        })?;
                        eprintln!(
                            "      -P {n:<2} {:.3} Gbit/s{}",
                            sample.bps / 1e9,
                            sample.replica.as_ref().map_or(String::new(), |r| format!(
                                "; replica {} of {} bytes, {} detach(es)",
                                r.replica_bytes, r.primary_bytes, r.detaches
                            ))
                        );
                        cells
                            .entry((site, per_mille))
                            .or_default()
                            .entry(column.label())
                            .or_default()
                            .entry(n)
                            .or_default()
                            .push(sample);
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

    let labels: Vec<String> = columns.iter().map(Column::label).collect();
    let md = report(&cells, &labels, streams, seconds, options);
    let json: Vec<serde_json::Value> = cells
        .iter()
        .map(|((site, per_mille), by_column)| {
            let by_column = super::by_route_json(by_column, Sample::to_json);
            serde_json::json!({
                "site": format!("{site:?}").to_lowercase(),
                "loss_per_mille": per_mille,
                "link_mbit_per_s": LINK_MBIT,
                "cells": by_column,
            })
        })
        .collect();
    save_json(options, "loss", &serde_json::Value::Array(json))?;
    eprint!("{md}");
    Ok(md)
}

/// Direct, then XDP mode with each loss recovery, then the other data planes, each with
/// the replica on the dedicated NIC.
fn columns(options: &Options) -> Vec<Column> {
    let mut columns = vec![Column {
        route: Route::Direct,
        recovery: None,
    }];
    for dataplane in &options.dataplanes {
        let route = Route::Middlebox {
            dataplane: dataplane.clone(),
            replication: Replication::DedicatedNic,
        };
        let recoveries: &[Option<LossRecovery>] = if dataplane == "xdp" {
            &[Some(LossRecovery::Ncp), Some(LossRecovery::Smoltcp)]
        } else {
            &[None]
        };
        for &recovery in recoveries {
            columns.push(Column {
                route: route.clone(),
                recovery,
            });
        }
    }
    columns
}

/// Runs `run` with the loss rule in place and reads what the middlebox (if any) passed
/// to the primary and the replica meanwhile. A failed iperf3 run is a throughput of 0
/// (reported), not fatal.
fn measure(
    bed: &Testbed,
    mb: Option<&Middlebox>,
    site: Site,
    per_mille: u32,
    run: impl FnOnce() -> anyhow::Result<f64>,
) -> anyhow::Result<Sample> {
    let before = mb.map(first_replica_counters).transpose()?;
    let bps = {
        let _rule = LossRule::install(bed, site, per_mille)?;
        run().unwrap_or_else(|e| {
            eprintln!("      iperf3 failed: {e:#}");
            0.0
        })
    };
    let replica = match (mb, before) {
        (Some(mb), Some(before)) => Some(replica_outcome(mb, &before, REPLICA_CATCH_UP)?),
        _ => None,
    };
    Ok(Sample { bps, replica })
}

/// An nftables table in a host's namespace that drops `per_mille` of the iperf3 segments
/// arriving there; dropping it deletes the table, also when the measurement failed.
struct LossRule<'a> {
    bed: &'a Testbed,
    host: &'static str,
    table: String,
}

impl<'a> LossRule<'a> {
    fn install(bed: &'a Testbed, site: Site, per_mille: u32) -> anyhow::Result<Self> {
        let rule = LossRule {
            bed,
            host: site.host(),
            table: format!("{}_loss", super::prefix()),
        };
        // A table left by a crashed run would add its drops to this one's.
        rule.delete();
        if per_mille == 0 {
            return Ok(rule);
        }
        let chain = format!(
            "table inet {table} {{ chain input {{ type filter hook input priority -10; policy accept; \
             tcp {port_match} {PORT} numgen random mod 1000 < {per_mille} drop; }}; }}",
            table = rule.table,
            port_match = site.port_match(),
        );
        let out = bed.exec(rule.host, &["nft", &chain])?;
        if !out.status.success() {
            anyhow::bail!(
                "nft on {}: {}",
                rule.host,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(rule)
    }

    fn delete(&self) {
        if let Ok(mut command) = self
            .bed
            .command(self.host, &["nft", "delete", "table", "inet", &self.table])
        {
            let _ = command
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

impl Drop for LossRule<'_> {
    fn drop(&mut self) {
        self.delete();
    }
}

/// "1 %" for 10 per mille.
fn percent(per_mille: u32) -> String {
    format!("{} %", f64::from(per_mille) / 10.0)
}

/// One table per loss site and rate: Gbit/s (median), its ratio to direct, and for the
/// replicated columns whether the replica stayed attached and got every byte in every
/// round.
fn report(
    cells: &Cells,
    labels: &[String],
    streams: &[u32],
    seconds: &str,
    options: &Options,
) -> String {
    let mut md = String::from("## Random loss: iperf3, one replica on the dedicated NIC\n\n");
    let _ = writeln!(
        md,
        "Links at {LINK_MBIT} Mbit/s (tc); an nftables rule (`numgen random`) drops the share \
         of iperf3 segments at the site named. Median of {} round(s) of {seconds} s per cell, \
         Gbit/s, and its ratio to direct. Replica: ✓ it stayed attached and got every byte the \
         primary got in every round; **detached** the middlebox detached it; **short** it \
         missed bytes (with the worst round's count).\n",
        options.repetitions
    );
    for ((site, per_mille), by_column) in cells {
        let _ = writeln!(
            md,
            "### {} loss at the {}\n",
            percent(*per_mille),
            site.describe()
        );
        let _ = writeln!(md, "| streams | {} |", labels.join(" | "));
        let _ = writeln!(md, "|---|{}", "---|".repeat(labels.len()));
        for &n in streams {
            let samples = |label: &str| by_column.get(label).and_then(|m| m.get(&n));
            let gbps = |label: &str| {
                samples(label).map_or(0.0, |s| {
                    median(&s.iter().map(|s| s.bps).collect::<Vec<_>>())
                }) / 1e9
            };
            let direct = gbps("direct");
            let row: Vec<String> = labels
                .iter()
                .map(|label| {
                    let value = gbps(label);
                    let mut cell = if value == 0.0 {
                        "failed".to_owned()
                    } else if label == "direct" || direct == 0.0 {
                        format!("{value:.3}")
                    } else {
                        format!("{value:.3} ({:.2}×)", value / direct)
                    };
                    if let Some(verdict) = samples(label).and_then(|s| replica_verdict(s)) {
                        let _ = write!(cell, " {verdict}");
                    }
                    cell
                })
                .collect();
            let _ = writeln!(md, "| {n} | {} |", row.join(" | "));
        }
        md.push('\n');
    }
    md
}

/// ✓, **detached** or **short** over a cell's rounds; None for a cell without a replica.
fn replica_verdict(samples: &[Sample]) -> Option<String> {
    let outcomes: Vec<&ReplicaOutcome> =
        samples.iter().filter_map(|s| s.replica.as_ref()).collect();
    if outcomes.is_empty() {
        return None;
    }
    if outcomes.iter().any(|o| o.detaches > 0) {
        return Some("**detached**".into());
    }
    match outcomes
        .iter()
        .filter(|o| !o.complete())
        .max_by_key(|o| o.primary_bytes - o.replica_bytes.min(o.primary_bytes))
    {
        None => Some("✓".into()),
        Some(o) => Some(format!(
            "**short** ({} of {} B)",
            o.replica_bytes, o.primary_bytes
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(primary_bytes: u64, replica_bytes: u64, detaches: u64) -> Sample {
        Sample {
            bps: 1e8,
            replica: Some(ReplicaOutcome {
                primary_bytes,
                replica_bytes,
                detaches,
                ..ReplicaOutcome::default()
            }),
        }
    }

    #[test]
    fn a_detach_in_any_round_marks_the_cell() {
        let rounds = [sample(100, 100, 0), sample(100, 100, 1)];
        assert_eq!(replica_verdict(&rounds).as_deref(), Some("**detached**"));
    }

    #[test]
    fn a_shortfall_shows_the_worst_round() {
        let rounds = [sample(100, 90, 0), sample(100, 50, 0), sample(100, 100, 0)];
        assert_eq!(
            replica_verdict(&rounds).as_deref(),
            Some("**short** (50 of 100 B)")
        );
    }

    #[test]
    fn every_byte_in_every_round_is_a_tick_and_direct_has_no_verdict() {
        assert_eq!(
            replica_verdict(&[sample(7, 7, 0), sample(9, 12, 0)]).as_deref(),
            Some("✓")
        );
        let direct = Sample {
            bps: 1e8,
            replica: None,
        };
        assert_eq!(replica_verdict(&[direct]), None);
    }

    #[test]
    fn xdp_gets_a_column_per_recovery_and_tcp_settings_share_one_table() {
        let options = Options {
            dataplanes: vec!["xdp".into(), "sockets".into()],
            tcp_buffer: Some(1 << 20),
            ..Options::default()
        };
        let labels: Vec<String> = columns(&options).iter().map(Column::label).collect();
        assert_eq!(labels, ["direct", "xdp (ncp)", "xdp (smoltcp)", "sockets"]);
        let tables = options
            .relay_tuning_with(Some(LossRecovery::Smoltcp))
            .tables;
        assert_eq!(
            tables,
            "[tcp]\nbuffer_bytes = 1048576\ncongestion_control = \"cubic\"\nloss_recovery = \"smoltcp\"\n"
        );
        assert_eq!(
            Options::default()
                .relay_tuning_with(Some(LossRecovery::Ncp))
                .tables,
            "[tcp]\nbuffer_bytes = 65536\nloss_recovery = \"ncp\"\n"
        );
        assert_eq!(tables.matches("[tcp]").count(), 1);
        assert!(Options::default().relay_tuning().tables.is_empty());
    }
}
