//! Running the `bench-load` client (tests/src/bin/bench-load.rs) inside pods, several at
//! once, and collecting what each printed.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use interceptor_tests::{
    Pod,
    node::{Cgroup, in_cgroup},
};

/// What one client run reported.
#[derive(Debug, Default, Clone)]
pub struct Load {
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    pub latencies_ns: Vec<u64>,
    pub body_bytes: usize,
    pub since_start: Duration,
}

impl Load {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Several runs of one condition, pooled.
#[derive(Debug, Default)]
pub struct Pooled {
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Sorted.
    pub latencies_ns: Vec<u64>,
    /// Requests per second: per round the sum of the concurrent clients' rates, then the
    /// mean over rounds.
    rates: Vec<f64>,
    pub body_bytes: usize,
}

impl Pooled {
    /// Adds one round: the loads that ran at the same time.
    pub fn add_round(&mut self, loads: Vec<Load>) {
        self.rates.push(loads.iter().map(Load::rate).sum());
        for load in loads {
            self.ok += load.ok;
            self.errors += load.errors;
            if self.first_error.is_none() {
                self.first_error = load.first_error;
            }
            self.latencies_ns.extend(load.latencies_ns);
            self.body_bytes = self.body_bytes.max(load.body_bytes);
        }
        self.latencies_ns.sort_unstable();
    }

    pub fn throughput(&self) -> f64 {
        self.rates.iter().sum::<f64>() / self.rates.len().max(1) as f64
    }

    /// Fails if any request failed: a figure over partial data would mislead.
    pub fn check(&self, what: &str) -> Result<()> {
        if self.errors > 0 || self.ok == 0 {
            bail!(
                "{what}: {} of {} requests failed (first: {})",
                self.errors,
                self.ok + self.errors,
                self.first_error.as_deref().unwrap_or("none")
            );
        }
        Ok(())
    }
}

/// The client binary, beside this one in target/<profile>/.
pub fn binary() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| {
        let exe = std::env::current_exe().expect("current_exe");
        let path: PathBuf = exe.with_file_name("bench-load");
        assert!(
            path.is_file(),
            "no bench-load beside {} (cargo xtask bench builds it)",
            exe.display()
        );
        path.display().to_string()
    })
}

/// Where a client runs: a pod's container (hooked by our programs when attached), or a
/// cgroup outside the attached tree in a pod's network namespace (not hooked).
pub enum Place<'a> {
    Pod(&'a Pod),
    Unhooked(&'a Cgroup, &'a Pod),
}

impl Place<'_> {
    fn command(&self, args: &[&str]) -> Command {
        match self {
            Self::Pod(pod) => pod.command(binary(), args),
            Self::Unhooked(cgroup, pod) => in_cgroup(cgroup, Some(&pod.netns), binary(), args),
        }
    }
}

/// Runs the client with `args` in every place at once; returns each one's report.
pub fn run_all(places: &[Place<'_>], args: &[&str]) -> Result<Vec<Load>> {
    let children = places
        .iter()
        .map(|place| {
            place
                .command(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting bench-load")
        })
        .collect::<Result<Vec<_>>>()?;
    children
        .into_iter()
        .map(|child| {
            let out = child.wait_with_output().context("bench-load")?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() {
                bail!(
                    "bench-load {} failed ({}): {stdout}{}",
                    args.join(" "),
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            parse(&stdout).with_context(|| format!("bench-load printed {stdout:?}"))
        })
        .collect()
}

fn parse(stdout: &str) -> Result<Load> {
    let json: serde_json::Value = serde_json::from_str(stdout.trim())?;
    let number = |name: &str| json[name].as_u64().unwrap_or(0);
    Ok(Load {
        ok: number("ok"),
        errors: number("errors"),
        first_error: json["first_error"].as_str().map(str::to_owned),
        elapsed: Duration::from_nanos(number("elapsed_ns")),
        latencies_ns: json["latencies_ns"]
            .as_array()
            .context("no latencies_ns")?
            .iter()
            .filter_map(serde_json::Value::as_u64)
            .collect(),
        body_bytes: number("body_bytes") as usize,
        since_start: Duration::from_nanos(number("since_start_ns")),
    })
}
