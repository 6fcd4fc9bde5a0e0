//! `cargo xtask build-ebpf`: the kernel programs, built with the pinned nightly
//! ([`run::NIGHTLY`]) for bpfel-unknown-none.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use crate::{run, setup};

pub const TARGET: &str = "bpfel-unknown-none";
/// BTF in the object lets bpftool show the maps' key and value types.
pub const RUSTFLAGS: &str = "-C debuginfo=2 -C link-arg=--btf";

#[derive(Args, Default)]
pub struct BuildOptions {
    /// Build without optimisations (the verifier rejects most debug builds; for experiments).
    #[arg(long)]
    pub debug: bool,
}

/// Builds the object and returns its path. The userspace build embeds exactly this file
/// (see `interceptor/build.rs`, which finds it by the same rule).
pub fn build(options: &BuildOptions) -> Result<PathBuf> {
    let profile = if options.debug { "dev" } else { "release" };
    // The pinned toolchain and its bpf-linker (cheap checks when present).
    setup::run(true)?;
    let mut cmd = run::cargo(Some(run::NIGHTLY));
    cmd.env("PATH", setup::path_with_bpf_linker()?);
    cmd.args([
        "build",
        "--package",
        "interceptor-ebpf",
        "--bin",
        "interceptor-ebpf",
        "--features",
        "kernel",
        "--target",
        TARGET,
        "-Z",
        "build-std=core",
        "--profile",
        profile,
    ])
    .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS", RUSTFLAGS);
    run::status(&mut cmd).context("building the eBPF programs (is `cargo xtask setup` done?)")?;
    let dir = if options.debug { "debug" } else { "release" };
    let object = object_path(dir);
    anyhow::ensure!(
        object.is_file(),
        "the build produced no {}",
        object.display()
    );
    eprintln!("eBPF object: {}", object.display());
    Ok(object)
}

pub fn object_path(profile_dir: &str) -> PathBuf {
    run::target_dir()
        .join(TARGET)
        .join(profile_dir)
        .join("interceptor-ebpf")
}
