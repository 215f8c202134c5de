//! Starting `ncp-middlebox` inside a test-bed host and reading its counters, for the demo
//! and the benchmarks. xtask does not link the data plane (building it needs bpf-linker,
//! which `cargo xtask setup` installs), so it drives the release binaries.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ncp_testbed::Testbed;

use crate::cmd::{run, step};

/// Builds the binaries of `packages` in release mode and returns their directory.
pub fn build_release(packages: &[&str]) -> anyhow::Result<PathBuf> {
    step(&format!("building {} (release)", packages.join(" and ")));
    let mut argv = vec!["cargo", "build", "--release", "--bins"];
    for p in packages {
        argv.extend(["-p", p]);
    }
    run(&argv)?;
    release_dir()
}

/// Where cargo puts release binaries: `$CARGO_TARGET_DIR/release`, else `target/release`.
pub fn release_dir() -> anyhow::Result<PathBuf> {
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::current_dir()?.join("target"),
    };
    Ok(target.join("release"))
}

/// A middlebox process running in a test-bed host.
pub struct Middlebox {
    child: Option<Child>,
    binary: PathBuf,
    socket: PathBuf,
}

impl Middlebox {
    /// Writes `config` next to `socket` and starts the XDP middlebox in `host`'s namespace.
    pub fn start(
        bed: &Testbed,
        host: &str,
        bin_dir: &Path,
        config: &str,
        socket: &Path,
    ) -> anyhow::Result<Self> {
        Self::start_mode(bed, host, bin_dir, config, socket, "xdp")
    }

    /// Like [`Middlebox::start`] with an explicit `--mode` (`xdp` or `sockets`).
    pub fn start_mode(
        bed: &Testbed,
        host: &str,
        bin_dir: &Path,
        config: &str,
        socket: &Path,
        mode: &str,
    ) -> anyhow::Result<Self> {
        let dir = socket
            .parent()
            .context("control socket path has no directory")?;
        std::fs::create_dir_all(dir)?;
        let config_path = dir.join("middlebox.toml");
        std::fs::write(&config_path, config)?;
        let binary = bin_dir.join("ncp-middlebox");
        let netns = bed.netns(host)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &netns])
            .arg(&binary)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .args(["--mode", mode])
            .stdin(Stdio::null())
            .spawn()
            .context("starting ncp-middlebox")?;
        let mut mb = Self {
            child: Some(child),
            binary,
            socket: socket.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while mb.stats().is_err() {
            if let Some(child) = mb.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("ncp-middlebox exited during start-up ({status})");
            }
            if Instant::now() > deadline {
                bail!(
                    "ncp-middlebox did not answer on {} within 20 s",
                    socket.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(mb)
    }

    /// The middlebox's process id (`ip netns exec` execs it in place), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The counters as JSON (`ncp-middlebox stats --json`).
    pub fn stats(&self) -> anyhow::Result<serde_json::Value> {
        let out = Command::new(&self.binary)
            .args(["stats", "--json", "--socket"])
            .arg(&self.socket)
            .stderr(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!("stats failed");
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// The services it replicates, as `ncp-middlebox services` prints them.
    pub fn services(&self) -> anyhow::Result<String> {
        let out = Command::new(&self.binary)
            .args(["services", "--socket"])
            .arg(&self.socket)
            .output()?;
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The human-readable counters table.
    pub fn stats_table(&self) -> anyhow::Result<String> {
        let out = Command::new(&self.binary)
            .args(["stats", "--socket"])
            .arg(&self.socket)
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// CPU time (user + system, all threads) the process has used so far, in seconds.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let pid = self.pid()?;
        let ticks = ProcessTicks::of(i32::try_from(pid).ok()?)?;
        Some(ticks.own as f64 / clock_ticks_per_second())
    }

    /// Resident memory of the process right now (`VmRSS`), in bytes.
    pub fn rss_bytes(&self) -> Option<u64> {
        let pid = self.pid()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(kib * 1024)
    }

    /// Kills the process with SIGKILL, as a crash would, and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the process with SIGTERM and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            crate::cmd::stop_child(&mut child, Duration::from_secs(10));
        }
    }
}

impl Drop for Middlebox {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A process's CPU time in clock ticks, as `/proc/<pid>/stat` counts it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessTicks {
    /// utime + stime: its own threads.
    pub own: u64,
    /// cutime + cstime: the children it has waited for.
    pub reaped_children: u64,
}

impl ProcessTicks {
    /// Parses the text of `/proc/<pid>/stat` (None if it is not one).
    pub fn parse(stat: &str) -> Option<ProcessTicks> {
        // Fields after the parenthesised command name (which may itself hold spaces and
        // parentheses); utime, stime, cutime and cstime are fields 14 to 17.
        let rest = stat.rsplit_once(')')?.1;
        let mut fields = rest
            .split_whitespace()
            .skip(11)
            .map(|f| f.parse::<u64>().ok());
        let mut next = || fields.next().flatten();
        let (utime, stime, cutime, cstime) = (next()?, next()?, next()?, next()?);
        Some(ProcessTicks {
            own: utime + stime,
            reaped_children: cutime + cstime,
        })
    }

    /// The counters of process `pid` now (None if it is gone).
    pub fn of(pid: i32) -> Option<ProcessTicks> {
        ProcessTicks::parse(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    }
}

/// The unit of the kernel's CPU time counters (`/proc/<pid>/stat`, `/proc/stat`), in
/// ticks per second.
pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// Reads a counter out of the stats JSON: `xdp(stats, "redirected")`.
pub fn xdp_counter(stats: &serde_json::Value, name: &str) -> u64 {
    stats["interfaces"]
        .as_array()
        .map(|ifaces| {
            ifaces
                .iter()
                .map(|i| i["xdp"][name].as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

/// Frames the workers took from their AF_XDP rings.
pub fn worker_frames(stats: &serde_json::Value) -> u64 {
    worker_counter(stats, "rx_frames")
}

/// A per-worker counter (`rx_frames`, `tx_frames`, `tx_kicks`, ...) summed over workers.
pub fn worker_counter(stats: &serde_json::Value, name: &str) -> u64 {
    stats["workers"]
        .as_array()
        .map(|ws| ws.iter().map(|w| w[name].as_u64().unwrap_or(0)).sum())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_ticks_come_after_the_command_name() {
        // A command name with a space and a parenthesis, as `comm` allows.
        let stat = "4242 (iperf3 (x)) S 1 4242 4242 0 -1 4194560 300 0 0 0 70 30 5 2 20 0 1 0 \
                    100 8568832 512 18446744073709551615";
        assert_eq!(
            ProcessTicks::parse(stat),
            Some(ProcessTicks {
                own: 100,
                reaped_children: 7
            })
        );
        assert_eq!(ProcessTicks::parse("4242 (short) S 1 2 3"), None);
        assert_eq!(ProcessTicks::parse("no parenthesis"), None);
    }
}
