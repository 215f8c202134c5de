//! Topology files: parsing and validation. Pure code, no system access.
//!
//! A topology is a TOML document with three arrays of tables:
//!
//! ```toml
//! description = "optional free text"
//!
//! [[switch]]
//! name = "prod"          # [a-z][a-z0-9_]*; the OVS bridge is named "<prefix>-<name>"
//! dpid = 1               # OpenFlow datapath id, non-zero, unique
//!
//! [[host]]
//! name = "source"        # [a-z][a-z0-9_]*; the namespace is named "<prefix>-<name>"
//!
//! [[host.iface]]
//! name = "eth0"          # interface name inside the namespace (at most 15 characters)
//! switch = "prod"        # switch this NIC is plugged into
//! address = "198.18.1.1/24"   # must lie inside 198.18.0.0/15
//! mac = "02:00:c6:12:01:01"   # fixed unicast MAC, unique
//! port = 1               # optional OpenFlow port number on the switch
//! queues = 2             # optional: receive/transmit queues of the veth pair (default 1)
//!
//! [[link]]               # switch-to-switch cable
//! a = "core"
//! b = "agg1"
//! a_port = 1             # optional OpenFlow port numbers at either end
//! b_port = 1
//! ```
//!
//! Unknown fields are rejected. Ports that are not given are numbered deterministically, see
//! [`crate::plan`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// The only address block the test bed hands out (RFC 2544 benchmarking range).
pub const TESTBED_NET: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);
/// Prefix length of [`TESTBED_NET`].
pub const TESTBED_PREFIX_LEN: u8 = 15;
/// Highest port number OVS accepts in `ofport_request` (OpenFlow 1.0's OFPP_MAX).
pub const MAX_OFPORT: u16 = 0xfeff;
/// Longest interface name Linux accepts (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

/// A validated topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub description: Option<String>,
    pub switches: Vec<Switch>,
    pub hosts: Vec<Host>,
    pub links: Vec<Link>,
    /// The text the topology was parsed from, kept so it can be written to the state file
    /// and re-opened later by [`crate::Testbed::open`].
    pub(crate) source: String,
}

/// An OVS bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Switch {
    pub name: String,
    pub dpid: u64,
}

/// A host (network namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    pub interfaces: Vec<Interface>,
}

/// One NIC of a host, cabled to one switch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub switch: String,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub mac: Mac,
    /// Requested OpenFlow port number on `switch`, if the file gives one.
    pub port: Option<u16>,
    /// Receive and transmit queues of the veth pair (1 unless the file asks for more;
    /// a multi-queue NIC lets several data-plane workers share it).
    pub queues: u16,
}

/// A cable between two switches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub a: String,
    pub b: String,
    pub a_port: Option<u16>,
    pub b_port: Option<u16>,
}

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl std::str::FromStr for Mac {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!("`{s}` is not a MAC address like 02:00:c6:12:01:01"));
        }
        let mut out = [0u8; 6];
        for (slot, part) in out.iter_mut().zip(&parts) {
            if part.len() != 2 {
                return Err(format!("`{s}` is not a MAC address like 02:00:c6:12:01:01"));
            }
            *slot = u8::from_str_radix(part, 16)
                .map_err(|_| format!("`{s}` is not a MAC address like 02:00:c6:12:01:01"))?;
        }
        Ok(Mac(out))
    }
}

impl Interface {
    /// The interface's network address (address with host bits cleared).
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.address) & mask(self.prefix_len))
    }
}

fn mask(prefix_len: u8) -> u32 {
    if prefix_len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix_len))
    }
}

// The file schema. Kept separate from the public types so that serde does the shape checks
// (unknown fields, types) and `validate` does the semantic ones with messages that name
// hosts and switches rather than array indices.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTopology {
    description: Option<String>,
    #[serde(default, rename = "switch")]
    switches: Vec<FileSwitch>,
    #[serde(default, rename = "host")]
    hosts: Vec<FileHost>,
    #[serde(default, rename = "link")]
    links: Vec<FileLink>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSwitch {
    name: String,
    dpid: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHost {
    name: String,
    #[serde(default)]
    iface: Vec<FileIface>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileIface {
    name: String,
    switch: String,
    address: String,
    mac: String,
    port: Option<u32>,
    queues: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLink {
    a: String,
    b: String,
    a_port: Option<u32>,
    b_port: Option<u32>,
}

impl Topology {
    /// Reads and validates a topology file.
    pub fn load(path: impl AsRef<Path>) -> Result<Topology> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadTopology {
            path: path.to_path_buf(),
            source,
        })?;
        parse_with_origin(&text, Some(path.to_path_buf()))
    }

    /// Parses and validates topology text.
    pub fn parse(text: &str) -> Result<Topology> {
        parse_with_origin(text, None)
    }

    /// Looks up a host by name.
    pub fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// Looks up a switch by name.
    pub fn switch(&self, name: &str) -> Option<&Switch> {
        self.switches.iter().find(|s| s.name == name)
    }

    /// True when the switch graph has a cycle. Bridges in `fail_mode=standalone` forward with
    /// NORMAL and run no spanning tree, so a loop would flood forever; the caller warns.
    pub fn has_switch_loop(&self) -> bool {
        // Union-find over switch indices: a link joining two already-connected switches
        // closes a cycle.
        let index: BTreeMap<&str, usize> = self
            .switches
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let mut parent: Vec<usize> = (0..self.switches.len()).collect();
        fn find(parent: &mut [usize], mut i: usize) -> usize {
            while parent[i] != i {
                parent[i] = parent[parent[i]];
                i = parent[i];
            }
            i
        }
        for link in &self.links {
            let (Some(&a), Some(&b)) = (index.get(link.a.as_str()), index.get(link.b.as_str()))
            else {
                continue;
            };
            let (ra, rb) = (find(&mut parent, a), find(&mut parent, b));
            if ra == rb {
                return true;
            }
            parent[ra] = rb;
        }
        false
    }
}

fn parse_with_origin(text: &str, origin: Option<PathBuf>) -> Result<Topology> {
    let file: FileTopology = toml::from_str(text).map_err(|e| Error::Parse {
        origin: origin.clone(),
        message: e.to_string().trim_end().to_string(),
    })?;
    validate(file, text).map_err(|problems| Error::Invalid {
        origin,
        message: if problems.len() == 1 {
            problems.concat()
        } else {
            format!(
                "{} problems:\n  - {}",
                problems.len(),
                problems.join("\n  - ")
            )
        },
    })
}

/// Names of hosts and switches end up inside namespace and interface names, so they are
/// limited to characters that are safe there and never contain the `-` separator (which keeps
/// derived names unambiguous, see [`crate::plan`]).
fn check_object_name(kind: &str, name: &str) -> std::result::Result<(), String> {
    let mut chars = name.chars();
    let ok = matches!(chars.next(), Some('a'..='z'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{kind} name `{name}` must start with a lowercase letter and contain only a-z, 0-9 and _"
        ))
    }
}

fn check_iface_name(host: &str, name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.len() > IFNAME_MAX {
        return Err(format!(
            "host `{host}`: interface name `{name}` must have 1 to {IFNAME_MAX} characters"
        ));
    }
    if name == "lo" || name == "." || name == ".." {
        return Err(format!(
            "host `{host}`: interface name `{name}` is reserved"
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(format!(
            "host `{host}`: interface name `{name}` may contain only letters, digits, `_`, `-` and `.`"
        ));
    }
    Ok(())
}

fn parse_cidr(text: &str) -> std::result::Result<(Ipv4Addr, u8), String> {
    let (addr, len) = text
        .split_once('/')
        .ok_or_else(|| format!("address `{text}` needs a prefix length, like 198.18.1.1/24"))?;
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("address `{text}` is not an IPv4 address"))?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= 32)
        .ok_or_else(|| format!("address `{text}` has a bad prefix length"))?;
    Ok((addr, len))
}

fn check_address(text: &str) -> std::result::Result<(Ipv4Addr, u8), String> {
    let (addr, len) = parse_cidr(text)?;
    let inside = u32::from(addr) & mask(TESTBED_PREFIX_LEN) == u32::from(TESTBED_NET);
    if !inside {
        return Err(format!(
            "address `{text}` is outside {TESTBED_NET}/{TESTBED_PREFIX_LEN}, the only range the test bed may use"
        ));
    }
    if len < TESTBED_PREFIX_LEN {
        return Err(format!(
            "address `{text}`: the subnet must lie inside {TESTBED_NET}/{TESTBED_PREFIX_LEN} (prefix length at least {TESTBED_PREFIX_LEN})"
        ));
    }
    if len <= 30 {
        let host_bits = u32::from(addr) & !mask(len);
        if host_bits == 0 || host_bits == !mask(len) {
            return Err(format!(
                "address `{text}` is the network or broadcast address of its subnet"
            ));
        }
    }
    Ok((addr, len))
}

fn check_port(what: &str, port: Option<u32>) -> std::result::Result<Option<u16>, String> {
    match port {
        None => Ok(None),
        Some(p) if (1..=u32::from(MAX_OFPORT)).contains(&p) => Ok(Some(p as u16)),
        Some(p) => Err(format!("{what}: port {p} is outside 1..={MAX_OFPORT}")),
    }
}

fn validate(file: FileTopology, text: &str) -> std::result::Result<Topology, Vec<String>> {
    let mut problems = Vec::new();

    // Switches.
    let mut switch_names = BTreeSet::new();
    let mut dpids = BTreeMap::new();
    for s in &file.switches {
        if let Err(e) = check_object_name("switch", &s.name) {
            problems.push(e);
        }
        if !switch_names.insert(s.name.as_str()) {
            problems.push(format!("switch `{}` is defined twice", s.name));
        }
        if s.dpid == 0 {
            problems.push(format!("switch `{}`: dpid must not be 0", s.name));
        } else if let Some(other) = dpids.insert(s.dpid, s.name.as_str()) {
            problems.push(format!(
                "switch `{}`: dpid {:#x} is already used by switch `{other}`",
                s.name, s.dpid
            ));
        }
    }

    // Requested ports, per switch, to catch two cables asking for the same socket.
    let mut requested: BTreeMap<(String, u16), String> = BTreeMap::new();
    let mut request = |problems: &mut Vec<String>, switch: &str, port: u16, who: String| {
        if let Some(prev) = requested.insert((switch.to_string(), port), who.clone()) {
            problems.push(format!(
                "{who} asks for port {port} on switch `{switch}`, already requested by {prev}"
            ));
        }
    };

    // Hosts.
    let mut host_names = BTreeSet::new();
    let mut addresses: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    let mut macs: BTreeMap<Mac, String> = BTreeMap::new();
    let mut hosts = Vec::new();
    for h in &file.hosts {
        if let Err(e) = check_object_name("host", &h.name) {
            problems.push(e);
        }
        if switch_names.contains(h.name.as_str()) {
            problems.push(format!(
                "host `{}` has the same name as a switch; names must be unique",
                h.name
            ));
        }
        if !host_names.insert(h.name.as_str()) {
            problems.push(format!("host `{}` is defined twice", h.name));
        }
        if h.iface.is_empty() {
            problems.push(format!(
                "host `{}` has no interfaces (add a [[host.iface]] table)",
                h.name
            ));
        }
        let mut iface_names = BTreeSet::new();
        let mut interfaces: Vec<Interface> = Vec::new();
        for i in &h.iface {
            let who = format!("host `{}` interface `{}`", h.name, i.name);
            if let Err(e) = check_iface_name(&h.name, &i.name) {
                problems.push(e);
            }
            if !iface_names.insert(i.name.as_str()) {
                problems.push(format!("{who} is defined twice"));
            }
            if !switch_names.contains(i.switch.as_str()) {
                problems.push(format!("{who}: switch `{}` is not defined", i.switch));
            }
            let port = check_port(&who, i.port).unwrap_or_else(|e| {
                problems.push(e);
                None
            });
            if let Some(p) = port {
                request(&mut problems, &i.switch, p, who.clone());
            }
            let (address, prefix_len) = match check_address(&i.address) {
                Ok(a) => a,
                Err(e) => {
                    problems.push(format!("{who}: {e}"));
                    continue;
                }
            };
            if let Some(prev) = addresses.insert(address, who.clone()) {
                problems.push(format!(
                    "{who}: address {address} is already used by {prev}"
                ));
            }
            let mac: Mac = match i.mac.parse() {
                Ok(m) => m,
                Err(e) => {
                    problems.push(format!("{who}: {e}"));
                    continue;
                }
            };
            if mac.0[0] & 1 != 0 || mac.0 == [0; 6] {
                problems.push(format!("{who}: MAC {mac} is not a unicast address"));
            }
            if let Some(prev) = macs.insert(mac, who.clone()) {
                problems.push(format!("{who}: MAC {mac} is already used by {prev}"));
            }
            let iface = Interface {
                name: i.name.clone(),
                switch: i.switch.clone(),
                address,
                prefix_len,
                mac,
                port,
                queues: i.queues.unwrap_or(1).max(1),
            };
            // Two NICs of one host in overlapping subnets would make the kernel's choice of
            // outgoing NIC (and which NIC answers ARP) arbitrary; tests then pass or fail by luck.
            for other in &interfaces {
                let len = other.prefix_len.min(iface.prefix_len);
                if u32::from(other.address) & mask(len) == u32::from(iface.address) & mask(len) {
                    problems.push(format!(
                        "{who}: subnet {}/{} overlaps interface `{}` of the same host",
                        iface.network(),
                        iface.prefix_len,
                        other.name
                    ));
                }
            }
            interfaces.push(iface);
        }
        hosts.push(Host {
            name: h.name.clone(),
            interfaces,
        });
    }

    // Links.
    let mut links = Vec::new();
    for (n, l) in file.links.iter().enumerate() {
        let who = format!("link #{} ({} - {})", n + 1, l.a, l.b);
        for end in [&l.a, &l.b] {
            if !switch_names.contains(end.as_str()) {
                problems.push(format!("{who}: switch `{end}` is not defined"));
            }
        }
        if l.a == l.b {
            problems.push(format!("{who}: a link must join two different switches"));
        }
        let a_port = check_port(&who, l.a_port).unwrap_or_else(|e| {
            problems.push(e);
            None
        });
        let b_port = check_port(&who, l.b_port).unwrap_or_else(|e| {
            problems.push(e);
            None
        });
        if let Some(p) = a_port {
            request(&mut problems, &l.a, p, format!("{who} end a"));
        }
        if let Some(p) = b_port {
            request(&mut problems, &l.b, p, format!("{who} end b"));
        }
        links.push(Link {
            a: l.a.clone(),
            b: l.b.clone(),
            a_port,
            b_port,
        });
    }

    if file.switches.is_empty() {
        problems.push("no switches defined (add a [[switch]] table)".to_string());
    }

    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Topology {
        description: file.description,
        switches: file
            .switches
            .into_iter()
            .map(|s| Switch {
                name: s.name,
                dpid: s.dpid,
            })
            .collect(),
        hosts,
        links,
        source: text.to_string(),
    })
}

#[cfg(test)]
#[path = "topology_tests.rs"]
mod tests;
