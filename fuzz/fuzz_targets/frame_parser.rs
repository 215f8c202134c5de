//! The frame parser the XDP program and the data plane's device share
//! (`ncp_common::wire`) and the program's steering decision (`ncp_common::steer`).
//!
//! Properties: no panic; every parsed length lies within the frame and the payload is a
//! slice of it; `classify` (the kernel's path) and `TcpSegment::parse_ethernet` (user
//! space's path) agree on what is malformed and what is TCP; a steered frame is one the
//! tables asked for; a parsed segment rebuilt with the emitters parses back to the same
//! segment with a checksum that verifies.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use ncp_common::steer::{Decision, Match, SteeringTables, classify};
use ncp_common::wire::{
    ETH_HEADER_LEN, EthernetHeader, IPPROTO_TCP, IPV4_MIN_HEADER_LEN, Ipv4Header,
    TCP_MIN_HEADER_LEN, TcpHeader, TcpSegment, checksum, fill_tcp_checksum, pseudo_header_sum,
};
use ncp_common::{OwnedEndpoints, RuleKey};

/// Tables drawn from the input: owned endpoints from its first 8 bytes, and a rule for
/// every key whose destination port is odd.
struct Tables(OwnedEndpoints);

impl SteeringTables for Tables {
    fn owned_endpoints(&self) -> Option<OwnedEndpoints> {
        Some(self.0)
    }
    fn has_rule(&self, key: &RuleKey) -> bool {
        key.dst_port[1] & 1 == 1
    }
    fn port_has_rules(&self, port: u16) -> bool {
        // Agrees with `has_rule`, as the program's per-port counts agree with its trie.
        port & 1 == 1
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((table_bytes, frame)) = data.split_first_chunk::<8>() else {
        return;
    };
    let tables = Tables(OwnedEndpoints {
        addr: [
            table_bytes[0],
            table_bytes[1],
            table_bytes[2],
            table_bytes[3],
        ],
        port_lo: u16::from_be_bytes([table_bytes[4], table_bytes[5]]),
        port_hi: u16::from_be_bytes([table_bytes[6], table_bytes[7]]),
    });

    let eth = EthernetHeader::parse(frame);
    if let Ok(eth) = eth {
        assert!(eth.header_len() <= frame.len());
        let mut buf = [0u8; ETH_HEADER_LEN + 4];
        let n = eth.emit(&mut buf).expect("the buffer fits any header");
        assert_eq!(n, eth.header_len());
        assert_eq!(
            EthernetHeader::parse(&buf[..n]),
            Ok(eth),
            "Ethernet round trip"
        );
        if let Ok(ip) = Ipv4Header::parse(frame, eth.header_len()) {
            assert!((IPV4_MIN_HEADER_LEN..=60).contains(&ip.header_len));
            assert!(ip.header_len <= ip.total_len);
            assert!(eth.header_len() + ip.total_len <= frame.len());
        }
    }

    let segment = TcpSegment::parse_ethernet(frame);
    if let Ok(Some(seg)) = &segment {
        let range = frame.as_ptr_range();
        let payload = seg.payload.as_ptr_range();
        assert!(range.start <= payload.start && payload.end <= range.end);
        rebuild_and_reparse(seg);
    }

    match classify(frame, &tables) {
        Decision::Malformed(e) => assert_eq!(segment, Err(e), "the two paths disagree"),
        Decision::Steer(why) => {
            let Ok(Some(seg)) = segment else {
                panic!("steered a frame user space does not parse as TCP: {segment:?}");
            };
            match why {
                Match::OwnedEndpoint => {
                    assert_eq!(seg.dst.ip().octets(), tables.0.addr);
                    assert!((tables.0.port_lo..=tables.0.port_hi).contains(&seg.dst.port()));
                }
                Match::Rule => assert_eq!(seg.dst.port() & 1, 1),
            }
        }
        Decision::Pass => assert!(segment.is_ok(), "passed a frame user space calls malformed"),
        // Options are parsed over by user space; the program leaves such frames alone.
        Decision::Ipv4Options => assert!(eth.is_ok()),
    }
});

/// Emits `seg` as a fresh frame (no VLAN, no options) and checks it parses back the same.
fn rebuild_and_reparse(seg: &TcpSegment<'_>) {
    let ip_len = IPV4_MIN_HEADER_LEN + TCP_MIN_HEADER_LEN + seg.payload.len();
    let mut frame = vec![0u8; ETH_HEADER_LEN + ip_len];
    let eth = EthernetHeader {
        dst: [2, 0, 0, 0, 0, 1],
        src: [2, 0, 0, 0, 0, 2],
        vlan: None,
        ethertype: ncp_common::wire::ETHERTYPE_IPV4,
    };
    let l3 = eth.emit(&mut frame).expect("room for the header");
    let ip = Ipv4Header {
        header_len: IPV4_MIN_HEADER_LEN,
        total_len: ip_len,
        ident: 1,
        flags_fragment: ncp_common::wire::IPV4_DONT_FRAGMENT,
        ttl: 64,
        protocol: IPPROTO_TCP,
        src: *seg.src.ip(),
        dst: *seg.dst.ip(),
    };
    // A segment parsed from a frame fits a 16-bit total length once rebuilt without
    // options and tags, which only shrinks it.
    ip.emit(&mut frame[l3..]).expect("total length fits");
    let l4 = l3 + IPV4_MIN_HEADER_LEN;
    let tcp = TcpHeader {
        src_port: seg.src.port(),
        dst_port: seg.dst.port(),
        seq: seg.seq,
        ack: seg.ack,
        header_len: TCP_MIN_HEADER_LEN,
        flags: seg.flags,
        window: 1024,
    };
    tcp.emit(&mut frame[l4..]).expect("room for the header");
    frame[l4 + TCP_MIN_HEADER_LEN..].copy_from_slice(seg.payload);
    let (src, dst): (Ipv4Addr, Ipv4Addr) = (*seg.src.ip(), *seg.dst.ip());
    fill_tcp_checksum(&mut frame[l4..], src, dst).expect("a whole segment");
    let sum = pseudo_header_sum(src, dst, IPPROTO_TCP, frame.len() - l4);
    assert_eq!(
        checksum(&frame[l4..], sum),
        0,
        "the filled checksum does not verify"
    );
    assert_eq!(
        checksum(&frame[l3..l4], 0),
        0,
        "the IPv4 header checksum does not verify"
    );
    let again = TcpSegment::parse_ethernet(&frame)
        .expect("a rebuilt frame is well formed")
        .expect("and TCP");
    assert_eq!(&again, seg, "emit → parse changed the segment");
}
