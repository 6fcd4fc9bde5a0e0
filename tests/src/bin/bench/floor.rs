//! The floor: a minimal hyper server answering every request with a fixed body of the
//! size of a credentials document, with the same headers. Reached through the same
//! redirect as the agent, it is what the design cannot beat.
//!
//! It runs in a process of its own (this binary, `--serve-floor`), with a runtime shaped
//! like the agent's, so that what it costs per request (scenario 7) is its own and not
//! the bench's.

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, SocketAddrV4},
    path::Path,
    process::{Child, Command, Stdio},
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// The flag that makes this binary the floor server.
pub const SERVE_FLAG: &str = "--serve-floor";

/// The running server process; killed (by its PID) on drop.
pub struct Floor {
    child: Child,
}

impl Floor {
    /// The floor on `addr`, its listener put in the proxy map pinned under `pins`.
    pub fn start(addr: SocketAddrV4, body_bytes: usize, pins: &Path) -> Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .args([SERVE_FLAG, &addr.to_string(), &body_bytes.to_string()])
            .arg(pins)
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the floor server")?;
        let mut line = String::new();
        let read = child
            .stdout
            .take()
            .map(|out| BufReader::new(out).read_line(&mut line));
        let floor = Self { child };
        match (read, line.trim().parse::<SocketAddr>()) {
            (Some(Ok(_)), Ok(reported)) if reported == SocketAddr::V4(addr) => Ok(floor),
            _ => {
                drop(floor);
                bail!("the floor server did not report listening on {addr}: {line:?}")
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `--serve-floor ADDR BODY_BYTES PIN_DIR`: serves until killed, after printing its
/// address.
pub fn serve(addr: &str, body_bytes: &str, pins: &str) -> Result<()> {
    let addr: SocketAddrV4 = addr.parse()?;
    let body = Bytes::from(vec![b'x'; body_bytes.parse()?]);
    // The agent's runtime: tokio's default multi-thread scheduler.
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = TcpListener::bind(addr).await?;
            interceptor::ebpf::ProxySockets::open(Path::new(pins))?.insert(&listener)?;
            println!("{}", listener.local_addr()?);
            while let Ok((stream, _)) = listener.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |_request| {
                        let mut response = Response::new(Full::new(body.clone()));
                        let headers = response.headers_mut();
                        headers.insert("content-type", "text/plain".parse().unwrap());
                        headers.insert("server", "EC2ws".parse().unwrap());
                        async { Ok::<_, std::convert::Infallible>(response) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Ok(())
        })
}
