//! One table of frames, and what every reader of frames must make of each: the XDP
//! program's decision (`ncp_common::steer::classify`, the very function the kernel runs),
//! the one parser (`ncp_common::wire`), the device's receive check, the hand-over owner
//! and the engine's dispatch. They read through the same parser, so they can only
//! disagree where this table says they may (the device takes any well-formed IPv4 packet,
//! the others only TCP segments).

use std::net::{Ipv4Addr, SocketAddrV4};

use ncp_common::{
    OwnedEndpoints, RuleKey,
    steer::{Decision, Match, SteeringTables, classify},
    wire::{
        ETH_HEADER_LEN, ETHERTYPE_ARP, IPPROTO_ICMP, IPPROTO_UDP, TcpSegment, Tpid, VLAN_TAG_LEN,
        WireError, checksum,
    },
};

use super::{Malformation, Segment, TcpFrameSpec, malformed_frame, write_segment};
use crate::{
    config::PortRange,
    engine::segment_of,
    rules::RedirectRule,
    xdp::device::{RxDrop, parse_rx},
    xdp::handover::Ownership,
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const PRIMARY: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const OWN: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 4);
const SERVICE_PORT: u16 = 5201;
/// A second service whose rule names the client's source port.
const PINNED_PORT: u16 = 6379;
const PINNED_CLIENT_PORT: u16 = 40001;
const OWNED: PortRange = PortRange {
    first: 20000,
    last: 20999,
};

/// The XDP program's maps, modelled: the owned endpoints and a longest-prefix lookup over
/// the rules' trie keys.
struct Tables {
    owned: OwnedEndpoints,
    rules: Vec<RedirectRule>,
}

fn key_bytes(k: &RuleKey) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..4].copy_from_slice(&k.dst_addr);
    b[4..6].copy_from_slice(&k.dst_port);
    b[6..8].copy_from_slice(&k.src_port);
    b[8..].copy_from_slice(&k.src_addr);
    b
}

/// Whether the first `bits` bits of two keys agree (what the LPM trie matches on).
fn prefix_matches(bits: u32, stored: &RuleKey, key: &RuleKey) -> bool {
    let (a, b) = (key_bytes(stored), key_bytes(key));
    (0..bits as usize).all(|i| (a[i / 8] ^ b[i / 8]) & (0x80 >> (i % 8)) == 0)
}

impl SteeringTables for Tables {
    fn owned_endpoints(&self) -> Option<OwnedEndpoints> {
        Some(self.owned)
    }

    fn port_has_rules(&self, port: u16) -> bool {
        self.rules.iter().any(|r| r.destination_port == port)
    }

    fn has_rule(&self, key: &RuleKey) -> bool {
        self.rules.iter().any(|r| {
            let (bits, stored) = r.map_key();
            prefix_matches(bits, &stored, key)
        })
    }
}

fn tables() -> Tables {
    Tables {
        owned: OwnedEndpoints {
            addr: OWN.octets(),
            port_lo: OWNED.first,
            port_hi: OWNED.last,
        },
        rules: vec![
            RedirectRule {
                id: 1,
                source: "198.18.1.0/24".parse().expect("prefix"),
                source_port: None,
                destination: PRIMARY,
                destination_port: SERVICE_PORT,
            },
            RedirectRule {
                id: 2,
                source: "198.18.1.1/32".parse().expect("prefix"),
                source_port: Some(PINNED_CLIENT_PORT),
                destination: PRIMARY,
                destination_port: PINNED_PORT,
            },
        ],
    }
}

/// An Ethernet/IPv4/TCP frame from `src` to `dst` with a 3-byte payload.
fn tcp(src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    let mut f = Vec::new();
    write_segment(
        &mut f,
        &Segment {
            macs: Some(([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])),
            src,
            dst,
            ip_id: 1,
            seq: 7,
            ack: 0,
            flags: 0x02,
            window: 1000,
            options: &[],
            payload: b"abc",
        },
    );
    f
}

fn client(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(CLIENT, port)
}

fn to_service() -> Vec<u8> {
    tcp(client(40000), SocketAddrV4::new(PRIMARY, SERVICE_PORT))
}

const IP: usize = ETH_HEADER_LEN;
const TCP: usize = ETH_HEADER_LEN + 20;

/// Rewrites the IPv4 header checksum after an edit (the parsers do not check it, but the
/// device learns neighbours only from frames whose header checksum is right).
fn fix_ip_checksum(f: &mut [u8], ip: usize) {
    let len = usize::from(f[ip] & 0x0f) * 4;
    f[ip + 10..ip + 12].copy_from_slice(&[0, 0]);
    let sum = checksum(&f[ip..ip + len], 0);
    f[ip + 10..ip + 12].copy_from_slice(&sum.to_be_bytes());
}

fn edit(mut f: Vec<u8>, change: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    change(&mut f);
    fix_ip_checksum(&mut f, IP);
    f
}

fn tagged(tpid: Tpid, mut f: Vec<u8>) -> Vec<u8> {
    let mut tag = tpid.ethertype().to_be_bytes().to_vec();
    tag.extend_from_slice(&5u16.to_be_bytes());
    f.splice(12..12, tag);
    f
}

fn set_total_len(f: &mut [u8], total: u16) {
    f[IP + 2..IP + 4].copy_from_slice(&total.to_be_bytes());
}

/// What the one parser makes of a frame, shortened to the 4-tuple.
type Parsed = Result<Option<(SocketAddrV4, SocketAddrV4)>, WireError>;

struct Case {
    name: String,
    frame: Vec<u8>,
    decision: Decision,
    parsed: Parsed,
    /// The device's check: where the IPv4 packet starts, or why the frame is dropped.
    device: Result<usize, RxDrop>,
}

fn case(
    name: &str,
    frame: Vec<u8>,
    decision: Decision,
    parsed: Parsed,
    device: Result<usize, RxDrop>,
) -> Case {
    Case {
        name: name.to_owned(),
        frame,
        decision,
        parsed,
        device,
    }
}

/// A well-formed TCP frame from `src` to `dst`, which every reader takes at `IP`.
fn tcp_case(name: &str, src: SocketAddrV4, dst: SocketAddrV4, decision: Decision) -> Case {
    case(name, tcp(src, dst), decision, Ok(Some((src, dst))), Ok(IP))
}

/// A frame that carries no TCP segment the classifier looks at: passed to the kernel.
fn not_tcp(name: &str, frame: Vec<u8>, device: Result<usize, RxDrop>) -> Case {
    case(name, frame, Decision::Pass, Ok(None), device)
}

fn malformed(name: &str, frame: Vec<u8>, e: WireError) -> Case {
    case(name, frame, Decision::Malformed(e), Err(e), Err(e.into()))
}

/// A frame whose IPv4 header is sound but whose TCP segment is not: the device, which
/// checks only up to IPv4, hands it on; the classifiers reject it.
fn malformed_segment(name: &str, frame: Vec<u8>, e: WireError) -> Case {
    case(name, frame, Decision::Malformed(e), Err(e), Ok(IP))
}

fn table() -> Vec<Case> {
    let service = SocketAddrV4::new(PRIMARY, SERVICE_PORT);
    let flow = Ok(Some((client(40000), service)));
    let owned = SocketAddrV4::new(OWN, 20500);
    let answer = SocketAddrV4::new(PRIMARY, SERVICE_PORT);
    let unowned = SocketAddrV4::new(OWN, 30000);
    let other = SocketAddrV4::new(PRIMARY, 22);
    let pinned = SocketAddrV4::new(PRIMARY, PINNED_PORT);
    let steer_rule = Decision::Steer(Match::Rule);
    let tagged_at = Ok(ETH_HEADER_LEN + VLAN_TAG_LEN);

    let mut cases = vec![
        case("TCP to a rule", to_service(), steer_rule, flow, Ok(IP)),
        tcp_case(
            "TCP to a rule naming the source port",
            client(PINNED_CLIENT_PORT),
            pinned,
            steer_rule,
        ),
        tcp_case(
            "TCP from another source port than a rule names",
            client(40002),
            pinned,
            Decision::Pass,
        ),
        tcp_case(
            "TCP to an owned endpoint",
            answer,
            owned,
            Decision::Steer(Match::OwnedEndpoint),
        ),
        tcp_case(
            "TCP to our address outside the owned ports",
            answer,
            unowned,
            Decision::Pass,
        ),
        tcp_case("other TCP", client(40000), other, Decision::Pass),
        not_tcp(
            "ARP",
            edit(to_service(), |f| {
                f[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes())
            }),
            Err(RxDrop::NotIpv4),
        ),
        not_tcp(
            "UDP",
            edit(to_service(), |f| f[IP + 9] = IPPROTO_UDP),
            Ok(IP),
        ),
        not_tcp(
            "ICMP",
            edit(to_service(), |f| f[IP + 9] = IPPROTO_ICMP),
            Ok(IP),
        ),
        case(
            "802.1Q-tagged TCP to a rule",
            tagged(Tpid::Dot1Q, to_service()),
            steer_rule,
            flow,
            tagged_at,
        ),
        case(
            "802.1ad-tagged TCP to a rule",
            tagged(Tpid::Dot1Ad, to_service()),
            steer_rule,
            flow,
            tagged_at,
        ),
        not_tcp(
            "two tags (only one is looked through)",
            tagged(Tpid::Dot1Ad, tagged(Tpid::Dot1Q, to_service())),
            Err(RxDrop::NotIpv4),
        ),
        case(
            "Ethernet padding after the packet",
            {
                let mut f = tcp(client(40000), service);
                f.resize(f.len() + 6, 0);
                f
            },
            steer_rule,
            flow,
            Ok(IP),
        ),
        case(
            "IPv4 options",
            edit(to_service(), |f| {
                f[IP] = 0x46;
                f.splice(TCP..TCP, [1, 1, 1, 0]);
                set_total_len(f, 20 + 4 + 20 + 3);
            }),
            Decision::Ipv4Options,
            flow,
            Ok(IP),
        ),
        case(
            "IPv6 behind the IPv4 EtherType",
            edit(to_service(), |f| f[IP] = 0x65),
            Decision::Malformed(WireError::BadVersion),
            Err(WireError::BadVersion),
            Err(RxDrop::NotIpv4),
        ),
        malformed(
            "IHL below 5",
            edit(to_service(), |f| f[IP] = 0x44),
            WireError::BadHeaderLength,
        ),
        malformed(
            "more fragments",
            edit(to_service(), |f| f[IP + 6] |= 0x20),
            WireError::Fragment,
        ),
        malformed(
            "a fragment offset",
            edit(to_service(), |f| f[IP + 7] = 1),
            WireError::Fragment,
        ),
        malformed(
            "total length shorter than the IPv4 header",
            edit(to_service(), |f| set_total_len(f, 19)),
            WireError::BadTotalLength,
        ),
        malformed(
            "total length past the end of the frame",
            edit(to_service(), |f| set_total_len(f, 1000)),
            WireError::Truncated,
        ),
        malformed_segment(
            "total length too short for a TCP header",
            edit(to_service(), |f| set_total_len(f, 30)),
            WireError::Truncated,
        ),
        malformed_segment(
            "TCP data offset below 5",
            edit(to_service(), |f| f[TCP + 12] = 4 << 4),
            WireError::BadDataOffset,
        ),
        malformed_segment(
            "TCP data offset past the segment",
            edit(to_service(), |f| f[TCP + 12] = 6 << 4),
            WireError::BadDataOffset,
        ),
    ];
    // Cut at every byte, header boundaries included, with and without a tag.
    for (label, whole) in [
        ("untagged", to_service()),
        ("tagged", tagged(Tpid::Dot1Q, to_service())),
    ] {
        for cut in 0..whole.len() {
            cases.push(malformed(
                &format!("{label} frame cut to {cut} bytes"),
                whole[..cut].to_vec(),
                WireError::Truncated,
            ));
        }
    }
    cases
}

/// The frame's IPv4 packet, where the device found one.
fn packet(c: &Case) -> Option<&[u8]> {
    c.device.ok().and_then(|at| c.frame.get(at..))
}

#[test]
fn every_reader_of_frames_agrees_with_the_table() {
    let tables = tables();
    let ownership = Ownership::split(OWN, OWNED, 2).expect("two shares");
    for c in table() {
        let name = &c.name;
        assert_eq!(
            classify(&c.frame[..], &tables),
            c.decision,
            "{name}: decision"
        );
        let parsed = TcpSegment::parse_ethernet(&c.frame).map(|s| s.map(|s| (s.src, s.dst)));
        assert_eq!(parsed, c.parsed, "{name}: parser");
        assert_eq!(
            parse_rx(&c.frame).map(|l2| l2.ip_offset),
            c.device,
            "{name}: device"
        );
        let tuple = c.parsed.ok().flatten();
        if let Some(packet) = packet(&c) {
            // The engine dispatches exactly the segments the parser reads, by the same
            // 4-tuple, and the hand-over names an owner for exactly those, save segments
            // to our own address outside the owned ports (no worker opened them).
            let dispatch = segment_of(packet).map(|s| (s.key.remote, s.key.local));
            assert_eq!(dispatch, tuple, "{name}: engine dispatch");
            let ownable =
                tuple.is_some_and(|(_, dst)| *dst.ip() != OWN || OWNED.contains(dst.port()));
            assert_eq!(
                ownership.owner(packet).is_some(),
                ownable,
                "{name}: hand-over owner"
            );
        }
        // A steered frame reaches a device that takes it and a flow the others can name.
        if let Decision::Steer(why) = c.decision {
            assert!(c.device.is_ok() && tuple.is_some(), "{name}: steered");
            if let (Match::Rule, Some((src, dst))) = (why, tuple) {
                assert!(
                    tables.rules.iter().any(|r| r.matches(
                        *src.ip(),
                        src.port(),
                        *dst.ip(),
                        dst.port()
                    )),
                    "{name}: the rules' software model agrees"
                );
            }
        }
    }
}

#[test]
fn answers_to_owned_endpoints_go_to_the_worker_of_their_port() {
    let ownership = Ownership::split(OWN, OWNED, 2).expect("two shares");
    let answer = SocketAddrV4::new(PRIMARY, SERVICE_PORT);
    for (port, worker) in [(20000, 0), (20499, 0), (20500, 1), (20999, 1)] {
        let frame = tcp(answer, SocketAddrV4::new(OWN, port));
        assert_eq!(
            ownership.owner(&frame[ETH_HEADER_LEN..]),
            Some(worker),
            "port {port}"
        );
    }
}

#[test]
fn the_packet_generator_breaks_frames_the_way_the_table_expects() {
    let spec = TcpFrameSpec::local(
        SocketAddrV4::new(CLIENT, 40000),
        SocketAddrV4::new(PRIMARY, SERVICE_PORT),
        0x02,
    );
    let tables = tables();
    for kind in Malformation::ALL {
        let expected = match kind {
            Malformation::TruncatedEthernet
            | Malformation::TruncatedIpv4
            | Malformation::TruncatedTcp => Decision::Malformed(WireError::Truncated),
            Malformation::BadIhl => Decision::Malformed(WireError::BadHeaderLength),
            Malformation::Ipv4Options => Decision::Ipv4Options,
            Malformation::Fragment => Decision::Malformed(WireError::Fragment),
            Malformation::BadTcpOffset => Decision::Malformed(WireError::BadDataOffset),
            Malformation::BadTotalLength => Decision::Malformed(WireError::BadTotalLength),
        };
        let frame = malformed_frame(&spec, kind);
        assert_eq!(classify(&frame[..], &tables), expected, "{kind:?}");
    }
}

/// [`Tables`] counting the trie lookups the decision makes.
struct CountingTables {
    inner: Tables,
    lookups: std::cell::Cell<u32>,
}

impl SteeringTables for CountingTables {
    fn owned_endpoints(&self) -> Option<OwnedEndpoints> {
        self.inner.owned_endpoints()
    }

    fn port_has_rules(&self, port: u16) -> bool {
        self.inner.port_has_rules(port)
    }

    fn has_rule(&self, key: &RuleKey) -> bool {
        self.lookups.set(self.lookups.get() + 1);
        self.inner.has_rule(key)
    }
}

#[test]
fn a_frame_to_a_port_no_rule_names_passes_without_trie_lookups() {
    let t = CountingTables {
        inner: tables(),
        lookups: std::cell::Cell::new(0),
    };
    let unmatched = tcp(
        SocketAddrV4::new(CLIENT, 40000),
        SocketAddrV4::new(PRIMARY, 6000),
    );
    assert_eq!(classify(&unmatched[..], &t), Decision::Pass);
    assert_eq!(t.lookups.get(), 0, "the prefilter answered");
    // A port a rule names, from a client it does not cover: both lookups, still a pass.
    let stranger = tcp(
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 7, 7), 40000),
        SocketAddrV4::new(PRIMARY, SERVICE_PORT),
    );
    assert_eq!(classify(&stranger[..], &t), Decision::Pass);
    assert_eq!(t.lookups.get(), 2);
}
