//! The recovery layer under a sending engine, a plain engine receiving, and a wire
//! between them with a round-trip time, scripted loss and reordering, on a simulated
//! clock: every run is the same run, and each test bounds both the time a transfer takes
//! and the retransmissions it needs.

use std::{
    collections::VecDeque,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use ncp_common::wire::{Ipv4Header, TcpHeader, fill_tcp_checksum};

use smoltcp::socket::tcp::CongestionControl;

use super::*;
use crate::engine::tests::{Loss, SIMULATED_TSVAL};
use crate::{
    config::{PortRange, TcpTuning},
    engine::{
        ConnId, Engine, EngineConfig, EngineEvent,
        pipe::{Pipe, pipe_pair},
    },
};

const SENDER: Ipv4Addr = Ipv4Addr::new(198, 18, 210, 1);
const RECEIVER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 210, 2), 7000);
/// One way; the round trip is twice this.
const ONE_WAY: Duration = Duration::from_millis(5);
const RTT: Duration = Duration::from_millis(10);
/// Longest simulated time a transfer may take before a test gives up.
const GIVE_UP: Duration = Duration::from_secs(120);

/// A data segment on the wire, as the scripts see it.
#[derive(Clone, Copy, Debug)]
struct DataSegment {
    /// Offset of its first byte in the stream.
    offset: u32,
    len: u32,
    /// How many times a segment with this offset crossed the wire before.
    seen: u32,
}

/// What the wire does to the packets of one direction.
type Script = Box<dyn FnMut(&DataSegment) -> bool>;

/// How the wire misbehaves.
#[derive(Default)]
struct WireFaults {
    /// Drops the data segments it returns true for (sender to receiver).
    drop_data: Option<Script>,
    /// Delivers the data segments it returns true for after the next packet.
    reorder_data: Option<Script>,
    /// Random loss both ways.
    random: Option<Loss>,
    /// Changes the window of every other ACK toward the sender by one, as a Linux
    /// receiver whose buffer drains between ACKs does.
    wiggle_windows: bool,
    /// Removes SACK-permitted from handshakes, so recovery works from ACKs alone.
    no_sack: bool,
}

/// One end of the wire.
#[derive(Clone, Copy)]
enum Side {
    Sender,
    Receiver,
}

/// Sender and receiver engines and the wire between them.
struct Net {
    sender: Engine<Recovery<Pipe>>,
    receiver: Engine<Pipe>,
    sender_far: Pipe,
    receiver_far: Pipe,
    /// Packets in flight: (arrival time since the epoch, packet).
    to_receiver: VecDeque<(Duration, Vec<u8>)>,
    to_sender: VecDeque<(Duration, Vec<u8>)>,
    faults: WireFaults,
    /// Data offsets seen on the wire and how often.
    seen: std::collections::HashMap<u32, u32>,
    /// The sender's initial sequence number, once seen.
    isn: Option<u32>,
    acks: u64,
    dropped: u64,
    /// The newest timestamp of the data segments the receiver took, and the segments it
    /// dropped for an older one (a Linux receiver's PAWS check, RFC 7323).
    ts_recent: Option<u32>,
    paws_dropped: u64,
    /// The receiver's latest acknowledgement: the left edge of its window.
    last_ack_sent: Option<u32>,
    epoch: Instant,
    clock: Duration,
}

fn ports() -> PortRange {
    PortRange {
        first: 20000,
        last: 20099,
    }
}

impl Net {
    fn new(recovery: RecoveryConfig, receiver_buffer: usize, faults: WireFaults) -> Self {
        Self::with_congestion(recovery, receiver_buffer, faults, CongestionControl::None)
    }

    /// A wire whose sender runs `congestion` in smoltcp itself, above the layer.
    fn with_congestion(
        recovery: RecoveryConfig,
        receiver_buffer: usize,
        faults: WireFaults,
        congestion: CongestionControl,
    ) -> Self {
        let epoch = Instant::now();
        let (s, sender_far) = pipe_pair();
        let (r, receiver_far) = pipe_pair();
        let mut sender_config = EngineConfig::new(SENDER, ports());
        sender_config.congestion_control = congestion;
        sender_config.rx_buffer = 64 * 1024;
        sender_config.tx_buffer = 64 * 1024;
        let mut receiver_config = EngineConfig::new(*RECEIVER.ip(), ports());
        receiver_config.listen = vec![RECEIVER];
        receiver_config.rx_buffer = receiver_buffer;
        receiver_config.tx_buffer = 16 * 1024;
        Self {
            sender: Engine::with_clock(Recovery::new(s, recovery), sender_config, epoch, 11)
                .unwrap(),
            receiver: Engine::with_clock(r, receiver_config, epoch, 22).unwrap(),
            sender_far,
            receiver_far,
            to_receiver: VecDeque::new(),
            to_sender: VecDeque::new(),
            faults,
            seen: std::collections::HashMap::new(),
            isn: None,
            acks: 0,
            dropped: 0,
            ts_recent: None,
            paws_dropped: 0,
            last_ack_sent: None,
            epoch,
            clock: Duration::ZERO,
        }
    }

    /// What one side sent since the last call, less what random loss drops (counted).
    fn survivors(&mut self, side: Side) -> Vec<Vec<u8>> {
        let far = match side {
            Side::Sender => &self.sender_far,
            Side::Receiver => &self.receiver_far,
        };
        let sent: Vec<Vec<u8>> = far.inbox.borrow_mut().drain(..).collect();
        let before = sent.len();
        let kept: Vec<Vec<u8>> = match self.faults.random.as_mut() {
            Some(loss) => sent.into_iter().filter(|_| !loss.drops_next()).collect(),
            None => sent,
        };
        self.dropped += (before - kept.len()) as u64;
        kept
    }

    /// Puts what the sender sent on the wire, through the faults.
    fn carry_from_sender(&mut self) {
        let mut held: Option<Vec<u8>> = None;
        let mut arriving = Vec::new();
        for mut packet in self.survivors(Side::Sender) {
            let (syn, seq, payload) = tcp_fields(&packet);
            if syn {
                self.isn = Some(seq);
                if self.faults.no_sack {
                    strip_sack_permitted(&mut packet);
                }
            }
            let mut reorder = false;
            if payload > 0
                && let Some(isn) = self.isn
            {
                let offset = seq.wrapping_sub(isn).wrapping_sub(1);
                let seen = self.seen.entry(offset).or_insert(0);
                let segment = DataSegment {
                    offset,
                    len: payload,
                    seen: *seen,
                };
                *seen += 1;
                if self.faults.drop_data.as_mut().is_some_and(|f| f(&segment)) {
                    self.dropped += 1;
                    continue;
                }
                reorder = self
                    .faults
                    .reorder_data
                    .as_mut()
                    .is_some_and(|f| f(&segment));
            }
            if reorder && held.is_none() {
                held = Some(packet);
                continue;
            }
            arriving.push(packet);
            arriving.extend(held.take());
        }
        arriving.extend(held);
        let arrival = self.clock + ONE_WAY;
        for packet in arriving {
            if self.passes_paws(&packet) {
                self.to_receiver.push_back((arrival, packet));
            }
        }
    }

    /// Whether a Linux receiver would take this segment, by the timestamp check that
    /// protects it from old duplicates (PAWS, RFC 7323): a data segment whose timestamp
    /// is older than the one remembered is dropped (counted). As in Linux, only a segment
    /// at the left edge of the window updates what is remembered, so reordering alone
    /// trips nothing.
    fn passes_paws(&mut self, packet: &[u8]) -> bool {
        let (_, seq, payload) = tcp_fields(packet);
        let Some(tsval) = tsval(packet).filter(|_| payload > 0) else {
            return true;
        };
        if self
            .ts_recent
            .is_some_and(|recent| (tsval.wrapping_sub(recent) as i32) < 0)
        {
            self.paws_dropped += 1;
            return false;
        }
        if self
            .last_ack_sent
            .is_none_or(|edge| (seq.wrapping_sub(edge) as i32) <= 0)
        {
            self.ts_recent = Some(tsval);
        }
        true
    }

    fn carry_from_receiver(&mut self) {
        let arrival = self.clock + ONE_WAY;
        for mut packet in self.survivors(Side::Receiver) {
            if let Ok(ip) = Ipv4Header::parse(packet.as_slice(), 0)
                && let Ok(tcp) =
                    TcpHeader::parse(packet.as_slice(), ip.header_len, ip.payload_len())
                && tcp.flags & ncp_common::wire::tcp_flags::ACK != 0
            {
                self.last_ack_sent = Some(tcp.ack);
            }
            if tcp_fields(&packet).0 && self.faults.no_sack {
                strip_sack_permitted(&mut packet);
            }
            self.acks += 1;
            if self.faults.wiggle_windows && self.acks.is_multiple_of(2) {
                lower_window(&mut packet);
            }
            self.to_sender.push_back((arrival, packet));
        }
    }

    fn deliver(&mut self) -> bool {
        let to_receiver = arrive(&mut self.to_receiver, self.clock, &self.receiver_far);
        let to_sender = arrive(&mut self.to_sender, self.clock, &self.sender_far);
        to_receiver || to_sender
    }

    /// The earliest moment something happens without a packet arriving.
    fn next_event(&mut self) -> Duration {
        let now = self.epoch + self.clock;
        let timers = [self.sender.poll_delay(now), self.receiver.poll_delay(now)]
            .into_iter()
            .flatten()
            .map(|d| self.clock + d);
        let wire = [self.to_receiver.front(), self.to_sender.front()]
            .into_iter()
            .flatten()
            .map(|(at, _)| *at);
        timers
            .chain(wire)
            .min()
            .unwrap_or(self.clock + Duration::from_millis(100))
            .min(self.clock + Duration::from_millis(100))
    }

    /// Sends `data` from the sender to the receiver; the receiver reads at most
    /// `read_per_ms` bytes per simulated millisecond (all there is when `None`). Returns
    /// the bytes received and the simulated time from the first byte queued to the last
    /// one read.
    fn transfer(&mut self, data: &[u8], read_per_ms: Option<usize>) -> (Vec<u8>, Duration) {
        let conn = self.sender.connect(RECEIVER).unwrap();
        let mut connected = false;
        let mut server: Option<ConnId> = None;
        let mut sent = 0;
        let mut got = Vec::new();
        let mut started = None;
        let mut buf = vec![0u8; 64 * 1024];
        let mut read_credit = 0usize;
        let mut last_read_at = Duration::ZERO;
        let mut events = Vec::new();
        while self.clock < GIVE_UP {
            let now = self.epoch + self.clock;
            SIMULATED_TSVAL.set(Some(self.clock.as_millis() as u32));
            events.clear();
            let mut busy = self.sender.poll(now, &mut events);
            for e in &events {
                assert!(
                    !matches!(e, EngineEvent::Reset { .. } | EngineEvent::Refused { .. }),
                    "sender: {e:?}"
                );
                connected |= *e == EngineEvent::Connected { conn };
            }
            if connected && sent < data.len() {
                started.get_or_insert(self.clock);
                sent += self.sender.send(conn, &data[sent..]).unwrap();
            }
            self.carry_from_sender();
            events.clear();
            busy |= self.receiver.poll(now, &mut events);
            for e in &events {
                if let EngineEvent::Accepted { conn, .. } = *e {
                    server = Some(conn);
                }
            }
            if let Some(server) = server {
                if let Some(rate) = read_per_ms {
                    let ms = (self.clock - last_read_at).as_millis() as usize;
                    read_credit = (read_credit + ms * rate).min(buf.len());
                    last_read_at += Duration::from_millis(ms as u64);
                } else {
                    read_credit = buf.len();
                }
                while read_credit > 0 {
                    let n = self.receiver.recv(server, &mut buf[..read_credit]).unwrap();
                    if n == 0 {
                        break;
                    }
                    read_credit -= n;
                    got.extend_from_slice(&buf[..n]);
                }
            }
            self.carry_from_receiver();
            if got.len() == data.len() {
                break;
            }
            busy |= self.deliver();
            if !busy {
                let mut next = self.next_event();
                if read_per_ms.is_some() {
                    next = next.min(self.clock + Duration::from_millis(1));
                }
                self.clock = next.max(self.clock);
                self.deliver();
            }
        }
        let took = self.clock - started.unwrap_or_default();
        (got, took)
    }

    fn counters(&self) -> RecoveryCounters {
        self.sender.device().counters()
    }
}

/// Hands the packets of one direction whose arrival time has come to the far end's device.
fn arrive(wire: &mut VecDeque<(Duration, Vec<u8>)>, clock: Duration, far: &Pipe) -> bool {
    let mut moved = false;
    while let Some((_, packet)) = wire.pop_front_if(|(at, _)| *at <= clock) {
        far.outbox.borrow_mut().push_back(packet);
        moved = true;
    }
    moved
}

/// The sender's timestamp (TSval) of a TCP packet, when it carries the option.
fn tsval(packet: &[u8]) -> Option<u32> {
    let ip = Ipv4Header::parse(packet, 0).ok()?;
    let tcp = TcpHeader::parse(packet, ip.header_len, ip.payload_len()).ok()?;
    let tcp_at = ip.header_len;
    super::sender::timestamps(packet, tcp_at, tcp_at + tcp.header_len).map(|(tsval, _)| tsval)
}

/// SYN flag, sequence number and payload length of a TCP packet.
fn tcp_fields(packet: &[u8]) -> (bool, u32, u32) {
    let Ok(ip) = Ipv4Header::parse(packet, 0) else {
        return (false, 0, 0);
    };
    let Ok(tcp) = TcpHeader::parse(packet, ip.header_len, ip.payload_len()) else {
        return (false, 0, 0);
    };
    let payload = ip.total_len - ip.header_len - tcp.header_len;
    (
        tcp.flags & ncp_common::wire::tcp_flags::SYN != 0,
        tcp.seq,
        payload as u32,
    )
}

fn fix_checksum(packet: &mut [u8]) {
    let ip = Ipv4Header::parse(packet, 0).unwrap();
    fill_tcp_checksum(&mut packet[ip.header_len..ip.total_len], ip.src, ip.dst).unwrap();
}

/// Turns a SACK-permitted option into two no-ops.
fn strip_sack_permitted(packet: &mut [u8]) {
    let ip = Ipv4Header::parse(packet, 0).unwrap();
    let tcp = TcpHeader::parse(packet, ip.header_len, ip.payload_len()).unwrap();
    let (start, end) = (ip.header_len + 20, ip.header_len + tcp.header_len);
    let mut at = start;
    while at < end {
        match packet[at] {
            0 => break,
            1 => at += 1,
            4 => {
                packet[at] = 1;
                packet[at + 1] = 1;
                at += 2;
            }
            _ => at += usize::from(packet[at + 1].max(2)),
        }
    }
    fix_checksum(packet);
}

fn lower_window(packet: &mut [u8]) {
    let ip = Ipv4Header::parse(packet, 0).unwrap();
    let at = ip.header_len + 14;
    let window = u16::from_be_bytes([packet[at], packet[at + 1]]);
    if window > 1 {
        packet[at..at + 2].copy_from_slice(&(window - 1).to_be_bytes());
        fix_checksum(packet);
    }
}

fn stream(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 253) as u8).collect()
}

/// The time a clean transfer of `len` bytes takes with the layer on.
fn clean_time(len: usize) -> Duration {
    let (took, c, _) = lossy_transfer(RecoveryConfig::enabled(), len, WireFaults::default());
    assert_eq!(c.retransmits(), 0, "{c:?}");
    took
}

impl DataSegment {
    fn holds(&self, offset: u32) -> bool {
        self.offset <= offset && offset < self.offset + self.len
    }
}

/// Drops the first transmission of the segment that holds byte `offset`.
fn drop_first_send_of(offset: u32) -> Script {
    Box::new(move |s: &DataSegment| s.seen == 0 && s.holds(offset))
}

const LEN: usize = 400_000;
/// A byte in the middle of the stream, well inside a full window.
const LOST: u32 = 200_000;

/// Without loss the layer only paces: the transfer takes about as long as smoltcp's
/// alone, and nothing is sent twice.
#[test]
fn a_clean_transfer_needs_no_retransmission_and_is_not_slower() {
    let len = 2_000_000;
    let took = clean_time(len);
    let (without, _, _) = lossy_transfer(RecoveryConfig::disabled(), len, WireFaults::default());
    // Slow start from ten segments costs the layer two round trips at the start; the
    // pacer (at Linux's gains) a few per cent of a window-limited stream on a 10 ms
    // round trip, where a millisecond's worth of rate is less than a window.
    assert!(
        took * 100 <= without * 110 + 2 * RTT * 100,
        "{took:?} with the layer, {without:?} without"
    );
}

/// Sends `len` bytes over a wire with `faults`, with the layer on or off, and checks
/// that every byte arrived. Returns the time it took and the layer's counters.
fn lossy_transfer(
    config: RecoveryConfig,
    len: usize,
    faults: WireFaults,
) -> (Duration, RecoveryCounters, u64) {
    let mut net = Net::new(config, 64 * 1024, faults);
    let data = stream(len);
    let (got, took) = net.transfer(&data, None);
    assert!(got == data, "{} of {} bytes", got.len(), data.len());
    if config.enabled {
        assert_eq!(
            net.paws_dropped, 0,
            "segments left with a timestamp older than one sent before them"
        );
    }
    (took, net.counters(), net.dropped)
}

/// The bound for one lost segment: two round trips and 200 ms.
fn within_one_loss_bound(took: Duration, clean: Duration) -> bool {
    took <= clean + 2 * RTT + Duration::from_millis(200)
}

/// Carries [`LEN`] bytes over `faults` with the layer on, asserts that it took no longer
/// than one lost segment may cost, and returns the layer's counters and the wire's drops.
fn repaired_within_one_loss(faults: WireFaults) -> (RecoveryCounters, u64) {
    let clean = clean_time(LEN);
    let (took, c, dropped) = lossy_transfer(RecoveryConfig::enabled(), LEN, faults);
    assert!(
        within_one_loss_bound(took, clean),
        "took {took:?}, clean {clean:?}"
    );
    (c, dropped)
}

/// The time a short answer of `len` bytes takes with the layer on and smoltcp running
/// `congestion` above it.
fn answer_time(len: usize, congestion: CongestionControl) -> Duration {
    let mut net = Net::with_congestion(
        RecoveryConfig::enabled(),
        64 * 1024,
        WireFaults::default(),
        congestion,
    );
    let data = stream(len);
    let (got, took) = net.transfer(&data, None);
    assert!(got == data, "{} of {} bytes", got.len(), data.len());
    took
}

/// A web server's short answer (here 14,000 bytes, under ten segments) leaves in the
/// first flight, as from Linux: with the layer on, the data plane's configuration runs no
/// controller in smoltcp, so the layer's initial window of ten segments is the only
/// limit. Stacked above the layer, smoltcp's CUBIC started at 2 KiB and the same answer
/// needed several round trips (the XDP-specific excess of the httperf benchmark).
#[test]
fn a_short_answer_leaves_in_the_first_flight() {
    let len = 14_000;
    let congestion = TcpTuning::default().smoltcp_congestion().into();
    let one_flight = answer_time(len, congestion);
    // One way for the last segment, plus the pacer spreading the ten over part of the
    // handshake's round trip.
    assert!(one_flight <= 2 * RTT, "{one_flight:?} with RTT {RTT:?}");
    let stacked = answer_time(len, CongestionControl::Cubic);
    eprintln!("short answer: {one_flight:?} with the layer alone, {stacked:?} with CUBIC above it");
    assert!(
        stacked >= one_flight + 2 * RTT,
        "smoltcp's CUBIC above the layer took {stacked:?}, the layer alone {one_flight:?}"
    );
}

#[test]
fn one_segment_lost_mid_window_costs_about_a_round_trip() {
    let (c, dropped) = repaired_within_one_loss(WireFaults {
        drop_data: Some(drop_first_send_of(LOST)),
        ..WireFaults::default()
    });
    assert_eq!(dropped, 1);
    assert_eq!(c.retransmits(), 1, "{c:?}");
    assert_eq!(c.retransmits_dupack + c.retransmits_sack, 1, "{c:?}");
}

#[test]
fn one_segment_lost_without_sack_is_repaired_on_duplicate_acks() {
    let (c, _) = repaired_within_one_loss(WireFaults {
        drop_data: Some(drop_first_send_of(LOST)),
        no_sack: true,
        ..WireFaults::default()
    });
    assert_eq!((c.retransmits(), c.retransmits_dupack), (1, 1), "{c:?}");
}

/// Linux receivers send duplicate ACKs that also move the window; smoltcp does not
/// count those, the layer does.
#[test]
fn duplicate_acks_that_move_the_window_still_start_a_fast_retransmit() {
    let clean = clean_time(LEN);
    let linux_like = || WireFaults {
        drop_data: Some(drop_first_send_of(LOST)),
        no_sack: true,
        wiggle_windows: true,
        ..WireFaults::default()
    };
    let (c, _) = repaired_within_one_loss(linux_like());
    assert_eq!((c.retransmits(), c.retransmits_dupack), (1, 1), "{c:?}");
    // smoltcp alone waits for its one-second timeout on the same wire.
    let (slow, _, _) = lossy_transfer(RecoveryConfig::disabled(), LEN, linux_like());
    assert!(slow >= clean + Duration::from_millis(900), "{slow:?}");
}

#[test]
fn a_whole_window_lost_at_the_tail_costs_a_few_round_trips() {
    let len = 200_000;
    let clean = clean_time(len);
    // Every segment of the last 30 KB, first transmission.
    let tail = (len as u32).saturating_sub(30_000);
    let faults = WireFaults {
        drop_data: Some(Box::new(move |s: &DataSegment| {
            s.seen == 0 && s.offset + s.len > tail
        })),
        ..WireFaults::default()
    };
    let (took, c, dropped) = lossy_transfer(RecoveryConfig::enabled(), len, faults);
    assert!(dropped >= 20, "dropped {dropped}");
    assert!(c.retransmits_tlp >= 1, "{c:?}");
    assert!(c.retransmits() <= dropped + 2, "{c:?}, dropped {dropped}");
    assert!(took <= clean + 8 * RTT, "took {took:?}, clean {clean:?}");
}

#[test]
fn a_retransmission_lost_again_is_repaired_well_within_a_second() {
    let clean = clean_time(LEN);
    let faults = WireFaults {
        drop_data: Some(Box::new(move |s: &DataSegment| {
            s.holds(LOST) && s.seen <= 1
        })),
        ..WireFaults::default()
    };
    let (took, c, dropped) = lossy_transfer(RecoveryConfig::enabled(), LEN, faults);
    assert_eq!(dropped, 2);
    assert!((2..=3).contains(&c.retransmits()), "{c:?}");
    assert!(
        took <= clean + 4 * RTT + Duration::from_millis(250),
        "took {took:?}, clean {clean:?}"
    );
}

#[test]
fn reordering_without_loss_triggers_no_retransmission_storm() {
    let clean = clean_time(LEN);
    // Every 7th data segment arrives after the one behind it.
    let faults = WireFaults {
        reorder_data: Some(Box::new(|s: &DataSegment| {
            (s.offset / 1000).is_multiple_of(7)
        })),
        ..WireFaults::default()
    };
    let (took, c, _) = lossy_transfer(RecoveryConfig::enabled(), LEN, faults);
    assert!(c.retransmits() <= 1, "{c:?}");
    assert!(took <= clean + 2 * RTT, "took {took:?}, clean {clean:?}");
}

/// One percent of the packets lost both ways at random: the layer keeps the transfer
/// going at several times the pace smoltcp manages alone.
#[test]
fn random_loss_costs_several_times_less_with_the_layer() {
    let run = |config: RecoveryConfig| {
        let faults = WireFaults {
            random: Some(Loss::new(100, 0x0123_4567_89ab_cdef)),
            // A Linux receiver's duplicate ACKs move the window.
            wiggle_windows: true,
            ..WireFaults::default()
        };
        let (took, counters, dropped) = lossy_transfer(config, 1_000_000, faults);
        assert!(dropped >= 5, "dropped only {dropped}");
        (took, counters)
    };
    let (with, counters) = run(RecoveryConfig::enabled());
    let (without, _) = run(RecoveryConfig::disabled());
    assert!(
        with * 4 <= without,
        "with the layer {with:?} ({counters:?}), without {without:?}"
    );
}

/// Heavy random loss both ways (ACKs too), so probes fire while the congestion window
/// holds data back and sends it as the probe: whatever leaves the layer, and however
/// late, must carry a timestamp no older than what went before (`lossy_transfer` checks
/// with the wire's PAWS test), or a Linux peer drops it.
#[test]
fn everything_the_layer_sends_late_carries_a_current_timestamp() {
    // A seed whose losses make a probe go out as held-back data.
    let faults = WireFaults {
        random: Some(Loss::new(12, 1)),
        wiggle_windows: true,
        ..WireFaults::default()
    };
    let (_, counters, dropped) = lossy_transfer(RecoveryConfig::enabled(), 200_000, faults);
    assert!(dropped >= 10, "dropped only {dropped}");
    assert!(counters.retransmits_tlp > 0, "no probe: {counters:?}");
}

/// A receiver that drains its small buffer slowly: the window closes and reopens, and
/// the duplicate ACKs it sends move the window. Nothing is lost, so nothing is resent.
#[test]
fn a_slow_reader_is_not_mistaken_for_loss() {
    let mut net = Net::new(RecoveryConfig::enabled(), 8 * 1024, WireFaults::default());
    let data = stream(100_000);
    let (got, _) = net.transfer(&data, Some(2_000));
    assert!(got == data);
    assert_eq!(net.counters().retransmits(), 0, "{:?}", net.counters());
}

#[test]
fn the_memory_cap_leaves_recovery_to_smoltcp() {
    let config = RecoveryConfig {
        enabled: true,
        max_tracked_bytes: 4 * 1024,
    };
    let mut net = Net::new(config, 64 * 1024, WireFaults::default());
    let data = stream(100_000);
    let (got, _) = net.transfer(&data, None);
    assert!(got == data);
    let c = net.counters();
    assert!(c.segments_untracked > 0, "{c:?}");
    assert!(net.sender.device().core.as_ref().unwrap().tracked_bytes() <= 4 * 1024);
}

/// Copies of acknowledged segments are reused for new ones: a transfer of many windows
/// allocates about a window's worth of buffers, not one per segment, and keeps at most
/// its bound of spare ones.
#[test]
fn segment_copies_are_reused_not_allocated_per_segment() {
    let mut net = Net::new(RecoveryConfig::enabled(), 64 * 1024, WireFaults::default());
    let data = stream(2_000_000);
    let (got, _) = net.transfer(&data, None);
    assert!(got == data);
    let c = net.counters();
    let (fresh, spare) = net.sender.device().core.as_ref().unwrap().buffers();
    assert!(c.segments_tracked > 1_000, "{c:?}");
    assert!(
        fresh * 5 < c.segments_tracked,
        "{fresh} buffers allocated for {} segments",
        c.segments_tracked
    );
    assert!(spare <= super::sender::MAX_SPARE_BUFFERS, "{spare} spare");
}
