//! `cargo xtask bench`: measurements, side by side in one run (this machine is shared and
//! noisy, so only ratios from the same run mean much). Results go to `bench-results/`.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ncp_testbed::{Testbed, Topology, UpOptions};

use crate::{
    cmd::step,
    middlebox::{self, Middlebox},
    setup,
};

const PREFIX: &str = "ncpb";

/// Which experiment to run.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Experiment {
    /// AF_XDP receive rate of a matching flow, and the pass-through cost of steering on an
    /// unmatched iperf3 flow.
    Steering,
}

/// Runs the chosen experiments.
pub fn bench(experiments: &[Experiment], repetitions: u32) -> anyhow::Result<()> {
    setup::setup()?;
    let bins = middlebox::build_release()?;
    let topology = Topology::load("testbed/paper.toml")?;
    let _ = Testbed::down(PREFIX);
    step("bringing up the paper test bed for benchmarks");
    let bed = Testbed::up(&topology, &UpOptions::with_prefix(PREFIX))?;
    let mut result = Ok(());
    for experiment in experiments {
        result = match experiment {
            Experiment::Steering => steering(&bed, &bins, repetitions),
        };
        if result.is_err() {
            break;
        }
    }
    step("tearing down");
    Testbed::down(PREFIX)?;
    result
}

fn steering(bed: &Testbed, bins: &Path, repetitions: u32) -> anyhow::Result<()> {
    let source = bed.address("source", "eth0")?.to_string();
    let primary = bed.address("primary", "eth0")?.to_string();
    let mb_ip = bed.address("middlebox", "eth0")?.to_string();
    let mb_mac = ncp_testbed::Mac(bed.mac("middlebox", "eth0")?).to_string();
    let socket = Path::new("/run/ncp-bench/mb.sock");
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
    std::thread::sleep(Duration::from_millis(500));
    let mut rx_rates = Vec::new();
    for round in 0..repetitions {
        without.push(iperf(bed, &mb_ip)?);
        let mb = Middlebox::start(bed, "middlebox", bins, &config, socket)?;
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

    let med_without = median(&without);
    let med_with = median(&with);
    let med_rate = median(&rx_rates.iter().map(|r| r.0).collect::<Vec<_>>());
    let delivered: f64 = rx_rates.iter().map(|r| r.1 as f64).sum::<f64>()
        / rx_rates.iter().map(|r| r.2 as f64).sum::<f64>();
    println!("\n| measurement | median over {repetitions} rounds |");
    println!("|---|---|");
    println!(
        "| unmatched iperf3, program detached | {:.2} Gbit/s |",
        med_without / 1e9
    );
    println!(
        "| unmatched iperf3, program attached | {:.2} Gbit/s |",
        med_with / 1e9
    );
    println!("| attached / detached | {:.3} |", med_with / med_without);
    println!("| matching frames into AF_XDP (via OVS) | {med_rate:.0} frames/s |");
    println!("| matching frames delivered | {:.1} % |", delivered * 100.0);
    let json = serde_json::json!({
        "experiment": "steering",
        "repetitions": repetitions,
        "iperf_unmatched_bps": { "detached": without, "attached": with, "ratio_of_medians": med_with / med_without },
        "af_xdp_rx_frames_per_second": rx_rates.iter().map(|r| r.0).collect::<Vec<_>>(),
        "af_xdp_delivered_fraction": delivered,
    });
    std::fs::create_dir_all("bench-results")?;
    std::fs::write(
        "bench-results/steering.json",
        serde_json::to_string_pretty(&json)?,
    )?;
    eprintln!("    wrote bench-results/steering.json");
    Ok(())
}

fn iperf(bed: &Testbed, server: &str) -> anyhow::Result<f64> {
    let out = bed.exec(
        "source",
        &["iperf3", "-c", server, "-p", "5301", "-t", "3", "-J"],
    )?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 report without a throughput")
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}
