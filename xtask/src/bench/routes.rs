//! The ways the source can reach the primary in a measurement — directly, or through the
//! middlebox with or without a replica — and how to set each one up on the paper test bed.

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use anyhow::Context as _;
use ncp_testbed::{Mac, Testbed};

use super::replica::{self, ReplicaOutcome};
use crate::middlebox::Middlebox;

/// How the client stream is copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Replication {
    /// The middlebox relays to the primary only.
    None,
    /// One replica, reached over the production NIC.
    SharedNic,
    /// One replica, reached over the dedicated replication NIC (the paper's layout).
    DedicatedNic,
}

/// How the source reaches the primary in one measurement.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Route {
    /// Straight to the primary.
    Direct,
    /// Through the middlebox (`dataplane` = `xdp` or `sockets`).
    Middlebox {
        /// `--mode` of the middlebox.
        dataplane: String,
        /// Replica placement.
        replication: Replication,
    },
}

impl Route {
    /// Direct first, then every data plane with each replication variant.
    pub fn all(dataplanes: &[String], replications: &[Replication]) -> Vec<Route> {
        let mut routes = vec![Route::Direct];
        for dataplane in dataplanes {
            for &replication in replications {
                routes.push(Route::Middlebox {
                    dataplane: dataplane.clone(),
                    replication,
                });
            }
        }
        routes
    }

    /// Column label in the reports.
    pub fn label(&self) -> String {
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

    /// Sets the route up for a service on `port` and returns the middlebox, if any. The
    /// source's frames for the primary are sent to the middlebox's MAC, which is what the
    /// controller's redirect rule does on a real switch. `tuning` configures the
    /// middlebox beyond its defaults (`Tuning::default()`: none).
    pub fn enter(
        &self,
        bed: &Testbed,
        bins: &Path,
        port: u16,
        tuning: &Tuning,
    ) -> anyhow::Result<Option<Middlebox>> {
        self.enter_on(bed, &Wiring::paper(bed)?, bins, port, tuning)
    }

    /// [`Route::enter`] on the hosts' interfaces and addresses that `wiring` names (the
    /// paper test bed's, or another bed built in the same namespaces).
    pub fn enter_on(
        &self,
        bed: &Testbed,
        wiring: &Wiring,
        bins: &Path,
        port: u16,
        tuning: &Tuning,
    ) -> anyhow::Result<Option<Middlebox>> {
        match self {
            Route::Direct => {
                wiring.steer(bed, wiring.primary_mac)?;
                Ok(None)
            }
            Route::Middlebox {
                dataplane,
                replication,
            } => {
                wiring.steer(bed, wiring.client_nic.mac)?;
                let socket = super::run_dir().join("mb.sock");
                let config = middlebox_config(wiring, *replication, port, &socket, tuning)?;
                Middlebox::start_mode(bed, "middlebox", bins, &config, &socket, dataplane).map(Some)
            }
        }
    }
}

/// One NIC of the middlebox host.
#[derive(Clone, Debug)]
pub struct Nic {
    /// Interface name inside the host.
    pub name: String,
    pub address: Ipv4Addr,
    pub mac: Mac,
}

/// Where a route's ends are: which interfaces and addresses of the source, the primary,
/// the replica and the middlebox a measurement uses. The paper test bed's are
/// [`Wiring::paper`]; the relay bed builds its own in the same hosts.
#[derive(Clone, Debug)]
pub struct Wiring {
    /// The source's interface toward the primary.
    pub source_nic: String,
    pub source: Ipv4Addr,
    pub primary: Ipv4Addr,
    pub primary_mac: Mac,
    /// The middlebox's production (client-facing) NIC.
    pub client_nic: Nic,
    /// The middlebox's replication NIC.
    pub replication_nic: Nic,
    /// The replica's address on the production network ([`Replication::SharedNic`]), if
    /// it has one there.
    pub replica_shared: Option<Ipv4Addr>,
    /// The replica's address on the replication network ([`Replication::DedicatedNic`]).
    pub replica_dedicated: Ipv4Addr,
}

impl Wiring {
    /// The paper test bed's: production network on eth0, replication network on eth1.
    pub fn paper(bed: &Testbed) -> anyhow::Result<Wiring> {
        let nic = |iface: &str| -> anyhow::Result<Nic> {
            Ok(Nic {
                name: iface.to_owned(),
                address: bed.address("middlebox", iface)?,
                mac: Mac(bed.mac("middlebox", iface)?),
            })
        };
        Ok(Wiring {
            source_nic: "eth0".into(),
            source: bed.address("source", "eth0")?,
            primary: bed.address("primary", "eth0")?,
            primary_mac: Mac(bed.mac("primary", "eth0")?),
            client_nic: nic("eth0")?,
            replication_nic: nic("eth1")?,
            replica_shared: Some(bed.address("replica", "eth0")?),
            replica_dedicated: bed.address("replica", "eth1")?,
        })
    }

    /// Pins the source's next hop for the primary to `mac`.
    fn steer(&self, bed: &Testbed, mac: Mac) -> anyhow::Result<()> {
        Ok(bed.set_neighbor("source", &self.source_nic, self.primary, &mac.to_string())?)
    }
}

/// Middlebox settings beyond the defaults, for an experiment that takes it to its limits.
#[derive(Clone, Debug, Default)]
pub struct Tuning {
    /// Top-level keys, written before any table (`poll`).
    pub top: String,
    /// Owned port range of every interface (the XDP data plane's upstream ports).
    pub ports: Option<(u16, u16)>,
    /// Top-level tables appended to the configuration (`[limits]`, `[tcp]`).
    pub tables: String,
    /// Lines added to the service's table (`replica_budget_bytes`, `spill_dir`, ...).
    pub service: String,
}

/// Restores direct forwarding from the source to the primary.
pub fn leave(bed: &Testbed) -> anyhow::Result<()> {
    let wiring = Wiring::paper(bed)?;
    wiring.steer(bed, wiring.primary_mac)
}

/// The paper's regime on this test bed: links, not CPUs, are the limit. The paper's
/// 1 Gbit/s links do not exist here (OVS's userspace switch saturates at 0.73-0.83 Gbit/s
/// direct), so every host interface is capped at a rate the switch carries with room to
/// spare.
pub const PAPER_LINK_MBIT: u32 = 200;

/// A link regime: its name and the cap on every link in Mbit/s (`None`: uncapped).
pub type Regime = (&'static str, Option<u32>);

/// The paper's regime and uncapped: the experiments that take longer run only these two.
pub const PAPER_AND_UNCAPPED: [Regime; 2] = [REGIMES[0], REGIMES[2]];

/// The link regimes the relay experiments compare: the paper's (capped well below the
/// switch), 1 Gbit/s (the paper's nominal rate, which the switch cannot reach here) and
/// uncapped, as (name, cap in Mbit/s).
pub const REGIMES: [Regime; 3] = [
    ("200 Mbit/s", Some(PAPER_LINK_MBIT)),
    ("1 Gbit/s", Some(1000)),
    ("unlimited", None),
];

/// What the replica got in each cell with one, per round: (regime, route label) → one
/// outcome per round.
pub type ReplicaCells = BTreeMap<(&'static str, String), Vec<ReplicaOutcome>>;

/// Runs `cell` for every regime, round and route of an experiment (`what` names it in
/// the progress lines), with the links capped as the regime says and the route entered
/// (its middlebox running for the cell); the links are uncapped and the routes left
/// afterwards, whatever happened. Returns, for every cell with a replica, whether it
/// stayed attached and got every byte the primary did in each round: a cell where it did
/// not measures something other than full replication.
pub fn for_each_cell(
    bed: &Testbed,
    bins: &Path,
    what: &str,
    cells: (&[Regime], &[Route], u32),
    port: u16,
    tuning: &Tuning,
    mut cell: impl FnMut(&'static str, &Route) -> anyhow::Result<()>,
) -> anyhow::Result<ReplicaCells> {
    let (regimes, routes, rounds) = cells;
    let mut replicas = ReplicaCells::new();
    let outcome = (|| -> anyhow::Result<()> {
        for &(regime, cap) in regimes {
            limit_links(bed, cap)?;
            for round in 0..rounds {
                for route in routes {
                    crate::cmd::step(&format!(
                        "{what}, links {regime}, round {}: {}",
                        round + 1,
                        route.label()
                    ));
                    let mb = route.enter(bed, bins, port, tuning)?;
                    let replicated = matches!(
                        route,
                        Route::Middlebox { replication, .. } if *replication != Replication::None
                    );
                    let before = match (&mb, replicated) {
                        (Some(mb), true) => Some(replica::first_replica_counters(mb)?),
                        _ => None,
                    };
                    cell(regime, route)?;
                    if let (Some(mb), Some(before)) = (&mb, before) {
                        let got = replica::replica_outcome(mb, &before, replica::REPLICA_CATCH_UP)?;
                        replicas
                            .entry((regime, route.label()))
                            .or_default()
                            .push(got);
                    }
                }
            }
        }
        Ok(())
    })();
    let _ = limit_links(bed, None);
    let _ = leave(bed);
    outcome.map(|()| replicas)
}

/// One line for a report under a regime's table: in which replicated cells the replica
/// stayed attached and got every byte in every round, and in which it did not.
pub fn replica_line(replicas: &ReplicaCells, regime: &str) -> String {
    let mut complete = Vec::new();
    let mut short = Vec::new();
    for ((r, label), rounds) in replicas {
        if *r != regime {
            continue;
        }
        let bad = rounds.iter().filter(|o| !o.complete()).count();
        if bad == 0 {
            complete.push(label.clone());
        } else {
            short.push(format!("{label} ({bad} of {} rounds)", rounds.len()));
        }
    }
    if complete.is_empty() && short.is_empty() {
        return String::new();
    }
    let mut line = String::from("Replica: ");
    if !complete.is_empty() {
        line.push_str(&format!(
            "stayed attached and got every byte the primary did in every round of {}",
            complete.join(", ")
        ));
    }
    if !short.is_empty() {
        if !complete.is_empty() {
            line.push_str("; ");
        }
        line.push_str(&format!(
            "**detached or short** (not a fully replicated figure) in {}",
            short.join(", ")
        ));
    }
    line.push_str(".\n\n");
    line
}

/// The replica outcomes as the experiments' JSON files record them.
pub fn replica_json(replicas: &ReplicaCells) -> serde_json::Value {
    let mut by_regime = serde_json::Map::new();
    for ((regime, label), rounds) in replicas {
        let entry = by_regime
            .entry(regime.to_string())
            .or_insert_with(|| serde_json::json!({}));
        entry[label] = rounds.iter().map(ReplicaOutcome::to_json).collect();
    }
    serde_json::Value::Object(by_regime)
}

/// Puts a token bucket of `mbit_per_s` on every interface of every host, or removes it
/// (None).
pub fn limit_links(bed: &Testbed, mbit_per_s: Option<u32>) -> anyhow::Result<()> {
    for host in ["source", "primary", "replica", "middlebox"] {
        for iface in ["eth0", "eth1"] {
            if let Some(rate) = mbit_per_s {
                bed.exec(
                    host,
                    &[
                        "tc",
                        "qdisc",
                        "replace",
                        "dev",
                        iface,
                        "root",
                        "tbf",
                        "rate",
                        &format!("{rate}mbit"),
                        "burst",
                        "512kb",
                        "latency",
                        "50ms",
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

fn middlebox_config(
    wiring: &Wiring,
    replication: Replication,
    port: u16,
    socket: &Path,
    tuning: &Tuning,
) -> anyhow::Result<String> {
    let Wiring {
        source,
        primary,
        client_nic: mb0,
        replication_nic: mb1,
        ..
    } = wiring;
    let (replicas, extra) = match replication {
        Replication::None => (String::new(), String::new()),
        Replication::SharedNic => {
            let replica = wiring
                .replica_shared
                .context("this bed has no replica on the production network")?;
            (format!("\"{replica}:{port}\""), String::new())
        }
        Replication::DedicatedNic => (
            format!("\"{}:{port}\"", wiring.replica_dedicated),
            format!("replica_interface = \"{}\"\n", mb1.name),
        ),
    };
    let ports = tuning.ports.map_or(String::new(), |(first, last)| {
        format!("ports = {{ first = {first}, last = {last} }}\n")
    });
    Ok(format!(
        "{}control_socket = \"{}\"\n\
         [[interfaces]]\nname = \"{}\"\naddress = \"{}\"\n{ports}queues = [{{ queue = 0, core = 1 }}]\n\
         [[interfaces]]\nname = \"{}\"\naddress = \"{}\"\n{ports}queues = [{{ queue = 0, core = 1 }}]\n\
         [[services]]\nname = \"bench\"\nprimary = \"{primary}:{port}\"\nclients = \"{source}/32\"\n\
         replicas = [{replicas}]\n{extra}{}{}",
        tuning.top,
        socket.display(),
        mb0.name,
        mb0.address,
        mb1.name,
        mb1.address,
        tuning.service,
        tuning.tables
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn got(primary: u64, replica: u64, detaches: u64) -> ReplicaOutcome {
        ReplicaOutcome {
            primary_bytes: primary,
            replica_bytes: replica,
            detaches,
            ..ReplicaOutcome::default()
        }
    }

    #[test]
    fn the_replica_line_names_cells_that_were_not_fully_replicated() {
        let mut cells = ReplicaCells::new();
        cells.insert(
            ("200 Mbit/s", "xdp: replica, dedicated NIC".into()),
            vec![got(10, 10, 0), got(20, 20, 0)],
        );
        cells.insert(
            ("200 Mbit/s", "sockets: replica, dedicated NIC".into()),
            vec![got(10, 10, 0), got(20, 5, 1)],
        );
        cells.insert(
            ("unlimited", "xdp: replica, dedicated NIC".into()),
            vec![got(1, 1, 0)],
        );
        let line = replica_line(&cells, "200 Mbit/s");
        assert!(
            line.contains("every round of xdp: replica, dedicated NIC"),
            "{line}"
        );
        assert!(
            line.contains("**detached or short** (not a fully replicated figure) in sockets: replica, dedicated NIC (1 of 2 rounds)"),
            "{line}"
        );
        assert_eq!(replica_line(&cells, "1 Gbit/s"), "");
        let json = replica_json(&cells);
        assert_eq!(
            json["200 Mbit/s"]["sockets: replica, dedicated NIC"][1]["complete"],
            false
        );
    }
}
