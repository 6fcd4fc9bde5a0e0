//! Embeds the eBPF object.
//!
//! `INTERCEPTOR_EBPF_OBJECT` names it when set (`cargo xtask` builds it first and sets
//! it). Otherwise this script builds it, so that `cargo build` works from a clean tree:
//! `interceptor-ebpf` with the pinned nightly (`interceptor-ebpf/TOOLCHAIN`, installed
//! with rust-src by `cargo xtask setup`) for `bpfel-unknown-none`, linked by the
//! bpf-linker `cargo xtask setup` built against that toolchain's libLLVM, in a target
//! directory of its own under OUT_DIR. Either way the object is copied to OUT_DIR, from
//! where `ebpf::object` includes it. When it cannot be had, the crate still builds (so
//! `cargo check` and unit tests work on any machine), and loading fails with an error
//! that says to run `cargo xtask build-ebpf`.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

const TARGET: &str = "bpfel-unknown-none";

fn main() {
    println!("cargo:rerun-if-env-changed=INTERCEPTOR_EBPF_OBJECT");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let out = out_dir.join("interceptor-ebpf.o");
    let object = match env::var_os("INTERCEPTOR_EBPF_OBJECT") {
        Some(path) => {
            println!("cargo:rerun-if-changed={}", Path::new(&path).display());
            fs::read(&path)
                .map_err(|error| format!("INTERCEPTOR_EBPF_OBJECT={}: {error}", path.display()))
        }
        None => build(&out_dir),
    };
    match object {
        Ok(bytes) => fs::write(&out, bytes).expect("write OUT_DIR/interceptor-ebpf.o"),
        Err(reason) => {
            println!(
                "cargo:warning=no eBPF object ({reason}); run `cargo xtask setup` or \
                 `cargo xtask build-ebpf`. This build cannot load its programs."
            );
            fs::write(&out, b"").expect("write OUT_DIR/interceptor-ebpf.o");
        }
    }
}

/// Builds the kernel programs with the pinned toolchain; the object's bytes.
fn build(out_dir: &Path) -> Result<Vec<u8>, String> {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let crate_dir = manifest.join("../interceptor-ebpf");
    for watched in ["src", "Cargo.toml", "TOOLCHAIN", "build.rs"] {
        println!(
            "cargo:rerun-if-changed={}",
            crate_dir.join(watched).display()
        );
    }
    let toolchain = fs::read_to_string(crate_dir.join("TOOLCHAIN"))
        .map_err(|error| format!("reading interceptor-ebpf/TOOLCHAIN: {error}"))?;
    let toolchain = format!("+{}", toolchain.trim());
    let sysroot = run(Command::new("rustc").args([toolchain.as_str(), "--print", "sysroot"]))
        .map_err(|error| format!("the pinned toolchain {toolchain} is not installed: {error}"))?;
    let libllvm = fs::read_dir(Path::new(sysroot.trim()).join("lib"))
        .map_err(|error| error.to_string())?
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .find_map(|name| name.strip_prefix("libLLVM.so.").map(str::to_owned))
        .ok_or("no libLLVM in the pinned toolchain")?;
    // Where `cargo xtask setup` installs the matching linker (xtask/src/setup.rs).
    let home = env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    let linker_dir = home
        .join(".local/share/interceptor")
        .join(format!("bpf-linker-0.13.0-{libllvm}"))
        .join("bin");
    let mut path = vec![linker_dir];
    path.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    let target_dir = out_dir.join("ebpf-target");
    let mut cargo = Command::new("cargo");
    cargo
        .arg(&toolchain)
        .args([
            "build",
            "--package",
            "interceptor-ebpf",
            "--bin",
            "interceptor-ebpf",
        ])
        .args([
            "--features",
            "kernel",
            "--target",
            TARGET,
            "-Z",
            "build-std=core",
        ])
        .arg("--release")
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(manifest.join(".."))
        .env(
            "PATH",
            env::join_paths(path).map_err(|error| error.to_string())?,
        )
        .env(
            "CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS",
            "-C debuginfo=2 -C link-arg=--btf",
        );
    // The outer build's settings are not the inner one's.
    for (name, _) in env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_") && name != "CARGO_HOME"
            // RUSTC_WORKSPACE_WRAPPER: `cargo clippy`'s clippy-driver, of the outer toolchain.
            || name.starts_with("RUSTC")
            || name.starts_with("CLIPPY")
            || ["RUSTDOC", "RUSTUP_TOOLCHAIN", "RUSTFLAGS"].contains(&&*name)
        {
            cargo.env_remove(&*name);
        }
    }
    run(&mut cargo).map_err(|error| format!("building interceptor-ebpf: {error}"))?;
    let object = target_dir.join(TARGET).join("release/interceptor-ebpf");
    fs::read(&object).map_err(|error| format!("{}: {error}", object.display()))
}

/// Runs `command`; its stdout, or what went wrong with its stderr's tail.
fn run(command: &mut Command) -> Result<String, String> {
    let output = command.output().map_err(|error| error.to_string())?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        Err(format!(
            "{}: {}",
            output.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
        ))
    }
}
