//! `cargo xtask test`: the README's test command. Runs every check and test there is,
//! privileged ones included, after installing and building what they need.

use std::env;

use anyhow::{Result, bail};
use clap::Args;

use crate::{ebpf, leftovers, run, setup};

mod binaries;

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
    let envs: Vec<(&str, std::ffi::OsString)> = vec![
        ("INTERCEPTOR_EBPF_OBJECT", object.clone().into()),
        ("INTERCEPTOR_BIN", agent.into()),
        ("INTERCEPTOR_PY_VENV", venv.into()),
        ("INTERCEPTOR_JS_PEERS", js.into()),
        ("INTERCEPTOR_K8S_BIN", setup::k8s_bin_dir()?.into()),
        ("CI", env::var("CI").unwrap_or_default().into()),
    ];
    let mut totals = binaries::run_all(&options.cargo_args, &envs)?;
    if options.cargo_args.is_empty() {
        // Doc tests are not test binaries cargo builds ahead: their own run.
        let mut doc = run::cargo(None);
        doc.args(["test", "--workspace", "--doc"])
            .envs(envs.iter().map(|(name, value)| (name, value)));
        eprintln!("+ {}", run::describe(&doc));
        let out = doc.stderr(std::process::Stdio::inherit()).output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        print!("{stdout}");
        totals.add_output(&stdout);
        totals.success &= out.status.success();
    }
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
pub(crate) struct Totals {
    pub(crate) passed: u64,
    pub(crate) failed: u64,
    pub(crate) ignored: u64,
    pub(crate) success: bool,
}

impl Totals {
    /// Adds up the `test result:` lines of a test binary's `output`.
    pub(crate) fn add_output(&mut self, output: &str) {
        for line in output.lines() {
            if let Some(result) = line.strip_prefix("test result: ") {
                for part in result.split([';', '.']) {
                    let mut words = part.split_whitespace();
                    if let (Some(count), Some(kind)) = (words.next(), words.next()) {
                        let count: u64 = count.parse().unwrap_or(0);
                        match kind {
                            "passed" => self.passed += count,
                            "failed" => self.failed += count,
                            "ignored" => self.ignored += count,
                            _ => {}
                        }
                    }
                }
            }
        }
    }
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
