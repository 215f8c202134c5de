//! Install latency on Open vSwitch over the test bed's tree (prefix `nc4e`): time from the
//! REST call to the barrier replies that confirm the rules, for one replication and for
//! 1,000. A measurement, not a test: it prints numbers. Needs root and Open vSwitch.
//!
//! `cargo run --release -p ncp-controller --example bench_install`
//!
//! "REST call to barrier reply" is measured as POST /v1/replications followed by POST
//! /v1/reconcile, which returns once every switch has answered the barrier closing each
//! install phase. The background path (the reconcile the POST triggers by itself, which
//! first waits 200 ms so a burst of changes becomes one run) is measured too, by polling
//! the replication's `installed` flag every 5 ms.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ncp_controller::client::Client;
use ncp_controller::openflow::MacAddr;
use ncp_controller::service::{Service, ServiceConfig};
use ncp_controller::store::{HostSpec, ModeSpec, ReplicationSpec};
use ncp_controller::switch::ServerConfig;
use ncp_testbed::{Testbed, UpOptions};
use serde_json::Value;

const PREFIX: &str = "nc4e";
const TOKEN: &str = "bench";

async fn call(c: &Client, method: &'static str, path: &str, body: Option<String>) -> (u16, String) {
    let c = c.clone();
    let path = path.to_string();
    let r = tokio::task::spawn_blocking(move || c.request(method, &path, body.as_deref()))
        .await
        .expect("join")
        .expect("http");
    (r.status, r.body)
}

fn replication(id: u32, port: u16, mode: ModeSpec) -> String {
    serde_json::to_string(&ReplicationSpec {
        id,
        source: "198.18.3.11".into(),
        source_port: None,
        primary: "198.18.3.21".parse().expect("ip"),
        primary_port: port,
        middlebox: "198.18.3.31".parse().expect("ip"),
        replicas: vec![],
        mode,
        verify: Default::default(),
        login: Default::default(),
        record: None,
    })
    .expect("json")
}

async fn installed(api: &Client) -> (usize, usize) {
    let (_, body) = call(api, "GET", "/v1/replications", None).await;
    let list: Value = serde_json::from_str(&body).expect("json");
    let a = list.as_array().cloned().unwrap_or_default();
    (a.iter().filter(|r| r["installed"] == true).count(), a.len())
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

struct Down;
impl Drop for Down {
    fn drop(&mut self) {
        let _ = Testbed::down(PREFIX);
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    if let Err(m) = ncp_testbed::require_tools(&["ovs-ofctl"]) {
        anyhow::bail!("this benchmark needs root and Open vSwitch: {m}");
    }
    let dir = std::env::temp_dir().join(format!("ncp-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = ServiceConfig {
        server: ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..ServerConfig::default()
        },
        state_file: dir.join("state.json"),
        probe_interval: Duration::from_millis(500),
        link_ttl: Duration::from_secs(3),
        reconcile_interval: Duration::from_secs(30),
        settle: Duration::from_millis(500),
        ..ServiceConfig::default()
    };
    let svc = Service::start(cfg).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let api = Client::new(listener.local_addr()?, TOKEN);
    let app = ncp_controller::api::router(svc.clone(), TOKEN);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let _ = Testbed::down(PREFIX);
    let _down = Down;
    let topo =
        ncp_testbed::Topology::load(concat!(env!("CARGO_MANIFEST_DIR"), "/../testbed/tree.toml"))?;
    let options = UpOptions {
        prefix: PREFIX.into(),
        controller_port: Some(svc.controller().local_addr().port()),
        // Plain TCP on loopback: this measures installation, not the TLS layer.
        controller_tls: None,
    };
    let bed = tokio::task::block_in_place(|| Testbed::up(&topo, &options))?;
    for h in &topo.hosts {
        for i in &h.interfaces {
            let spec = HostSpec {
                ip: i.address,
                mac: MacAddr(i.mac.0).to_string(),
                dpid: bed.dpid(&i.switch)?,
                port: u32::from(bed.ofport(&i.switch, &format!("{}:{}", h.name, i.name))?),
            };
            call(
                &api,
                "PUT",
                "/v1/hosts",
                Some(serde_json::to_string(&spec)?),
            )
            .await;
        }
    }
    let t0 = Instant::now();
    while svc.topology().links.len() < 6 {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(20),
            "links not discovered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    svc.reconcile_now().await;

    // One replication, several times (added then deleted).
    let mut explicit = Vec::new();
    let mut background = Vec::new();
    for round in 0..5u32 {
        let id = 1 + round;
        let t = Instant::now();
        let (s, b) = call(
            &api,
            "POST",
            "/v1/replications",
            Some(replication(id, 80, ModeSpec::Rewrite)),
        )
        .await;
        anyhow::ensure!(s == 201, "{s} {b}");
        let (_, summary) = call(&api, "POST", "/v1/reconcile", None).await;
        explicit.push(t.elapsed());
        anyhow::ensure!(installed(&api).await.0 == 1, "not installed: {summary}");
        call(&api, "DELETE", &format!("/v1/replications/{id}"), None).await;
        svc.reconcile_now().await;
        tokio::time::sleep(Duration::from_millis(400)).await;

        let id = 100 + round;
        let t = Instant::now();
        call(
            &api,
            "POST",
            "/v1/replications",
            Some(replication(id, 80, ModeSpec::Rewrite)),
        )
        .await;
        while installed(&api).await.0 < 1 {
            anyhow::ensure!(t.elapsed() < Duration::from_secs(10), "background install");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        background.push(t.elapsed());
        call(&api, "DELETE", &format!("/v1/replications/{id}"), None).await;
        svc.reconcile_now().await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    explicit.sort();
    background.sort();
    println!("one replication (rewrite, 4 rules on 4 switches), 5 rounds:");
    println!(
        "  POST + POST /v1/reconcile (barrier-confirmed): min {} median {} max {}",
        ms(explicit[0]),
        ms(explicit[2]),
        ms(explicit[4])
    );
    println!(
        "  POST, background reconcile (incl. 200 ms debounce), polled: min {} median {} max {}",
        ms(background[0]),
        ms(background[2]),
        ms(background[4])
    );

    for (label, mode) in [
        ("rewrite", ModeSpec::Rewrite),
        ("vlan tunnel", ModeSpec::Vlan { vid: 31 }),
    ] {
        let flows_before = svc.metrics().flow_mods_sent;
        let t = Instant::now();
        for i in 0..1000u32 {
            let (s, b) = call(
                &api,
                "POST",
                "/v1/replications",
                Some(replication(1000 + i, 1000 + i as u16, mode)),
            )
            .await;
            anyhow::ensure!(s == 201, "{s} {b}");
        }
        let posted = t.elapsed();
        let t_rec = Instant::now();
        let (_, summary) = call(&api, "POST", "/v1/reconcile", None).await;
        let reconcile = t_rec.elapsed();
        let (n, total) = installed(&api).await;
        println!("1,000 replications ({label}): {n}/{total} installed");
        println!("  1,000 POSTs (each persisted with fsync): {}", ms(posted));
        println!(
            "  then POST /v1/reconcile to the last barrier reply: {}",
            ms(reconcile)
        );
        println!(
            "  REST calls to barrier replies, total: {}",
            ms(t.elapsed())
        );
        println!(
            "  flow-mods sent: {}; last summary {summary}",
            svc.metrics().flow_mods_sent - flows_before
        );
        let t_idle = Instant::now();
        let (_, summary) = call(&api, "POST", "/v1/reconcile", None).await;
        println!(
            "  a reconcile with nothing to do: {} ({summary})",
            ms(t_idle.elapsed())
        );
        svc.update("bench", |d| {
            d.replications.clear();
            ((), Some("clear".to_string()))
        })?;
        svc.reconcile_now().await;

        // The same 1,000 as one change of the desired state (one store write), then one
        // REST reconcile: the install cost alone, every rule new.
        let specs: Vec<ReplicationSpec> = (0..1000u32)
            .map(|i| serde_json::from_str(&replication(1000 + i, 1000 + i as u16, mode)))
            .collect::<Result<_, _>>()?;
        // Let the background run the clearing triggered pass first.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let flows_before = svc.metrics().flow_mods_sent;
        svc.update("bench", |d| {
            d.replications = specs;
            ((), Some("add 1000".to_string()))
        })?;
        let t = Instant::now();
        let (_, summary) = call(&api, "POST", "/v1/reconcile", None).await;
        let took = t.elapsed();
        println!(
            "  1,000 in one desired-state change, POST /v1/reconcile to the last barrier reply: {} ({} installed, {} flow-mods; {summary})",
            ms(took),
            installed(&api).await.0,
            svc.metrics().flow_mods_sent - flows_before
        );
        svc.update("bench", |d| {
            d.replications.clear();
            ((), Some("clear".to_string()))
        })?;
        svc.reconcile_now().await;
    }
    drop(bed);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
