//! Shared by the integration tests that bring up the test bed.
#![allow(dead_code)] // each test binary uses a different part

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ncp_controller::client::{Client, Response};
use ncp_controller::openflow::{FlowStatsRequest, MacAddr};
use ncp_controller::pki;
use ncp_controller::rules::{FlowRule, is_ncp_cookie};
use ncp_controller::service::{Service, ServiceConfig};
use ncp_controller::store::{HostSpec, ModeSpec, ReplicationSpec};
use ncp_controller::switch::{ServerConfig, SwitchTls, TlsFiles};
use ncp_controller::topology::Dpid;
use ncp_testbed::{OvsSsl, Testbed, Topology, UpOptions};
use serde_json::Value;

/// Name prefix of everything the older tests create (bridges, namespaces, veths).
pub const PREFIX: &str = "ncpc";

/// The three-level tree topology of the test bed.
pub const TREE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../testbed/tree.toml");

pub const TOKEN: &str = "test-token-ncpc";

/// Takes the test bed of `prefix` down when dropped, also when an assertion fails.
pub struct Down(pub &'static str);

impl Drop for Down {
    fn drop(&mut self) {
        if let Err(e) = Testbed::down(self.0) {
            eprintln!("cleanup of test bed {} failed: {e}", self.0);
        }
    }
}

/// Service settings for tests: ephemeral OpenFlow port, fast probes.
pub fn config(state_file: PathBuf) -> ServiceConfig {
    ServiceConfig {
        server: ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..ServerConfig::default()
        },
        state_file,
        probe_interval: Duration::from_millis(500),
        link_ttl: Duration::from_secs(3),
        reconcile_interval: Duration::from_secs(2),
        settle: Duration::from_millis(500),
        ..ServiceConfig::default()
    }
}

/// Starts the service and its API on ephemeral loopback ports.
pub async fn start_with(cfg: ServiceConfig) -> (Service, Client) {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let svc = Service::start(cfg).await.expect("service");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind api");
    let addr = listener.local_addr().expect("addr");
    let app = ncp_controller::api::router(svc.clone(), TOKEN);
    tokio::spawn(async move { axum::serve(listener, app).await });
    (svc, Client::new(addr, TOKEN))
}

pub async fn call(c: &Client, method: &'static str, path: &str, body: Option<String>) -> Response {
    let c = c.clone();
    let path = path.to_string();
    tokio::task::spawn_blocking(move || c.request(method, &path, body.as_deref()))
        .await
        .expect("join")
        .expect("http")
}

/// The status of a request without a body.
pub async fn status(c: &Client, method: &'static str, path: &str) -> u16 {
    call(c, method, path, None).await.status
}

pub async fn get_json(c: &Client, path: &str) -> Value {
    let r = call(c, "GET", path, None).await;
    assert_eq!(r.status, 200, "GET {path}: {}", r.body);
    serde_json::from_str(&r.body).expect("json")
}

pub fn temp_state(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ncpc-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir.join("state.json")
}

pub fn spec(
    id: u32,
    source: &str,
    primary: &str,
    middlebox: &str,
    mode: ModeSpec,
) -> ReplicationSpec {
    ReplicationSpec {
        id,
        source: source.to_string(),
        source_port: None,
        primary: primary.parse().expect("ip"),
        primary_port: 80,
        middlebox: middlebox.parse().expect("ip"),
        replicas: vec![],
        mode,
        verify: Default::default(),
        login: Default::default(),
        record: None,
    }
}

/// A request body for the API.
pub fn to_json(body: &impl serde::Serialize) -> String {
    serde_json::to_string(body).expect("json")
}

/// Adds a replication through the API (as `api`'s caller), which must accept it.
pub async fn add_replication(api: &Client, spec: &ReplicationSpec) {
    let resp = call(api, "POST", "/v1/replications", Some(to_json(spec))).await;
    assert_eq!(resp.status, 201, "{}", resp.body);
}

/// Replication 1 of the tree scenes: h11's connections to port 80 of h21, copied to the
/// middlebox h31, in rewrite mode.
pub fn h11_to_h21_via_h31(bed: &Testbed) -> ReplicationSpec {
    let ip = |h: &str| bed.address(h, "eth0").expect("address").to_string();
    spec(1, &ip("h11"), &ip("h21"), &ip("h31"), ModeSpec::Rewrite)
}

/// The tree topology.
pub fn tree() -> Topology {
    Topology::load(TREE).expect("tree topology")
}

/// A fresh PKI in the test bed's PKI directory (which `down` removes): a CA, the
/// controller's certificate, and one switch certificate for OVS granting `dpids` (one
/// ovs-vswitchd presents one certificate for all its bridges). Returns the controller's
/// TLS and OVS's `set-ssl` files. Call after the previous bed of `prefix` is down.
pub fn tls_pki(prefix: &str, dpids: &[Dpid]) -> (SwitchTls, OvsSsl) {
    let dir = Testbed::pki_dir(prefix);
    let _ = std::fs::remove_dir_all(&dir);
    let ctl = pki::init(&dir).expect("pki init");
    let ovs = pki::switch(&dir, "ovs", dpids).expect("switch certificate");
    let ca = dir.join(pki::CA_CERT);
    let tls = SwitchTls::load(&TlsFiles {
        cert: ctl.cert,
        key: ctl.key,
        ca: ca.clone(),
        switch_map: None,
    })
    .expect("controller TLS");
    let ssl = OvsSsl {
        privkey: ovs.key,
        cert: ovs.cert,
        cacert: ca,
    };
    (tls, ssl)
}

/// The datapath ids of the tree's bridges under `prefix`.
pub fn tree_dpids(prefix: &str) -> Vec<Dpid> {
    dpids(&tree(), prefix)
}

/// The datapath ids of `topology`'s bridges under `prefix`.
pub fn dpids(topology: &Topology, prefix: &str) -> Vec<Dpid> {
    ncp_testbed::Plan::new(topology, prefix)
        .expect("plan")
        .bridges
        .iter()
        .map(|b| b.dpid)
        .collect()
}

/// Brings the tree up under `prefix`, its bridges pointing at `controller_port` over
/// plain TCP (after taking down what a crashed run left).
pub fn tree_up(prefix: &str, controller_port: u16) -> Testbed {
    let _ = Testbed::down(prefix);
    tree_up_with(prefix, controller_port, None)
}

/// Brings the tree up under `prefix`, its bridges pointing at `controller_port`, over TLS
/// with `tls` when given. Does not take an old bed down first (that would delete the PKI
/// made for this one); `up` replaces a bed of the same prefix anyway.
pub fn tree_up_with(prefix: &str, controller_port: u16, tls: Option<OvsSsl>) -> Testbed {
    up_with(&tree(), prefix, controller_port, tls)
}

/// [`tree_up_with`] for any topology.
pub fn up_with(
    topology: &Topology,
    prefix: &str,
    controller_port: u16,
    tls: Option<OvsSsl>,
) -> Testbed {
    let options = UpOptions {
        prefix: prefix.to_string(),
        controller_port: Some(controller_port),
        controller_tls: tls,
    };
    tokio::task::block_in_place(|| Testbed::up(topology, &options)).expect("test bed up")
}

/// A controller driving a test bed (the tree, unless [`scene_on`] named another): the
/// start of every scene on OVS. Dropping it takes the test bed down and removes the
/// controller's state directory, also when an assertion fails.
pub struct TreeScene {
    pub svc: Service,
    pub api: Client,
    pub bed: Testbed,
    pub state: PathBuf,
    _down: Down,
}

impl Drop for TreeScene {
    fn drop(&mut self) {
        if let Some(dir) = self.state.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Starts the service (test settings from [`config`], changed by `tune`) with a fresh state
/// file named after `test`, then brings the tree up under `prefix` behind it. `None` when
/// this machine cannot run the scene (see [`ncp_testbed::ready_or_skip`]: a failure under
/// `CI=true`). Switches speak OpenFlow over TLS with a fresh PKI, the test bed's default
/// (whatever `tune` sets as the controller's TLS is replaced).
pub async fn tree_scene(
    test: &str,
    tools: &[&str],
    prefix: &'static str,
    tune: impl FnOnce(&mut ServiceConfig),
) -> Option<TreeScene> {
    scene_on(&tree(), test, tools, prefix, tune).await
}

/// [`tree_scene`] on `topology`.
pub async fn scene_on(
    topology: &Topology,
    test: &str,
    tools: &[&str],
    prefix: &'static str,
    tune: impl FnOnce(&mut ServiceConfig),
) -> Option<TreeScene> {
    if !ncp_testbed::ready_or_skip(test, tools) {
        return None;
    }
    let state = temp_state(&test.replace(' ', "-"));
    let mut cfg = config(state.clone());
    tune(&mut cfg);
    let _ = Testbed::down(prefix);
    let (tls, ssl) = tls_pki(prefix, &dpids(topology, prefix));
    cfg.server.tls = Some(tls);
    let (svc, api) = start_with(cfg).await;
    let _down = Down(prefix);
    let bed = up_with(
        topology,
        prefix,
        svc.controller().local_addr().port(),
        Some(ssl),
    );
    Some(TreeScene {
        svc,
        api,
        bed,
        state,
        _down,
    })
}

/// [`tree_scene`] with every host pinned and replication 1 ([`h11_to_h21_via_h31`]) added.
pub async fn tree_scene_replicating(
    test: &str,
    tools: &[&str],
    prefix: &'static str,
) -> Option<(TreeScene, ReplicationSpec)> {
    let scene = tree_scene(test, tools, prefix, |_| {}).await?;
    pin_all(&scene.api, &scene.bed).await;
    let r = h11_to_h21_via_h31(&scene.bed);
    add_replication(&scene.api, &r).await;
    Some((scene, r))
}

/// Pins every host of the test bed where it is attached.
pub async fn pin_all(api: &Client, bed: &Testbed) {
    for h in &bed.topology().hosts {
        for i in &h.interfaces {
            let port = bed
                .ofport(&i.switch, &format!("{}:{}", h.name, i.name))
                .expect("port");
            let spec = HostSpec {
                ip: i.address,
                mac: MacAddr(i.mac.0).to_string(),
                dpid: bed.dpid(&i.switch).expect("dpid"),
                port: u32::from(port),
            };
            let r = call(api, "PUT", "/v1/hosts", Some(to_json(&spec))).await;
            assert_eq!(r.status, 204, "{}", r.body);
        }
    }
}

/// Polls `check` every 100 ms until it returns `Some`, or fails after `limit` with `what`.
pub async fn wait_for<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let t0 = Instant::now();
    loop {
        if let Some(v) = check().await {
            return (v, t0.elapsed());
        }
        assert!(t0.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The API's entry for replication `id`.
pub async fn replication(api: &Client, id: u32) -> Value {
    let list = get_json(api, "/v1/replications").await;
    list.as_array()
        .and_then(|a| a.iter().find(|r| r["id"] == id))
        .cloned()
        .unwrap_or(Value::Null)
}

/// Waits until replication `id` reports `installed == want`.
pub async fn wait_installed(api: &Client, id: u32, want: bool, limit: Duration) -> Value {
    let what = format!("replication {id} installed={want}");
    wait_for(limit, &what, || async {
        let r = replication(api, id).await;
        (r["installed"] == want).then_some(r)
    })
    .await
    .0
}

/// Waits until replication `id` is not installed and its error says `why`.
pub async fn wait_not_installed(api: &Client, id: u32, why: &str, limit: Duration) -> Value {
    let what = format!("replication {id} not installed: {why}");
    wait_for(limit, &what, || async {
        let r = replication(api, id).await;
        (r["installed"] == false && r["error"].as_str().is_some_and(|e| e.contains(why)))
            .then_some(r)
    })
    .await
    .0
}

/// Waits until LLDP discovery knows all six links of the tree.
pub async fn wait_links(api: &Client, limit: Duration) {
    wait_for(limit, "six links discovered", || async {
        let t = get_json(api, "/v1/topology").await;
        (t["links"].as_array().map(Vec::len) == Some(6)).then_some(())
    })
    .await;
}

/// Where the topology view `topo` says the learned host `ip` is: (dpid, port).
pub fn learned_at(topo: &Value, ip: &str) -> Option<(u64, u64)> {
    topo["learned"]
        .as_array()?
        .iter()
        .find(|h| h["ip"] == ip)
        .and_then(|h| Some((h["dpid"].as_u64()?, h["port"].as_u64()?)))
}

/// Where host `host` of the test bed is attached: (dpid of `switch`, its port there).
pub fn attached(bed: &Testbed, host: &str, switch: &str) -> (u64, u64) {
    (
        bed.dpid(switch).expect("dpid"),
        u64::from(bed.ofport(switch, &format!("{host}:eth0")).expect("port")),
    )
}

/// Whether the audit log has an entry by the controller containing every one of `words`.
pub fn audited(audit: &Value, words: &[&str]) -> bool {
    audit.as_array().is_some_and(|a| {
        a.iter().any(|e| {
            e["who"] == "controller"
                && e["what"]
                    .as_str()
                    .is_some_and(|w| words.iter().all(|x| w.contains(x)))
        })
    })
}

/// NCP rules on a switch, read through the controller.
pub async fn ncp_rules(svc: &Service, dpid: Dpid) -> Vec<FlowRule> {
    match svc
        .controller()
        .flow_stats(dpid, FlowStatsRequest::by_cookie(0, 0))
        .await
    {
        Ok(stats) => stats
            .iter()
            .map(|s| FlowRule::from_stats(dpid, s))
            .filter(|r| is_ncp_cookie(r.cookie))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Runs a command that must succeed; returns its standard output.
pub fn sh(argv: &[&str]) -> String {
    ncp_testbed::cmd::stdout(argv).unwrap_or_else(|e| panic!("{e}"))
}

/// Adds a rule to a bridge behind the controller's back, as an operator would.
pub fn add_flow(bridge: &str, flow: &str) {
    sh(&["ovs-ofctl", "-O", "OpenFlow13", "add-flow", bridge, flow]);
}

/// Deletes the rule of a bridge with exactly this match and priority (one that
/// [`add_flow`] added).
pub fn del_flow(bridge: &str, matched: &str) {
    sh(&[
        "ovs-ofctl",
        "-O",
        "OpenFlow13",
        "del-flows",
        "--strict",
        bridge,
        matched,
    ]);
}

/// `ovs-ofctl dump-flows` of a bridge, one flow per line, without the counters that
/// change with traffic and time.
pub fn dump_flows(bridge: &str) -> Vec<String> {
    let out = sh(&[
        "ovs-ofctl",
        "-O",
        "OpenFlow13",
        "--no-stats",
        "dump-flows",
        bridge,
    ]);
    let mut v: Vec<String> = out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("OFPST_FLOW") && !l.contains("reply"))
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// A fake middlebox control socket at `dir/<name>.sock`: on every connection it reads one
/// request line and writes back the line `answer` makes of it, or, for `None`, keeps the
/// connection open without a word (a middlebox that hangs). Returns the `unix:` control
/// address to register.
pub fn fake_control_socket(
    dir: &Path,
    name: &str,
    answer: impl Fn(String) -> Option<String> + Send + Sync + 'static,
) -> String {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

    std::fs::create_dir_all(dir).expect("dir");
    let path = dir.join(format!("{name}.sock"));
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path).expect("bind fake middlebox");
    let answer = std::sync::Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let (rd, mut wr) = stream.into_split();
                let mut line = String::new();
                if BufReader::new(rd).read_line(&mut line).await.is_err() {
                    return;
                }
                match answer(line) {
                    Some(reply) => {
                        let _ = wr.write_all(format!("{reply}\n").as_bytes()).await;
                    }
                    None => std::future::pending::<()>().await,
                }
            });
        }
    });
    format!("unix:{}", path.display())
}
