//! Link discovery state: which switch ports see each other's LLDP probes, with expiry.
//! Pure; the service sends the probes and feeds back what arrives.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::health::PROBE_MAC;
use crate::hosts::ETH_TYPE_ARP;
use crate::lldp;
use crate::openflow::actions::OFPCML_NO_BUFFER;
use crate::openflow::messages::NO_BUFFER;
use crate::openflow::oxm::{ETH_TYPE_IPV4, ETH_TYPE_LLDP};
use crate::openflow::{Action, Instruction, Ipv4Prefix, Match, Message, PacketOut, PortDesc, port};
use crate::rules::{FlowRule, RuleKind, cookie, parse_cookie};
use crate::topology::{Dpid, Host, PortRef, Topology};

/// Priority of the rule that lifts LLDP to the controller: above everything else.
pub const PRIORITY_LLDP: u16 = 65_000;
/// Priority of the rule that lifts replies to health probes to the controller.
pub const PRIORITY_PROBE_REPLY: u16 = 60_000;
/// Priority of the rules for known senders: link ports and known hosts at their ports.
pub const PRIORITY_KNOWN: u16 = 3;
/// Priority of the rules that copy ARP and IPv4 from unknown senders to the controller.
pub const PRIORITY_LEARN: u16 = 2;
/// Priority of the optional fallback to OpenFlow NORMAL forwarding.
pub const PRIORITY_NORMAL: u16 = 1;
/// Bytes of a learning PACKET_IN: enough for Ethernet, ARP and the IPv4 header.
pub const LEARN_MAX_LEN: u16 = 128;

/// Rules every switch carries for the controller itself (cookie kind `Switch`): LLDP to
/// the controller and, when `normal_fallback`, plain learning-switch forwarding for all
/// traffic NCP does not steer (a controller-managed bridge forwards nothing on its own).
pub fn base_rules(dpid: Dpid, normal_fallback: bool) -> Vec<FlowRule> {
    let mut v = vec![FlowRule {
        dpid,
        table_id: 0,
        priority: PRIORITY_LLDP,
        cookie: cookie(RuleKind::Switch, 1),
        matched: Match::eth_type(ETH_TYPE_LLDP),
        instructions: vec![Instruction::ApplyActions(vec![Action::Output {
            port: port::CONTROLLER,
            max_len: OFPCML_NO_BUFFER,
        }])],
    }];
    if normal_fallback {
        v.push(FlowRule {
            dpid,
            table_id: 0,
            priority: PRIORITY_NORMAL,
            cookie: cookie(RuleKind::Switch, 2),
            matched: Match::default(),
            instructions: vec![Instruction::ApplyActions(vec![Action::output(
                port::NORMAL,
            )])],
        });
    }
    v
}

/// What the switch does with traffic it does not steer: NORMAL, or nothing.
fn forward(normal_fallback: bool) -> Vec<Action> {
    if normal_fallback {
        vec![Action::output(port::NORMAL)]
    } else {
        Vec::new()
    }
}

fn rule(dpid: Dpid, priority: u16, cookie: u64, matched: Match, actions: Vec<Action>) -> FlowRule {
    FlowRule {
        dpid,
        table_id: 0,
        priority,
        cookie,
        matched,
        instructions: vec![Instruction::ApplyActions(actions)],
    }
}

/// The rule that lifts replies to health probes (ARP to [`PROBE_MAC`]) to the controller.
pub fn probe_reply_rule(dpid: Dpid) -> FlowRule {
    rule(
        dpid,
        PRIORITY_PROBE_REPLY,
        cookie(RuleKind::Switch, 3),
        Match {
            eth_dst: Some(PROBE_MAC),
            eth_type: Some(ETH_TYPE_ARP),
            ..Match::default()
        },
        vec![Action::Output {
            port: port::CONTROLLER,
            max_len: OFPCML_NO_BUFFER,
        }],
    )
}

/// Host learning (see [`crate::hosts`]). ARP and IPv4 from senders the controller does
/// not know are copied to the controller (first [`LEARN_MAX_LEN`] bytes) and forwarded
/// as usual. Known senders are exempt, so the controller sees each host about once:
/// everything arriving on `exempt_ports` (ports with a discovered link, which carry
/// transit traffic, and middlebox ports, where a middlebox sends as the primary), and IPv4 from
/// each known host at its own port (the rule also records where the host is, which a
/// restarted controller reads back with [`host_from_rule`]). A host that moves sends
/// from a port where no exemption matches, so its next packet reports the move. ARP is
/// always copied from edge ports: it is rare, and it is how a moved host announces
/// itself.
pub fn learning_rules<'a>(
    dpid: Dpid,
    normal_fallback: bool,
    exempt_ports: impl IntoIterator<Item = u32>,
    hosts: impl IntoIterator<Item = &'a Host>,
) -> Vec<FlowRule> {
    let copy = |eth_type: u16, id: u32| {
        let mut actions = vec![Action::Output {
            port: port::CONTROLLER,
            max_len: LEARN_MAX_LEN,
        }];
        actions.extend(forward(normal_fallback));
        rule(
            dpid,
            PRIORITY_LEARN,
            cookie(RuleKind::Switch, id),
            Match::eth_type(eth_type),
            actions,
        )
    };
    let mut v = vec![copy(ETH_TYPE_ARP, 4), copy(ETH_TYPE_IPV4, 5)];
    for p in exempt_ports {
        v.push(rule(
            dpid,
            PRIORITY_KNOWN,
            cookie(RuleKind::Port, p),
            Match::in_port(p),
            forward(normal_fallback),
        ));
    }
    for h in hosts.into_iter().filter(|h| h.at.dpid == dpid) {
        v.push(rule(
            dpid,
            PRIORITY_KNOWN,
            cookie(RuleKind::Host, u32::from(h.ip)),
            Match {
                in_port: Some(h.at.port),
                eth_src: Some(h.mac),
                eth_type: Some(ETH_TYPE_IPV4),
                ipv4_src: Some(Ipv4Prefix::host(h.ip)),
                ..Match::default()
            },
            forward(normal_fallback),
        ));
    }
    v
}

/// The host a known-host rule (see [`learning_rules`]) records.
pub fn host_from_rule(r: &FlowRule) -> Option<Host> {
    let (RuleKind::Host, id) = parse_cookie(r.cookie)? else {
        return None;
    };
    let m = &r.matched;
    let ip = m.ipv4_src.filter(|p| p.prefix_len() == 32)?.addr();
    (u32::from(ip) == id).then_some(Host {
        ip,
        mac: m.eth_src?,
        at: PortRef::new(r.dpid, m.in_port?),
    })
}

/// PACKET_OUTs sending one probe out of every live physical port.
pub fn probes(dpid: Dpid, ports: &[PortDesc], ttl: Duration) -> Vec<Message> {
    let ttl_secs = u16::try_from(ttl.as_secs()).unwrap_or(u16::MAX);
    ports
        .iter()
        .filter(|p| p.port_no <= port::MAX && p.is_live())
        .map(|p| {
            Message::PacketOut(PacketOut {
                buffer_id: NO_BUFFER,
                in_port: port::CONTROLLER,
                actions: vec![Action::output(p.port_no)],
                data: lldp::probe(dpid, p.port_no, p.hw_addr, ttl_secs),
            })
        })
        .collect()
}

/// Links seen recently.
#[derive(Debug, Clone, Default)]
pub struct Discovery {
    /// Keyed by (lower end, higher end).
    links: BTreeMap<(PortRef, PortRef), Instant>,
}

impl Discovery {
    /// Records a probe from `from` received at `at`. Returns true for a new link.
    pub fn observe(&mut self, from: PortRef, at: PortRef, now: Instant) -> bool {
        if from.dpid == at.dpid && from.port == at.port {
            return false;
        }
        let key = if from < at { (from, at) } else { (at, from) };
        self.links.insert(key, now).is_none()
    }

    /// Handles a PACKET_IN payload received on `at`; returns true for a new link.
    pub fn on_packet_in(&mut self, at: PortRef, data: &[u8], now: Instant) -> bool {
        match lldp::parse_probe(data) {
            Some((dpid, port)) => self.observe(PortRef::new(dpid, port), at, now),
            None => false,
        }
    }

    /// Forgets links not refreshed within `ttl`; returns the forgotten ones.
    pub fn expire(&mut self, now: Instant, ttl: Duration) -> Vec<(PortRef, PortRef)> {
        let old: Vec<_> = self
            .links
            .iter()
            .filter(|(_, seen)| now.saturating_duration_since(**seen) > ttl)
            .map(|(k, _)| *k)
            .collect();
        for k in &old {
            self.links.remove(k);
        }
        old
    }

    /// Forgets every link touching a port (port down) or a switch (`port == None`);
    /// returns how many were forgotten.
    pub fn forget(&mut self, dpid: Dpid, port: Option<u32>) -> usize {
        let hit = |p: &PortRef| p.dpid == dpid && port.is_none_or(|n| n == p.port);
        let before = self.links.len();
        self.links.retain(|(a, b), _| !hit(a) && !hit(b));
        before - self.links.len()
    }

    /// True when a discovered link uses this port.
    pub fn is_link_port(&self, p: PortRef) -> bool {
        self.links.keys().any(|(a, b)| *a == p || *b == p)
    }

    /// The ports of `dpid` that carry discovered links.
    pub fn link_ports(&self, dpid: Dpid) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .links
            .keys()
            .flat_map(|(a, b)| [*a, *b])
            .filter(|p| p.dpid == dpid)
            .map(|p| p.port)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    pub fn links(&self) -> impl Iterator<Item = (PortRef, PortRef)> + '_ {
        self.links.keys().copied()
    }

    /// Adds the discovered links to `topo` (switches must already be there). Links that
    /// clash with what `topo` holds (a port already used) are skipped with a log line.
    pub fn apply_to(&self, topo: &mut Topology) {
        for (a, b) in self.links() {
            if let Err(e) = topo.add_link(a, b) {
                tracing::debug!(?a, ?b, error = %e, "discovered link not used");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openflow::MacAddr;

    fn port_desc(no: u32, live: bool) -> PortDesc {
        PortDesc {
            config: if live { 0 } else { 1 },
            ..PortDesc::new(no, MacAddr([2, 0, 0, 0, 0, 1]), String::new())
        }
    }

    #[test]
    fn probes_skip_down_and_reserved_ports() {
        let ports = [
            port_desc(1, true),
            port_desc(2, false),
            port_desc(port::LOCAL, true),
        ];
        let msgs = probes(9, &ports, Duration::from_secs(30));
        assert_eq!(msgs.len(), 1);
        let Message::PacketOut(po) = &msgs[0] else {
            panic!("packet out expected")
        };
        assert_eq!(po.actions, vec![Action::output(1)]);
        assert_eq!(lldp::parse_probe(&po.data), Some((9, 1)));
    }

    /// Discovery that has just seen each pair of ports in `links` as a link.
    fn discovered(links: &[(PortRef, PortRef)]) -> Discovery {
        let t0 = Instant::now();
        let mut d = Discovery::default();
        for &(a, b) in links {
            d.observe(a, b, t0);
        }
        d
    }

    #[test]
    fn links_are_learned_refreshed_and_expired() {
        let t0 = Instant::now();
        let mut d = Discovery::default();
        let probe = lldp::probe(1, 3, MacAddr::default(), 30);
        assert!(d.on_packet_in(PortRef::new(2, 1), &probe, t0));
        // The probe in the other direction is the same link.
        let back = lldp::probe(2, 1, MacAddr::default(), 30);
        assert!(!d.on_packet_in(PortRef::new(1, 3), &back, t0 + Duration::from_secs(5)));
        assert_eq!(d.links().count(), 1);
        assert!(
            d.expire(t0 + Duration::from_secs(10), Duration::from_secs(8))
                .is_empty()
        );
        assert_eq!(
            d.expire(t0 + Duration::from_secs(20), Duration::from_secs(8))
                .len(),
            1
        );
        assert!(!d.on_packet_in(PortRef::new(2, 1), &[0u8; 60], t0));
    }

    #[test]
    fn forget_and_apply() {
        let mut d = discovered(&[
            (PortRef::new(1, 1), PortRef::new(2, 1)),
            (PortRef::new(2, 2), PortRef::new(3, 1)),
        ]);
        let mut topo = Topology::new();
        for s in [1, 2, 3] {
            topo.add_switch(s);
        }
        d.apply_to(&mut topo);
        assert_eq!(topo.links().count(), 2);
        d.forget(2, Some(2));
        assert_eq!(d.links().count(), 1);
        d.forget(1, None);
        assert_eq!(d.links().count(), 0);
    }

    #[test]
    fn learning_rules_and_host_readback() {
        let h = Host {
            ip: std::net::Ipv4Addr::new(198, 18, 3, 11),
            mac: MacAddr([2, 0, 0xc6, 0x12, 3, 0x0b]),
            at: PortRef::new(0x31, 1),
        };
        let elsewhere = Host {
            at: PortRef::new(0x32, 1),
            ..h
        };
        let rules = learning_rules(0x31, true, [3], [&h, &elsewhere]);
        // ARP copy, IPv4 copy, link port 3, host h (not the host on another switch).
        assert_eq!(rules.len(), 4);
        assert!(rules.iter().all(|r| crate::rules::is_ncp_cookie(r.cookie)));
        let copies: Vec<&FlowRule> = rules
            .iter()
            .filter(|r| r.priority == PRIORITY_LEARN)
            .collect();
        assert_eq!(copies.len(), 2);
        assert!(copies.iter().all(|r| r.instructions
            == vec![Instruction::ApplyActions(vec![
                Action::Output {
                    port: port::CONTROLLER,
                    max_len: LEARN_MAX_LEN
                },
                Action::output(port::NORMAL)
            ])]));
        let recovered: Vec<Host> = rules.iter().filter_map(host_from_rule).collect();
        assert_eq!(recovered, vec![h]);
        // Without the fallback, exempted traffic is dropped rather than forwarded.
        let quiet = learning_rules(0x31, false, [3], []);
        assert_eq!(
            quiet[2].instructions,
            vec![Instruction::ApplyActions(vec![])]
        );
        assert_eq!(probe_reply_rule(1).matched.eth_dst, Some(PROBE_MAC));
    }

    #[test]
    fn link_ports_are_listed_once() {
        let mut d = discovered(&[
            (PortRef::new(1, 1), PortRef::new(2, 1)),
            (PortRef::new(1, 2), PortRef::new(3, 1)),
        ]);
        assert_eq!(d.link_ports(1), vec![1, 2]);
        assert!(d.is_link_port(PortRef::new(3, 1)));
        assert!(!d.is_link_port(PortRef::new(3, 2)));
        assert_eq!(d.forget(1, Some(1)), 1);
        assert_eq!(d.link_ports(1), vec![2]);
    }

    #[test]
    fn base_rules_are_ncp_owned() {
        let rules = base_rules(4, true);
        assert_eq!(rules.len(), 2);
        assert!(rules.iter().all(|r| crate::rules::is_ncp_cookie(r.cookie)));
        assert_eq!(base_rules(4, false).len(), 1);
    }
}
