//! Frames that reach the wrong worker, and the queues that take them to the right one.
//!
//! With several queues on a NIC, each served by its own worker, the NIC decides which
//! queue a frame lands on (RSS on real hardware; on veth, whatever queue the sender
//! used), and that decision knows nothing of our sessions. So every worker agrees on an
//! owner for every frame, from the frame alone:
//! - a frame to one of our own addresses goes to the worker whose share of the owned port
//!   range holds its destination port (each worker opens its upstream connections from
//!   its own share, so the answers of the primary and the replicas find their way back);
//! - any other TCP frame (a client's, addressed to a service) goes to the worker picked
//!   by a hash of its 4-tuple, the same on every worker and for every frame of the flow.
//!
//! A worker that receives a frame it does not own copies it into the owner's bounded
//! crossbeam queue (one per worker and link) and wakes the owner through its eventfd; the
//! owner feeds it to its engine like a frame of its own ring. Nothing on this path locks.
//! A full queue drops the frame (counted), as a full ring would: TCP recovers.
//!
//! The hand-over is a device layer ([`HandoverDevice`]) around the AF_XDP device: it sees
//! each received frame before the engine does, passes on what another worker owns, and
//! feeds in what other workers passed on, so the device below knows nothing of workers.

use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsFd, BorrowedFd},
    sync::Arc,
};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use ncp_common::wire::TcpSegment;
use smoltcp::{phy::Device, time::Instant};

use crate::{
    config::PortRange,
    engine::EngineDevice,
    sys::EventFd,
    xdp::device::MacAddr,
    xdp::layers::{LinkFrames, forward_to_inner},
    xdp::neighbours::Neighbours,
};

/// Frames a worker's queue holds per link before hand-overs to it are dropped.
pub const QUEUE_FRAMES: usize = 4096;

/// Which worker owns which frames of one link: pure data, the same on every worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ownership {
    /// The link's own address (upstream connections start from it).
    pub own_addr: Ipv4Addr,
    /// Each worker's share of the owned port range, by worker index.
    pub shares: Vec<PortRange>,
}

impl Ownership {
    /// Splits `range` into `workers` contiguous shares of (nearly) equal size. `None` when
    /// the range has fewer ports than there are workers.
    pub fn split(own_addr: Ipv4Addr, range: PortRange, workers: usize) -> Option<Self> {
        let (first, last) = (range.first.min(range.last), range.first.max(range.last));
        let ports = usize::from(last - first) + 1;
        if workers == 0 || ports < workers {
            return None;
        }
        let shares = (0..workers)
            .map(|w| {
                // Share w covers [first + w·ports/n, first + (w+1)·ports/n - 1].
                let lo = first as usize + w * ports / workers;
                let hi = first as usize + (w + 1) * ports / workers - 1;
                PortRange {
                    first: u16::try_from(lo).unwrap_or(u16::MAX),
                    last: u16::try_from(hi).unwrap_or(u16::MAX),
                }
            })
            .collect();
        Some(Self { own_addr, shares })
    }

    /// The worker that owns an IPv4 packet, or `None` for anything the one parser
    /// ([`ncp_common::wire`]) does not take for a TCP segment (the receiving worker keeps
    /// it: no flow to speak of, and the engine's dispatch rejects the same packets).
    pub fn owner(&self, packet: &[u8]) -> Option<usize> {
        let segment = TcpSegment::parse(packet, 0).ok()??;
        let (src, dst) = (segment.src, segment.dst);
        if *dst.ip() == self.own_addr {
            return self.shares.iter().position(|s| s.contains(dst.port()));
        }
        let mut key = [0u8; 12];
        key[..4].copy_from_slice(&src.ip().octets());
        key[4..8].copy_from_slice(&dst.ip().octets());
        key[8..10].copy_from_slice(&src.port().to_be_bytes());
        key[10..12].copy_from_slice(&dst.port().to_be_bytes());
        let workers = u64::try_from(self.shares.len()).ok()?;
        usize::try_from(flow_hash(&key) % workers).ok()
    }
}

/// FNV-1a over the 4-tuple: cheap, and the same in every worker and every run.
fn flow_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Wakes a worker that may be asleep in `poll(2)`: an eventfd in its poll set.
#[derive(Debug)]
pub struct Waker {
    event: EventFd,
}

impl Waker {
    /// A new non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            event: EventFd::new()?,
        })
    }

    /// Makes the descriptor readable (the owner's `poll` returns).
    pub fn wake(&self) -> io::Result<()> {
        self.event.signal()
    }

    /// Clears pending wake-ups (call after `poll` returns, before draining the queues).
    pub fn clear(&self) -> io::Result<()> {
        self.event.drain()
    }
}

impl AsFd for Waker {
    /// The descriptor, for the poll set.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.event.as_fd()
    }
}

/// Counters of one link's hand-overs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandoverCounters {
    /// Frames this worker passed to their owner.
    pub handed_out: u64,
    /// Frames other workers passed to this one.
    pub handed_in: u64,
    /// Frames dropped because the owner's queue was full.
    pub dropped: u64,
    /// Wake-ups that failed (the owner then finds its frames on its next timer).
    pub wake_failed: u64,
}

/// One worker's end of the hand-over on one link.
#[derive(Clone, Debug)]
pub struct Handover {
    /// Who owns what on this link.
    pub ownership: Ownership,
    /// This worker's index.
    pub me: usize,
    /// Every worker's queue on this link, by index (this worker's included, unused).
    pub outboxes: Vec<Sender<Vec<u8>>>,
    /// This worker's queue on this link.
    pub inbox: Receiver<Vec<u8>>,
    /// Every worker's waker, by index.
    pub wakers: Vec<Arc<Waker>>,
}

/// The hand-over ends of one link for every worker.
pub fn link_handovers(ownership: &Ownership, wakers: &[Arc<Waker>]) -> Vec<Handover> {
    let (outboxes, inboxes): (Vec<_>, Vec<_>) =
        (0..wakers.len()).map(|_| bounded(QUEUE_FRAMES)).unzip();
    inboxes
        .into_iter()
        .enumerate()
        .map(|(me, inbox)| Handover {
            ownership: ownership.clone(),
            me,
            outboxes: outboxes.clone(),
            inbox,
            wakers: wakers.to_vec(),
        })
        .collect()
}

/// The per-link hand-over state a device keeps: the shared ends plus which owners to wake
/// once the current round is over.
#[derive(Debug)]
pub struct HandoverPort {
    ends: Handover,
    to_wake: Vec<bool>,
    counters: HandoverCounters,
}

impl HandoverPort {
    /// Wraps one worker's ends.
    pub fn new(ends: Handover) -> Self {
        let workers = ends.wakers.len();
        Self {
            ends,
            to_wake: vec![false; workers],
            counters: HandoverCounters::default(),
        }
    }

    /// If another worker owns `packet` (the IPv4 part of `frame`), queues a copy of the
    /// whole frame for it and returns true; the caller then drops its own copy.
    pub fn pass_on(&mut self, frame: &[u8], packet: &[u8]) -> bool {
        let Some(owner) = self.ends.ownership.owner(packet) else {
            return false;
        };
        if owner == self.ends.me {
            return false;
        }
        let Some(outbox) = self.ends.outboxes.get(owner) else {
            return false;
        };
        match outbox.try_send(frame.to_vec()) {
            Ok(()) => {
                self.counters.handed_out += 1;
                if let Some(flag) = self.to_wake.get_mut(owner) {
                    *flag = true;
                }
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.counters.dropped += 1;
            }
        }
        true
    }

    /// A frame another worker passed to this one, if any.
    pub fn take(&mut self) -> Option<Vec<u8>> {
        let frame = self.ends.inbox.try_recv().ok()?;
        self.counters.handed_in += 1;
        Some(frame)
    }

    /// Wakes the owners that got frames since the last call.
    pub fn wake_owners(&mut self) {
        for (owner, flag) in self.to_wake.iter_mut().enumerate() {
            if std::mem::take(flag)
                && let Some(waker) = self.ends.wakers.get(owner)
                && let Err(e) = waker.wake()
            {
                self.counters.wake_failed += 1;
                tracing::warn!(owner, error = %e, "could not wake a worker for handed-over frames");
            }
        }
    }

    /// Counters so far.
    pub fn counters(&self) -> HandoverCounters {
        self.counters
    }
}

/// Frames passed on in one peek before it gives up for this round, so a flood of frames
/// for other workers cannot hold the caller's loop.
const MAX_PASSED_ON_PER_PEEK: usize = 64;

/// The hand-over layer: wraps a worker's device on a link shared with other workers.
/// Before the engine sees a received frame, a frame another worker owns is passed on to
/// it; frames other workers passed to this one are received first, through the same
/// link-layer checks as the ring's. Without a port (a worker alone on its NIC) it passes
/// everything through.
pub struct HandoverDevice<D> {
    inner: D,
    port: Option<HandoverPort>,
    /// The frame peeked below was checked: this worker owns it.
    vetted: bool,
}

impl<D> HandoverDevice<D> {
    /// Wraps `inner`, sharing its link through `port` when there is one.
    pub fn new(inner: D, port: Option<HandoverPort>) -> Self {
        Self {
            inner,
            port,
            vetted: false,
        }
    }

    /// The device underneath.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// The device underneath, mutably.
    pub fn inner_mut(&mut self) -> &mut D {
        &mut self.inner
    }

    /// Hand-over counters, when the link is shared.
    pub fn handover_counters(&self) -> Option<HandoverCounters> {
        self.port.as_ref().map(HandoverPort::counters)
    }
}

impl<D: LinkFrames> HandoverDevice<D> {
    /// Makes the frame peeked below one this worker owns, if any frame is there: feeds in
    /// handed-in frames while nothing is peeked, and passes on peeked frames of others.
    /// Returns whether such a frame waits.
    fn settle(&mut self) -> bool {
        if self.vetted && self.inner.has_peeked() {
            return true;
        }
        self.vetted = false;
        let Some(port) = &mut self.port else {
            return self.inner.peek_frame().is_some();
        };
        for _ in 0..MAX_PASSED_ON_PER_PEEK {
            while !self.inner.has_peeked() {
                let Some(frame) = port.take() else { break };
                self.inner.inject(frame);
            }
            let Some((frame, ip_offset)) = self.inner.peek_frame() else {
                return false;
            };
            let passed_on = frame
                .get(ip_offset..)
                .is_some_and(|packet| port.pass_on(frame, packet));
            if !passed_on {
                self.vetted = true;
                return true;
            }
            self.inner.skip_peeked();
        }
        false
    }
}

impl<D: LinkFrames> Device for HandoverDevice<D> {
    forward_to_inner!(type RxToken of D);
    forward_to_inner!(type TxToken of D);

    fn receive(&mut self, timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        if !self.settle() {
            return None;
        }
        // Whatever comes of it, the frame vetted is gone or checked again next time (the
        // device below may keep it when it has no transmit frame for the answer).
        self.vetted = false;
        self.inner.receive(timestamp)
    }

    forward_to_inner!(transmit, capabilities);
}

impl<D: LinkFrames> EngineDevice for HandoverDevice<D> {
    forward_to_inner!(start_round, poll_at);

    /// Ends the round below and wakes the workers that were passed frames in it.
    fn flush(&mut self) {
        self.inner.flush();
        if let Some(port) = &mut self.port {
            port.wake_owners();
        }
    }

    fn peek_packet(&mut self) -> Option<&[u8]> {
        if !self.settle() {
            return None;
        }
        self.inner.peek_packet()
    }

    forward_to_inner!(readiness_fd);
}

impl<D: Neighbours> Neighbours for HandoverDevice<D> {
    fn neighbour(&self, ip: Ipv4Addr) -> Option<MacAddr> {
        self.inner.neighbour(ip)
    }

    fn learn(&mut self, ip: Ipv4Addr, mac: MacAddr) {
        self.inner.learn(ip, mac);
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddrV4;

    use ncp_common::wire::ETH_HEADER_LEN;

    use smoltcp::phy::DeviceCapabilities;

    use super::*;
    use crate::frame::{TcpFrameSpec, tcp_frame};

    const OWN: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 4);

    /// The IPv4 packet of a TCP segment from `src` to `dst`.
    fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
        let spec = TcpFrameSpec::local(
            SocketAddrV4::new(src.0, src.1),
            SocketAddrV4::new(dst.0, dst.1),
            0x10,
        );
        tcp_frame(&spec, &[])[ETH_HEADER_LEN..].to_vec()
    }

    #[test]
    fn the_owned_range_is_shared_out_without_gaps_or_overlaps() {
        let o = Ownership::split(
            OWN,
            PortRange {
                first: 20000,
                last: 29999,
            },
            3,
        )
        .unwrap();
        assert_eq!(o.shares[0].first, 20000);
        assert_eq!(o.shares[2].last, 29999);
        for pair in o.shares.windows(2) {
            assert_eq!(pair[0].last + 1, pair[1].first);
        }
        let one = PortRange { first: 5, last: 5 };
        assert!(
            Ownership::split(OWN, one, 2).is_none(),
            "fewer ports than workers"
        );
        assert!(Ownership::split(OWN, one, 0).is_none());
    }

    #[test]
    fn answers_go_by_port_and_client_flows_by_hash() {
        let o = Ownership::split(
            OWN,
            PortRange {
                first: 20000,
                last: 20999,
            },
            2,
        )
        .unwrap();
        let primary = Ipv4Addr::new(198, 18, 1, 2);
        assert_eq!(o.owner(&tcp((primary, 80), (OWN, 20000))), Some(0));
        assert_eq!(o.owner(&tcp((primary, 80), (OWN, 20999))), Some(1));
        assert_eq!(
            o.owner(&tcp((primary, 80), (OWN, 30000))),
            None,
            "not owned"
        );
        // Client flows: every frame of a flow has one owner, and flows spread.
        let client = Ipv4Addr::new(198, 18, 1, 1);
        let owners: Vec<usize> = (40000..40064)
            .map(|port| o.owner(&tcp((client, port), (primary, 80))).unwrap())
            .collect();
        assert!(owners.contains(&0) && owners.contains(&1), "{owners:?}");
        assert_eq!(
            o.owner(&tcp((client, 40007), (primary, 80))),
            Some(owners[7])
        );
        // Not TCP, cut short, not IPv4: no owner, no panic.
        let mut udp = tcp((client, 1), (primary, 2));
        udp[9] = 17;
        assert_eq!(o.owner(&udp), None);
        let whole = tcp((client, 1), (primary, 2));
        for cut in 0..24 {
            assert_eq!(o.owner(&whole[..cut]), None, "cut at {cut}");
        }
    }

    /// Two workers sharing ports 20000 (worker 0) and 20001 (worker 1), with their wakers.
    fn two_workers() -> (Vec<Handover>, Vec<Arc<Waker>>) {
        let o = Ownership::split(
            OWN,
            PortRange {
                first: 20000,
                last: 20001,
            },
            2,
        )
        .unwrap();
        let wakers: Vec<Arc<Waker>> = (0..2).map(|_| Arc::new(Waker::new().unwrap())).collect();
        (link_handovers(&o, &wakers), wakers)
    }

    #[test]
    fn frames_reach_their_owner_and_wake_it() {
        let (ends, wakers) = two_workers();
        let mut ends = ends.into_iter().map(HandoverPort::new);
        let (mut w0, mut w1) = (ends.next().unwrap(), ends.next().unwrap());
        let primary = Ipv4Addr::new(198, 18, 1, 2);
        let for_w1 = tcp((primary, 80), (OWN, 20001));
        let mut frame = vec![0xee; 14];
        frame.extend_from_slice(&for_w1);
        assert!(w0.pass_on(&frame, &for_w1));
        assert!(
            !w0.pass_on(&frame, &tcp((primary, 80), (OWN, 20000))),
            "its own"
        );
        w0.wake_owners();
        let readable = || crate::sys::wait_readable(wakers[1].as_fd(), 0).unwrap();
        assert!(readable(), "the owner was woken");
        wakers[1].clear().unwrap();
        assert!(!readable(), "cleared");
        assert_eq!(w1.take(), Some(frame));
        assert_eq!(w1.take(), None);
        assert_eq!(w0.counters().handed_out, 1);
        assert_eq!(w1.counters().handed_in, 1);
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let (mut ends, _wakers) = two_workers();
        let _w1 = ends.pop(); // keeps worker 1's queue open
        let mut w0 = HandoverPort::new(ends.remove(0));
        let packet = tcp((Ipv4Addr::new(198, 18, 1, 2), 80), (OWN, 20001));
        for _ in 0..QUEUE_FRAMES + 10 {
            assert!(w0.pass_on(&packet, &packet));
        }
        assert_eq!(w0.counters().handed_out, QUEUE_FRAMES as u64);
        assert_eq!(w0.counters().dropped, 10);
    }

    /// A link device over a queue of Ethernet frames (14-byte headers), for the layer.
    #[derive(Default)]
    struct FakeLink {
        ring: std::collections::VecDeque<Vec<u8>>,
        peeked: Option<Vec<u8>>,
        flushed: usize,
    }

    struct FakeRx(Vec<u8>);
    struct FakeTx;

    impl smoltcp::phy::RxToken for FakeRx {
        fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
            f(&self.0[14..])
        }
    }

    impl smoltcp::phy::TxToken for FakeTx {
        fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
            f(&mut vec![0; len])
        }
    }

    impl Device for FakeLink {
        type RxToken<'a> = FakeRx;
        type TxToken<'a> = FakeTx;

        fn receive(&mut self, _: Instant) -> Option<(FakeRx, FakeTx)> {
            self.peek_frame()?;
            Some((FakeRx(self.peeked.take()?), FakeTx))
        }

        fn transmit(&mut self, _: Instant) -> Option<FakeTx> {
            Some(FakeTx)
        }

        fn capabilities(&self) -> DeviceCapabilities {
            DeviceCapabilities::default()
        }
    }

    impl EngineDevice for FakeLink {
        fn flush(&mut self) {
            self.flushed += 1;
        }

        fn peek_packet(&mut self) -> Option<&[u8]> {
            self.peek_frame().map(|(frame, offset)| &frame[offset..])
        }
    }

    impl LinkFrames for FakeLink {
        fn peek_frame(&mut self) -> Option<(&[u8], usize)> {
            if self.peeked.is_none() {
                self.peeked = self.ring.pop_front();
            }
            Some((self.peeked.as_deref()?, 14))
        }

        fn skip_peeked(&mut self) {
            self.peeked = None;
        }

        fn has_peeked(&self) -> bool {
            self.peeked.is_some()
        }

        fn inject(&mut self, frame: Vec<u8>) {
            assert!(self.peeked.is_none(), "injected over a peeked frame");
            self.peeked = Some(frame);
        }
    }

    fn ethernet(packet: &[u8]) -> Vec<u8> {
        let mut frame = vec![0xee; 14];
        frame.extend_from_slice(packet);
        frame
    }

    fn received(device: &mut HandoverDevice<FakeLink>) -> Option<Vec<u8>> {
        let peeked = device.peek_packet()?.to_vec();
        let (rx, _) = device.receive(Instant::ZERO)?;
        let packet = smoltcp::phy::RxToken::consume(rx, <[u8]>::to_vec);
        assert_eq!(packet, peeked, "receive hands over what peek showed");
        Some(packet)
    }

    #[test]
    fn the_layer_passes_on_frames_of_others_and_receives_theirs_first() {
        let (ends, wakers) = two_workers();
        let mut ends = ends.into_iter().map(HandoverPort::new);
        let primary = Ipv4Addr::new(198, 18, 1, 2);
        let for_w0 = tcp((primary, 80), (OWN, 20000));
        let for_w1 = tcp((primary, 80), (OWN, 20001));
        let also_for_w1 = tcp((primary, 81), (OWN, 20001));
        let mut w0 = HandoverDevice::new(FakeLink::default(), ends.next());
        let mut w1 = HandoverDevice::new(FakeLink::default(), ends.next());
        w0.inner_mut()
            .ring
            .extend([ethernet(&for_w1), ethernet(&for_w0), ethernet(&also_for_w1)]);
        w1.inner_mut().ring.push_back(ethernet(&for_w1));

        assert_eq!(
            received(&mut w0),
            Some(for_w0.clone()),
            "its own, after passing one on"
        );
        assert_eq!(received(&mut w0), None, "the last one was passed on too");
        w0.flush();
        assert_eq!(w0.inner().flushed, 1, "the round ends below too");
        assert!(
            crate::sys::wait_readable(wakers[1].as_fd(), 0).unwrap(),
            "owner woken"
        );
        // Handed-in frames come before the owner's own ring.
        assert_eq!(received(&mut w1), Some(for_w1.clone()));
        assert_eq!(received(&mut w1), Some(also_for_w1));
        assert_eq!(received(&mut w1), Some(for_w1.clone()), "then its ring");
        assert_eq!(
            w0.handover_counters().map(|c| c.handed_out),
            Some(2),
            "counted where they left"
        );
        assert_eq!(w1.handover_counters().map(|c| c.handed_in), Some(2));

        // Alone on its link, the layer passes everything through.
        let mut alone = HandoverDevice::new(FakeLink::default(), None);
        alone.inner_mut().ring.push_back(ethernet(&for_w1));
        assert_eq!(received(&mut alone), Some(for_w1));
        assert_eq!(alone.handover_counters(), None);
    }
}
