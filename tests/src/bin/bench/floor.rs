//! The floor: a minimal hyper server answering every request with a fixed body of the
//! size of a credentials document, with the same headers. Reached through the same
//! redirect as the agent, it is what the design cannot beat.
//!
//! It runs in a process of its own (this binary, `--serve-floor`), with a runtime shaped
//! like the agent's, so that what it costs per request (scenario 7) is its own and not
//! the bench's.

use std::{
    io::{BufRead, BufReader},
    net::{Ipv4Addr, SocketAddr},
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
    pub addr: SocketAddr,
    child: Child,
}

impl Floor {
    pub fn start(host: Ipv4Addr, body_bytes: usize) -> Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .args([SERVE_FLAG, &host.to_string(), &body_bytes.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the floor server")?;
        let mut line = String::new();
        let read = child
            .stdout
            .take()
            .map(|out| BufReader::new(out).read_line(&mut line));
        let floor = |addr| Self { addr, child };
        match (read, line.trim().parse()) {
            (Some(Ok(_)), Ok(addr)) => Ok(floor(addr)),
            _ => {
                drop(floor(SocketAddr::from((host, 0))));
                bail!("the floor server did not report its address: {line:?}")
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

/// `--serve-floor HOST BODY_BYTES`: serves until killed, after printing its address.
pub fn serve(host: &str, body_bytes: &str) -> Result<()> {
    let host: Ipv4Addr = host.parse()?;
    let body = Bytes::from(vec![b'x'; body_bytes.parse()?]);
    // The agent's runtime: tokio's default multi-thread scheduler.
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = TcpListener::bind((host, 0)).await?;
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
