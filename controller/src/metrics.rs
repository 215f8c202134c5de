//! `GET /metrics`: the controller's counters, every replica's consistency and the
//! registered middleboxes' counters in the Prometheus text format (`prometheus-client`).
//!
//! The values live where they are kept (the service's counters, the merged consistency
//! state, the last stats answer of each middlebox); each scrape takes a [`Snapshot`] of
//! them and [`render`] writes a fresh registry. Counters that come from a middlebox are
//! its own totals since it started: they go back to zero when it restarts, which
//! Prometheus' `rate()` and `increase()` treat as a counter reset.
//!
//! | metric | labels | meaning |
//! |---|---|---|
//! | `ncp_replica_in_step` | replication, replica | 1 in step, 0 diverged or unknown |
//! | `ncp_replica_diverged` | replication, replica | 1 diverged (0 in step or unknown) |
//! | `ncp_replica_lag_bytes` | replication, replica | largest current lag, if reported |
//! | `ncp_replica_detaches_total` | replication, replica, reason | detaches since the middlebox started |
//! | `ncp_replica_reply_mismatches_total` | replication, replica | sessions whose answers differed |
//! | `ncp_fail_open_events_total` | | middleboxes declared down |
//! | `ncp_redirect_withdrawals_total` | | installed redirects withdrawn (not fail-open) |
//! | `ncp_replica_operator_resets_total` | | replicas marked in step by an operator |
//! | `ncp_flow_mods_sent_total` | | FLOW_MODs sent to switches |
//! | `ncp_switch_connections` | | switches connected now |
//! | `ncp_reconciles_total`, `ncp_packet_ins_total` | | |
//! | `ncp_middlebox_pushes_total` | result | service pushes, `ok` / `failed` |
//! | `ncp_middlebox_polls_total` | result | stats polls, `ok` / `failed` |
//! | `ncp_middlebox_reachable` | middlebox | 1 when its last stats poll answered |
//! | `ncp_middlebox_xdp_frames_total` | middlebox, interface, verdict | XDP verdicts |
//! | `ncp_middlebox_worker_rx_frames_total`, `…_rx_bytes_total` | middlebox, interface, queue | AF_XDP receive counters |

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::consistency::{ReplicaConsistency, State};
use crate::mbstats::MiddleboxReport;
use crate::service::Metrics;

/// `prometheus-client` writes the OpenMetrics flavour of the text format (counters named
/// `…_total`, a closing `# EOF`); this content type tells Prometheus so.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Everything one scrape shows.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub counters: Metrics,
    pub switches_connected: usize,
    pub fail_open_events: u64,
    pub withdrawals: u64,
    pub operator_resets: u64,
    pub polls_ok: u64,
    pub polls_failed: u64,
    pub replicas: BTreeMap<u32, Vec<ReplicaConsistency>>,
    /// Each registered middlebox that answered at least once: whether its last poll
    /// answered, and its last answer.
    pub middleboxes: Vec<(Ipv4Addr, bool, MiddleboxReport)>,
}

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), v.clone()))
        .collect()
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn counter(reg: &mut Registry, name: &str, help: &str, v: u64) {
    let c: Counter = Counter::default();
    c.inc_by(v);
    reg.register(name, help, c);
}

/// Registers one family per `(name, help)` and hands them back, in that order, for
/// filling (families share their values with the registry).
fn families<M, const N: usize>(
    reg: &mut Registry,
    declared: [(&str, &str); N],
) -> [Family<Labels, M>; N]
where
    M: prometheus_client::metrics::TypedMetric
        + prometheus_client::encoding::EncodeMetric
        + Default
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    declared.map(|(name, help)| {
        let f: Family<Labels, M> = Family::default();
        reg.register(name, help, f.clone());
        f
    })
}

/// A counter family `name` with a `result` label: `ok` and `failed` attempts.
fn ok_failed(reg: &mut Registry, (name, help): (&str, &str), ok: u64, failed: u64) {
    let [f] = families::<Counter, 1>(reg, [(name, help)]);
    for (result, n) in [("ok", ok), ("failed", failed)] {
        f.get_or_create(&labels(&[("result", result.into())]))
            .inc_by(n);
    }
}

/// The text exposition of `s`.
pub fn render(s: &Snapshot) -> String {
    let mut reg = Registry::default();
    let [in_step, diverged, lag] = families::<Gauge, 3>(
        &mut reg,
        [
            (
                "ncp_replica_in_step",
                "1 if the replica is in step with its primary, 0 if diverged or unknown",
            ),
            (
                "ncp_replica_diverged",
                "1 if the replica is known to have missed writes or answered differently",
            ),
            (
                "ncp_replica_lag_bytes",
                "Largest current lag of the replica among open sessions",
            ),
        ],
    );
    let [detaches, mismatches] = families::<Counter, 2>(
        &mut reg,
        [
            (
                "ncp_replica_detaches",
                "Sessions the replica was detached from, by reason, since its middlebox started",
            ),
            (
                "ncp_replica_reply_mismatches",
                "Sessions in which the replica's answer differed from the primary's",
            ),
        ],
    );
    for (id, replicas) in &s.replicas {
        for r in replicas {
            let l = labels(&[
                ("replication", id.to_string()),
                ("replica", r.replica.to_string()),
            ]);
            in_step
                .get_or_create(&l)
                .set(i64::from(r.state == State::InStep));
            diverged
                .get_or_create(&l)
                .set(i64::from(r.state == State::Diverged));
            if let Some(b) = r.lag_bytes {
                lag.get_or_create(&l).set(gauge(b));
            }
            for (reason, n) in &r.detaches {
                let mut l = l.clone();
                l.push(("reason".into(), reason.clone()));
                detaches.get_or_create(&l).inc_by(*n);
            }
            if let Some(m) = &r.middlebox {
                mismatches
                    .get_or_create(&l)
                    .inc_by(m.verification.mismatches);
            }
        }
    }
    for (name, help, value) in [
        (
            "ncp_fail_open_events",
            "Middleboxes declared down (their redirects withdrawn)",
            s.fail_open_events,
        ),
        (
            "ncp_redirect_withdrawals",
            "Installed redirects withdrawn for a reason other than fail-open",
            s.withdrawals,
        ),
        (
            "ncp_replica_operator_resets",
            "Replicas marked in step by an operator",
            s.operator_resets,
        ),
        (
            "ncp_flow_mods_sent",
            "FLOW_MOD messages sent to switches",
            s.counters.flow_mods_sent,
        ),
        ("ncp_reconciles", "Reconcile runs", s.counters.reconciles),
        (
            "ncp_packet_ins",
            "PACKET_IN messages received",
            s.counters.packet_ins,
        ),
    ] {
        counter(&mut reg, name, help, value);
    }
    let switches: Gauge = Gauge::default();
    switches.set(gauge(s.switches_connected as u64));
    reg.register("ncp_switch_connections", "Switches connected now", switches);
    ok_failed(
        &mut reg,
        ("ncp_middlebox_pushes", "Service list pushes to middleboxes"),
        s.counters.middlebox_pushes_ok,
        s.counters.middlebox_pushes_failed,
    );
    ok_failed(
        &mut reg,
        (
            "ncp_middlebox_polls",
            "Consistency and counter polls of middleboxes",
        ),
        s.polls_ok,
        s.polls_failed,
    );

    let [reachable] = families::<Gauge, 1>(
        &mut reg,
        [(
            "ncp_middlebox_reachable",
            "1 if the middlebox's last stats poll answered",
        )],
    );
    let [xdp, rx_frames, rx_bytes] = families::<Counter, 3>(
        &mut reg,
        [
            (
                "ncp_middlebox_xdp_frames",
                "Frames by XDP verdict, since the middlebox started",
            ),
            (
                "ncp_middlebox_worker_rx_frames",
                "Frames a middlebox worker received from AF_XDP",
            ),
            (
                "ncp_middlebox_worker_rx_bytes",
                "Bytes a middlebox worker received from AF_XDP",
            ),
        ],
    );
    for (ip, ok, report) in &s.middleboxes {
        let mb = ip.to_string();
        reachable
            .get_or_create(&labels(&[("middlebox", mb.clone())]))
            .set(i64::from(*ok));
        for i in &report.interfaces {
            for (verdict, n) in &i.xdp {
                let l = labels(&[
                    ("middlebox", mb.clone()),
                    ("interface", i.name.clone()),
                    ("verdict", verdict.clone()),
                ]);
                xdp.get_or_create(&l).inc_by(*n);
            }
        }
        for w in &report.workers {
            let l = labels(&[
                ("middlebox", mb.clone()),
                ("interface", w.interface.clone()),
                ("queue", w.queue.to_string()),
            ]);
            rx_frames.get_or_create(&l).inc_by(w.rx_frames);
            rx_bytes.get_or_create(&l).inc_by(w.rx_bytes);
        }
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mbstats::{MbInterface, MbWorker};

    fn replica(addr: &str, state: State) -> ReplicaConsistency {
        ReplicaConsistency {
            replica: addr.parse().expect("addr"),
            state,
            summary: String::new(),
            since_ms: None,
            reasons: vec![],
            windows: vec![],
            middlebox: None,
            lag_bytes: Some(4096),
            detaches: [("lagged".to_string(), 3)].into(),
            reset_by_operator: None,
        }
    }

    #[test]
    fn exposition_has_the_series() {
        let mut s = Snapshot {
            fail_open_events: 2,
            switches_connected: 3,
            ..Snapshot::default()
        };
        s.counters.flow_mods_sent = 17;
        s.replicas.insert(
            1,
            vec![
                replica("198.18.2.3:6379", State::InStep),
                replica("198.18.2.4:6379", State::Diverged),
            ],
        );
        s.middleboxes.push((
            Ipv4Addr::new(198, 18, 1, 3),
            true,
            MiddleboxReport {
                interfaces: vec![MbInterface {
                    name: "eth0".into(),
                    xdp: [("redirected".to_string(), 9)].into(),
                }],
                workers: vec![MbWorker {
                    interface: "eth0".into(),
                    queue: 0,
                    rx_frames: 5,
                    rx_bytes: 600,
                }],
                ..MiddleboxReport::default()
            },
        ));
        let text = render(&s);
        for line in [
            "ncp_replica_in_step{replication=\"1\",replica=\"198.18.2.3:6379\"} 1",
            "ncp_replica_in_step{replication=\"1\",replica=\"198.18.2.4:6379\"} 0",
            "ncp_replica_diverged{replication=\"1\",replica=\"198.18.2.4:6379\"} 1",
            "ncp_replica_lag_bytes{replication=\"1\",replica=\"198.18.2.3:6379\"} 4096",
            "ncp_replica_detaches_total{replication=\"1\",replica=\"198.18.2.3:6379\",reason=\"lagged\"} 3",
            "ncp_fail_open_events_total 2",
            "ncp_flow_mods_sent_total 17",
            "ncp_switch_connections 3",
            "ncp_middlebox_reachable{middlebox=\"198.18.1.3\"} 1",
            "ncp_middlebox_xdp_frames_total{middlebox=\"198.18.1.3\",interface=\"eth0\",verdict=\"redirected\"} 9",
            "ncp_middlebox_worker_rx_bytes_total{middlebox=\"198.18.1.3\",interface=\"eth0\",queue=\"0\"} 600",
            "# TYPE ncp_replica_in_step gauge",
            "# TYPE ncp_flow_mods_sent counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
