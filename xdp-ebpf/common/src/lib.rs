//! Types shared between the XDP program (`ncp-xdp`) and user space (`ncp-dataplane`).
//!
//! Every type here is `#[repr(C)]` plain data with explicit padding so that the kernel, the
//! eBPF program and user space agree byte for byte. Addresses and ports are stored in
//! network byte order exactly as they appear on the wire, so the XDP program never swaps
//! bytes on the per-packet path.
//!
//! [`wire`] is the one parser of Ethernet/VLAN/IPv4/TCP headers and [`steer`] the XDP
//! program's decision over it; both run unchanged in the kernel and in user space.
#![no_std]

pub mod steer;
pub mod wire;

/// Name of the LPM trie that holds the operator's redirect rules.
pub const MAP_REDIRECT_RULES: &str = "REDIRECT_RULES";
/// Name of the one-entry array describing the endpoints the data plane owns.
pub const MAP_OWNED_ENDPOINTS: &str = "OWNED_ENDPOINTS";
/// Name of the per-CPU verdict counter array.
pub const MAP_VERDICT_COUNTERS: &str = "VERDICT_COUNTERS";
/// Name of the XSKMAP indexed by receive queue.
pub const MAP_XSKS: &str = "XSKS";
/// Per destination port, how many redirect rules name it (an array of 65536 counters):
/// a frame to a port no rule names skips the trie lookups.
pub const MAP_RULE_PORTS: &str = "RULE_PORTS";
/// Entries of [`MAP_RULE_PORTS`]: one per TCP port.
pub const RULE_PORT_SLOTS: u32 = 1 << 16;
/// Name of the XDP program inside the object file.
pub const PROGRAM_NAME: &str = "ncp_steer";
/// A program that passes every frame and does nothing else, in the same object: attached
/// in place of [`PROGRAM_NAME`] it shows what running any XDP program costs an interface
/// (`ncp-middlebox xdp-baseline`), apart from what NCP's steering adds.
pub const BASELINE_PROGRAM_NAME: &str = "ncp_pass_all";

/// Upper bound on redirect rules (the trie's `max_entries`).
pub const MAX_REDIRECT_RULES: u32 = 4096;
/// Upper bound on receive queues (the XSKMAP's `max_entries`).
pub const MAX_QUEUES: u32 = 64;

/// Bits of [`RuleKey`] before the source address: destination address (32), destination
/// port (16) and source port (16). A rule always matches those exactly; the source
/// prefix length is added on top.
pub const RULE_FIXED_PREFIX_BITS: u32 = 64;

/// Key data of the redirect-rule LPM trie.
///
/// Longest-prefix matching runs over the bytes in field order, so the exact parts
/// (destination address and port, source port) come first and the source address last;
/// a rule for `src/len` uses prefix length `64 + len`. A rule without a source port is
/// stored with `src_port == 0` (no TCP segment carries port 0), and the program looks up
/// twice: first with the segment's real source port, then with 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleKey {
    /// Destination IPv4 address, network byte order.
    pub dst_addr: [u8; 4],
    /// Destination TCP port, network byte order.
    pub dst_port: [u8; 2],
    /// Source TCP port, network byte order; zero for "any source port".
    pub src_port: [u8; 2],
    /// Source IPv4 address (only the prefix bits matter), network byte order.
    pub src_addr: [u8; 4],
}

/// Value stored for each redirect rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleValue {
    /// Operator-visible rule identifier (also the service id in later stages).
    pub rule_id: u32,
    /// Reserved for flags; keeps the value 8 bytes wide.
    pub flags: u32,
}

/// The endpoints the data plane owns: frames addressed to `addr` with a destination port
/// in `port_lo..=port_hi` are answers to the workers' own upstream connections.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnedEndpoints {
    /// IPv4 address, network byte order. All zero disables the check.
    pub addr: [u8; 4],
    /// First owned port, host byte order.
    pub port_lo: u16,
    /// Last owned port (inclusive), host byte order.
    pub port_hi: u16,
}

/// Index into the per-CPU verdict counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Matched a rule or an owned endpoint and was redirected into an AF_XDP socket.
    Redirected = 0,
    /// Parsed fine but matched nothing: handed to the kernel untouched.
    Passed = 1,
    /// Truncated, malformed, fragmented or carrying IPv4 options: handed to the kernel.
    Unparsed = 2,
    /// Matched, but no AF_XDP socket is bound to the receiving queue: handed to the kernel.
    NoSocket = 3,
    /// Matched, but the redirect helper failed: handed to the kernel.
    RedirectFailed = 4,
}

impl Verdict {
    /// Every verdict, in counter-index order.
    pub const ALL: [Verdict; 5] = [
        Verdict::Redirected,
        Verdict::Passed,
        Verdict::Unparsed,
        Verdict::NoSocket,
        Verdict::RedirectFailed,
    ];

    /// Stable lower-case name used in stats output.
    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Redirected => "redirected",
            Verdict::Passed => "passed",
            Verdict::Unparsed => "unparsed",
            Verdict::NoSocket => "no_socket",
            Verdict::RedirectFailed => "redirect_failed",
        }
    }
}

/// Number of verdict counters.
pub const VERDICT_COUNT: u32 = Verdict::ALL.len() as u32;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all three are repr(C) structs of byte arrays and integers without implicit
    // padding, so every bit pattern is valid and they may be copied to and from the kernel.
    unsafe impl aya::Pod for super::RuleKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RuleValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OwnedEndpoints {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<RuleKey>(), 12);
        assert_eq!(core::mem::size_of::<RuleValue>(), 8);
        assert_eq!(core::mem::size_of::<OwnedEndpoints>(), 8);
        assert_eq!(RULE_FIXED_PREFIX_BITS as usize, 8 * 8);
    }

    #[test]
    fn verdict_indices_are_dense() {
        for (i, v) in Verdict::ALL.iter().enumerate() {
            assert_eq!(*v as usize, i);
        }
    }
}
