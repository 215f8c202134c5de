//! `cargo xtask ci`: the one command CI runs (through `.ci/run`) and the README's test
//! command. Installs what is missing, then checks formatting, lints, and runs every test,
//! including the privileged ones in network namespaces with Open vSwitch and XDP, and runs
//! every fuzz target briefly.

use anyhow::Context as _;

use crate::{
    cmd::{run, run_env, step},
    setup,
};

/// Seconds each fuzz target runs in CI: six targets stay within about two minutes after
/// the build; longer runs are `cargo xtask fuzz --seconds N`.
const CI_FUZZ_SECONDS: u64 = 20;

/// Runs the whole pipeline, stopping at the first failure.
pub fn ci() -> anyhow::Result<()> {
    setup::setup()?;
    step("formatting (cargo fmt --check)");
    run(&["cargo", "fmt", "--all", "--", "--check"])
        .context("run `cargo fmt --all` and commit the result")?;
    step("lints (cargo clippy -D warnings)");
    run(&["cargo", "clippy", "--all-targets", "--", "-D", "warnings"])?;
    step("lints of the XDP program (bpf target, nightly)");
    run_env(
        &[
            "cargo",
            "+nightly",
            "clippy",
            "--manifest-path",
            "xdp-ebpf/Cargo.toml",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ],
        &[("CARGO_TARGET_DIR", "target/ebpf-clippy")],
    )?;
    step("tests (unit and privileged integration tests, one at a time)");
    // Integration tests share the host's Open vSwitch and CPU; running them one at a time
    // keeps their timing-sensitive parts (OVS learning, iperf3) honest on a 2-core machine.
    // CI=true turns a missing privilege or tool into a failure instead of a skip.
    let ci = std::env::var("CI").unwrap_or_default();
    run_env(
        &[
            "cargo",
            "test",
            "--workspace",
            "--exclude",
            "ncp-xdp",
            "--",
            "--test-threads=1",
        ],
        &[("CI", if ci.is_empty() { "false" } else { ci.as_str() })],
    )?;
    step(&format!(
        "fuzzing: every target for {CI_FUZZ_SECONDS} s (cargo xtask fuzz)"
    ));
    crate::fuzz::fuzz(&[], CI_FUZZ_SECONDS)?;
    step("end to end: the README's main job (cargo xtask demo) on the built-in test bed");
    crate::e2e::demo(false).context("the end-to-end demo failed")?;
    step("all checks passed");
    Ok(())
}
