//! Checking that this machine can build a test bed, and the skip-or-fail rule for tests.

use std::fmt;
use std::io::Write;

use crate::cmd;

/// Tools `up`/`down` run. The OVS daemons are only needed when they are not running yet,
/// but a test machine should have them, so they are required too.
pub const REQUIRED_TOOLS: &[&str] = &[
    "ip",
    "ethtool",
    "sysctl",
    "ovs-vsctl",
    "ovs-appctl",
    "ovsdb-tool",
    "ovsdb-server",
    "ovs-vswitchd",
];

/// What is missing for a test bed on this machine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Missing {
    pub items: Vec<String>,
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "test bed needs {}", self.items.join("; "))
    }
}

/// Checks for root and for [`REQUIRED_TOOLS`] plus `extra_tools` (e.g. `ping`, `iperf3`).
pub fn require_tools(extra_tools: &[&str]) -> Result<(), Missing> {
    let mut items = Vec::new();
    // SAFETY: geteuid(2) has no arguments and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        items.push(format!("root (running as uid {euid})"));
    }
    for tool in REQUIRED_TOOLS.iter().chain(extra_tools) {
        if !cmd::have(tool) {
            items.push(format!("`{tool}` on PATH"));
        }
    }
    if items.is_empty() {
        Ok(())
    } else {
        Err(Missing { items })
    }
}

/// Checks for root, `ip`, `ethtool`, `sysctl` and the OVS tools.
pub fn require_privileges() -> Result<(), Missing> {
    require_tools(&[])
}

/// The rule for tests that need a test bed: returns true when the machine is ready.
/// Otherwise, when the environment has `CI=true` this panics (a CI run must never pass by
/// skipping); elsewhere it prints `skipped: <test>: <what is missing>` and returns false, and
/// the test should return early.
pub fn ready_or_skip(test: &str, extra_tools: &[&str]) -> bool {
    match require_tools(extra_tools) {
        Ok(()) => true,
        Err(missing) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{test}: CI=true and {missing}");
            }
            // Written to stderr directly rather than with `eprintln!`, which the test harness
            // captures and hides for passing tests: a skip must be visible.
            let _ = writeln!(std::io::stderr(), "skipped: {test}: {missing}");
            false
        }
    }
}
