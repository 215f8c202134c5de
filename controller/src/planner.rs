//! Redirection planning (paper §III-A): from a replication request and the topology,
//! compute the redirection switch and every rule needed to steer the flow to the
//! middlebox. Pure: no I/O, no clock, deterministic output for a given input.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use crate::openflow::oxm::{ETH_TYPE_IPV4, ETH_TYPE_MPLS, ETH_TYPE_VLAN, IP_PROTO_TCP};
use crate::openflow::{Action, Instruction, Ipv4Prefix, MacAddr, Match, OxmField};
use crate::rules::{
    FlowRule, PRIORITY_REDIRECT, PRIORITY_ROUTE, PRIORITY_TUNNEL, RuleKey, RuleKind, cookie,
};
use crate::topology::{Dpid, Hop, PortRef, Topology, TopologyError};

/// How redirected packets travel from the redirection switch to the middlebox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Rewrite the destination MAC at the redirection switch and install one routing rule
    /// per flow on every later switch (the paper's default).
    Rewrite,
    /// Push an 802.1Q tag naming the middlebox; later switches forward on the tag with
    /// one rule per middlebox, and the last switch pops it.
    Vlan { vid: u16 },
    /// Same with an MPLS label.
    Mpls { label: u32 },
}

impl Mode {
    /// Bytes the tunnel adds to every redirected frame between the redirection switch and
    /// the middlebox's switch (an 802.1Q tag or an MPLS label stack entry: 4). Those links
    /// need that much MTU headroom above the hosts' MTU, or full-size frames are dropped.
    pub fn header_overhead(&self) -> usize {
        match self {
            Mode::Rewrite => 0,
            Mode::Vlan { .. } | Mode::Mpls { .. } => 4,
        }
    }

    fn tag(&self) -> Option<u32> {
        match self {
            Mode::Rewrite => None,
            Mode::Vlan { vid } => Some(u32::from(*vid)),
            Mode::Mpls { label } => Some(*label),
        }
    }
}

/// An operator's request: replicate TCP traffic from `source` to `primary:primary_port`
/// through `middlebox`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replication {
    pub id: u32,
    /// Client addresses; every known host inside must sit on one switch.
    pub source: Ipv4Prefix,
    pub source_port: Option<u16>,
    pub primary: Ipv4Addr,
    pub primary_port: u16,
    pub middlebox: Ipv4Addr,
    pub mode: Mode,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("host {0} is not in the topology")]
    UnknownHost(Ipv4Addr),
    #[error("no known host inside source {0}")]
    NoSourceHost(Ipv4Prefix),
    #[error("hosts of source {0} sit on more than one switch")]
    SourceSpansSwitches(Ipv4Prefix),
    #[error("middlebox {0} is also the primary or inside the source")]
    MiddleboxOverlaps(Ipv4Addr),
    #[error("no route from switch {from:#x} to switch {to:#x}")]
    NoRoute { from: Dpid, to: Dpid },
    #[error("tag {tag} is out of range for this tunnel kind")]
    BadTag { tag: u32 },
    #[error("tag {tag} already names middlebox {other}")]
    TagConflict { tag: u32, other: Ipv4Addr },
    #[error("a rule on switch {dpid:#x} conflicts with one of replication {other}")]
    RuleConflict { dpid: Dpid, other: u32 },
    #[error(
        "middlebox {0} does not answer health probes; its traffic goes straight to the primary (fail-open)"
    )]
    MiddleboxDown(Ipv4Addr),
    #[error(
        "waiting for middlebox {0} to acknowledge this replication's service (its redirect goes in after that)"
    )]
    ServiceNotAcknowledged(Ipv4Addr),
    #[error(transparent)]
    Topology(#[from] TopologyError),
}

/// The plan for one replication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectPlan {
    pub id: u32,
    pub redirection_switch: Dpid,
    pub primary_route: Vec<Hop>,
    /// From the source to the middlebox, following the path the redirected packets take.
    pub middlebox_route: Vec<Hop>,
    /// Install order: the hop next to the middlebox first, the redirect rule last, so no
    /// packet is redirected before the path behind the redirect exists.
    pub rules: Vec<FlowRule>,
}

/// Plans one replication.
pub fn plan_replication(topo: &Topology, rep: &Replication) -> Result<RedirectPlan, PlanError> {
    let src_at = locate_source(topo, rep.source)?;
    let primary = *topo
        .host(rep.primary)
        .ok_or(PlanError::UnknownHost(rep.primary))?;
    let mb = *topo
        .host(rep.middlebox)
        .ok_or(PlanError::UnknownHost(rep.middlebox))?;
    if mb.ip == primary.ip || rep.source.contains(mb.ip) {
        return Err(PlanError::MiddleboxOverlaps(mb.ip));
    }
    match rep.mode {
        Mode::Vlan { vid } if vid == 0 || vid > 0x0ffe => {
            return Err(PlanError::BadTag {
                tag: u32::from(vid),
            });
        }
        Mode::Mpls { label } if !(16..=0x000f_ffff).contains(&label) => {
            return Err(PlanError::BadTag { tag: label });
        }
        _ => {}
    }

    // Both routes come from one tree rooted at the source's switch, so they share a
    // prefix and then never meet again; the last shared switch is the paper's LCA.
    let tree = topo.shortest_path_tree(src_at.dpid)?;
    let no_route = |to: Dpid| PlanError::NoRoute {
        from: src_at.dpid,
        to,
    };
    let primary_route = tree
        .route(src_at, primary.at)
        .ok_or(no_route(primary.at.dpid))?;
    let to_mb = tree.route(src_at, mb.at).ok_or(no_route(mb.at.dpid))?;
    let shared = primary_route
        .iter()
        .zip(&to_mb)
        .take_while(|(p, m)| p.dpid == m.dpid)
        .count();
    // Both routes start at the source's switch, so at least one switch is shared.
    let r = shared.saturating_sub(1);
    let redirection_switch = to_mb[r].dpid;

    let flow = flow_match(rep);
    let cookie_flow = cookie(RuleKind::Flow, rep.id);
    let mut rules = Vec::new();

    let middlebox_route = match rep.mode.tag() {
        None => {
            // Rewrite mode: per-flow routing rules behind the redirect, nearest the
            // middlebox first.
            for hop in to_mb[r + 1..].iter().rev() {
                let mut m = flow.clone();
                m.in_port = Some(hop.in_port);
                rules.push(FlowRule {
                    dpid: hop.dpid,
                    table_id: 0,
                    priority: PRIORITY_ROUTE,
                    cookie: cookie_flow,
                    matched: m,
                    instructions: apply(vec![Action::output(hop.out_port)]),
                });
            }
            rules.push(redirect_rule(&flow, to_mb[r], mb.mac, &[], cookie_flow));
            to_mb
        }
        Some(tag) => {
            // Tunnel mode: follow the tree rooted at the middlebox from the redirection
            // switch on, so each switch has one next hop per middlebox for all flows.
            let mb_tree = topo.shortest_path_tree(mb.at.dpid)?;
            let at_r = PortRef::new(redirection_switch, to_mb[r].in_port);
            let tail = mb_tree
                .route_to_root(at_r, mb.at)
                .ok_or(PlanError::NoRoute {
                    from: redirection_switch,
                    to: mb.at.dpid,
                })?;
            let cookie_tunnel = cookie(RuleKind::Tunnel, tag);
            let n = tail.len();
            for (i, hop) in tail.iter().enumerate().skip(1).rev() {
                let mut actions = Vec::new();
                if i + 1 == n {
                    actions.push(pop_tag(rep.mode));
                }
                actions.push(Action::output(hop.out_port));
                rules.push(FlowRule {
                    dpid: hop.dpid,
                    table_id: 0,
                    priority: PRIORITY_TUNNEL,
                    cookie: cookie_tunnel,
                    matched: tag_match(rep.mode),
                    instructions: apply(actions),
                });
            }
            // Tag only when the packet leaves the switch; a redirect on the middlebox's
            // own switch needs no tunnel.
            let push = if n > 1 {
                push_tag(rep.mode)
            } else {
                Vec::new()
            };
            rules.push(redirect_rule(&flow, tail[0], mb.mac, &push, cookie_flow));
            let mut route = to_mb[..r].to_vec();
            route.extend(tail);
            route
        }
    };

    Ok(RedirectPlan {
        id: rep.id,
        redirection_switch,
        primary_route,
        middlebox_route,
        rules,
    })
}

/// The switch port of the source: every known host inside the prefix must share a switch.
fn locate_source(topo: &Topology, source: Ipv4Prefix) -> Result<PortRef, PlanError> {
    let mut found: Option<PortRef> = None;
    for h in topo.hosts().filter(|h| source.contains(h.ip)) {
        match found {
            None => found = Some(h.at),
            Some(p) if p.dpid != h.at.dpid => return Err(PlanError::SourceSpansSwitches(source)),
            Some(_) => {}
        }
    }
    found.ok_or(if source.prefix_len() == 32 {
        PlanError::UnknownHost(source.addr())
    } else {
        PlanError::NoSourceHost(source)
    })
}

/// Match on the replicated TCP flow (prerequisites included).
fn flow_match(rep: &Replication) -> Match {
    Match {
        eth_type: Some(ETH_TYPE_IPV4),
        ip_proto: Some(IP_PROTO_TCP),
        ipv4_src: Some(rep.source),
        ipv4_dst: Some(Ipv4Prefix::host(rep.primary)),
        tcp_src: rep.source_port,
        tcp_dst: Some(rep.primary_port),
        ..Match::default()
    }
}

fn apply(actions: Vec<Action>) -> Vec<Instruction> {
    vec![Instruction::ApplyActions(actions)]
}

/// The redirect: rewrite the destination MAC to the middlebox (so its NIC accepts the
/// frame without promiscuous mode, in both modes), optionally tag, and send toward it.
fn redirect_rule(
    flow: &Match,
    hop: Hop,
    mb_mac: MacAddr,
    push: &[Action],
    cookie: u64,
) -> FlowRule {
    let mut actions = vec![Action::SetField(OxmField::EthDst(mb_mac))];
    actions.extend_from_slice(push);
    actions.push(Action::output(hop.out_port));
    FlowRule {
        dpid: hop.dpid,
        table_id: 0,
        priority: PRIORITY_REDIRECT,
        cookie,
        matched: flow.clone(),
        instructions: apply(actions),
    }
}

fn push_tag(mode: Mode) -> Vec<Action> {
    match mode {
        Mode::Rewrite => Vec::new(),
        Mode::Vlan { vid } => {
            vec![
                Action::PushVlan(ETH_TYPE_VLAN),
                Action::SetField(OxmField::VlanVid(vid)),
            ]
        }
        Mode::Mpls { label } => {
            vec![
                Action::PushMpls(ETH_TYPE_MPLS),
                Action::SetField(OxmField::MplsLabel(label)),
            ]
        }
    }
}

fn pop_tag(mode: Mode) -> Action {
    match mode {
        Mode::Mpls { .. } => Action::PopMpls(ETH_TYPE_IPV4),
        _ => Action::PopVlan,
    }
}

fn tag_match(mode: Mode) -> Match {
    match mode {
        Mode::Mpls { label } => Match {
            eth_type: Some(ETH_TYPE_MPLS),
            mpls_label: Some(label),
            ..Match::default()
        },
        Mode::Vlan { vid } => Match {
            vlan_vid: Some(vid),
            ..Match::default()
        },
        Mode::Rewrite => Match::default(),
    }
}

/// Desired state for the whole network.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Every rule once, in install order (see [`RedirectPlan::rules`]).
    pub rules: Vec<FlowRule>,
    pub plans: Vec<RedirectPlan>,
    /// Replications that could not be planned; the others are unaffected.
    pub failures: Vec<(u32, PlanError)>,
}

impl Plan {
    /// The desired rules of one switch, in install order.
    pub fn rules_for(&self, dpid: Dpid) -> Vec<FlowRule> {
        self.rules
            .iter()
            .filter(|r| r.dpid == dpid)
            .cloned()
            .collect()
    }
}

/// Plans all replications. A replication is planned all-or-nothing: if any of its rules
/// would clash with a rule already planned (same switch, priority and match, different
/// actions) or its tunnel tag already names another middlebox, it fails alone. Shared
/// tunnel rules are emitted once.
pub fn plan(topo: &Topology, replications: &[Replication]) -> Plan {
    let mut out = Plan::default();
    let mut owner: HashMap<(Dpid, RuleKey), (usize, u32)> = HashMap::new();
    let mut tags: HashMap<(bool, u32), Ipv4Addr> = HashMap::new();
    for rep in replications {
        let p = match plan_replication(topo, rep) {
            Ok(p) => p,
            Err(e) => {
                out.failures.push((rep.id, e));
                continue;
            }
        };
        if let Some(tag) = rep.mode.tag() {
            let kind = matches!(rep.mode, Mode::Mpls { .. });
            if let Some(other) = tags.get(&(kind, tag)).filter(|o| **o != rep.middlebox) {
                out.failures
                    .push((rep.id, PlanError::TagConflict { tag, other: *other }));
                continue;
            }
        }
        let mut fresh = Vec::new();
        let mut clash = None;
        for rule in &p.rules {
            match owner.get(&(rule.dpid, rule.key())) {
                Some((i, _)) if out.rules[*i] == *rule => {}
                Some((_, other)) => {
                    clash = Some(PlanError::RuleConflict {
                        dpid: rule.dpid,
                        other: *other,
                    });
                    break;
                }
                None => fresh.push(rule.clone()),
            }
        }
        if let Some(e) = clash {
            out.failures.push((rep.id, e));
            continue;
        }
        if let Some(tag) = rep.mode.tag() {
            tags.insert((matches!(rep.mode, Mode::Mpls { .. }), tag), rep.middlebox);
        }
        for rule in fresh {
            owner.insert((rule.dpid, rule.key()), (out.rules.len(), rep.id));
            out.rules.push(rule);
        }
        out.plans.push(p);
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::rules::{is_ncp_cookie, parse_cookie};
    use crate::topology::tests::{host, topo};

    pub(crate) const SRC: [u8; 4] = [198, 18, 4, 1];
    pub(crate) const PRIMARY: [u8; 4] = [198, 18, 5, 1];
    pub(crate) const MB: [u8; 4] = [198, 18, 6, 1];

    /// A three-level tree:
    /// ```text
    ///            s1
    ///          1/  \2
    ///         1/    \1
    ///         s2     s3
    ///       2/  \3     \2
    ///      1/    \1     \1
    ///     s4     s5     s6
    /// ```
    /// Hosts sit on port 10 and up of the leaf (or any) switches.
    pub(crate) fn tree() -> Topology {
        topo(
            &[1, 2, 3, 4, 5, 6],
            &[
                (1, 1, 2, 1),
                (1, 2, 3, 1),
                (2, 2, 4, 1),
                (2, 3, 5, 1),
                (3, 2, 6, 1),
            ],
        )
    }

    pub(crate) fn with_hosts(mut t: Topology, hosts: &[([u8; 4], Dpid, u32)]) -> Topology {
        for (ip, d, p) in hosts {
            t.add_host(host(*ip, *d, *p)).expect("valid host");
        }
        t
    }

    /// [`tree`] with the usual placement (source under s4, primary under s5, middlebox
    /// under s6, each on port 10) and then the `extra` hosts a test needs.
    pub(crate) fn placed_tree(extra: &[([u8; 4], Dpid, u32)]) -> Topology {
        let t = with_hosts(tree(), &[(SRC, 4, 10), (PRIMARY, 5, 10), (MB, 6, 10)]);
        with_hosts(t, extra)
    }

    pub(crate) fn rep(id: u32, mode: Mode) -> Replication {
        Replication {
            id,
            source: Ipv4Prefix::host(Ipv4Addr::from(SRC)),
            source_port: None,
            primary: Ipv4Addr::from(PRIMARY),
            primary_port: 80,
            middlebox: Ipv4Addr::from(MB),
            mode,
        }
    }

    fn outputs(r: &FlowRule) -> Vec<Action> {
        match r.instructions.as_slice() {
            [Instruction::ApplyActions(a)] => a.clone(),
            other => panic!("unexpected instructions {other:?}"),
        }
    }

    fn mb_mac() -> MacAddr {
        host(MB, 0, 0).mac
    }

    #[test]
    fn rewrite_mode_in_a_tree() {
        let t = placed_tree(&[]);
        let p = plan_replication(&t, &rep(7, Mode::Rewrite)).expect("plannable");
        assert_eq!(p.redirection_switch, 2);
        let dpids: Vec<Dpid> = p.rules.iter().map(|r| r.dpid).collect();
        assert_eq!(dpids, [6, 3, 1, 2], "middlebox side first, redirect last");
        for r in &p.rules {
            assert_eq!(parse_cookie(r.cookie), Some((RuleKind::Flow, 7)));
            assert_eq!(
                r.matched.ipv4_src,
                Some(Ipv4Prefix::host(Ipv4Addr::from(SRC)))
            );
            assert_eq!(
                r.matched.ipv4_dst,
                Some(Ipv4Prefix::host(Ipv4Addr::from(PRIMARY)))
            );
            assert_eq!(r.matched.tcp_dst, Some(80));
            assert_eq!(r.matched.eth_type, Some(ETH_TYPE_IPV4));
            assert_eq!(r.matched.ip_proto, Some(IP_PROTO_TCP));
        }
        // Routing rules: in_port of arrival, output to next hop.
        assert_eq!(
            (p.rules[0].matched.in_port, outputs(&p.rules[0])),
            (Some(1), vec![Action::output(10)])
        );
        assert_eq!(
            (p.rules[1].matched.in_port, outputs(&p.rules[1])),
            (Some(1), vec![Action::output(2)])
        );
        assert_eq!(
            (p.rules[2].matched.in_port, outputs(&p.rules[2])),
            (Some(1), vec![Action::output(2)])
        );
        assert!(p.rules[..3].iter().all(|r| r.priority == PRIORITY_ROUTE));
        // Redirect: no in_port, rewrite MAC, out toward s1.
        let redirect = &p.rules[3];
        assert_eq!(redirect.priority, PRIORITY_REDIRECT);
        assert_eq!(redirect.matched.in_port, None);
        assert_eq!(
            outputs(redirect),
            vec![
                Action::SetField(OxmField::EthDst(mb_mac())),
                Action::output(1)
            ]
        );
        let route: Vec<Dpid> = p.middlebox_route.iter().map(|h| h.dpid).collect();
        assert_eq!(route, [4, 2, 1, 3, 6]);
        let primary: Vec<Dpid> = p.primary_route.iter().map(|h| h.dpid).collect();
        assert_eq!(primary, [4, 2, 5]);
    }

    #[test]
    fn source_port_and_prefix_are_matched() {
        let t = placed_tree(&[([198, 18, 4, 2], 4, 11)]);
        let mut r = rep(1, Mode::Rewrite);
        r.source = Ipv4Prefix::new(Ipv4Addr::from(SRC), 24);
        r.source_port = Some(5555);
        let p = plan_replication(&t, &r).expect("plannable");
        assert!(p.rules.iter().all(|x| x.matched.tcp_src == Some(5555)));
        assert!(p.rules.iter().all(|x| x.matched.ipv4_src == Some(r.source)));
    }

    /// Rewrite mode for placements of the three hosts other than the usual one: where
    /// the redirect goes, which switches get rules (in install order) and, where it says
    /// something, the port the last rule sends to.
    #[test]
    fn rewrite_mode_for_host_placements() {
        struct Case {
            name: &'static str,
            hosts: [([u8; 4], Dpid, u32); 3],
            redirection_switch: Dpid,
            dpids: &'static [Dpid],
            last_output: Option<u32>,
        }
        let cases = [
            Case {
                name: "middlebox next to the primary redirects at the last switch",
                hosts: [(SRC, 4, 10), (PRIMARY, 5, 10), (MB, 5, 11)],
                redirection_switch: 5,
                dpids: &[5],
                last_output: Some(11),
            },
            Case {
                name: "all on one switch",
                hosts: [(SRC, 6, 10), (PRIMARY, 6, 11), (MB, 6, 12)],
                redirection_switch: 6,
                dpids: &[6],
                last_output: Some(12),
            },
            Case {
                name: "middlebox at the source switch",
                hosts: [(SRC, 4, 10), (PRIMARY, 6, 10), (MB, 4, 11)],
                redirection_switch: 4,
                dpids: &[4],
                last_output: None,
            },
            Case {
                name: "primary at the source switch, middlebox far",
                hosts: [(SRC, 4, 10), (PRIMARY, 4, 11), (MB, 6, 10)],
                redirection_switch: 4,
                dpids: &[6, 3, 1, 2, 4],
                last_output: None,
            },
        ];
        for c in cases {
            let t = with_hosts(tree(), &c.hosts);
            let p = plan_replication(&t, &rep(1, Mode::Rewrite)).expect(c.name);
            assert_eq!(p.redirection_switch, c.redirection_switch, "{}", c.name);
            let dpids: Vec<Dpid> = p.rules.iter().map(|r| r.dpid).collect();
            assert_eq!(dpids, c.dpids, "{}", c.name);
            if let Some(port) = c.last_output {
                let last = p.rules.last().expect(c.name);
                assert_eq!(
                    outputs(last).last(),
                    Some(&Action::output(port)),
                    "{}",
                    c.name
                );
            }
        }
    }

    #[test]
    fn tunnel_mode_needs_no_tag_when_nothing_leaves_the_switch() {
        let t = with_hosts(tree(), &[(SRC, 6, 10), (PRIMARY, 6, 11), (MB, 6, 12)]);
        let p = plan_replication(&t, &rep(1, Mode::Vlan { vid: 10 })).expect("plannable");
        assert_eq!(p.rules.len(), 1);
        assert_eq!(
            outputs(&p.rules[0]),
            vec![
                Action::SetField(OxmField::EthDst(mb_mac())),
                Action::output(12)
            ]
        );
    }

    #[test]
    fn vlan_tunnel_shares_rules_per_middlebox() {
        let other_primary = [198, 18, 5, 2];
        let t = placed_tree(&[(other_primary, 5, 11)]);
        let a = rep(1, Mode::Vlan { vid: 100 });
        let mut b = rep(2, Mode::Vlan { vid: 100 });
        b.primary = Ipv4Addr::from(other_primary);
        let plan = plan(&t, &[a, b]);
        assert!(plan.failures.is_empty(), "{:?}", plan.failures);
        // s1, s3, s6 once each, plus one redirect per flow on s2.
        assert_eq!(plan.rules.len(), 5);
        let tunnel: Vec<&FlowRule> = plan
            .rules
            .iter()
            .filter(|r| r.priority == PRIORITY_TUNNEL)
            .collect();
        assert_eq!(tunnel.len(), 3);
        for r in &tunnel {
            assert_eq!(parse_cookie(r.cookie), Some((RuleKind::Tunnel, 100)));
            assert_eq!(
                r.matched,
                Match {
                    vlan_vid: Some(100),
                    ..Match::default()
                }
            );
        }
        let last = tunnel
            .iter()
            .find(|r| r.dpid == 6)
            .expect("rule at middlebox switch");
        assert_eq!(outputs(last), vec![Action::PopVlan, Action::output(10)]);
        let redirects: Vec<&FlowRule> = plan
            .rules
            .iter()
            .filter(|r| r.priority == PRIORITY_REDIRECT)
            .collect();
        assert_eq!(redirects.len(), 2);
        assert_eq!(
            outputs(redirects[0]),
            vec![
                Action::SetField(OxmField::EthDst(mb_mac())),
                Action::PushVlan(ETH_TYPE_VLAN),
                Action::SetField(OxmField::VlanVid(100)),
                Action::output(1),
            ]
        );
        // Install order: the first redirect comes after all the tunnel rules it uses.
        let first_redirect = plan
            .rules
            .iter()
            .position(|r| r.priority == PRIORITY_REDIRECT);
        assert_eq!(first_redirect, Some(3));
        assert_eq!(plan.rules_for(2).len(), 2);
    }

    #[test]
    fn mpls_tunnel() {
        let t = placed_tree(&[]);
        let p = plan_replication(&t, &rep(3, Mode::Mpls { label: 1000 })).expect("plannable");
        let dpids: Vec<Dpid> = p.rules.iter().map(|r| r.dpid).collect();
        assert_eq!(dpids, [6, 3, 1, 2]);
        assert_eq!(
            p.rules[0].matched,
            Match {
                eth_type: Some(ETH_TYPE_MPLS),
                mpls_label: Some(1000),
                ..Match::default()
            }
        );
        assert_eq!(
            outputs(&p.rules[0]),
            vec![Action::PopMpls(ETH_TYPE_IPV4), Action::output(10)]
        );
        assert_eq!(
            outputs(&p.rules[3])[1..3],
            [
                Action::PushMpls(ETH_TYPE_MPLS),
                Action::SetField(OxmField::MplsLabel(1000))
            ]
        );
    }

    #[test]
    fn conflicts_fail_only_the_offender() {
        let mb2 = [198, 18, 6, 2];
        let t = placed_tree(&[(mb2, 3, 10)]);
        // Same tag for two middleboxes.
        let a = rep(1, Mode::Vlan { vid: 5 });
        let mut b = rep(2, Mode::Vlan { vid: 5 });
        b.middlebox = Ipv4Addr::from(mb2);
        b.primary_port = 81;
        let p = plan(&t, &[a.clone(), b]);
        assert_eq!(p.plans.len(), 1);
        assert!(matches!(
            p.failures.as_slice(),
            [(2, PlanError::TagConflict { tag: 5, .. })]
        ));
        // Same flow to two middleboxes.
        let mut c = rep(3, Mode::Rewrite);
        c.middlebox = Ipv4Addr::from(mb2);
        let p = plan(&t, &[rep(1, Mode::Rewrite), c]);
        assert!(matches!(
            p.failures.as_slice(),
            [(3, PlanError::RuleConflict { dpid: 3, other: 1 })]
        ));
        assert_eq!(p.rules.len(), 4);
        // Planning is deterministic.
        assert_eq!(plan(&t, std::slice::from_ref(&a)), plan(&t, &[a]));
    }

    #[test]
    fn errors() {
        let t = with_hosts(tree(), &[(SRC, 4, 10), (PRIMARY, 5, 10)]);
        assert_eq!(
            plan_replication(&t, &rep(1, Mode::Rewrite)),
            Err(PlanError::UnknownHost(Ipv4Addr::from(MB)))
        );
        let t = with_hosts(
            topo(&[1, 2], &[]),
            &[(SRC, 1, 10), (PRIMARY, 1, 11), (MB, 2, 10)],
        );
        assert_eq!(
            plan_replication(&t, &rep(1, Mode::Rewrite)),
            Err(PlanError::NoRoute { from: 1, to: 2 })
        );
        let t = placed_tree(&[([198, 18, 4, 9], 5, 12)]);
        let mut r = rep(1, Mode::Rewrite);
        r.source = Ipv4Prefix::new(Ipv4Addr::from(SRC), 24);
        assert!(matches!(
            plan_replication(&t, &r),
            Err(PlanError::SourceSpansSwitches(_))
        ));
        r.source = Ipv4Prefix::new(Ipv4Addr::new(198, 19, 0, 0), 16);
        assert!(matches!(
            plan_replication(&t, &r),
            Err(PlanError::NoSourceHost(_))
        ));
        assert_eq!(
            plan_replication(&t, &rep(1, Mode::Vlan { vid: 4095 })),
            Err(PlanError::BadTag { tag: 4095 })
        );
        let mut r = rep(1, Mode::Rewrite);
        r.middlebox = r.primary;
        assert!(matches!(
            plan_replication(&t, &r),
            Err(PlanError::MiddleboxOverlaps(_))
        ));
        assert!(is_ncp_cookie(cookie(RuleKind::Flow, 1)));
    }
}
