//! `cargo xtask`: NCP's developer and operator tasks.

mod ci;
mod cmd;
mod setup;

use clap::{Parser, Subcommand};

/// NCP's tasks: install prerequisites, run CI, manage the test bed.
#[derive(Parser, Debug)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand, Debug)]
enum Task {
    /// Install everything NCP needs (apt packages, rust-src, bpf-linker); idempotent.
    Setup,
    /// Everything CI checks: setup, fmt, clippy, unit and privileged integration tests.
    Ci,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().task {
        Task::Setup => setup::setup(),
        Task::Ci => ci::ci(),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
