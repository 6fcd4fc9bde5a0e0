//! A client that stays running inside a pod (`peers/py/pod_client.py`), for tests that send
//! many requests: one process started in the pod's cgroup and network namespace, as a
//! per-request client would be, so every connection it makes is attributed by the
//! kernel's real path, without paying an interpreter's start-up per request.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    path::PathBuf,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use serde::{Deserialize, Serialize};

use crate::{
    Pod,
    clients::without_credentials,
    node::{Cgroup, Netns, in_cgroup},
    peers::venv,
    world::{METADATA_V4, METADATA_V6},
};

/// One request: an HTTP request ([`new`](Self::new)) or raw bytes ([`bytes`](Self::bytes)),
/// to the metadata address unless [`to`](Self::to) says otherwise.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Request {
    #[serde(skip_serializing_if = "Option::is_none")]
    method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    headers: Vec<(String, String)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    wait: Option<f64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    keep: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    join: Option<PathBuf>,
}

impl Request {
    /// `method path` on a new connection, closed after the answer.
    pub fn new(method: &str, path: &str) -> Self {
        Self {
            method: Some(method.into()),
            path: Some(path.into()),
            ..Self::default()
        }
    }

    pub fn get(path: &str) -> Self {
        Self::new("GET", path)
    }

    /// `bytes` sent raw on a new connection; what comes back is read until the server
    /// closes the connection or `wait_seconds` pass.
    pub fn bytes(bytes: &[u8], wait_seconds: f64) -> Self {
        Self {
            bytes: Some(bytes.iter().map(|byte| format!("{byte:02x}")).collect()),
            wait: Some(wait_seconds),
            ..Self::default()
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// On the connection kept from the client's last `keep` request (a new one if there
    /// is none, or if the server closed it), and kept for the next.
    pub fn keep(mut self) -> Self {
        self.keep = true;
        self
    }

    /// To `host:port` instead of the metadata address.
    pub fn to(mut self, host: &str, port: u16) -> Self {
        self.host = Some(host.into());
        self.port = Some(port);
        self
    }

    /// From source port `port` (bound with `SO_REUSEADDR`).
    pub fn from_port(mut self, port: u16) -> Self {
        self.source_port = Some(port);
        self
    }

    /// Waits `seconds` for the connect and for each read (3 s unless set).
    pub fn timeout(mut self, seconds: f64) -> Self {
        self.timeout = Some(seconds);
        self
    }

    /// Sent after the client moved itself into `cgroup`: for tests that pass one process
    /// through many pods' cgroups (which the kernel then attributes its connects to).
    pub fn after_joining(mut self, cgroup: &Cgroup) -> Self {
        self.join = Some(cgroup.procs_file());
        self
    }
}

/// What a [`Request`] got: an HTTP answer (`status`, `headers`, `body`), what came back
/// for raw bytes (`data`, `closed`), or the connection's `error` (`ConnectionRefused`,
/// `ConnectionReset`, `RemoteDisconnected`, `BrokenPipe`, `Timeout`, or an errno name).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Answer {
    /// The address the connection reached, as the kernel reports it to the pod: the
    /// agent's when the redirect took it (no program rewrites what the pod sees).
    pub peer: Option<String>,
    /// Which of the client's connections carried the request (counted from 1).
    pub connection: Option<u32>,
    pub status: Option<u16>,
    /// Names lowercased.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub body: String,
    #[serde(default)]
    pub data: String,
    pub closed: Option<bool>,
    pub error: Option<String>,
}

impl Answer {
    /// The status and the body without trailing whitespace; status 0 and the error when
    /// no HTTP answer came.
    pub fn status_body(&self) -> (u16, String) {
        match (self.status, &self.error) {
            (Some(status), _) => (status, self.body.trim_end().to_owned()),
            (None, error) => (0, error.clone().unwrap_or_default()),
        }
    }

    /// Whether the node's own metadata service answered: the redirect missed the
    /// connection, and the pod reached the node's credentials.
    pub fn reached_node_metadata_service(&self) -> bool {
        let node = [format!("{METADATA_V4}:80"), format!("[{METADATA_V6}]:80")];
        self.peer.as_ref().is_some_and(|peer| node.contains(peer))
    }
}

/// `peers/py/pod_client.py` running in a pod; killed by its PID when dropped.
pub struct PodClient {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl PodClient {
    /// The client in `pod`'s container cgroup and network namespace.
    pub fn start(pod: &Pod) -> Self {
        Self::start_in(&pod.container, &pod.netns)
    }

    /// The client in `cgroup` and `netns`: for a pod's cgroup whose processes share
    /// another pod's network namespace.
    pub fn start_in(cgroup: &Cgroup, netns: &Netns) -> Self {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers/py/pod_client.py");
        let python = venv().join("bin/python");
        let command: Command = in_cgroup(
            cgroup,
            Some(netns),
            &python.display().to_string(),
            &[&script.display().to_string()],
        );
        let mut child = without_credentials(command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start pod_client.py");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Self {
            child,
            stdin,
            stdout,
        }
    }

    /// Sends `request` and waits for its answer (each read and connect of the client is
    /// bounded by its timeout). Panics if the node's own metadata service answered: no
    /// test using this client lets a pod reach it.
    pub fn ask(&mut self, request: &Request) -> Answer {
        let line = serde_json::to_string(request).expect("a request serialises");
        let mut answer = String::new();
        let sent = writeln!(self.stdin, "{line}").and_then(|()| self.stdin.flush());
        if sent.is_err() || self.stdout.read_line(&mut answer).unwrap_or(0) == 0 {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let mut stderr = String::new();
            if let Some(mut pipe) = self.child.stderr.take() {
                let _ = pipe.read_to_string(&mut stderr);
            }
            panic!("pod_client.py ended without answering {line}: {stderr}");
        }
        let answer: Answer = serde_json::from_str(&answer)
            .unwrap_or_else(|error| panic!("pod_client.py answered {answer:?}: {error}"));
        assert!(
            !answer.reached_node_metadata_service(),
            "LEAK: the node's own metadata service answered {line}: {answer:?}"
        );
        answer
    }

    /// `method path` with `headers` (`Name=Value`) on a new connection: (status, body),
    /// status 0 and the error if the connection failed.
    pub fn raw(&mut self, method: &str, path: &str, headers: &[&str]) -> (u16, String) {
        let mut request = Request::new(method, path);
        for header in headers {
            let (name, value) = header
                .split_once('=')
                .unwrap_or_else(|| panic!("header {header:?} is not Name=Value"));
            request = request.header(name, value);
        }
        self.ask(&request).status_body()
    }

    /// Moves the client into `cgroup`, sending nothing.
    pub fn join(&mut self, cgroup: &Cgroup) {
        let request = Request {
            join: Some(cgroup.procs_file()),
            ..Request::default()
        };
        let answer = self.ask(&request);
        assert_eq!(answer.error, None, "joining {}", cgroup.path.display());
    }
}

impl Drop for PodClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
