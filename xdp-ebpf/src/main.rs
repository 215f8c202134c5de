//! NCP's XDP steering program.
//!
//! For every frame received on the middlebox's interface it decides, with bounds-checked
//! parsing and three map lookups at most, whether the frame belongs to NCP (the decision
//! itself is `ncp_common::steer::classify`, shared with the host-side tests):
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
    MAX_QUEUES, MAX_REDIRECT_RULES, OwnedEndpoints, RULE_FIXED_PREFIX_BITS, RULE_PORT_SLOTS,
    RuleKey, RuleValue, VERDICT_COUNT, Verdict,
    steer::{Decision, SteeringTables, classify},
    wire::FrameBytes,
};

#[map]
static REDIRECT_RULES: LpmTrie<RuleKey, RuleValue> =
    LpmTrie::with_max_entries(MAX_REDIRECT_RULES, 0);

#[map]
static OWNED_ENDPOINTS: Array<OwnedEndpoints> = Array::with_max_entries(1, 0);

#[map]
static VERDICT_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(VERDICT_COUNT, 0);

#[map]
static RULE_PORTS: Array<u32> = Array::with_max_entries(RULE_PORT_SLOTS, 0);

#[map]
static XSKS: XskMap = XskMap::with_max_entries(MAX_QUEUES, 0);

#[xdp]
pub fn ncp_steer(ctx: XdpContext) -> u32 {
    let verdict = match classify(&Packet(&ctx), &Maps) {
        Decision::Steer(_) => redirect_to_queue_socket(&ctx),
        Decision::Pass => Verdict::Passed,
        Decision::Malformed(_) | Decision::Ipv4Options => Verdict::Unparsed,
    };
    count(verdict);
    match verdict {
        Verdict::Redirected => xdp_action::XDP_REDIRECT,
        _ => xdp_action::XDP_PASS,
    }
}

/// Passes every frame untouched ([`ncp_common::BASELINE_PROGRAM_NAME`]): the baseline that
/// separates the cost of an interface running XDP at all from the cost of NCP's steering.
#[xdp]
pub fn ncp_pass_all(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The received frame, read the way the verifier accepts: every read is preceded by a
/// comparison of its end with `data_end`.
struct Packet<'a>(&'a XdpContext);

impl FrameBytes for Packet<'_> {
    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let start = self.0.data();
        if start + offset + N > self.0.data_end() {
            return None;
        }
        // SAFETY: the range [start+offset, start+offset+N) was checked against data_end
        // above, which is also what the verifier requires before the read.
        Some(unsafe { core::ptr::read_unaligned((start + offset) as *const [u8; N]) })
    }

    #[inline(always)]
    fn holds(&self, len: usize) -> bool {
        // A length check proves nothing the verifier can use (the offset is a 16-bit
        // field, past its packet-range tracking), yet LLVM would use it to drop later
        // read checks as redundant, and the verifier would then refuse those reads. A
        // volatile load of data_end keeps this comparison from standing in for them.
        // SAFETY: `ctx` is the context the kernel passed to the program; data_end is a
        // plain field of it.
        let end = unsafe { core::ptr::read_volatile(&raw const (*self.0.ctx).data_end) };
        self.0.data() + len <= end as usize
    }
}

/// The program's maps as the decision's lookups.
struct Maps;

impl SteeringTables for Maps {
    #[inline(always)]
    fn owned_endpoints(&self) -> Option<OwnedEndpoints> {
        OWNED_ENDPOINTS.get(0).copied()
    }

    #[inline(always)]
    fn port_has_rules(&self, port: u16) -> bool {
        // An array lookup the verifier inlines: no hashing, no trie walk.
        RULE_PORTS.get(u32::from(port)).is_some_and(|n| *n > 0)
    }

    #[inline(always)]
    fn has_rule(&self, key: &RuleKey) -> bool {
        // A full-length key: the trie returns the longest stored prefix of it.
        let key = Key::new(RULE_FIXED_PREFIX_BITS + 32, *key);
        REDIRECT_RULES.get(&key).is_some()
    }
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
