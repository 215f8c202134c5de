//! Builds the XDP program (`xdp-ebpf/`) for the bpf target with the nightly toolchain and
//! leaves the object in OUT_DIR, where `include_bytes_aligned!` embeds it in the binary.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let metadata = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR unset")?;
    let program_dir = std::path::Path::new(&metadata)
        .parent()
        .ok_or_else(|| anyhow!("data plane crate has no parent directory"))?
        .join("xdp-ebpf");
    let root_dir = program_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", program_dir.display()))?;
    let package = aya_build::Package {
        name: "ncp-xdp",
        root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default()).context(
        "building the XDP program failed; run `cargo xtask setup` to install bpf-linker, \
         rust-src for the nightly toolchain and LLVM 22",
    )
}
