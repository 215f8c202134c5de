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

use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::Arc,
};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use ncp_common::wire::TcpSegment;

use crate::config::PortRange;

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
            return self
                .shares
                .iter()
                .position(|s| (s.first..=s.last).contains(&dst.port()));
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
    fd: OwnedFd,
}

impl Waker {
    /// A new non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd(2) with valid flags; the descriptor is owned right away.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Makes the descriptor readable (the owner's `poll` returns).
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd. A full counter (EAGAIN)
        // means a wake-up is pending anyway.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), (&raw const one).cast(), 8) };
    }

    /// Clears pending wake-ups (call after `poll` returns, before draining the queues).
    pub fn clear(&self) {
        let mut count: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64 from our non-blocking eventfd.
        let _ = unsafe { libc::read(self.fd.as_raw_fd(), (&raw mut count).cast(), 8) };
    }

    /// The descriptor, for the poll set.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
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
            {
                waker.wake();
            }
        }
    }

    /// Counters so far.
    pub fn counters(&self) -> HandoverCounters {
        self.counters
    }
}

#[cfg(test)]
mod tests {
    use ncp_common::wire::ETH_HEADER_LEN;

    use super::*;
    use crate::frame::{TcpFrameSpec, tcp_frame};

    const OWN: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 4);

    /// The IPv4 packet of a TCP segment from `src` to `dst`.
    fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
        let spec = TcpFrameSpec {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src_ip: src.0,
            dst_ip: dst.0,
            src_port: src.1,
            dst_port: dst.1,
            flags: 0x10,
            seq: 1,
        };
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
        let mut fds = [libc::pollfd {
            fd: wakers[1].raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd, zero timeout.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
        assert_eq!(ready, 1, "the owner was woken");
        wakers[1].clear();
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) }, 0, "cleared");
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
}
