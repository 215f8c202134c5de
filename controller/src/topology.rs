//! Switch topology model and shortest-path trees.
//!
//! Pure data: discovery (LLDP, port status) or an operator file fills it, the planner reads
//! it. Every collection is ordered (`BTreeMap`/`BTreeSet`) so that route choice, and hence
//! the rules we install, never depends on hash order or insertion order.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::Ipv4Addr;

use crate::openflow::MacAddr;

/// OpenFlow datapath id.
pub type Dpid = u64;

/// A port on a switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRef {
    pub dpid: Dpid,
    pub port: u32,
}

impl PortRef {
    pub const fn new(dpid: Dpid, port: u32) -> Self {
        Self { dpid, port }
    }
}

/// An end host attached to a switch port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
    pub at: PortRef,
}

/// Rejected topology edits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    #[error("switch {0:#x} is not known")]
    UnknownSwitch(Dpid),
    #[error("port {0:?} already carries a link or a host")]
    PortInUse(PortRef),
    #[error("a link cannot join a port to itself")]
    SelfLink,
}

/// Switches, bidirectional links between switch ports, and hosts at switch ports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topology {
    switches: BTreeSet<Dpid>,
    /// Both directions of every link, so a port's peer is one lookup away.
    links: BTreeMap<PortRef, PortRef>,
    hosts: BTreeMap<Ipv4Addr, Host>,
}

/// One switch on a route with the ports a packet uses there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop {
    pub dpid: Dpid,
    pub in_port: u32,
    pub out_port: u32,
}

impl Topology {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_switch(&mut self, dpid: Dpid) {
        self.switches.insert(dpid);
    }

    /// Removes a switch with its links and hosts.
    pub fn remove_switch(&mut self, dpid: Dpid) {
        self.switches.remove(&dpid);
        self.links.retain(|a, b| a.dpid != dpid && b.dpid != dpid);
        self.hosts.retain(|_, h| h.at.dpid != dpid);
    }

    pub fn switches(&self) -> impl Iterator<Item = Dpid> + '_ {
        self.switches.iter().copied()
    }

    pub fn has_switch(&self, dpid: Dpid) -> bool {
        self.switches.contains(&dpid)
    }

    fn port_in_use(&self, p: PortRef) -> bool {
        self.links.contains_key(&p) || self.hosts.values().any(|h| h.at == p)
    }

    /// Adds a link between two switch ports. Re-adding the same link is a no-op; a port
    /// already used by something else is an error (discovery removes stale links first).
    pub fn add_link(&mut self, a: PortRef, b: PortRef) -> Result<(), TopologyError> {
        if a == b {
            return Err(TopologyError::SelfLink);
        }
        for p in [a, b] {
            if !self.switches.contains(&p.dpid) {
                return Err(TopologyError::UnknownSwitch(p.dpid));
            }
        }
        if self.links.get(&a) == Some(&b) {
            return Ok(());
        }
        for p in [a, b] {
            if self.port_in_use(p) {
                return Err(TopologyError::PortInUse(p));
            }
        }
        self.links.insert(a, b);
        self.links.insert(b, a);
        Ok(())
    }

    /// Removes whatever link uses this port (e.g. on port-down).
    pub fn remove_link_at(&mut self, p: PortRef) {
        if let Some(peer) = self.links.remove(&p) {
            self.links.remove(&peer);
        }
    }

    /// The far end of a link, if this port carries one.
    pub fn peer(&self, p: PortRef) -> Option<PortRef> {
        self.links.get(&p).copied()
    }

    /// Each link once, as (lower end, higher end).
    pub fn links(&self) -> impl Iterator<Item = (PortRef, PortRef)> + '_ {
        self.links
            .iter()
            .filter(|(a, b)| a < b)
            .map(|(a, b)| (*a, *b))
    }

    /// Adds or moves a host (keyed by IPv4 address).
    pub fn add_host(&mut self, host: Host) -> Result<(), TopologyError> {
        if !self.switches.contains(&host.at.dpid) {
            return Err(TopologyError::UnknownSwitch(host.at.dpid));
        }
        if self.links.contains_key(&host.at) {
            return Err(TopologyError::PortInUse(host.at));
        }
        self.hosts.insert(host.ip, host);
        Ok(())
    }

    pub fn host(&self, ip: Ipv4Addr) -> Option<&Host> {
        self.hosts.get(&ip)
    }

    pub fn hosts(&self) -> impl Iterator<Item = &Host> {
        self.hosts.values()
    }

    /// Links leaving `dpid`, ordered by local port number.
    fn neighbours(&self, dpid: Dpid) -> impl Iterator<Item = (PortRef, PortRef)> + '_ {
        self.links
            .range(PortRef::new(dpid, 0)..=PortRef::new(dpid, u32::MAX))
            .map(|(a, b)| (*a, *b))
    }

    /// Breadth-first shortest-path tree rooted at `root`. Ties are broken
    /// deterministically: switches are expanded in BFS order and, within a switch, links
    /// in ascending local port number, so the first (lowest-port) discovery wins.
    pub fn shortest_path_tree(&self, root: Dpid) -> Result<PathTree, TopologyError> {
        if !self.switches.contains(&root) {
            return Err(TopologyError::UnknownSwitch(root));
        }
        let mut parent = BTreeMap::new();
        let mut seen = BTreeSet::from([root]);
        let mut queue = VecDeque::from([root]);
        while let Some(d) = queue.pop_front() {
            for (local, remote) in self.neighbours(d) {
                if seen.insert(remote.dpid) {
                    parent.insert(remote.dpid, (local, remote.port));
                    queue.push_back(remote.dpid);
                }
            }
        }
        Ok(PathTree { root, parent })
    }
}

/// (switch, in port from the previous switch, out port to the next switch).
type PathStep = (Dpid, Option<u32>, Option<u32>);

/// Result of [`Topology::shortest_path_tree`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTree {
    root: Dpid,
    /// For each reached switch but the root: (parent's out port, own in port).
    parent: BTreeMap<Dpid, (PortRef, u32)>,
}

impl PathTree {
    pub fn root(&self) -> Dpid {
        self.root
    }

    pub fn reaches(&self, dpid: Dpid) -> bool {
        dpid == self.root || self.parent.contains_key(&dpid)
    }

    /// Switch-level path from the root to `to`: each entry is (switch, in port from the
    /// previous switch, out port to the next). The first in port and the last out port are
    /// `None`; callers fill them with host ports. `None` when `to` is unreachable.
    fn switch_path(&self, to: Dpid) -> Option<Vec<PathStep>> {
        if !self.reaches(to) {
            return None;
        }
        let mut rev = vec![(to, None, None)];
        let mut cur = to;
        while cur != self.root {
            let (up, in_port) = *self.parent.get(&cur)?;
            if let Some(last) = rev.last_mut() {
                last.1 = Some(in_port);
            }
            rev.push((up.dpid, None, Some(up.port)));
            cur = up.dpid;
            if rev.len() > self.parent.len() + 1 {
                return None; // cannot happen for a tree; guards against a corrupt one
            }
        }
        rev.reverse();
        Some(rev)
    }

    /// Route from a host at `from` up the tree to a host at `to` on the root switch: the
    /// reverse direction of [`PathTree::route`]. Used with a tree rooted at a middlebox's
    /// switch, it gives every switch one fixed next hop toward that middlebox, whatever
    /// flow is being carried, which is what lets tunnel rules be per middlebox.
    pub fn route_to_root(&self, from: PortRef, to: PortRef) -> Option<Vec<Hop>> {
        if to.dpid != self.root || !self.reaches(from.dpid) {
            return None;
        }
        let mut hops = Vec::new();
        let mut cur = from.dpid;
        let mut in_port = from.port;
        while cur != self.root {
            let (up, own_port) = *self.parent.get(&cur)?;
            hops.push(Hop {
                dpid: cur,
                in_port,
                out_port: own_port,
            });
            in_port = up.port;
            cur = up.dpid;
            if hops.len() > self.parent.len() {
                return None;
            }
        }
        hops.push(Hop {
            dpid: self.root,
            in_port,
            out_port: to.port,
        });
        Some(hops)
    }

    /// Route from a host at `from` (which must sit on the root switch) to a host at `to`,
    /// as hops with concrete ports.
    pub fn route(&self, from: PortRef, to: PortRef) -> Option<Vec<Hop>> {
        if from.dpid != self.root {
            return None;
        }
        let path = self.switch_path(to.dpid)?;
        let n = path.len();
        Some(
            path.into_iter()
                .enumerate()
                .map(|(i, (dpid, in_port, out_port))| Hop {
                    dpid,
                    in_port: if i == 0 {
                        from.port
                    } else {
                        in_port.unwrap_or(from.port)
                    },
                    out_port: if i + 1 == n {
                        to.port
                    } else {
                        out_port.unwrap_or(to.port)
                    },
                })
                .collect(),
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn host(ip: [u8; 4], dpid: Dpid, port: u32) -> Host {
        Host {
            ip: Ipv4Addr::from(ip),
            mac: MacAddr([2, 0, ip[0], ip[1], ip[2], ip[3]]),
            at: PortRef::new(dpid, port),
        }
    }

    /// A hop through `dpid`, in at `in_port`, out at `out_port`.
    fn hop(dpid: Dpid, in_port: u32, out_port: u32) -> Hop {
        Hop {
            dpid,
            in_port,
            out_port,
        }
    }

    /// Links (a, pa) <-> (b, pb).
    pub fn topo(switches: &[Dpid], links: &[(Dpid, u32, Dpid, u32)]) -> Topology {
        let mut t = Topology::new();
        for s in switches {
            t.add_switch(*s);
        }
        for (a, pa, b, pb) in links {
            t.add_link(PortRef::new(*a, *pa), PortRef::new(*b, *pb))
                .expect("valid link");
        }
        t
    }

    #[test]
    fn bfs_prefers_fewer_hops_then_lower_port() {
        // 1 -p1- 2 -p2- 4 and 1 -p2- 3 -p2- 4 : two equal paths to 4; via port 1 wins.
        let t = topo(
            &[1, 2, 3, 4],
            &[(1, 1, 2, 1), (1, 2, 3, 1), (2, 2, 4, 1), (3, 2, 4, 2)],
        );
        let tree = t.shortest_path_tree(1).expect("root known");
        let p = tree
            .route(PortRef::new(1, 10), PortRef::new(4, 10))
            .expect("reachable");
        assert_eq!(p, vec![hop(1, 10, 1), hop(2, 1, 2), hop(4, 1, 10)]);
        // Insertion order must not matter.
        let t2 = topo(
            &[4, 3, 2, 1],
            &[(3, 2, 4, 2), (2, 2, 4, 1), (1, 2, 3, 1), (1, 1, 2, 1)],
        );
        assert_eq!(
            t2.shortest_path_tree(1)
                .expect("root")
                .route(PortRef::new(1, 10), PortRef::new(4, 10)),
            Some(p)
        );
    }

    #[test]
    fn route_to_root_reverses_route() {
        let t = topo(&[1, 2, 3], &[(1, 1, 2, 1), (2, 2, 3, 1)]);
        let tree = t.shortest_path_tree(3).expect("root");
        let up = tree
            .route_to_root(PortRef::new(1, 9), PortRef::new(3, 8))
            .expect("reachable");
        assert_eq!(up, vec![hop(1, 9, 1), hop(2, 1, 2), hop(3, 1, 8)]);
        let down = tree
            .route(PortRef::new(3, 8), PortRef::new(1, 9))
            .expect("reachable");
        let back: Vec<Hop> = down
            .iter()
            .rev()
            .map(|h| hop(h.dpid, h.out_port, h.in_port))
            .collect();
        assert_eq!(back, up);
    }

    #[test]
    fn same_switch_route_is_one_hop() {
        let t = topo(&[7], &[]);
        let tree = t.shortest_path_tree(7).expect("root");
        assert_eq!(
            tree.route(PortRef::new(7, 1), PortRef::new(7, 2)),
            Some(vec![hop(7, 1, 2)])
        );
    }

    #[test]
    fn unreachable_and_unknown() {
        let t = topo(&[1, 2], &[]);
        assert_eq!(
            t.shortest_path_tree(9),
            Err(TopologyError::UnknownSwitch(9))
        );
        let tree = t.shortest_path_tree(1).expect("root");
        assert!(!tree.reaches(2));
        assert_eq!(tree.route(PortRef::new(1, 1), PortRef::new(2, 1)), None);
    }

    #[test]
    fn link_and_host_bookkeeping() {
        let mut t = topo(&[1, 2], &[(1, 1, 2, 1)]);
        assert_eq!(t.add_link(PortRef::new(1, 1), PortRef::new(2, 1)), Ok(()));
        assert_eq!(
            t.add_link(PortRef::new(1, 1), PortRef::new(2, 2)),
            Err(TopologyError::PortInUse(PortRef::new(1, 1)))
        );
        assert_eq!(
            t.add_host(host([198, 18, 0, 1], 1, 1)),
            Err(TopologyError::PortInUse(PortRef::new(1, 1)))
        );
        t.add_host(host([198, 18, 0, 1], 1, 5)).expect("free port");
        assert_eq!(t.links().count(), 1);
        assert_eq!(t.peer(PortRef::new(2, 1)), Some(PortRef::new(1, 1)));
        t.remove_link_at(PortRef::new(2, 1));
        assert_eq!(t.links().count(), 0);
        t.remove_switch(1);
        assert!(t.host(Ipv4Addr::new(198, 18, 0, 1)).is_none());
    }
}
