//! moto's real server as STS (and IAM), started from the test peers' virtualenv.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
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
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, addr }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
