//! `cargo xtask bench`: setup, the eBPF object, the agent and the bench binaries in
//! release mode, then the benchmark on a simulated node (tests/src/bin/bench/). It prints
//! a table and writes the figures as JSON (default `target/bench/report.json`).

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

use crate::{ebpf, run, setup};

#[derive(Args)]
pub struct BenchOptions {
    /// Smaller counts: well under two minutes instead of a few.
    #[arg(long)]
    pub quick: bool,
    /// Where the JSON report goes.
    #[arg(long, default_value = "target/bench/report.json")]
    pub out: PathBuf,
}

pub fn run(options: &BenchOptions) -> Result<()> {
    if !run::is_root() {
        bail!("cargo xtask bench must run as root (it loads eBPF programs)");
    }
    setup::run(false)?;
    let object = ebpf::build(&ebpf::BuildOptions::default())?;
    // What is measured is the release build of the agent, and the load client and the
    // floor server are release builds too, so that neither is the slow side.
    run::status(
        run::cargo(None)
            .args(["build", "--release", "--package", "interceptor", "--bins"])
            .env("INTERCEPTOR_EBPF_OBJECT", &object),
    )?;
    run::status(
        run::cargo(None)
            .args(["build", "--release", "--package", "interceptor-tests"])
            .args(["--bin", "bench", "--bin", "bench-load"])
            .env("INTERCEPTOR_EBPF_OBJECT", &object),
    )?;
    let root = run::workspace_root();
    let out = if options.out.is_absolute() {
        options.out.clone()
    } else {
        root.join(&options.out)
    };
    let mut bench = std::process::Command::new(root.join("target/release/bench"));
    if options.quick {
        bench.arg("--quick");
    }
    run::status(
        bench
            .arg("--out")
            .arg(out)
            .env("INTERCEPTOR_BIN", root.join("target/release/interceptor"))
            .env(
                "INTERCEPTOR_PY_VENV",
                setup::peers_dir("venv", &setup::python_requirements())?,
            ),
    )
}
