//! The XDP program's decision, as a pure function: does this frame belong to the data
//! plane?
//!
//! The program calls [`classify`] with its maps behind [`SteeringTables`]; user-space
//! tests call it with tables of their own, so the logic the kernel runs is the logic the
//! host tests check.

use crate::{
    OwnedEndpoints, RuleKey,
    wire::{
        ETHERTYPE_IPV4, EthernetHeader, FrameBytes, IPPROTO_TCP, IPV4_MIN_HEADER_LEN, Ipv4Header,
        TcpHeader, WireError,
    },
};

/// The lookups the decision needs.
pub trait SteeringTables {
    /// The endpoints the data plane owns, if configured.
    fn owned_endpoints(&self) -> Option<OwnedEndpoints>;
    /// Whether a redirect rule holds a prefix of `key` (the trie's longest-prefix lookup
    /// with a full-length key).
    fn has_rule(&self, key: &RuleKey) -> bool;
    /// Whether any redirect rule names destination port `port`. Every rule fixes its
    /// destination port, so `false` means no rule can match: the frame passes without
    /// the two trie lookups, which is most of what the program costs unmatched traffic.
    fn port_has_rules(&self, port: u16) -> bool;
}

/// Why a frame is steered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Match {
    /// Addressed to an endpoint the data plane owns.
    OwnedEndpoint,
    /// A redirect rule matches it.
    Rule,
}

/// What to do with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Into the data plane's AF_XDP socket.
    Steer(Match),
    /// Well formed, not ours (ARP, UDP, other TCP, …): to the kernel.
    Pass,
    /// Malformed: to the kernel, counted apart.
    Malformed(WireError),
    /// Well-formed IPv4 with options: to the kernel, counted with the malformed ones.
    /// Fixed header offsets keep the program small, and no NCP peer sends options.
    Ipv4Options,
}

/// Decides what to do with `frame`. Reads at most the Ethernet header, one VLAN tag and
/// the fixed IPv4 and TCP headers, and looks up at most the owned endpoints and two rule
/// keys.
#[inline(always)]
pub fn classify<B: FrameBytes + ?Sized, T: SteeringTables>(frame: &B, tables: &T) -> Decision {
    let eth = match EthernetHeader::parse(frame) {
        Ok(eth) => eth,
        Err(e) => return Decision::Malformed(e),
    };
    if eth.ethertype != ETHERTYPE_IPV4 {
        return Decision::Pass;
    }
    let l3 = eth.header_len();
    let ip = match Ipv4Header::parse(frame, l3) {
        Ok(ip) => ip,
        Err(e) => return Decision::Malformed(e),
    };
    if ip.has_options() {
        return Decision::Ipv4Options;
    }
    if ip.protocol != IPPROTO_TCP {
        return Decision::Pass;
    }
    // Without options the TCP header starts at a fixed offset from the IPv4 one, which
    // keeps the program's packet reads at offsets the verifier can bound.
    let tcp = match TcpHeader::parse(frame, l3 + IPV4_MIN_HEADER_LEN, ip.payload_len()) {
        Ok(tcp) => tcp,
        Err(e) => return Decision::Malformed(e),
    };
    if let Some(owned) = tables.owned_endpoints()
        && owned.addr != [0; 4]
        && owned.addr == ip.dst.octets()
        && tcp.dst_port >= owned.port_lo
        && tcp.dst_port <= owned.port_hi
    {
        return Decision::Steer(Match::OwnedEndpoint);
    }
    if !tables.port_has_rules(tcp.dst_port) {
        return Decision::Pass;
    }
    let mut key = RuleKey {
        dst_addr: ip.dst.octets(),
        dst_port: tcp.dst_port.to_be_bytes(),
        src_port: tcp.src_port.to_be_bytes(),
        src_addr: ip.src.octets(),
    };
    if tables.has_rule(&key) {
        return Decision::Steer(Match::Rule);
    }
    // Rules without a source port are stored with port 0.
    key.src_port = [0, 0];
    if tables.has_rule(&key) {
        return Decision::Steer(Match::Rule);
    }
    Decision::Pass
}
