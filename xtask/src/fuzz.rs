//! `cargo xtask fuzz`: runs each `cargo fuzz` target of `interceptor/fuzz` for a bounded
//! time, from the committed seed corpus, and fails on the first property violation.
//!
//! Working corpora and crash artifacts go under `interceptor/fuzz/work/` (ignored by git);
//! a crashing input found is to be copied to `interceptor/fuzz/regressions/<target>/`,
//! where the normal test suite replays it (`interceptor/tests/fuzz_corpus.rs`).

use std::{fs, process::Command};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::run;

/// Every target in `interceptor/fuzz/Cargo.toml`.
const TARGETS: &[&str] = &[
    "imds_route",
    "imds_token",
    "policy",
    "cgroup_path",
    "bindings",
];

#[derive(Args)]
pub struct FuzzOptions {
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    seconds: u32,
    /// Only this target (default: all).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    target: Option<String>,
}

pub fn run(options: &FuzzOptions) -> Result<()> {
    if options.seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    cargo_fuzz()?;
    let fuzz_dir = run::workspace_root().join("interceptor/fuzz");
    let targets: Vec<&str> = match &options.target {
        Some(target) => vec![target.as_str()],
        None => TARGETS.to_vec(),
    };
    let mut failed = Vec::new();
    for target in targets {
        let work = fuzz_dir.join("work").join(target);
        let artifacts = fuzz_dir.join("artifacts").join(target);
        fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        fs::create_dir_all(&artifacts)?;
        let seeds = fuzz_dir.join("corpus").join(target);
        let regressions = fuzz_dir.join("regressions").join(target);
        let mut cmd = run::cargo(Some(run::NIGHTLY));
        // From the crate the targets fuzz: cargo fuzz finds them in its `fuzz/`.
        cmd.current_dir(run::workspace_root().join("interceptor"))
            .args(["fuzz", "run"])
            .arg(target)
            .arg(&work)
            .arg(&seeds);
        if regressions.is_dir() {
            cmd.arg(&regressions);
        }
        cmd.arg("--")
            .arg(format!("-max_total_time={}", options.seconds))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-max_len=4096");
        if let Err(error) = run::status(&mut cmd) {
            eprintln!(
                "fuzz: {target} failed ({error}); the input is under {} — copy it to {} so \
                 that `cargo xtask test` replays it",
                artifacts.display(),
                regressions.display()
            );
            failed.push(target);
        }
    }
    if !failed.is_empty() {
        bail!("fuzz targets found property violations: {failed:?}");
    }
    eprintln!(
        "fuzz: every target ran {} s without a finding",
        options.seconds
    );
    Ok(())
}

/// cargo-fuzz, installed into cargo's bin directory if missing.
fn cargo_fuzz() -> Result<()> {
    let installed = run::output(Command::new("cargo").args(["fuzz", "--version"])).is_some();
    if installed {
        return Ok(());
    }
    run::status(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
}
