//! `cargo xtask bench relay --profile NAME`: where XDP mode's middlebox spends its CPU on
//! the switchless relay bed. One unthrottled iperf3 run at -P 8 through XDP mode with one
//! replica (the relay experiment's own path), `perf record` on the middlebox process for
//! its duration, and three files under `bench-results/profile/`: `NAME.folded` (folded
//! stacks), `NAME.svg` (flame graph) and `NAME.txt` (the top self-time entries).
//!
//! The release profile keeps line tables but no frame pointers, so the call graph is
//! unwound from DWARF (`--call-graph dwarf`), at a sampling rate low enough that `perf
//! script` finishes in seconds.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{
    cmd::{self, step},
    middlebox::Middlebox,
};

/// Where profiles go (committed beside the benchmark results).
pub const PROFILE_DIR: &str = "bench-results/profile";

/// Samples per second per CPU.
const FREQUENCY: &str = "499";

/// Lines of `perf report` kept in the text summary.
const SUMMARY_LINES: usize = 60;

/// A `perf record` attached to a running middlebox.
pub struct Recording {
    child: std::process::Child,
    data: PathBuf,
    name: String,
}

impl Recording {
    /// Starts sampling the middlebox's threads into `bench-results/profile/NAME.data`.
    pub fn start(mb: &Middlebox, name: &str) -> anyhow::Result<Self> {
        for tool in ["perf", "inferno-collapse-perf", "inferno-flamegraph"] {
            if !cmd::have(tool) {
                bail!(
                    "`{tool}` is not on PATH (perf: apt-get install linux-perf; inferno: cargo install inferno)"
                );
            }
        }
        let pid = mb
            .pid()
            .context("the middlebox has no process to profile")?;
        std::fs::create_dir_all(PROFILE_DIR).with_context(|| format!("creating {PROFILE_DIR}"))?;
        let data = Path::new(PROFILE_DIR).join(format!("{name}.data"));
        step(&format!("perf record on the middlebox (pid {pid})"));
        let child = Command::new("perf")
            .args([
                "record",
                "-q",
                "-F",
                FREQUENCY,
                "--call-graph",
                "dwarf,16384",
                "-p",
            ])
            .arg(pid.to_string())
            .arg("-o")
            .arg(&data)
            .stdin(Stdio::null())
            .spawn()
            .context("starting perf record")?;
        // perf needs a moment to open its events on every thread before the run starts.
        std::thread::sleep(Duration::from_millis(500));
        Ok(Recording {
            child,
            data,
            name: name.to_owned(),
        })
    }

    /// Stops sampling and writes the folded stacks, the flame graph and the summary.
    pub fn finish(mut self) -> anyhow::Result<()> {
        // perf record writes its file on SIGTERM; stop_child waits for that.
        cmd::stop_child(&mut self.child, Duration::from_secs(60));
        let dir = Path::new(PROFILE_DIR);
        let data = self.data.to_string_lossy().into_owned();
        let script = dir.join(format!("{}.perf-script", self.name));
        std::fs::write(&script, run_to_bytes(&["perf", "script", "-i", &data])?)
            .with_context(|| format!("writing {}", script.display()))?;
        let folded_path = dir.join(format!("{}.folded", self.name));
        let folded = run_to_bytes(&["inferno-collapse-perf", &script.to_string_lossy()])?;
        std::fs::write(&folded_path, &folded)
            .with_context(|| format!("writing {}", folded_path.display()))?;
        let svg = run_to_bytes(&[
            "inferno-flamegraph",
            "--title",
            &format!(
                "ncp-middlebox, XDP mode, relay bed, iperf3 -P 8 ({})",
                self.name
            ),
            &folded_path.to_string_lossy(),
        ])?;
        let report = run_to_bytes(&[
            "perf",
            "report",
            "-i",
            &data,
            "--no-children",
            "--stdio",
            "--percent-limit",
            "0.5",
            "-g",
            "none",
        ])?;
        let summary = summary(&self.name, &String::from_utf8_lossy(&report));
        for (ext, bytes) in [("svg", svg.as_slice()), ("txt", summary.as_bytes())] {
            let path = dir.join(format!("{}.{ext}", self.name));
            std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("    wrote {}", path.display());
        }
        // The raw samples are large and only this machine can read them; keep the rest.
        let _ = std::fs::remove_file(&self.data);
        let _ = std::fs::remove_file(&script);
        Ok(())
    }
}

/// Runs `argv` quietly and returns its standard output; fails with its stderr.
fn run_to_bytes(argv: &[&str]) -> anyhow::Result<Vec<u8>> {
    let out = cmd::capture(argv)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// The top of `perf report --no-children`: its sample count, the column header and the
/// first [`SUMMARY_LINES`] entries, without perf's hints and blank lines.
fn summary(name: &str, report: &str) -> String {
    let mut text = format!(
        "# {name}: self time of the middlebox's threads, XDP mode, relay bed, iperf3 -P 8\n\
         # perf record -F {FREQUENCY} --call-graph dwarf; perf report --no-children --stdio\n"
    );
    let kept = report.lines().filter(|line| {
        let line = line.trim();
        !line.is_empty()
            && (!line.starts_with('#')
                || line.starts_with("# Samples")
                || line.starts_with("# Overhead"))
    });
    for line in kept.take(SUMMARY_LINES + 2) {
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}
