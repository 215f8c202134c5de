//! The whole controller: REST API with its token, persistence across restarts, and (with
//! Open vSwitch) discovery, planning and installation driven only through the API, checked
//! with real TCP traffic.

mod common;

use std::time::{Duration, Instant};

use common::{
    PREFIX, TreeScene, call, config, spec, start_with, temp_state, to_json, tree_scene_replicating,
};
use ncp_controller::client::Client;
use ncp_controller::openflow::FlowStatsRequest;
use ncp_controller::rules::{RuleKind, parse_cookie};
use ncp_controller::store::{HostSpec, ModeSpec};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_needs_token_and_state_survives_restart() {
    let state = temp_state("api");
    let (_svc, api) = start_with(config(state.clone())).await;
    assert_eq!(common::status(&api, "GET", "/v1/health").await, 200);
    let anonymous = Client::new(api.addr, "");
    let wrong = Client::new(api.addr, "nope");
    for c in [&anonymous, &wrong] {
        assert_eq!(common::status(c, "GET", "/v1/replications").await, 401);
        let body = to_json(&spec(
            1,
            "198.18.3.11",
            "198.18.3.21",
            "198.18.3.31",
            ModeSpec::Rewrite,
        ));
        assert_eq!(
            call(c, "POST", "/v1/replications", Some(body)).await.status,
            401
        );
    }

    let r1 = to_json(&spec(
        1,
        "198.18.3.0/24",
        "198.18.3.21",
        "198.18.3.31",
        ModeSpec::Vlan { vid: 31 },
    ));
    assert_eq!(
        call(&api, "POST", "/v1/replications", Some(r1.clone()))
            .await
            .status,
        201
    );
    assert_eq!(
        call(&api, "POST", "/v1/replications", Some(r1))
            .await
            .status,
        409
    );
    let bad = to_json(&spec(
        2,
        "198.18.3.0/40",
        "198.18.3.21",
        "198.18.3.31",
        ModeSpec::Rewrite,
    ));
    assert_eq!(
        call(&api, "POST", "/v1/replications", Some(bad))
            .await
            .status,
        400
    );
    let host = HostSpec {
        ip: "198.18.3.31".parse().expect("ip"),
        mac: "02:00:c6:12:03:1f".into(),
        dpid: 0x33,
        port: 1,
    };
    let body = to_json(&host);
    assert_eq!(call(&api, "PUT", "/v1/hosts", Some(body)).await.status, 204);
    assert_eq!(
        common::status(&api, "DELETE", "/v1/replications/9").await,
        404
    );

    let list: Value = serde_json::from_str(&call(&api, "GET", "/v1/replications", None).await.body)
        .expect("json");
    assert_eq!(list[0]["id"], 1);
    assert_eq!(list[0]["installed"], false);
    assert_eq!(list[0]["mode"]["kind"], "vlan");

    // A second controller on the same state file sees the same desired state.
    let (svc2, _api2) = start_with(config(state.clone())).await;
    let d = svc2.desired();
    assert_eq!(d.replications.len(), 1);
    assert_eq!(d.hosts, vec![host]);
    let _ = std::fs::remove_dir_all(state.parent().expect("dir"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_on_ovs_through_the_api() {
    let tools = ["ovs-ofctl", "bash", "timeout"];
    let Some((scene, _r)) = tree_scene_replicating("controller service", &tools, PREFIX).await
    else {
        return;
    };
    let TreeScene { svc, api, bed, .. } = &scene;
    let ip = |h: &str| bed.address(h, "eth0").expect("address").to_string();

    // LLDP finds all six links, the plan places the redirect on agg1, and the rules are
    // confirmed by barrier replies.
    let status = common::wait_installed(api, 1, true, Duration::from_secs(40)).await;
    let agg1 = bed.dpid("agg1").expect("dpid");
    assert_eq!(status["redirection_switch"], agg1);
    let topo: Value =
        serde_json::from_str(&call(api, "GET", "/v1/topology", None).await.body).expect("json");
    assert_eq!(topo["links"].as_array().map(Vec::len), Some(6), "{topo}");

    // Unsteered traffic flows through the NORMAL fallback.
    bed.exec(
        "h11",
        &["ping", "-c", "3", "-i", "0.2", "-W", "2", &ip("h22")],
    )
    .expect("ping through fallback");

    // A TCP SYN from the source to the primary's port 80 reaches the middlebox's switch
    // port through the route rule on leaf3 (counted by OVS).
    let leaf3 = bed.dpid("leaf3").expect("dpid");
    let attempt = format!("exec 3<>/dev/tcp/{}/80", ip("h21"));
    for _ in 0..3 {
        let mut c = bed
            .command("h11", &["timeout", "2", "bash", "-c", &attempt])
            .expect("command");
        let _ = tokio::task::block_in_place(|| c.output());
    }
    let stats = svc
        .controller()
        .flow_stats(leaf3, FlowStatsRequest::by_cookie(0, 0))
        .await
        .expect("stats");
    let route = stats
        .iter()
        .find(|s| parse_cookie(s.cookie) == Some((RuleKind::Flow, 1)))
        .expect("route rule on leaf3");
    assert!(
        route.packet_count >= 1,
        "redirected SYNs must reach leaf3: {route:?}"
    );

    // Removing the replication removes its rules everywhere.
    assert_eq!(
        common::status(api, "DELETE", "/v1/replications/1").await,
        204
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut left = 0;
        for d in svc.controller().connected() {
            let stats = svc
                .controller()
                .flow_stats(d, FlowStatsRequest::by_cookie(0, 0))
                .await
                .expect("stats");
            left += stats
                .iter()
                .filter(|s| parse_cookie(s.cookie).is_some_and(|(k, _)| k == RuleKind::Flow))
                .count();
        }
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} flow rules left after delete"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_get_clear_errors_and_change_nothing() {
    let state = temp_state("bodies");
    let (svc, api) = start_with(config(state.clone())).await;
    let good = r#"{"id":1,"source":"198.18.3.11","primary":"198.18.3.21","primary_port":80,"middlebox":"198.18.3.31"}"#;
    // (body, status, text the answer must contain)
    let cases: Vec<(String, u16, &str)> = vec![
        ("{not json".into(), 400, "JSON"),
        ("".into(), 400, "JSON"),
        ("[1,2,3]".into(), 422, "invalid type"),
        (good.replace(r#""id":1"#, r#""id":"one""#), 422, "id"),
        (
            good.replace(r#""primary_port":80"#, r#""primary_port":"http""#),
            422,
            "primary_port",
        ),
        (
            good.replace(r#""primary_port":80"#, r#""primary_port":70000"#),
            422,
            "primary_port",
        ),
        (
            good.replace(r#","primary":"198.18.3.21""#, ""),
            422,
            "primary",
        ),
        (
            good.replace(r#""middlebox":"198.18.3.31""#, r#""middlebox":"198.18.3""#),
            422,
            "middlebox",
        ),
        (good.replace('}', r#","mode":{"kind":"gre"}}"#), 422, "mode"),
        (
            good.replace(r#""source":"198.18.3.11""#, r#""source":"198.18.3.0/40""#),
            400,
            "source prefix",
        ),
        (
            format!("{{\"id\":1,\"pad\":\"{}\"}}", "x".repeat(100_000)),
            413,
            "",
        ),
    ];
    for (body, status, text) in cases {
        let r = call(&api, "POST", "/v1/replications", Some(body.clone())).await;
        assert_eq!(r.status, status, "{body:.80}: {}", r.body);
        assert!(
            r.body.contains(text),
            "{body:.80}: answer {:?} lacks {text:?}",
            r.body
        );
    }
    let host = r#"{"ip":"198.18.3.31","mac":31,"dpid":51,"port":1}"#;
    let r = call(&api, "PUT", "/v1/hosts", Some(host.into())).await;
    assert_eq!(r.status, 422);
    assert!(r.body.contains("mac"), "{}", r.body);
    let r = call(
        &api,
        "PUT",
        "/v1/hosts",
        Some(host.replace("31,", r#""zz","#)),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("MAC"), "{}", r.body);
    // Nothing changed, nothing was logged as a change, and the API still serves.
    assert_eq!(svc.desired(), Default::default());
    assert!(svc.audit().is_empty(), "{:?}", svc.audit());
    assert_eq!(common::status(&api, "GET", "/v1/health").await, 200);

    // A good body is taken and logged with the caller's name; a wrong token changes
    // nothing, deleting included.
    assert_eq!(
        call(&api, "POST", "/v1/replications", Some(good.into()))
            .await
            .status,
        201
    );
    let wrong = Client::new(api.addr, "not-the-token");
    assert_eq!(
        common::status(&wrong, "DELETE", "/v1/replications/1").await,
        401
    );
    assert_eq!(svc.desired().replications.len(), 1);
    let audit = svc.audit();
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0].who, "operator");
    assert!(audit[0].what.starts_with("add replication 1"), "{audit:?}");
    let _ = std::fs::remove_dir_all(state.parent().expect("dir"));
}
