//! Packets pushed through planned flow tables (a test model, after Faucet's fake-table
//! tests): instead of comparing the planner's rule lists with expected lists, follow a
//! packet from the client's port switch by switch, applying the highest-priority matching
//! rule's actions, across the topology's links, to the port where it leaves the network.
//! A switch without a matching rule forwards as the test bed's switches do without the
//! controller: toward the host that owns the destination MAC, on the shortest path.
//!
//! What a walk checks that a rule-list comparison cannot: that the redirect, the tunnel
//! rules and the last hop fit together into one working path; which headers a packet
//! carries on every link (the tunnel's extra bytes, which full-size frames must have room
//! for); and that no rule sends a packet in a loop.

use std::net::Ipv4Addr;

use crate::openflow::oxm::{ETH_TYPE_IPV4, ETH_TYPE_MPLS, IP_PROTO_TCP};
use crate::openflow::{Action, Instruction, MacAddr, Match, OxmField};
use crate::rules::FlowRule;
use crate::topology::{Dpid, PortRef, Topology};

/// The headers of a TCP/IPv4 packet as the tables see them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub eth_src: MacAddr,
    pub eth_dst: MacAddr,
    /// 802.1Q tag's VLAN id, if tagged.
    pub vlan: Option<u16>,
    /// MPLS label, if one was pushed.
    pub mpls: Option<u32>,
    pub ipv4_src: Ipv4Addr,
    pub ipv4_dst: Ipv4Addr,
    pub tcp_src: u16,
    pub tcp_dst: u16,
}

impl Packet {
    /// Bytes the tags add to the frame.
    pub fn tag_bytes(&self) -> usize {
        4 * usize::from(self.vlan.is_some()) + 4 * usize::from(self.mpls.is_some())
    }

    fn matched_by(&self, m: &Match, in_port: u32) -> bool {
        let eth_type = if self.mpls.is_some() {
            ETH_TYPE_MPLS
        } else {
            ETH_TYPE_IPV4
        };
        // Behind an MPLS label the IP header is not visible to the tables.
        let ip = self.mpls.is_none();
        m.other.is_empty()
            && m.metadata.is_none()
            && m.in_port.is_none_or(|p| p == in_port)
            && m.eth_dst.is_none_or(|v| v == self.eth_dst)
            && m.eth_src.is_none_or(|v| v == self.eth_src)
            && m.eth_type.is_none_or(|v| v == eth_type)
            && m.vlan_vid.is_none_or(|v| Some(v) == self.vlan)
            && m.mpls_label.is_none_or(|v| Some(v) == self.mpls)
            && m.ip_proto.is_none_or(|v| ip && v == IP_PROTO_TCP)
            && m.ipv4_src.is_none_or(|v| ip && v.contains(self.ipv4_src))
            && m.ipv4_dst.is_none_or(|v| ip && v.contains(self.ipv4_dst))
            && m.tcp_src.is_none_or(|v| ip && v == self.tcp_src)
            && m.tcp_dst.is_none_or(|v| ip && v == self.tcp_dst)
    }
}

/// One link a packet crossed, with the tag bytes it carried there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crossing {
    pub from: PortRef,
    pub tag_bytes: usize,
}

/// Where a walk ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Walk {
    /// The edge port it left the network by, with the packet as it left.
    pub exit: PortRef,
    pub packet: Packet,
    /// Every switch-to-switch link it crossed.
    pub crossings: Vec<Crossing>,
    /// Switches where a planned rule (not the default forwarding) decided.
    pub ruled_at: Vec<Dpid>,
}

/// Why a walk did not reach an edge port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lost {
    /// A rule dropped it (no output), or default forwarding knew no way.
    Dropped(Dpid),
    /// More hops than switches: a loop.
    Looped,
    /// A rule used an action the model does not know.
    Unmodelled(Dpid),
}

/// Follows `packet` from the edge port `start` through `rules` (all switches').
pub fn walk(
    topo: &Topology,
    rules: &[FlowRule],
    start: PortRef,
    mut packet: Packet,
) -> Result<Walk, Lost> {
    let mut at = start;
    let mut crossings = Vec::new();
    let mut ruled_at = Vec::new();
    let limit = topo.switches().count() + 1;
    for _ in 0..limit {
        let rule = rules
            .iter()
            .filter(|r| r.dpid == at.dpid && r.table_id == 0)
            .filter(|r| packet.matched_by(&r.matched, at.port))
            .max_by_key(|r| r.priority);
        let out = match rule {
            Some(rule) => {
                ruled_at.push(at.dpid);
                apply(rule, &mut packet).ok_or(Lost::Unmodelled(at.dpid))?
            }
            None => default_forwarding(topo, at, packet.eth_dst),
        }
        .ok_or(Lost::Dropped(at.dpid))?;
        let from = PortRef::new(at.dpid, out);
        match topo.peer(from) {
            Some(next) => {
                crossings.push(Crossing {
                    from,
                    tag_bytes: packet.tag_bytes(),
                });
                at = next;
            }
            None => {
                return Ok(Walk {
                    exit: from,
                    packet,
                    crossings,
                    ruled_at,
                });
            }
        }
    }
    Err(Lost::Looped)
}

/// Applies a rule's actions; `Some(None)`: no output; `None`: an unmodelled action.
fn apply(rule: &FlowRule, packet: &mut Packet) -> Option<Option<u32>> {
    let mut out = None;
    for instruction in &rule.instructions {
        let Instruction::ApplyActions(actions) = instruction else {
            return None;
        };
        for action in actions {
            match action {
                Action::Output { port, .. } => out = Some(*port),
                Action::SetField(OxmField::EthDst(m)) => packet.eth_dst = *m,
                Action::SetField(OxmField::EthSrc(m)) => packet.eth_src = *m,
                Action::PushVlan(_) => packet.vlan = Some(0),
                Action::SetField(OxmField::VlanVid(v)) if packet.vlan.is_some() => {
                    packet.vlan = Some(*v);
                }
                Action::PopVlan if packet.vlan.is_some() => packet.vlan = None,
                Action::PushMpls(_) => packet.mpls = Some(0),
                Action::SetField(OxmField::MplsLabel(l)) if packet.mpls.is_some() => {
                    packet.mpls = Some(*l);
                }
                Action::PopMpls(_) if packet.mpls.is_some() => packet.mpls = None,
                _ => return None,
            }
        }
    }
    Some(out)
}

/// A switch's own forwarding: toward the host owning `eth_dst`, on the shortest path.
fn default_forwarding(topo: &Topology, at: PortRef, eth_dst: MacAddr) -> Option<u32> {
    let host = topo.hosts().find(|h| h.mac == eth_dst)?;
    let tree = topo.shortest_path_tree(host.at.dpid).ok()?;
    let hops = tree.route_to_root(at, host.at)?;
    hops.first().map(|h| h.out_port)
}

#[cfg(test)]
#[path = "fake_switches_tests.rs"]
mod tests;
