//! Builds Ethernet/IPv4/TCP frames: well-formed ones with correct checksums for the packet
//! generator and the recorder's synthesized sessions, and deliberately broken ones for
//! robustness tests. Headers and checksums come from [`ncp_common::wire`], the same module
//! that parses them.

use std::net::{Ipv4Addr, SocketAddrV4};

use ncp_common::wire::{
    ETH_HEADER_LEN, ETHERTYPE_IPV4, EthernetHeader, IPPROTO_TCP, IPV4_DONT_FRAGMENT,
    IPV4_MIN_HEADER_LEN, Ipv4Header, TCP_MIN_HEADER_LEN, TcpHeader, fill_tcp_checksum,
};
use serde::{Deserialize, Serialize};

/// Addresses and ports of a generated TCP frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpFrameSpec {
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// Source IPv4 address.
    pub src_ip: Ipv4Addr,
    /// Destination IPv4 address.
    pub dst_ip: Ipv4Addr,
    /// Source TCP port.
    pub src_port: u16,
    /// Destination TCP port.
    pub dst_port: u16,
    /// TCP flags byte (SYN = 0x02, ACK = 0x10, …).
    pub flags: u8,
    /// Sequence number.
    pub seq: u32,
}

impl TcpFrameSpec {
    /// A segment from `src` to `dst` with sequence number 1, between the [`LOCAL_MACS`]:
    /// the frame of a benchmark or a test, which no NIC's address filter sees.
    pub fn local(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Self {
        let (src_mac, dst_mac) = LOCAL_MACS;
        Self {
            src_mac,
            dst_mac,
            src_ip: *src.ip(),
            dst_ip: *dst.ip(),
            src_port: src.port(),
            dst_port: dst.port(),
            flags,
            seq: 1,
        }
    }
}

/// Locally administered source and destination MACs for frames built in memory.
pub const LOCAL_MACS: ([u8; 6], [u8; 6]) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);

/// Ways a frame can be broken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Malformation {
    /// Shorter than an Ethernet header.
    TruncatedEthernet,
    /// Ethernet header and half an IPv4 header.
    TruncatedIpv4,
    /// Full IPv4 header, half a TCP header.
    TruncatedTcp,
    /// IPv4 header length field below the minimum of 5 words.
    BadIhl,
    /// IPv4 header with options (IHL 6).
    Ipv4Options,
    /// A non-first IPv4 fragment.
    Fragment,
    /// TCP data offset below 5 words.
    BadTcpOffset,
    /// IPv4 total length shorter than the headers.
    BadTotalLength,
}

impl Malformation {
    /// Every kind, for tests that send them all.
    pub const ALL: [Malformation; 8] = [
        Malformation::TruncatedEthernet,
        Malformation::TruncatedIpv4,
        Malformation::TruncatedTcp,
        Malformation::BadIhl,
        Malformation::Ipv4Options,
        Malformation::Fragment,
        Malformation::BadTcpOffset,
        Malformation::BadTotalLength,
    ];
}

const ETH_LEN: usize = ETH_HEADER_LEN;
const IP_LEN: usize = IPV4_MIN_HEADER_LEN;

/// One TCP segment to build, with or without an Ethernet header.
#[derive(Clone, Copy, Debug)]
pub struct Segment<'a> {
    /// Source and destination MACs of an Ethernet header; `None` for a bare IPv4 packet.
    pub macs: Option<([u8; 6], [u8; 6])>,
    /// Source address and port.
    pub src: SocketAddrV4,
    /// Destination address and port.
    pub dst: SocketAddrV4,
    /// IPv4 identification.
    pub ip_id: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number.
    pub ack: u32,
    /// TCP flag bits.
    pub flags: u8,
    /// Receive window.
    pub window: u16,
    /// TCP options, a multiple of 4 bytes long.
    pub options: &'a [u8],
    /// Payload.
    pub payload: &'a [u8],
}

/// Replaces `out` with the segment's frame: Ethernet (optional), IPv4 without options and
/// with "don't fragment", TCP, valid checksums, written with the one header writer and
/// checksum routine of [`ncp_common::wire`]. A segment too long for IPv4's 16-bit total
/// length leaves `out` empty rather than half written.
pub fn write_segment(out: &mut Vec<u8>, seg: &Segment<'_>) {
    let ip_start = if seg.macs.is_some() { ETH_LEN } else { 0 };
    let tcp_len = TCP_MIN_HEADER_LEN + seg.options.len() + seg.payload.len();
    out.clear();
    out.resize(ip_start + IP_LEN + tcp_len, 0);
    if emit_segment(out, seg, ip_start).is_none() {
        out.clear();
    }
}

/// Writes every header, the options and the payload into `frame`, sized for them.
fn emit_segment(frame: &mut [u8], seg: &Segment<'_>, ip_start: usize) -> Option<()> {
    if let Some((src_mac, dst_mac)) = seg.macs {
        let eth = EthernetHeader {
            dst: dst_mac,
            src: src_mac,
            vlan: None,
            ethertype: ETHERTYPE_IPV4,
        };
        eth.emit(frame)?;
    }
    let (ip_frame, segment) = frame.get_mut(ip_start..)?.split_at_mut_checked(IP_LEN)?;
    let ip = Ipv4Header {
        header_len: IP_LEN,
        total_len: IP_LEN + segment.len(),
        ident: seg.ip_id,
        flags_fragment: IPV4_DONT_FRAGMENT,
        ttl: 64,
        protocol: IPPROTO_TCP,
        src: *seg.src.ip(),
        dst: *seg.dst.ip(),
    };
    ip.emit(ip_frame)?;
    let options_end = TCP_MIN_HEADER_LEN + seg.options.len();
    let tcp = TcpHeader {
        src_port: seg.src.port(),
        dst_port: seg.dst.port(),
        seq: seg.seq,
        ack: seg.ack,
        header_len: options_end,
        flags: seg.flags,
        window: seg.window,
    };
    tcp.emit(segment)?;
    segment
        .get_mut(TCP_MIN_HEADER_LEN..options_end)?
        .copy_from_slice(seg.options);
    segment.get_mut(options_end..)?.copy_from_slice(seg.payload);
    fill_tcp_checksum(segment, *seg.src.ip(), *seg.dst.ip())
}

/// A well-formed TCP segment carrying `payload`, with valid IPv4 and TCP checksums.
pub fn tcp_frame(spec: &TcpFrameSpec, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_LEN + IP_LEN + TCP_MIN_HEADER_LEN + payload.len());
    write_segment(
        &mut f,
        &Segment {
            macs: Some((spec.src_mac, spec.dst_mac)),
            src: SocketAddrV4::new(spec.src_ip, spec.src_port),
            dst: SocketAddrV4::new(spec.dst_ip, spec.dst_port),
            ip_id: 0,
            seq: spec.seq,
            ack: 0,
            flags: spec.flags,
            window: u16::MAX,
            options: &[],
            payload,
        },
    );
    f
}

/// A frame broken in the given way, built from an otherwise matching segment.
pub fn malformed_frame(spec: &TcpFrameSpec, kind: Malformation) -> Vec<u8> {
    let mut f = tcp_frame(spec, &[]);
    match kind {
        Malformation::TruncatedEthernet => f.truncate(10),
        Malformation::TruncatedIpv4 => f.truncate(ETH_LEN + 10),
        Malformation::TruncatedTcp => {
            f.truncate(ETH_LEN + IP_LEN + 8);
            f[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&((IP_LEN + 8) as u16).to_be_bytes());
        }
        Malformation::BadIhl => f[ETH_LEN] = 0x43,
        Malformation::Ipv4Options => {
            f[ETH_LEN] = 0x46;
            f.splice(ETH_LEN + IP_LEN..ETH_LEN + IP_LEN, [1, 1, 1, 0]);
            let total = (f.len() - ETH_LEN) as u16;
            f[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&total.to_be_bytes());
        }
        Malformation::Fragment => {
            f[ETH_LEN + 6..ETH_LEN + 8].copy_from_slice(&0x0010u16.to_be_bytes())
        }
        Malformation::BadTcpOffset => f[ETH_LEN + IP_LEN + 12] = 2 << 4,
        Malformation::BadTotalLength => {
            f[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&10u16.to_be_bytes())
        }
    }
    f
}

#[cfg(test)]
mod cases;

#[cfg(test)]
mod tests {
    use ncp_common::wire::{checksum, pseudo_header_sum};

    use super::*;

    fn spec() -> TcpFrameSpec {
        TcpFrameSpec::local(
            "198.18.1.1:40000".parse().unwrap(),
            "198.18.1.2:5201".parse().unwrap(),
            0x02,
        )
    }

    #[test]
    fn checksums_verify_to_zero() {
        let f = tcp_frame(&spec(), b"hello");
        assert_eq!(f.len(), 14 + 20 + 20 + 5);
        // A header with its checksum in place sums to 0xffff, i.e. the complement is 0.
        assert_eq!(checksum(&f[14..34], 0), 0);
        let s = spec();
        let pseudo = pseudo_header_sum(s.src_ip, s.dst_ip, IPPROTO_TCP, 25);
        assert_eq!(checksum(&f[34..], pseudo), 0);
    }

    #[test]
    fn malformations_break_what_they_say() {
        let s = spec();
        assert_eq!(
            malformed_frame(&s, Malformation::TruncatedEthernet).len(),
            10
        );
        assert_eq!(malformed_frame(&s, Malformation::TruncatedIpv4).len(), 24);
        assert_eq!(malformed_frame(&s, Malformation::TruncatedTcp).len(), 42);
        assert_eq!(malformed_frame(&s, Malformation::BadIhl)[14] & 0x0f, 3);
        let opts = malformed_frame(&s, Malformation::Ipv4Options);
        assert_eq!(opts[14] & 0x0f, 6);
        assert_eq!(
            u16::from_be_bytes([opts[16], opts[17]]) as usize,
            opts.len() - 14
        );
        assert_ne!(
            malformed_frame(&s, Malformation::Fragment)[20..22],
            [0x40, 0]
        );
        assert_eq!(malformed_frame(&s, Malformation::BadTcpOffset)[46] >> 4, 2);
    }
}
