//! Real AWS clients, run inside simulated pods with an environment that holds no
//! credentials: whatever they get, they got through the metadata address.

use std::{path::PathBuf, process::Command};

use crate::{
    Pod,
    peers::{js_peers, venv},
};

/// A client command run in `pod` with an environment that holds no credentials.
pub fn in_pod(pod: &Pod, program: &str, args: &[&str]) -> String {
    let home = std::env::temp_dir().join(format!("interceptor-nohome-{}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    let mut command: Command = pod.command(program, args);
    command
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        .env("HOME", &home)
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_REGION", "us-east-1");
    let out = command.output().expect("run the client");
    if out.status.success() {
        // Clients may warn on stderr (node's version notice); the answer is on stdout.
        return String::from_utf8_lossy(&out.stdout).trim().to_owned();
    }
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .trim()
    .to_owned()
}

pub fn boto3(pod: &Pod, sts: &str) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers/py/whoami.py");
    in_pod(
        pod,
        &venv().join("bin/python").display().to_string(),
        &[&script.display().to_string(), sts],
    )
}

pub fn sdk_rust(pod: &Pod, sts: &str) -> String {
    // The probe binaries live beside the test executables' deps/ directory.
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("sdk-rust-whoami"))
        .find(|path| path.is_file())
        .expect("sdk-rust-whoami built by cargo");
    in_pod(pod, &bin.display().to_string(), &[sts])
}

pub fn sdk_js(pod: &Pod, sts: &str) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers/js/whoami.cjs");
    let modules = js_peers().join("node_modules");
    in_pod(
        pod,
        "/usr/bin/env",
        &[
            &format!("NODE_PATH={}", modules.display()),
            "node",
            &script.display().to_string(),
            sts,
        ],
    )
}

pub fn aws_cli(pod: &Pod, sts: &str) -> String {
    in_pod(
        pod,
        &venv().join("bin/aws").display().to_string(),
        &[
            "sts",
            "get-caller-identity",
            "--endpoint-url",
            sts,
            "--output",
            "text",
            "--query",
            "Arn",
        ],
    )
}

/// One raw request from inside `pod`: (status, body).
pub fn raw(pod: &Pod, method: &str, path: &str, headers: &[&str]) -> (u16, String) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers/py/imds_http.py");
    let script = script.display().to_string();
    let mut args = vec![script.as_str(), method, path];
    args.extend_from_slice(headers);
    let out = in_pod(pod, &venv().join("bin/python").display().to_string(), &args);
    let (status, body) = out.split_once('\n').unwrap_or((&out, ""));
    (status.trim().parse().unwrap_or(0), body.to_owned())
}
