//! The sans-IO core of the recovery layer: it is shown every IPv4/TCP packet the engine
//! sends and receives, with the time, and answers with what to do with it and with
//! frames of its own to send (retransmissions, held-back data released by the pacer).
//! No device and no clock of its own, so it is tested with plain byte slices.
//!
//! Per connection it keeps a copy of each data segment until the peer acknowledges it
//! cumulatively, and a scoreboard of what the peer selectively acknowledged. A segment
//! is taken for lost when
//! - it is the first unacknowledged one and the third duplicate ACK came (duplicate
//!   ACKs counted as Linux counts them: one that also moves the window counts too);
//! - three segments' worth of data above it were selectively acknowledged (RFC 6675);
//! - a segment sent later than it by more than a reordering window was delivered
//!   (RACK, RFC 8985): this is what repairs a retransmission lost again and a tail after
//!   its loss probe;
//! - an ACK during recovery acknowledges only part of the data outstanding when the loss
//!   was found (NewReno partial ACK): the next hole;
//! - its own retransmission timer fired (RTT measured from its own send times, floor
//!   200 ms like Linux), then every segment in flight is.
//!
//! A tail-loss probe two smoothed round trips after the last send repairs a lost tail
//! without waiting for a timeout. A loss halves the connection's congestion window;
//! new data beyond the window is held back and released as ACKs come in, paced over the
//! round trip, so smoltcp's whole-window bursts leave the layer spread out.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, VecDeque, hash_map::Entry},
    net::SocketAddrV4,
};

use ncp_common::wire::{
    IPPROTO_TCP, IPV4_FRAGMENT_MASK, Ipv4Header, TcpHeader, fill_tcp_checksum, tcp_flags,
};
use serde::{Deserialize, Serialize};

/// Microseconds on the engine's clock (smoltcp's timestamps).
pub(crate) type Micros = i64;

const MILLI: Micros = 1_000;
/// Linux's floor on the retransmission timeout (TCP_RTO_MIN).
const MIN_RTO: Micros = 200 * MILLI;
/// The timeout before any round trip was measured (RFC 6298).
const INITIAL_RTO: Micros = 1_000 * MILLI;
/// Ceiling of a backed-off timeout.
const MAX_RTO: Micros = 60_000 * MILLI;
/// Shortest probe timeout: below it a probe would race the ACK of a fast path.
const MIN_PTO: Micros = 10 * MILLI;
/// Added to the probe timeout when a single segment is in flight, for the peer's delayed
/// ACK (Linux delays at least 40 ms).
const DELAYED_ACK_ALLOWANCE: Micros = 40 * MILLI;
/// Shortest reordering window of the RACK rule.
const MIN_REORDER_WINDOW: Micros = MILLI;
/// Assumed segment size before one was seen.
const DEFAULT_MSS: u32 = 1460;
/// Initial congestion window, segments (RFC 6928, Linux).
const INITIAL_WINDOW_SEGMENTS: u32 = 10;
/// Largest congestion window: far above any send buffer the configuration allows.
const MAX_CWND: u32 = 64 << 20;
/// The pacer lets this much of the rate go as one burst: the worker sleeps in whole
/// milliseconds, so a finer pacing would only idle the link.
const PACING_QUANTUM: Micros = MILLI;
/// A connection with nothing in flight for this long is forgotten.
const IDLE_FORGET: Micros = 60_000 * MILLI;
/// Duplicate ACKs that start a fast retransmit.
const DUPACK_THRESHOLD: u32 = 3;
/// Packet buffers kept for reuse (copies of acknowledged segments, frames sent): enough
/// for the segments one round of ACKs frees, so a data segment costs no allocation.
pub(super) const MAX_SPARE_BUFFERS: usize = 256;

/// A connection as its sending end names it: (local, remote).
pub(crate) type Key = (SocketAddrV4, SocketAddrV4);

/// How the recovery of a connection came to retransmit a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cause {
    DupAck,
    PartialAck,
    Sack,
    Rto,
    Tlp,
}

/// What the layer did, for the worker's stats. New fields must keep a serde default, so
/// older readers and writers of the JSON still agree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RecoveryCounters {
    /// Retransmissions on the third duplicate ACK.
    pub retransmits_dupack: u64,
    /// Retransmissions of the next hole on a partial ACK (NewReno).
    pub retransmits_partial_ack: u64,
    /// Retransmissions of holes the peer's SACK blocks (or a later delivery) showed.
    pub retransmits_sack: u64,
    /// Retransmissions on the layer's own timeout.
    pub retransmits_rto: u64,
    /// Tail-loss probes sent.
    pub retransmits_tlp: u64,
    /// Retransmissions that look unnecessary: the peer reported the segment twice
    /// (D-SACK) or acknowledged it sooner than the retransmission could have arrived.
    pub spurious_retransmits: u64,
    /// Data segments whose copy was kept.
    pub segments_tracked: u64,
    /// Data segments sent without a copy (beyond the memory cap, or out of step with
    /// the layer): smoltcp recovers those alone.
    pub segments_untracked: u64,
    /// Retransmissions smoltcp made itself (its own timeout), passed on.
    pub engine_retransmits: u64,
    /// Duplicate ACKs the layer handled and kept from smoltcp (which would answer them
    /// with a retransmission of its own).
    pub dupacks_absorbed: u64,
    /// Data segments held back by the congestion window or the pacer before release.
    pub segments_paced: u64,
}

impl RecoveryCounters {
    /// Adds `other` into `self` (a worker sums its links).
    pub fn add(&mut self, other: &Self) {
        self.retransmits_dupack += other.retransmits_dupack;
        self.retransmits_partial_ack += other.retransmits_partial_ack;
        self.retransmits_sack += other.retransmits_sack;
        self.retransmits_rto += other.retransmits_rto;
        self.retransmits_tlp += other.retransmits_tlp;
        self.spurious_retransmits += other.spurious_retransmits;
        self.segments_tracked += other.segments_tracked;
        self.segments_untracked += other.segments_untracked;
        self.engine_retransmits += other.engine_retransmits;
        self.dupacks_absorbed += other.dupacks_absorbed;
        self.segments_paced += other.segments_paced;
    }

    /// Retransmissions of every cause.
    pub fn retransmits(&self) -> u64 {
        self.retransmits_dupack
            + self.retransmits_partial_ack
            + self.retransmits_sack
            + self.retransmits_rto
            + self.retransmits_tlp
    }

    fn count(&mut self, cause: Cause) {
        match cause {
            Cause::DupAck => self.retransmits_dupack += 1,
            Cause::PartialAck => self.retransmits_partial_ack += 1,
            Cause::Sack => self.retransmits_sack += 1,
            Cause::Rto => self.retransmits_rto += 1,
            Cause::Tlp => self.retransmits_tlp += 1,
        }
    }
}

/// What to do with a packet the engine sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outbound<'a> {
    /// Send it now, as it is: these bytes (the layer keeps the buffer it was written in,
    /// as its copy or for reuse).
    Send(&'a [u8]),
    /// The layer keeps it and sends it later (congestion window or pacing).
    Held,
}

/// What to do with a packet received for the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Inbound {
    /// Hand it to the engine.
    Pass,
    /// A duplicate ACK identical to the last one the engine saw: the layer answered it,
    /// the engine must not (it would retransmit on its own).
    Absorb,
}

// Sequence-space comparisons (RFC 793 arithmetic modulo 2^32).
fn seq_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}
fn seq_le(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) <= 0
}

/// The fields of an IPv4/TCP packet the layer works with.
struct Parsed {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    /// Where the TCP header starts.
    tcp_at: usize,
    /// Where the options end and the payload starts.
    payload_at: usize,
    payload_len: usize,
}

impl Parsed {
    /// Reads a packet with the one parser ([`ncp_common::wire`]); `None` for anything
    /// but an unfragmented IPv4/TCP packet.
    fn parse(packet: &[u8]) -> Option<Self> {
        let ip = Ipv4Header::parse(packet, 0).ok()?;
        if ip.protocol != IPPROTO_TCP || ip.flags_fragment & IPV4_FRAGMENT_MASK != 0 {
            return None;
        }
        let tcp = TcpHeader::parse(packet, ip.header_len, ip.payload_len()).ok()?;
        let payload_at = ip.header_len + tcp.header_len;
        let payload_len = ip.total_len.checked_sub(payload_at)?;
        if packet.len() < ip.total_len {
            return None;
        }
        Some(Self {
            src: SocketAddrV4::new(ip.src, tcp.src_port),
            dst: SocketAddrV4::new(ip.dst, tcp.dst_port),
            seq: tcp.seq,
            ack: tcp.ack,
            flags: tcp.flags,
            window: tcp.window,
            tcp_at: ip.header_len,
            payload_at,
            payload_len,
        })
    }

    /// The SACK blocks of the segment's options (at most four fit), and how many.
    fn sack_blocks(&self, packet: &[u8]) -> ([(u32, u32); 4], usize) {
        let mut blocks = [(0u32, 0u32); 4];
        let mut count = 0;
        for_each_option(packet, self.tcp_at, self.payload_at, |kind, _, data| {
            if kind != OPT_SACK {
                return;
            }
            for block in data.chunks_exact(8) {
                if let (Some(l), Some(r), Some(slot)) = (
                    be32(block),
                    block.get(4..).and_then(be32),
                    blocks.get_mut(count),
                ) {
                    *slot = (l, r);
                    count += 1;
                }
            }
        });
        (blocks, count)
    }

    fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// Sequence space the segment takes: payload, plus one each for SYN and FIN.
    fn seq_len(&self) -> u32 {
        let len = u32::try_from(self.payload_len).unwrap_or(u32::MAX);
        len + u32::from(self.has(tcp_flags::SYN)) + u32::from(self.has(tcp_flags::FIN))
    }
}

/// TCP option kinds the layer reads.
const OPT_END: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_SACK: u8 = 5;
const OPT_TIMESTAMP: u8 = 8;

/// Walks the options of the TCP header at `tcp_at..payload_at`, calling `f(kind, start
/// of the option's data, its data)` for each well-formed one.
fn for_each_option(
    packet: &[u8],
    tcp_at: usize,
    payload_at: usize,
    mut f: impl FnMut(u8, usize, &[u8]),
) {
    let mut at = tcp_at + 20;
    while at < payload_at {
        let Some(&kind) = packet.get(at) else { return };
        match kind {
            OPT_END => return,
            OPT_NOP => at += 1,
            _ => {
                let Some(&len) = packet.get(at + 1) else {
                    return;
                };
                let len = usize::from(len);
                if len < 2 || at + len > payload_at {
                    return;
                }
                if let Some(data) = packet.get(at + 2..at + len) {
                    f(kind, at + 2, data);
                }
                at += len;
            }
        }
    }
}

/// The timestamp option's (TSval, TSecr) of the TCP header at `tcp_at..payload_at`.
pub(super) fn timestamps(packet: &[u8], tcp_at: usize, payload_at: usize) -> Option<(u32, u32)> {
    let mut found = None;
    for_each_option(packet, tcp_at, payload_at, |kind, _, data| {
        if kind == OPT_TIMESTAMP
            && let (Some(a), Some(b)) = (be32(data), data.get(4..).and_then(be32))
        {
            found = Some((a, b));
        }
    });
    found
}

fn be32(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?))
}

/// One data segment the engine sent, kept until the peer acknowledges it.
#[derive(Debug)]
struct Segment {
    seq: u32,
    /// Sequence space taken (payload and FIN).
    len: u32,
    packet: Vec<u8>,
    tcp_at: usize,
    payload_at: usize,
    /// Sent to the wire (not held back by the congestion window or the pacer).
    released: bool,
    /// The last time it went to the wire.
    sent_at: Micros,
    retransmits: u32,
    sacked: bool,
    /// Taken for lost and not yet retransmitted, and why.
    lost: Option<Cause>,
}

impl Segment {
    fn end(&self) -> u32 {
        self.seq.wrapping_add(self.len)
    }

    /// Counted in the bytes in the network (RFC 6675's pipe).
    fn in_pipe(&self) -> bool {
        self.released && !self.sacked && self.lost.is_none()
    }
}

/// The header fields the engine last sent on a connection: a retransmitted copy gets
/// them, so it carries the current acknowledgement, window and timestamps (an old
/// timestamp would make a Linux peer drop it as a stale duplicate, PAWS).
#[derive(Clone, Copy, Debug, Default)]
struct Current {
    ack: u32,
    window: u16,
    timestamps: Option<(u32, u32)>,
}

/// Round-trip estimate (RFC 6298) from the layer's own send times.
#[derive(Clone, Copy, Debug, Default)]
struct Rtt {
    srtt: Option<Micros>,
    rttvar: Micros,
    min: Option<Micros>,
}

impl Rtt {
    fn sample(&mut self, rtt: Micros) {
        let rtt = rtt.max(1);
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                self.rttvar = (3 * self.rttvar + (srtt - rtt).abs()) / 4;
                self.srtt = Some((7 * srtt + rtt) / 8);
            }
        }
        self.min = Some(self.min.map_or(rtt, |m| m.min(rtt)));
    }

    /// Linux's timeout: the smoothed round trip plus the larger of four deviations and
    /// 200 ms.
    fn rto(&self) -> Micros {
        match self.srtt {
            Some(srtt) => srtt + (4 * self.rttvar).max(MIN_RTO),
            None => INITIAL_RTO,
        }
    }
}

/// The recovery state of one connection's sending half.
#[derive(Debug)]
struct Flow {
    segments: VecDeque<Segment>,
    /// The lowest sequence number not acknowledged (as far as the layer tracks).
    una: u32,
    /// The sequence number after the last tracked segment.
    next: u32,
    /// Bytes of the copies kept.
    bytes: usize,
    mss: u32,
    current: Current,
    /// The last ACK handed to the engine: (ack, window).
    last_ack_passed: Option<(u32, u16)>,
    dupacks: u32,
    /// In recovery until this sequence number is acknowledged.
    recovery_point: Option<u32>,
    rtt: Rtt,
    backoff: u32,
    rto_at: Option<Micros>,
    tlp_at: Option<Micros>,
    /// A probe was sent and no ACK moved since.
    probed: bool,
    cwnd: u32,
    ssthresh: u32,
    /// Pacing credit in bytes (may go negative by one segment) and when it was topped up.
    credit: i64,
    credit_at: Micros,
    pace_at: Option<Micros>,
    /// Send time of a handshake segment, for a first round-trip sample.
    syn_sent_at: Option<Micros>,
    last_activity: Micros,
    /// The deadline this flow holds in the timer heap.
    scheduled: Option<Micros>,
}

impl Flow {
    fn new(now: Micros, start: u32) -> Self {
        Self {
            segments: VecDeque::new(),
            una: start,
            next: start,
            bytes: 0,
            mss: DEFAULT_MSS,
            current: Current::default(),
            last_ack_passed: None,
            dupacks: 0,
            recovery_point: None,
            rtt: Rtt::default(),
            backoff: 0,
            rto_at: None,
            tlp_at: None,
            probed: false,
            cwnd: INITIAL_WINDOW_SEGMENTS * DEFAULT_MSS,
            ssthresh: MAX_CWND,
            credit: 0,
            credit_at: now,
            pace_at: None,
            syn_sent_at: None,
            last_activity: now,
            scheduled: None,
        }
    }

    fn deadline(&self) -> Option<Micros> {
        [self.rto_at, self.tlp_at, self.pace_at]
            .into_iter()
            .flatten()
            .min()
    }

    fn released_outstanding(&self) -> bool {
        self.segments.front().is_some_and(|s| s.released)
    }

    fn pipe(&self) -> u64 {
        self.segments
            .iter()
            .filter(|s| s.in_pipe())
            .map(|s| u64::from(s.len))
            .sum()
    }

    fn inflight(&self) -> u32 {
        self.segments
            .iter()
            .filter(|s| s.released)
            .map(|s| s.len)
            .sum()
    }

    fn rto(&self) -> Micros {
        (self.rtt.rto() << self.backoff.min(8)).min(MAX_RTO)
    }

    /// Restarts the retransmission timer from now, or stops it with nothing in flight.
    fn arm_rto(&mut self, now: Micros) {
        self.rto_at = self.released_outstanding().then(|| now + self.rto());
    }

    /// Schedules a tail-loss probe two round trips after the last send (RFC 8985), when
    /// the round trip is known and no recovery is under way.
    fn arm_tlp(&mut self, now: Micros) {
        self.tlp_at = None;
        let Some(srtt) = self.rtt.srtt else { return };
        if self.probed || self.recovery_point.is_some() || !self.released_outstanding() {
            return;
        }
        let mut pto = (2 * srtt).max(MIN_PTO);
        if self.segments.iter().filter(|s| s.released).count() == 1 {
            pto += DELAYED_ACK_ALLOWANCE;
        }
        let at = now + pto;
        if self.rto_at.is_none_or(|rto| at < rto) {
            self.tlp_at = Some(at);
        }
    }

    /// Halves the window on a newly found loss (once per recovery episode).
    fn enter_recovery(&mut self) {
        if self.recovery_point.is_some() {
            return;
        }
        self.ssthresh = (self.inflight() / 2).max(2 * self.mss);
        self.cwnd = self.ssthresh;
        self.recovery_point = Some(self.next_released());
        self.tlp_at = None;
    }

    fn next_released(&self) -> u32 {
        self.segments
            .iter()
            .rev()
            .find(|s| s.released)
            .map_or(self.una, Segment::end)
    }

    fn grow(&mut self, acked: u32) {
        if self.cwnd < self.ssthresh {
            self.cwnd = self.cwnd.saturating_add(acked);
        } else {
            let step =
                (u64::from(self.mss) * u64::from(acked) / u64::from(self.cwnd.max(1))).max(1);
            self.cwnd = self
                .cwnd
                .saturating_add(u32::try_from(step).unwrap_or(u32::MAX));
        }
        self.cwnd = self.cwnd.min(MAX_CWND);
    }

    /// Bytes per second the pacer lets out: the window over the round trip, with
    /// Linux's gains (twice the rate in slow start, 1.2 after).
    fn pacing_rate(&self) -> Option<i64> {
        let srtt = self.rtt.srtt?;
        let gain = if self.cwnd < self.ssthresh { 2.0 } else { 1.2 };
        Some((f64::from(self.cwnd) * gain * 1e6 / srtt.max(1) as f64) as i64)
    }

    fn refill_credit(&mut self, now: Micros) {
        let Some(rate) = self.pacing_rate() else {
            self.credit = i64::MAX / 2;
            self.credit_at = now;
            return;
        };
        let cap = (rate * PACING_QUANTUM / 1_000_000).max(2 * i64::from(self.mss));
        let earned = rate.saturating_mul(now - self.credit_at) / 1_000_000;
        self.credit = self.credit.saturating_add(earned).min(cap);
        self.credit_at = now;
    }

    /// Rewrites a kept copy with the connection's current header fields and fixes its
    /// checksum, written into `packet` (a buffer to reuse; its contents do not matter).
    fn refresh(&self, index: usize, mut packet: Vec<u8>) -> Option<Vec<u8>> {
        let segment = self.segments.get(index)?;
        packet.clear();
        packet.extend_from_slice(&segment.packet);
        let tcp_at = segment.tcp_at;
        let current = self.current;
        packet
            .get_mut(tcp_at + 8..tcp_at + 12)?
            .copy_from_slice(&current.ack.to_be_bytes());
        packet
            .get_mut(tcp_at + 14..tcp_at + 16)?
            .copy_from_slice(&current.window.to_be_bytes());
        if let Some((tsval, tsecr)) = current.timestamps {
            let mut at = None;
            for_each_option(&packet, tcp_at, segment.payload_at, |kind, start, data| {
                if kind == OPT_TIMESTAMP && data.len() == 8 {
                    at = Some(start);
                }
            });
            if let Some(at) = at {
                packet
                    .get_mut(at..at + 4)?
                    .copy_from_slice(&tsval.to_be_bytes());
                packet
                    .get_mut(at + 4..at + 8)?
                    .copy_from_slice(&tsecr.to_be_bytes());
            }
        }
        let ip = Ipv4Header::parse(packet.as_slice(), 0).ok()?;
        let end = ip.total_len;
        fill_tcp_checksum(packet.get_mut(tcp_at..end)?, ip.src, ip.dst)?;
        Some(packet)
    }

    /// Lets a held-back segment go: marks it sent and returns it refreshed. The copy was
    /// made when smoltcp wrote it; a segment sent since (a retransmission, or newer data)
    /// may carry a newer timestamp, and a Linux peer drops a segment whose timestamp is
    /// older than one it has taken (PAWS, RFC 7323), so a stale copy would be lost.
    fn release(&mut self, index: usize, now: Micros, buffer: Vec<u8>) -> Option<Vec<u8>> {
        let packet = self.refresh(index, buffer)?;
        let segment = self.segments.get_mut(index)?;
        segment.released = true;
        segment.sent_at = now;
        Some(packet)
    }
}

/// Configuration of the core.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Bytes of segment copies kept over all connections; beyond it new segments go
    /// untracked.
    pub(crate) max_tracked_bytes: usize,
}

/// The loss-recovery state of every connection of one engine.
#[derive(Debug)]
pub(crate) struct LossRecovery {
    flows: HashMap<Key, Flow>,
    /// Where every flow's work goes. Apart from `flows`, so a packet's flow is looked up
    /// once and then borrowed beside them (the keys are tuples a client chooses, hashed
    /// with the standard keyed hasher, which costs enough to look up once per packet).
    queues: Queues,
    tracked_bytes: usize,
    limits: Limits,
    next_sweep: Micros,
}

/// The timers, the frames to send and the counters: what a flow's handling adds to.
#[derive(Debug, Default)]
struct Queues {
    /// (deadline, connection), earliest first; entries may be stale (see `schedule`).
    timers: BinaryHeap<Reverse<(Micros, Key)>>,
    /// Frames to send, in order: retransmissions and released data.
    out: VecDeque<Vec<u8>>,
    counters: RecoveryCounters,
    /// Buffers to reuse, at most [`MAX_SPARE_BUFFERS`].
    spare: Vec<Vec<u8>>,
    /// The last packet sent untracked (its bytes are lent to the caller to send).
    passing: Vec<u8>,
    /// Buffers allocated because none was spare.
    fresh_buffers: u64,
}

impl Queues {
    /// A buffer to overwrite, reused when one is spare (it still holds an earlier packet:
    /// writers set its length and write every byte, as on a UMEM frame).
    fn buffer(&mut self) -> Vec<u8> {
        self.spare.pop().unwrap_or_else(|| {
            self.fresh_buffers += 1;
            Vec::new()
        })
    }

    /// Keeps `buffer` for reuse, if fewer than [`MAX_SPARE_BUFFERS`] are kept. Not
    /// cleared: the next writer sets the length it needs without zeroing what it will
    /// overwrite anyway.
    fn recycle(&mut self, buffer: Vec<u8>) {
        if self.spare.len() < MAX_SPARE_BUFFERS {
            self.spare.push(buffer);
        }
    }

    /// Reuses the buffers of a flow no longer tracked; returns the bytes of copies it
    /// kept.
    fn discard(&mut self, flow: Flow) -> usize {
        for segment in flow.segments {
            self.recycle(segment.packet);
        }
        flow.bytes
    }

    /// Stops tracking a connection: what it held back goes out at once, in order.
    /// Returns the bytes of copies it kept.
    fn untrack(&mut self, mut flow: Flow, now: Micros) -> usize {
        for index in 0..flow.segments.len() {
            if flow.segments.get(index).is_some_and(|s| !s.released) {
                let buffer = self.buffer();
                self.out.extend(flow.release(index, now, buffer));
            }
        }
        self.discard(flow)
    }

    /// Lets `packet` go as it is, untracked.
    fn pass(&mut self, packet: Vec<u8>) -> Outbound<'_> {
        let previous = std::mem::replace(&mut self.passing, packet);
        self.recycle(previous);
        Outbound::Send(&self.passing)
    }

    /// Puts the flow's earliest deadline in the timer heap, unless an earlier entry of
    /// it is there already.
    fn schedule(&mut self, key: Key, flow: &mut Flow) {
        let Some(at) = flow.deadline() else { return };
        // An earlier entry is already there: when it pops, the flow is scheduled again.
        if flow.scheduled.is_some_and(|s| s <= at) {
            return;
        }
        flow.scheduled = Some(at);
        self.timers.push(Reverse((at, key)));
    }

    /// Sends what the flow may send now: lost segments first, then held-back data.
    fn transmit_flow(&mut self, key: Key, flow: &mut Flow, now: Micros) {
        let mut sent_any = false;
        // Retransmissions: at least one per call when something is lost, more while the
        // pipe is below the window.
        let mut first = true;
        for index in 0..flow.segments.len() {
            let Some(segment) = flow.segments.get(index) else {
                break;
            };
            let Some(cause) = segment.lost else { continue };
            if !first && flow.pipe() + u64::from(segment.len) > u64::from(flow.cwnd) {
                break;
            }
            first = false;
            let Some(packet) = flow.refresh(index, self.buffer()) else {
                continue;
            };
            self.out.push_back(packet);
            self.counters.count(cause);
            if let Some(segment) = flow.segments.get_mut(index) {
                segment.lost = None;
                segment.retransmits += 1;
                segment.sent_at = now;
            }
            sent_any = true;
        }
        // New data held back.
        // Held segments are the newest: look for the first one from the back.
        while let Some(index) = flow
            .segments
            .iter()
            .rposition(|s| s.released)
            .map_or(Some(0), |i| Some(i + 1))
            .filter(|&i| i < flow.segments.len())
        {
            let len = flow.segments.get(index).map_or(0, |s| s.len);
            if !LossRecovery::may_release(flow, now, len) {
                break;
            }
            let Some(packet) = flow.release(index, now, self.buffer()) else {
                break;
            };
            self.out.push_back(packet);
            flow.credit -= i64::from(len);
            sent_any = true;
        }
        if sent_any {
            if flow.rto_at.is_none() {
                flow.arm_rto(now);
            }
            flow.arm_tlp(now);
        }
        self.schedule(key, flow);
    }
}

impl LossRecovery {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            flows: HashMap::new(),
            queues: Queues::default(),
            tracked_bytes: 0,
            limits,
            next_sweep: 0,
        }
    }

    pub(crate) fn counters(&self) -> RecoveryCounters {
        self.queues.counters
    }

    /// The next frame to send, if any (it stays queued until [`Self::pop_frame`]).
    pub(crate) fn front_frame(&self) -> Option<&[u8]> {
        self.queues.out.front().map(Vec::as_slice)
    }

    pub(crate) fn pop_frame(&mut self) {
        if let Some(frame) = self.queues.out.pop_front() {
            self.queues.recycle(frame);
        }
    }

    /// A buffer for the engine to write its next packet into (see [`Self::on_transmit`]);
    /// it may hold an earlier packet's bytes.
    pub(crate) fn buffer(&mut self) -> Vec<u8> {
        self.queues.buffer()
    }

    /// When the next timer (retransmission, probe, pacing) is due.
    pub(crate) fn poll_at(&self) -> Option<Micros> {
        self.queues.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// Packet buffers allocated so far and buffers spare right now.
    #[cfg(test)]
    pub(crate) fn buffers(&self) -> (u64, usize) {
        (self.queues.fresh_buffers, self.queues.spare.len())
    }

    /// Bytes of copies kept right now.
    #[cfg(test)]
    pub(crate) fn tracked_bytes(&self) -> usize {
        self.tracked_bytes
    }

    fn forget(&mut self, key: &Key) {
        if let Some(flow) = self.flows.remove(key) {
            self.tracked_bytes -= self.queues.discard(flow);
        }
    }

    /// The TCP segment in `packet` and its connection's key (`sent`: the engine sends it,
    /// so the key is source→destination; else it was received, destination→source).
    /// `None` for what is not a TCP segment and for a reset, which also ends tracking.
    fn live_segment(&mut self, packet: &[u8], sent: bool) -> Option<(Parsed, Key)> {
        let p = Parsed::parse(packet)?;
        let key = if sent { (p.src, p.dst) } else { (p.dst, p.src) };
        if p.has(tcp_flags::RST) {
            self.forget(&key);
            return None;
        }
        Some((p, key))
    }

    /// A packet the engine sends, written into a buffer from [`Self::buffer`]: the layer
    /// keeps that buffer as its copy of the segment (or for reuse), so the packet is
    /// copied once more only on its way to the device.
    pub(crate) fn on_transmit(&mut self, now: Micros, packet: Vec<u8>) -> Outbound<'_> {
        let Some((p, key)) = self.live_segment(&packet, true) else {
            return self.queues.pass(packet);
        };
        if p.has(tcp_flags::SYN) {
            // A new connection (or a retransmitted SYN): start afresh after the SYN.
            self.forget(&key);
            let mut flow = Flow::new(now, p.seq.wrapping_add(1));
            flow.syn_sent_at = Some(now);
            self.flows.insert(key, flow);
            return self.queues.pass(packet);
        }
        let seq_len = p.seq_len();
        // The entry, not a reference into it, so the gap below can remove it while the
        // segment kept at the end is lent out.
        let mut entry = match self.flows.entry(key) {
            Entry::Occupied(entry) => entry,
            Entry::Vacant(entry) if seq_len > 0 => entry.insert_entry(Flow::new(now, p.seq)),
            Entry::Vacant(_) => return self.queues.pass(packet),
        };
        let flow = entry.get_mut();
        flow.last_activity = now;
        if p.has(tcp_flags::ACK) {
            flow.current = Current {
                ack: p.ack,
                window: p.window,
                timestamps: timestamps(&packet, p.tcp_at, p.payload_at),
            };
        }
        if seq_len == 0 {
            return self.queues.pass(packet);
        }
        if seq_lt(p.seq, flow.next) {
            // smoltcp's own retransmission (its timeout went back to the first
            // unacknowledged byte) or a keep-alive probe below it.
            if seq_le(flow.una, p.seq) {
                self.queues.counters.engine_retransmits += 1;
            }
            return self.queues.pass(packet);
        }
        if p.seq != flow.next || self.tracked_bytes + packet.len() > self.limits.max_tracked_bytes {
            // A gap (the layer missed segments) or no room for a copy: what is held goes
            // out, and the connection is tracked afresh from a later segment.
            self.queues.counters.segments_untracked += 1;
            self.tracked_bytes -= self.queues.untrack(entry.remove(), now);
            return self.queues.pass(packet);
        }
        let flow = entry.into_mut();
        let payload = u32::try_from(p.payload_len).unwrap_or(u32::MAX);
        flow.mss = flow.mss.max(payload).max(1);
        if flow.mss > DEFAULT_MSS && flow.segments.is_empty() && flow.rtt.srtt.is_none() {
            flow.cwnd = flow.cwnd.max(INITIAL_WINDOW_SEGMENTS * flow.mss);
        }
        let packet_len = packet.len();
        flow.segments.push_back(Segment {
            seq: p.seq,
            len: seq_len,
            packet,
            tcp_at: p.tcp_at,
            payload_at: p.payload_at,
            released: false,
            sent_at: now,
            retransmits: 0,
            sacked: false,
            lost: None,
        });
        flow.next = p.seq.wrapping_add(seq_len);
        flow.bytes += packet_len;
        self.tracked_bytes += packet_len;
        self.queues.counters.segments_tracked += 1;
        // The newest segment goes at once when nothing is held before it and the window
        // and the pacer allow; otherwise it waits its turn.
        // Held segments are always the newest ones (release goes in order), so the one
        // before tells.
        let held_before = flow
            .segments
            .len()
            .checked_sub(2)
            .and_then(|i| flow.segments.get(i))
            .is_some_and(|s| !s.released);
        let send = !held_before && Self::may_release(flow, now, seq_len);
        if send {
            let was_idle = !flow.released_outstanding();
            if let Some(segment) = flow.segments.back_mut() {
                segment.released = true;
                segment.sent_at = now;
            }
            flow.credit -= i64::from(seq_len);
            if was_idle || flow.rto_at.is_none() {
                flow.arm_rto(now);
            }
            flow.arm_tlp(now);
        } else {
            self.queues.counters.segments_paced += 1;
        }
        self.queues.schedule(key, flow);
        match flow.segments.back() {
            Some(segment) if send => Outbound::Send(&segment.packet),
            _ => Outbound::Held,
        }
    }

    /// Whether `len` more bytes may go now: room in the congestion window and pacing
    /// credit. Sets the pacer's wake-up when only the credit is missing.
    fn may_release(flow: &mut Flow, now: Micros, len: u32) -> bool {
        let pipe = flow.pipe();
        if pipe > 0 && pipe + u64::from(len) > u64::from(flow.cwnd) {
            return false;
        }
        flow.refill_credit(now);
        if flow.credit > 0 {
            flow.pace_at = None;
            return true;
        }
        if let Some(rate) = flow.pacing_rate() {
            let wait = (-flow.credit + 1).saturating_mul(1_000_000) / rate.max(1);
            flow.pace_at = Some(now + wait.max(1));
        }
        false
    }

    /// A packet received for the engine.
    pub(crate) fn on_receive(&mut self, now: Micros, packet: &[u8]) -> Inbound {
        let Some((p, key)) = self.live_segment(packet, false) else {
            return Inbound::Pass;
        };
        if !p.has(tcp_flags::ACK) {
            return Inbound::Pass;
        }
        let Some(flow) = self.flows.get_mut(&key) else {
            return Inbound::Pass;
        };
        flow.last_activity = now;
        if let Some(sent) = flow.syn_sent_at.take()
            && seq_le(flow.una, p.ack)
        {
            flow.rtt.sample(now - sent);
        }
        // The SACK blocks: mark what they cover, note D-SACKs (a block below the ACK or
        // inside data already reported) as signs of an unneeded retransmission.
        let (blocks, count) = p.sack_blocks(packet);
        let mut delivered_sent_at: Option<Micros> = None;
        let mut delivered_end = p.ack;
        let mut sacked_now = false;
        for &(left, right) in blocks.iter().take(count) {
            if seq_le(right, p.ack) {
                self.queues.counters.spurious_retransmits += 1;
                continue;
            }
            for segment in flow.segments.iter_mut() {
                if segment.released
                    && !segment.sacked
                    && seq_le(left, segment.seq)
                    && seq_le(segment.end(), right)
                {
                    segment.sacked = true;
                    segment.lost = None;
                    sacked_now = true;
                    delivered_sent_at = delivered_sent_at.max(Some(segment.sent_at));
                    if seq_lt(delivered_end, segment.end()) {
                        delivered_end = segment.end();
                    }
                }
            }
        }
        let mut verdict = Inbound::Pass;
        let mut acked_bytes = 0u32;
        if seq_lt(flow.una, p.ack) && seq_le(p.ack, flow.next) {
            // New data acknowledged.
            let mut rtt_sample = None;
            while let Some(front) = flow.segments.front() {
                if !seq_le(front.end(), p.ack) {
                    break;
                }
                let Some(segment) = flow.segments.pop_front() else {
                    break;
                };
                acked_bytes += segment.len;
                flow.bytes -= segment.packet.len();
                self.tracked_bytes -= segment.packet.len();
                if segment.released {
                    delivered_sent_at = delivered_sent_at.max(Some(segment.sent_at));
                    if segment.retransmits == 0 {
                        rtt_sample = Some(now - segment.sent_at);
                    } else if flow
                        .rtt
                        .min
                        .is_some_and(|min| now - segment.sent_at < min / 2)
                    {
                        // Acknowledged sooner than the retransmission could have
                        // travelled: the original made it.
                        self.queues.counters.spurious_retransmits += 1;
                    }
                }
                self.queues.recycle(segment.packet);
            }
            if let Some(rtt) = rtt_sample {
                flow.rtt.sample(rtt);
            }
            flow.una = p.ack;
            flow.dupacks = 0;
            flow.backoff = 0;
            flow.probed = false;
            match flow.recovery_point {
                Some(point) if seq_le(point, p.ack) => {
                    flow.recovery_point = None;
                    flow.cwnd = flow.ssthresh.max(2 * flow.mss);
                }
                Some(_) => {
                    // NewReno: a partial ACK shows the next hole.
                    if let Some(front) = flow.segments.front_mut()
                        && front.released
                        && !front.sacked
                        && front.lost.is_none()
                        && front.retransmits == 0
                    {
                        front.lost = Some(Cause::PartialAck);
                    }
                }
                None => flow.grow(acked_bytes),
            }
            flow.arm_rto(now);
        } else if p.ack == flow.una
            && p.payload_len == 0
            && !p.has(tcp_flags::SYN)
            && !p.has(tcp_flags::FIN)
            && flow.released_outstanding()
        {
            // A duplicate ACK. It counts when it reports SACK blocks or leaves the
            // window about where it was, as Linux receivers' duplicate ACKs do while
            // their buffer drains; an ACK that only opens the window (a reader caught
            // up) is news of the window, not of a loss.
            let counts = match flow.last_ack_passed {
                _ if count > 0 => true,
                Some((_, last)) => p.window.abs_diff(last) <= last / 8,
                None => true,
            };
            if counts {
                flow.dupacks += 1;
            }
            if counts
                && flow.dupacks == DUPACK_THRESHOLD
                && flow.recovery_point.is_none()
                && let Some(front) = flow.segments.front_mut()
                && !front.sacked
                && front.retransmits == 0
            {
                front.lost = Some(Cause::DupAck);
            }
            if flow.last_ack_passed == Some((p.ack, p.window)) {
                verdict = Inbound::Absorb;
                self.queues.counters.dupacks_absorbed += 1;
            }
        }
        if acked_bytes > 0 || sacked_now {
            Self::detect_losses(flow, delivered_sent_at, delivered_end);
        }
        if flow.segments.iter().any(|s| s.lost.is_some()) {
            flow.enter_recovery();
        }
        if verdict == Inbound::Pass {
            flow.last_ack_passed = Some((p.ack, p.window));
        }
        self.queues.transmit_flow(key, flow, now);
        verdict
    }

    /// Marks segments lost by the SACK rule (three segments' worth delivered above) and
    /// the RACK rule (a segment sent later by more than the reordering window was
    /// delivered).
    fn detect_losses(flow: &mut Flow, delivered_sent_at: Option<Micros>, delivered_end: u32) {
        let reorder_window = flow
            .rtt
            .min
            .map_or(MIN_REORDER_WINDOW, |min| (min / 4).max(MIN_REORDER_WINDOW));
        let threshold = u64::from(DUPACK_THRESHOLD) * u64::from(flow.mss);
        let mut sacked_above = 0u64;
        for segment in flow.segments.iter_mut().rev() {
            if !segment.released {
                continue;
            }
            if segment.sacked {
                sacked_above += u64::from(segment.len);
                continue;
            }
            if segment.lost.is_some() {
                continue;
            }
            // A retransmitted segment stays below the SACKed data until its
            // retransmission arrives: only the time rule can find it lost again.
            let by_sack = sacked_above >= threshold && segment.retransmits == 0;
            let by_time = delivered_sent_at.is_some_and(|at| {
                segment.sent_at + reorder_window < at && seq_lt(segment.seq, delivered_end)
            });
            if by_sack || by_time {
                segment.lost = Some(Cause::Sack);
            }
        }
    }

    /// Fires due timers (retransmission, probe, pacing) and forgets long idle
    /// connections.
    pub(crate) fn poll(&mut self, now: Micros) {
        while let Some(&Reverse((at, key))) = self.queues.timers.peek() {
            if at > now {
                break;
            }
            self.queues.timers.pop();
            let Some(flow) = self.flows.get_mut(&key) else {
                continue;
            };
            if flow.scheduled != Some(at) {
                continue;
            }
            flow.scheduled = None;
            if flow.rto_at.is_some_and(|t| t <= now) {
                flow.rto_at = None;
                if flow.released_outstanding() {
                    // Everything in flight is taken for lost; slow start from one segment.
                    flow.ssthresh = (flow.inflight() / 2).max(2 * flow.mss);
                    flow.cwnd = flow.mss;
                    flow.recovery_point = Some(flow.next_released());
                    for segment in flow.segments.iter_mut().filter(|s| s.released && !s.sacked) {
                        segment.lost = Some(Cause::Rto);
                    }
                    flow.backoff += 1;
                    flow.tlp_at = None;
                    flow.arm_rto(now);
                }
            }
            if flow.tlp_at.is_some_and(|t| t <= now) {
                flow.tlp_at = None;
                flow.probed = true;
                // The probe: new data if some is held back, else the last segment sent.
                if let Some(index) = flow.segments.iter().position(|s| !s.released) {
                    let buffer = self.queues.buffer();
                    self.queues.out.extend(flow.release(index, now, buffer));
                    self.queues.counters.retransmits_tlp += 1;
                } else if let Some(segment) = flow
                    .segments
                    .iter_mut()
                    .rev()
                    .find(|s| s.released && !s.sacked)
                {
                    segment.lost = Some(Cause::Tlp);
                }
            }
            if flow.pace_at.is_some_and(|t| t <= now) {
                flow.pace_at = None;
            }
            self.queues.transmit_flow(key, flow, now);
        }
        if now >= self.next_sweep {
            self.next_sweep = now + IDLE_FORGET / 4;
            let idle: Vec<Key> = self
                .flows
                .iter()
                .filter(|(_, f)| f.segments.is_empty() && now - f.last_activity > IDLE_FORGET)
                .map(|(k, _)| *k)
                .collect();
            for key in idle {
                self.forget(&key);
            }
        }
    }
}
