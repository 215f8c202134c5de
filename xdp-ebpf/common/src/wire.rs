//! The one view of Ethernet (one VLAN tag), IPv4 and TCP headers, for the XDP program and
//! for user space alike.
//!
//! Every parser reads through [`FrameBytes`], so the same code runs over a byte slice in
//! user space and over the packet in the kernel, where the XDP program implements the trait
//! with the pointer-against-`data_end` checks the verifier wants. Headers are read into
//! small `Copy` structs; nothing is allocated and nothing panics, whatever the bytes.
//!
//! What counts as well formed, once for everyone:
//! - at most one VLAN tag, 802.1Q or 802.1ad alike; the tag type is kept so an answer can
//!   carry the type that arrived;
//! - IPv4 with version 4, a header length of at least 5 words, a total length that covers
//!   the header and fits in the frame (trailing Ethernet padding is allowed), and no
//!   fragmentation (neither "more fragments" nor an offset: nothing here reassembles);
//!   options are parsed over, but the XDP program leaves packets carrying them to the
//!   kernel (see [`crate::steer`]);
//! - TCP with a data offset of at least 5 words that fits in the IPv4 payload.
//!
//! Checksums are not verified by the parsers: peers with checksum offload deliver partial
//! ones, and smoltcp checks what it consumes. [`checksum`] is the one routine that
//! computes them.

use core::net::{Ipv4Addr, SocketAddrV4};

/// Ethernet header without a VLAN tag.
pub const ETH_HEADER_LEN: usize = 14;
/// Bytes one VLAN tag adds.
pub const VLAN_TAG_LEN: usize = 4;
/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// EtherType of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// Smallest IPv4 header (IHL 5).
pub const IPV4_MIN_HEADER_LEN: usize = 20;
/// IPv4 protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IPv4 protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;
/// IPv4 protocol number of ICMP.
pub const IPPROTO_ICMP: u8 = 1;
/// "Don't fragment" in the IPv4 flags/fragment-offset field.
pub const IPV4_DONT_FRAGMENT: u16 = 0x4000;
/// "More fragments" plus the 13-bit fragment offset: any bit set means a fragment.
pub const IPV4_FRAGMENT_MASK: u16 = 0x3fff;
/// Smallest TCP header (data offset 5).
pub const TCP_MIN_HEADER_LEN: usize = 20;

/// TCP flag bits (the 14th byte of the header).
pub mod tcp_flags {
    /// No more data from the sender.
    pub const FIN: u8 = 0x01;
    /// Synchronise sequence numbers.
    pub const SYN: u8 = 0x02;
    /// Reset the connection.
    pub const RST: u8 = 0x04;
    /// Push.
    pub const PSH: u8 = 0x08;
    /// The acknowledgement number is valid.
    pub const ACK: u8 = 0x10;
}

/// Bounds-checked reads of a frame's bytes.
pub trait FrameBytes {
    /// The `N` bytes at `offset`, or `None` when the frame ends before them.
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;
    /// Whether the frame holds at least `len` bytes.
    fn holds(&self, len: usize) -> bool;
}

impl FrameBytes for [u8] {
    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let end = offset.checked_add(N)?;
        self.get(offset..end)?.try_into().ok()
    }

    #[inline(always)]
    fn holds(&self, len: usize) -> bool {
        self.len() >= len
    }
}

/// Why a frame is not well formed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    /// The frame (or the IPv4 packet, for TCP) ends inside a header or before the IPv4
    /// total length.
    Truncated,
    /// EtherType IPv4 but the version field is not 4.
    BadVersion,
    /// IPv4 header length below 5 words.
    BadHeaderLength,
    /// IPv4 total length shorter than the IPv4 header.
    BadTotalLength,
    /// An IPv4 fragment (more-fragments flag or an offset).
    Fragment,
    /// TCP data offset below 5 words or past the end of the segment.
    BadDataOffset,
}

/// The two VLAN tag types (TPIDs) looked through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tpid {
    /// IEEE 802.1Q, EtherType 0x8100.
    Dot1Q,
    /// IEEE 802.1ad (service tag), EtherType 0x88a8.
    Dot1Ad,
}

impl Tpid {
    /// The tag type an EtherType announces, if it is one.
    #[inline(always)]
    pub const fn from_ethertype(ethertype: u16) -> Option<Self> {
        match ethertype {
            0x8100 => Some(Tpid::Dot1Q),
            0x88a8 => Some(Tpid::Dot1Ad),
            _ => None,
        }
    }

    /// The EtherType that announces this tag type.
    #[inline(always)]
    pub const fn ethertype(self) -> u16 {
        match self {
            Tpid::Dot1Q => 0x8100,
            Tpid::Dot1Ad => 0x88a8,
        }
    }
}

/// One VLAN tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VlanTag {
    /// Which kind of tag it was.
    pub tpid: Tpid,
    /// Priority, drop eligibility and VLAN id, as on the wire.
    pub tci: u16,
}

/// An Ethernet header with at most one VLAN tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EthernetHeader {
    /// Destination MAC.
    pub dst: [u8; 6],
    /// Source MAC.
    pub src: [u8; 6],
    /// The VLAN tag, when there is one. A second tag is not looked through: its EtherType
    /// is what [`EthernetHeader::ethertype`] then says.
    pub vlan: Option<VlanTag>,
    /// EtherType of the payload (after the tag).
    pub ethertype: u16,
}

impl EthernetHeader {
    /// Reads the header at the start of `frame`.
    #[inline(always)]
    pub fn parse<B: FrameBytes + ?Sized>(frame: &B) -> Result<Self, WireError> {
        let h = frame
            .read::<ETH_HEADER_LEN>(0)
            .ok_or(WireError::Truncated)?;
        let dst = [h[0], h[1], h[2], h[3], h[4], h[5]];
        let src = [h[6], h[7], h[8], h[9], h[10], h[11]];
        let outer = u16::from_be_bytes([h[12], h[13]]);
        let Some(tpid) = Tpid::from_ethertype(outer) else {
            return Ok(Self {
                dst,
                src,
                vlan: None,
                ethertype: outer,
            });
        };
        let tag = frame
            .read::<VLAN_TAG_LEN>(ETH_HEADER_LEN)
            .ok_or(WireError::Truncated)?;
        Ok(Self {
            dst,
            src,
            vlan: Some(VlanTag {
                tpid,
                tci: u16::from_be_bytes([tag[0], tag[1]]),
            }),
            ethertype: u16::from_be_bytes([tag[2], tag[3]]),
        })
    }

    /// Length of the header, tag included: where the payload starts.
    #[inline(always)]
    pub const fn header_len(&self) -> usize {
        match self.vlan {
            Some(_) => ETH_HEADER_LEN + VLAN_TAG_LEN,
            None => ETH_HEADER_LEN,
        }
    }

    /// Writes the header at the start of `buf`. Returns its length, or `None` when `buf`
    /// is too short.
    pub fn emit(&self, buf: &mut [u8]) -> Option<usize> {
        let len = self.header_len();
        let h = buf.get_mut(..len)?;
        h[0..6].copy_from_slice(&self.dst);
        h[6..12].copy_from_slice(&self.src);
        match self.vlan {
            Some(tag) => {
                h[12..14].copy_from_slice(&tag.tpid.ethertype().to_be_bytes());
                h[14..16].copy_from_slice(&tag.tci.to_be_bytes());
                h[16..18].copy_from_slice(&self.ethertype.to_be_bytes());
            }
            None => h[12..14].copy_from_slice(&self.ethertype.to_be_bytes()),
        }
        Some(len)
    }
}

/// An IPv4 header (options are skipped over, not read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Header {
    /// Header length in bytes, options included (20..=60).
    pub header_len: usize,
    /// Total length of the packet, header included.
    pub total_len: usize,
    /// Identification.
    pub ident: u16,
    /// Flags and fragment offset, as on the wire.
    pub flags_fragment: u16,
    /// Time to live.
    pub ttl: u8,
    /// Protocol of the payload.
    pub protocol: u8,
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
}

impl Ipv4Header {
    /// Reads the IPv4 header at `offset` of `frame` and checks it against the rules in
    /// the module documentation.
    #[inline(always)]
    pub fn parse<B: FrameBytes + ?Sized>(frame: &B, offset: usize) -> Result<Self, WireError> {
        let h = frame
            .read::<IPV4_MIN_HEADER_LEN>(offset)
            .ok_or(WireError::Truncated)?;
        if h[0] >> 4 != 4 {
            return Err(WireError::BadVersion);
        }
        let header_len = usize::from(h[0] & 0x0f) * 4;
        if header_len < IPV4_MIN_HEADER_LEN {
            return Err(WireError::BadHeaderLength);
        }
        let total_len = usize::from(u16::from_be_bytes([h[2], h[3]]));
        if total_len < header_len {
            return Err(WireError::BadTotalLength);
        }
        if !frame.holds(offset + total_len) {
            return Err(WireError::Truncated);
        }
        let flags_fragment = u16::from_be_bytes([h[6], h[7]]);
        if flags_fragment & IPV4_FRAGMENT_MASK != 0 {
            return Err(WireError::Fragment);
        }
        Ok(Self {
            header_len,
            total_len,
            ident: u16::from_be_bytes([h[4], h[5]]),
            flags_fragment,
            ttl: h[8],
            protocol: h[9],
            src: Ipv4Addr::new(h[12], h[13], h[14], h[15]),
            dst: Ipv4Addr::new(h[16], h[17], h[18], h[19]),
        })
    }

    /// Whether the header carries options.
    #[inline(always)]
    pub const fn has_options(&self) -> bool {
        self.header_len != IPV4_MIN_HEADER_LEN
    }

    /// Bytes after the header, up to the total length.
    #[inline(always)]
    pub const fn payload_len(&self) -> usize {
        self.total_len - self.header_len
    }

    /// Writes a 20-byte header (no options; `header_len` is taken as 20) with its checksum
    /// at the start of `buf`. `None` when `buf` is too short or the total length does not
    /// fit the field.
    pub fn emit(&self, buf: &mut [u8]) -> Option<()> {
        let total = u16::try_from(self.total_len).ok()?;
        let h = buf.get_mut(..IPV4_MIN_HEADER_LEN)?;
        h[0] = 0x45;
        h[1] = 0;
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h[4..6].copy_from_slice(&self.ident.to_be_bytes());
        h[6..8].copy_from_slice(&self.flags_fragment.to_be_bytes());
        h[8] = self.ttl;
        h[9] = self.protocol;
        h[10..12].copy_from_slice(&[0, 0]);
        h[12..16].copy_from_slice(&self.src.octets());
        h[16..20].copy_from_slice(&self.dst.octets());
        let sum = checksum(h, 0);
        h[10..12].copy_from_slice(&sum.to_be_bytes());
        Some(())
    }
}

/// A TCP header (options are skipped over, not read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpHeader {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number.
    pub ack: u32,
    /// Header length in bytes, options included (20..=60).
    pub header_len: usize,
    /// Flag bits ([`tcp_flags`]).
    pub flags: u8,
    /// Receive window.
    pub window: u16,
}

impl TcpHeader {
    /// Reads the TCP header at `offset` of `frame`; `segment_len` is the IPv4 payload
    /// length, which the header and its options must fit in.
    #[inline(always)]
    pub fn parse<B: FrameBytes + ?Sized>(
        frame: &B,
        offset: usize,
        segment_len: usize,
    ) -> Result<Self, WireError> {
        if segment_len < TCP_MIN_HEADER_LEN {
            return Err(WireError::Truncated);
        }
        let h = frame
            .read::<TCP_MIN_HEADER_LEN>(offset)
            .ok_or(WireError::Truncated)?;
        let header_len = usize::from(h[12] >> 4) * 4;
        if header_len < TCP_MIN_HEADER_LEN || header_len > segment_len {
            return Err(WireError::BadDataOffset);
        }
        Ok(Self {
            src_port: u16::from_be_bytes([h[0], h[1]]),
            dst_port: u16::from_be_bytes([h[2], h[3]]),
            seq: u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
            ack: u32::from_be_bytes([h[8], h[9], h[10], h[11]]),
            header_len,
            flags: h[13],
            window: u16::from_be_bytes([h[14], h[15]]),
        })
    }

    /// Writes the fixed 20 header bytes at the start of `segment` (data offset from
    /// `header_len`, checksum and urgent pointer zero). Options and payload are the
    /// caller's; [`fill_tcp_checksum`] closes the segment.
    pub fn emit(&self, segment: &mut [u8]) -> Option<()> {
        let offset_words = u8::try_from(self.header_len / 4).ok()?;
        let h = segment.get_mut(..TCP_MIN_HEADER_LEN)?;
        h[0..2].copy_from_slice(&self.src_port.to_be_bytes());
        h[2..4].copy_from_slice(&self.dst_port.to_be_bytes());
        h[4..8].copy_from_slice(&self.seq.to_be_bytes());
        h[8..12].copy_from_slice(&self.ack.to_be_bytes());
        h[12] = offset_words << 4;
        h[13] = self.flags;
        h[14..16].copy_from_slice(&self.window.to_be_bytes());
        h[16..20].copy_from_slice(&[0, 0, 0, 0]);
        Some(())
    }
}

/// Internet checksum (RFC 1071) over `data`, continuing from the partial sum `initial`
/// (e.g. a pseudo-header's, from [`pseudo_header_sum`]). A header that carries a correct
/// checksum sums to zero.
pub fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = u64::from(initial);
    let mut chunks = data.chunks_exact(2);
    for pair in &mut chunks {
        sum += u64::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop above leaves at most 16 bits.
    !(sum as u16)
}

/// The partial sum of the IPv4 pseudo-header that TCP and UDP checksums cover.
pub fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, length: usize) -> u32 {
    let words = |a: Ipv4Addr| {
        let o = a.octets();
        u32::from(u16::from_be_bytes([o[0], o[1]])) + u32::from(u16::from_be_bytes([o[2], o[3]]))
    };
    // A TCP segment inside an IPv4 packet is shorter than 64 KiB, so the length fits.
    words(src) + words(dst) + u32::from(protocol) + (length as u32 & 0xffff)
}

/// Computes and stores the TCP checksum of a whole segment (header, options, payload)
/// sent from `src` to `dst`. `None` when the segment is shorter than a TCP header.
pub fn fill_tcp_checksum(segment: &mut [u8], src: Ipv4Addr, dst: Ipv4Addr) -> Option<()> {
    if segment.len() < TCP_MIN_HEADER_LEN {
        return None;
    }
    segment[16..18].copy_from_slice(&[0, 0]);
    let sum = checksum(
        segment,
        pseudo_header_sum(src, dst, IPPROTO_TCP, segment.len()),
    );
    segment[16..18].copy_from_slice(&sum.to_be_bytes());
    Some(())
}

/// A TCP segment of an IPv4 packet held in a byte slice, its payload borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSegment<'a> {
    /// Source address and port.
    pub src: SocketAddrV4,
    /// Destination address and port.
    pub dst: SocketAddrV4,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number.
    pub ack: u32,
    /// Flag bits ([`tcp_flags`]).
    pub flags: u8,
    /// Payload (after TCP options, before any link-layer padding).
    pub payload: &'a [u8],
}

impl<'a> TcpSegment<'a> {
    /// Parses the IPv4 packet at `offset` of `frame`: `Ok(None)` when it is well formed
    /// but not TCP.
    pub fn parse(frame: &'a [u8], offset: usize) -> Result<Option<Self>, WireError> {
        let ip = Ipv4Header::parse(frame, offset)?;
        if ip.protocol != IPPROTO_TCP {
            return Ok(None);
        }
        let l4 = offset + ip.header_len;
        let tcp = TcpHeader::parse(frame, l4, ip.payload_len())?;
        let payload = frame
            .get(l4 + tcp.header_len..offset + ip.total_len)
            .ok_or(WireError::Truncated)?;
        Ok(Some(Self {
            src: SocketAddrV4::new(ip.src, tcp.src_port),
            dst: SocketAddrV4::new(ip.dst, tcp.dst_port),
            seq: tcp.seq,
            ack: tcp.ack,
            flags: tcp.flags,
            payload,
        }))
    }

    /// Parses a whole Ethernet frame: `Ok(None)` when it is well formed but not TCP over
    /// IPv4.
    pub fn parse_ethernet(frame: &'a [u8]) -> Result<Option<Self>, WireError> {
        let eth = EthernetHeader::parse(frame)?;
        if eth.ethertype != ETHERTYPE_IPV4 {
            return Ok(None);
        }
        Self::parse(frame, eth.header_len())
    }

    /// SYN set.
    pub fn syn(&self) -> bool {
        self.flags & tcp_flags::SYN != 0
    }
    /// ACK set.
    pub fn ack(&self) -> bool {
        self.flags & tcp_flags::ACK != 0
    }
    /// FIN set.
    pub fn fin(&self) -> bool {
        self.flags & tcp_flags::FIN != 0
    }
    /// RST set.
    pub fn rst(&self) -> bool {
        self.flags & tcp_flags::RST != 0
    }
    /// A connection request: SYN without ACK.
    pub fn is_connection_request(&self) -> bool {
        self.syn() && !self.ack()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_checksum_vector() {
        // RFC 1071's example words 0x0001 0xf203 0xf4f5 0xf6f7 sum to 0xddf2.
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7], 0),
            !0xddf2
        );
        // An odd byte counts as the high half of a last word.
        assert_eq!(checksum(&[0x12], 0), !0x1200);
    }

    #[test]
    fn emitted_headers_parse_back_with_checksums_that_verify() {
        let src = Ipv4Addr::new(198, 18, 0, 1);
        let dst = Ipv4Addr::new(198, 18, 0, 2);
        let mut frame = [0u8; 18 + 20 + 20 + 3];
        let eth = EthernetHeader {
            dst: [2, 0, 0, 0, 0, 2],
            src: [2, 0, 0, 0, 0, 1],
            vlan: Some(VlanTag {
                tpid: Tpid::Dot1Ad,
                tci: 7,
            }),
            ethertype: ETHERTYPE_IPV4,
        };
        assert_eq!(eth.emit(&mut frame), Some(18));
        let ip = Ipv4Header {
            header_len: 20,
            total_len: 43,
            ident: 9,
            flags_fragment: IPV4_DONT_FRAGMENT,
            ttl: 64,
            protocol: IPPROTO_TCP,
            src,
            dst,
        };
        assert_eq!(ip.emit(&mut frame[18..]), Some(()));
        let tcp = TcpHeader {
            src_port: 40000,
            dst_port: 80,
            seq: 1,
            ack: 2,
            header_len: 20,
            flags: tcp_flags::ACK,
            window: 1000,
        };
        assert_eq!(tcp.emit(&mut frame[38..]), Some(()));
        frame[58..].copy_from_slice(b"abc");
        assert_eq!(fill_tcp_checksum(&mut frame[38..], src, dst), Some(()));

        assert_eq!(EthernetHeader::parse(&frame[..]), Ok(eth));
        assert_eq!(Ipv4Header::parse(&frame[..], 18), Ok(ip));
        assert_eq!(TcpHeader::parse(&frame[..], 38, 23), Ok(tcp));
        assert_eq!(checksum(&frame[18..38], 0), 0);
        assert_eq!(
            checksum(&frame[38..], pseudo_header_sum(src, dst, IPPROTO_TCP, 23)),
            0
        );
        let seg = TcpSegment::parse_ethernet(&frame).unwrap().unwrap();
        assert_eq!(seg.payload, b"abc");
        assert_eq!(seg.src, SocketAddrV4::new(src, 40000));
    }
}
