//! The paper test bed steered toward the middlebox, with a middlebox of either data plane:
//! the scene every replication test starts from, written once and instantiated per
//! [`Mode`].

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use ncp_dataplane::{
    config::Config,
    control::{self, Request, Response},
    driver::consistency::ReplicaConsistency,
    sockets::{self, SocketsStats, StatsHandle},
};
use ncp_testbed::{Testbed, Topology, UpOptions};

use super::{MIDDLEBOX, PATIENCE, ReplicationStats, XdpMiddlebox, in_netns, redis};

/// Which data plane carries the sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The sockets relay, on a thread of this process moved into the middlebox's
    /// namespace (so its final counters can be read after it stopped).
    Sockets,
    /// `ncp-middlebox run` in XDP mode, a process in the middlebox's namespace.
    Xdp,
}

impl Mode {
    /// How test output names the mode.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Sockets => "sockets",
            Mode::Xdp => "xdp",
        }
    }

    /// Tools the mode needs on top of the ones a test names: sockets mode redirects with
    /// nftables.
    pub fn tools(self, named: &[&'static str]) -> Vec<&'static str> {
        let mut tools = named.to_vec();
        if self == Mode::Sockets {
            tools.push("nft");
        }
        tools
    }

    /// `ncp_testbed::ready_or_skip` for a test of this mode named `what`.
    pub fn ready_or_skip(self, what: &str, tools: &[&'static str]) -> bool {
        ncp_testbed::ready_or_skip(&format!("{} {what}", self.name()), &self.tools(tools))
    }
}

/// The running middlebox of a [`Scene`].
enum Middlebox {
    Sockets {
        stop: Arc<AtomicBool>,
        stats: StatsHandle,
        thread: JoinHandle<anyhow::Result<()>>,
    },
    Xdp(XdpMiddlebox),
}

/// What the tests read from either data plane's counters: XDP mode's as they are, sockets
/// mode's in the same shape (see [`sockets_counters`]).
pub type Counters = ReplicationStats;

/// Sockets mode's counters as [`Counters`]: its lingering sockets are the lingering
/// connections, and it has no per-worker views.
fn sockets_counters(s: SocketsStats) -> Counters {
    ReplicationStats {
        workers: s.workers,
        counters: s.counters,
        lingering_connections: s.lingering_sockets,
        services: s.services,
        per_worker: Vec::new(),
    }
}

/// One service of a scene's middlebox configuration.
#[derive(Clone, Debug)]
pub struct Service {
    pub name: &'static str,
    pub port: u16,
    /// `replica_budget_bytes`, when the service sets one.
    pub replica_budget: Option<u64>,
    /// Whether the service has the replica (without: the middlebox as a plain proxy, the
    /// paper's "no replication" baseline).
    pub replicated: bool,
    /// The TOML of its `record` field, or empty for none.
    pub record: String,
    /// Whether the replica's answers are verified (`verify = "replies"`).
    pub verify_replies: bool,
    /// `spill_dir` and `spill_budget_bytes`, when the replica spills.
    pub spill: Option<(PathBuf, u64)>,
    /// More TOML lines of the service's table (e.g. `protocol`, `credentials`).
    pub toml: String,
}

impl Service {
    /// A service on `port` replicated to the replica's replication-network address.
    pub fn new(name: &'static str, port: u16) -> Self {
        Self {
            name,
            port,
            replica_budget: None,
            replicated: true,
            record: String::new(),
            verify_replies: false,
            spill: None,
            toml: String::new(),
        }
    }

    /// Adds TOML lines to the service's table.
    pub fn with_toml(mut self, lines: &str) -> Self {
        self.toml.push_str(lines);
        self.toml.push('\n');
        self
    }

    /// The service compares the replica's answers with the primary's.
    pub fn verify_replies(mut self) -> Self {
        self.verify_replies = true;
        self
    }

    /// A replica beyond its budget spills to `dir`, at most `budget` bytes per session.
    pub fn spill(mut self, dir: &Path, budget: u64) -> Self {
        self.spill = Some((dir.to_path_buf(), budget));
        self
    }

    pub fn budget(mut self, bytes: u64) -> Self {
        self.replica_budget = Some(bytes);
        self
    }
}

/// The paper test bed with the steering toward the middlebox, and at most one middlebox
/// at a time; everything (middlebox, children, namespaces, bridges, the scene's
/// directory) goes on drop.
pub struct Scene {
    pub bed: Testbed,
    pub prefix: &'static str,
    pub mode: Mode,
    /// Configuration file and control socket of the XDP middlebox, recordings.
    pub dir: PathBuf,
    middlebox: Option<Middlebox>,
    /// Processes started with [`Scene::spawn`], in order.
    pub children: Vec<Child>,
    pub primary: Ipv4Addr,
    /// The replica's replication-network address.
    pub replica: Ipv4Addr,
    /// Queues (and XDP workers) on each of the middlebox's NICs.
    pub queues: u16,
}

impl Scene {
    /// The bed and the steering, then the middlebox serving `services`, its configuration
    /// with `extra` top-level lines.
    pub fn start(mode: Mode, prefix: &'static str, services: &[Service], extra: &str) -> Scene {
        let mut scene = Scene::network(mode, prefix, 1);
        let config = scene.config(services, extra);
        scene.start_middlebox(&config);
        scene
    }

    /// The test bed with `queues` queues on both middlebox NICs, and the steering toward
    /// the middlebox; no middlebox yet.
    pub fn network(mode: Mode, prefix: &'static str, queues: u16) -> Scene {
        let bed = paper_bed(prefix, queues);
        let primary = bed.address("primary", "eth0").unwrap();
        let replica = bed.address("replica", "eth1").unwrap();
        let dir = std::env::temp_dir().join(format!(
            "ncp-scene-{prefix}-{}-{}",
            mode.name(),
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let scene = Scene {
            bed,
            prefix,
            mode,
            dir,
            middlebox: None,
            children: Vec::new(),
            primary,
            replica,
            queues,
        };
        steer_to_middlebox(&scene.bed, primary);
        // The userspace datapath needs a moment after the ports appear.
        let mb0 = scene.bed.address("middlebox", "eth0").unwrap();
        scene.ping("source", mb0);
        scene.ping("middlebox", primary);
        scene.ping("middlebox", replica);
        scene
    }

    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("mb.sock")
    }

    /// The configuration (TOML) of `services`, with `extra` top-level lines. The same
    /// file serves both modes: the sockets relay ignores the owned ports and the control
    /// socket, XDP mode uses them (ports below the kernel's ephemeral range, so the kernel
    /// never picks them).
    pub fn config(&self, services: &[Service], extra: &str) -> String {
        let address = |host: &str, iface: &str| self.bed.address(host, iface).unwrap();
        let (mb0, mb1) = (address("middlebox", "eth0"), address("middlebox", "eth1"));
        let queues = (0..self.queues)
            .map(|q| format!("{{ queue = {q} }}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut text = format!(
            r#"
control_socket = "{socket}"
{extra}

[[interfaces]]
name = "eth0"
address = "{mb0}"
ports = {{ first = 20000, last = 29999 }}
queues = [{queues}]

[[interfaces]]
name = "eth1"
address = "{mb1}"
ports = {{ first = 20000, last = 29999 }}
queues = [{queues}]
"#,
            socket = self.control_socket().display(),
        );
        for s in services {
            let replicas = if s.replicated {
                format!("replicas = [\"{}:{}\"]", self.replica, s.port)
            } else {
                String::new()
            };
            let budget = s
                .replica_budget
                .map(|b| format!("replica_budget_bytes = {b}"))
                .unwrap_or_default();
            text.push_str(&format!(
                r#"
[[services]]
name = "{name}"
primary = "{primary}:{port}"
clients = "198.18.1.0/24"
{replicas}
replica_interface = "eth1"
{budget}
connect_timeout_secs = 5
{verify}
{spill}
{record}
{toml}
"#,
                name = s.name,
                primary = self.primary,
                port = s.port,
                verify = if s.verify_replies {
                    "verify = \"replies\""
                } else {
                    ""
                },
                record = s.record,
                toml = s.toml,
                spill = s
                    .spill
                    .as_ref()
                    .map(|(dir, budget)| format!(
                        "spill_dir = \"{}\"\nspill_budget_bytes = {budget}",
                        dir.display()
                    ))
                    .unwrap_or_default(),
            ));
        }
        text
    }

    /// Starts the middlebox with `config` (see [`Scene::config`]) in the scene's mode and
    /// waits until its workers are up (and, in sockets mode, its redirect).
    pub fn start_middlebox(&mut self, config: &str) {
        assert!(self.middlebox.is_none(), "one middlebox at a time");
        match self.mode {
            Mode::Sockets => {
                let config = Config::parse(config).unwrap();
                let stop = Arc::new(AtomicBool::new(false));
                let stats = StatsHandle::new();
                let (flag, handle) = (Arc::clone(&stop), stats.clone());
                let netns = self.bed.netns("middlebox").unwrap();
                let thread = in_netns(&netns, move || sockets::run(&config, flag, &handle));
                self.middlebox = Some(Middlebox::Sockets {
                    stop,
                    stats,
                    thread,
                });
                let deadline = Instant::now() + PATIENCE;
                while !self.nft_table_present() || self.stats().workers == 0 {
                    let exited = matches!(&self.middlebox,
                        Some(Middlebox::Sockets { thread, .. }) if thread.is_finished());
                    if exited {
                        // Joining it reports its error.
                        self.stop_middlebox();
                        panic!("relay exited at start");
                    }
                    assert!(Instant::now() < deadline, "relay did not come up");
                    thread::sleep(Duration::from_millis(50));
                }
            }
            Mode::Xdp => {
                let file = self.dir.join("mb.toml");
                std::fs::write(&file, config).unwrap();
                let started = XdpMiddlebox::start(&self.bed, &file, &self.control_socket());
                self.middlebox = Some(Middlebox::Xdp(started));
            }
        }
    }

    /// Stops the middlebox (its recorders flush and close their files) and checks that
    /// it stopped cleanly (sockets mode: and removed its nftables table).
    pub fn stop_middlebox(&mut self) {
        match self.middlebox.take() {
            Some(Middlebox::Sockets { stop, thread, .. }) => {
                stop.store(true, Ordering::Relaxed);
                thread.join().unwrap().unwrap();
                assert!(!self.nft_table_present(), "nftables table left after stop");
            }
            Some(Middlebox::Xdp(middlebox)) => middlebox.stop(),
            None => {}
        }
    }

    /// The XDP middlebox's process id.
    pub fn middlebox_pid(&self) -> u32 {
        match &self.middlebox {
            Some(Middlebox::Xdp(middlebox)) => middlebox.pid(),
            _ => panic!("no XDP middlebox process in this scene"),
        }
    }

    pub fn nft_table_present(&self) -> bool {
        self.bed
            .exec("middlebox", &["nft", "list", "table", "ip", "ncp_sockets"])
            .is_ok()
    }

    /// The running middlebox's counters (all zero while it does not answer).
    pub fn stats(&self) -> Counters {
        match &self.middlebox {
            Some(Middlebox::Sockets { stats, .. }) => Some(sockets_counters(stats.snapshot())),
            Some(Middlebox::Xdp(middlebox)) => middlebox.stats(),
            None => None,
        }
        .unwrap_or_default()
    }

    /// The running middlebox's consistency state per service and replica (empty while it
    /// does not answer); XDP mode's through its control socket.
    pub fn consistency(&self) -> Vec<ReplicaConsistency> {
        match &self.middlebox {
            Some(Middlebox::Sockets { stats, .. }) => stats.consistency().report(),
            Some(Middlebox::Xdp(_)) => match control::call(&self.control_socket(), &Request::Stats)
            {
                Ok(Response::Stats(s)) => s.consistency,
                _ => Vec::new(),
            },
            None => Vec::new(),
        }
    }

    /// The consistency of the service's (first) replica once `done` holds, failing after
    /// [`PATIENCE`].
    pub fn consistency_when(
        &self,
        what: &str,
        done: impl Fn(&ReplicaConsistency) -> bool,
    ) -> ReplicaConsistency {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let all = self.consistency();
            if let Some(r) = all.iter().find(|r| done(r)) {
                return r.clone();
            }
            assert!(Instant::now() < deadline, "{what}: {all:#?}");
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// An operator marks `replica` of `service` in step: XDP mode with
    /// `ncp-middlebox replica reset` on the control socket, sockets mode (no control
    /// socket in the test's relay) on the shared book directly.
    pub fn reset_replica(&self, service: &str, replica: SocketAddrV4) {
        match &self.middlebox {
            Some(Middlebox::Sockets { stats, .. }) => {
                stats.consistency().reset(service, replica).unwrap();
            }
            Some(Middlebox::Xdp(_)) => {
                let out = Command::new(MIDDLEBOX)
                    .args(["replica", "reset", "--service", service, "--replica"])
                    .arg(replica.to_string())
                    .arg("--socket")
                    .arg(self.control_socket())
                    .output()
                    .unwrap();
                assert!(out.status.success(), "replica reset: {out:?}");
            }
            None => panic!("no middlebox to reset a replica on"),
        }
    }

    /// Stats once `done` holds, failing after [`PATIENCE`].
    pub fn stats_when(&self, what: &str, done: impl Fn(&Counters) -> bool) -> Counters {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let s = self.stats();
            if s.workers > 0 && done(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "{what}: {s:#?}");
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn ping(&self, host: &str, to: Ipv4Addr) {
        ping(&self.bed, host, to);
    }

    /// Starts `argv` in `host`, killed on drop; returns its index for [`Scene::kill`].
    pub fn spawn(&mut self, host: &str, argv: &[&str]) -> usize {
        let child = self
            .bed
            .command(host, argv)
            .unwrap()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(child);
        self.children.len() - 1
    }

    /// Kills one child started with [`Scene::spawn`] (by its pid, via `Child::kill`).
    pub fn kill(&mut self, index: usize) {
        let child = &mut self.children[index];
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Waits until something listens on `port` in `host`.
    pub fn wait_listening(&self, host: &str, port: u16) {
        wait_listening(&self.bed, host, port);
    }

    /// A redis with nothing persisted and `DEBUG` allowed from its own host.
    pub fn start_redis(&mut self, host: &str) -> usize {
        let argv = redis::server_argv();
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let index = self.spawn(host, &argv);
        redis::wait_ready(&self.bed, host);
        index
    }

    /// One redis command against the server on `host` itself (not through the middlebox).
    pub fn redis(&self, host: &str, args: &[&str]) -> String {
        redis::cli(&self.bed, host, args)
    }

    /// `redis-cli --pipe` from the source to the primary's address: through the middlebox.
    pub fn pipe_command(&self) -> Command {
        redis::pipe_from_source(&self.bed, self.primary)
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        match self.middlebox.take() {
            Some(Middlebox::Sockets { stop, thread, .. }) => {
                stop.store(true, Ordering::Relaxed);
                let _ = thread.join();
            }
            Some(Middlebox::Xdp(middlebox)) => drop(middlebox),
            None => {}
        }
        for child in &mut self.children {
            // A stopped child must be resumed to die of SIGKILL promptly; harmless else.
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: kill(2) on a child we started.
                unsafe { libc::kill(pid, libc::SIGCONT) };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Err(e) = Testbed::down(self.prefix) {
            eprintln!("test bed teardown failed: {e}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The paper's test bed (testbed/paper.toml) under `prefix`, with `queues` queues on both
/// middlebox NICs; what an earlier run left under that prefix is removed first.
pub fn paper_bed(prefix: &str, queues: u16) -> Testbed {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testbed/paper.toml");
    let mut text = std::fs::read_to_string(path).unwrap();
    if queues > 1 {
        // Every middlebox NIC (their MACs end in :04) gets the queues.
        for mac in ["02:00:c6:12:01:04", "02:00:c6:12:02:04"] {
            let line = format!("mac = \"{mac}\"");
            text = text.replace(&line, &format!("{line}\nqueues = {queues}"));
        }
    }
    let topology = Topology::parse(&text).unwrap();
    let _ = Testbed::down(prefix);
    Testbed::up(&topology, &UpOptions::with_prefix(prefix)).unwrap()
}

/// The network's part of the scene: frames for the primary leave the source toward the
/// middlebox's production NIC (the controller's redirect rule in production).
pub fn steer_to_middlebox(bed: &Testbed, primary: Ipv4Addr) {
    let mac = bed.mac("middlebox", "eth0").unwrap();
    let mac = mac.map(|b| format!("{b:02x}")).join(":");
    let primary = primary.to_string();
    bed.exec(
        "source",
        &[
            "ip",
            "neigh",
            "replace",
            &primary,
            "lladdr",
            &mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    )
    .unwrap();
}

/// Waits until `host` can ping `to` (the userspace datapath needs a moment after the
/// ports appear); fails after 20 s.
pub fn ping(bed: &Testbed, host: &str, to: Ipv4Addr) {
    let to = to.to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = bed.exec(host, &["ping", "-c", "1", "-W", "1", &to]) {
        assert!(Instant::now() < deadline, "{host} cannot ping {to}: {e}");
        thread::sleep(Duration::from_millis(200));
    }
}

/// Waits (at most 20 s) until something listens on `port` in `host`.
pub fn wait_listening(bed: &Testbed, host: &str, port: u16) {
    bed.wait_listening(host, port, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Polls `done` until it holds; fails the test with `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(50));
    }
}
