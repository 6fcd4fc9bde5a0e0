//! Real AWS clients, run inside simulated pods with an environment that holds no
//! credentials: whatever they get, they got through the metadata address.

use std::{path::PathBuf, process::Command};

use crate::{
    Pod,
    peers::{js_peers, venv},
    pod_client::PodClient,
};

/// A client command in `pod` with an environment that holds no credentials, not started.
pub fn pod_command(pod: &Pod, program: &str, args: &[&str]) -> Command {
    without_credentials(pod.command(program, args))
}

/// `command` with its environment replaced by one that holds no credentials.
pub fn without_credentials(mut command: Command) -> Command {
    let home = std::env::temp_dir().join(format!("interceptor-nohome-{}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    command
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        .env("HOME", &home)
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_REGION", "us-east-1");
    command
}

/// A client command run in `pod` with an environment that holds no credentials.
pub fn in_pod(pod: &Pod, program: &str, args: &[&str]) -> String {
    in_pod_with(pod, program, args, &[])
}

/// [`in_pod`] with `env` added to the environment: stdout if the client succeeded, else
/// stdout and stderr.
pub fn in_pod_with(pod: &Pod, program: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = pod_command(pod, program, args)
        .envs(env.iter().copied())
        .output()
        .expect("run the client");
    if out.status.success() {
        // Clients may warn on stderr (node's version notice); the answer is on stdout.
        return String::from_utf8_lossy(&out.stdout).trim().to_owned();
    }
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .trim()
    .to_owned()
}

pub fn boto3(pod: &Pod, sts: &str) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers/py/whoami.py");
    in_pod(
        pod,
        &venv().join("bin/python").display().to_string(),
        &[&script.display().to_string(), sts],
    )
}

/// What boto3 in `pod` received: (caller ARN, AccessKeyId, secret key, session token).
/// Panics with boto3's error if it got no credentials.
pub fn boto3_credentials(pod: &Pod, sts: &str) -> (String, String, String, String) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers/py/whoami.py");
    let out = in_pod(
        pod,
        &venv().join("bin/python").display().to_string(),
        &[&script.display().to_string(), sts, "--credentials"],
    );
    let parts: Vec<&str> = out.split_whitespace().collect();
    let [arn, key, secret, token] = parts[..] else {
        panic!("boto3 got no credentials: {out}");
    };
    (arn.into(), key.into(), secret.into(), token.into())
}

pub fn sdk_rust(pod: &Pod, sts: &str) -> String {
    // The probe binaries live beside the test executables' deps/ directory.
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("sdk-rust-whoami"))
        .find(|path| path.is_file())
        .expect("sdk-rust-whoami built by cargo");
    in_pod(pod, &bin.display().to_string(), &[sts])
}

pub fn sdk_js(pod: &Pod, sts: &str) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers/js/whoami.cjs");
    let modules = js_peers().join("node_modules");
    in_pod(
        pod,
        "/usr/bin/env",
        &[
            &format!("NODE_PATH={}", modules.display()),
            "node",
            &script.display().to_string(),
            sts,
        ],
    )
}

pub fn aws_cli(pod: &Pod, sts: &str) -> String {
    in_pod(
        pod,
        &venv().join("bin/aws").display().to_string(),
        &[
            "sts",
            "get-caller-identity",
            "--endpoint-url",
            sts,
            "--output",
            "text",
            "--query",
            "Arn",
        ],
    )
}

/// One request from inside `pod` on a client started for it (see [`PodClient::raw`]).
pub fn raw(pod: &Pod, method: &str, path: &str, headers: &[&str]) -> (u16, String) {
    PodClient::start(pod).raw(method, path, headers)
}

/// One attempt of [`CredsLoop`] that is an acceptable refusal while an agent is away or
/// starting: the connection refused or cut without an answer, or an HTTP 4xx or 503.
pub fn is_refusal(line: &str) -> bool {
    line.starts_with("refused ")
        || line.strip_prefix("status ").is_some_and(|rest| {
            let code = rest.rsplit(' ').next().unwrap_or_default();
            code.starts_with('4') || code == "503"
        })
}

/// Attempts of a [`CredsLoop`] that may fail after a new agent is ready before it is
/// served again: the one in flight when readiness was seen, and one whose line had not
/// been read yet.
pub const FAILURES_AFTER_READY: usize = 2;

/// `peers/py/creds_loop.py` in a pod, asking for credentials in a loop until
/// [`stop`](Self::stop)ped (or dropped: killed by its PID); its lines are collected as
/// they come, so a test can wait on what the pod observed instead of sleeping.
pub struct CredsLoop {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl CredsLoop {
    pub fn start(pod: &Pod) -> Self {
        Self::start_with(pod, &[])
    }

    /// Like [`start`](Self::start), with one connection and one token for every attempt
    /// (`--keep-alive`), as SDKs that pool connections and cache the token ask.
    pub fn start_keep_alive(pod: &Pod) -> Self {
        Self::start_with(pod, &["--keep-alive"])
    }

    fn start_with(pod: &Pod, options: &[&str]) -> Self {
        use std::io::BufRead;
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers/py/creds_loop.py");
        let script = script.display().to_string();
        let mut args = vec![script.as_str()];
        args.extend_from_slice(options);
        let mut child = pod_command(pod, &venv().join("bin/python").display().to_string(), &args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start creds_loop.py");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines: std::sync::Arc<std::sync::Mutex<Vec<String>>> = std::sync::Arc::default();
        let reader = std::thread::spawn({
            let lines = std::sync::Arc::clone(&lines);
            move || {
                for line in std::io::BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    lines.lock().unwrap().push(line);
                }
            }
        });
        Self {
            child,
            lines,
            reader: Some(reader),
        }
    }

    /// The lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits until `count` lines from index `from` on satisfy `matches`; returns the index
    /// just after the last of them. Panics with the lines if that does not happen within
    /// `within` (a bound for a broken run, never the thing tested).
    pub fn wait_for(
        &self,
        from: usize,
        count: usize,
        what: &str,
        within: std::time::Duration,
        matches: impl Fn(&str) -> bool,
    ) -> usize {
        let deadline = std::time::Instant::now() + within;
        loop {
            let lines = self.lines();
            let found = lines
                .iter()
                .enumerate()
                .skip(from)
                .filter(|(_, line)| matches(line))
                .nth(count - 1);
            if let Some((at, _)) = found {
                return at + 1;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the pod never saw {what} (lines from {from} on): {:#?}",
                &lines[from.min(lines.len())..]
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Ends the loop (closes its stdin), waits for it and returns every line.
    pub fn stop(mut self) -> Vec<String> {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.lines()
    }
}

impl Drop for CredsLoop {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
