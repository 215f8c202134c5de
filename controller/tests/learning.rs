//! Hosts learned from traffic (nothing pinned), a host move re-plans the redirect, and a
//! link going down (PORT_STATUS) re-plans, on Open vSwitch with the tree test bed.

mod common;

use std::time::Duration;

use common::{TreeScene, get_json, learned_at, tree_scene, wait_for};
use ncp_controller::openflow::MacAddr;
use ncp_controller::rules::{PRIORITY_REDIRECT, RuleKind, parse_cookie};
use serde_json::Value;

const PREFIX: &str = "nc4a";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_are_learned_moves_and_link_loss_replan() {
    let tools = ["ovs-ofctl", "ping", "ip"];
    let Some(scene) = tree_scene("controller learning", &tools, PREFIX, |_| {}).await else {
        return;
    };
    let TreeScene { svc, api, bed, .. } = &scene;
    common::wait_links(api, Duration::from_secs(20)).await;

    let ip = |h: &str| bed.address(h, "eth0").expect("address").to_string();
    let at = |h: &str, sw: &str| common::attached(bed, h, sw);
    // Traffic teaches the controller where the hosts are: ARP and IPv4 at edge ports.
    for (from, to) in [("h11", "h21"), ("h31", "h21"), ("h42", "h12")] {
        let _ = bed.exec(from, &["ping", "-c", "2", "-i", "0.2", "-W", "1", &ip(to)]);
    }
    let want = [
        ("h11", "leaf1"),
        ("h21", "leaf2"),
        ("h31", "leaf3"),
        ("h42", "leaf4"),
        ("h12", "leaf1"),
    ];
    let (topo, _) = wait_for(Duration::from_secs(10), "hosts learned", || async {
        let t = get_json(api, "/v1/topology").await;
        want.iter()
            .all(|(h, sw)| learned_at(&t, &ip(h)) == Some(at(h, sw)))
            .then_some(t)
    })
    .await;
    // Only end hosts: nothing is learned on a port that carries a link.
    let learned = topo["learned"].as_array().map(Vec::len).unwrap_or(0);
    assert!(learned <= 8, "{topo}");
    for h in topo["learned"].as_array().into_iter().flatten() {
        let mac: MacAddr = h["mac"].as_str().expect("mac").parse().expect("mac");
        assert_eq!(mac.0[..4], [2, 0, 0xc6, 0x12], "only test-bed hosts: {h}");
    }
    assert!(topo["hosts"].as_array().is_some_and(Vec::is_empty));

    let mut r = common::h11_to_h21_via_h31(bed);
    // A replica, so that a withdrawn redirect shows in its consistency state.
    r.replicas = vec![format!("{}:80", ip("h22"))];
    common::add_replication(api, &r).await;
    let status = common::wait_installed(api, 1, true, Duration::from_secs(15)).await;
    let agg1 = bed.dpid("agg1").expect("dpid");
    let agg2 = bed.dpid("agg2").expect("dpid");
    assert_eq!(status["redirection_switch"], agg1);

    // The middlebox answers clients as the primary: traffic from its port with the
    // primary's address must not move the primary there.
    let mb_ns = bed.netns("h31").expect("netns");
    let spoofed = format!("{}/32", ip("h21"));
    common::sh(&[
        "ip", "netns", "exec", &mb_ns, "ip", "addr", "add", &spoofed, "dev", "eth0",
    ]);
    let _ = bed.exec(
        "h31",
        &[
            "ping",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "1",
            "-I",
            &ip("h21"),
            &ip("h42"),
        ],
    );
    common::sh(&[
        "ip", "netns", "exec", &mb_ns, "ip", "addr", "del", &spoofed, "dev", "eth0",
    ]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = get_json(api, "/v1/topology").await;
    assert_eq!(learned_at(&t, &ip("h21")), Some(at("h21", "leaf2")), "{t}");
    let r = common::replication(api, 1).await;
    assert_eq!(
        (r["installed"].clone(), r["redirection_switch"].clone()),
        (Value::Bool(true), Value::from(agg1)),
        "{r}"
    );

    // Move h11 from leaf1 to a new port on leaf4: a veth whose far end replaces eth0 in
    // h11's namespace, with the same MAC and address.
    let ns = bed.netns("h11").expect("netns");
    let root_end = format!("{PREFIX}-mv0");
    let leaf4 = bed.bridge("leaf4").expect("bridge");
    common::sh(&[
        "ip", "link", "add", &root_end, "type", "veth", "peer", "name", "eth1", "netns", &ns,
    ]);
    common::sh(&["ip", "link", "set", &root_end, "up"]);
    common::sh(&["ovs-vsctl", "add-port", &leaf4, &root_end]);
    let mac = MacAddr(bed.mac("h11", "eth0").expect("mac")).to_string();
    let in_ns = |argv: &[&str]| {
        let mut full = vec!["ip", "netns", "exec", ns.as_str()];
        full.extend_from_slice(argv);
        common::sh(&full);
    };
    in_ns(&["ip", "link", "set", "eth0", "down"]);
    in_ns(&["ip", "addr", "flush", "dev", "eth0"]);
    in_ns(&["ip", "link", "set", "eth1", "address", &mac]);
    in_ns(&[
        "ip",
        "addr",
        "add",
        &format!("{}/24", ip("h11")),
        "dev",
        "eth1",
    ]);
    in_ns(&["ip", "link", "set", "eth1", "up"]);
    let new_port = u64::from(
        common::sh(&["ovs-vsctl", "get", "interface", &root_end, "ofport"])
            .trim()
            .parse::<u16>()
            .expect("ofport"),
    );
    let leaf4_dpid = bed.dpid("leaf4").expect("dpid");
    // The host speaks; the controller sees it at the new port and re-plans: the routes
    // from leaf4 part at agg2 now.
    let (_, took) = wait_for(Duration::from_secs(15), "move re-planned", || async {
        let _ = bed.exec("h11", &["ping", "-c", "1", "-W", "1", &ip("h21")]);
        let t = get_json(api, "/v1/topology").await;
        let r = common::replication(api, 1).await;
        (learned_at(&t, &ip("h11")) == Some((leaf4_dpid, new_port))
            && r["redirection_switch"] == agg2
            && r["installed"] == true)
            .then_some(())
    })
    .await;
    eprintln!("host move re-planned in {took:?}");
    let redirects = |rules: Vec<ncp_controller::rules::FlowRule>| {
        rules
            .iter()
            .filter(|r| {
                r.priority == PRIORITY_REDIRECT
                    && parse_cookie(r.cookie) == Some((RuleKind::Flow, 1))
            })
            .count()
    };
    assert_eq!(redirects(common::ncp_rules(svc, agg2).await), 1);
    assert_eq!(
        redirects(common::ncp_rules(svc, agg1).await),
        0,
        "old redirect withdrawn"
    );
    let audit = get_json(api, "/v1/audit").await;
    assert!(common::audited(&audit, &["moved", &ip("h11")]), "{audit}");

    // The link between agg2 and leaf3 (toward the middlebox) goes down: PORT_STATUS makes
    // the controller forget it, the middlebox is unreachable, the replication is withdrawn.
    let agg2_leaf3 = format!(
        "{PREFIX}-agg2-p{}",
        bed.ofport("agg2", "leaf3").expect("port")
    );
    common::sh(&["ip", "link", "set", &agg2_leaf3, "down"]);
    let (r, took) = wait_for(Duration::from_secs(5), "withdrawn on link down", || async {
        let r = common::replication(api, 1).await;
        let gone = redirects(common::ncp_rules(svc, agg2).await) == 0;
        (r["installed"] == false && gone).then_some(r)
    })
    .await;
    eprintln!("link down re-planned in {took:?}");
    assert!(
        r["error"].as_str().is_some_and(|e| e.contains("no route")),
        "{r}"
    );
    let t = get_json(api, "/v1/topology").await;
    assert_eq!(t["links"].as_array().map(Vec::len), Some(5), "{t}");
    common::sh(&["ip", "link", "set", &agg2_leaf3, "up"]);
    let r = common::wait_installed(api, 1, true, Duration::from_secs(15)).await;
    assert_eq!(redirects(common::ncp_rules(svc, agg2).await), 1);
    // While the redirect was gone the client's writes reached the primary only: the
    // replica is diverged since then, the window closed when the redirect came back.
    let c = &r["replica_states"][0];
    assert_eq!(c["state"], "diverged", "{r}");
    let window = c["windows"]
        .as_array()
        .and_then(|l| {
            l.iter().find(|w| {
                w["kind"] == "redirect-withdrawn"
                    && w["reason"].as_str().is_some_and(|e| e.contains("no route"))
            })
        })
        .cloned()
        .unwrap_or_else(|| panic!("no withdrawal window: {r}"));
    assert!(
        window["to_ms"].as_u64() >= window["from_ms"].as_u64(),
        "{window}"
    );
    assert!(
        c["summary"]
            .as_str()
            .is_some_and(|s| s.contains("redirect withdrawn (no route")),
        "{r}"
    );
    let m = get_json(api, "/v1/metrics").await;
    assert!(m["redirect_withdrawals"].as_u64() >= Some(1), "{m}");
}
