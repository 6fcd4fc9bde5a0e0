//! moto's real server as STS (and IAM), started from the test peers' virtualenv
//! ([`venv`]: `INTERCEPTOR_PY_VENV`, else the one `cargo xtask setup` installed).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub use crate::peers::venv;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free loopback port")
}

/// A running moto server on loopback, killed (by its PID) on drop.
pub struct MotoServer {
    child: Child,
    addr: SocketAddr,
}

impl MotoServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// `env`: e.g. `INITIAL_NO_AUTH_ACTION_COUNT=0` to make moto check IAM policies.
    pub fn start_with(env: &[(&str, &str)]) -> Self {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST, env)
    }

    /// On `host`: loopback, or the test node's own address so that pods reach it.
    pub fn start_on(host: std::net::Ipv4Addr, env: &[(&str, &str)]) -> Self {
        let port = free_port();
        let child = Command::new(venv().join("bin/moto_server"))
            .args(["-H", &host.to_string(), "-p", &port.to_string()])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let addr = SocketAddr::from((host, port));
        let mut moto = Self { child, addr };
        // Python's imports take seconds on a loaded 2-core machine: a generous bound, but
        // a moto that exited is reported at once.
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = moto.child.try_wait() {
                panic!("moto_server exited ({status}) before listening on {addr}");
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen on {addr} within 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        moto
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

    /// Wipes moto's state (`POST /moto-api/reset`).
    pub fn reset(&self) {
        let mut stream = TcpStream::connect(self.addr).expect("connect to moto");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        write!(
            stream,
            "POST /moto-api/reset HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n",
            self.addr
        )
        .expect("send reset");
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        assert!(
            answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"),
            "moto reset: {answer}"
        );
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
    /// Kills the one process this server started (`Child::kill` signals its PID).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
