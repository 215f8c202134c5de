//! The start-up race on Open vSwitch with the tree test bed, on a spine (agg1) and its two
//! leaves: a host's first frames reach the controller on the spine's port toward its
//! leaf while LLDP has not found the link there (here: LLDP is blocked on that link, and
//! the leaf forwards the host's frames straight up without copying them). The host is
//! learned on the spine's port and the replication planned from there; when LLDP finds
//! the link, the host is forgotten, found again at its real port by an ARP request, and
//! the replication ends installed from there, not withdrawn with "no route".

mod common;

use std::time::Duration;

use common::{TreeScene, attached, audited, get_json, learned_at, tree_scene, wait_for};
use ncp_controller::rules::{RuleKind, cookie};

const PREFIX: &str = "nc4r";

/// Priority of the test's own rules: above every NCP rule, LLDP's included.
const ABOVE_ALL: u16 = 65_100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_first_seen_on_a_link_port_ends_at_its_own_port() {
    let tools = ["ovs-ofctl", "ping", "ip"];
    let Some(scene) = tree_scene("controller start-up race", &tools, PREFIX, |_| {}).await else {
        return;
    };
    let TreeScene { svc, api, bed, .. } = &scene;
    let ip = |h: &str| bed.address(h, "eth0").expect("address").to_string();
    let (agg1, leaf1) = (
        bed.bridge("agg1").expect("bridge"),
        bed.bridge("leaf1").expect("bridge"),
    );
    let agg1_dpid = bed.dpid("agg1").expect("dpid");
    let down_port = bed.ofport("agg1", "leaf1").expect("port");
    let up_port = bed.ofport("leaf1", "agg1").expect("port");
    let h11_port = bed.ofport("leaf1", "h11:eth0").expect("port");

    // LLDP does not cross agg1 <-> leaf1, and leaf1 sends h11's frames straight up
    // (rules without NCP's cookie: the controller leaves them alone).
    let block_lldp = [
        (
            agg1.as_str(),
            format!("priority={ABOVE_ALL},in_port={down_port},dl_type=0x88cc"),
        ),
        (
            leaf1.as_str(),
            format!("priority={ABOVE_ALL},in_port={up_port},dl_type=0x88cc"),
        ),
    ];
    for (bridge, m) in &block_lldp {
        common::add_flow(bridge, &format!("{m},actions=drop"));
    }
    let h11_up = format!("priority=100,in_port={h11_port}");
    common::add_flow(&leaf1, &format!("{h11_up},actions=output:{up_port}"));

    // The controller knows the other five links, and agg1's port toward leaf1 is an edge
    // port to it (no exemption from the copy to the controller there any more).
    wait_for(
        Duration::from_secs(20),
        "five links, none at agg1-leaf1",
        || async {
            let t = get_json(api, "/v1/topology").await;
            let links = t["links"].as_array().cloned().unwrap_or_default();
            let exempt = common::ncp_rules(svc, agg1_dpid)
                .await
                .iter()
                .any(|r| r.cookie == cookie(RuleKind::Port, u32::from(down_port)));
            (links.len() == 5 && !exempt).then_some(())
        },
    )
    .await;

    // h11 speaks first: the controller sees it only on the spine's port toward leaf1.
    let spine_port = (agg1_dpid, u64::from(down_port));
    wait_for(Duration::from_secs(10), "h11 learned on agg1", || async {
        let _ = bed.exec("h11", &["ping", "-c", "1", "-W", "1", &ip("h21")]);
        let t = get_json(api, "/v1/topology").await;
        (learned_at(&t, &ip("h11")) == Some(spine_port)).then_some(())
    })
    .await;
    common::add_replication(api, &common::h11_to_h21_via_h31(bed)).await;
    common::wait_installed(api, 1, true, Duration::from_secs(10)).await;

    // LLDP gets through: the link is found, h11 is forgotten there, asked for, and found
    // at its own port on leaf1.
    for (bridge, m) in &block_lldp {
        common::del_flow(bridge, m);
    }
    common::del_flow(&leaf1, &h11_up);
    let home = attached(bed, "h11", "leaf1");
    let (r, took) = wait_for(Duration::from_secs(15), "h11 back at leaf1", || async {
        let t = get_json(api, "/v1/topology").await;
        let r = common::replication(api, 1).await;
        (t["links"].as_array().map(Vec::len) == Some(6)
            && learned_at(&t, &ip("h11")) == Some(home)
            && r["installed"] == true)
            .then_some(r)
    })
    .await;
    eprintln!("replication installed from h11's own port {took:?} after LLDP was let through");
    assert_eq!(r["redirection_switch"], agg1_dpid, "{r}");
    let audit = get_json(api, "/v1/audit").await;
    let spine_at = format!("{agg1_dpid:#x}:{down_port}");
    assert!(
        audited(
            &audit,
            &[&ip("h11"), "forgotten", &spine_at, "carries a link"]
        ),
        "{audit}"
    );
    assert!(
        audited(
            &audit,
            &[&ip("h11"), "learned at", "answer to an ARP request"]
        ),
        "{audit}"
    );

    // It stays that way: two more reconcile runs later it is still installed, with no
    // error.
    let runs = get_json(api, "/v1/metrics").await["reconciles"]
        .as_u64()
        .unwrap_or(0);
    wait_for(
        Duration::from_secs(10),
        "two more reconcile runs",
        || async {
            let m = get_json(api, "/v1/metrics").await;
            (m["reconciles"].as_u64() >= Some(runs + 2)).then_some(())
        },
    )
    .await;
    let r = common::replication(api, 1).await;
    assert_eq!(
        (r["installed"].clone(), r["error"].clone()),
        (true.into(), serde_json::Value::Null),
        "{r}"
    );
    let m = get_json(api, "/v1/metrics").await;
    assert!(m["hosts_dropped_on_links"].as_u64() >= Some(1), "{m}");
}
