//! Builds Ethernet/IPv4/TCP frames byte by byte: well-formed ones with correct checksums
//! for the packet generator, and deliberately broken ones for robustness tests.

use std::net::Ipv4Addr;

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

const ETH_LEN: usize = 14;
const IP_LEN: usize = 20;
const TCP_LEN: usize = 20;

/// Internet checksum (RFC 1071) over `data`, starting from `initial`.
pub fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    let mut chunks = data.chunks_exact(2);
    for pair in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([pair[0], pair[1]])));
    }
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*last) << 8);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A well-formed TCP segment carrying `payload`, with valid IPv4 and TCP checksums.
pub fn tcp_frame(spec: &TcpFrameSpec, payload: &[u8]) -> Vec<u8> {
    let ip_total = IP_LEN + TCP_LEN + payload.len();
    let mut f = Vec::with_capacity(ETH_LEN + ip_total);
    f.extend_from_slice(&spec.dst_mac);
    f.extend_from_slice(&spec.src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    // IPv4 header.
    f.push(0x45);
    f.push(0);
    f.extend_from_slice(&(ip_total as u16).to_be_bytes());
    f.extend_from_slice(&0u16.to_be_bytes()); // identification
    f.extend_from_slice(&0x4000u16.to_be_bytes()); // don't fragment
    f.push(64);
    f.push(6);
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&spec.src_ip.octets());
    f.extend_from_slice(&spec.dst_ip.octets());
    let ip_sum = checksum(&f[ETH_LEN..ETH_LEN + IP_LEN], 0);
    f[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&ip_sum.to_be_bytes());
    // TCP header.
    let tcp_start = f.len();
    f.extend_from_slice(&spec.src_port.to_be_bytes());
    f.extend_from_slice(&spec.dst_port.to_be_bytes());
    f.extend_from_slice(&spec.seq.to_be_bytes());
    f.extend_from_slice(&0u32.to_be_bytes());
    f.push(5 << 4);
    f.push(spec.flags);
    f.extend_from_slice(&65535u16.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(payload);
    let mut pseudo = 0u32;
    for word in [
        &spec.src_ip.octets()[..2],
        &spec.src_ip.octets()[2..],
        &spec.dst_ip.octets()[..2],
        &spec.dst_ip.octets()[2..],
    ] {
        pseudo += u32::from(u16::from_be_bytes([word[0], word[1]]));
    }
    pseudo += 6 + (TCP_LEN + payload.len()) as u32;
    let tcp_sum = checksum(&f[tcp_start..], pseudo);
    f[tcp_start + 16..tcp_start + 18].copy_from_slice(&tcp_sum.to_be_bytes());
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
mod tests {
    use super::*;

    fn spec() -> TcpFrameSpec {
        TcpFrameSpec {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src_ip: Ipv4Addr::new(198, 18, 1, 1),
            dst_ip: Ipv4Addr::new(198, 18, 1, 2),
            src_port: 40000,
            dst_port: 5201,
            flags: 0x02,
            seq: 1,
        }
    }

    #[test]
    fn checksums_verify_to_zero() {
        let f = tcp_frame(&spec(), b"hello");
        assert_eq!(f.len(), 14 + 20 + 20 + 5);
        // A header with its checksum in place sums to 0xffff, i.e. the complement is 0.
        assert_eq!(checksum(&f[14..34], 0), 0);
        let mut pseudo = 0u32;
        for w in [[198u8, 18], [1, 1], [198, 18], [1, 2]] {
            pseudo += u32::from(u16::from_be_bytes(w));
        }
        pseudo += 6 + 25;
        assert_eq!(checksum(&f[34..], pseudo), 0);
    }

    #[test]
    fn known_checksum_vector() {
        // RFC 1071 example words: 0x0001 0xf203 0xf4f5 0xf6f7 sum to 0xddf2 (one's complement).
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7], 0),
            !0xddf2
        );
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
