//! `cargo xtask setup`: everything a fresh machine lacks, installed from this repository's
//! own files. Idempotent: each step checks first and is skipped when already satisfied.
//!
//! The steps follow the measured recipe for these machines (Debian 12, root, registries
//! only): Debian packages, `rust-src` for the nightly toolchain, `bpf-linker` linked
//! against the nightly's own libLLVM, and the Python and npm test peers.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::run::{self, output, workspace_root};

/// Commands the tests and the agent's tooling need, and the Debian package providing each.
const DEBIAN_PACKAGES: [(&str, &str); 5] = [
    ("bpftool", "bpftool"),
    ("ip", "iproute2"),
    ("iptables", "iptables"),
    ("capsh", "libcap2-bin"),
    // cargo xtask bench's per-request profile (perf stat, allocator uprobes).
    ("perf", "linux-perf"),
];

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run(build_only: bool) -> Result<()> {
    nightly_rust_src()?;
    bpf_linker()?;
    if build_only {
        return Ok(());
    }
    debian_packages()?;
    python_peers()?;
    js_peers()?;
    eprintln!("setup: all present");
    Ok(())
}

fn have(command: &str) -> bool {
    output(Command::new("sh").args(["-c", &format!("command -v {command}")])).is_some()
        || Path::new("/usr/sbin").join(command).exists()
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .filter(|(command, _)| !have(command))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !run::is_root() {
        bail!("missing Debian packages {missing:?}; run `cargo xtask setup` as root");
    }
    run::status(Command::new("apt-get").args(["update", "-qq"]))?;
    run::status(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn nightly_rust_src() -> Result<()> {
    let Some(installed) = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ])) else {
        bail!(
            "no nightly toolchain: the eBPF build needs rustup's nightly (see ../shared/TOOLCHAIN.md)"
        );
    };
    if installed.lines().any(|line| line.starts_with("rust-src")) {
        return Ok(());
    }
    run::status(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

/// bpf-linker must be built against an LLVM whose major version matches the nightly
/// rustc's; Debian's LLVM is older. The nightly ships its own libLLVM, so a prefix
/// directory of symlinks to it stands in for an LLVM install. The directory is named
/// after the exact library so a new nightly gets a new prefix (and a rebuild).
fn bpf_linker() -> Result<()> {
    if let Some(version) = output(Command::new("bpf-linker").arg("--version"))
        && version.contains(BPF_LINKER_VERSION)
        && linker_llvm_matches()
    {
        return Ok(());
    }
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("rustc +nightly --print sysroot")?;
    let lib_dir = PathBuf::from(sysroot.trim()).join("lib");
    let libllvm = fs::read_dir(&lib_dir)?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;
    let major = llvm_major()?;
    let prefix = data_dir().join(format!(
        "llvm-{}",
        libllvm.trim_start_matches("libLLVM.so.")
    ));
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    for link in ["libLLVM.so", libllvm.as_str()] {
        let path = prefix_lib.join(link);
        let _ = fs::remove_file(&path);
        std::os::unix::fs::symlink(lib_dir.join(&libllvm), &path)
            .with_context(|| format!("symlink {}", path.display()))?;
    }
    run::status(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--force",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ])
            .env("LLVM_PREFIX", &prefix)
            .env_remove("RUSTUP_TOOLCHAIN"),
    )
}

/// The LLVM major version of the nightly rustc (`LLVM version: 22.1.4` -> 22).
fn llvm_major() -> Result<String> {
    let verbose =
        output(Command::new("rustc").args(["+nightly", "-vV"])).context("rustc +nightly -vV")?;
    verbose
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|version| version.split('.').next())
        .map(str::to_owned)
        .context("rustc +nightly -vV printed no LLVM version")
}

/// bpf-linker's RUNPATH points into the prefix directory: if the nightly was replaced, the
/// library it names is gone and the linker must be rebuilt.
fn linker_llvm_matches() -> bool {
    output(Command::new("bpf-linker").arg("--help")).is_some()
}

fn data_dir() -> PathBuf {
    let home = env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into());
    home.join(".local/share/interceptor")
}

/// Where the test peers live: outside the work tree, keyed by the hash of the file that
/// lists them, so a fresh clone reuses an identical install and a changed list gets a new
/// one.
pub fn peers_dir(kind: &str, spec: &Path) -> Result<PathBuf> {
    let bytes = fs::read(spec).with_context(|| format!("reading {}", spec.display()))?;
    Ok(data_dir().join(format!("{kind}-{:016x}", fnv1a(&bytes))))
}

pub fn python_requirements() -> PathBuf {
    workspace_root().join("tests/peers/requirements.txt")
}

pub fn js_package() -> PathBuf {
    workspace_root().join("tests/peers/js/package.json")
}

fn python_peers() -> Result<()> {
    let venv = peers_dir("venv", &python_requirements())?;
    let done = venv.join(".installed");
    if done.exists() {
        return Ok(());
    }
    let _ = fs::remove_dir_all(&venv);
    run::status(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run::status(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
            .arg(python_requirements()),
    )?;
    fs::write(&done, b"")?;
    Ok(())
}

fn js_peers() -> Result<()> {
    let dir = peers_dir("js", &js_package())?;
    let done = dir.join(".installed");
    if done.exists() {
        return Ok(());
    }
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    fs::copy(js_package(), dir.join("package.json"))?;
    run::status(
        Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir),
    )?;
    fs::write(&done, b"")?;
    Ok(())
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
