//! Replica consistency on the controller side, through the real REST API, the real
//! `ncpctl` binary and (for the metrics) a real Prometheus server, against a fake
//! middlebox: a Unix listener that keeps a per-replica consistency state the way the
//! data plane does, answers `stats` with it and applies `replica-reset`.
//!
//! No switches are needed: the middlebox's health probes go unanswered when it is pinned
//! at a switch port that does not exist, which is exactly a middlebox gone silent
//! (fail-open), and unpinning it ends the window.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{TOKEN, call, config, get_json, start_with, temp_state, to_json, wait_for};
use ncp_controller::client::Client;
use ncp_controller::store::{HostSpec, ModeSpec, ReplicationSpec};
use serde_json::{Value, json};

const MB: &str = "198.18.1.3";
const A: &str = "198.18.2.3:6379";
const B: &str = "198.18.2.4:6379";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(0))
        .unwrap_or(0)
}

/// A fake middlebox's per-replica consistency entries, keyed by (service, replica).
type Book = Arc<Mutex<BTreeMap<(String, String), Value>>>;

/// A fake middlebox control socket with a consistency book.
struct FakeMiddlebox {
    control: String,
    book: Book,
    requests: Arc<Mutex<Vec<Value>>>,
}

impl FakeMiddlebox {
    fn start(dir: &Path) -> FakeMiddlebox {
        let book: Book = Arc::default();
        let requests: Arc<Mutex<Vec<Value>>> = Arc::default();
        let (b, r) = (book.clone(), requests.clone());
        let control = common::fake_control_socket(dir, "mb", move |line| {
            let req = serde_json::from_str::<Value>(&line).ok()?;
            r.lock().expect("lock").push(req.clone());
            Some(answer(&b, &req).to_string())
        });
        FakeMiddlebox {
            control,
            book,
            requests,
        }
    }

    fn control(&self) -> String {
        self.control.clone()
    }

    fn set(&self, service: &str, replica: &str, entry: Value) {
        self.book
            .lock()
            .expect("lock")
            .insert((service.into(), replica.into()), entry);
    }

    fn requests(&self, cmd: &str) -> Vec<Value> {
        self.requests
            .lock()
            .expect("lock")
            .iter()
            .filter(|r| r["cmd"] == cmd)
            .cloned()
            .collect()
    }
}

/// The fake's answer to one request, as the data plane's control socket gives it.
fn answer(book: &Book, req: &Value) -> Value {
    let mut book = book.lock().expect("lock");
    match req["cmd"].as_str() {
        Some("services-set") => json!({"result": "done"}),
        Some("services") => json!({"result": "services", "services": []}),
        Some("stats") => {
            let replicas: Vec<Value> = book
                .keys()
                .map(|(_, r)| json!({"address": r, "bytes_out": 0, "lag_bytes": 2048, "live_sessions": 0,
                    "detached": {"refused": 0, "died": 0, "lagged": 2, "connect_timeout": 0, "drain_timeout": 0}}))
                .collect();
            json!({
                "result": "stats",
                "interfaces": [{"name": "eth0", "mode": "driver", "xdp": {"redirected": 10, "passed": 3}}],
                "workers": [{"interface": "eth0", "queue": 0, "core": null, "rx_frames": 12, "rx_bytes": 3400}],
                "replication": {"workers": 1, "services": [{"name": "r1", "replicas": replicas}]},
                "consistency": book.values().cloned().collect::<Vec<_>>(),
            })
        }
        Some("replica-reset") => {
            let key = (
                req["service"].as_str().unwrap_or_default().to_string(),
                req["replica"].as_str().unwrap_or_default().to_string(),
            );
            match book.get_mut(&key) {
                Some(e) => {
                    *e = entry(&key.0, &key.1, "in-step", now_ms());
                    json!({"result": "done"})
                }
                None => json!({"result": "error",
                    "message": format!("service {} has no replica {}", key.0, key.1)}),
            }
        }
        _ => json!({"result": "error", "message": "bad request"}),
    }
}

fn entry(service: &str, replica: &str, state: &str, since: u64) -> Value {
    json!({"service": service, "replica": replica, "state": state, "since_unix_ms": since,
           "reasons": {"unknown_since_start": false}, "verification": {"mismatches": 0}})
}

fn lagged_entry(replica: &str, since: u64) -> Value {
    let mut e = entry("r1", replica, "diverged", since);
    e["reasons"]["detached"] = json!({"lagged": 2, "died": 0});
    e["last_reason"] = json!("detached from a session: it lagged beyond its budget");
    e
}

fn replication(id: u32, middlebox: &str, replicas: &[&str]) -> ReplicationSpec {
    ReplicationSpec {
        id,
        source: format!("198.18.5.{id}"),
        source_port: None,
        primary: "198.18.1.2".parse().expect("ip"),
        primary_port: 6379,
        middlebox: middlebox.parse().expect("ip"),
        replicas: replicas.iter().map(|s| s.to_string()).collect(),
        mode: ModeSpec::Rewrite,
        verify: Default::default(),
        login: Default::default(),
        record: None,
    }
}

/// Runs the real `ncpctl` against `api`.
fn ncpctl(api: &Client, args: &[&str]) -> Output {
    let out = tokio::task::block_in_place(|| {
        Command::new(env!("CARGO_BIN_EXE_ncpctl"))
            .arg("--api")
            .arg(api.addr.to_string())
            .args(args)
            .env("NCP_TOKEN", TOKEN)
            .output()
    })
    .expect("run ncpctl");
    eprintln!(
        "$ ncpctl {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Replica `replica` of replication 1 in `ncpctl status --json`.
fn replica_json(api: &Client, replica: &str) -> Value {
    let out = ncpctl(api, &["status", "--json"]);
    assert!(out.status.success());
    let list: Value = serde_json::from_str(&stdout(&out)).expect("status --json is JSON");
    list.as_array()
        .and_then(|l| l.iter().find(|r| r["id"] == 1))
        .and_then(|r| r["replica_states"].as_array())
        .and_then(|l| l.iter().find(|x| x["replica"] == replica))
        .cloned()
        .unwrap_or(Value::Null)
}

/// Waits until `replica`'s summary satisfies `ok`; returns its JSON.
async fn wait_summary(api: &Client, replica: &str, what: &str, ok: impl Fn(&str) -> bool) -> Value {
    wait_for(Duration::from_secs(15), what, || async {
        let r = replica_json(api, replica);
        r["summary"].as_str().is_some_and(&ok).then_some(r)
    })
    .await
    .0
}

/// ncpd on `state` with `fake` registered as middlebox [`MB`] and replication 1 (replicas
/// [`A`] and [`B`]) created on it.
async fn replicating_through(
    fake: &FakeMiddlebox,
    state: std::path::PathBuf,
) -> (ncp_controller::service::Service, Client) {
    let (svc, api) = start_with(config(state)).await;
    register_and_replicate(&api, MB, &fake.control(), &replication(1, MB, &[A, B])).await;
    (svc, api)
}

/// Registers middlebox `mb` at `control`, then creates `r`; both must succeed.
async fn register_and_replicate(api: &Client, mb: &str, control: &str, r: &ReplicationSpec) {
    let path = format!("/v1/middleboxes/{mb}");
    let body = json!({ "control": control }).to_string();
    let answer = call(api, "PUT", &path, Some(body)).await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    let answer = call(api, "POST", "/v1/replications", Some(to_json(r))).await;
    assert_eq!(answer.status, 201, "{}", answer.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_divergence_fail_open_windows_and_operator_resets() {
    let state = temp_state("consistency");
    let dir = state.parent().expect("dir").to_path_buf();
    let fake = FakeMiddlebox::start(&dir);
    let t0 = now_ms();
    fake.set("r1", A, entry("r1", A, "in-step", t0));
    fake.set("r1", B, lagged_entry(B, t0));
    let (_svc, api) = replicating_through(&fake, state.clone()).await;

    // The middlebox's own state, polled by ncpd.
    let a = wait_summary(&api, A, "A in step", |s| s == "in-step").await;
    assert_eq!(a["state"], "in-step");
    assert_eq!(a["lag_bytes"], 2048);
    let b = replica_json(&api, B);
    assert_eq!(b["state"], "diverged", "{b}");
    assert_eq!(b["since_ms"], t0);
    assert!(
        b["summary"]
            .as_str()
            .is_some_and(|s| s.contains("detached from 2 session(s): lagged 2")),
        "{b}"
    );
    let table = stdout(&ncpctl(&api, &["status"]));
    let row = |replica: &str| {
        table
            .lines()
            .find(|l| l.contains(replica))
            .unwrap_or_else(|| panic!("no row for {replica} in\n{table}"))
            .to_string()
    };
    assert!(table.starts_with("ID  INSTALLED"), "{table}");
    assert!(row(A).ends_with(&format!("{A}  in-step")), "{table}");
    assert!(row(B).contains("diverged since 20"), "{table}");
    assert!(row(B).contains("lagged 2"), "{table}");

    // The middlebox goes silent: it sits at a switch port nobody answers from, so its
    // health probes go unanswered and the controller fails open.
    let pin = HostSpec {
        ip: MB.parse().expect("ip"),
        mac: "02:00:c6:12:01:03".into(),
        dpid: 0x77,
        port: 1,
    };
    let r = call(&api, "PUT", "/v1/hosts", Some(to_json(&pin))).await;
    assert_eq!(r.status, 204, "{}", r.body);
    let a = wait_summary(&api, A, "A diverged by the fail-open window", |s| {
        s.starts_with("diverged since") && s.contains("fail-open (middlebox 198.18.1.3 down) since")
    })
    .await;
    assert_eq!(a["state"], "diverged");
    assert_eq!(a["windows"][0]["kind"], "fail-open");
    assert!(a["windows"][0]["to_ms"].is_null(), "still open: {a}");
    // It is no longer in use where it was: the window closes.
    let r = call(&api, "DELETE", &format!("/v1/hosts/{MB}"), None).await;
    assert_eq!(r.status, 204, "{}", r.body);
    let a = wait_summary(&api, A, "the fail-open window closed", |s| {
        s.contains("fail-open (middlebox 198.18.1.3 down) from ")
    })
    .await;
    let (from, to) = (&a["windows"][0]["from_ms"], &a["windows"][0]["to_ms"]);
    assert!(from.as_u64() < to.as_u64(), "{a}");
    assert_eq!(a["since_ms"], *from);
    let b = replica_json(&api, B);
    assert_eq!(
        b["since_ms"], t0,
        "the middlebox's earlier divergence time wins: {b}"
    );
    assert!(
        b["summary"]
            .as_str()
            .is_some_and(|s| s.contains("lagged 2") && s.contains("fail-open")),
        "{b}"
    );
    let m = get_json(&api, "/v1/metrics").await;
    assert_eq!(m["fail_open_events"], 1, "{m}");

    // A controller started again on the same state file (the first one could have
    // crashed now) still knows the window: A stays diverged, for the same reason.
    let file = state.with_extension("consistency.json");
    wait_for(
        Duration::from_secs(10),
        "the closed window on disk",
        || async {
            let saved: Value = serde_json::from_str(&std::fs::read_to_string(&file).ok()?).ok()?;
            saved["windows"]["1"][0]["to_ms"].is_u64().then_some(())
        },
    )
    .await;
    let (_again, api2) = start_with(config(state.clone())).await;
    let a2 = wait_summary(&api2, A, "A diverged after a restart", |s| {
        s.contains("fail-open (middlebox 198.18.1.3 down) from ")
    })
    .await;
    assert_eq!(a2["state"], "diverged", "{a2}");
    assert_eq!(a2["windows"], a["windows"], "the same window, read back");

    // Wrong calls are refused with a reason and an HTTP status.
    let unregistered = "198.18.1.9";
    let r = call(
        &api,
        "POST",
        "/v1/replications",
        Some(to_json(&replication(2, unregistered, &[A]))),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let gone = format!("unix:{}", dir.join("nobody.sock").display());
    let r = replication(3, "198.18.1.8", &[A]);
    register_and_replicate(&api, "198.18.1.8", &gone, &r).await;
    for (args, status, says) in [
        (
            vec!["--replication", "9", "--replica", A],
            404,
            "no replication 9".to_string(),
        ),
        (
            vec!["--replication", "1", "--replica", "198.18.2.9:6379"],
            404,
            format!("replication 1 has no replica 198.18.2.9:6379 (its replicas: {A}, {B})"),
        ),
        (
            vec!["--replication", "2", "--replica", A],
            409,
            format!("middlebox {unregistered} of this replication is not registered"),
        ),
        (
            vec!["--replication", "3", "--replica", A],
            502,
            "middlebox 198.18.1.8 did not take the reset: connect:".to_string(),
        ),
    ] {
        let mut argv = vec!["replica", "reset"];
        argv.extend(args);
        let out = ncpctl(&api, &argv);
        assert!(!out.status.success(), "{argv:?}");
        assert!(stdout(&out).contains(&says), "{argv:?}: {}", stdout(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("HTTP {status}")), "{argv:?}: {err}");
    }
    let r = call(
        &api,
        "POST",
        "/v1/replications/1/replicas/nonsense/reset",
        None,
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        fake.requests("replica-reset").is_empty(),
        "nothing reached the middlebox"
    );

    // The operator re-cloned A and says so.
    let out = ncpctl(
        &api,
        &["replica", "reset", "--replication", "1", "--replica", A],
    );
    assert!(out.status.success());
    let done: Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert!(
        done["was"]
            .as_str()
            .is_some_and(|w| w.contains("fail-open")),
        "{done}"
    );
    let sent = fake.requests("replica-reset");
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0],
        json!({"cmd": "replica-reset", "service": "r1", "replica": A})
    );
    let a = wait_summary(&api, A, "A in step after the reset", |s| {
        s.starts_with("in-step; reset by operator operator at 20")
    })
    .await;
    assert_eq!(a["windows"], json!([]), "{a}");
    assert_eq!(a["reset_by_operator"]["who"], "operator");
    let b = replica_json(&api, B);
    assert_eq!(b["state"], "diverged", "B was not reset: {b}");
    let table = stdout(&ncpctl(&api, &["status"]));
    assert!(
        table.contains("in-step; reset by operator operator at"),
        "{table}"
    );
    let audit = get_json(&api, "/v1/audit").await;
    assert!(
        audit
            .as_array()
            .is_some_and(|l| l.iter().any(|e| e["who"] == "operator"
                && e["what"].as_str().is_some_and(|w| w.starts_with(&format!(
                    "mark replica {A} of replication 1 in step (was: diverged since"
                ))))),
        "{audit}"
    );
    let m = get_json(&api, "/v1/metrics").await;
    assert_eq!(m["replica_resets"], 1, "{m}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_replica_state() {
    if !ncp_testbed::ready_or_skip("prometheus scrape", &["prometheus"]) {
        return;
    }
    let state = temp_state("prometheus");
    let dir = state.parent().expect("dir").to_path_buf();
    let fake = FakeMiddlebox::start(&dir);
    fake.set("r1", A, entry("r1", A, "in-step", now_ms()));
    fake.set("r1", B, lagged_entry(B, now_ms()));
    let (_svc, api) = replicating_through(&fake, state).await;

    // The exposition itself, as Prometheus will read it.
    let text = wait_for(Duration::from_secs(10), "the middlebox polled", || async {
        let r = call(&api, "GET", "/metrics", None).await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.body
            .contains(&format!(
                "ncp_replica_in_step{{replication=\"1\",replica=\"{A}\"}} 1"
            ))
            .then_some(r.body)
    })
    .await
    .0;
    for series in [
        format!("ncp_replica_in_step{{replication=\"1\",replica=\"{B}\"}} 0"),
        format!("ncp_replica_lag_bytes{{replication=\"1\",replica=\"{B}\"}} 2048"),
        format!("ncp_replica_detaches_total{{replication=\"1\",replica=\"{B}\",reason=\"lagged\"}} 2"),
        "ncp_middlebox_worker_rx_frames_total{middlebox=\"198.18.1.3\",interface=\"eth0\",queue=\"0\"} 12".to_string(),
    ] {
        assert!(text.lines().any(|l| l == series), "missing {series} in\n{text}");
    }
    assert_eq!(
        call(&Client::new(api.addr, "wrong"), "GET", "/metrics", None)
            .await
            .status,
        401
    );

    let prometheus =
        ncp_testbed::prometheus::Prometheus::start(api.addr, TOKEN).expect("start prometheus");
    let ((result, took), up) = tokio::task::block_in_place(|| {
        let series = prometheus
            .wait_for(
                "ncp_replica_in_step",
                "both replicas' series",
                Duration::from_secs(60),
                |s| s.len() == 2,
            )
            .expect("ncp_replica_in_step in Prometheus");
        (series, prometheus.query("up").expect("up"))
    });
    eprintln!("Prometheus had the series {took:?} after it started: {result:?}");
    let value = |replica: &str| {
        result
            .iter()
            .find(|s| s.label("replica") == replica)
            .map(|s| s.value)
    };
    assert_eq!(value(A), Some(1.0), "{result:?}");
    assert_eq!(value(B), Some(0.0), "{result:?}");
    assert_eq!(result[0].label("replication"), "1", "{result:?}");
    assert_eq!(result[0].label("job"), "ncpd", "{result:?}");
    assert_eq!(
        up.first().map(|s| s.value),
        Some(1.0),
        "scrape healthy: {up:?}"
    );
    drop(prometheus);
    let _ = std::fs::remove_dir_all(dir);
}
