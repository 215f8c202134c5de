//! Fail-open on Open vSwitch with the tree test bed: the controller health-checks the
//! middlebox with ARP probes sent through OpenFlow; when the middlebox stops answering its
//! redirect is withdrawn within 3 seconds and a TCP connection from the source reaches the
//! primary directly; when it answers again the redirect returns, and the replica shows the
//! fail-open window as why it diverged.

mod common;

use std::time::{Duration, Instant};

use common::{TreeScene, get_json, ncp_rules, sh, spec, tree_scene};
use ncp_controller::rules::{PRIORITY_REDIRECT, RuleKind, cookie};
use ncp_controller::service::ServiceConfig;
use ncp_controller::store::ModeSpec;

const PREFIX: &str = "nc4c";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_middlebox_is_bypassed_and_restored() {
    let tools = ["ovs-ofctl", "socat", "timeout"];
    let check_health = |cfg: &mut ServiceConfig| {
        let health = cfg.health.expect("health checks on by default");
        assert!(health.interval * (health.failures + 1) < Duration::from_secs(3));
    };
    let Some(scene) = tree_scene("controller fail-open", &tools, PREFIX, check_health).await else {
        return;
    };
    let TreeScene { svc, api, bed, .. } = &scene;
    common::pin_all(api, bed).await;
    let ip = |h: &str| bed.address(h, "eth0").expect("address").to_string();

    // A real server on the primary.
    let mut server = bed
        .spawn(
            "h21",
            &[
                "socat",
                "TCP-LISTEN:80,reuseaddr,fork",
                "SYSTEM:echo ncp-primary",
            ],
        )
        .expect("server");
    let primary = ip("h21");
    let connect = || {
        let target = format!("TCP:{primary}:80,connect-timeout=2");
        let mut c = bed
            .command("h11", &["timeout", "3", "socat", "-u", &target, "STDOUT"])
            .expect("command");
        let out = tokio::task::block_in_place(|| c.output()).expect("run socat");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // Without any replication, the connection goes straight through (NORMAL fallback).
    common::wait_for(Duration::from_secs(10), "primary reachable", || async {
        (connect() == "ncp-primary").then_some(())
    })
    .await;

    let mut r = spec(1, &ip("h11"), &primary, &ip("h31"), ModeSpec::Rewrite);
    // A replica, so that the fail-open window shows in its consistency state.
    let replica = format!("{}:80", ip("h22"));
    r.replicas = vec![replica.clone()];
    common::add_replication(api, &r).await;
    common::wait_installed(api, 1, true, Duration::from_secs(20)).await;
    let agg1 = bed.dpid("agg1").expect("dpid");
    let redirect_on = |rules: Vec<ncp_controller::rules::FlowRule>| {
        rules
            .iter()
            .any(|r| r.priority == PRIORITY_REDIRECT && r.cookie == cookie(RuleKind::Flow, 1))
    };
    assert!(redirect_on(ncp_rules(svc, agg1).await));
    // The redirect sits on the path: the SYN now goes to the middlebox, which does not
    // forward it (a fresh namespace does not route), so the connection fails.
    let mb_ns = bed.netns("h31").expect("netns");
    let forwarding = sh(&[
        "ip",
        "netns",
        "exec",
        &mb_ns,
        "sysctl",
        "-n",
        "net.ipv4.ip_forward",
    ]);
    assert_eq!(forwarding.trim(), "0");
    assert_eq!(connect(), "", "steered to the middlebox, not the primary");

    // The middlebox goes silent.
    sh(&[
        "ip", "netns", "exec", &mb_ns, "ip", "link", "set", "eth0", "down",
    ]);
    let t0 = Instant::now();
    loop {
        if !redirect_on(ncp_rules(svc, agg1).await) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "redirect still installed 3 s after the middlebox went silent"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "redirect withdrawn {:?} after the middlebox went silent",
        t0.elapsed()
    );
    assert_eq!(connect(), "ncp-primary", "straight to the primary");
    let r = common::replication(api, 1).await;
    assert_eq!(r["installed"], false);
    assert!(
        r["error"].as_str().is_some_and(|e| e.contains("fail-open")),
        "{r}"
    );
    let topo = get_json(api, "/v1/topology").await;
    assert_eq!(topo["middleboxes_down"][0], ip("h31"), "{topo}");

    // It answers again: the redirect returns.
    sh(&[
        "ip", "netns", "exec", &mb_ns, "ip", "link", "set", "eth0", "up",
    ]);
    let (_, took) = common::wait_for(Duration::from_secs(10), "redirect restored", || async {
        redirect_on(ncp_rules(svc, agg1).await).then_some(())
    })
    .await;
    eprintln!("redirect restored {took:?} after the middlebox came back");
    common::wait_installed(api, 1, true, Duration::from_secs(5)).await;
    assert_eq!(connect(), "", "steered to the middlebox again");
    let audit = get_json(api, "/v1/audit").await;
    let said = |what: &str| {
        audit.as_array().is_some_and(|a| {
            a.iter()
                .any(|e| e["who"] == "controller" && e["what"] == what)
        })
    };
    assert!(said(&format!("middlebox {} down", ip("h31"))), "{audit}");
    assert!(said(&format!("middlebox {} up", ip("h31"))), "{audit}");

    // The client's writes reached the primary only while it failed open: the replica is
    // diverged from then on, the window closed when the redirect came back.
    let r = common::replication(api, 1).await;
    let c = &r["replica_states"][0];
    assert_eq!(c["replica"], replica.as_str(), "{r}");
    assert_eq!(c["state"], "diverged", "{r}");
    assert_eq!(c["windows"][0]["kind"], "fail-open", "{r}");
    assert!(
        c["windows"][0]["to_ms"].as_u64() > c["windows"][0]["from_ms"].as_u64(),
        "{r}"
    );
    let fail_open = format!("fail-open (middlebox {} down) from ", ip("h31"));
    assert!(
        c["summary"]
            .as_str()
            .is_some_and(|s| s.starts_with("diverged since") && s.contains(&fail_open)),
        "{r}"
    );
    let m = get_json(api, "/v1/metrics").await;
    assert_eq!(m["fail_open_events"], 1, "{m}");

    let _ = server.kill();
    let _ = server.wait();
}
