//! `cargo xtask test`: the README's test command. Runs every check and test there is,
//! privileged ones included, after installing and building what they need.

use std::{
    env,
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Result, bail};
use clap::Args;

use crate::{ebpf, leftovers, run, setup};

#[derive(Args)]
pub struct TestOptions {
    /// Skip `cargo xtask setup` (for quick local iterations).
    #[arg(long)]
    pub no_setup: bool,
    /// Extra arguments for `cargo test` (e.g. a test name filter), after `--`.
    #[arg(last = true)]
    pub cargo_args: Vec<String>,
}

pub fn run(options: &TestOptions) -> Result<()> {
    if !run::is_root() {
        // The tests load eBPF programs and create network namespaces and cgroups.
        bail!("cargo xtask test must run as root (the tests load eBPF programs)");
    }
    leftovers::sweep();
    if !options.no_setup {
        setup::run(false)?;
    }
    let object = ebpf::build(&ebpf::BuildOptions::default())?;
    // The kernel crate builds for another target: checked on its own.
    run::status(
        run::cargo(Some(run::NIGHTLY))
            .args([
                "clippy",
                "--package",
                "interceptor-ebpf",
                "--bin",
                "interceptor-ebpf",
            ])
            .args([
                "--features",
                "kernel",
                "--target",
                ebpf::TARGET,
                "-Z",
                "build-std=core",
            ])
            .args(["--release", "--", "-D", "warnings"])
            .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS", ebpf::RUSTFLAGS),
    )?;
    // rustfmt.toml uses options that only nightly's rustfmt has.
    run::status(run::cargo(Some(run::NIGHTLY)).args(["fmt", "--all", "--check"]))?;
    run::status(
        run::cargo(None)
            .args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])
            .env("INTERCEPTOR_EBPF_OBJECT", &object),
    )?;
    run::status(
        run::cargo(None)
            .args(["build", "--package", "interceptor", "--bins"])
            .env("INTERCEPTOR_EBPF_OBJECT", &object),
    )?;
    let agent = run::target_dir().join("debug/interceptor");
    let venv = setup::peers_dir("venv", &setup::python_requirements())?;
    let js = setup::peers_dir("js", &setup::js_package())?;
    let mut test = run::cargo(None);
    // Every test binary runs even if one fails, so the totals and failures are complete.
    test.args(["test", "--workspace", "--no-fail-fast"])
        .args(&options.cargo_args)
        .env("INTERCEPTOR_EBPF_OBJECT", &object)
        .env("INTERCEPTOR_BIN", &agent)
        .env("INTERCEPTOR_PY_VENV", &venv)
        .env("INTERCEPTOR_JS_PEERS", &js)
        .env("INTERCEPTOR_K8S_BIN", setup::k8s_bin_dir()?)
        .env("CI", env::var("CI").unwrap_or_default());
    let totals = run_counting(&mut test)?;
    // One closing line for the whole run (cargo prints one per test binary, the last of
    // which is often a doc-test run of nothing).
    println!(
        "tests: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if totals.failed > 0 || !totals.success {
        bail!("cargo test failed");
    }
    if totals.passed == 0 {
        bail!("cargo test ran no test");
    }
    Ok(())
}

#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
    success: bool,
}

/// Runs `cargo test`, passing its output through, and adds up its `test result:` lines.
fn run_counting(cmd: &mut Command) -> Result<Totals> {
    eprintln!("+ {}", run::describe(cmd));
    let mut child = cmd.stdout(Stdio::piped()).spawn()?;
    let mut totals = Totals::default();
    let stdout = child.stdout.take().expect("piped stdout");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            for part in result.split([';', '.']) {
                let mut words = part.split_whitespace();
                if let (Some(count), Some(kind)) = (words.next(), words.next()) {
                    let count: u64 = count.parse().unwrap_or(0);
                    match kind {
                        "passed" => totals.passed += count,
                        "failed" => totals.failed += count,
                        "ignored" => totals.ignored += count,
                        _ => {}
                    }
                }
            }
        }
    }
    totals.success = child.wait()?.success();
    Ok(totals)
}

/// `cargo xtask demo`: setup, build, then the demonstration binary (tests/src/bin/demo.rs).
pub fn demo() -> Result<()> {
    if !run::is_root() {
        bail!("cargo xtask demo must run as root (it loads eBPF programs)");
    }
    leftovers::sweep();
    setup::run(false)?;
    let object = ebpf::build(&ebpf::BuildOptions::default())?;
    // The demo runs the real agent binary.
    run::status(
        run::cargo(None)
            .args(["build", "--quiet", "--package", "interceptor", "--bins"])
            .env("INTERCEPTOR_EBPF_OBJECT", &object),
    )?;
    run::status(
        run::cargo(None)
            .args([
                "run",
                "--quiet",
                "--package",
                "interceptor-tests",
                "--bin",
                "demo",
            ])
            .env("INTERCEPTOR_EBPF_OBJECT", &object)
            .env(
                "INTERCEPTOR_BIN",
                run::target_dir().join("debug/interceptor"),
            )
            .env(
                "INTERCEPTOR_PY_VENV",
                setup::peers_dir("venv", &setup::python_requirements())?,
            )
            .env("INTERCEPTOR_K8S_BIN", setup::k8s_bin_dir()?),
    )
}
