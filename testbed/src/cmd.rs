//! The thin layer that runs external tools (`ip`, `ovs-vsctl`, `ethtool`, ...).
//! Everything that touches the system goes through here, so failures always carry the full
//! command line and its stderr.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Renders a command line for messages and logs.
pub fn cmdline(argv: &[&str]) -> String {
    argv.join(" ")
}

/// Runs `argv` and returns its output if it exited with status 0.
pub fn run(argv: &[&str]) -> Result<Output> {
    tracing::debug!(command = %cmdline(argv), "run");
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| Error::Name("empty command line".to_string()))?;
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| Error::Spawn {
            command: cmdline(argv),
            source,
        })?;
    check(argv, output)
}

/// Runs `argv` and returns its stdout as text.
pub fn stdout(argv: &[&str]) -> Result<String> {
    let out = run(argv)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Turns a non-zero exit status into an error that quotes stderr.
pub fn check(argv: &[&str], output: Output) -> Result<Output> {
    if output.status.success() {
        Ok(output)
    } else {
        let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        if stderr.is_empty() {
            stderr = String::from_utf8_lossy(&output.stdout).trim().to_string();
        }
        Err(Error::Command {
            command: cmdline(argv),
            status: output.status.to_string(),
            stderr,
        })
    }
}

/// True if `argv` runs and exits with status 0. Used for probes whose failure is an answer.
pub fn succeeds(argv: &[&str]) -> bool {
    run(argv).is_ok()
}

/// Calls `probe` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, what: &str, mut probe: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    loop {
        if probe() {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(Error::Timeout(format!(
                "{what} (waited {:.1} s)",
                timeout.as_secs_f64()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Is `program` on PATH (or an existing path)?
pub fn have(program: &str) -> bool {
    if program.contains('/') {
        return std::path::Path::new(program).is_file();
    }
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| dir.join(program).is_file())
}

/// Sends `signal` to `pid`. Returns false if the process is gone.
pub fn kill(pid: i32, signal: i32) -> bool {
    if pid <= 0 {
        // 0 and negative values address process groups; never do that by accident.
        return false;
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe { libc::kill(pid, signal) == 0 }
}

/// Does a process with this pid exist (and is it not a zombie)?
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Field 3 is the state; skip past the parenthesised command name, which may contain
        // spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Asks `pid` to stop with SIGTERM, then SIGKILLs it if it is still there after `grace`.
pub fn terminate(pid: i32, grace: Duration) {
    if !kill(pid, libc::SIGTERM) {
        return;
    }
    let _ = wait_until(grace, "process exit", || !alive(pid));
    if alive(pid) {
        tracing::debug!(pid, "still alive after SIGTERM, sending SIGKILL");
        kill(pid, libc::SIGKILL);
        let _ = wait_until(Duration::from_secs(2), "process exit", || !alive(pid));
    }
}
