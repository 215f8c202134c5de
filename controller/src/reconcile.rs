//! Reconciliation: compare the rules a switch should hold with the rules it reports and
//! say what to change. Pure, so every case is a unit test.
//!
//! Ownership is decided by the cookie alone (see [`crate::rules`]): only rules carrying
//! the NCP magic are ever deleted or overwritten. A foreign rule sitting exactly where we
//! want one (same table, priority and match) is reported as a conflict and left alone,
//! because an ADD there would silently replace it.

use std::collections::{HashMap, HashSet};

use crate::rules::{FlowRule, RuleKey, is_ncp_cookie};

/// Changes that bring one switch to its desired state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    /// NCP rules to delete; redirects (highest priority) first, so that traffic stops
    /// being steered before the path behind it is taken away.
    pub delete: Vec<FlowRule>,
    /// Rules to add (an ADD also overwrites an outdated NCP rule with the same key), in
    /// the plan's install order.
    pub add: Vec<FlowRule>,
    /// Desired rules blocked by a foreign rule with the same key.
    pub conflicts: Vec<FlowRule>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.delete.is_empty() && self.add.is_empty() && self.conflicts.is_empty()
    }
}

/// Diffs `desired` (one switch's rules, in install order) against `actual` (everything
/// the switch reported, foreign rules included).
pub fn diff(desired: &[FlowRule], actual: &[FlowRule]) -> Diff {
    let by_key: HashMap<RuleKey, &FlowRule> = actual.iter().map(|r| (r.key(), r)).collect();
    let wanted: HashSet<RuleKey> = desired.iter().map(FlowRule::key).collect();
    let mut d = Diff::default();
    for want in desired {
        match by_key.get(&want.key()) {
            Some(have) if **have == *want => {}
            Some(have) if !is_ncp_cookie(have.cookie) => d.conflicts.push(want.clone()),
            _ => d.add.push(want.clone()),
        }
    }
    d.delete = actual
        .iter()
        .filter(|r| is_ncp_cookie(r.cookie) && !wanted.contains(&r.key()))
        .cloned()
        .collect();
    d.delete.sort_by_key(|r| std::cmp::Reverse(r.priority));
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openflow::{Action, Instruction, Match};
    use crate::rules::{PRIORITY_REDIRECT, PRIORITY_ROUTE, RuleKind, cookie};

    fn rule(in_port: u32, out: u32, priority: u16, cookie: u64) -> FlowRule {
        FlowRule {
            dpid: 1,
            table_id: 0,
            priority,
            cookie,
            matched: Match::in_port(in_port),
            instructions: vec![Instruction::ApplyActions(vec![Action::output(out)])],
        }
    }

    fn ncp(id: u32) -> u64 {
        cookie(RuleKind::Flow, id)
    }

    #[test]
    fn in_sync_is_empty() {
        let want = vec![rule(1, 2, PRIORITY_ROUTE, ncp(1))];
        let mut have = want.clone();
        have.push(rule(9, 9, 0, 0)); // a foreign table-miss rule
        assert!(diff(&want, &have).is_empty());
    }

    #[test]
    fn missing_rules_are_added_in_plan_order() {
        let want = vec![
            rule(1, 2, PRIORITY_ROUTE, ncp(1)),
            rule(3, 4, PRIORITY_REDIRECT, ncp(1)),
        ];
        let d = diff(&want, &[]);
        assert_eq!(d.add, want);
        assert!(d.delete.is_empty());
    }

    #[test]
    fn stale_ncp_rules_are_deleted_redirect_first_and_foreign_never() {
        let have = vec![
            rule(1, 2, PRIORITY_ROUTE, ncp(1)),
            rule(3, 4, PRIORITY_REDIRECT, ncp(1)),
            rule(5, 6, PRIORITY_ROUTE, 0x1234),
            rule(7, 8, PRIORITY_REDIRECT, 0x4e42_0001_0000_0001),
        ];
        let d = diff(&[], &have);
        assert_eq!(d.delete, vec![have[1].clone(), have[0].clone()]);
        assert!(d.add.is_empty() && d.conflicts.is_empty());
    }

    #[test]
    fn changed_ncp_rule_is_overwritten() {
        let want = vec![rule(1, 3, PRIORITY_ROUTE, ncp(2))];
        let have = vec![rule(1, 2, PRIORITY_ROUTE, ncp(1))];
        let d = diff(&want, &have);
        assert_eq!(d.add, want);
        assert!(
            d.delete.is_empty(),
            "same key: the ADD replaces it, no delete needed"
        );
    }

    #[test]
    fn foreign_rule_on_our_key_is_a_conflict() {
        let want = vec![rule(1, 3, PRIORITY_ROUTE, ncp(2))];
        let have = vec![rule(1, 2, PRIORITY_ROUTE, 0xabcd)];
        let d = diff(&want, &have);
        assert_eq!(d.conflicts, want);
        assert!(d.add.is_empty() && d.delete.is_empty());
    }
}
