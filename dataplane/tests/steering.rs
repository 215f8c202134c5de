//! Privileged integration tests of XDP steering on the paper's test bed (Open vSwitch
//! bridges and network namespaces): the middlebox runs in its namespace, the source host
//! sends real and generated traffic through the production switch.
//!
//! These need root, Open vSwitch and XDP. When they are missing the tests print why and
//! return, except under CI=true, where that is a failure.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step should fail the test"
)]

mod support;

use support::{
    XdpMiddlebox, one_nic_config,
    scene::{paper_bed, steer_to_middlebox, wait_listening, wait_until},
};

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use ncp_dataplane::{
    control::{self, Request, Response, Stats},
    frame::Malformation,
};
use ncp_testbed::Testbed;

const PKTGEN: &str = env!("CARGO_BIN_EXE_ncp-pktgen");
const SERVICE_PORT: u16 = 5201;

/// Runs `argv` in `host` and returns its output whatever the exit status.
fn unchecked(bed: &Testbed, host: &str, argv: &[&str]) -> std::io::Result<std::process::Output> {
    bed.command(host, argv)
        .map_err(std::io::Error::other)?
        .stdin(Stdio::null())
        .output()
}

/// Runs `argv` in `host` and fails the test, showing its output, unless it succeeds.
fn run_ok(bed: &Testbed, host: &str, argv: &[&str], what: &str) {
    let out = unchecked(bed, host, argv).unwrap();
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A run-time rule steering TCP from `source` to the primary's `port`.
fn rule_to(id: u32, source: &str, primary: Ipv4Addr, port: u16) -> Request {
    Request::RuleAdd {
        rule: ncp_dataplane::rules::RedirectRule {
            id,
            source: source.parse().unwrap(),
            source_port: None,
            destination: primary,
            destination_port: port,
        },
    }
}

/// Skips (or, under CI, fails) when the machine cannot run these tests.
fn privileged() -> bool {
    match ncp_testbed::require_privileges() {
        Ok(()) => true,
        Err(missing) => {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(!ci, "CI=true but the steering tests cannot run: {missing}");
            eprintln!("skipped: {missing}");
            false
        }
    }
}

/// The paper test bed plus a running middlebox on its production NIC; torn down on drop.
struct Scene {
    bed: Testbed,
    prefix: String,
    middlebox: Option<XdpMiddlebox>,
    socket: PathBuf,
    config: PathBuf,
    source_ip: Ipv4Addr,
    primary_ip: Ipv4Addr,
    middlebox_ip: Ipv4Addr,
    middlebox_mac: String,
}

impl Scene {
    /// The scene on `prefix`, or `None` (having said why) on a machine without the
    /// privileges; under CI=true their absence fails the test instead (see [`privileged`]).
    fn if_privileged(prefix: &str) -> Option<Scene> {
        privileged().then(|| Scene::start(prefix, ""))
    }

    /// The scene, its interface's TOML table with `interface_lines` added.
    fn start(prefix: &str, interface_lines: &str) -> Scene {
        let bed = paper_bed(prefix, 1);
        let source_ip = bed.address("source", "eth0").unwrap();
        let primary_ip = bed.address("primary", "eth0").unwrap();
        let middlebox_ip = bed.address("middlebox", "eth0").unwrap();
        let mac = bed.mac("middlebox", "eth0").unwrap();
        let middlebox_mac = mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let dir = std::env::temp_dir().join(format!("ncp-steering-{prefix}"));
        let rules = format!(
            r#"
[[rules]]
id = 1
source = "{source_ip}/32"
destination = "{primary_ip}"
destination_port = {SERVICE_PORT}
"#
        );
        let (config, socket) = one_nic_config(&dir, middlebox_ip, interface_lines, &rules);
        let mut scene = Scene {
            bed,
            prefix: prefix.to_owned(),
            middlebox: None,
            socket,
            config,
            source_ip,
            primary_ip,
            middlebox_ip,
            middlebox_mac,
        };
        scene.start_middlebox();
        scene
    }

    fn start_middlebox(&mut self) {
        self.middlebox = Some(XdpMiddlebox::start_answering(
            &self.bed,
            &self.config,
            &self.socket,
        ));
    }

    /// Pings the middlebox's own address from the source (`count` echoes, answered by
    /// the kernel since no rule matches ICMP).
    fn ping_middlebox(&self, count: u32, what: &str) {
        let mb = self.middlebox_ip.to_string();
        let count = count.to_string();
        let argv = ["ping", "-c", &count, "-i", "0.2", "-W", "2", &mb];
        run_ok(&self.bed, "source", &argv, what);
    }

    fn stats(&self) -> Stats {
        match control::call(&self.socket, &Request::Stats).expect("stats") {
            Response::Stats(s) => s,
            other => panic!("unexpected answer {other:?}"),
        }
    }

    /// Stats once `done` holds; fails after 10 s.
    fn stats_when(&self, what: &str, done: impl Fn(&Stats) -> bool) -> Stats {
        let mut last = None;
        wait_until(what, Duration::from_secs(10), || {
            let s = self.stats();
            let ok = done(&s);
            last = Some(s);
            ok
        });
        last.unwrap()
    }

    fn request(&self, request: Request) -> Response {
        control::call(&self.socket, &request).expect("control request")
    }

    /// Sends `count` generated frames from the source to the middlebox's MAC.
    fn pktgen(
        &self,
        dst: Ipv4Addr,
        port: u16,
        count: u64,
        malformed: Option<Malformation>,
    ) -> std::process::Output {
        let count = count.to_string();
        let port = port.to_string();
        let src = self.source_ip.to_string();
        let dst = dst.to_string();
        let mut argv = vec![
            PKTGEN,
            "--interface",
            "eth0",
            "--dst-mac",
            &self.middlebox_mac,
            "--src-ip",
            &src,
            "--dst-ip",
            &dst,
            "--dst-port",
            &port,
            "--count",
            &count,
            // OVS's userspace datapath drops bursts it cannot keep up with; a steady
            // rate lets every frame through so the counts can be compared exactly.
            "--rate",
            "10000",
        ];
        let kind;
        if let Some(m) = malformed {
            kind = serde_json::to_value(m)
                .unwrap()
                .as_str()
                .unwrap()
                .to_owned();
            argv.extend(["--malformed", kind.as_str()]);
        }
        unchecked(&self.bed, "source", &argv).expect("pktgen runs")
    }

    fn pktgen_ok(&self, dst: Ipv4Addr, port: u16, count: u64) {
        let out = self.pktgen(dst, port, count, None);
        assert!(
            out.status.success(),
            "pktgen failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Waits until the workers have taken every redirected frame, then returns the stats.
    fn settled_stats(&self, min_redirected: u64) -> Stats {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.stats();
            let redirected = s.interfaces[0].xdp.redirected;
            let taken: u64 = s.workers.iter().map(|w| w.rx_frames).sum();
            if redirected >= min_redirected && taken == redirected {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "workers took {taken} frames, XDP redirected {redirected} (wanted at least {min_redirected}): {s:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn xdp_attached(&self) -> bool {
        let out = self
            .bed
            .exec("middlebox", &["ip", "-d", "link", "show", "dev", "eth0"])
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
    }

    fn stop_middlebox(&mut self, signal: i32) -> std::process::ExitStatus {
        self.middlebox
            .take()
            .expect("middlebox running")
            .stop_with(signal)
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        drop(self.middlebox.take());
        if let Err(e) = Testbed::down(&self.prefix) {
            eprintln!("test bed teardown failed: {e}");
        }
        if let Some(dir) = self.config.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[test]
fn matching_flow_reaches_the_af_xdp_ring_and_counts_agree() {
    let Some(scene) = Scene::if_privileged("nsa") else {
        return;
    };
    scene.pktgen_ok(scene.primary_ip, SERVICE_PORT, 5000);
    let stats = scene.settled_stats(5000);
    assert_eq!(stats.interfaces[0].xdp.redirected, 5000, "{stats:?}");
    assert_eq!(stats.interfaces[0].xdp.no_socket, 0);
    assert_eq!(stats.interfaces[0].xdp.redirect_failed, 0);

    // Real TCP from the source's kernel: its SYNs, sent to the primary's address but to the
    // middlebox's MAC (as the switch rule will do later), are redirected too.
    let before = stats.interfaces[0].xdp.redirected;
    steer_to_middlebox(&scene.bed, scene.primary_ip);
    let primary = scene.primary_ip.to_string();
    let target = format!("TCP:{primary}:{SERVICE_PORT},connect-timeout=1");
    let _ = unchecked(
        &scene.bed,
        "source",
        &["socat", "-u", "OPEN:/dev/null", &target],
    );
    let after = scene.settled_stats(before + 1);
    assert!(
        after.interfaces[0].xdp.redirected > before,
        "the SYN was not redirected: {after:?}"
    );
}

/// `zero_copy = true` on a driver without AF_XDP zero-copy (veth): the middlebox falls
/// back to copy mode, says so in its stats, and steers as before.
#[test]
fn zero_copy_on_veth_falls_back_to_copy_mode_and_still_steers() {
    if !privileged() {
        return;
    }
    let scene = Scene::start("nsz", "zero_copy = true");
    scene.pktgen_ok(scene.primary_ip, SERVICE_PORT, 1000);
    let stats = scene.settled_stats(1000);
    assert_eq!(stats.interfaces[0].xdp.redirected, 1000, "{stats:?}");
    assert!(!stats.workers.is_empty());
    assert!(
        stats.workers.iter().all(|w| !w.zero_copy),
        "veth has no zero-copy AF_XDP: {stats:?}"
    );
}

#[test]
fn unmatched_traffic_still_works_through_the_kernel() {
    let Some(scene) = Scene::if_privileged("nsb") else {
        return;
    };
    scene.ping_middlebox(3, "ping through the kernel");
    let mb = scene.middlebox_ip.to_string();

    let mut server = scene
        .bed
        .spawn("middlebox", &["iperf3", "-s", "-p", "5301"])
        .unwrap();
    wait_listening(&scene.bed, "middlebox", 5301);
    let iperf = ["iperf3", "-c", &mb, "-p", "5301", "-t", "1"];
    run_ok(
        &scene.bed,
        "source",
        &[&iperf[..], &["--connect-timeout", "3000"][..]].concat(),
        "TCP to another port",
    );
    run_ok(
        &scene.bed,
        "source",
        &[&iperf[..], &["-u", "-b", "10M"][..]].concat(),
        "UDP",
    );
    let _ = server.kill();
    let _ = server.wait();

    let stats = scene.stats();
    assert_eq!(
        stats.interfaces[0].xdp.redirected, 0,
        "nothing here matches a rule: {stats:?}"
    );
    assert!(
        stats.interfaces[0].xdp.passed > 100,
        "the kernel's traffic was counted as passed: {stats:?}"
    );
}

#[test]
fn rules_change_at_run_time_without_reloading() {
    let Some(scene) = Scene::if_privileged("nsc") else {
        return;
    };
    let port = 6000;
    let passed = scene.stats().interfaces[0].xdp.passed;
    scene.pktgen_ok(scene.primary_ip, port, 200);
    // Once the program has passed all 200 frames, none of them can still be redirected.
    let s0 = scene.stats_when("the frames without a rule are passed", |s| {
        s.interfaces[0].xdp.passed >= passed + 200
    });
    assert_eq!(
        s0.interfaces[0].xdp.redirected, 0,
        "no rule for port {port} yet: {s0:?}"
    );

    let add = scene.request(rule_to(2, "0.0.0.0/0", scene.primary_ip, port));
    assert_eq!(add, Response::Done);
    scene.pktgen_ok(scene.primary_ip, port, 200);
    let s1 = scene.settled_stats(200);
    assert_eq!(s1.interfaces[0].xdp.redirected, 200);

    assert_eq!(scene.request(Request::RuleDel { id: 2 }), Response::Done);
    scene.pktgen_ok(scene.primary_ip, port, 200);
    scene.stats_when("the frames after the rule's removal are passed", |s| {
        s.interfaces[0].xdp.passed >= s1.interfaces[0].xdp.passed + 200
    });
    let s2 = scene.settled_stats(200);
    assert_eq!(
        s2.interfaces[0].xdp.redirected, 200,
        "removed rule still matched: {s2:?}"
    );
    assert!(s2.interfaces[0].xdp.passed >= s1.interfaces[0].xdp.passed + 200);

    // A bad rule is refused with a message, and nothing changes.
    let bad = scene.request(Request::RuleDel { id: 99 });
    assert!(
        matches!(bad, Response::Error { ref message } if message.contains("99")),
        "{bad:?}"
    );
    let port_zero = scene.request(rule_to(3, "0.0.0.0/0", scene.primary_ip, 0));
    assert!(matches!(port_zero, Response::Error { .. }), "{port_zero:?}");

    // 1,024 rules at once (one per destination port), installed at run time; the last
    // one steers, a port next to them does not.
    for i in 0..1024u16 {
        let add = scene.request(rule_to(
            100 + u32::from(i),
            "198.18.1.0/24",
            scene.primary_ip,
            10_000 + i,
        ));
        assert_eq!(add, Response::Done, "rule {i}");
    }
    match scene.request(Request::Rules) {
        Response::Rules { rules } => assert!(rules.len() >= 1024, "{} rules listed", rules.len()),
        other => panic!("{other:?}"),
    }
    let before = scene.stats().interfaces[0].xdp;
    scene.pktgen_ok(scene.primary_ip, 10_000 + 1023, 50);
    scene.pktgen_ok(scene.primary_ip, 10_000 + 1024, 50);
    let after = scene.settled_stats(before.redirected + 50);
    assert_eq!(
        after.interfaces[0].xdp.redirected,
        before.redirected + 50,
        "{after:?}"
    );
    assert!(
        after.interfaces[0].xdp.passed >= before.passed + 50,
        "{after:?}"
    );
}

#[test]
fn malformed_frames_are_counted_and_harmless() {
    let Some(mut scene) = Scene::if_privileged("nsd") else {
        return;
    };
    let per_kind = 25;
    let mut sent = 0;
    for kind in Malformation::ALL {
        let out = scene.pktgen(scene.primary_ip, SERVICE_PORT, per_kind, Some(kind));
        if kind == Malformation::TruncatedEthernet {
            // The kernel refuses to put a frame shorter than its link header on a veth, so
            // it can never reach the program here (a physical NIC could deliver one).
            assert!(!out.status.success(), "the kernel sent a runt frame");
            continue;
        }
        assert!(
            out.status.success(),
            "{kind:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        sent += per_kind;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let stats = loop {
        let s = scene.stats();
        if s.interfaces[0].xdp.unparsed >= sent || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(stats.interfaces[0].xdp.unparsed, sent, "{stats:?}");
    assert_eq!(
        stats.interfaces[0].xdp.redirected, 0,
        "a malformed frame was redirected: {stats:?}"
    );
    assert!(
        scene.middlebox.as_mut().unwrap().running(),
        "middlebox died"
    );

    // Still steering after the garbage.
    scene.pktgen_ok(scene.primary_ip, SERVICE_PORT, 100);
    scene.settled_stats(100);
}

#[test]
fn no_program_stays_attached_after_exit() {
    let Some(mut scene) = Scene::if_privileged("nse") else {
        return;
    };
    // Both stop signals go through the same clean shutdown: the program detached, the
    // control socket removed.
    for (signal, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        assert!(scene.xdp_attached(), "XDP not attached before {name}");
        let status = scene.stop_middlebox(signal);
        assert!(
            status.success(),
            "{name} should be a clean exit, got {status}"
        );
        assert!(!scene.xdp_attached(), "XDP still attached after {name}");
        assert!(
            !scene.socket.exists(),
            "control socket left behind by {name}"
        );
        scene.start_middlebox();
    }

    // Even a crash leaves nothing behind: the attachment is a link owned by the process.
    let _ = scene.stop_middlebox(libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while scene.xdp_attached() {
        assert!(
            Instant::now() < deadline,
            "XDP still attached after SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // And the interface keeps working for the kernel.
    scene.ping_middlebox(2, "ping after the middlebox was killed");
}
