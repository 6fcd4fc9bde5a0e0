//! Runs the workspace's test binaries, [`JOBS`] at a time.
//!
//! Most of the suite's time is spent waiting (for processes to start, for kube-apiserver,
//! for pods' loops), so two binaries at once use the two cores better than one. They
//! share no fixed resource: each test process lives in a network namespace of its own
//! (tests/src/world.rs), so its ports, its metadata address and its kube-apiserver are
//! its own; pins, cgroups and named network namespaces carry its pid. What does read
//! the whole machine runs alone, after the others: [`ALONE`].
//!
//! Each binary's output is printed in one piece when it ends, never interleaved.

use std::{
    collections::VecDeque,
    ffi::OsString,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result, bail};

use super::Totals;
use crate::run;

/// Test binaries run at once.
const JOBS: usize = 2;

/// The longest binaries (tens of seconds each, docs in their modules), started first so
/// that the short ones fill in beside them.
const LONG_FIRST: [&str; 4] = ["faults", "outages", "attribution", "hostile"];

/// Test binaries that run alone: `datapath` checks what `bpftool` lists for the whole
/// machine (every program and link), which another binary's programs would change.
const ALONE: [&str; 1] = ["datapath"];

/// One test binary, as cargo built it.
struct Binary {
    /// `interceptor-tests::takeover`, as cargo's "Running" line names it.
    name: String,
    path: PathBuf,
}

/// Builds the test binaries (`cargo test --no-run` with the cargo arguments before
/// `--`), runs them with the arguments after it, and adds up their results.
pub(crate) fn run_all(args: &[String], envs: &[(&str, OsString)]) -> Result<Totals> {
    let (cargo_args, test_args) = match args.iter().position(|arg| arg == "--") {
        Some(at) => (&args[..at], &args[at + 1..]),
        None => (args, &[][..]),
    };
    let binaries = build(cargo_args, envs)?;
    if binaries.is_empty() {
        bail!("cargo test built no test binary");
    }
    let named = |b: &Binary, names: &[&str]| {
        names
            .iter()
            .any(|name| b.name.ends_with(&format!("::{name}")))
    };
    let (alone, mut together): (Vec<Binary>, Vec<Binary>) =
        binaries.into_iter().partition(|b| named(b, &ALONE));
    together.sort_by_key(|b| !named(b, &LONG_FIRST));
    let totals = Arc::new(Mutex::new(Totals {
        success: true,
        ..Totals::default()
    }));
    run_pool(together, JOBS, test_args, envs, &totals)?;
    run_pool(alone, 1, test_args, envs, &totals)?;
    let totals = Arc::try_unwrap(totals)
        .ok()
        .expect("every runner has ended")
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    Ok(totals)
}

/// `cargo test --no-run --message-format=json`: the test executables it built.
fn build(cargo_args: &[String], envs: &[(&str, OsString)]) -> Result<Vec<Binary>> {
    let mut cmd = run::cargo(None);
    cmd.args(["test", "--workspace", "--no-run", "--message-format=json"])
        .args(cargo_args)
        .envs(envs.iter().map(|(name, value)| (name, value)))
        .stdout(Stdio::piped());
    eprintln!("+ {}", run::describe(&cmd));
    let out = cmd
        .output()
        .with_context(|| format!("could not start {}", run::describe(&cmd)))?;
    if !out.status.success() {
        bail!("building the tests failed: {}", out.status);
    }
    let mut binaries = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" || message["profile"]["test"] != true {
            continue;
        }
        let Some(path) = message["executable"].as_str() else {
            continue;
        };
        let package = message["package_id"]
            .as_str()
            .and_then(|id| id.rsplit('#').next())
            .and_then(|tail| tail.split('@').next())
            .unwrap_or_default();
        let target = message["target"]["name"].as_str().unwrap_or_default();
        binaries.push(Binary {
            name: format!("{package}::{target}"),
            path: PathBuf::from(path),
        });
    }
    Ok(binaries)
}

/// Runs `binaries`, `jobs` at a time; prints each one's output when it ends.
fn run_pool(
    binaries: Vec<Binary>,
    jobs: usize,
    test_args: &[String],
    envs: &[(&str, OsString)],
    totals: &Arc<Mutex<Totals>>,
) -> Result<()> {
    let queue = Arc::new(Mutex::new(VecDeque::from(binaries)));
    std::thread::scope(|scope| {
        let runners: Vec<_> = (0..jobs)
            .map(|_| {
                let (queue, totals) = (Arc::clone(&queue), Arc::clone(totals));
                scope.spawn(move || -> Result<()> {
                    loop {
                        let Some(binary) = lock(&queue).pop_front() else {
                            return Ok(());
                        };
                        let mut cmd = Command::new(&binary.path);
                        cmd.args(test_args)
                            .envs(envs.iter().map(|(name, value)| (name, value)))
                            .stdin(Stdio::null());
                        let out = cmd
                            .output()
                            .with_context(|| format!("could not start {}", binary.name))?;
                        let stdout = String::from_utf8_lossy(&out.stdout);
                        let stderr = String::from_utf8_lossy(&out.stderr);
                        let mut totals = lock(&totals);
                        println!("     Running {} ({})", binary.name, binary.path.display());
                        print!("{stdout}");
                        eprint!("{stderr}");
                        totals.add_output(&stdout);
                        if !out.status.success() {
                            totals.success = false;
                            eprintln!("error: {} failed: {}", binary.name, out.status);
                        }
                    }
                })
            })
            .collect();
        runners
            .into_iter()
            .try_for_each(|runner| runner.join().expect("a test runner panicked"))
    })
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
