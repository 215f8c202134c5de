//! `cargo xtask demo`: the main job on the built-in test bed. At this stage it shows the
//! steering half of NCP working on real switches: the paper's Fig. 5 test bed comes up
//! (Open vSwitch bridges, hosts in namespaces), the middlebox attaches to its production
//! NIC with a rule for source → primary:5201, the source sends traffic, and the report
//! shows which frames the XDP program redirected to the workers and which it left to the
//! kernel.

use std::{path::Path, time::Duration};

use anyhow::Context as _;
use ncp_testbed::{Testbed, Topology, UpOptions};

use crate::{
    cmd::step,
    middlebox::{self, Middlebox},
    setup,
};

const PREFIX: &str = "ncp";
const SERVICE_PORT: u16 = 5201;
const FRAMES: u64 = 50_000;
/// OVS's userspace datapath (AF_PACKET on veth) drops bursts; a steady rate it can
/// forward keeps the report about steering, not about the software switch.
const RATE: u64 = 25_000;

/// Runs the demo; with `keep` the test bed and middlebox stay up.
pub fn demo(keep: bool) -> anyhow::Result<()> {
    setup::setup()?;
    let bins = middlebox::build_release(&["ncp-dataplane"])?;
    step("bringing up the paper's test bed (testbed/paper.toml)");
    let topology = Topology::load("testbed/paper.toml")?;
    let bed = Testbed::up(&topology, &UpOptions::with_prefix(PREFIX))?;
    let result = run(&bed, &bins, keep);
    if keep && result.is_ok() {
        println!(
            "\nLeft running. Look around:\n  ip netns list\n  ovs-vsctl show\n  \
             {}/ncp-middlebox stats --socket /run/ncp-demo/mb.sock --watch 1\n  \
             ip netns exec {PREFIX}-source ping 198.18.1.4\nTear down with: cargo xtask testbed down --prefix {PREFIX}",
            bins.display()
        );
        std::mem::forget(bed);
        return Ok(());
    }
    step("tearing down");
    Testbed::down(PREFIX)?;
    result
}

fn run(bed: &Testbed, bins: &Path, keep: bool) -> anyhow::Result<()> {
    let source = bed.address("source", "eth0")?;
    let primary = bed.address("primary", "eth0")?;
    let mb_ip = bed.address("middlebox", "eth0")?;
    let mb_mac = ncp_testbed::Mac(bed.mac("middlebox", "eth0")?).to_string();
    let socket = Path::new("/run/ncp-demo/mb.sock");
    let config = format!(
        r#"control_socket = "{}"
[[interfaces]]
name = "eth0"
address = "{mb_ip}"
queues = [{{ queue = 0, core = 1 }}]

[[rules]]
id = 1
source = "{source}/32"
destination = "{primary}"
destination_port = {SERVICE_PORT}
"#,
        socket.display()
    );
    step("starting ncp-middlebox on the middlebox's production NIC");
    let mut mb = Middlebox::start(bed, "middlebox", bins, &config, socket)?;

    step(&format!(
        "sending {FRAMES} TCP frames source → primary:{SERVICE_PORT} (matches rule #1) through the switch"
    ));
    let pktgen = bins.join("ncp-pktgen");
    let pktgen = pktgen.to_str().context("non-UTF-8 path")?;
    let out = bed.exec(
        "source",
        &[
            pktgen,
            "--interface",
            "eth0",
            "--dst-mac",
            &mb_mac,
            "--src-ip",
            &source.to_string(),
            "--dst-ip",
            &primary.to_string(),
            "--dst-port",
            &SERVICE_PORT.to_string(),
            "--count",
            &FRAMES.to_string(),
            "--flows",
            "16",
            "--rate",
            &RATE.to_string(),
        ],
    )?;
    print!("    {}", String::from_utf8_lossy(&out.stdout));

    step("unmatched traffic: ping and an iperf3 TCP flow to the middlebox host itself");
    bed.exec(
        "source",
        &["ping", "-c", "3", "-i", "0.2", &mb_ip.to_string()],
    )?;
    let mut server = bed.spawn("middlebox", &["iperf3", "-s", "-p", "5301", "-1"])?;
    bed.wait_listening("middlebox", 5301, Duration::from_secs(20))?;
    let iperf = bed.exec(
        "source",
        &[
            "iperf3",
            "-c",
            &mb_ip.to_string(),
            "-p",
            "5301",
            "-t",
            "2",
            "-J",
        ],
    )?;
    let _ = server.wait();
    let report: serde_json::Value = serde_json::from_slice(&iperf.stdout).unwrap_or_default();
    let gbps = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9;

    std::thread::sleep(Duration::from_millis(500));
    let stats = mb.stats()?;
    let redirected = middlebox::xdp_counter(&stats, "redirected");
    let taken = middlebox::worker_frames(&stats);
    println!("\n================ NCP demo report ================");
    println!("{}", mb.stats_table()?);
    println!("rule #1: tcp {source} -> {primary}:{SERVICE_PORT}");
    println!("frames sent by the source for the rule:   {FRAMES}");
    println!("redirected into AF_XDP by XDP:             {redirected}");
    println!("taken from the AF_XDP ring by the worker:  {taken}");
    println!("unmatched iperf3 TCP through the kernel:   {gbps:.2} Gbit/s");
    println!(
        "verdict: {}",
        if taken == redirected && redirected >= FRAMES {
            "steering OK: every matching frame reached the worker; other traffic went to the kernel"
        } else {
            "frames were lost between the switch and the worker (see counters above)"
        }
    );
    println!("=================================================");
    if !keep {
        mb.stop();
    } else {
        std::mem::forget(mb);
    }
    Ok(())
}
