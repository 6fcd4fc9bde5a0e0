//! Scenario 7's instruments: what one process spends per request, counted by the kernel
//! with `perf stat` attached to it while a fixed number of requests are served: system
//! calls (and futex calls among them: lock contention and thread wake-ups), context
//! switches, CPU time, and calls into libc's allocator (uprobes on malloc, calloc and
//! realloc, counted in the kernel; the process runs unmodified).
//!
//! A uprobe costs a trap per call, so allocations are counted in passes of their own
//! ([`Stat::allocations`]), never while CPU time is measured ([`Stat::costs`]).
//! [`Record`] samples the allocator calls' stacks, to see where they come from.
//!
//! The uprobes are perf "probe" events defined in tracefs for the whole machine; they
//! live in their own group and [`Probes`] removes them when dropped, panics included.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context, Result, bail};

/// The probe group, so that nothing else's probes are touched.
const GROUP: &str = "interceptor_bench";
const ALLOCATOR: [&str; 3] = ["malloc", "calloc", "realloc"];

/// Allocator uprobes on the libc that `pid` runs with; removed on drop.
pub struct Probes {
    _private: (),
}

impl Probes {
    pub fn add(pid: u32) -> Result<Self> {
        let libc = libc_of(pid)?;
        // A run that was killed may have left them: start clean.
        remove();
        let probes = Self { _private: () };
        for function in ALLOCATOR {
            let status = Command::new("perf")
                .args(["probe", "--quiet", "-x"])
                .arg(&libc)
                .args(["--add", &format!("{GROUP}:{function}={function}")])
                .status()
                .context("running perf probe (Debian package linux-perf)")?;
            if !status.success() {
                bail!("perf probe could not add {function} in {}", libc.display());
            }
        }
        Ok(probes)
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        remove();
    }
}

fn remove() {
    let _ = Command::new("perf")
        .args(["probe", "--quiet", "--del", &format!("{GROUP}:*")])
        .stderr(Stdio::null())
        .status();
}

/// The libc mapped into `pid`.
fn libc_of(pid: u32) -> Result<PathBuf> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps"))?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| {
            Path::new(path)
                .file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with("libc.so"))
        })
        .map(PathBuf::from)
        .with_context(|| format!("no libc mapped in process {pid}"))
}

/// Totals over one measured stretch.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub syscalls: f64,
    pub futex: f64,
    pub context_switches: f64,
    pub cpu_ms: f64,
    pub allocations: f64,
}

impl Counts {
    pub fn per(self, requests: u64) -> Self {
        let n = requests.max(1) as f64;
        Self {
            syscalls: self.syscalls / n,
            futex: self.futex / n,
            context_switches: self.context_switches / n,
            cpu_ms: self.cpu_ms / n,
            allocations: self.allocations / n,
        }
    }

    pub fn json(self) -> serde_json::Value {
        serde_json::json!({
            "syscalls": self.syscalls, "futex": self.futex,
            "context_switches": self.context_switches, "cpu_ms": self.cpu_ms,
            "allocator_calls": self.allocations,
        })
    }

    pub fn add(&mut self, other: Self) {
        self.syscalls += other.syscalls;
        self.futex += other.futex;
        self.context_switches += other.context_switches;
        self.cpu_ms += other.cpu_ms;
        self.allocations += other.allocations;
    }
}

/// `perf stat` attached to every thread of a process; stopped (by its own PID) and read
/// by [`Stat::finish`], killed if dropped unread.
pub struct Stat {
    perf: Child,
    out: PathBuf,
}

impl Stat {
    /// System calls, futex calls, context switches and CPU time of `pid`.
    pub fn costs(pid: u32) -> Result<Self> {
        let events = [
            "raw_syscalls:sys_enter",
            "syscalls:sys_enter_futex",
            "context-switches",
            "task-clock",
        ];
        Self::attach(pid, &events.map(str::to_owned))
    }

    /// Calls into the allocator by `pid` (needs [`Probes`]).
    pub fn allocations(pid: u32) -> Result<Self> {
        Self::attach(
            pid,
            &ALLOCATOR.map(|function| format!("{GROUP}:{function}")),
        )
    }

    fn attach(pid: u32, events: &[String]) -> Result<Self> {
        let out = std::env::temp_dir().join(format!(
            "interceptor-bench-perf-{}-{pid}.csv",
            std::process::id()
        ));
        let perf = Command::new("perf")
            .args(["stat", "-x", ",", "--no-big-num", "-e", &events.join(",")])
            .arg("-o")
            .arg(&out)
            .args(["-p", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf stat (Debian package linux-perf)")?;
        let stat = Self { perf, out };
        // perf writes its output file's header once it runs; on a loaded machine that can
        // take seconds. Then give it the time to open its events.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !stat.out.exists() {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "perf stat did not start within 30 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        Ok(stat)
    }

    pub fn finish(mut self) -> Result<Counts> {
        stop(&mut self.perf)?;
        let text = fs::read_to_string(&self.out)
            .with_context(|| format!("reading {}", self.out.display()))?;
        parse(&text)
    }
}

impl Drop for Stat {
    fn drop(&mut self) {
        kill(&mut self.perf);
        let _ = fs::remove_file(&self.out);
    }
}

/// `perf record` of the allocator calls' call stacks in `pid`, to `out` (read it with
/// `perf report -i OUT --no-children --stdio`). Needs [`Probes`].
pub struct Record {
    perf: Child,
}

impl Record {
    pub fn attach(pid: u32, out: &Path) -> Result<Self> {
        let events = ALLOCATOR.map(|function| format!("{GROUP}:{function}"));
        let perf = Command::new("perf")
            // One call in 25, with 8 KiB of stack each: enough to rank the callers.
            .args([
                "record",
                "--quiet",
                "-c",
                "25",
                "--call-graph",
                "dwarf,8192",
            ])
            .args(["-e", &events.join(",")])
            .arg("-o")
            .arg(out)
            .args(["-p", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf record (Debian package linux-perf)")?;
        std::thread::sleep(std::time::Duration::from_millis(300));
        Ok(Self { perf })
    }

    pub fn finish(mut self) -> Result<()> {
        stop(&mut self.perf)
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        kill(&mut self.perf);
    }
}

/// Stops a perf we started (by its PID) as Ctrl-C would, so it writes what it counted.
fn stop(perf: &mut Child) -> Result<()> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(perf.id())?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT)?;
    perf.wait()?;
    Ok(())
}

fn kill(perf: &mut Child) {
    if perf.try_wait().ok().flatten().is_none() {
        let _ = perf.kill();
        let _ = perf.wait();
    }
}

/// perf's CSV: `value,unit,event,...` per line; `<not counted>` fails the measurement.
fn parse(text: &str) -> Result<Counts> {
    let mut counts = Counts::default();
    let mut seen = 0;
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let fields: Vec<&str> = line.split(',').collect();
        let [value, _unit, event, ..] = fields.as_slice() else {
            continue;
        };
        let value: f64 = value
            .parse()
            .with_context(|| format!("perf could not count {event}: {line}"))?;
        match *event {
            "raw_syscalls:sys_enter" => counts.syscalls = value,
            "syscalls:sys_enter_futex" => counts.futex = value,
            "context-switches" => counts.context_switches = value,
            "task-clock" => counts.cpu_ms = value,
            event if event.starts_with(GROUP) => counts.allocations += value,
            _ => continue,
        }
        seen += 1;
    }
    if seen == 0 {
        bail!("perf stat reported none of the events asked for:\n{text}");
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perf_csv_is_read() {
        let text = "# started on ...\n\n145,,raw_syscalls:sys_enter,1566011,100.00,,\n\
                    1,,syscalls:sys_enter_futex,1566011,100.00,,\n\
                    2,,context-switches,1566011,100.00,,\n1.57,msec,task-clock,1,100.00,,\n\
                    238,,interceptor_bench:malloc,1,100.00,,\n0,,interceptor_bench:calloc,1,1,,\n\
                    6,,interceptor_bench:realloc,1,1,,\n";
        let counts = parse(text).unwrap();
        assert_eq!(counts.syscalls, 145.0);
        assert_eq!(counts.allocations, 244.0);
        assert_eq!(counts.cpu_ms, 1.57);
        let missing = text.replace("238,,", "<not counted>,,");
        assert!(parse(&missing).is_err());
    }
}
