//! A smoltcp [`Device`] over an AF_XDP socket that does the link layer itself.
//!
//! smoltcp runs with `Medium::Ip`: redirected frames carry whatever destination MAC the
//! switch or client put there (often the primary's), and smoltcp's own Ethernet medium
//! would drop every frame not addressed to its MAC. So this device strips the Ethernet
//! header (and one VLAN tag) on receive, learning each sender's MAC for its source IPv4
//! address, and on transmit puts an Ethernet header in front using that neighbour table.
//! It never speaks ARP: ARP keeps flowing to the kernel (the XDP program passes it), and
//! the runtime can seed the table from the kernel's neighbours with [`XskDevice::learn`].
//!
//! Received frames are lent to smoltcp straight from the UMEM and go back to the fill
//! ring once smoltcp has read them; transmitted frames are written in place into free
//! UMEM frames. smoltcp verifies received checksums and computes transmitted ones
//! (the default capabilities): nothing here trusts a peer's checksum offload.
//!
//! This is the bottom of a worker's device stack (see [`crate::xdp::layers`]): hand-over
//! between workers, taps and fault injection wrap it; the [`crate::xdp::layers::LinkFrames`]
//! calls let a layer see and redirect whole link-layer frames.

use std::{
    collections::{HashMap, VecDeque},
    io,
    net::Ipv4Addr,
    os::fd::BorrowedFd,
};

use ncp_common::wire::{
    ETH_HEADER_LEN, ETHERTYPE_IPV4, EthernetHeader, Ipv4Header, VLAN_TAG_LEN, VlanTag, WireError,
    checksum,
};
use smoltcp::{
    phy::{self, DeviceCapabilities, Medium},
    time::Instant,
};

use crate::{
    engine::EngineDevice,
    xdp::layers::LinkFrames,
    xdp::xsk::{FRAME_SIZE, RxFrame, TxFrame, XskCounters, XskRx, XskSocket, XskTx},
};

/// An Ethernet (MAC) address.
pub type MacAddr = [u8; 6];

/// Room kept in front of every transmitted IP packet for the largest header we emit.
const TX_HEADROOM: usize = ETH_HEADER_LEN + VLAN_TAG_LEN;
/// Default bound of the neighbour table.
pub const DEFAULT_NEIGHBOURS: usize = 4096;
/// Non-IPv4 frames skipped in one `receive` call before it yields, so a flood of them
/// cannot hold the caller's loop.
const MAX_SKIPPED_PER_RECEIVE: usize = 64;

/// How to build a device.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// Our interface's MAC, the source of every frame sent.
    pub mac: MacAddr,
    /// Next hop for destinations with no neighbour entry of their own (e.g. a router's
    /// address). Its MAC must be learned or seeded like any neighbour's.
    pub gateway: Option<Ipv4Addr>,
    /// Bound of the neighbour table; the oldest entry goes when it is full.
    pub neighbours: usize,
    /// IP MTU handed to smoltcp (its segments are sized from it).
    pub mtu: usize,
}

impl DeviceConfig {
    /// A configuration with the defaults: no gateway, 4096 neighbours, MTU 1500.
    pub fn new(mac: MacAddr) -> Self {
        Self {
            mac,
            gateway: None,
            neighbours: DEFAULT_NEIGHBOURS,
            mtu: 1500,
        }
    }
}

/// What a neighbour entry says about how to reach an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbour {
    /// The next hop's MAC.
    pub mac: MacAddr,
    /// The VLAN tag the peer's frames arrived with (type and TCI), repeated on frames
    /// to it.
    pub vlan: Option<VlanTag>,
}

/// IPv4 address → MAC, bounded. When full, the entry learned first is evicted (FIFO):
/// a peer still talking is learned again from its next frame, so a flood of spoofed
/// sources costs at most a re-learn, and every operation stays O(1).
#[derive(Debug)]
pub struct NeighbourTable {
    entries: HashMap<Ipv4Addr, Neighbour>,
    order: VecDeque<Ipv4Addr>,
    capacity: usize,
}

impl NeighbourTable {
    /// An empty table that holds at most `capacity` entries (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            entries: HashMap::with_capacity(capacity),
            order: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    /// Records (or updates) how to reach `ip`. Returns true when the entry is new.
    pub fn learn(&mut self, ip: Ipv4Addr, neighbour: Neighbour) -> bool {
        if let Some(entry) = self.entries.get_mut(&ip) {
            *entry = neighbour;
            return false;
        }
        while self.entries.len() >= self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.entries.remove(&old);
                }
                None => break,
            }
        }
        self.entries.insert(ip, neighbour);
        self.order.push_back(ip);
        true
    }

    /// How to reach `ip`, if known.
    pub fn lookup(&self, ip: Ipv4Addr) -> Option<Neighbour> {
        self.entries.get(&ip).copied()
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The link-layer facts of a received IPv4 frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxL2 {
    /// Where the IPv4 header starts.
    pub ip_offset: usize,
    /// The sender's MAC.
    pub src_mac: MacAddr,
    /// The VLAN tag, when the frame had one.
    pub vlan: Option<VlanTag>,
    /// The IPv4 source address.
    pub src_ip: Ipv4Addr,
    /// Whether the IPv4 header checksum is right (only such frames teach the table).
    pub header_ok: bool,
}

/// Why a received frame was not handed to smoltcp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxDrop {
    /// Shorter than its headers (or than its IPv4 total length).
    Truncated,
    /// Not IPv4 (after at most one VLAN tag), or an IPv4 EtherType over another version.
    NotIpv4,
    /// IPv4 that breaks the rules of [`ncp_common::wire`] (header or total length, a
    /// fragment), which the XDP program never steers either.
    Malformed(WireError),
}

impl From<WireError> for RxDrop {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Truncated => RxDrop::Truncated,
            WireError::BadVersion => RxDrop::NotIpv4,
            other => RxDrop::Malformed(other),
        }
    }
}

/// Parses the Ethernet header, one optional VLAN tag and the IPv4 header with the one
/// parser ([`ncp_common::wire`]). Never panics, whatever the bytes.
pub fn parse_rx(frame: &[u8]) -> Result<RxL2, RxDrop> {
    let eth = EthernetHeader::parse(frame)?;
    if eth.ethertype != ETHERTYPE_IPV4 {
        return Err(RxDrop::NotIpv4);
    }
    let ip_offset = eth.header_len();
    let ip = Ipv4Header::parse(frame, ip_offset)?;
    let header = frame
        .get(ip_offset..ip_offset + ip.header_len)
        .ok_or(RxDrop::Truncated)?;
    Ok(RxL2 {
        ip_offset,
        src_mac: eth.src,
        vlan: eth.vlan,
        src_ip: ip.src,
        header_ok: checksum(header, 0) == 0,
    })
}

/// Whether a learned (IP, MAC) pair is a plausible unicast neighbour.
fn learnable(ip: Ipv4Addr, mac: MacAddr) -> bool {
    let mac_unicast = mac[0] & 1 == 0 && mac != [0; 6];
    let ip_unicast =
        !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback());
    mac_unicast && ip_unicast
}

/// Writes an Ethernet header (with a VLAN tag when `vlan` is set) for an IPv4 payload so
/// that it ends exactly at `buf[end]`. Returns where the frame starts, or `None` when
/// `end` leaves no room.
pub fn write_eth_header(
    buf: &mut [u8],
    end: usize,
    dst: MacAddr,
    src: MacAddr,
    vlan: Option<VlanTag>,
) -> Option<usize> {
    let header = EthernetHeader {
        dst,
        src,
        vlan,
        ethertype: ETHERTYPE_IPV4,
    };
    let start = end.checked_sub(header.header_len())?;
    header.emit(buf.get_mut(start..end)?)?;
    Some(start)
}

/// The IPv4 destination of an outgoing packet, when the bytes are an IPv4 packet.
fn ipv4_destination(packet: &[u8]) -> Option<Ipv4Addr> {
    Ipv4Header::parse(packet, 0).ok().map(|ip| ip.dst)
}

/// Counters of the link layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceCounters {
    /// IPv4 frames handed to smoltcp.
    pub rx_ipv4: u64,
    /// Frames dropped because they were not IPv4.
    pub rx_not_ipv4: u64,
    /// Frames dropped because they were shorter than their headers.
    pub rx_truncated: u64,
    /// IPv4 frames dropped as malformed (bad lengths, fragments).
    pub rx_malformed: u64,
    /// Neighbour entries created (from frames or seeded).
    pub learned: u64,
    /// Frames handed to the TX ring.
    pub tx_frames: u64,
    /// Frames dropped because no MAC was known for the next hop.
    pub tx_no_neighbour: u64,
    /// Frames dropped because no TX frame or ring slot was free.
    pub tx_no_frame: u64,
    /// Frames injected by a layer above while another was still peeked (dropped).
    pub rx_inject_busy: u64,
}

/// The link-layer state: our MAC, the next-hop policy, the neighbours and counters.
/// Kept apart from the socket so the transmit token can borrow it beside the TX half.
#[derive(Debug)]
pub struct LinkLayer {
    mac: MacAddr,
    gateway: Option<Ipv4Addr>,
    neighbours: NeighbourTable,
    counters: DeviceCounters,
    /// Where smoltcp writes a packet that cannot be sent (no free frame): its closure
    /// still has to run, and TCP retransmits what is lost.
    scratch: Vec<u8>,
}

impl LinkLayer {
    /// Link-layer state for `config`.
    pub fn new(config: &DeviceConfig) -> Self {
        Self {
            mac: config.mac,
            gateway: config.gateway,
            neighbours: NeighbourTable::new(config.neighbours),
            counters: DeviceCounters::default(),
            scratch: Vec::new(),
        }
    }

    /// Checks a received frame and learns its sender. Returns where the IPv4 packet starts.
    pub fn ingress(&mut self, frame: &[u8]) -> Result<usize, RxDrop> {
        match parse_rx(frame) {
            Ok(l2) => {
                self.counters.rx_ipv4 += 1;
                if l2.header_ok && learnable(l2.src_ip, l2.src_mac) {
                    self.learn_neighbour(
                        l2.src_ip,
                        Neighbour {
                            mac: l2.src_mac,
                            vlan: l2.vlan,
                        },
                    );
                }
                Ok(l2.ip_offset)
            }
            Err(e) => {
                match e {
                    RxDrop::Truncated => self.counters.rx_truncated += 1,
                    RxDrop::NotIpv4 => self.counters.rx_not_ipv4 += 1,
                    RxDrop::Malformed(_) => self.counters.rx_malformed += 1,
                }
                Err(e)
            }
        }
    }

    fn learn_neighbour(&mut self, ip: Ipv4Addr, neighbour: Neighbour) {
        if self.neighbours.learn(ip, neighbour) {
            self.counters.learned += 1;
        }
    }

    /// The next hop for an outgoing IPv4 packet: the destination's own entry (a peer
    /// behind a router was learned with the router's MAC, which is what we need), else
    /// the gateway's.
    pub fn next_hop(&self, packet: &[u8]) -> Option<Neighbour> {
        let dst = ipv4_destination(packet)?;
        self.neighbours
            .lookup(dst)
            .or_else(|| self.neighbours.lookup(self.gateway?))
    }

    /// Frames `packet_len` bytes of IPv4 written at `buf[TX_HEADROOM..]` in place.
    /// Returns the frame's start offset and length, or `None` (counted) when the next hop
    /// is unknown.
    pub fn egress(&mut self, buf: &mut [u8], packet_len: usize) -> Option<(usize, usize)> {
        let end = TX_HEADROOM + packet_len;
        let packet = buf.get(TX_HEADROOM..end)?;
        let Some(hop) = self.next_hop(packet) else {
            self.counters.tx_no_neighbour += 1;
            return None;
        };
        let start = write_eth_header(buf, TX_HEADROOM, hop.mac, self.mac, hop.vlan)?;
        Some((start, end - start))
    }

    /// The neighbour table.
    pub fn neighbours(&self) -> &NeighbourTable {
        &self.neighbours
    }

    /// Counters so far.
    pub fn counters(&self) -> DeviceCounters {
        self.counters
    }

    /// Lets smoltcp write a packet that cannot be sent (counted as `tx_no_frame`).
    fn write_to_scratch<R>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        self.counters.tx_no_frame += 1;
        self.scratch.resize(len, 0);
        f(&mut self.scratch[..len])
    }
}

/// A smoltcp device over an [`XskSocket`].
pub struct XskDevice {
    socket: XskSocket,
    link: LinkLayer,
    mtu: usize,
    /// A received frame already checked by the link layer and shown through
    /// [`EngineDevice::peek_packet`], with where its IPv4 packet starts: the next one
    /// `receive` hands over.
    pending: Option<(Pending, usize)>,
}

/// A received frame: on our ring, or injected by a layer above (handed over by another
/// worker).
#[derive(Debug)]
enum Pending {
    Ring(RxFrame),
    Injected(Vec<u8>),
}

impl XskDevice {
    /// Wraps an open socket. The MTU must leave room for the Ethernet header and a VLAN
    /// tag inside one UMEM frame.
    pub fn new(socket: XskSocket, config: &DeviceConfig) -> io::Result<Self> {
        if config.mtu < 576 || config.mtu + TX_HEADROOM > FRAME_SIZE as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "MTU {} must be between 576 and {}",
                    config.mtu,
                    FRAME_SIZE as usize - TX_HEADROOM
                ),
            ));
        }
        Ok(Self {
            socket,
            link: LinkLayer::new(config),
            mtu: config.mtu,
            pending: None,
        })
    }

    /// Records how to reach `ip` (e.g. from the kernel's neighbour table).
    pub fn learn(&mut self, ip: Ipv4Addr, mac: MacAddr) {
        self.link.learn_neighbour(ip, Neighbour { mac, vlan: None });
    }

    /// The MAC known for `ip`.
    pub fn neighbour(&self, ip: Ipv4Addr) -> Option<MacAddr> {
        self.link.neighbours.lookup(ip).map(|n| n.mac)
    }

    /// Link-layer counters.
    pub fn counters(&self) -> DeviceCounters {
        self.link.counters
    }

    /// The socket's own counters.
    pub fn socket_counters(&self) -> XskCounters {
        self.socket.counters()
    }

    /// Sleeps until a frame arrives or `timeout_ms` passes. Returns whether frames wait.
    pub fn wait(&self, timeout_ms: i32) -> io::Result<bool> {
        self.socket.wait(timeout_ms)
    }

    /// Takes frames off the RX ring until one passes the link layer's checks, and keeps
    /// it as the pending one. Frames that fail are counted and given back.
    fn fill_pending(&mut self) {
        if self.pending.is_some() {
            return;
        }
        let rx = self.socket.rx();
        for _ in 0..MAX_SKIPPED_PER_RECEIVE {
            let Some(frame) = rx.take() else {
                return;
            };
            // A frame this half just took is its own; an empty view would only fail the
            // checks below.
            let data = rx.data(&frame).unwrap_or_default();
            match self.link.ingress(data) {
                Ok(ip_offset) => {
                    self.pending = Some((Pending::Ring(frame), ip_offset));
                    return;
                }
                Err(_) => rx.release(frame),
            }
        }
    }

    /// The pending frame's bytes and where its IPv4 packet starts.
    fn pending_frame(&self) -> Option<(&[u8], usize)> {
        let (pending, ip_offset) = self.pending.as_ref()?;
        let frame = match pending {
            Pending::Ring(frame) => self.socket.rx_ref().data(frame).unwrap_or_default(),
            Pending::Injected(frame) => frame,
        };
        Some((frame, *ip_offset))
    }

    /// Makes a TX frame available if one can be had, kicking the kernel when every frame
    /// is in flight (copy mode only completes frames when kicked).
    fn tx_ready(tx: &mut XskTx) -> bool {
        if tx.free_frames() == 0 {
            tx.reclaim();
        }
        if tx.free_frames() == 0 {
            tx.kick();
        }
        tx.free_frames() > 0
    }
}

impl EngineDevice for XskDevice {
    /// Sends what smoltcp queued and returns received frames to the kernel.
    fn flush(&mut self) {
        let (rx, tx) = self.socket.split();
        tx.kick();
        rx.refill_fill_ring();
    }

    /// The IPv4 packet of the next received frame, without taking it: `receive` hands
    /// over this same frame next.
    fn peek_packet(&mut self) -> Option<&[u8]> {
        self.fill_pending();
        let (frame, ip_offset) = self.pending_frame()?;
        frame.get(ip_offset..)
    }

    fn readiness_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.socket.readiness_fd())
    }
}

impl LinkFrames for XskDevice {
    fn peek_frame(&mut self) -> Option<(&[u8], usize)> {
        self.fill_pending();
        self.pending_frame()
    }

    fn skip_peeked(&mut self) {
        if let Some((Pending::Ring(frame), _)) = self.pending.take() {
            self.socket.rx().release(frame);
        }
    }

    fn has_peeked(&self) -> bool {
        self.pending.is_some()
    }

    fn inject(&mut self, frame: Vec<u8>) {
        if self.pending.is_some() {
            self.link.counters.rx_inject_busy += 1;
            return;
        }
        if let Ok(ip_offset) = self.link.ingress(&frame) {
            self.pending = Some((Pending::Injected(frame), ip_offset));
        }
    }
}

/// Lends one received frame to smoltcp; the frame goes back to the fill ring on drop.
pub struct XskRxToken<'a> {
    rx: &'a mut XskRx,
    frame: Option<Pending>,
    ip_offset: usize,
}

impl phy::RxToken for XskRxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let data = match &self.frame {
            // The device only keeps frames its own receive half lent.
            Some(Pending::Ring(frame)) => self.rx.data(frame).unwrap_or_default(),
            Some(Pending::Injected(frame)) => frame,
            None => &[],
        };
        f(data.get(self.ip_offset..).unwrap_or(&[]))
    }
}

impl Drop for XskRxToken<'_> {
    fn drop(&mut self) {
        if let Some(Pending::Ring(frame)) = self.frame.take() {
            self.rx.release(frame);
        }
    }
}

/// Lets smoltcp write one packet in place into a free UMEM frame.
pub struct XskTxToken<'a> {
    tx: &'a mut XskTx,
    link: &'a mut LinkLayer,
}

impl phy::TxToken for XskTxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let frame: Option<TxFrame> = if TX_HEADROOM + len <= FRAME_SIZE as usize {
            self.tx.alloc()
        } else {
            None
        };
        let Some(mut frame) = frame else {
            return self.link.write_to_scratch(len, f);
        };
        let Ok(buf) = self.tx.buffer(&mut frame) else {
            // Unreachable: the frame was lent by this same half a moment ago.
            self.tx.discard(frame);
            return self.link.write_to_scratch(len, f);
        };
        let result = f(&mut buf[TX_HEADROOM..TX_HEADROOM + len]);
        match self.link.egress(buf, len) {
            Some((start, frame_len)) => {
                if self.tx.submit_at(frame, start, frame_len) {
                    self.link.counters.tx_frames += 1;
                } else {
                    self.link.counters.tx_no_frame += 1;
                }
            }
            None => self.tx.discard(frame),
        }
        result
    }
}

impl phy::Device for XskDevice {
    type RxToken<'a> = XskRxToken<'a>;
    type TxToken<'a> = XskTxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        // smoltcp may answer a segment while reading it, so a frame is only handed over
        // when a transmit frame is there for the answer; otherwise the frame waits.
        if !Self::tx_ready(self.socket.tx()) {
            return None;
        }
        self.fill_pending();
        let (frame, ip_offset) = self.pending.take()?;
        let (rx, tx) = self.socket.split();
        Some((
            XskRxToken {
                rx,
                frame: Some(frame),
                ip_offset,
            },
            XskTxToken {
                tx,
                link: &mut self.link,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        let tx = self.socket.tx();
        if !Self::tx_ready(tx) {
            return None;
        }
        Some(XskTxToken {
            tx,
            link: &mut self.link,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        // Left unset on purpose: a burst limit fights TCP window scaling (smoltcp then
        // advertises windows it will not fill).
        caps.max_burst_size = None;
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ncp_common::wire::Tpid;

    const PEER_MAC: MacAddr = [0x02, 0, 0, 0, 0, 0x0a];
    const OUR_MAC: MacAddr = [0x02, 0, 0, 0, 0, 0x0b];

    /// A minimal IPv4/TCP-ish packet from `src` to `dst` with a correct header checksum.
    fn ipv4(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        let header = Ipv4Header {
            header_len: 20,
            total_len: 40,
            ident: 0,
            flags_fragment: 0,
            ttl: 64,
            protocol: 6,
            src,
            dst,
        };
        header.emit(&mut p).unwrap();
        p
    }

    fn tag(tpid: Tpid, tci: u16) -> Option<VlanTag> {
        Some(VlanTag { tpid, tci })
    }

    fn ethernet(src: MacAddr, vlan: Option<VlanTag>, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let header = EthernetHeader {
            dst: [0xff; 6],
            src,
            vlan,
            ethertype,
        };
        let mut f = vec![0; header.header_len()];
        header.emit(&mut f).unwrap();
        f.extend_from_slice(payload);
        f
    }

    const A: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 1);
    const B: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 2);

    #[test]
    fn strips_ethernet_and_learns_the_sender() {
        let mut link = LinkLayer::new(&DeviceConfig::new(OUR_MAC));
        let packet = ipv4(A, B);
        let frame = ethernet(PEER_MAC, None, ETHERTYPE_IPV4, &packet);
        assert_eq!(link.ingress(&frame), Ok(ETH_HEADER_LEN));
        assert_eq!(&frame[ETH_HEADER_LEN..], &packet[..]);
        assert_eq!(
            link.neighbours().lookup(A),
            Some(Neighbour {
                mac: PEER_MAC,
                vlan: None
            })
        );
        assert_eq!(link.counters().rx_ipv4, 1);
        assert_eq!(link.counters().learned, 1);
    }

    #[test]
    fn strips_one_vlan_tag_and_answers_with_the_same_tag_type() {
        for tpid in [Tpid::Dot1Q, Tpid::Dot1Ad] {
            let mut link = LinkLayer::new(&DeviceConfig::new(OUR_MAC));
            let frame = ethernet(PEER_MAC, tag(tpid, 42), ETHERTYPE_IPV4, &ipv4(A, B));
            assert_eq!(link.ingress(&frame), Ok(ETH_HEADER_LEN + VLAN_TAG_LEN));
            assert_eq!(link.neighbours().lookup(A).unwrap().vlan, tag(tpid, 42));
            // The answer to A carries the tag again, of the type that arrived.
            let mut buf = vec![0u8; 128];
            let reply = ipv4(B, A);
            buf[TX_HEADROOM..TX_HEADROOM + reply.len()].copy_from_slice(&reply);
            let (start, len) = link.egress(&mut buf, reply.len()).unwrap();
            assert_eq!(start, 0);
            assert_eq!(len, reply.len() + ETH_HEADER_LEN + VLAN_TAG_LEN);
            assert_eq!(&buf[12..14], &tpid.ethertype().to_be_bytes());
            let parsed = parse_rx(&buf[start..start + len]).unwrap();
            assert_eq!(parsed.vlan, tag(tpid, 42));
            assert_eq!(&buf[0..6], &PEER_MAC);
            assert_eq!(&buf[6..12], &OUR_MAC);
        }
    }

    #[test]
    fn drops_non_ipv4_and_truncated_frames_without_learning() {
        let mut link = LinkLayer::new(&DeviceConfig::new(OUR_MAC));
        let arp = ethernet(PEER_MAC, None, 0x0806, &[0u8; 28]);
        assert_eq!(link.ingress(&arp), Err(RxDrop::NotIpv4));
        let ipv6 = ethernet(PEER_MAC, None, 0x86dd, &[0x60; 40]);
        assert_eq!(link.ingress(&ipv6), Err(RxDrop::NotIpv4));
        // Every prefix of a valid frame is handled without a panic.
        let frame = ethernet(PEER_MAC, tag(Tpid::Dot1Q, 7), ETHERTYPE_IPV4, &ipv4(A, B));
        for cut in 0..ETH_HEADER_LEN + VLAN_TAG_LEN + 20 {
            assert!(
                link.ingress(&frame[..cut]).is_err(),
                "prefix of {cut} bytes"
            );
        }
        assert_eq!(link.counters().rx_not_ipv4, 2);
        assert!(link.neighbours().is_empty());
        // A bad header checksum passes on (smoltcp drops it) but teaches nothing.
        let mut bad = ipv4(A, B);
        bad[10] ^= 0xff;
        let frame = ethernet(PEER_MAC, None, ETHERTYPE_IPV4, &bad);
        assert_eq!(link.ingress(&frame), Ok(ETH_HEADER_LEN));
        assert!(link.neighbours().is_empty());
        // So do multicast sender MACs.
        let frame = ethernet([0x01, 0, 0x5e, 0, 0, 1], None, ETHERTYPE_IPV4, &ipv4(A, B));
        assert_eq!(link.ingress(&frame), Ok(ETH_HEADER_LEN));
        assert!(link.neighbours().is_empty());
    }

    #[test]
    fn neighbour_table_is_bounded_and_evicts_the_oldest() {
        let mut table = NeighbourTable::new(4);
        let n = |i: u8| Neighbour {
            mac: [2, 0, 0, 0, 0, i],
            vlan: None,
        };
        for i in 0..4 {
            assert!(table.learn(Ipv4Addr::new(10, 0, 0, i), n(i)));
        }
        // Updating an entry neither grows the table nor evicts.
        assert!(!table.learn(Ipv4Addr::new(10, 0, 0, 0), n(9)));
        assert_eq!(table.len(), 4);
        assert!(table.learn(Ipv4Addr::new(10, 0, 0, 4), n(4)));
        assert_eq!(table.len(), 4);
        assert_eq!(table.lookup(Ipv4Addr::new(10, 0, 0, 0)), None);
        assert_eq!(table.lookup(Ipv4Addr::new(10, 0, 0, 4)), Some(n(4)));
        for i in 5..=255 {
            table.learn(Ipv4Addr::new(10, 0, 1, i), n(i));
            assert!(table.len() <= 4);
        }
    }

    #[test]
    fn tx_without_a_neighbour_is_dropped_and_the_gateway_is_a_fallback() {
        let gateway = Ipv4Addr::new(198, 18, 200, 254);
        let mut config = DeviceConfig::new(OUR_MAC);
        config.gateway = Some(gateway);
        let mut link = LinkLayer::new(&config);
        let packet = ipv4(B, Ipv4Addr::new(198, 18, 201, 9));
        let mut buf = vec![0u8; 128];
        buf[TX_HEADROOM..TX_HEADROOM + packet.len()].copy_from_slice(&packet);
        assert_eq!(link.egress(&mut buf, packet.len()), None);
        assert_eq!(link.counters().tx_no_neighbour, 1);

        let router_mac = [0x02, 0, 0, 0, 0, 0xfe];
        link.learn_neighbour(
            gateway,
            Neighbour {
                mac: router_mac,
                vlan: None,
            },
        );
        let (start, len) = link.egress(&mut buf, packet.len()).unwrap();
        assert_eq!(
            start, VLAN_TAG_LEN,
            "untagged frames start after the spare tag room"
        );
        assert_eq!(len, ETH_HEADER_LEN + packet.len());
        let frame = &buf[start..start + len];
        assert_eq!(&frame[0..6], &router_mac);
        assert_eq!(&frame[6..12], &OUR_MAC);
        assert_eq!(&frame[12..14], &[0x08, 0x00]);
        assert_eq!(&frame[ETH_HEADER_LEN..], &packet[..]);

        // Garbage that is not IPv4 has no next hop.
        buf[TX_HEADROOM] = 0x60;
        assert_eq!(link.egress(&mut buf, packet.len()), None);
        // A length past the buffer is refused, not a panic.
        assert_eq!(link.egress(&mut buf, 4096), None);
    }

    #[test]
    fn header_writer_checks_room() {
        let mut buf = [0u8; 20];
        assert_eq!(
            write_eth_header(&mut buf, 10, PEER_MAC, OUR_MAC, None),
            None
        );
        assert_eq!(
            write_eth_header(&mut buf, 14, PEER_MAC, OUR_MAC, None),
            Some(0)
        );
        assert_eq!(
            write_eth_header(&mut buf, 18, PEER_MAC, OUR_MAC, tag(Tpid::Dot1Q, 5)),
            Some(0)
        );
        assert_eq!(
            write_eth_header(&mut buf, 30, PEER_MAC, OUR_MAC, None),
            None
        );
    }
}
