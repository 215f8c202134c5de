//! Integration tests against real namespaces and Open vSwitch. They need root and the OVS
//! tools; see `ncp_testbed::ready_or_skip` for the skip rule (with CI=true a missing piece
//! fails the test instead of skipping it).
//!
//! Each test uses its own prefix (nt1, nt2, ...) so they never touch each other's objects, but
//! they are also serialised with one mutex: on a 2-core machine the OVS userspace datapath
//! is slow enough under parallel load that ping and iperf timings would get flaky.

use std::net::{Ipv4Addr, TcpListener};
use std::process::{Child, Command};
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

use ncp_testbed::{Mac, Testbed, Topology, UpOptions};

/// Takes the serialising lock and sets up logging.
fn serial() -> MutexGuard<'static, ()> {
    ncp_testbed::serial("ncp_testbed=info")
}

/// Brings the prefix down when dropped, so a failing assertion leaves nothing behind.
struct Cleanup(&'static str);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Err(e) = Testbed::down(self.0) {
            eprintln!("cleanup of {} failed: {e}", self.0);
        }
    }
}

/// A running test's hold on the test bed: the prefix is brought down before the lock is
/// released (fields drop in declaration order).
struct Scene {
    _cleanup: Cleanup,
    _serial: MutexGuard<'static, ()>,
}

/// The start of every test: `None` when something it needs is missing (the test skips; in
/// CI it fails instead), else the serialising lock and the clean-up of `prefix`.
fn begin(name: &str, tools: &[&str], prefix: &'static str) -> Option<Scene> {
    if !ncp_testbed::ready_or_skip(name, tools) {
        return None;
    }
    let serial = serial();
    Some(Scene {
        _cleanup: Cleanup(prefix),
        _serial: serial,
    })
}

fn topology(file: &str) -> Topology {
    let path = format!("{}/{file}", env!("CARGO_MANIFEST_DIR"));
    Topology::load(&path).expect("shipped topology loads")
}

/// Brings up the shipped topology `file` under `prefix`.
fn up(file: &str, prefix: &str) -> Testbed {
    Testbed::up(&topology(file), &UpOptions::with_prefix(prefix)).expect("up")
}

fn stdout(argv: &[&str]) -> String {
    ncp_testbed::cmd::stdout(argv).unwrap_or_else(|e| panic!("{e}"))
}

fn ovs_get(table: &str, record: &str, column: &str) -> String {
    stdout(&["ovs-vsctl", "get", table, record, column])
        .trim()
        .trim_matches('"')
        .to_string()
}

/// Pings `to` from `host`, retrying for a bounded time: the userspace datapath needs a
/// moment after the ports appear before it forwards.
fn ping(bed: &Testbed, host: &str, to: Ipv4Addr) {
    let to = to.to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match bed.exec(host, &["ping", "-c", "1", "-W", "1", &to]) {
            Ok(_) => return,
            Err(e) if Instant::now() >= deadline => panic!("{host} cannot ping {to}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Waits for `child` at most `limit`, killing it if it overruns.
fn wait_bounded(child: &mut Child, limit: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// No namespace, interface or bridge with the prefix is left.
fn assert_clean(prefix: &str) {
    let owned = |name: &str| name.starts_with(&format!("{prefix}-"));
    let netns = stdout(&["ip", "netns", "list"]);
    assert!(
        !netns.lines().any(owned),
        "namespaces left for {prefix}: {netns}"
    );
    let links = stdout(&["ip", "-o", "link", "show"]);
    let left: Vec<&str> = links
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .filter(|n| owned(n))
        .collect();
    assert!(left.is_empty(), "interfaces left for {prefix}: {left:?}");
    // If OVS was stopped because this was the last test bed, there are no bridges either.
    if let Ok(out) = Command::new("ovs-vsctl")
        .args(["--timeout=5", "list-br"])
        .output()
        && out.status.success()
    {
        let brs = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(!brs.lines().any(owned), "bridges left for {prefix}: {brs}");
    }
    assert!(
        !std::path::Path::new(&format!("{}/{prefix}.toml", ncp_testbed::STATE_DIR)).exists(),
        "state file left for {prefix}"
    );
}

#[test]
fn paper_topology_pings_both_networks_and_carries_tcp() {
    let prefix = "nt1";
    let Some(_scene) = begin("paper_topology", &["ping", "iperf3"], prefix) else {
        return;
    };
    let bed = up("paper.toml", prefix);

    // Everything the file promises is visible on the system.
    assert_eq!(bed.netns("middlebox").expect("netns"), "nt1-middlebox");
    for host in ["source", "primary", "replica", "middlebox"] {
        for (iface, switch) in [("eth0", "prod"), ("eth1", "repl")] {
            let mac = bed.mac(host, iface).expect("mac");
            let mac = mac.map(|b| format!("{b:02x}")).join(":");
            let link = bed
                .exec(host, &["ip", "-o", "link", "show", iface])
                .expect("link");
            assert!(
                String::from_utf8_lossy(&link.stdout).contains(&mac),
                "{host} {iface} MAC"
            );

            let k = bed.exec(host, &["ethtool", "-k", iface]).expect("ethtool");
            assert!(
                String::from_utf8_lossy(&k.stdout).contains("tx-checksumming: off"),
                "{host} {iface} tx offload"
            );
            let port = bed
                .ofport(switch, &format!("{host}:{iface}"))
                .expect("ofport");
            let root = format!("{prefix}-{switch}-p{port}");
            let k = stdout(&["ethtool", "-k", &root]);
            assert!(k.contains("tx-checksumming: off"), "{root} tx offload");
            assert_eq!(ovs_get("interface", &root, "ofport"), port.to_string());
        }
        let sysctl = |key: &str| {
            let out = bed.exec(host, &["sysctl", "-n", key]).expect("sysctl");
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        assert_eq!(sysctl("net.ipv6.conf.all.disable_ipv6"), "1", "{host} IPv6");
        // The XDP data plane's default upstream ports are the kernel's no more.
        assert_eq!(
            sysctl("net.ipv4.ip_local_reserved_ports"),
            "40000-49999",
            "{host} reserved ports"
        );
        let addrs = bed.exec(host, &["ip", "-6", "-o", "addr"]).expect("ip -6");
        assert!(addrs.stdout.is_empty(), "{host} has IPv6 addresses");
        let lo = bed
            .exec(host, &["ip", "-o", "link", "show", "lo"])
            .expect("lo");
        assert!(
            String::from_utf8_lossy(&lo.stdout).contains("UP"),
            "{host} lo up"
        );
    }
    for (switch, dpid) in [("prod", "0000000000000001"), ("repl", "0000000000000002")] {
        let br = bed.bridge(switch).expect("bridge");
        assert_eq!(ovs_get("bridge", &br, "datapath_type"), "netdev");
        assert_eq!(ovs_get("bridge", &br, "protocols"), "[OpenFlow13]");
        assert_eq!(ovs_get("bridge", &br, "fail_mode"), "standalone");
        assert_eq!(ovs_get("bridge", &br, "other-config:datapath-id"), dpid);
    }

    // A neighbour entry pinned by set_neighbor is permanent and names the given MAC (the
    // primary's own, so traffic still flows as before).
    let primary = bed.address("primary", "eth0").expect("address");
    let primary_mac = Mac(bed.mac("primary", "eth0").expect("mac")).to_string();
    bed.set_neighbor("source", "eth0", primary, &primary_mac)
        .expect("set neighbour");
    let neigh = bed
        .exec("source", &["ip", "neigh", "show", &primary.to_string()])
        .expect("ip neigh");
    let neigh = String::from_utf8_lossy(&neigh.stdout);
    assert!(
        neigh.contains(&primary_mac) && neigh.contains("PERMANENT"),
        "{neigh}"
    );

    // Both networks forward.
    for (iface, dst) in [
        ("eth0", "primary"),
        ("eth1", "replica"),
        ("eth0", "middlebox"),
    ] {
        ping(&bed, "source", bed.address(dst, iface).expect("address"));
    }
    ping(
        &bed,
        "middlebox",
        bed.address("primary", "eth0").expect("address"),
    );
    ping(
        &bed,
        "middlebox",
        bed.address("replica", "eth1").expect("address"),
    );

    // TCP through OVS: a one-second iperf3 run, source -> primary over production.
    let server_ip = bed.address("primary", "eth0").expect("address").to_string();
    let mut server = bed
        .command("primary", &["iperf3", "-s", "-1", "-B", &server_ip])
        .expect("command")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("iperf3 server");
    let deadline = Instant::now() + Duration::from_secs(20);
    let result = loop {
        let mut client = bed
            .command("source", &["iperf3", "-c", &server_ip, "-t", "1"])
            .expect("command")
            .output();
        if let Ok(out) = &mut client
            && out.status.success()
        {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        // The server may not be listening yet.
        assert!(
            Instant::now() < deadline,
            "iperf3 client never succeeded: {client:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(result.contains("receiver"), "iperf3 output: {result}");
    let status = wait_bounded(&mut server, Duration::from_secs(10), "iperf3 server");
    assert!(status.success(), "iperf3 server: {status}");

    let report = Testbed::down(prefix).expect("down");
    assert_eq!(report.namespaces.len(), 4);
    assert_eq!(report.bridges.len(), 2);
    assert_clean(prefix);
}

#[test]
fn second_up_recreates_and_down_ends_processes() {
    let prefix = "nt2";
    let Some(_scene) = begin("second_up", &["ping"], prefix) else {
        return;
    };
    let topo = topology("paper.toml");
    let first = Testbed::up(&topo, &UpOptions::with_prefix(prefix)).expect("first up");
    let mut old = first.spawn("replica", &["sleep", "300"]).expect("sleep");

    // A second up on the same prefix replaces the first one (ending its processes).
    let bed = Testbed::up(&topo, &UpOptions::with_prefix(prefix)).expect("second up");
    wait_bounded(&mut old, Duration::from_secs(5), "process of the first up");
    ping(
        &bed,
        "source",
        bed.address("primary", "eth1").expect("address"),
    );

    // Another process can re-open the test bed from its state file.
    let reopened = Testbed::open(prefix).expect("open");
    assert_eq!(reopened.plan(), bed.plan());

    // down ends what still runs inside, by pid.
    let mut sleeper = bed.spawn("middlebox", &["sleep", "300"]).expect("sleep");
    let pid = sleeper.id() as i32;
    let report = Testbed::down(prefix).expect("down");
    assert!(report.killed.contains(&pid), "{report:?}");
    wait_bounded(&mut sleeper, Duration::from_secs(5), "sleep in a namespace");
    assert_clean(prefix);

    // A second down finds nothing and is not an error.
    let again = Testbed::down(prefix).expect("second down");
    assert!(again.is_empty(), "{again:?}");
}

#[test]
fn down_finds_leftovers_without_a_state_file() {
    let prefix = "nt3";
    let Some(_scene) = begin("crash_recovery", &[], prefix) else {
        return;
    };
    up("tree.toml", prefix);
    // Simulate a crash that lost the state file.
    std::fs::remove_file(format!("{}/{prefix}.toml", ncp_testbed::STATE_DIR))
        .expect("remove state file");
    let report = Testbed::down(prefix).expect("down");
    assert_eq!(report.namespaces.len(), 8, "{report:?}");
    assert_eq!(report.bridges.len(), 7, "{report:?}");
    assert_clean(prefix);
}

#[test]
fn tree_topology_pings_across_subtrees() {
    let prefix = "nt4";
    let Some(_scene) = begin("tree_topology", &["ping"], prefix) else {
        return;
    };
    let bed = up("tree.toml", prefix);

    // OVS assigned the port numbers the plan predicts, for hosts and for switch links.
    for b in &bed.plan().bridges {
        for p in &b.ports {
            assert_eq!(
                ovs_get("interface", &p.ifname, "ofport"),
                p.ofport.to_string()
            );
        }
    }
    assert_eq!(bed.ofport("leaf4", "agg2").expect("uplink"), 3);

    // Same leaf, across one aggregation switch, and across the core.
    for (from, to) in [
        ("h11", "h12"),
        ("h11", "h21"),
        ("h11", "h42"),
        ("h32", "h22"),
    ] {
        ping(&bed, from, bed.address(to, "eth0").expect("address"));
    }
    Testbed::down(prefix).expect("down");
    assert_clean(prefix);
}

#[test]
fn controller_option_sets_secure_mode_and_connects() {
    let prefix = "nt5";
    let Some(_scene) = begin("controller_option", &[], prefix) else {
        return;
    };
    // Our own listener stands in for the controller, so the bridges never reach a
    // controller that someone else runs on this machine.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let options = UpOptions {
        prefix: prefix.to_string(),
        controller_port: Some(port),
        controller_tls: None,
    };
    let bed = Testbed::up(&topology("paper.toml"), &options).expect("up");
    let br = bed.bridge("repl").expect("bridge");
    assert_eq!(ovs_get("bridge", &br, "fail_mode"), "secure");
    assert_eq!(
        stdout(&["ovs-vsctl", "get-controller", &br]).trim(),
        format!("tcp:127.0.0.1:{port}")
    );

    // A bridge connects and opens with an OpenFlow 1.3 HELLO (version byte 0x04).
    listener.set_nonblocking(true).expect("nonblocking");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut conn = loop {
        match listener.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no switch connected");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    conn.set_nonblocking(false).expect("blocking");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut header = [0u8; 8];
    std::io::Read::read_exact(&mut conn, &mut header).expect("hello");
    assert_eq!(header[0], 0x04, "OpenFlow version");
    assert_eq!(header[1], 0, "OFPT_HELLO");
    drop(conn);
    drop(listener);

    Testbed::down(prefix).expect("down");
    assert_clean(prefix);
}

#[test]
fn two_prefixes_coexist_and_down_touches_only_its_own() {
    let (pa, pb) = ("nt6", "nt7");
    let Some(_scene) = begin("two_prefixes", &["ping"], pa) else {
        return;
    };
    let _cleanup_b = Cleanup(pb);
    let topo = topology("paper.toml");
    let a = Testbed::up(&topo, &UpOptions::with_prefix(pa)).expect("up a");
    let b = Testbed::up(&topo, &UpOptions::with_prefix(pb)).expect("up b");
    // Same addresses in both: they live in separate namespaces on separate bridges.
    ping(&a, "source", a.address("primary", "eth0").expect("address"));
    ping(&b, "source", b.address("primary", "eth0").expect("address"));

    let report = Testbed::down(pa).expect("down a");
    assert!(
        !report.ovs_stopped,
        "OVS must keep running while {pb} is up"
    );
    assert_clean(pa);
    // The other test bed is untouched and still forwards.
    ping(
        &b,
        "replica",
        b.address("middlebox", "eth1").expect("address"),
    );
    assert_eq!(
        stdout(&["ip", "netns", "list"])
            .lines()
            .filter(|l| l.starts_with("nt7-"))
            .count(),
        4
    );
    Testbed::down(pb).expect("down b");
    assert_clean(pb);
}
