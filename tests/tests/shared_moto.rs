//! The shared moto ([`MotoServer::shared`]) never outlives its test process: a test
//! process that starts it and then fails (a panicking test) leaves no moto behind.

use std::{
    fs,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use interceptor_tests::moto::MotoServer;

/// The moto_server processes whose parent is this process.
fn own_motos() -> Vec<u32> {
    let me = std::process::id().to_string();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            running_moto(*pid)
                && status
                    .lines()
                    .any(|line| line.split_whitespace().eq(["PPid:", me.as_str()]))
        })
        .collect()
}

/// `pid` is a running moto_server (a killed process lingers as a zombie until it is
/// reaped: its command line is empty then).
fn running_moto(pid: u32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains("moto_server"))
}

/// Set in the copy of this binary that [`the_shared_moto_dies_with_a_failed_test_process`]
/// runs: there, the test is the failing one.
const FAIL_HERE: &str = "INTERCEPTOR_TEST_SHARED_MOTO_FAIL_HERE";

#[test]
fn the_shared_moto_dies_with_a_failed_test_process() {
    if std::env::var_os(FAIL_HERE).is_some() {
        let moto = MotoServer::shared();
        let pids = own_motos();
        assert_eq!(pids.len(), 1, "one moto_server child: {pids:?}");
        println!("shared moto at {}, pid {}", moto.endpoint(), pids[0]);
        panic!("failing on purpose with the shared moto running");
    }
    let out = Command::new(std::env::current_exe().expect("this test binary"))
        .args([
            "--exact",
            "the_shared_moto_dies_with_a_failed_test_process",
            "--nocapture",
        ])
        .env(FAIL_HERE, "1")
        .stdin(Stdio::null())
        .output()
        .expect("run the failing test");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.status.success(), "the failing test passed: {stdout}");
    let pid: u32 = stdout
        .lines()
        .find_map(|line| line.split_once(", pid ")?.1.parse().ok())
        .unwrap_or_else(|| panic!("the failing test named no moto pid: {stdout}{stderr}"));
    // The kernel kills it as the test process exits; a bound for that to take effect.
    let deadline = Instant::now() + Duration::from_secs(10);
    while running_moto(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !running_moto(pid),
        "moto_server {pid} outlived its test process"
    );
}
