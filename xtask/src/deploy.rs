//! `cargo xtask deploy --config F [--netns NAME]`: how a user puts the middlebox on a host.
//! Validates the configuration with the binary's own `check`, builds in release mode and
//! runs `ncp-middlebox run` in the foreground (optionally inside a test-bed namespace),
//! after printing which queue runs on which core.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{cmd::step, middlebox};

/// Validates, builds and runs the middlebox until it exits (Ctrl-C stops it cleanly).
pub fn deploy(config: &Path, netns: Option<&str>) -> anyhow::Result<()> {
    let bins = middlebox::build_release(&["ncp-dataplane"])?;
    let binary = bins.join("ncp-middlebox");
    step(&format!("validating {}", config.display()));
    let check = Command::new(&binary)
        .arg("check")
        .arg("--config")
        .arg(config)
        .output()
        .context("running ncp-middlebox check")?;
    print!("{}", String::from_utf8_lossy(&check.stdout));
    if !check.status.success() {
        let message = String::from_utf8_lossy(&check.stderr);
        bail!("{}", message.trim().trim_start_matches("error: "));
    }
    let mut command = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&binary);
            c
        }
        None => Command::new(&binary),
    };
    command
        .arg("run")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null());
    step(&format!(
        "starting the middlebox{} (Ctrl-C or SIGTERM stops it and detaches XDP)",
        netns
            .map(|n| format!(" in namespace {n}"))
            .unwrap_or_default()
    ));
    let status = command.status().context("starting ncp-middlebox")?;
    if !status.success() {
        bail!("ncp-middlebox exited with {status}");
    }
    Ok(())
}
