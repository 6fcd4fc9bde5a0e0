//! `cargo xtask bench`: setup, the eBPF object, the agent and the bench binaries in
//! release mode, then the benchmark on a simulated node (tests/src/bin/bench/) with a
//! real control plane (kube-apiserver and etcd built by setup). It prints
//! a table and writes the figures as JSON (default `bench/report.json` in the target
//! directory).

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

use crate::{ebpf, leftovers, run, setup};

#[derive(Args)]
pub struct BenchOptions {
    /// Smaller counts: well under two minutes instead of a few.
    #[arg(long)]
    pub quick: bool,
    /// Where the JSON report goes (default: `bench/report.json` in the target directory).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Run only this scenario (1-9, docs/performance.md); repeatable. Default: all.
    #[arg(long = "scenario", value_parser = clap::value_parser!(u8).range(1..=9))]
    pub scenarios: Vec<u8>,
}

pub fn run(options: &BenchOptions) -> Result<()> {
    if !run::is_root() {
        bail!("cargo xtask bench must run as root (it loads eBPF programs)");
    }
    leftovers::sweep();
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
    let out = match &options.out {
        Some(out) if out.is_absolute() => out.clone(),
        Some(out) => root.join(out),
        None => run::target_dir().join("bench/report.json"),
    };
    let mut bench = std::process::Command::new(run::target_dir().join("release/bench"));
    if options.quick {
        bench.arg("--quick");
    }
    for scenario in &options.scenarios {
        bench.arg("--scenario").arg(scenario.to_string());
    }
    run::status(
        bench
            .arg("--out")
            .arg(out)
            .env(
                "INTERCEPTOR_BIN",
                run::target_dir().join("release/interceptor"),
            )
            .env(
                "INTERCEPTOR_PY_VENV",
                setup::peers_dir("venv", &setup::python_requirements())?,
            )
            // The bench runs the agent against a real kube-apiserver and etcd.
            .env("INTERCEPTOR_K8S_BIN", setup::k8s_bin_dir()?),
    )
}
