//! Steering costs: frames per second into AF_XDP for a matching flow (over OVS and over a
//! direct veth), and the pass-through cost on an unmatched iperf3 flow.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use std::fmt::Write as _;

use anyhow::Context as _;
use ncp_testbed::Testbed;

use super::median;
use crate::{
    cmd::step,
    middlebox::{self, Middlebox},
};

pub fn steering(bed: &Testbed, bins: &Path, options: &super::Options) -> anyhow::Result<String> {
    let repetitions = options.repetitions;
    let source = bed.address("source", "eth0")?.to_string();
    let primary = bed.address("primary", "eth0")?.to_string();
    let mb_ip = bed.address("middlebox", "eth0")?.to_string();
    let mb_mac = ncp_testbed::Mac(bed.mac("middlebox", "eth0")?).to_string();
    let socket = super::run_dir().join("mb.sock");
    let config = format!(
        "control_socket = \"{}\"\n[[interfaces]]\nname = \"eth0\"\naddress = \"{mb_ip}\"\n\
         queues = [{{ queue = 0, core = 1 }}]\n[[rules]]\nid = 1\nsource = \"{source}/32\"\n\
         destination = \"{primary}\"\ndestination_port = 5201\n",
        socket.display()
    );
    let pktgen = bins.join("ncp-pktgen");
    let pktgen = pktgen.to_str().context("non-UTF-8 path")?.to_owned();

    // 1. Pass-through cost: an unmatched iperf3 flow with and without the program attached,
    //    alternating so that drift on the shared machine hits both equally.
    step(&format!(
        "unmatched iperf3 throughput, {repetitions} alternating rounds of 3 s each"
    ));
    let mut without = Vec::new();
    let mut with = Vec::new();
    let mut server = bed.spawn("middlebox", &["iperf3", "-s", "-p", "5301"])?;
    bed.wait_listening("middlebox", 5301, Duration::from_secs(20))?;
    let mut rx_rates = Vec::new();
    for round in 0..repetitions {
        without.push(iperf(bed, &mb_ip)?);
        let mb = Middlebox::start(bed, "middlebox", bins, &config, &socket)?;
        with.push(iperf(bed, &mb_ip)?);

        // 2. Frames per second into AF_XDP for the matching flow, in the same round.
        let frames: u64 = 200_000;
        let before = middlebox::worker_frames(&mb.stats()?);
        let start = Instant::now();
        bed.exec(
            "source",
            &[
                &pktgen,
                "--interface",
                "eth0",
                "--dst-mac",
                &mb_mac,
                "--src-ip",
                &source,
                "--dst-ip",
                &primary,
                "--dst-port",
                "5201",
                "--count",
                &frames.to_string(),
                "--flows",
                "64",
            ],
        )?;
        // Wait for the counter to stop moving, then rate = frames received / time taken.
        let mut last = before;
        let mut last_change = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let now = middlebox::worker_frames(&mb.stats()?);
            if now != last {
                last = now;
                last_change = Instant::now();
            } else if last_change.elapsed() > Duration::from_millis(500) {
                break;
            }
        }
        let received = last - before;
        let secs = last_change.duration_since(start).as_secs_f64();
        let rate = received as f64 / secs.max(1e-6);
        eprintln!(
            "    round {}: without {:.2} Gbit/s, with {:.2} Gbit/s; AF_XDP took {received}/{frames} frames at {:.0} frames/s",
            round + 1,
            without[round as usize] / 1e9,
            with[round as usize] / 1e9,
            rate
        );
        rx_rates.push((rate, received, frames));
        drop(mb);
    }
    let _ = server.kill();
    let _ = server.wait();

    let direct = direct_link_rates(bed, bins, &pktgen, repetitions)?;

    let med_without = median(&without);
    let med_with = median(&with);
    let med_rate = median(&rx_rates.iter().map(|r| r.0).collect::<Vec<_>>());
    let delivered: f64 = rx_rates.iter().map(|r| r.1 as f64).sum::<f64>()
        / rx_rates.iter().map(|r| r.2 as f64).sum::<f64>();
    let mut md = String::from("## Steering (XDP into AF_XDP)\n\n");
    let rows = [
        (
            "measurement".to_owned(),
            format!("median over {repetitions} rounds"),
        ),
        ("---".into(), "---".into()),
        (
            "unmatched iperf3, program detached".into(),
            format!("{:.2} Gbit/s", med_without / 1e9),
        ),
        (
            "unmatched iperf3, program attached".into(),
            format!("{:.2} Gbit/s", med_with / 1e9),
        ),
        (
            "attached / detached".into(),
            format!("{:.3}", med_with / med_without),
        ),
        (
            "matching frames into AF_XDP (via OVS)".into(),
            format!("{med_rate:.0} frames/s"),
        ),
        (
            "matching frames delivered (via OVS)".into(),
            format!("{:.1} %", delivered * 100.0),
        ),
        (
            "direct veth: generator send rate".into(),
            format!("{:.0} frames/s", direct.sent_fps),
        ),
        (
            "direct veth: matching frames into AF_XDP".into(),
            format!(
                "{:.0} frames/s ({:.1} % delivered)",
                direct.redirect_fps,
                direct.redirect_delivered * 100.0
            ),
        ),
        (
            "direct veth: unmatched frames passed to the kernel".into(),
            format!("{:.0} frames/s", direct.pass_fps),
        ),
        (
            "direct veth: unmatched iperf3, no XDP program".into(),
            format!("{:.2} Gbit/s", median(&direct.pass_through.detached) / 1e9),
        ),
        (
            "direct veth: unmatched iperf3, do-nothing XDP program (native)".into(),
            format!(
                "{:.2} Gbit/s ({:.3} of no program)",
                median(&direct.pass_through.baseline) / 1e9,
                median(&direct.pass_through.baseline) / median(&direct.pass_through.detached)
            ),
        ),
        (
            "direct veth: unmatched iperf3, NCP's program (native)".into(),
            format!(
                "{:.2} Gbit/s ({:.3} of no program, {:.3} of the do-nothing program)",
                median(&direct.pass_through.ncp) / 1e9,
                median(&direct.pass_through.ncp) / median(&direct.pass_through.detached),
                median(&direct.pass_through.ncp) / median(&direct.pass_through.baseline)
            ),
        ),
        (
            "direct veth: kernel pktgen (/proc/net/pktgen, UDP) passed".into(),
            match &direct.kernel_pktgen {
                Ok((passed, sent)) => format!("{passed:.0} frames/s (sent {sent:.0} frames/s)"),
                // The generator's own message, without the command line around it.
                Err(reason) => format!(
                    "not measured: {}",
                    reason
                        .rfind("Error: ")
                        .map_or(reason.as_str(), |at| &reason[at + "Error: ".len()..])
                        .lines()
                        .next()
                        .unwrap_or("")
                        .replace('|', "/")
                ),
            },
        ),
    ];
    for (what, value) in rows {
        let _ = writeln!(md, "| {what} | {value} |");
    }
    let json = serde_json::json!({
        "experiment": "steering",
        "repetitions": repetitions,
        "iperf_unmatched_bps": { "detached": without, "attached": with, "ratio_of_medians": med_with / med_without },
        "af_xdp_rx_frames_per_second": rx_rates.iter().map(|r| r.0).collect::<Vec<_>>(),
        "af_xdp_delivered_fraction": delivered,
        "direct_veth": {
            "pktgen_frames_per_second": direct.sent_fps,
            "redirect_frames_per_second": direct.redirect_fps,
            "redirect_delivered_fraction": direct.redirect_delivered,
            "pass_frames_per_second": direct.pass_fps,
            "unmatched_iperf_bps": {
                "no_program": direct.pass_through.detached,
                "do_nothing_program": direct.pass_through.baseline,
                "ncp_program": direct.pass_through.ncp,
            },
            "kernel_pktgen": match &direct.kernel_pktgen {
                Ok((passed, sent)) => serde_json::json!({ "passed_frames_per_second": passed, "sent_frames_per_second": sent }),
                Err(reason) => serde_json::json!({ "error": reason }),
            },
        },
    });
    super::save_json(options, "steering", &json)?;
    md.push('\n');
    eprint!("{md}");
    Ok(md)
}

fn iperf(bed: &Testbed, server: &str) -> anyhow::Result<f64> {
    let out = bed.exec(
        "source",
        &["iperf3", "-c", server, "-p", "5301", "-t", "3", "-J"],
    )?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 report without a throughput: {}", report["error"]))
}

struct DirectRates {
    sent_fps: f64,
    redirect_fps: f64,
    redirect_delivered: f64,
    pass_fps: f64,
    /// Kernel pktgen: (frames/s passed by XDP, frames/s sent), or why it did not run.
    kernel_pktgen: Result<(f64, f64), String>,
    /// Unmatched iperf3 over the direct veth (bit/s per round): no program, the
    /// do-nothing program, NCP's program.
    pass_through: PassThrough,
}

/// Unmatched TCP throughput over one link with no XDP program, with a program that only
/// passes frames, and with NCP's steering program, measured in alternating rounds.
#[derive(Default)]
struct PassThrough {
    detached: Vec<f64>,
    baseline: Vec<f64>,
    ncp: Vec<f64>,
}

/// The XDP → AF_XDP path without the software switch in the way: a veth pair straight from
/// the source to the middlebox, frames generated as fast as one core can.
fn direct_link_rates(
    bed: &Testbed,
    bins: &Path,
    pktgen: &str,
    repetitions: u32,
) -> anyhow::Result<DirectRates> {
    step("direct veth source ↔ middlebox: frames per second through XDP, redirect versus pass");
    let source_ns = bed.netns("source")?;
    let mb_ns = bed.netns("middlebox")?;
    let prefix = super::prefix();
    let (a, b) = (format!("{prefix}-da"), format!("{prefix}-db"));
    let _ = crate::cmd::capture(&["ip", "link", "del", &a]);
    crate::cmd::run(&["ip", "link", "add", &a, "type", "veth", "peer", "name", &b])?;
    for (dev, ns, addr) in [
        (&a, &source_ns, "198.19.9.1/24"),
        (&b, &mb_ns, "198.19.9.2/24"),
    ] {
        crate::cmd::run(&["ip", "link", "set", dev, "netns", ns])?;
        crate::cmd::run(&["ip", "-n", ns, "link", "set", dev, "name", "direct0"])?;
        crate::cmd::run(&["ip", "-n", ns, "addr", "add", addr, "dev", "direct0"])?;
        crate::cmd::run(&["ip", "-n", ns, "link", "set", "direct0", "up"])?;
        crate::cmd::run(&[
            "ip", "netns", "exec", ns, "ethtool", "-K", "direct0", "tx", "off",
        ])?;
    }
    let mac = std::fs::read_to_string(format!("/sys/class/net/{b}/address")).ok();
    let mac = match mac {
        Some(m) => m.trim().to_owned(),
        None => {
            let out = bed.exec("middlebox", &["cat", "/sys/class/net/direct0/address"])?;
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        }
    };
    let socket = super::run_dir().join("direct.sock");
    let config = format!(
        "control_socket = \"{}\"\n[[interfaces]]\nname = \"direct0\"\naddress = \"198.19.9.2\"\n\
         queues = [{{ queue = 0, core = 1 }}]\n[[rules]]\nid = 1\nsource = \"198.19.9.1/32\"\n\
         destination = \"198.19.9.3\"\ndestination_port = 5201\n",
        socket.display()
    );
    let mb = Middlebox::start(bed, "middlebox", bins, &config, &socket)?;
    let frames: u64 = 1_000_000;
    let send = |port: &str, backend: &str| -> anyhow::Result<f64> {
        let out = bed.exec(
            "source",
            &[
                pktgen,
                "--interface",
                "direct0",
                "--dst-mac",
                &mac,
                "--src-ip",
                "198.19.9.1",
                "--dst-ip",
                "198.19.9.3",
                "--dst-port",
                port,
                "--count",
                &frames.to_string(),
                "--flows",
                "64",
                "--json",
                "--backend",
                backend,
            ],
        )?;
        let report: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("pktgen JSON")?;
        report["frames_per_second"]
            .as_f64()
            .context("pktgen report")
    };
    let counted = |counter: &dyn Fn(&serde_json::Value) -> u64,
                   port: &str,
                   backend: &str|
     -> anyhow::Result<(f64, f64)> {
        let before = counter(&mb.stats()?);
        let start = Instant::now();
        let send_rate = send(port, backend)?;
        let mut last = counter(&mb.stats()?);
        let mut last_change = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let now = counter(&mb.stats()?);
            if now != last {
                last = now;
                last_change = Instant::now();
            } else if last_change.elapsed() > Duration::from_millis(400) {
                break;
            }
        }
        let got = (last - before) as f64;
        let secs =
            (frames as f64 / send_rate).max(last_change.duration_since(start).as_secs_f64() - 0.1);
        Ok((got / secs.max(1e-6), send_rate))
    };
    let (redirect_fps, sent_fps) = counted(&|s| middlebox::worker_frames(s), "5201", "xdp")?;
    let delivered = {
        let s = mb.stats()?;
        middlebox::worker_frames(&s) as f64 / frames as f64
    };
    let (pass_fps, _) = counted(&|s| middlebox::xdp_counter(s, "passed"), "6000", "xdp")?;
    eprintln!(
        "    sent {sent_fps:.0} frames/s; redirected {redirect_fps:.0}/s; passed {pass_fps:.0}/s"
    );
    // The kernel's own generator where its module is loaded (UDP only, so it measures the
    // pass path); elsewhere the reason it could not run is reported instead.
    let kernel_pktgen = counted(&|s| middlebox::xdp_counter(s, "passed"), "6000", "kernel")
        .map_err(|e| {
            let reason = format!("{e:#}");
            eprintln!("    kernel pktgen not measured: {reason}");
            reason
        });
    drop(mb);
    let pass_through = direct_pass_through(bed, bins, &config, &socket, repetitions)?;
    Ok(DirectRates {
        sent_fps,
        redirect_fps,
        redirect_delivered: delivered,
        pass_fps,
        kernel_pktgen,
        pass_through,
    })
}

/// What XDP costs traffic it does not steer, on the direct veth (nothing else in the
/// way): an unmatched iperf3 flow with no program, with the do-nothing program
/// (`ncp-middlebox xdp-baseline`) and with NCP's, in alternating rounds. The first ratio
/// is what the interface pays for running any native XDP program (on veth: the frame
/// goes through the XDP receive path instead of straight to the stack), the second what
/// NCP's steering adds to that.
fn direct_pass_through(
    bed: &Testbed,
    bins: &Path,
    config: &str,
    socket: &Path,
    repetitions: u32,
) -> anyhow::Result<PassThrough> {
    step(&format!(
        "direct veth: unmatched iperf3 with no XDP program, the do-nothing one and NCP's, {repetitions} rounds of 3 s each"
    ));
    let mut server = bed.spawn("middlebox", &["iperf3", "-s", "-p", "5301"])?;
    bed.wait_listening("middlebox", 5301, Duration::from_secs(20))?;
    let baseline_bin = bins.join("ncp-middlebox");
    let baseline_bin = baseline_bin.to_str().context("non-UTF-8 path")?;
    let attached = || -> bool {
        bed.exec("middlebox", &["ip", "-d", "link", "show", "dev", "direct0"])
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("prog/xdp"))
    };
    let mut p = PassThrough::default();
    let result = (|| -> anyhow::Result<()> {
        for round in 0..repetitions {
            p.detached.push(iperf(bed, "198.19.9.2")?);
            let mut baseline = bed.spawn(
                "middlebox",
                &[
                    baseline_bin,
                    "xdp-baseline",
                    "--interface",
                    "direct0",
                    "--xdp-mode",
                    "driver",
                ],
            )?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while !attached() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let measured = iperf(bed, "198.19.9.2");
            crate::cmd::stop_child(&mut baseline, Duration::from_secs(5));
            p.baseline.push(measured?);
            let mb = Middlebox::start(bed, "middlebox", bins, config, socket)?;
            p.ncp.push(iperf(bed, "198.19.9.2")?);
            drop(mb);
            eprintln!(
                "    round {}: no program {:.2}, do-nothing program {:.2}, NCP's {:.2} Gbit/s",
                round + 1,
                p.detached[round as usize] / 1e9,
                p.baseline[round as usize] / 1e9,
                p.ncp[round as usize] / 1e9
            );
        }
        Ok(())
    })();
    let _ = server.kill();
    let _ = server.wait();
    result.map(|()| p)
}
