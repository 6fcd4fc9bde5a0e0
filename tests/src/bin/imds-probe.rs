//! Runs inside a simulated pod: connects to an address `--count` times, sends its tag,
//! and reads one reply line per connection. Prints one summary line:
//! `connected=N failed=M replies=R first_error=...`; exits 0 only if every connect worked.
//!
//! Usage: imds-probe ADDR COUNT TAG [CONCURRENCY]

use std::{
    env,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

fn main() -> ExitCode {
    let args: Vec<String> = env::args().collect();
    let (Some(addr), Some(count), Some(tag)) = (
        args.get(1).and_then(|a| a.parse::<SocketAddr>().ok()),
        args.get(2).and_then(|c| c.parse::<usize>().ok()),
        args.get(3).cloned(),
    ) else {
        eprintln!("usage: imds-probe ADDR COUNT TAG [CONCURRENCY]");
        return ExitCode::from(2);
    };
    let concurrency = args
        .get(4)
        .and_then(|c| c.parse().ok())
        .unwrap_or(1usize)
        .max(1);
    let connected = Arc::new(AtomicUsize::new(0));
    let replies = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (connected, replies, failed, first_error, next, tag) = (
                connected.clone(),
                replies.clone(),
                failed.clone(),
                first_error.clone(),
                next.clone(),
                tag.clone(),
            );
            thread::spawn(move || {
                while next.fetch_add(1, Ordering::Relaxed) < count {
                    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                        Ok(stream) => {
                            connected.fetch_add(1, Ordering::Relaxed);
                            if exchange(stream, &tag).is_ok() {
                                replies.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(error) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            first_error.lock().unwrap().get_or_insert_with(|| {
                                format!("{error} (errno {})", error.raw_os_error().unwrap_or(0))
                            });
                        }
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.join();
    }
    let failed = failed.load(Ordering::Relaxed);
    println!(
        "connected={} failed={failed} replies={} first_error={}",
        connected.load(Ordering::Relaxed),
        replies.load(Ordering::Relaxed),
        first_error.lock().unwrap().clone().unwrap_or_default()
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn exchange(mut stream: TcpStream, tag: &str) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(format!("{tag}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}
