//! Small helpers for running commands and finding the workspace.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

/// The toolchain that builds the eBPF programs (and runs nightly-only tools: rustfmt with
/// this repository's options, cargo fuzz). Pinned: a machine's undated `nightly` may be
/// another version or absent, and bpf-linker must be linked against this toolchain's
/// own libLLVM. `cargo xtask setup` installs it with rustup. The name lives in
/// `interceptor-ebpf/TOOLCHAIN`, which `interceptor/build.rs` reads too.
pub const NIGHTLY: &str = include_str!("../../interceptor-ebpf/TOOLCHAIN").trim_ascii();

/// The workspace root (the parent of `xtask/`).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(PathBuf::from)
        .unwrap_or(manifest_dir)
}

/// Runs `cmd`, streaming its output, and fails with the command line if it fails.
pub fn status(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("could not start {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed: {status}", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout, or `None` if it could not run or failed.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A command run with a given rustup toolchain, with the outer cargo's variables removed so
/// that they do not leak into the inner build.
pub fn cargo(toolchain: Option<&str>) -> Command {
    let mut cmd = Command::new("cargo");
    if let Some(toolchain) = toolchain {
        cmd.arg(format!("+{toolchain}"));
    }
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
    ] {
        cmd.env_remove(var);
    }
    cmd.current_dir(workspace_root());
    cmd
}

pub fn describe(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// The target directory, as cargo sees it (`CARGO_TARGET_DIR`, `build.target-dir`, or
/// `<workspace>/target`): asked of `cargo metadata` once.
pub fn target_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        output(
            cargo(None)
                .args(["metadata", "--format-version", "1", "--no-deps"])
                .stdin(Stdio::null()),
        )
        .and_then(|json| serde_json::from_str::<serde_json::Value>(&json).ok())
        .and_then(|metadata| metadata["target_directory"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| workspace_root().join("target"))
    })
    .clone()
}

pub fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|uid| uid.trim() == "0")
}
