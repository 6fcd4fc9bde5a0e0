//! `interceptor report`'s side: reads the report from an agent's admin port (`/observe`),
//! and `interceptor status`'s: the agent's mode (`/mode`). A plain HTTP/1.1 GET on
//! loopback or the node's address; the admin port serves no credentials, so nothing here
//! is secret.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use super::Report;

/// The admin path the report is served on.
pub const PATH: &str = "/observe";
/// The admin path that names the agent's mode: [`ENFORCE`] or [`OBSERVE`].
pub const MODE_PATH: &str = "/mode";
pub const ENFORCE: &str = "enforce";
pub const OBSERVE: &str = "observe";
/// The most of an answer read (a full store is a few MiB).
const MAX_ANSWER: u64 = 64 << 20;
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the agent's admin port at {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the report from {addr}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent at {0} is not in observe mode")]
    NotObserving(SocketAddr),
    #[error("the agent at {addr} answered {status}")]
    Status { addr: SocketAddr, status: u16 },
    #[error("the agent at {addr} sent no report: {reason}")]
    Invalid { addr: SocketAddr, reason: String },
}

/// The report of the agent whose admin port is `addr`.
pub fn fetch(addr: SocketAddr) -> Result<Report, Error> {
    parse(addr, &get(addr, PATH)?)
}

/// The mode of the agent whose admin port is `addr`: [`ENFORCE`] or [`OBSERVE`].
pub fn mode(addr: SocketAddr) -> Result<String, Error> {
    let answer = get(addr, MODE_PATH)?;
    let body = body(addr, &answer)?;
    let mode = String::from_utf8_lossy(body).trim().to_owned();
    if mode == ENFORCE || mode == OBSERVE {
        Ok(mode)
    } else {
        Err(Error::Invalid {
            addr,
            reason: format!(
                "unknown mode {:?}",
                mode.chars().take(32).collect::<String>()
            ),
        })
    }
}

/// The whole answer to `GET path` (`Connection: close`).
fn get(addr: SocketAddr, path: &str) -> Result<Vec<u8>, Error> {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)
        .map_err(|source| Error::Connect { addr, source })?;
    let io = |source| Error::Io { addr, source };
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(io)?;
    let mut answer = Vec::new();
    stream
        .take(MAX_ANSWER)
        .read_to_end(&mut answer)
        .map_err(io)?;
    Ok(answer)
}

/// The report in an HTTP answer (`Connection: close`, so the body is the rest).
pub(crate) fn parse(addr: SocketAddr, answer: &[u8]) -> Result<Report, Error> {
    let invalid = |reason: &str| Error::Invalid {
        addr,
        reason: reason.to_owned(),
    };
    serde_json::from_slice(body(addr, answer)?).map_err(|error| invalid(&error.to_string()))
}

/// The body of a 200 answer; other statuses are errors (404: not in observe mode).
fn body(addr: SocketAddr, answer: &[u8]) -> Result<&[u8], Error> {
    let invalid = |reason: &str| Error::Invalid {
        addr,
        reason: reason.to_owned(),
    };
    let split = answer
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .ok_or_else(|| invalid("no HTTP header"))?;
    let head = std::str::from_utf8(&answer[..split]).map_err(|_| invalid("header not UTF-8"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| invalid("no status"))?;
    match status {
        200 => {}
        404 => return Err(Error::NotObserving(addr)),
        status => return Err(Error::Status { addr, status }),
    }
    let chunked = head
        .lines()
        .any(|line| line.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked");
    if chunked {
        return Err(invalid("chunked body"));
    }
    Ok(&answer[split + 4..])
}
