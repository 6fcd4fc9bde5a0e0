//! The load client of `cargo xtask bench` (tests/src/bin/bench/), run inside simulated
//! pods so that the kernel's redirect applies to it exactly as to a pod's SDK. Prints one
//! JSON object on stdout; exits 2 on bad arguments.
//!
//! Usage:
//! - `bench-load http ADDR PATH keepalive|new THREADS REQUESTS WARMUP`: `THREADS`
//!   threads each send `WARMUP` unrecorded then `REQUESTS` recorded GETs of `PATH`, on one
//!   kept-alive connection or on a new connection per request (what most SDKs do).
//! - `bench-load connect COUNT`: `COUNT` connect()+close to a listener on this network
//!   namespace's loopback (the cost of the hooks for connections that are not ours).
//! - `bench-load first ADDR PATH DEADLINE_MS`: GETs on new connections until one answers
//!   200 (a pod's first credential request).
//!
//! Output fields: `ok`, `errors`, `first_error`, `elapsed_ns`, `latencies_ns` (one per
//! recorded request), `body_bytes` (of the last answer), and for `first` `attempts` and
//! `since_start_ns`.

use std::{
    env,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};

const USAGE: &str = "usage: bench-load http ADDR PATH keepalive|new THREADS REQUESTS WARMUP \
                     | connect COUNT | first ADDR PATH DEADLINE_MS";

/// What one thread (or the whole run) measured.
#[derive(Default)]
struct Outcome {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    latencies_ns: Vec<u64>,
    body_bytes: usize,
}

impl Outcome {
    fn merge(&mut self, other: Outcome) {
        self.ok += other.ok;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.latencies_ns.extend(other.latencies_ns);
        self.body_bytes = self.body_bytes.max(other.body_bytes);
    }

    fn failed(&mut self, error: String) {
        self.errors += 1;
        self.first_error.get_or_insert(error);
    }

    fn print(&self, elapsed: Duration, extra: &[(&str, u64)]) {
        let mut json = serde_json::json!({
            "ok": self.ok,
            "errors": self.errors,
            "first_error": self.first_error,
            "elapsed_ns": elapsed.as_nanos() as u64,
            "latencies_ns": self.latencies_ns,
            "body_bytes": self.body_bytes,
        });
        for (name, value) in extra {
            json[*name] = serde_json::json!(value);
        }
        println!("{json}");
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["http", addr, path, mode, threads, requests, warmup] => {
            let (Ok(addr), Ok(threads), Ok(requests), Ok(warmup)) = (
                addr.parse::<SocketAddr>(),
                threads.parse::<usize>(),
                requests.parse::<u64>(),
                warmup.parse::<u64>(),
            ) else {
                return usage();
            };
            let keepalive = match *mode {
                "keepalive" => true,
                "new" => false,
                _ => return usage(),
            };
            http(addr, path, keepalive, threads.max(1), requests, warmup);
        }
        ["connect", count] => {
            let Ok(count) = count.parse::<u64>() else {
                return usage();
            };
            connect(count);
        }
        ["first", addr, path, deadline_ms] => {
            let (Ok(addr), Ok(deadline_ms)) = (addr.parse::<SocketAddr>(), deadline_ms.parse())
            else {
                return usage();
            };
            first(addr, path, Duration::from_millis(deadline_ms));
        }
        _ => return usage(),
    }
    ExitCode::SUCCESS
}

fn usage() -> ExitCode {
    eprintln!("{USAGE}");
    ExitCode::from(2)
}

fn http(addr: SocketAddr, path: &str, keepalive: bool, threads: usize, requests: u64, warmup: u64) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nAccept: */*\r\n\r\n");
    let start = Instant::now();
    let outcomes: Vec<Outcome> = thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let request = request.as_bytes();
                scope.spawn(move || {
                    let mut client = Client::new(addr, keepalive);
                    let mut warm = Outcome::default();
                    for _ in 0..warmup {
                        client.get(request, &mut warm);
                        if warm.errors > 0 {
                            break;
                        }
                    }
                    let mut outcome = Outcome {
                        latencies_ns: Vec::with_capacity(requests as usize),
                        ..Outcome::default()
                    };
                    // A failed request ends the thread: the run is void anyway, and
                    // timeouts must not add up.
                    if warm.errors > 0 {
                        warm.latencies_ns.clear();
                        return warm;
                    }
                    for _ in 0..requests {
                        client.get(request, &mut outcome);
                        if outcome.errors > 0 {
                            break;
                        }
                    }
                    outcome
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().expect("load thread"))
            .collect()
    });
    let elapsed = start.elapsed();
    let mut total = Outcome::default();
    for outcome in outcomes {
        total.merge(outcome);
    }
    total.print(elapsed, &[]);
}

fn connect(count: u64) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback listener");
    let addr = listener.local_addr().expect("listener address");
    // Accepts and drops, so that the backlog never fills.
    thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    let mut outcome = Outcome {
        latencies_ns: Vec::with_capacity(count as usize),
        ..Outcome::default()
    };
    let start = Instant::now();
    for _ in 0..count {
        let began = Instant::now();
        match TcpStream::connect(addr) {
            Ok(stream) => {
                drop(stream);
                outcome.latencies_ns.push(began.elapsed().as_nanos() as u64);
                outcome.ok += 1;
            }
            Err(error) => {
                outcome.failed(format!("connect {addr}: {error}"));
                break;
            }
        }
    }
    outcome.print(start.elapsed(), &[]);
}

fn first(addr: SocketAddr, path: &str, deadline: Duration) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nAccept: */*\r\n\r\n");
    let start = Instant::now();
    let mut attempts = 0;
    let mut outcome = Outcome::default();
    while start.elapsed() < deadline {
        attempts += 1;
        let mut client = Client::new(addr, false);
        let errors = outcome.errors;
        client.get(request.as_bytes(), &mut outcome);
        if outcome.errors == errors {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    outcome.print(
        start.elapsed(),
        &[
            ("attempts", attempts),
            ("since_start_ns", start.elapsed().as_nanos() as u64),
        ],
    );
}

/// An HTTP/1.1 client of the smallest kind: one request at a time, bodies framed by
/// Content-Length (all the metadata API and the floor server send).
struct Client {
    addr: SocketAddr,
    keepalive: bool,
    stream: Option<TcpStream>,
    buffer: Vec<u8>,
}

impl Client {
    fn new(addr: SocketAddr, keepalive: bool) -> Self {
        Self {
            addr,
            keepalive,
            stream: None,
            buffer: Vec::with_capacity(4096),
        }
    }

    /// One GET, recorded in `outcome` (latency from connect, or from the write on a kept
    /// connection, to the last byte of the body).
    fn get(&mut self, request: &[u8], outcome: &mut Outcome) {
        let began = Instant::now();
        match self.exchange(request) {
            Ok(body_bytes) => {
                outcome.latencies_ns.push(began.elapsed().as_nanos() as u64);
                outcome.ok += 1;
                outcome.body_bytes = body_bytes;
            }
            Err(error) => {
                self.stream = None;
                outcome.failed(error);
            }
        }
        if !self.keepalive {
            self.stream = None;
        }
    }

    fn exchange(&mut self, request: &[u8]) -> Result<usize, String> {
        if self.stream.is_none() {
            let stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))
                .map_err(|error| format!("connect {}: {error}", self.addr))?;
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .map_err(|error| error.to_string())?;
            stream
                .set_nodelay(true)
                .map_err(|error| error.to_string())?;
            self.stream = Some(stream);
        }
        let stream = self.stream.as_mut().expect("connected above");
        stream
            .write_all(request)
            .map_err(|error| format!("write: {error}"))?;
        self.buffer.clear();
        let mut chunk = [0u8; 4096];
        let (head_end, length) = loop {
            let read = stream
                .read(&mut chunk)
                .map_err(|error| format!("read: {error}"))?;
            if read == 0 {
                return Err("connection closed before the answer".into());
            }
            self.buffer.extend_from_slice(&chunk[..read]);
            if let Some(end) = self.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buffer[..end]).into_owned();
                let status = head.split_whitespace().nth(1).unwrap_or_default();
                if status != "200" {
                    return Err(format!("status {status}"));
                }
                let length = head
                    .lines()
                    .find_map(|line| {
                        let (name, value) = line.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse::<usize>().ok())?
                    })
                    .ok_or("no Content-Length")?;
                break (end + 4, length);
            }
        };
        while self.buffer.len() < head_end + length {
            let read = stream
                .read(&mut chunk)
                .map_err(|error| format!("read body: {error}"))?;
            if read == 0 {
                return Err("connection closed in the body".into());
            }
            self.buffer.extend_from_slice(&chunk[..read]);
        }
        Ok(length)
    }
}
