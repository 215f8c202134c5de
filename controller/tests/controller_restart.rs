//! The `ncpd` daemon restarted on the same state file, with Open vSwitch and the tree test
//! bed: the new process learns the network again (hosts it had learned come back from the
//! switches), sends no FLOW_MOD at all for rules that are already right, and leaves every
//! switch with exactly the rules it had, none doubled. Along the way: changes are logged
//! with the name of the token that made them.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Down, call, dump_flows, get_json, spec, wait_for};
use ncp_controller::client::Client;
use ncp_controller::store::ModeSpec;
use serde_json::Value;

const PREFIX: &str = "nc4d";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Starts `ncpd`; its log goes to `log`.
fn ncpd(of_port: u16, api_port: u16, dir: &Path, log: &str) -> Child {
    let err = std::fs::File::create(dir.join(log)).expect("log file");
    Command::new(env!("CARGO_BIN_EXE_ncpd"))
        .args([
            "--listen",
            &format!("127.0.0.1:{of_port}"),
            "--api",
            &format!("127.0.0.1:{api_port}"),
            "--state",
            &dir.join("state.json").to_string_lossy(),
            "--token-file",
            &dir.join("tokens").to_string_lossy(),
            "--probe-secs",
            "1",
            "--reconcile-secs",
            "2",
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .expect("spawn ncpd")
}

/// Kills our own child by its handle (its pid) and reaps it.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn up(api: &Client) {
    wait_for(Duration::from_secs(10), "ncpd API up", || async {
        let c = api.clone();
        let ok = tokio::task::spawn_blocking(move || c.request("GET", "/v1/health", None))
            .await
            .ok()
            .and_then(Result::ok)
            .is_some_and(|r| r.status == 200);
        ok.then_some(())
    })
    .await;
}

fn all_flows(bridges: &[String]) -> BTreeMap<String, Vec<String>> {
    bridges.iter().map(|b| (b.clone(), dump_flows(b))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_sends_no_flow_mods_and_leaves_no_duplicates() {
    if !ncp_testbed::ready_or_skip("controller restart", &["ovs-ofctl", "ping"]) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ncpc-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(
        dir.join("tokens"),
        "# name token\nalice tok-alice-4d\nbob tok-bob-4d\n",
    )
    .expect("tokens");
    let (of_port, api_port) = (free_port(), free_port());
    let api_addr = SocketAddr::from(([127, 0, 0, 1], api_port));
    let alice = Client::new(api_addr, "tok-alice-4d");
    let bob = Client::new(api_addr, "tok-bob-4d");

    let first = Daemon(ncpd(of_port, api_port, &dir, "ncpd-1.log"));
    up(&alice).await;
    let _down = Down(PREFIX);
    let bed = common::tree_up(PREFIX, of_port);
    common::wait_links(&alice, Duration::from_secs(20)).await;

    // Hosts are learned from traffic, nothing is pinned.
    let ip = |h: &str| bed.address(h, "eth0").expect("address").to_string();
    for (from, to) in [
        ("h11", "h21"),
        ("h31", "h21"),
        ("h12", "h22"),
        ("h41", "h22"),
    ] {
        let _ = bed.exec(from, &["ping", "-c", "2", "-i", "0.2", "-W", "1", &ip(to)]);
    }
    wait_for(Duration::from_secs(10), "six hosts learned", || async {
        let t = get_json(&alice, "/v1/topology").await;
        (t["learned"].as_array().map(Vec::len) >= Some(6)).then_some(())
    })
    .await;

    let r1 = common::h11_to_h21_via_h31(&bed);
    let r2 = spec(
        2,
        &ip("h12"),
        &ip("h22"),
        &ip("h41"),
        ModeSpec::Vlan { vid: 41 },
    );
    for (who, r) in [(&alice, r1), (&bob, r2)] {
        common::add_replication(who, &r).await;
    }
    for id in [1, 2] {
        common::wait_installed(&alice, id, true, Duration::from_secs(20)).await;
    }
    // Every change carries the name of whoever made it.
    let audit = get_json(&alice, "/v1/audit").await;
    let by = |who: &str, prefix: &str| {
        audit.as_array().is_some_and(|a| {
            a.iter().any(|e| {
                e["who"] == who && e["what"].as_str().is_some_and(|w| w.starts_with(prefix))
            })
        })
    };
    assert!(by("alice", "add replication 1"), "{audit}");
    assert!(by("bob", "add replication 2"), "{audit}");
    assert!(by("controller", "host "), "{audit}");

    // Let it settle, then take the switches' picture.
    let summary: Value =
        serde_json::from_str(&call(&alice, "POST", "/v1/reconcile", None).await.body)
            .expect("json");
    assert_eq!(
        (summary["added"].as_u64(), summary["deleted"].as_u64()),
        (Some(0), Some(0)),
        "{summary}"
    );
    let before_metrics = get_json(&alice, "/v1/metrics").await;
    assert!(before_metrics["flow_mods_sent"].as_u64() > Some(0));
    let bridges: Vec<String> = bed
        .topology()
        .switches
        .iter()
        .map(|s| bed.bridge(&s.name).expect("bridge"))
        .collect();
    let before = all_flows(&bridges);
    let ncp_rules = before
        .values()
        .flatten()
        .filter(|l| l.contains("cookie=0x4e43"))
        .count();
    assert!(ncp_rules > 20, "{before:#?}");

    // Restart: a new process on the same state file and ports.
    drop(first);
    let _second = Daemon(ncpd(of_port, api_port, &dir, "ncpd-2.log"));
    up(&alice).await;
    let (_, took) = wait_for(
        Duration::from_secs(30),
        "restarted controller converged",
        || async {
            let t = get_json(&alice, "/v1/topology").await;
            let list = get_json(&alice, "/v1/replications").await;
            let installed = list
                .as_array()
                .is_some_and(|a| a.len() == 2 && a.iter().all(|r| r["installed"] == true));
            (t["switches"].as_array().map(Vec::len) == Some(7)
                && t["links"].as_array().map(Vec::len) == Some(6)
                && installed)
                .then_some(())
        },
    )
    .await;
    eprintln!("restarted controller reported both replications installed after {took:?}");
    // One more full run after convergence.
    let summary: Value =
        serde_json::from_str(&call(&alice, "POST", "/v1/reconcile", None).await.body)
            .expect("json");
    assert_eq!(summary["switches"], 7, "{summary}");
    let metrics = get_json(&alice, "/v1/metrics").await;
    let log = std::fs::read_to_string(dir.join("ncpd-2.log")).unwrap_or_default();
    assert_eq!(
        metrics["flow_mods_sent"], 0,
        "{metrics}\n{summary}\nlog of the restarted controller:\n{log}"
    );
    assert!(metrics["reconciles"].as_u64() >= Some(2), "{metrics}");
    assert!(metrics["learned_hosts"].as_u64() >= Some(6), "{metrics}");
    let after = all_flows(&bridges);
    for b in &bridges {
        assert_eq!(before[b], after[b], "bridge {b} changed across the restart");
        let mut keys: Vec<String> = after[b]
            .iter()
            .map(|l| {
                // Drop the cookie and actions: what remains is the rule's key.
                l.split(", ")
                    .filter(|f| !f.starts_with("cookie="))
                    .collect::<Vec<_>>()
                    .join(", ")
                    .split(" actions=")
                    .next()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect();
        let n = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), n, "duplicate rules on {b}: {:#?}", after[b]);
    }

    drop(bed);
    let _ = std::fs::remove_dir_all(&dir);
}
