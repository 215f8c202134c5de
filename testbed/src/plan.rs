//! From a topology and a prefix to the exact set of Linux and OVS objects to create.
//! Pure code: `up` executes a plan, tests predict names and port numbers from it.
//!
//! Naming (every name starts with `<prefix>-`, which is how `down` finds leftovers):
//!
//! | object                         | name                          | example          |
//! |--------------------------------|-------------------------------|------------------|
//! | host namespace                 | `<prefix>-<host>`             | `ncp-source`     |
//! | OVS bridge                     | `<prefix>-<switch>`           | `ncp-prod`       |
//! | root-side veth end (bridge port)| `<prefix>-<switch>-p<ofport>` | `ncp-prod-p1`    |
//! | host-side veth end             | the interface name from the file, inside the namespace | `eth0` |
//!
//! Root-side veth ends are named after the switch port they plug into, not after the host,
//! because host and interface names together rarely fit Linux's 15-character limit
//! (`ncp-middlebox-eth0` is 18). Both ends of a switch-to-switch link live in the root
//! namespace and are ports of their bridges, so they follow the same rule.
//!
//! The prefix is 1-8 characters of `[a-z0-9]` starting with a letter; host and switch names
//! contain no `-`. So `<prefix>-` can never be the start of a name made with another prefix.
//!
//! Port numbers: a port given in the file is used as is. The others are handed out per
//! switch, lowest free number first, in file order: host interfaces (hosts in order, each
//! host's interfaces in order) before switch links (in order, end `a` before end `b`).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use crate::error::{Error, Result};
use crate::topology::{IFNAME_MAX, MAX_OFPORT, Mac, Topology};

/// Default prefix for every name the test bed creates.
pub const DEFAULT_PREFIX: &str = "ncp";
/// Longest prefix accepted; leaves room for switch names in 15-character interface names.
pub const PREFIX_MAX: usize = 8;

/// Everything `up` creates for one topology and prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub prefix: String,
    pub namespaces: Vec<NamespacePlan>,
    pub bridges: Vec<BridgePlan>,
    pub host_links: Vec<HostLink>,
    pub switch_links: Vec<SwitchLink>,
}

/// One host's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespacePlan {
    pub host: String,
    pub netns: String,
}

/// One OVS bridge and its ports, sorted by port number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgePlan {
    pub switch: String,
    pub bridge: String,
    pub dpid: u64,
    pub ports: Vec<PortPlan>,
}

impl BridgePlan {
    /// The datapath id in the 16-hex-digit form OVS's `other-config:datapath-id` wants.
    pub fn dpid_hex(&self) -> String {
        format!("{:016x}", self.dpid)
    }
}

/// One bridge port: a root-side veth end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPlan {
    pub ofport: u16,
    /// Name of the veth end in the root namespace (also the OVS port/interface name).
    pub ifname: String,
    pub peer: Peer,
}

/// What is at the other end of a bridge port's cable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Host { host: String, iface: String },
    Switch { switch: String, ofport: u16 },
}

/// A veth pair from a host interface (inside the namespace) to a bridge port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLink {
    pub host: String,
    pub netns: String,
    pub iface: String,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub mac: Mac,
    pub switch: String,
    pub bridge: String,
    pub ofport: u16,
    pub root_ifname: String,
    /// Queues of both veth ends.
    pub queues: u16,
}

/// A veth pair between two bridges, both ends in the root namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwitchLink {
    pub a: String,
    pub a_ofport: u16,
    pub a_ifname: String,
    pub b: String,
    pub b_ofport: u16,
    pub b_ifname: String,
}

/// Checks that `prefix` is usable (see the module docs for the rule and why).
pub fn validate_prefix(prefix: &str) -> Result<()> {
    let mut chars = prefix.chars();
    let ok = matches!(chars.next(), Some('a'..='z'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9'))
        && prefix.len() <= PREFIX_MAX;
    if ok {
        Ok(())
    } else {
        Err(Error::Name(format!(
            "prefix `{prefix}` must be 1 to {PREFIX_MAX} characters of a-z and 0-9, starting with a letter"
        )))
    }
}

/// Namespace name of `host` under `prefix`.
pub fn netns_name(prefix: &str, host: &str) -> String {
    format!("{prefix}-{host}")
}

/// Bridge name of `switch` under `prefix`.
pub fn bridge_name(prefix: &str, switch: &str) -> String {
    format!("{prefix}-{switch}")
}

/// Name of the root-side veth end plugged into `ofport` of `switch`.
pub fn port_ifname(prefix: &str, switch: &str, ofport: u16) -> String {
    format!("{prefix}-{switch}-p{ofport}")
}

fn check_ifname(name: &str, what: &str) -> Result<()> {
    if name.len() > IFNAME_MAX {
        return Err(Error::Name(format!(
            "interface name `{name}` ({what}) has {} characters, Linux allows at most {IFNAME_MAX}: use a shorter prefix or {what} name",
            name.len()
        )));
    }
    Ok(())
}

/// Hands out port numbers on one switch: requested ones are reserved up front so that
/// automatic numbering never takes a number a later entry asked for.
struct PortAllocator {
    used: BTreeSet<u16>,
    next: u16,
}

impl PortAllocator {
    fn new(reserved: BTreeSet<u16>) -> Self {
        PortAllocator {
            used: reserved,
            next: 1,
        }
    }

    fn take(&mut self, requested: Option<u16>, switch: &str) -> Result<u16> {
        if let Some(p) = requested {
            return Ok(p);
        }
        while self.used.contains(&self.next) {
            if self.next == MAX_OFPORT {
                return Err(Error::Name(format!(
                    "switch `{switch}` has more ports than OpenFlow port numbers"
                )));
            }
            self.next += 1;
        }
        let p = self.next;
        self.used.insert(p);
        Ok(p)
    }
}

impl Plan {
    /// Computes the plan. Fails if the prefix is bad or a derived interface name is too long.
    pub fn new(topology: &Topology, prefix: &str) -> Result<Plan> {
        validate_prefix(prefix)?;

        let mut allocators: Vec<PortAllocator> = topology
            .switches
            .iter()
            .map(|s| {
                let mut reserved = BTreeSet::new();
                for i in topology.hosts.iter().flat_map(|h| &h.interfaces) {
                    if let (true, Some(p)) = (i.switch == s.name, i.port) {
                        reserved.insert(p);
                    }
                }
                for l in &topology.links {
                    if let (true, Some(p)) = (l.a == s.name, l.a_port) {
                        reserved.insert(p);
                    }
                    if let (true, Some(p)) = (l.b == s.name, l.b_port) {
                        reserved.insert(p);
                    }
                }
                PortAllocator::new(reserved)
            })
            .collect();
        let switch_index = |name: &str| -> Result<usize> {
            topology
                .switches
                .iter()
                .position(|s| s.name == name)
                .ok_or_else(|| Error::Unknown(format!("switch `{name}` is not in the topology")))
        };

        let mut bridges: Vec<BridgePlan> = topology
            .switches
            .iter()
            .map(|s| BridgePlan {
                switch: s.name.clone(),
                bridge: bridge_name(prefix, &s.name),
                dpid: s.dpid,
                ports: Vec::new(),
            })
            .collect();
        for b in &bridges {
            check_ifname(&b.bridge, "switch")?;
        }

        let mut namespaces = Vec::new();
        let mut host_links = Vec::new();
        for host in &topology.hosts {
            let netns = netns_name(prefix, &host.name);
            namespaces.push(NamespacePlan {
                host: host.name.clone(),
                netns: netns.clone(),
            });
            for iface in &host.interfaces {
                let si = switch_index(&iface.switch)?;
                let ofport = allocators[si].take(iface.port, &iface.switch)?;
                let root_ifname = port_ifname(prefix, &iface.switch, ofport);
                check_ifname(&root_ifname, "switch")?;
                bridges[si].ports.push(PortPlan {
                    ofport,
                    ifname: root_ifname.clone(),
                    peer: Peer::Host {
                        host: host.name.clone(),
                        iface: iface.name.clone(),
                    },
                });
                host_links.push(HostLink {
                    host: host.name.clone(),
                    netns: netns.clone(),
                    iface: iface.name.clone(),
                    address: iface.address,
                    prefix_len: iface.prefix_len,
                    mac: iface.mac,
                    switch: iface.switch.clone(),
                    bridge: bridges[si].bridge.clone(),
                    ofport,
                    root_ifname,
                    queues: iface.queues,
                });
            }
        }

        let mut switch_links = Vec::new();
        for link in &topology.links {
            let ai = switch_index(&link.a)?;
            let bi = switch_index(&link.b)?;
            let a_ofport = allocators[ai].take(link.a_port, &link.a)?;
            let b_ofport = allocators[bi].take(link.b_port, &link.b)?;
            let a_ifname = port_ifname(prefix, &link.a, a_ofport);
            let b_ifname = port_ifname(prefix, &link.b, b_ofport);
            check_ifname(&a_ifname, "switch")?;
            check_ifname(&b_ifname, "switch")?;
            bridges[ai].ports.push(PortPlan {
                ofport: a_ofport,
                ifname: a_ifname.clone(),
                peer: Peer::Switch {
                    switch: link.b.clone(),
                    ofport: b_ofport,
                },
            });
            bridges[bi].ports.push(PortPlan {
                ofport: b_ofport,
                ifname: b_ifname.clone(),
                peer: Peer::Switch {
                    switch: link.a.clone(),
                    ofport: a_ofport,
                },
            });
            switch_links.push(SwitchLink {
                a: link.a.clone(),
                a_ofport,
                a_ifname,
                b: link.b.clone(),
                b_ofport,
                b_ifname,
            });
        }
        for b in &mut bridges {
            b.ports.sort_by_key(|p| p.ofport);
        }

        Ok(Plan {
            prefix: prefix.to_string(),
            namespaces,
            bridges,
            host_links,
            switch_links,
        })
    }

    /// The host link for `host`'s interface `iface`.
    pub fn host_link(&self, host: &str, iface: &str) -> Result<&HostLink> {
        self.host_links
            .iter()
            .find(|l| l.host == host && l.iface == iface)
            .ok_or_else(|| Error::Unknown(format!("host `{host}` has no interface `{iface}`")))
    }

    /// The bridge plan of `switch`.
    pub fn bridge(&self, switch: &str) -> Result<&BridgePlan> {
        self.bridges
            .iter()
            .find(|b| b.switch == switch)
            .ok_or_else(|| Error::Unknown(format!("switch `{switch}` is not in the topology")))
    }

    /// The port number on `switch` that leads to `peer`.
    ///
    /// `peer` is `host:iface`, a bare host name (when exactly one of that host's interfaces is
    /// on `switch`), or a neighbouring switch's name (when exactly one link joins the two).
    pub fn ofport(&self, switch: &str, peer: &str) -> Result<u16> {
        let bridge = self.bridge(switch)?;
        let (name, iface) = match peer.split_once(':') {
            Some((h, i)) => (h, Some(i)),
            None => (peer, None),
        };
        let matches: Vec<u16> = bridge
            .ports
            .iter()
            .filter(|p| match (&p.peer, iface) {
                (Peer::Host { host, iface: i }, Some(want)) => host == name && i == want,
                (Peer::Host { host, .. }, None) => host == name,
                (Peer::Switch { switch, .. }, None) => switch == name,
                (Peer::Switch { .. }, Some(_)) => false,
            })
            .map(|p| p.ofport)
            .collect();
        match matches.as_slice() {
            [one] => Ok(*one),
            [] => Err(Error::Unknown(format!(
                "switch `{switch}` has no port leading to `{peer}`"
            ))),
            many => Err(Error::Unknown(format!(
                "switch `{switch}` has {} ports leading to `{peer}` (ports {many:?}); name the interface as host:iface",
                many.len()
            ))),
        }
    }

    /// Every root-namespace interface name the plan creates (bridges and veth ends).
    pub fn root_ifnames(&self) -> Vec<String> {
        let mut names: Vec<String> = self.bridges.iter().map(|b| b.bridge.clone()).collect();
        for b in &self.bridges {
            names.extend(b.ports.iter().map(|p| p.ifname.clone()));
        }
        names
    }
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
