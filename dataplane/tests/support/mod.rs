//! Helpers shared by the privileged integration tests (each test file includes this with
//! `mod support;` and uses the part it needs).
#![allow(dead_code, reason = "each test crate uses a different subset")]
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step should fail the test"
)]

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Output, Stdio},
    sync::MutexGuard,
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use ncp_dataplane::control::{self, Request, Response};
// The XDP data plane's counters, named here only, so a move of them touches one line.
pub use ncp_dataplane::xdp::transport::ReplicationStats;
use ncp_testbed::{Netns, Testbed};

pub mod redis;
pub mod scenarios;
pub mod scene;
pub mod streams;

/// Upper bound for anything a test waits on.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// The middlebox binary of this build.
pub const MIDDLEBOX: &str = env!("CARGO_BIN_EXE_ncp-middlebox");

/// One test bed at a time: on two shared cores, parallel userspace-datapath traffic
/// spoils every timing.
/// Takes the one-test-bed-at-a-time lock (and sets up test logging once).
pub fn serial() -> MutexGuard<'static, ()> {
    ncp_testbed::serial("ncp_dataplane=info,ncp_testbed=warn")
}

/// Runs `f` on a new thread inside network namespace `netns` (threads it spawns inherit
/// the namespace; the rest of the process stays where it is).
pub fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let ns = Netns::open(netns).unwrap();
    thread::spawn(move || {
        ns.enter().unwrap();
        f()
    })
}

/// Waits for `child` at most `limit`, killing it if it overruns.
pub fn wait_bounded(child: &mut Child, limit: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `command` with `feed` writing its stdin (on a thread of its own, so a full pipe
/// cannot deadlock us), at most `limit`; returns (success, stdout, stderr). Fails the
/// test if feeding failed.
pub fn run_fed(
    mut command: Command,
    feed: impl FnOnce(ChildStdin) -> std::io::Result<()> + Send + 'static,
    limit: Duration,
    what: &str,
) -> (bool, String, String) {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let feeder = thread::spawn(move || feed(stdin));
    let read_all = |mut from: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut s = String::new();
            let _ = from.read_to_string(&mut s);
            s
        })
    };
    let out = read_all(Box::new(child.stdout.take().unwrap()));
    let err = read_all(Box::new(child.stderr.take().unwrap()));
    let status = wait_bounded(&mut child, limit, what);
    let fed = feeder.join();
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    assert!(
        matches!(fed, Ok(Ok(()))),
        "feeding {what} failed: {fed:?}; it said: {out}{err}"
    );
    (status.success(), out, err)
}

/// Runs `cmd` to its end and returns what it printed; fails the test, showing both of
/// its streams, if it cannot start or exits unsuccessfully.
pub fn output_ok(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what} did not start: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    out
}

/// `tshark -r file args…`'s output; fails the test if tshark fails.
pub fn tshark(file: &Path, args: &[&str]) -> String {
    let out = output_ok(
        Command::new("tshark").arg("-r").arg(file).args(args),
        "tshark",
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Client-side bytes of TCP stream 0 of a capture as `tshark -z follow,tcp,raw,0` prints
/// them: after the `Node 1:` header, client lines are bare hex, server lines start with
/// a tab.
pub fn tshark_follow_client(file: &Path) -> Vec<u8> {
    let text = tshark(file, &["-q", "-z", "follow,tcp,raw,0"]);
    let mut bytes = Vec::new();
    let mut in_body = false;
    for line in text.lines() {
        if line.starts_with("Node 1:") {
            in_body = true;
            continue;
        }
        if !in_body || line.starts_with('=') || line.starts_with('\t') || line.is_empty() {
            continue;
        }
        let hex = line.trim().as_bytes();
        assert!(hex.len().is_multiple_of(2), "odd hex line {line:?}");
        for pair in hex.chunks_exact(2) {
            let pair = std::str::from_utf8(pair).unwrap();
            bytes.push(u8::from_str_radix(pair, 16).unwrap());
        }
    }
    bytes
}

/// Sends `signal` to a child this test started (by its pid).
pub fn signal(child: &Child, signal: i32) {
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on the pid of a child we started and have not reaped.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
}

/// Writes `dir/mb.toml`, an XDP middlebox's configuration with its control socket at
/// `dir/mb.sock` and one interface, `eth0` at `address` with owned ports 40000-40999 and
/// queue 0 on core 1, whose table gets `interface_lines`; `rest` (more tables) follows.
/// Returns the paths of the configuration and of the control socket.
pub fn one_nic_config(
    dir: &Path,
    address: std::net::Ipv4Addr,
    interface_lines: &str,
    rest: &str,
) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let socket = dir.join("mb.sock");
    let config = dir.join("mb.toml");
    std::fs::write(
        &config,
        format!(
            r#"
control_socket = "{socket}"
[[interfaces]]
name = "eth0"
address = "{address}"
ports = {{ first = 40000, last = 40999 }}
queues = [{{ queue = 0, core = 1 }}]
{interface_lines}
{rest}"#,
            socket = socket.display()
        ),
    )
    .unwrap();
    (config, socket)
}

/// `ncp-middlebox run` in XDP mode, as a process in the test bed's `middlebox` host.
/// A process of its own rather than a thread of the test moved into the namespace: the
/// workers read the kernel's neighbour table from `/proc/net`, which belongs to the
/// process, not to the thread. Stopped with SIGTERM on drop if still running.
pub struct XdpMiddlebox {
    child: Option<Child>,
    socket: PathBuf,
    /// Where its log goes, if not to the test's own stderr.
    log: Option<PathBuf>,
}

impl XdpMiddlebox {
    /// Starts it with the configuration file `config`, whose `control_socket` is
    /// `socket`, and waits (at most a minute) until its workers report.
    pub fn start(bed: &Testbed, config: &Path, socket: &Path) -> XdpMiddlebox {
        Self::start_with_log(bed, config, socket, None)
    }

    /// Like [`XdpMiddlebox::start`], with its log written to `log` (read it with
    /// [`XdpMiddlebox::log_text`]).
    pub fn start_with_log(
        bed: &Testbed,
        config: &Path,
        socket: &Path,
        log: Option<&Path>,
    ) -> XdpMiddlebox {
        let mut middlebox = XdpMiddlebox::spawn(bed, config, socket, log);
        middlebox.wait_until("its workers report", |m| {
            m.stats().is_some_and(|s| s.workers > 0)
        });
        middlebox
    }

    /// Its log so far (empty unless started with a log file).
    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// Starts it and waits (at most a minute) until its control socket answers, for
    /// configurations that start without services (and so without workers).
    pub fn start_answering(bed: &Testbed, config: &Path, socket: &Path) -> XdpMiddlebox {
        let mut middlebox = XdpMiddlebox::spawn(bed, config, socket, None);
        middlebox.wait_until("its control socket answers", |m| {
            control::call(&m.socket, &Request::Stats).is_ok()
        });
        middlebox
    }

    fn spawn(bed: &Testbed, config: &Path, socket: &Path, log: Option<&Path>) -> XdpMiddlebox {
        let stderr = match log {
            Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
            None => Stdio::inherit(),
        };
        let child = bed
            .command(
                "middlebox",
                &[MIDDLEBOX, "run", "--config", config.to_str().unwrap()],
            )
            .unwrap()
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "ncp_dataplane=info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        XdpMiddlebox {
            child: Some(child),
            socket: socket.to_owned(),
            log: log.map(Path::to_owned),
        }
    }

    /// Waits until `ready` holds, failing the test if the process exits first or after a
    /// minute.
    fn wait_until(&mut self, what: &str, ready: impl Fn(&XdpMiddlebox) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready(self) {
            let exited = self.child.as_mut().unwrap().try_wait().unwrap();
            assert!(
                exited.is_none(),
                "ncp-middlebox exited at start: {exited:?}"
            );
            assert!(
                Instant::now() < deadline,
                "ncp-middlebox did not come up: waited until {what}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// The replication counters from its control socket (`None` until it answers).
    pub fn stats(&self) -> Option<ReplicationStats> {
        match control::call(&self.socket, &Request::Stats).ok()? {
            Response::Stats(s) => serde_json::from_value(s.replication?).ok(),
            _ => None,
        }
    }

    /// Sends it `signal` and returns its exit status (within 10 s).
    pub fn stop_with(mut self, signal_number: i32) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        signal(&child, signal_number);
        wait_bounded(
            &mut child,
            Duration::from_secs(10),
            &format!("ncp-middlebox after signal {signal_number}"),
        )
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| child.try_wait().unwrap().is_none())
    }

    /// Stops it with SIGTERM and expects a clean exit within 20 s.
    pub fn stop(mut self) {
        let mut child = self.child.take().unwrap();
        signal(&child, libc::SIGTERM);
        let status = wait_bounded(
            &mut child,
            Duration::from_secs(20),
            "ncp-middlebox after SIGTERM",
        );
        assert!(status.success(), "ncp-middlebox exited with {status}");
    }
}

impl Drop for XdpMiddlebox {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal(&child, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}
