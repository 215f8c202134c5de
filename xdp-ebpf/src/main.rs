//! NCP's XDP steering program.
//!
//! For every frame received on the middlebox's interface it decides, with bounds-checked
//! parsing and two map lookups at most, whether the frame belongs to NCP:
//! - a redirect rule matches it (a replicated client flow), or
//! - it is addressed to an endpoint the data plane owns (answers to the workers' own
//!   upstream connections to primaries and replicas).
//!
//! Matching frames go to the AF_XDP socket bound to the receiving queue; everything else
//! (ARP, ICMP, other TCP, UDP, anything unparsable) goes to the kernel untouched. Each
//! verdict is counted per CPU.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, LpmTrie, PerCpuArray, XskMap, lpm_trie::Key},
    programs::XdpContext,
};
use ncp_common::{
    MAX_QUEUES, MAX_REDIRECT_RULES, OwnedEndpoints, RULE_FIXED_PREFIX_BITS, RuleKey, RuleValue,
    VERDICT_COUNT, Verdict,
};

#[map]
static REDIRECT_RULES: LpmTrie<RuleKey, RuleValue> =
    LpmTrie::with_max_entries(MAX_REDIRECT_RULES, 0);

#[map]
static OWNED_ENDPOINTS: Array<OwnedEndpoints> = Array::with_max_entries(1, 0);

#[map]
static VERDICT_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(VERDICT_COUNT, 0);

#[map]
static XSKS: XskMap = XskMap::with_max_entries(MAX_QUEUES, 0);

const ETH_HDR_LEN: usize = 14;
const VLAN_HDR_LEN: usize = 4;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPV4_HDR_LEN: usize = 20;
const IPPROTO_TCP: u8 = 6;
const TCP_HDR_LEN: usize = 20;
/// "More fragments" flag plus the 13-bit fragment offset, in host order.
const IPV4_FRAGMENT_MASK: u16 = 0x3fff;

#[xdp]
pub fn ncp_steer(ctx: XdpContext) -> u32 {
    let verdict = classify(&ctx);
    let verdict = match verdict {
        Classified::Steer => redirect_to_queue_socket(&ctx),
        Classified::Pass => Verdict::Passed,
        Classified::Unparsed => Verdict::Unparsed,
    };
    count(verdict);
    match verdict {
        Verdict::Redirected => xdp_action::XDP_REDIRECT,
        _ => xdp_action::XDP_PASS,
    }
}

enum Classified {
    Steer,
    Pass,
    Unparsed,
}

/// The bytes at `offset` as `N` bytes, or `None` when the frame is too short.
#[inline(always)]
fn bytes_at<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<[u8; N]> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + N > end {
        return None;
    }
    // SAFETY: the range [start+offset, start+offset+N) was checked against data_end above,
    // which is also what the verifier requires before the read.
    Some(unsafe { core::ptr::read_unaligned((start + offset) as *const [u8; N]) })
}

#[inline(always)]
fn classify(ctx: &XdpContext) -> Classified {
    let Some(ethertype) = bytes_at::<2>(ctx, 12) else {
        return Classified::Unparsed;
    };
    let mut ethertype = u16::from_be_bytes(ethertype);
    let mut l3 = ETH_HDR_LEN;
    // One VLAN tag (tunnel mode may add one) is looked through; deeper stacks go to the kernel.
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let Some(inner) = bytes_at::<2>(ctx, ETH_HDR_LEN + 2) else {
            return Classified::Unparsed;
        };
        ethertype = u16::from_be_bytes(inner);
        l3 += VLAN_HDR_LEN;
    }
    if ethertype != ETH_P_IPV4 {
        return Classified::Pass;
    }
    let Some(ip) = bytes_at::<IPV4_HDR_LEN>(ctx, l3) else {
        return Classified::Unparsed;
    };
    let version = ip[0] >> 4;
    let ihl = ip[0] & 0x0f;
    // Options (ihl > 5) and nonsense (ihl < 5 or a wrong version) are left to the kernel.
    if version != 4 || ihl != 5 {
        return Classified::Unparsed;
    }
    let total_len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if total_len < IPV4_HDR_LEN {
        return Classified::Unparsed;
    }
    if u16::from_be_bytes([ip[6], ip[7]]) & IPV4_FRAGMENT_MASK != 0 {
        return Classified::Unparsed;
    }
    if ip[9] != IPPROTO_TCP {
        return Classified::Pass;
    }
    let l4 = l3 + IPV4_HDR_LEN;
    let Some(tcp) = bytes_at::<TCP_HDR_LEN>(ctx, l4) else {
        return Classified::Unparsed;
    };
    let data_offset = tcp[12] >> 4;
    if data_offset < 5 || total_len < IPV4_HDR_LEN + TCP_HDR_LEN {
        return Classified::Unparsed;
    }

    let src_addr = [ip[12], ip[13], ip[14], ip[15]];
    let dst_addr = [ip[16], ip[17], ip[18], ip[19]];
    let src_port = [tcp[0], tcp[1]];
    let dst_port = [tcp[2], tcp[3]];

    if is_owned_endpoint(dst_addr, u16::from_be_bytes(dst_port))
        || matches_rule(src_addr, src_port, dst_addr, dst_port)
    {
        Classified::Steer
    } else {
        Classified::Pass
    }
}

#[inline(always)]
fn is_owned_endpoint(dst_addr: [u8; 4], dst_port: u16) -> bool {
    match OWNED_ENDPOINTS.get(0) {
        Some(owned) => {
            owned.addr != [0; 4]
                && owned.addr == dst_addr
                && dst_port >= owned.port_lo
                && dst_port <= owned.port_hi
        }
        None => false,
    }
}

#[inline(always)]
fn matches_rule(
    src_addr: [u8; 4],
    src_port: [u8; 2],
    dst_addr: [u8; 4],
    dst_port: [u8; 2],
) -> bool {
    // A full-length key: the trie returns the longest stored prefix of it.
    let mut key = Key::new(
        RULE_FIXED_PREFIX_BITS + 32,
        RuleKey {
            dst_addr,
            dst_port,
            src_port,
            src_addr,
        },
    );
    if REDIRECT_RULES.get(&key).is_some() {
        return true;
    }
    // Rules without a source port are stored with port 0.
    key.data.src_port = [0, 0];
    REDIRECT_RULES.get(&key).is_some()
}

#[inline(always)]
fn redirect_to_queue_socket(ctx: &XdpContext) -> Verdict {
    let queue = ctx.rx_queue_index();
    if XSKS.get(queue).is_none() {
        return Verdict::NoSocket;
    }
    match XSKS.redirect(queue, 0) {
        Ok(_) => Verdict::Redirected,
        Err(_) => Verdict::RedirectFailed,
    }
}

#[inline(always)]
fn count(verdict: Verdict) {
    if let Some(counter) = VERDICT_COUNTERS.get_ptr_mut(verdict as u32) {
        // SAFETY: per-CPU slot, so no other CPU writes it concurrently; the pointer comes
        // from a successful map lookup.
        unsafe { *counter += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
