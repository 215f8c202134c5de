//! Brings switches to the planned state and says which replications are installed.
//!
//! Order matters for traffic in flight. Changes go out in four phases, each closed by a
//! barrier on every switch it touched:
//! 1. delete stale redirects, so nothing is steered onto a path about to change;
//! 2. add route and tunnel rules (the middlebox side);
//! 3. add redirects, now that the path behind them exists;
//! 4. delete stale route and tunnel rules, no longer used by any redirect.
//!
//! A replication counts as installed only when every one of its rules is confirmed: in
//! sync already, or added and followed by a barrier reply with no error for it.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use crate::openflow::{FlowStatsRequest, Message};
use crate::planner::Plan;
use crate::reconcile::{Diff, diff};
use crate::rules::{FlowRule, PRIORITY_REDIRECT, RuleKey, RuleKind, parse_cookie};
use crate::switch::{Controller, SwitchError};
use crate::topology::Dpid;

/// Outcome on one switch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SwitchReport {
    pub added: usize,
    pub deleted: usize,
    /// Rules the switch refused, with OpenFlow error type and code.
    pub rejected: Vec<(FlowRule, u16, u16)>,
    /// Desired rules blocked by a foreign rule (see [`crate::reconcile`]).
    pub conflicts: Vec<FlowRule>,
    /// Set when the switch could not be read or did not confirm a batch.
    pub error: Option<SwitchError>,
}

/// Outcome of one synchronisation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstallReport {
    pub switches: BTreeMap<Dpid, SwitchReport>,
    /// Replications whose every rule is confirmed on its switch.
    pub installed: BTreeSet<u32>,
    pub not_installed: BTreeSet<u32>,
    /// Replications whose redirect this run added (it was missing on its switch).
    pub redirects_added: BTreeSet<u32>,
}

/// Reads every switch in `dpids`, diffs it against `plan` and applies the difference.
/// Switches of the plan that are not in `dpids` (not connected) leave their
/// replications not installed.
pub async fn sync(ctl: &Controller, plan: &Plan, dpids: &[Dpid]) -> InstallReport {
    let (flows, report) = read(ctl, dpids).await;
    sync_read(ctl, plan, &flows, report).await
}

/// Every rule of every switch in `dpids` (foreign ones too: a foreign rule on one of our
/// keys must be seen). Switches that cannot be read are left out of the map and carry
/// their error in the report.
pub async fn read(
    ctl: &Controller,
    dpids: &[Dpid],
) -> (BTreeMap<Dpid, Vec<FlowRule>>, InstallReport) {
    let mut flows = BTreeMap::new();
    let mut report = InstallReport::default();
    for &dpid in dpids {
        match ctl
            .flow_stats(dpid, FlowStatsRequest::by_cookie(0, 0))
            .await
        {
            Ok(stats) => {
                let have: Vec<FlowRule> = stats
                    .iter()
                    .map(|s| FlowRule::from_stats(dpid, s))
                    .collect();
                flows.insert(dpid, have);
            }
            Err(e) => {
                tracing::warn!(dpid = format_args!("{dpid:#x}"), error = %e, "cannot read flows");
                report.switches.entry(dpid).or_default().error = Some(e);
            }
        }
    }
    (flows, report)
}

/// Diffs what [`read`] returned against `plan` and applies the difference.
pub async fn sync_read(
    ctl: &Controller,
    plan: &Plan,
    flows: &BTreeMap<Dpid, Vec<FlowRule>>,
    report: InstallReport,
) -> InstallReport {
    let diffs = flows
        .iter()
        .map(|(dpid, have)| (*dpid, diff(&plan.rules_for(*dpid), have)))
        .collect();
    apply(ctl, plan, diffs, report).await
}

fn is_redirect(r: &FlowRule) -> bool {
    r.priority == PRIORITY_REDIRECT
}

/// Applies per-switch diffs in the four phases and fills in the report.
pub async fn apply(
    ctl: &Controller,
    plan: &Plan,
    diffs: BTreeMap<Dpid, Diff>,
    mut report: InstallReport,
) -> InstallReport {
    // (name, adds rather than deletes, redirect rules rather than the others)
    let phases = [
        ("delete stale redirects", false, true),
        ("add routes", true, false),
        ("add redirects", true, true),
        ("delete stale routes", false, false),
    ];
    for (name, add, redirects) in phases {
        for (&dpid, d) in &diffs {
            let sw = report.switches.entry(dpid).or_default();
            if sw.error.is_some() {
                continue;
            }
            let list = if add { &d.add } else { &d.delete };
            let batch: Vec<&FlowRule> = list
                .iter()
                .filter(|r| is_redirect(r) == redirects)
                .collect();
            if batch.is_empty() {
                continue;
            }
            let msgs = batch
                .iter()
                .map(|r| Message::FlowMod(if add { r.to_add() } else { r.to_delete() }))
                .collect();
            tracing::debug!(
                dpid = format_args!("{dpid:#x}"),
                phase = name,
                n = batch.len(),
                "applying"
            );
            match ctl.apply(dpid, msgs).await {
                Ok(rejected) => {
                    let refused: HashSet<usize> = rejected.iter().map(|r| r.index).collect();
                    for r in &rejected {
                        if let Some(rule) = batch.get(r.index) {
                            tracing::warn!(
                                dpid = format_args!("{dpid:#x}"),
                                phase = name,
                                err_type = r.err_type,
                                code = r.code,
                                ?rule,
                                "switch refused a rule"
                            );
                            sw.rejected.push(((*rule).clone(), r.err_type, r.code));
                        }
                    }
                    let done = batch.len().saturating_sub(refused.len());
                    if add && redirects {
                        report.redirects_added.extend(
                            batch
                                .iter()
                                .enumerate()
                                .filter(|(i, _)| !refused.contains(i))
                                .filter_map(|(_, r)| match parse_cookie(r.cookie) {
                                    Some((RuleKind::Flow, id)) => Some(id),
                                    _ => None,
                                }),
                        );
                    }
                    if add {
                        sw.added += done;
                    } else {
                        sw.deleted += done;
                    }
                }
                Err(e) => {
                    tracing::warn!(dpid = format_args!("{dpid:#x}"), phase = name, error = %e, "batch not confirmed");
                    sw.error = Some(e);
                }
            }
        }
    }
    for (&dpid, d) in &diffs {
        report.switches.entry(dpid).or_default().conflicts = d.conflicts.clone();
    }

    // Which rules are not confirmed.
    let mut bad: HashSet<(Dpid, RuleKey)> = HashSet::new();
    let mut bad_switches: HashSet<Dpid> = HashSet::new();
    for (dpid, sw) in &report.switches {
        if sw.error.is_some() {
            bad_switches.insert(*dpid);
        }
        for r in sw
            .conflicts
            .iter()
            .chain(sw.rejected.iter().map(|(r, _, _)| r))
        {
            bad.insert((*dpid, r.key()));
        }
    }
    for p in &plan.plans {
        let ok = p.rules.iter().all(|r| {
            diffs.contains_key(&r.dpid)
                && !bad_switches.contains(&r.dpid)
                && !bad.contains(&(r.dpid, r.key()))
        });
        if ok {
            report.installed.insert(p.id);
        } else {
            report.not_installed.insert(p.id);
        }
    }
    for (id, _) in &plan.failures {
        report.not_installed.insert(*id);
    }
    report
}
