//! `interceptor report`'s side: reads the report from an agent's admin port (`/observe`).
//! A plain HTTP/1.1 GET on loopback or the node's address; the admin port serves no
//! credentials, so nothing here is secret.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use super::Report;

/// The admin path the report is served on.
pub const PATH: &str = "/observe";
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

pub fn fetch(addr: SocketAddr) -> Result<Report, Error> {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)
        .map_err(|source| Error::Connect { addr, source })?;
    let io = |source| Error::Io { addr, source };
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    write!(
        stream,
        "GET {PATH} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    )
    .map_err(io)?;
    let mut answer = Vec::new();
    stream
        .take(MAX_ANSWER)
        .read_to_end(&mut answer)
        .map_err(io)?;
    parse(addr, &answer)
}

/// The report in an HTTP answer (`Connection: close`, so the body is the rest).
pub(crate) fn parse(addr: SocketAddr, answer: &[u8]) -> Result<Report, Error> {
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
    serde_json::from_slice(&answer[split + 4..]).map_err(|error| invalid(&error.to_string()))
}
