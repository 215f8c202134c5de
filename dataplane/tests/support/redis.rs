//! A throwaway redis-server inside a test-bed host, and redis-cli against it: the
//! replicated service of the Redis scenes.

use std::{
    net::Ipv4Addr,
    process::{ChildStdin, Command},
    thread,
    time::{Duration, Instant},
};

use ncp_testbed::Testbed;

use super::run_fed;

/// The port every scene's redis listens on.
pub const PORT: u16 = 6379;

/// How long a fresh server may take to answer `PING`.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Arguments of a redis-server that persists nothing (so runs start empty) and answers
/// `DEBUG DIGEST` to clients on its own host only: the tests compare digests locally,
/// and nothing through the middlebox needs `DEBUG`.
pub fn server_argv() -> Vec<String> {
    [
        "redis-server",
        "--save",
        "",
        "--appendonly",
        "no",
        "--port",
        &PORT.to_string(),
        "--bind",
        "0.0.0.0",
        "--protected-mode",
        "no",
        "--enable-debug-command",
        "local",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// Waits until the server on `host` answers `PING`; fails the test after 20 s.
pub fn wait_ready(bed: &Testbed, host: &str) {
    let deadline = Instant::now() + START_TIMEOUT;
    while cli(bed, host, &["PING"]) != "PONG" {
        assert!(Instant::now() < deadline, "redis on {host} did not start");
        thread::sleep(Duration::from_millis(100));
    }
}

/// One command against the server on `host` itself (not through the middlebox); an error
/// comes back as text, so a test's comparison shows it.
pub fn cli(bed: &Testbed, host: &str, args: &[&str]) -> String {
    let port = PORT.to_string();
    let mut argv = vec!["redis-cli", "-h", "127.0.0.1", "-p", &port];
    argv.extend_from_slice(args);
    match bed.exec(host, &argv) {
        Ok(out) => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        Err(e) => format!("error: {e}"),
    }
}

/// `redis-cli --pipe` from the source host to `primary`: through the middlebox once the
/// scene steers the source's traffic there.
pub fn pipe_from_source(bed: &Testbed, primary: Ipv4Addr) -> Command {
    let port = PORT.to_string();
    let primary = primary.to_string();
    bed.command(
        "source",
        &["redis-cli", "-h", &primary, "-p", &port, "--pipe"],
    )
    .unwrap()
}

/// Runs a `redis-cli --pipe` command fed by `feed` (which gets its stdin) and returns its
/// output; fails if it fails or takes longer than three minutes.
pub fn run_pipe(command: Command, feed: impl FnOnce(ChildStdin) + Send + 'static) -> String {
    let fed = move |stdin| {
        feed(stdin);
        Ok(())
    };
    let (ok, out, err) = run_fed(command, fed, Duration::from_secs(180), "redis-cli --pipe");
    assert!(ok, "redis-cli --pipe failed: {out}{err}");
    out
}
