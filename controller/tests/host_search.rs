//! Active discovery on Open vSwitch with the tree test bed: a replication added before
//! any of its hosts sent traffic is installed because the controller asks for the hosts
//! (ARP requests out of every edge port) and learns them from the answers; while a host
//! does not answer, the replication's status says it waits for that host, and it is
//! installed as soon as the host answers, with no traffic from the client. A learned host
//! that leaves (silent, and no answer when asked) expires, which withdraws the
//! replication using it until it is back; hosts that answer stay.

mod common;

use std::time::{Duration, Instant};

use common::{TreeScene, attached, audited, get_json, learned_at, spec, tree_scene, wait_for};
use ncp_controller::search::SearchConfig;
use ncp_controller::store::ModeSpec;

const PREFIX: &str = "nc4s";
/// Short, so that the test sees hosts expire.
const EXPIRY: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replications_find_their_hosts_before_any_traffic() {
    let tools = ["ovs-ofctl", "ip"];
    let quick_retries = |cfg: &mut ncp_controller::service::ServiceConfig| {
        cfg.search = Some(SearchConfig {
            first_retry: Duration::from_millis(100),
            max_retry: Duration::from_millis(400),
            ..SearchConfig::default()
        });
        cfg.learn.expiry = Some(EXPIRY);
        cfg.learn.answer_within = Duration::from_millis(500);
    };
    let Some(scene) = tree_scene("controller host search", &tools, PREFIX, quick_retries).await
    else {
        return;
    };
    let TreeScene { api, bed, .. } = &scene;
    let ip = |h: &str| bed.address(h, "eth0").expect("address").to_string();
    // Takes a host's address away ("del") or gives it back ("add").
    let address = |host: &str, verb: &str| {
        let ns = bed.netns(host).expect("netns");
        let addr = format!("{}/24", ip(host));
        common::sh(&[
            "ip", "netns", "exec", &ns, "ip", "addr", verb, &addr, "dev", "eth0",
        ]);
    };
    // h12 is not on the network yet: its address is gone, so nothing answers for it.
    address("h12", "del");
    common::wait_links(api, Duration::from_secs(20)).await;
    // Nobody has sent anything: the controller knows no host.
    let topo = get_json(api, "/v1/topology").await;
    assert_eq!(topo["learned"].as_array().map(Vec::len), Some(0), "{topo}");

    // Replication 1's hosts are all there but silent: the controller asks for them and
    // installs the replication without any of them sending first.
    let added = Instant::now();
    common::add_replication(api, &common::h11_to_h21_via_h31(bed)).await;
    let r = common::wait_installed(api, 1, true, Duration::from_secs(10)).await;
    let took = added.elapsed();
    eprintln!("replication with silent hosts installed {took:?} after it was added");
    assert_eq!(
        r["redirection_switch"],
        bed.dpid("agg1").expect("dpid"),
        "{r}"
    );
    let topo = get_json(api, "/v1/topology").await;
    let audit = get_json(api, "/v1/audit").await;
    for (h, sw) in [("h11", "leaf1"), ("h21", "leaf2"), ("h31", "leaf3")] {
        assert_eq!(
            learned_at(&topo, &ip(h)),
            Some(attached(bed, h, sw)),
            "{topo}"
        );
        assert!(
            audited(&audit, &[&ip(h), "answer to an ARP request"]),
            "{h}: {audit}"
        );
    }

    // Replication 2's client is not on the network: the status says so, table and JSON
    // alike (the table shows the same error).
    let r2 = spec(2, &ip("h12"), &ip("h22"), &ip("h32"), ModeSpec::Rewrite);
    common::add_replication(api, &r2).await;
    let waiting = format!("waiting for host {}", ip("h12"));
    common::wait_not_installed(api, 2, &waiting, Duration::from_secs(10)).await;
    let sent_before = get_json(api, "/v1/metrics").await["arp_requests_sent"]
        .as_u64()
        .unwrap_or(0);
    assert!(sent_before > 0);
    // Requests keep coming (with back-off) while it is missing.
    wait_for(Duration::from_secs(5), "more ARP requests", || async {
        let m = get_json(api, "/v1/metrics").await;
        (m["arp_requests_sent"].as_u64() > Some(sent_before)).then_some(())
    })
    .await;

    // The host comes up (no gratuitous ARP, no traffic): the next request finds it and
    // the replication is installed.
    let up = Instant::now();
    address("h12", "add");
    let r = common::wait_installed(api, 2, true, Duration::from_secs(10)).await;
    eprintln!(
        "replication installed {:?} after its client came up",
        up.elapsed()
    );
    assert!(r["error"].is_null(), "{r}");
    let topo = get_json(api, "/v1/topology").await;
    assert_eq!(
        learned_at(&topo, &ip("h12")),
        Some(attached(bed, "h12", "leaf1")),
        "{topo}"
    );
    let audit = get_json(api, "/v1/audit").await;
    assert!(
        audited(&audit, &[&ip("h12"), "answer to an ARP request"]),
        "{audit}"
    );

    // h11 leaves the network. Silent for the expiry time and asked without answer, it
    // is forgotten, and replication 1 waits for it again; the hosts that answer stay.
    let left = Instant::now();
    address("h11", "del");
    let waiting = format!("waiting for host {}", ip("h11"));
    let r = common::wait_not_installed(api, 1, &waiting, EXPIRY * 5).await;
    eprintln!(
        "replication withdrawn {:?} after its client left",
        left.elapsed()
    );
    assert_eq!(r["redirection_switch"], serde_json::Value::Null, "{r}");
    let topo = get_json(api, "/v1/topology").await;
    assert_eq!(learned_at(&topo, &ip("h11")), None, "{topo}");
    for (h, sw) in [("h21", "leaf2"), ("h31", "leaf3")] {
        assert_eq!(
            learned_at(&topo, &ip(h)),
            Some(attached(bed, h, sw)),
            "{topo}"
        );
    }
    let audit = get_json(api, "/v1/audit").await;
    assert!(
        audited(&audit, &[&ip("h11"), "forgotten", "silent"]),
        "{audit}"
    );
    let m = get_json(api, "/v1/metrics").await;
    assert!(m["hosts_expired"].as_u64() >= Some(1), "{m}");
    // Back on the network: found and installed again.
    address("h11", "add");
    common::wait_installed(api, 1, true, Duration::from_secs(10)).await;
}
