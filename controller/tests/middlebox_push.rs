//! Service pushes to registered middleboxes, driven through the real REST API against a
//! fake middlebox: a Unix listener that records every `services-set` request line and
//! answers as told.
//!
//! No switches are needed: a middlebox's service list follows from the desired state
//! alone, so these tests run without Open vSwitch (the planner just reports every
//! replication as not placed).

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{call, config, get_json, replication, start_with, temp_state, wait_for};
use ncp_controller::client::Client;
use ncp_controller::middlebox::NOT_REGISTERED;
use ncp_controller::store::{ModeSpec, ReplicationSpec};
use serde_json::{Value, json};

/// How the fake middlebox answers.
#[derive(Debug, Clone)]
enum Answer {
    Done,
    Error(&'static str),
    /// Reads the request, then keeps the connection open without a word.
    Silent,
}

/// A fake middlebox control socket.
struct Fake {
    control: String,
    lines: Arc<Mutex<Vec<String>>>,
    answer: Arc<Mutex<Answer>>,
}

impl Fake {
    fn start(dir: &Path, name: &str, answer: Answer) -> Fake {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let answer = Arc::new(Mutex::new(answer));
        let (l, a) = (lines.clone(), answer.clone());
        let control = common::fake_control_socket(dir, name, move |line| {
            // Only the pushes are under test here, not ncpd's stats polls.
            if line.starts_with("{\"cmd\":\"services-set\"") {
                l.lock().expect("lock").push(line);
            }
            let answer = a.lock().expect("lock").clone();
            match answer {
                Answer::Done => Some("{\"result\":\"done\"}".to_string()),
                Answer::Error(m) => Some(json!({"result":"error","message":m}).to_string()),
                Answer::Silent => None,
            }
        });
        Fake {
            control,
            lines,
            answer,
        }
    }

    fn control(&self) -> String {
        self.control.clone()
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lock").clone()
    }

    fn set(&self, a: Answer) {
        *self.answer.lock().expect("lock") = a;
    }

    /// Waits for a request line after the first `seen`, returns it and the new count.
    async fn next_line(&self, seen: usize, limit: Duration, what: &str) -> (String, usize) {
        let (line, _) = wait_for(limit, what, || async { self.lines().get(seen).cloned() }).await;
        (line, seen + 1)
    }
}

fn rep(id: u32, source: &str, middlebox: &str, replicas: &[&str]) -> ReplicationSpec {
    ReplicationSpec {
        id,
        source: source.into(),
        source_port: None,
        primary: "198.18.1.2".parse().expect("ip"),
        primary_port: 6379 + u16::try_from(id).expect("small id"),
        middlebox: middlebox.parse().expect("ip"),
        replicas: replicas.iter().map(|s| s.to_string()).collect(),
        mode: ModeSpec::Rewrite,
        verify: Default::default(),
        login: Default::default(),
        record: None,
    }
}

async fn post(api: &Client, r: &ReplicationSpec) -> ncp_controller::client::Response {
    let body = serde_json::to_string(r).expect("json");
    call(api, "POST", "/v1/replications", Some(body)).await
}

async fn register(api: &Client, ip: &str, body: Value) -> ncp_controller::client::Response {
    call(
        api,
        "PUT",
        &format!("/v1/middleboxes/{ip}"),
        Some(body.to_string()),
    )
    .await
}

/// Registers a middlebox a test needs in place: anything but `201 Created` fails the test.
async fn register_new(api: &Client, ip: &str, body: Value) {
    let r = register(api, ip, body).await;
    assert_eq!(r.status, 201, "registering {ip}: {}", r.body);
}

/// Deletes replication `id`, which must exist.
async fn delete_replication(api: &Client, id: u32) {
    let path = format!("/v1/replications/{id}");
    assert_eq!(
        common::status(api, "DELETE", &path).await,
        204,
        "DELETE {path}"
    );
}

async fn middlebox_status(api: &Client, ip: &str) -> Value {
    let list = get_json(api, "/v1/middleboxes").await;
    list.as_array()
        .and_then(|a| a.iter().find(|m| m["ip"] == ip))
        .cloned()
        .unwrap_or(Value::Null)
}

fn tempdir(name: &str) -> PathBuf {
    let state = temp_state(name);
    state.parent().expect("dir").to_path_buf()
}

const MB: &str = "198.18.1.3";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replications_through_the_api_configure_the_middlebox() {
    let dir = tempdir("mbpush");
    let state = dir.join("state.json");
    let fake = Fake::start(&dir, "mb", Answer::Done);
    let (_svc, api) = start_with(config(state.clone())).await;

    // Control addresses other than unix:/path are refused, naming the field.
    for control in ["tcp:198.18.1.3:7000", "http://198.18.1.3/", "unix:mb.sock"] {
        let r = register(&api, MB, json!({ "control": control })).await;
        assert_eq!(r.status, 400, "{control}: {}", r.body);
        assert!(r.body.contains("control"), "{control}: {}", r.body);
    }
    let r = register(
        &api,
        MB,
        json!({ "ip": "198.18.1.4", "control": fake.control() }),
    )
    .await;
    assert_eq!(
        r.status, 400,
        "ip in the body differs from the path: {}",
        r.body
    );
    let r = register(
        &api,
        MB,
        json!({ "control": fake.control(), "nic": "eth1" }),
    )
    .await;
    assert_eq!(r.status, 422, "unknown field: {}", r.body);
    assert!(fake.lines().is_empty(), "nothing registered yet");

    let mb = json!({ "control": fake.control(), "replica_interface": "eth1" });
    let r = register(&api, MB, mb.clone()).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = register(&api, MB, mb).await;
    assert_eq!(r.status, 204, "same again: {}", r.body);

    // Registered with no replication: the middlebox is told its list is empty.
    let (line, seen) = fake
        .next_line(0, Duration::from_secs(3), "empty list on registration")
        .await;
    assert_eq!(line, "{\"cmd\":\"services-set\",\"services\":[]}\n");

    let t0 = Instant::now();
    let r = post(&api, &rep(7, "198.18.1.1", MB, &["198.18.2.3:6379"])).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let created: Value = serde_json::from_str(&r.body).expect("json answer");
    assert_eq!(created["id"], 7);
    assert_ne!(created["middlebox_service"], NOT_REGISTERED, "{created}");
    let (line, seen) = fake
        .next_line(seen, Duration::from_secs(3), "services-set with r7")
        .await;
    // The exact bytes are pinned by the unit test of the request line; here, what arrived.
    assert!(line.ends_with('\n'), "one line: {line:?}");
    let request: Value = serde_json::from_str(&line).expect("request is JSON");
    assert_eq!(
        request,
        json!({"cmd": "services-set", "services": [{
            "name": "r7", "primary": "198.18.1.2:6386", "clients": "198.18.1.1/32",
            "replicas": ["198.18.2.3:6379"], "replica_interface": "eth1",
        }]})
    );
    eprintln!(
        "replication pushed {:?} after the API answered",
        t0.elapsed()
    );
    wait_for(Duration::from_secs(3), "r7 configured", || async {
        (replication(&api, 7).await["middlebox_service"] == "configured on middlebox").then_some(())
    })
    .await;
    let st = middlebox_status(&api, MB).await;
    assert_eq!(st["in_sync"], true, "{st}");
    assert_eq!(st["services"], json!(["r7"]), "{st}");
    assert_eq!(st["last_push"]["ok"], true, "{st}");
    assert_eq!(st["replica_interface"], "eth1", "{st}");
    assert!(st["last_ok_at_ms"].as_u64().is_some(), "{st}");

    // A replication through an unregistered middlebox is rules only, and says so.
    let r = post(&api, &rep(8, "198.18.1.1", "198.18.9.9", &[])).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let created: Value = serde_json::from_str(&r.body).expect("json answer");
    assert_eq!(created["middlebox_service"], NOT_REGISTERED);
    assert_eq!(
        replication(&api, 8).await["middlebox_service"],
        NOT_REGISTERED
    );

    // A source port cannot become a service: refused for a registered middlebox only.
    let mut with_port = rep(9, "198.18.1.1", MB, &[]);
    with_port.source_port = Some(40000);
    let r = post(&api, &with_port).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("source_port"), "{}", r.body);

    // A second service, then deleting both: the middlebox gets the list shrinking to empty.
    let r = post(&api, &rep(3, "198.18.5.0/24", MB, &[])).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let (line, seen) = fake
        .next_line(seen, Duration::from_secs(3), "list with r3 and r7")
        .await;
    let sent: Value = serde_json::from_str(&line).expect("json line");
    let names: Vec<&str> = sent["services"]
        .as_array()
        .expect("services")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["r3", "r7"], "{line}");
    assert_eq!(sent["services"][0]["replicas"], json!([]), "{line}");
    delete_replication(&api, 7).await;
    let (line, seen) = fake
        .next_line(seen, Duration::from_secs(3), "list with r3 only")
        .await;
    assert!(
        line.contains("\"r3\"") && !line.contains("\"r7\""),
        "{line}"
    );
    delete_replication(&api, 3).await;
    let (line, seen) = fake
        .next_line(seen, Duration::from_secs(3), "empty list after deletes")
        .await;
    assert_eq!(line, "{\"cmd\":\"services-set\",\"services\":[]}\n");

    // In sync, nothing is resent until the refresh (10 s).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(fake.lines().len(), seen, "{:?}", fake.lines());

    let m = get_json(&api, "/v1/metrics").await;
    assert!(m["middlebox_pushes_ok"].as_u64() >= Some(4), "{m}");
    assert_eq!(m["middlebox_pushes_failed"], 0, "{m}");
    let audit = get_json(&api, "/v1/audit").await;
    assert!(
        audit.as_array().expect("audit").iter().any(|e| e["what"]
            .as_str()
            .is_some_and(|w| w.starts_with("register middlebox 198.18.1.3"))),
        "{audit}"
    );

    // The registry survives a restart, and the restarted controller pushes again.
    let before = fake.lines().len();
    let (svc2, _api2) = start_with(config(state.clone())).await;
    assert_eq!(svc2.desired().middleboxes.len(), 1);
    fake.next_line(
        before,
        Duration::from_secs(3),
        "push from the restarted controller",
    )
    .await;

    // Unregistering stops the pushes.
    let del = format!("/v1/middleboxes/{MB}");
    assert_eq!(common::status(&api, "DELETE", &del).await, 204);
    assert_eq!(common::status(&api, "DELETE", &del).await, 404);
    assert_eq!(get_json(&api, "/v1/middleboxes").await, json!([]));
    let anonymous = Client::new(api.addr, "");
    assert_eq!(
        common::status(&anonymous, "GET", "/v1/middleboxes").await,
        401
    );
    assert_eq!(
        register(
            &Client::new(api.addr, "wrong"),
            MB,
            json!({"control": fake.control()})
        )
        .await
        .status,
        401
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_middlebox_is_reported_and_retried() {
    let dir = tempdir("mbrefuse");
    let fake = Fake::start(
        &dir,
        "mb",
        Answer::Error("replica_interface eth1 is not configured"),
    );
    let (_svc, api) = start_with(config(dir.join("state.json"))).await;
    register_new(
        &api,
        MB,
        json!({ "control": fake.control(), "replica_interface": "eth1" }),
    )
    .await;
    let r = post(&api, &rep(1, "198.18.1.1", MB, &["198.18.2.3:6379"])).await;
    assert_eq!(r.status, 201, "{}", r.body);

    let (status, _) = wait_for(
        Duration::from_secs(4),
        "replication shows the refusal",
        || async {
            let s = replication(&api, 1).await["middlebox_service"].clone();
            s.as_str()
                .is_some_and(|s| s.contains("eth1 is not configured"))
                .then_some(s)
        },
    )
    .await;
    assert!(
        status
            .as_str()
            .is_some_and(|s| s.starts_with("push failed")),
        "{status}"
    );
    let st = middlebox_status(&api, MB).await;
    assert_eq!(st["in_sync"], false, "{st}");
    assert_eq!(st["last_push"]["ok"], false, "{st}");
    assert!(st["pushes_failed"].as_u64() >= Some(1), "{st}");

    // Retried without anything changing (backoff 1 s, then 2 s).
    let n = fake.lines().len();
    fake.next_line(n, Duration::from_secs(4), "a retry").await;
    let m = get_json(&api, "/v1/metrics").await;
    assert!(m["middlebox_pushes_failed"].as_u64() >= Some(2), "{m}");

    // Once it accepts, the replication is configured (backoff is capped at 10 s).
    fake.set(Answer::Done);
    wait_for(
        Duration::from_secs(12),
        "configured after the middlebox accepts",
        || async {
            (replication(&api, 1).await["middlebox_service"] == "configured on middlebox")
                .then_some(())
        },
    )
    .await;
    let st = middlebox_status(&api, MB).await;
    assert_eq!(st["in_sync"], true, "{st}");
    assert_eq!(st["last_push"]["ok"], true, "{st}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_middlebox_stalls_nothing() {
    let dir = tempdir("mbsilent");
    let silent = Fake::start(&dir, "silent", Answer::Silent);
    let good = Fake::start(&dir, "good", Answer::Done);
    let (_svc, api) = start_with(config(dir.join("state.json"))).await;
    register_new(&api, MB, json!({ "control": silent.control() })).await;
    // Registered, but nobody listens at the socket path.
    register_new(
        &api,
        "198.18.1.5",
        json!({ "control": format!("unix:{}", dir.join("nobody.sock").display()) }),
    )
    .await;
    silent
        .next_line(
            0,
            Duration::from_secs(3),
            "first push to the silent middlebox",
        )
        .await;

    // While that push hangs, the API answers at once, changes included, and another
    // middlebox is configured.
    let t = Instant::now();
    let r = post(&api, &rep(1, "198.18.1.1", MB, &[])).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(get_json(&api, "/v1/replications").await[0]["id"], 1);
    get_json(&api, "/v1/middleboxes").await;
    get_json(&api, "/v1/metrics").await;
    let r = call(&api, "POST", "/v1/reconcile", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "API calls took {:?} while a middlebox hangs",
        t.elapsed()
    );
    register_new(&api, "198.18.1.4", json!({ "control": good.control() })).await;
    let r = post(&api, &rep(2, "198.18.1.1", "198.18.1.4", &[])).await;
    assert_eq!(r.status, 201, "{}", r.body);
    wait_for(
        Duration::from_secs(2),
        "the good middlebox gets r2",
        || async {
            good.lines()
                .iter()
                .any(|l| l.contains("\"r2\""))
                .then_some(())
        },
    )
    .await;

    // The hung push times out (2 s for the answer) and says so.
    let (st, _) = wait_for(Duration::from_secs(4), "silent push timed out", || async {
        let st = middlebox_status(&api, MB).await;
        (st["last_push"]["ok"] == false).then_some(st)
    })
    .await;
    let err = st["last_push"]["error"].as_str().unwrap_or_default();
    assert!(err.contains("read timed out"), "{st}");
    let st = middlebox_status(&api, "198.18.1.5").await;
    let err = st["last_push"]["error"].as_str().unwrap_or_default();
    assert!(err.starts_with("connect"), "{st}");
    let _ = std::fs::remove_dir_all(&dir);
}
