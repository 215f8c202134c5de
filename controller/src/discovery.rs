//! Link discovery state: which switch ports see each other's LLDP probes, with expiry.
//! Pure; the service sends the probes and feeds back what arrives.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::lldp;
use crate::openflow::actions::OFPCML_NO_BUFFER;
use crate::openflow::messages::NO_BUFFER;
use crate::openflow::oxm::ETH_TYPE_LLDP;
use crate::openflow::{Action, Instruction, Match, Message, PacketOut, PortDesc, port};
use crate::rules::{FlowRule, RuleKind, cookie};
use crate::topology::{Dpid, PortRef, Topology};

/// Priority of the rule that lifts LLDP to the controller: above everything else.
pub const PRIORITY_LLDP: u16 = 65_000;
/// Priority of the optional fallback to OpenFlow NORMAL forwarding.
pub const PRIORITY_NORMAL: u16 = 1;

/// Rules every switch carries for the controller itself (cookie kind `Switch`): LLDP to
/// the controller and, when `normal_fallback`, plain learning-switch forwarding for all
/// traffic NCP does not steer (a controller-managed bridge forwards nothing on its own).
pub fn base_rules(dpid: Dpid, normal_fallback: bool) -> Vec<FlowRule> {
    let mut v = vec![FlowRule {
        dpid,
        table_id: 0,
        priority: PRIORITY_LLDP,
        cookie: cookie(RuleKind::Switch, 1),
        matched: Match {
            eth_type: Some(ETH_TYPE_LLDP),
            ..Match::default()
        },
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

    /// Forgets every link touching a port (port down) or a switch (`port == None`).
    pub fn forget(&mut self, dpid: Dpid, port: Option<u32>) {
        let hit = |p: &PortRef| p.dpid == dpid && port.is_none_or(|n| n == p.port);
        self.links.retain(|(a, b), _| !hit(a) && !hit(b));
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
            port_no: no,
            hw_addr: MacAddr([2, 0, 0, 0, 0, 1]),
            name: String::new(),
            config: if live { 0 } else { 1 },
            state: 0,
            curr: 0,
            advertised: 0,
            supported: 0,
            peer: 0,
            curr_speed: 0,
            max_speed: 0,
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
        let t0 = Instant::now();
        let mut d = Discovery::default();
        d.observe(PortRef::new(1, 1), PortRef::new(2, 1), t0);
        d.observe(PortRef::new(2, 2), PortRef::new(3, 1), t0);
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
    fn base_rules_are_ncp_owned() {
        let rules = base_rules(4, true);
        assert_eq!(rules.len(), 2);
        assert!(rules.iter().all(|r| crate::rules::is_ncp_cookie(r.cookie)));
        assert_eq!(base_rules(4, false).len(), 1);
    }
}
