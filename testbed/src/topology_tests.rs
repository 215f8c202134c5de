use super::*;
use crate::test_toml::{link, minimal, switch, two_hosts};

fn invalid(text: &str) -> String {
    match Topology::parse(text) {
        Ok(t) => panic!("expected an error, parsed {t:?}"),
        Err(e) => e.to_string(),
    }
}

/// Each `(from, to, want)`: [`minimal`] with `from` replaced by `to` is rejected with an
/// error that mentions `want`.
fn assert_edits_rejected(cases: &[(&str, &str, &str)]) {
    for (from, to, want) in cases {
        let e = invalid(&minimal().replace(from, to));
        assert!(e.contains(want), "{from} -> {to}: {e}");
    }
}

#[test]
fn parses_minimal() {
    let t = Topology::parse(&minimal()).expect("valid");
    assert_eq!(
        t.switches,
        vec![Switch {
            name: "s1".into(),
            dpid: 1
        }]
    );
    let i = &t.hosts[0].interfaces[0];
    assert_eq!(i.address, Ipv4Addr::new(198, 18, 1, 1));
    assert_eq!(i.prefix_len, 24);
    assert_eq!(i.mac, Mac([2, 0, 0, 0, 0, 1]));
    assert_eq!(i.network(), Ipv4Addr::new(198, 18, 1, 0));
    assert_eq!(i.port, None);
}

#[test]
fn shipped_paper_topology_is_fig5() {
    let t = Topology::parse(include_str!("../paper.toml")).expect("paper.toml");
    let names: Vec<&str> = t.hosts.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["source", "primary", "replica", "middlebox"]);
    for h in &t.hosts {
        let eth0 = &h.interfaces[0];
        let eth1 = &h.interfaces[1];
        assert_eq!((eth0.name.as_str(), eth0.switch.as_str()), ("eth0", "prod"));
        assert_eq!((eth1.name.as_str(), eth1.switch.as_str()), ("eth1", "repl"));
        assert_eq!(eth0.network(), Ipv4Addr::new(198, 18, 1, 0));
        assert_eq!(eth1.network(), Ipv4Addr::new(198, 18, 2, 0));
    }
    assert!(t.links.is_empty());
}

#[test]
fn shipped_tree_topology_is_three_levels() {
    let t = Topology::parse(include_str!("../tree.toml")).expect("tree.toml");
    assert_eq!(t.switches.len(), 7);
    assert_eq!(t.links.len(), 6);
    assert_eq!(t.hosts.len(), 8);
    assert!(!t.has_switch_loop());
}

#[test]
fn shipped_spine_topology_puts_client_primary_and_middlebox_on_three_leaves() {
    let t = Topology::parse(include_str!("../spine.toml")).expect("spine.toml");
    let leaf = |host: &str| {
        t.hosts
            .iter()
            .find(|h| h.name == host)
            .map(|h| h.interfaces[0].switch.as_str())
    };
    assert_eq!(leaf("client"), Some("leaf1"));
    assert_eq!(leaf("primary"), Some("leaf2"));
    assert_eq!(leaf("replica"), Some("leaf2"));
    assert_eq!(leaf("middlebox"), Some("leaf3"));
    assert_eq!(t.links.len(), 3);
    assert!(t.links.iter().all(|l| l.a == "spine"));
    assert!(!t.has_switch_loop());
}

#[test]
fn unknown_field_is_named() {
    assert_edits_rejected(&[("dpid = 1", "dpid = 1\ncolour = \"red\"", "colour")]);
}

#[test]
fn unknown_iface_field_is_named() {
    assert_edits_rejected(&[("switch = \"s1\"", "switch = \"s1\"\nvlan = 3", "vlan")]);
}

#[test]
fn missing_field_is_named() {
    assert_edits_rejected(&[("mac = \"02:00:00:00:00:01\"", "", "mac")]);
}

#[test]
fn address_outside_benchmark_range_is_rejected() {
    for bad in ["10.0.0.1/24", "198.20.0.1/24", "192.168.1.1/24"] {
        let text = minimal().replace("198.18.1.1/24", bad);
        let e = invalid(&text);
        assert!(e.contains("outside 198.18.0.0/15"), "{e}");
        assert!(e.contains("host `a` interface `eth0`"), "{e}");
    }
    // The upper half of the /15 is fine.
    assert!(Topology::parse(&minimal().replace("198.18.1.1/24", "198.19.1.1/24")).is_ok());
}

#[test]
fn subnet_wider_than_range_is_rejected() {
    assert_edits_rejected(&[("198.18.1.1/24", "198.18.1.1/8", "prefix length at least 15")]);
}

#[test]
fn bad_address_and_mac_forms_are_rejected() {
    let (address, mac) = ("198.18.1.1/24", "02:00:00:00:00:01");
    assert_edits_rejected(&[
        (address, "198.18.1.1", "needs a prefix length"),
        (address, "198.18.1/24", "not an IPv4 address"),
        (address, "198.18.1.1/33", "bad prefix length"),
        (address, "198.18.1.0/24", "network or broadcast"),
        (address, "198.18.1.255/24", "network or broadcast"),
        (mac, "02:00:00:00:01", "not a MAC"),
        (mac, "02:00:00:00:00:zz", "not a MAC"),
        (mac, "01:00:5e:00:00:01", "not a unicast"),
        (mac, "00:00:00:00:00:00", "not a unicast"),
    ]);
}

#[test]
fn duplicates_are_rejected_with_both_names() {
    let e = invalid(&two_hosts().replace("198.18.1.2/24", "198.18.1.1/24"));
    assert!(
        e.contains("address 198.18.1.1 is already used by host `a` interface `eth0`"),
        "{e}"
    );

    let e = invalid(&two_hosts().replace("02:00:00:00:00:02", "02:00:00:00:00:01"));
    assert!(e.contains("already used by host `a`"), "{e}");

    let e = invalid(&two_hosts().replace("name = \"b\"", "name = \"a\""));
    assert!(e.contains("host `a` is defined twice"), "{e}");

    let text = two_hosts() + &switch("s1", 2);
    let e = invalid(&text);
    assert!(e.contains("switch `s1` is defined twice"), "{e}");

    let text = two_hosts() + &switch("s2", 1);
    let e = invalid(&text);
    assert!(e.contains("dpid 0x1 is already used by switch `s1`"), "{e}");
}

#[test]
fn all_problems_are_listed() {
    let text = two_hosts().replace("198.18.1.2/24", "10.1.1.1/24").replace(
        "switch = \"s1\"\naddress = \"198.18.1.1/24\"",
        "switch = \"nope\"\naddress = \"198.18.1.1/24\"",
    );
    let e = invalid(&text);
    assert!(e.contains("2 problems"), "{e}");
    assert!(e.contains("switch `nope` is not defined"), "{e}");
    assert!(e.contains("10.1.1.1/24"), "{e}");
}

#[test]
fn names_are_checked() {
    let (host, switch, iface) = ("name = \"a\"", "name = \"s1\"", "name = \"eth0\"");
    assert_edits_rejected(&[
        (host, "name = \"Bad-Name\"", "host name `Bad-Name`"),
        (switch, "name = \"s-1\"", "switch name `s-1`"),
        (
            iface,
            "name = \"averyveryverylongname\"",
            "interface name `averyveryverylongname`",
        ),
        (iface, "name = \"lo\"", "reserved"),
        (host, "name = \"s1\"", "same name as a switch"),
    ]);
}

#[test]
fn host_needs_an_interface_and_a_switch_is_needed() {
    let e = invalid("[[host]]\nname = \"a\"\n");
    assert!(e.contains("host `a` has no interfaces"), "{e}");
    assert!(e.contains("no switches"), "{e}");
}

#[test]
fn overlapping_subnets_on_one_host_are_rejected() {
    let text = format!(
        "{}\n[[host.iface]]\nname = \"eth1\"\nswitch = \"s1\"\naddress = \"198.18.1.9/16\"\nmac = \"02:00:00:00:00:09\"\n",
        minimal()
    );
    let e = invalid(&text);
    assert!(e.contains("overlaps interface `eth0`"), "{e}");
}

#[test]
fn links_are_checked() {
    let base = minimal() + &switch("s2", 2);
    let ok = base.clone() + &link("s1", "s2");
    assert_eq!(Topology::parse(&ok).expect("valid").links.len(), 1);

    let e = invalid(&(base.clone() + &link("s1", "s9")));
    assert!(
        e.contains("link #1 (s1 - s9): switch `s9` is not defined"),
        "{e}"
    );
    let e = invalid(&(base.clone() + &link("s1", "s1")));
    assert!(e.contains("two different switches"), "{e}");
    let e = invalid(&(base + &link("s1", "s2") + "c = \"s3\"\n"));
    assert!(e.contains("unknown field `c`"), "{e}");
}

#[test]
fn requested_ports_are_checked() {
    let on_s1 = "switch = \"s1\"";
    assert_edits_rejected(&[
        (on_s1, "switch = \"s1\"\nport = 0", "port 0 is outside"),
        (
            on_s1,
            "switch = \"s1\"\nport = 70000",
            "port 70000 is outside",
        ),
    ]);
    let text = two_hosts().replace("switch = \"s1\"", "switch = \"s1\"\nport = 5");
    let e = invalid(&text);
    assert!(
        e.contains("asks for port 5 on switch `s1`, already requested by host `a`"),
        "{e}"
    );
}

#[test]
fn loops_are_detected() {
    let line =
        minimal() + &switch("s2", 2) + &switch("s3", 3) + &link("s1", "s2") + &link("s2", "s3");
    assert!(!Topology::parse(&line).expect("valid").has_switch_loop());
    let ring = line + &link("s3", "s1");
    assert!(Topology::parse(&ring).expect("valid").has_switch_loop());
}

#[test]
fn mac_round_trips() {
    let m: Mac = "02:00:c6:12:01:0A".parse().expect("mac");
    assert_eq!(m.to_string(), "02:00:c6:12:01:0a");
}
