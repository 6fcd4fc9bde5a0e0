//! The real `interceptor` binary as a child process, killed by its PID and detached on
//! drop.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The agent binary (`cargo xtask test` builds it and sets `INTERCEPTOR_BIN`).
pub fn binary() -> PathBuf {
    let path = std::env::var_os("INTERCEPTOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/interceptor")
        });
    assert!(
        path.is_file(),
        "no interceptor binary at {} (cargo xtask test builds it; or set INTERCEPTOR_BIN)",
        path.display()
    );
    path
}

pub struct Agent {
    child: Child,
    pub log: PathBuf,
    pub pin_dir: PathBuf,
    pub metrics: SocketAddr,
    /// Detach the programs when dropped (the default): off for an agent that a
    /// successor replaces, which must find them attached.
    detach_on_drop: bool,
}

impl Agent {
    /// `interceptor run ARGS` with `--bpf-pin-dir pin_dir` and `--metrics-port`, its
    /// output in a log file; the agent's own AWS credentials come from `env`.
    pub fn run(args: &[String], pin_dir: &Path, metrics_port: u16, env: &[(&str, &str)]) -> Self {
        Self::run_in(None, args, pin_dir, metrics_port, env)
    }

    /// Like [`run`](Self::run), started inside `cgroup` (as the agent's own pod would be).
    pub fn run_in(
        cgroup: Option<&crate::node::Cgroup>,
        args: &[String],
        pin_dir: &Path,
        metrics_port: u16,
        env: &[(&str, &str)],
    ) -> Self {
        Self::start(cgroup, None, args, pin_dir, metrics_port, env)
    }

    /// Like [`run`](Self::run), with only `capabilities` left in its bounding set (the
    /// agent becomes `capsh`'s process, same PID).
    pub fn run_with_capabilities(
        capabilities: &[&str],
        args: &[String],
        pin_dir: &Path,
        metrics_port: u16,
        env: &[(&str, &str)],
    ) -> Self {
        Self::start(None, Some(capabilities), args, pin_dir, metrics_port, env)
    }

    fn start(
        cgroup: Option<&crate::node::Cgroup>,
        capabilities: Option<&[&str]>,
        args: &[String],
        pin_dir: &Path,
        metrics_port: u16,
        env: &[(&str, &str)],
    ) -> Self {
        // Two agents may share a metrics port (an upgrade's surge): the count tells their
        // logs apart.
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let log = std::env::temp_dir().join(format!(
            "interceptor-agent-{}-{}-{}.log",
            std::process::id(),
            metrics_port,
            STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let file = std::fs::File::create(&log).expect("agent log");
        let mut command = match cgroup {
            // The shell moves itself into the cgroup, then becomes the agent (same PID).
            Some(cgroup) => {
                let mut command = Command::new("/bin/sh");
                command
                    .arg("-c")
                    .arg("echo $$ > \"$0\" && exec \"$@\"")
                    .arg(cgroup.procs_file())
                    .arg(binary());
                command
            }
            None => match capabilities {
                Some(keep) => {
                    let mut command = Command::new("capsh");
                    command
                        .arg(format!("--drop={}", drop_all_but(keep)))
                        .args(["--", "-c", "exec \"$0\" \"$@\""])
                        .arg(binary());
                    command
                }
                None => Command::new(binary()),
            },
        };
        let child = command
            .arg("--log-level")
            .arg("info,interceptor=debug")
            .arg("run")
            .args(args)
            .arg("--bpf-pin-dir")
            .arg(pin_dir)
            .arg("--metrics-port")
            .arg(metrics_port.to_string())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start the agent");
        Self {
            child,
            log,
            pin_dir: pin_dir.to_path_buf(),
            metrics: SocketAddr::from(([127, 0, 0, 1], metrics_port)),
            detach_on_drop: true,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET on the admin port: (status, body).
    pub fn admin_get(&self, path: &str) -> Option<(u16, String)> {
        let mut stream = TcpStream::connect_timeout(&self.metrics, Duration::from_secs(1)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default();
        Some((status, body))
    }

    /// The value of one series of `/metrics`: `series` is its name with its labels exactly
    /// as exposed (`name{label="value"}`). Panics, with the exposition, if the series is
    /// absent: a missing series is a renamed or lost metric, never a zero.
    pub fn metric(&self, series: &str) -> f64 {
        let (status, text) = self.admin_get("/metrics").expect("the agent's /metrics");
        assert_eq!(status, 200, "/metrics: {text}");
        expect_series(&text, series)
    }

    /// Whether the agent's `/debug/store` (it runs with `--debug`) holds credentials,
    /// with their expiry, for the role `role_arn`.
    pub fn holds_credentials(&self, role_arn: &str) -> bool {
        let (_, store) = self.admin_get("/debug/store").expect("debug store");
        let store: serde_json::Value = serde_json::from_str(&store).expect("debug store JSON");
        store["credentials"]
            .as_array()
            .expect("credentials in the debug store")
            .iter()
            .any(|entry| entry["role"] == role_arn && !entry["expires"].is_null())
    }

    /// Waits until `/readyz` answers 200; panics with the agent's log otherwise.
    pub fn wait_ready(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Some((200, _)) = self.admin_get("/readyz") {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the agent exited ({status}):\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "the agent is not ready after {within:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the agent to exit on its own (a start it must refuse); panics with its
    /// log if it is still running after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the agent still runs after {within:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops (SIGSTOP) the agent: the kernel keeps completing handshakes into its accept
    /// queue while it accepts nothing. [`resume`](Self::resume) continues it.
    pub fn pause(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    pub fn resume(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid()).expect("pid"));
        nix::sys::signal::kill(pid, signal).expect("signal the agent");
    }

    /// Leaves the programs attached when this agent is dropped (a successor re-uses or
    /// replaces them).
    pub fn leave_programs(&mut self) {
        self.detach_on_drop = false;
    }

    /// SIGTERM, as the kubelet stops a pod, and waits for the exit.
    pub fn terminate(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }

    /// SIGTERM, and the exit status once the agent has exited.
    pub fn terminate_status(&mut self) -> std::process::ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.child.wait().expect("wait for the agent")
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        if self.detach_on_drop {
            let _ = interceptor::ebpf::detach(&self.pin_dir);
        }
    }
}

/// The value of the series `series` (name and labels, exactly) in a Prometheus text
/// exposition; `None` if absent. Exact: `x_total 1` is not found in `x_total 12`.
pub fn series_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            if name == series {
                value.parse().ok()
            } else {
                None
            }
        })
}

/// The value of the series `series` in `text` as [`series_value`] reads it; panics, with
/// the exposition, if it is absent: a missing series is a renamed or lost metric, never
/// a zero.
pub fn expect_series(text: &str, series: &str) -> f64 {
    series_value(text, series).unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

/// The capabilities of this process's bounding set except `keep`, comma-separated, as
/// `capsh --drop=` takes them.
pub fn drop_all_but(keep: &[&str]) -> String {
    let printed = crate::cmd::run("capsh", &["--print"]);
    printed
        .lines()
        .find_map(|line| line.strip_prefix("Bounding set ="))
        .expect("capsh prints the bounding set")
        .split(',')
        .map(str::trim)
        .filter(|cap| !keep.contains(cap))
        .collect::<Vec<_>>()
        .join(",")
}

/// A free TCP port (for ports the agent binds on all addresses), never one this process
/// handed out before.
///
/// A port is only reserved by a listener, and the agent binds its own, so between this
/// call and the agent's bind the port must not go elsewhere. The kernel hands out ports of
/// its ephemeral range on its own (`bind` to port 0, outgoing connections), and has given
/// the same one to two `bind(0)` calls in a row (once an agent's `--app-port` and
/// `--metrics-port` came out equal). So ports come from just below that range, which the
/// kernel never picks by itself, in order; each test process has a network namespace of
/// its own ([`crate::world`]), so nothing else there binds them. Each is checked by a bind.
/// A process a test starts from its own executable stays in its namespace: the order
/// starts at a place drawn from the PID, so the two do not walk the same ports.
pub fn free_port() -> u16 {
    use std::sync::{Mutex, PoisonError};
    static NEXT: Mutex<Option<u16>> = Mutex::new(None);
    let (low, high) = below_ephemeral();
    let start = || {
        let spread = u64::from(std::process::id()).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
        low + (spread % u64::from(high - low)) as u16
    };
    let mut next = NEXT.lock().unwrap_or_else(PoisonError::into_inner);
    for _ in low..high {
        let port = next.unwrap_or_else(start);
        *next = Some(if port + 1 >= high { low } else { port + 1 });
        if std::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {low}..{high}");
}

/// The lower half of the ports below the kernel's ephemeral range (`ip_local_port_range`;
/// 16384..32768 by default).
fn below_ephemeral() -> (u16, u16) {
    let first = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let high = first.max(4096);
    (high / 2, high)
}

#[cfg(test)]
mod tests {
    use super::{below_ephemeral, free_port, series_value};

    #[test]
    fn ports_are_distinct_and_never_ones_the_kernel_picks() {
        let (low, high) = below_ephemeral();
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        assert!(
            ports.iter().all(|port| (low..high).contains(port)),
            "{ports:?}"
        );
    }

    #[test]
    fn a_series_is_found_exactly_or_not_at_all() {
        let text = "# TYPE x_total counter\nx_total 12\nx{a=\"b\"} 3\nx{a=\"bc\"} 4\n";
        assert_eq!(series_value(text, "x_total"), Some(12.0));
        assert_eq!(series_value(text, "x{a=\"b\"}"), Some(3.0));
        assert_eq!(series_value(text, "x_tota"), None);
        assert_eq!(series_value(text, "x{a=\"c\"}"), None);
    }
}
