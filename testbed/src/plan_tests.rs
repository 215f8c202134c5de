use super::*;
use crate::test_toml::{link, switch, two_hosts};

fn paper() -> Topology {
    Topology::parse(include_str!("../paper.toml")).expect("paper.toml")
}

fn tree() -> Topology {
    Topology::parse(include_str!("../tree.toml")).expect("tree.toml")
}

#[test]
fn prefix_rules() {
    for ok in ["ncp", "nt1", "a", "abcdefgh"] {
        validate_prefix(ok).expect(ok);
    }
    for bad in ["", "1nt", "n-t", "NCP", "abcdefghi", "n t"] {
        assert!(validate_prefix(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn paper_names_and_ports() {
    let plan = Plan::new(&paper(), "ncp").expect("plan");
    let ns: Vec<&str> = plan.namespaces.iter().map(|n| n.netns.as_str()).collect();
    assert_eq!(
        ns,
        ["ncp-source", "ncp-primary", "ncp-replica", "ncp-middlebox"]
    );
    let br: Vec<&str> = plan.bridges.iter().map(|b| b.bridge.as_str()).collect();
    assert_eq!(br, ["ncp-prod", "ncp-repl"]);
    assert_eq!(plan.bridges[0].dpid_hex(), "0000000000000001");
    assert_eq!(plan.bridges[1].dpid_hex(), "0000000000000002");

    // Host N of the file is on port N of both switches.
    for (n, host) in ["source", "primary", "replica", "middlebox"]
        .iter()
        .enumerate()
    {
        let port = n as u16 + 1;
        assert_eq!(plan.ofport("prod", host).expect("prod"), port);
        assert_eq!(plan.ofport("repl", host).expect("repl"), port);
        assert_eq!(
            plan.ofport("prod", &format!("{host}:eth0")).expect("eth0"),
            port
        );
        assert!(plan.ofport("prod", &format!("{host}:eth1")).is_err());
    }
    let mb = plan.host_link("middlebox", "eth1").expect("middlebox eth1");
    assert_eq!(mb.root_ifname, "ncp-repl-p4");
    assert_eq!(mb.netns, "ncp-middlebox");
    assert_eq!(mb.bridge, "ncp-repl");
    assert_eq!(mb.address, Ipv4Addr::new(198, 18, 2, 4));
    assert!(plan.switch_links.is_empty());
    // Every root-side name fits Linux's limit and carries the prefix.
    for name in plan.root_ifnames() {
        assert!(
            name.len() <= IFNAME_MAX && name.starts_with("ncp-"),
            "{name}"
        );
    }
}

#[test]
fn tree_ports_follow_file_order() {
    let plan = Plan::new(&tree(), "nt4").expect("plan");
    assert_eq!(plan.ofport("leaf1", "h11").expect("h11"), 1);
    assert_eq!(plan.ofport("leaf1", "h12").expect("h12"), 2);
    assert_eq!(plan.ofport("leaf1", "agg1").expect("uplink"), 3);
    assert_eq!(plan.ofport("agg1", "core").expect("agg1 up"), 1);
    assert_eq!(plan.ofport("agg1", "leaf1").expect("agg1 leaf1"), 2);
    assert_eq!(plan.ofport("agg1", "leaf2").expect("agg1 leaf2"), 3);
    assert_eq!(plan.ofport("core", "agg1").expect("core agg1"), 1);
    assert_eq!(plan.ofport("core", "agg2").expect("core agg2"), 2);
    assert!(plan.ofport("core", "h11").is_err());
    let l = &plan.switch_links[0];
    assert_eq!(
        (l.a_ifname.as_str(), l.b_ifname.as_str()),
        ("nt4-core-p1", "nt4-agg1-p1")
    );
    let agg1 = plan.bridge("agg1").expect("agg1");
    let ports: Vec<u16> = agg1.ports.iter().map(|p| p.ofport).collect();
    assert_eq!(ports, [1, 2, 3]);
    assert_eq!(
        agg1.ports[1].peer,
        Peer::Switch {
            switch: "leaf1".into(),
            ofport: 3
        }
    );
}

#[test]
fn requested_ports_are_kept_and_skipped_by_automatic_numbering() {
    // Host b asks for port 1, the link's s2 end for port 7.
    let text = two_hosts().replace(
        "mac = \"02:00:00:00:00:02\"",
        "mac = \"02:00:00:00:00:02\"\nport = 1",
    ) + &switch("s2", 2)
        + &link("s1", "s2")
        + "b_port = 7\n";
    let t = Topology::parse(&text).expect("valid");
    let plan = Plan::new(&t, "x").expect("plan");
    // b asked for 1, so a (first in file order) gets the lowest free number, 2.
    assert_eq!(plan.ofport("s1", "b").expect("b"), 1);
    assert_eq!(plan.ofport("s1", "a").expect("a"), 2);
    assert_eq!(plan.ofport("s1", "s2").expect("s1 uplink"), 3);
    assert_eq!(plan.ofport("s2", "s1").expect("s2 side"), 7);
    assert_eq!(plan.switch_links[0].b_ifname, "x-s2-p7");
}

#[test]
fn parallel_links_make_ofport_ambiguous() {
    let text = switch("s1", 1) + &switch("s2", 2) + &link("s1", "s2") + &link("s1", "s2");
    let plan = Plan::new(&Topology::parse(&text).expect("valid"), "x").expect("plan");
    let e = plan.ofport("s1", "s2").expect_err("ambiguous").to_string();
    assert!(e.contains("2 ports"), "{e}");
}

#[test]
fn too_long_names_are_named_in_the_error() {
    let text = include_str!("../tree.toml").replace("leaf4", "leafnumberfour");
    let t = Topology::parse(&text).expect("valid");
    let e = Plan::new(&t, "ncp").expect_err("too long").to_string();
    assert!(e.contains("`ncp-leafnumberfour`"), "{e}");
    assert!(e.contains("at most 15"), "{e}");

    // A long prefix can push port names over the limit too.
    let e = Plan::new(&paper(), "abcdefgh")
        .expect_err("too long")
        .to_string();
    assert!(e.contains("`abcdefgh-prod-p1`"), "{e}");
}

#[test]
fn unknown_lookups_fail_clearly() {
    let plan = Plan::new(&paper(), "ncp").expect("plan");
    let e = plan
        .host_link("nobody", "eth0")
        .expect_err("unknown")
        .to_string();
    assert!(e.contains("host `nobody` has no interface `eth0`"), "{e}");
    let e = plan.bridge("core").expect_err("unknown").to_string();
    assert!(e.contains("switch `core`"), "{e}");
}
