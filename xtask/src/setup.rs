//! `cargo xtask setup`: everything a fresh machine lacks, installed from this repository's
//! own files. Idempotent: each step checks first and is skipped when already satisfied.
//!
//! The steps follow the measured recipe for these machines (Debian 12, root, registries
//! only): Debian packages, the pinned nightly toolchain with `rust-src` (installed by
//! rustup), `bpf-linker` linked against that toolchain's own libLLVM, and the Python and
//! npm test peers.

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
    pinned_nightly()?;
    bpf_linker()?;
    if build_only {
        return Ok(());
    }
    debian_packages()?;
    python_peers()?;
    js_peers()?;
    control_plane()?;
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

/// The pinned nightly ([`run::NIGHTLY`]) with the components the eBPF build and the
/// checks need, installed by rustup when missing.
fn pinned_nightly() -> Result<()> {
    const COMPONENTS: [&str; 3] = ["rust-src", "rustfmt", "clippy"];
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        run::NIGHTLY,
        "--installed",
    ]))
    .unwrap_or_default();
    let has = |component: &str| installed.lines().any(|line| line.starts_with(component));
    if COMPONENTS.iter().all(|component| has(component)) {
        return Ok(());
    }
    if output(Command::new("rustup").arg("--version")).is_none() {
        bail!(
            "no rustup: the eBPF build needs rustup to install {}",
            run::NIGHTLY
        );
    }
    let mut install = Command::new("rustup");
    install.args(["toolchain", "install", run::NIGHTLY, "--profile", "minimal"]);
    for component in COMPONENTS {
        install.args(["--component", component]);
    }
    run::status(&mut install)
}

/// bpf-linker must be built against an LLVM whose major version matches the pinned
/// nightly rustc's; Debian's LLVM is older. The nightly ships its own libLLVM, so a
/// prefix directory of symlinks to it stands in for an LLVM install. The linker is
/// installed into a directory of its own, named after that exact library (so another
/// toolchain never finds it, and a new pin gets a new linker), which
/// [`path_with_bpf_linker`] puts first on the eBPF build's PATH.
fn bpf_linker() -> Result<()> {
    let (libllvm, lib_dir) = pinned_libllvm()?;
    let root = linker_root(&libllvm);
    let linker = root.join("bin/bpf-linker");
    if let Some(version) = output(Command::new(&linker).arg("--version"))
        && version.contains(BPF_LINKER_VERSION)
        // Its RUNPATH points into the prefix: if the toolchain was removed, it cannot run.
        && output(Command::new(&linker).arg("--help")).is_some()
    {
        return Ok(());
    }
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
            .arg("--root")
            .arg(&root)
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ])
            .env("LLVM_PREFIX", &prefix)
            .env_remove("RUSTUP_TOOLCHAIN"),
    )
}

/// The pinned toolchain's libLLVM file name and the directory holding it.
fn pinned_libllvm() -> Result<(String, PathBuf)> {
    let toolchain = format!("+{}", run::NIGHTLY);
    let sysroot = output(Command::new("rustc").args([toolchain.as_str(), "--print", "sysroot"]))
        .with_context(|| format!("rustc {toolchain} --print sysroot"))?;
    let lib_dir = PathBuf::from(sysroot.trim()).join("lib");
    let libllvm = fs::read_dir(&lib_dir)?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;
    Ok((libllvm, lib_dir))
}

fn linker_root(libllvm: &str) -> PathBuf {
    data_dir().join(format!(
        "bpf-linker-{BPF_LINKER_VERSION}-{}",
        libllvm.trim_start_matches("libLLVM.so.")
    ))
}

/// PATH with the pinned toolchain's bpf-linker first.
pub fn path_with_bpf_linker() -> Result<std::ffi::OsString> {
    let (libllvm, _) = pinned_libllvm()?;
    let mut paths = vec![linker_root(&libllvm).join("bin")];
    paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    Ok(env::join_paths(paths)?)
}

/// The LLVM major version of the pinned rustc (`LLVM version: 22.1.4` -> 22).
fn llvm_major() -> Result<String> {
    let toolchain = format!("+{}", run::NIGHTLY);
    let verbose = output(Command::new("rustc").args([toolchain.as_str(), "-vV"]))
        .with_context(|| format!("rustc {toolchain} -vV"))?;
    verbose
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|version| version.split('.').next())
        .map(str::to_owned)
        .context("rustc -vV printed no LLVM version")
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

/// The Go module that builds the tests' Kubernetes control plane.
fn k8s_module() -> PathBuf {
    workspace_root().join("tests/k8s")
}

/// The files whose contents decide what the control plane build produces.
const K8S_INPUTS: [&str; 3] = ["go.mod", "go.sum", "cmd/etcd/main.go"];

/// Where `kube-apiserver` and `etcd` are built: outside the work tree, keyed by the hash
/// of the module's files (the versions are in go.mod and go.sum), so an unchanged module
/// is never rebuilt and a changed one gets a directory of its own.
pub fn k8s_bin_dir() -> Result<PathBuf> {
    let mut bytes = Vec::new();
    for input in K8S_INPUTS {
        let path = k8s_module().join(input);
        bytes.extend(fs::read(&path).with_context(|| format!("reading {}", path.display()))?);
    }
    Ok(data_dir()
        .join(format!("k8s-{:016x}", fnv1a(&bytes)))
        .join("bin"))
}

/// The Go toolchain: `go` on PATH, else the official install location.
fn go() -> Result<PathBuf> {
    if have("go") {
        return Ok("go".into());
    }
    let installed = PathBuf::from("/usr/local/go/bin/go");
    if installed.is_file() {
        return Ok(installed);
    }
    bail!(
        "no Go toolchain (go on PATH or /usr/local/go/bin/go): the tests' kube-apiserver and etcd are built from tests/k8s with Go 1.26"
    )
}

/// `go build` of kube-apiserver (k8s.io/kubernetes) and etcd (go.etcd.io/etcd/server)
/// from tests/k8s. Modules come only from the Go module proxy (no `direct` fallback, no
/// toolchain download) and are checked against go.sum. Symbols and paths are stripped:
/// the binaries are for tests, and half the size links faster. Run with `nice`: it takes
/// minutes on two cores (docs/control-plane.md has the measurements).
fn control_plane() -> Result<()> {
    let bin = k8s_bin_dir()?;
    if bin.join("kube-apiserver").is_file() && bin.join("etcd").is_file() {
        return Ok(());
    }
    let go = go()?;
    let building = bin.with_file_name("bin.partial");
    let _ = fs::remove_dir_all(&building);
    fs::create_dir_all(&building)?;
    eprintln!(
        "setup: building kube-apiserver and etcd from tests/k8s into {} (minutes)",
        bin.display()
    );
    run::status(
        Command::new("nice")
            .arg(&go)
            .args(["build", "-trimpath", "-ldflags=-s -w", "-o"])
            .arg(format!("{}/", building.display()))
            .args(["k8s.io/kubernetes/cmd/kube-apiserver", "./cmd/etcd"])
            .current_dir(k8s_module())
            .env("GOPROXY", "https://proxy.golang.org")
            .env("GOTOOLCHAIN", "local")
            .env("GOFLAGS", "-mod=readonly")
            .env("CGO_ENABLED", "0"),
    )?;
    let _ = fs::remove_dir_all(&bin);
    fs::rename(&building, &bin)?;
    Ok(())
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
