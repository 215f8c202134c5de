use super::*;
use crate::planner::tests::{MB, PRIMARY, SRC, placed_tree, rep, tree, with_hosts};
use crate::planner::{Mode, plan};
use crate::topology::tests::host;

const MODES: [Mode; 3] = [
    Mode::Rewrite,
    Mode::Vlan { vid: 100 },
    Mode::Mpls { label: 17 },
];

/// The replicated flow's first packet, as the source sends it to the primary.
fn client_packet(tcp_dst: u16) -> Packet {
    Packet {
        eth_src: host(SRC, 0, 0).mac,
        eth_dst: host(PRIMARY, 0, 0).mac,
        vlan: None,
        mpls: None,
        ipv4_src: Ipv4Addr::from(SRC),
        ipv4_dst: Ipv4Addr::from(PRIMARY),
        tcp_src: 40_000,
        tcp_dst,
    }
}

#[test]
fn every_mode_delivers_the_flow_to_the_middlebox_untagged() {
    let t = placed_tree(&[]);
    for mode in MODES {
        let p = plan(&t, &[rep(7, mode)]);
        assert!(p.failures.is_empty(), "{mode:?}: {:?}", p.failures);
        let w = walk(&t, &p.rules, PortRef::new(4, 10), client_packet(80))
            .unwrap_or_else(|lost| panic!("{mode:?}: {lost:?}"));
        assert_eq!(
            w.exit,
            PortRef::new(6, 10),
            "{mode:?}: leaves at the middlebox"
        );
        assert_eq!(
            w.packet.eth_dst,
            host(MB, 0, 0).mac,
            "{mode:?}: its NIC accepts it"
        );
        assert_eq!(
            (w.packet.vlan, w.packet.mpls),
            (None, None),
            "{mode:?}: tag popped"
        );
        assert!(w.ruled_at.contains(&2), "{mode:?}: redirected at the LCA");
        // The tunnel's bytes ride on exactly the links after the redirect, and are what
        // the planner says a mode needs as MTU headroom.
        let most = w.crossings.iter().map(|c| c.tag_bytes).max().unwrap_or(0);
        assert_eq!(most, mode.header_overhead(), "{mode:?}: {:?}", w.crossings);
        let first_tagged = w.crossings.iter().position(|c| c.tag_bytes > 0);
        if mode.header_overhead() > 0 {
            assert_eq!(
                first_tagged.map(|i| w.crossings[i].from.dpid),
                Some(2),
                "{mode:?}: tagged from the redirection switch on"
            );
        }
    }
}

#[test]
fn other_traffic_keeps_its_path() {
    let t = placed_tree(&[]);
    for mode in MODES {
        let p = plan(&t, &[rep(7, mode)]);
        // Another port to the primary: not replicated, no rule touches it.
        let w = walk(&t, &p.rules, PortRef::new(4, 10), client_packet(81)).expect("forwarded");
        assert_eq!(w.exit, PortRef::new(5, 10), "{mode:?}");
        assert!(w.ruled_at.is_empty(), "{mode:?}: {:?}", w.ruled_at);
        // The primary's answers go back to the source as before.
        let back = Packet {
            eth_src: host(PRIMARY, 0, 0).mac,
            eth_dst: host(SRC, 0, 0).mac,
            ipv4_src: Ipv4Addr::from(PRIMARY),
            ipv4_dst: Ipv4Addr::from(SRC),
            tcp_src: 80,
            tcp_dst: 40_000,
            ..client_packet(80)
        };
        let w = walk(&t, &p.rules, PortRef::new(5, 10), back).expect("forwarded");
        assert_eq!(w.exit, PortRef::new(4, 10), "{mode:?}");
        assert!(w.ruled_at.is_empty(), "{mode:?}");
    }
}

#[test]
fn replications_planned_together_each_reach_their_own_middlebox() {
    // A second source under s5 and a second middlebox under s4, tunnelled differently.
    const SRC2: [u8; 4] = [198, 18, 4, 2];
    const MB2: [u8; 4] = [198, 18, 6, 2];
    let t = with_hosts(
        tree(),
        &[
            (SRC, 4, 10),
            (PRIMARY, 5, 10),
            (MB, 6, 10),
            (SRC2, 5, 11),
            (MB2, 4, 11),
        ],
    );
    let mut second = rep(8, Mode::Mpls { label: 18 });
    second.source = crate::openflow::Ipv4Prefix::host(Ipv4Addr::from(SRC2));
    second.middlebox = Ipv4Addr::from(MB2);
    let p = plan(&t, &[rep(7, Mode::Vlan { vid: 100 }), second]);
    assert!(p.failures.is_empty(), "{:?}", p.failures);
    let first = walk(&t, &p.rules, PortRef::new(4, 10), client_packet(80)).expect("first");
    assert_eq!(first.exit, PortRef::new(6, 10));
    let from_second = Packet {
        eth_src: host(SRC2, 0, 0).mac,
        ipv4_src: Ipv4Addr::from(SRC2),
        ..client_packet(80)
    };
    let w = walk(&t, &p.rules, PortRef::new(5, 11), from_second).expect("second");
    assert_eq!(
        w.exit,
        PortRef::new(4, 11),
        "the second flow reaches the second middlebox"
    );
    assert_eq!(w.packet.eth_dst, host(MB2, 0, 0).mac);
    assert_eq!(w.packet.mpls, None);
}

#[test]
fn a_rule_that_points_back_is_found_as_a_loop() {
    // The model itself must catch what a broken plan would do: two switches sending the
    // flow to each other.
    let t = placed_tree(&[]);
    let bounce = |dpid, port| FlowRule {
        dpid,
        table_id: 0,
        priority: 1,
        cookie: 0,
        matched: Match::default(),
        instructions: vec![Instruction::ApplyActions(vec![Action::output(port)])],
    };
    let rules = [bounce(4, 1), bounce(2, 2)];
    assert_eq!(
        walk(&t, &rules, PortRef::new(4, 10), client_packet(80)),
        Err(Lost::Looped)
    );
}
