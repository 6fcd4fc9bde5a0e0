//! Embeds the eBPF object produced by `cargo xtask build-ebpf`.
//!
//! The object is found by one rule: `INTERCEPTOR_EBPF_OBJECT` if set (xtask sets it),
//! else the release output of `cargo xtask build-ebpf` in this workspace's target
//! directory. It is copied to OUT_DIR, from where `ebpf::object` includes it. Without it
//! the crate still builds (so `cargo check` and unit tests work before the first eBPF
//! build), and loading fails with an error that says to run `cargo xtask build-ebpf`.

use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=INTERCEPTOR_EBPF_OBJECT");
    let source = env::var_os("INTERCEPTOR_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
            manifest.join("../target/bpfel-unknown-none/release/interceptor-ebpf")
        });
    println!("cargo:rerun-if-changed={}", source.display());
    let out =
        PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("interceptor-ebpf.o");
    match fs::read(&source) {
        Ok(bytes) => fs::write(&out, bytes).expect("write OUT_DIR/interceptor-ebpf.o"),
        Err(error) => {
            println!(
                "cargo:warning=no eBPF object at {} ({error}); run `cargo xtask build-ebpf`. \
                 This build cannot load its programs.",
                source.display()
            );
            fs::write(&out, b"").expect("write OUT_DIR/interceptor-ebpf.o");
        }
    }
}
