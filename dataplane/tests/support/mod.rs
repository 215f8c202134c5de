//! Helpers shared by the privileged integration tests (each test file includes this with
//! `mod support;` and uses the part it needs).
#![allow(dead_code, reason = "each test crate uses a different subset")]
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step should fail the test"
)]

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::Child,
    sync::{Mutex, MutexGuard},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

/// One test bed at a time: on two shared cores, parallel userspace-datapath traffic
/// spoils every timing.
static SERIAL: Mutex<()> = Mutex::new(());

/// Takes the one-test-bed-at-a-time lock (and sets up test logging once).
pub fn serial() -> MutexGuard<'static, ()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "ncp_dataplane=info,ncp_testbed=warn".into()),
        )
        .with_test_writer()
        .try_init();
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `f` on a new thread inside network namespace `netns` (threads it spawns inherit
/// the namespace; the rest of the process stays where it is).
pub fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let path = format!("/run/netns/{netns}");
    thread::spawn(move || {
        let ns = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns(2) on a valid namespace fd; it only changes this thread's network
        // namespace, which is the point.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
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
