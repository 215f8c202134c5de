//! `cargo xtask setup`: installs what building and testing NCP needs on a fresh Debian 12
//! machine (cargo-fuzz included), and does nothing (quickly) when everything is there.

use anyhow::{Context as _, bail};

use crate::cmd::{capture, have, run, run_env, step};

/// Debian packages: LLVM 22 for bpf-linker, the test bed (OVS, iproute2, ethtool), the
/// clients and servers the tests and benchmarks drive, capture tools, and Prometheus (the
/// metrics test scrapes ncpd with a real one).
pub const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "openvswitch-switch",
    "iproute2",
    "ethtool",
    "iputils-ping",
    "iperf3",
    "httperf",
    "redis-server",
    "redis-tools",
    "tcpdump",
    "tshark",
    "nftables",
    "socat",
    "postgresql",
    "python3",
    "prometheus",
];

/// The toolchain the XDP program builds with (see xdp-ebpf/rust-toolchain.toml).
const EBPF_TOOLCHAIN: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// `cargo xtask fuzz` drives cargo-fuzz (the fuzz targets build with the nightly
/// toolchain above).
const CARGO_FUZZ_VERSION: &str = "0.13";

/// Installs whatever is missing.
pub fn setup() -> anyhow::Result<()> {
    step("checking Debian packages");
    let missing = missing_packages()?;
    if missing.is_empty() {
        eprintln!("    all {} packages present", APT_PACKAGES.len());
    } else {
        eprintln!("    installing: {}", missing.join(" "));
        run(&["apt-get", "update", "-q"]).context("apt-get update (needs root)")?;
        let mut argv = vec!["apt-get", "install", "-y", "-q", "--no-install-recommends"];
        argv.extend(missing.iter().map(String::as_str));
        run_env(&argv, &[("DEBIAN_FRONTEND", "noninteractive")])?;
    }

    step(&format!(
        "checking rust-src for the `{EBPF_TOOLCHAIN}` toolchain"
    ));
    let components = capture(&[
        "rustup",
        "component",
        "list",
        "--toolchain",
        EBPF_TOOLCHAIN,
        "--installed",
    ])?;
    if !components.status.success() {
        bail!(
            "the `{EBPF_TOOLCHAIN}` Rust toolchain is missing; the XDP program needs it \
             (rustup toolchain install nightly)"
        );
    }
    if String::from_utf8_lossy(&components.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        eprintln!("    present");
    } else {
        run(&[
            "rustup",
            "component",
            "add",
            "rust-src",
            "--toolchain",
            EBPF_TOOLCHAIN,
        ])?;
    }

    step(&format!("checking bpf-linker {BPF_LINKER_VERSION}"));
    let current = version_of("bpf-linker", &["bpf-linker", "--version"]);
    if current.contains(&format!("bpf-linker {BPF_LINKER_VERSION}.")) {
        eprintln!("    present: {}", current.trim());
    } else {
        eprintln!("    building bpf-linker against LLVM 22 (a few minutes, once)");
        run_env(
            &[
                "cargo",
                "install",
                "bpf-linker",
                "--version",
                &format!("^{BPF_LINKER_VERSION}"),
                "--no-default-features",
                "--features",
                "llvm-22",
            ],
            &[("LLVM_PREFIX", LLVM_PREFIX)],
        )?;
    }
    step(&format!("checking cargo-fuzz {CARGO_FUZZ_VERSION}"));
    let current = version_of("cargo-fuzz", &["cargo", "fuzz", "--version"]);
    if current.contains(&format!("cargo-fuzz {CARGO_FUZZ_VERSION}.")) {
        eprintln!("    present: {}", current.trim());
    } else {
        eprintln!("    building cargo-fuzz (about two minutes, once)");
        run(&[
            "cargo",
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            &format!("^{CARGO_FUZZ_VERSION}"),
        ])?;
    }
    step("setup complete");
    Ok(())
}

/// What `argv` (a `--version` call) prints, or nothing when `program` is not installed.
fn version_of(program: &str, argv: &[&str]) -> String {
    have(program)
        .then(|| capture(argv).ok())
        .flatten()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn missing_packages() -> anyhow::Result<Vec<String>> {
    let mut missing = Vec::new();
    for pkg in APT_PACKAGES {
        let out = capture(&["dpkg-query", "-W", "-f=${Status}", pkg])?;
        if !String::from_utf8_lossy(&out.stdout).contains("install ok installed") {
            missing.push((*pkg).to_owned());
        }
    }
    Ok(missing)
}
