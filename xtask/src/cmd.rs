//! Running external commands with a visible trace and errors that say what failed.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// Prints a step header, the way every long xtask shows what it is doing.
pub fn step(what: &str) {
    eprintln!("==> {what}");
}

/// Runs `argv` with inherited output; fails with the command line if it exits non-zero.
pub fn run(argv: &[&str]) -> anyhow::Result<()> {
    run_env(argv, &[])
}

/// Like [`run`] with extra environment variables.
pub fn run_env(argv: &[&str], env: &[(&str, &str)]) -> anyhow::Result<()> {
    let (program, args) = argv.split_first().context("empty command")?;
    eprintln!("    $ {}", argv.join(" "));
    let status = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("starting `{program}`"))?;
    if !status.success() {
        bail!("`{}` failed ({status})", argv.join(" "));
    }
    Ok(())
}

/// Runs `argv` quietly and returns its output whatever the exit status.
pub fn capture(argv: &[&str]) -> anyhow::Result<Output> {
    let (program, args) = argv.split_first().context("empty command")?;
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting `{program}`"))
}

/// Whether `program` is on PATH.
pub fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Asks our own child to stop with SIGTERM, gives it `grace` to exit, then kills it; always
/// reaps it, so no zombie is left behind.
pub fn stop_child(child: &mut Child, grace: Duration) {
    // SAFETY: kill(2) takes plain integers; the pid is our own child's, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Past the grace period: the process ignored SIGTERM, so force it (errors mean it has
    // just exited, which is what we want).
    let _ = child.kill();
    let _ = child.wait();
}
