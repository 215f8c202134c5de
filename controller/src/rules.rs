//! The rule value shared by planner, reconciler and installer, and the cookie that marks
//! a rule as NCP's own.
//!
//! Cookie layout (64 bits): `0x4E43` ("NC") in bits 63..48 claims ownership; bits 47..32
//! say what the rule is for; bits 31..0 carry the replication id (per-flow rules) or the
//! tunnel tag (per-middlebox rules). The reconciler only ever deletes rules whose top 16
//! bits are the magic, and every delete it issues is cookie-exact, so rules of other
//! controllers or of the operator are never touched.

use crate::openflow::{FLOW_FLAG_SEND_FLOW_REM, FlowMod, FlowStats, Instruction, Match};
use crate::topology::Dpid;

/// Ownership magic in the cookie's top 16 bits.
pub const COOKIE_MAGIC: u64 = 0x4e43 << 48;
/// Mask selecting the magic; use with flow-stats requests to list only NCP rules.
pub const COOKIE_MAGIC_MASK: u64 = 0xffff << 48;

/// What a rule does, stored in cookie bits 47..32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RuleKind {
    /// Per-flow rule (redirect, or hop toward the middlebox); low bits = replication id.
    Flow = 1,
    /// Per-middlebox tunnel rule shared by all flows; low bits = tag.
    Tunnel = 2,
    /// A rule every switch carries for the controller itself (LLDP, fallback forwarding,
    /// host learning, health-probe replies).
    Switch = 3,
    /// Forwarding for a port that carries a discovered link; low bits = port number.
    Port = 4,
    /// Forwarding for a known host at its edge port; low bits = its IPv4 address. The rule
    /// also stores where the host was learned, so a restarted controller reads it back.
    Host = 5,
}

/// Builds an NCP cookie.
pub fn cookie(kind: RuleKind, id: u32) -> u64 {
    COOKIE_MAGIC | ((kind as u64) << 32) | u64::from(id)
}

/// True when the cookie carries NCP's magic.
pub fn is_ncp_cookie(cookie: u64) -> bool {
    cookie & COOKIE_MAGIC_MASK == COOKIE_MAGIC
}

/// Splits an NCP cookie into kind and id; `None` for foreign or unknown-kind cookies.
pub fn parse_cookie(c: u64) -> Option<(RuleKind, u32)> {
    if !is_ncp_cookie(c) {
        return None;
    }
    let id = u32::try_from(c & 0xffff_ffff).ok()?;
    match (c >> 32) & 0xffff {
        1 => Some((RuleKind::Flow, id)),
        2 => Some((RuleKind::Tunnel, id)),
        3 => Some((RuleKind::Switch, id)),
        4 => Some((RuleKind::Port, id)),
        5 => Some((RuleKind::Host, id)),
        _ => None,
    }
}

/// Rule priorities. Redirects must beat the tunnel/route rules of the same switch (a
/// redirect switch can also be a transit hop for another flow) and all of them must beat
/// whatever forwarding the switch already does.
pub const PRIORITY_REDIRECT: u16 = 40_000;
pub const PRIORITY_TUNNEL: u16 = 39_500;
pub const PRIORITY_ROUTE: u16 = 39_000;

/// One OpenFlow rule on one switch, as planned or as reported back.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FlowRule {
    pub dpid: Dpid,
    pub table_id: u8,
    pub priority: u16,
    pub cookie: u64,
    pub matched: Match,
    pub instructions: Vec<Instruction>,
}

/// A switch identifies a rule by table, priority and match; a second ADD with the same
/// key replaces the first.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RuleKey {
    pub table_id: u8,
    pub priority: u16,
    pub matched: Match,
}

impl FlowRule {
    pub fn key(&self) -> RuleKey {
        RuleKey {
            table_id: self.table_id,
            priority: self.priority,
            matched: self.matched.clone(),
        }
    }

    /// The FLOW_MOD that installs this rule. It asks for a FLOW_REMOVED, so a rule
    /// deleted behind the controller's back (by hand, by another tool) triggers a
    /// reconcile at once instead of waiting for the periodic one.
    pub fn to_add(&self) -> FlowMod {
        let mut fm = FlowMod::add(
            self.cookie,
            self.priority,
            self.matched.clone(),
            self.instructions.clone(),
        );
        fm.table_id = self.table_id;
        fm.flags |= FLOW_FLAG_SEND_FLOW_REM;
        fm
    }

    /// The FLOW_MOD that removes exactly this rule (strict match, cookie-exact).
    pub fn to_delete(&self) -> FlowMod {
        let mut fm = FlowMod::delete_strict(self.cookie, self.priority, self.matched.clone());
        fm.table_id = self.table_id;
        fm
    }

    /// A rule as reported by a switch's flow statistics.
    pub fn from_stats(dpid: Dpid, s: &FlowStats) -> Self {
        Self {
            dpid,
            table_id: s.table_id,
            priority: s.priority,
            cookie: s.cookie,
            matched: s.matched.clone(),
            instructions: s.instructions.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_roundtrip_and_ownership() {
        let c = cookie(RuleKind::Flow, 7);
        assert_eq!(c, 0x4e43_0001_0000_0007);
        assert!(is_ncp_cookie(c));
        assert_eq!(parse_cookie(c), Some((RuleKind::Flow, 7)));
        assert_eq!(
            parse_cookie(cookie(RuleKind::Tunnel, 100)),
            Some((RuleKind::Tunnel, 100))
        );
        assert!(!is_ncp_cookie(0));
        assert!(!is_ncp_cookie(0x4e42_0001_0000_0007));
        assert_eq!(parse_cookie(0x4e43_0009_0000_0001), None);
        assert_eq!(
            parse_cookie(cookie(RuleKind::Host, 0xc612_030b)),
            Some((RuleKind::Host, 0xc612_030b))
        );
        assert_eq!(
            parse_cookie(cookie(RuleKind::Port, 3)),
            Some((RuleKind::Port, 3))
        );
    }

    #[test]
    fn delete_is_strict_and_cookie_exact() {
        let r = FlowRule {
            dpid: 1,
            table_id: 0,
            priority: PRIORITY_ROUTE,
            cookie: cookie(RuleKind::Flow, 1),
            matched: Match::in_port(1),
            instructions: vec![],
        };
        let d = r.to_delete();
        assert_eq!(d.cookie_mask, u64::MAX);
        assert_eq!(d.command, crate::openflow::FlowModCommand::DeleteStrict);
        assert_eq!(d.matched, r.matched);
    }
}
