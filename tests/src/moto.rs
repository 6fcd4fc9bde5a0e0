//! moto's real server as STS (and IAM), started from the test peers' virtualenv
//! ([`venv`]: `INTERCEPTOR_PY_VENV`, else the one `cargo xtask setup` installed).
//!
//! One moto per test process serves most tests ([`MotoServer::shared`],
//! [`MotoServer::shared_on`]). Each moto is a Python process that takes seconds of CPU to
//! start, and its first STS call imports more: long enough, on a loaded machine, for the
//! agent to answer a pod's first request with 503 once its request wait is over. So the
//! shared one is started once, on first use, and warmed with one AssumeRole before any
//! test gets it.
//!
//! The shared server is never reset: the tests of one binary run at once, as threads, and
//! the AssumeRole and GetCallerIdentity they make need no state of their own (moto checks
//! nothing about a role by default, and the credentials it returns name their own role and
//! session). A test that counts STS calls counts them in a
//! [`crate::sts_proxy::StsProxy`] of its own in front of it, which sees only that test's
//! calls. A test that needs state of its own (IAM users and policies moto checks,
//! [`MotoServer::reset`]) starts its own server ([`MotoServer::start`] and the others),
//! killed when it is dropped.
//!
//! The shared server listens on every address of the test process's network namespace
//! ([`crate::world`]): loopback for the agent, a node's address for its pods. That
//! namespace has no link to the machine's network (outside it, as without root, it listens
//! on loopback only). A static is never dropped: every moto here is started as the control
//! plane's processes are ([`spawn_tied`]), so the kernel kills the shared one when the test
//! process exits, however it exits (a test's own is killed on drop, or then).

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

pub use crate::peers::venv;
use crate::{agent::free_port, control_plane::spawn_tied, world};

/// A moto server: one this value started (killed, by its PID, on drop), or the shared one
/// as reached at one address.
pub struct MotoServer {
    /// The process this value owns; `None` for the shared server.
    own: Option<Child>,
    addr: SocketAddr,
}

impl MotoServer {
    /// A server of the test's own, on loopback.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// `env`: e.g. `INITIAL_NO_AUTH_ACTION_COUNT=0` to make moto check IAM policies.
    pub fn start_with(env: &[(&str, &str)]) -> Self {
        Self::start_on(Ipv4Addr::LOCALHOST, env)
    }

    /// On `host`: loopback, or the test node's own address so that pods reach it.
    pub fn start_on(host: Ipv4Addr, env: &[(&str, &str)]) -> Self {
        let addr = SocketAddr::from((host, free_port()));
        Self {
            own: Some(listening(host, addr, env)),
            addr,
        }
    }

    /// The test process's shared server (see the module docs), on loopback.
    pub fn shared() -> Self {
        Self::shared_on(Ipv4Addr::LOCALHOST)
    }

    /// The shared server as reached at `host`: loopback, or a node's address (which its
    /// pods reach).
    pub fn shared_on(host: Ipv4Addr) -> Self {
        if !host.is_loopback() {
            world::assert_entered();
        }
        Self {
            own: None,
            addr: SocketAddr::from((host, shared_port())),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// moto checking callers' IAM policies after the first `unauthenticated` calls
    /// (which create the users and policies): AccessDenied can then be produced.
    pub fn start_checking_policies(unauthenticated: u32) -> Self {
        Self::start_with(&[("INITIAL_NO_AUTH_ACTION_COUNT", &unauthenticated.to_string())])
    }

    /// Wipes moto's state (`POST /moto-api/reset`); only a server of the test's own.
    pub fn reset(&self) {
        assert!(
            self.own.is_some(),
            "the shared moto is never reset: other tests use it at the same time"
        );
        let answer = post(self.addr, "/moto-api/reset", "", "");
        assert!(ok(&answer), "moto reset: {answer}");
    }

    /// In a server started with [`MotoServer::start_checking_policies`]`(3)`: creates
    /// the IAM user `node`, allowed `sts:AssumeRole` on `roles` of `account` only (those
    /// are the three unauthenticated calls), and returns its access key (id, secret).
    pub fn node_user(&self, account: &str, roles: &[&str]) -> (String, String) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/py/moto_iam_user.py");
        let output = Command::new(venv().join("bin/python"))
            .arg(script)
            .arg(self.endpoint())
            .arg(account)
            .args(roles)
            .output()
            .expect("run moto_iam_user.py");
        assert!(
            output.status.success(),
            "IAM setup failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let key: serde_json::Value =
            serde_json::from_slice(&output.stdout).expect("access key JSON");
        let field = |name: &str| {
            key[name]
                .as_str()
                .unwrap_or_else(|| panic!("no {name} in {key}"))
                .to_owned()
        };
        (field("id"), field("secret"))
    }
}

impl Drop for MotoServer {
    /// Kills the one process this server started (`Child::kill` signals its PID); the
    /// shared server is left to the kernel (see the module docs).
    fn drop(&mut self) {
        if let Some(child) = &mut self.own {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `moto_server` listening on `host` and `at`'s port, with `env`, returned once `at`
/// accepts connections.
fn listening(host: Ipv4Addr, at: SocketAddr, env: &[(&str, &str)]) -> Child {
    let mut command = Command::new(venv().join("bin/moto_server"));
    command
        .args(["-H", &host.to_string(), "-p", &at.port().to_string()])
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = spawn_tied(command).expect("start moto_server");
    // Python's imports take seconds on a loaded 2-core machine: a generous bound, but
    // a moto that exited is reported at once.
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(at).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("moto_server exited ({status}) before listening on {at}");
        }
        assert!(
            Instant::now() < deadline,
            "moto_server did not listen on {at} within 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// The shared server's port, started (and warmed) on first use. Its process is never
/// waited for: the kernel kills it with the test process.
fn shared_port() -> u16 {
    static SHARED: OnceLock<(Child, u16)> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            // Every address of the test's own namespace; only loopback outside one.
            let host = if world::entered().is_ok() {
                Ipv4Addr::UNSPECIFIED
            } else {
                Ipv4Addr::LOCALHOST
            };
            let at = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
            let child = listening(host, at, &[]);
            warm(at);
            (child, at.port())
        })
        .1
}

/// One AssumeRole, as the agent makes it: moto imports its STS code on its first call.
/// (moto picks the service from the signature's scope; it checks no signature.)
fn warm(at: SocketAddr) {
    let answer = post(
        at,
        "/",
        "Authorization: AWS4-HMAC-SHA256 Credential=AKIAWARMUP0000000000/20260101/\
         us-east-1/sts/aws4_request, SignedHeaders=host, Signature=00\r\n\
         Content-Type: application/x-www-form-urlencoded\r\n",
        "Action=AssumeRole&Version=2011-06-15&RoleSessionName=warm-up&\
         RoleArn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fwarm-up",
    );
    assert!(
        ok(&answer) && answer.contains("<AccessKeyId>"),
        "warming the shared moto with an AssumeRole: {answer}"
    );
}

/// `POST path` on one connection to `at`, with `headers` (each ending in CRLF) and
/// `body`: the whole answer, status line first.
fn post(at: SocketAddr, path: &str, headers: &str, body: &str) -> String {
    let mut stream = TcpStream::connect(at).expect("connect to moto");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {at}\r\n{headers}Content-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send to moto");
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

/// An answer with status 200.
fn ok(answer: &str) -> bool {
    answer.starts_with("HTTP/1.1 200 ") || answer.starts_with("HTTP/1.0 200 ")
}
