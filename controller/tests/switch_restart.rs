//! On Open vSwitch with the tree test bed: an NCP rule deleted by hand comes back, a
//! bridge deleted and re-created (same datapath id and ports) gets its NCP rules back
//! within 5 seconds, and rules with a foreign cookie are never touched, not even one that
//! sits exactly where NCP wants a rule.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{TreeScene, call, dump_flows, get_json, ncp_rules, sh, tree_scene_replicating};
use ncp_controller::rules::{PRIORITY_REDIRECT, PRIORITY_ROUTE, RuleKind, cookie};

const PREFIX: &str = "nc4b";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_come_back_and_foreign_rules_stay() {
    let tools = ["ovs-ofctl", "ovs-vsctl"];
    let Some((scene, _)) =
        tree_scene_replicating("controller switch restart", &tools, PREFIX).await
    else {
        return;
    };
    let TreeScene {
        svc,
        api,
        bed,
        state,
        ..
    } = &scene;
    let ip = |h: &str| bed.address(h, "eth0").expect("address").to_string();
    common::wait_installed(api, 1, true, Duration::from_secs(20)).await;

    let agg1 = bed.dpid("agg1").expect("dpid");
    let core = bed.dpid("core").expect("dpid");
    let br_agg1 = bed.bridge("agg1").expect("bridge");
    let br_core = bed.bridge("core").expect("bridge");

    // A foreign rule on core, next to NCP's.
    common::add_flow(
        &br_core,
        "cookie=0x1234,priority=5,ip,nw_dst=198.18.3.99,actions=drop",
    );
    let foreign = |br: &str| {
        dump_flows(br)
            .into_iter()
            .filter(|l| l.contains("cookie=0x1234"))
            .count()
    };
    assert_eq!(foreign(&br_core), 1);

    // 1. The redirect deleted by hand comes back (FLOW_REMOVED triggers a reconcile).
    let before: BTreeSet<String> = dump_flows(&br_agg1).into_iter().collect();
    let redirect = format!("cookie={:#x}/-1", cookie(RuleKind::Flow, 1));
    sh(&[
        "ovs-ofctl",
        "-O",
        "OpenFlow13",
        "del-flows",
        &br_agg1,
        &redirect,
    ]);
    let has_redirect = |rules: &[ncp_controller::rules::FlowRule]| {
        rules
            .iter()
            .any(|r| r.priority == PRIORITY_REDIRECT && r.cookie == cookie(RuleKind::Flow, 1))
    };
    assert!(!has_redirect(&ncp_rules(svc, agg1).await));
    let (_, took) = common::wait_for(
        Duration::from_secs(5),
        "redirect restored after deletion by hand",
        || async { has_redirect(&ncp_rules(svc, agg1).await).then_some(()) },
    )
    .await;
    eprintln!("hand-deleted redirect back in {took:?}");
    let after: BTreeSet<String> = dump_flows(&br_agg1).into_iter().collect();
    assert_eq!(before, after, "same rules as before, nothing doubled");
    // Writes may have gone past the middlebox while the redirect was gone: the controller
    // says so (a window, kept in its consistency file, that diverges the replicas).
    let audit = get_json(api, "/v1/audit").await;
    assert!(
        audit
            .as_array()
            .is_some_and(|l| l.iter().any(|e| e["what"].as_str().is_some_and(
                |w| w.starts_with("redirect of replication 1 found missing and restored")
            ))),
        "{audit}"
    );
    assert_eq!(
        get_json(api, "/v1/metrics").await["redirect_withdrawals"],
        1
    );
    let saved = std::fs::read_to_string(state.with_extension("consistency.json"))
        .expect("consistency file");
    assert!(
        saved.contains("found missing on its switch and restored"),
        "{saved}"
    );

    // 2. The bridge is deleted and re-created: all its NCP rules are back within 5 s.
    let want: BTreeSet<String> = before;
    let t0 = Instant::now();
    bed.recreate_bridge("agg1").expect("re-create agg1");
    let recreated = t0.elapsed();
    let (_, took) = common::wait_for(
        Duration::from_secs(5),
        "rules of the re-created bridge restored",
        || async {
            let now: BTreeSet<String> = dump_flows(&br_agg1).into_iter().collect();
            (now == want).then_some(())
        },
    )
    .await;
    eprintln!("re-created bridge (ovs-vsctl took {recreated:?}) had its rules back in {took:?}");
    assert!(has_redirect(&ncp_rules(svc, agg1).await));
    common::wait_installed(api, 1, true, Duration::from_secs(5)).await;
    assert_eq!(foreign(&br_core), 1, "foreign rule untouched");

    // 3. A foreign rule exactly on an NCP key (same priority and match) replaces NCP's
    //    rule on the switch; the controller reports the conflict and leaves it alone.
    let route = ncp_rules(svc, core)
        .await
        .into_iter()
        .find(|r| r.priority == PRIORITY_ROUTE && r.cookie == cookie(RuleKind::Flow, 1))
        .expect("route rule on core");
    let in_port = route.matched.in_port.expect("in_port");
    let spec_line = format!(
        "cookie=0x1234,priority={PRIORITY_ROUTE},in_port={in_port},tcp,nw_src={},nw_dst={},tp_dst=80,actions=drop",
        ip("h11"),
        ip("h21")
    );
    common::add_flow(&br_core, &spec_line);
    let summary: serde_json::Value =
        serde_json::from_str(&call(api, "POST", "/v1/reconcile", None).await.body).expect("json");
    assert_eq!(summary["conflicts"], 1, "{summary}");
    // A few more runs (periodic, triggered) change nothing about it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(foreign(&br_core), 2, "{:#?}", dump_flows(&br_core));
    let conflicting = dump_flows(&br_core)
        .into_iter()
        .find(|l| l.contains("cookie=0x1234") && l.contains(&format!("priority={PRIORITY_ROUTE}")))
        .expect("foreign rule on NCP's key");
    assert!(conflicting.contains("actions=drop"), "{conflicting}");
    let r = common::replication(api, 1).await;
    assert_eq!(r["installed"], false, "{r}");
}
