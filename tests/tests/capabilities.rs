//! The smallest capability set the agent needs, found by trying: attaching works with
//! exactly these, and fails without any one of them. deploy/ ships this set (no
//! `privileged: true`). CAP_SYS_ADMIN is needed only to mount bpffs where the host has
//! not (the DaemonSet mounts the host's /sys/fs/bpf instead).

use interceptor_tests::{
    Node, agent,
    cluster::{AGENT_ENV, bindings_file, standalone_args},
    cmd,
    pins::Pins,
    require_root,
};

/// What deploy/base/daemonset.yaml grants.
///
/// CAP_PERFMON was in this set until the programs of the surge takeover (the record's
/// cookie, the token key map) loaded without it: the verifier relaxes some checks for
/// holders of CAP_PERFMON, and the earlier programs relied on one of those relaxations.
/// This test drops each capability in turn, so it notices when a change needs one again.
const NEEDED: [&str; 2] = ["cap_bpf", "cap_net_admin"];

/// Runs `interceptor attach` with only `keep` of the current bounding set.
fn attach_with(keep: &[&str], node: &Node, pins: &Pins) -> (bool, String) {
    let command = format!(
        "{} attach --bpf-pin-dir {} --cgroup-root {} --host-ip {}",
        agent::binary().display(),
        pins.0.display(),
        node.kubepods.display(),
        node.address
    );
    let drop = agent::drop_all_but(keep);
    let out = cmd::output("capsh", &[&format!("--drop={drop}"), "--", "-c", &command]);
    let _ = interceptor::ebpf::detach(&pins.0);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn attaching_needs_exactly_bpf_and_net_admin() {
    if !require_root("attaching_needs_exactly_bpf_and_net_admin") {
        return;
    }
    let node = Node::new();
    let pins = Pins::new("caps");
    // bpffs must already be mounted for the minimal set (mounting needs CAP_SYS_ADMIN),
    // as on the hosts the DaemonSet mounts it from.
    if cmd::run("stat", &["-f", "-c", "%T", "/sys/fs/bpf"]).trim() != "bpf_fs" {
        cmd::run("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"]);
    }
    let (ok, log) = attach_with(&NEEDED, &node, &pins);
    assert!(ok, "attach with {NEEDED:?} failed:\n{log}");
    for missing in NEEDED {
        let keep: Vec<&str> = NEEDED
            .iter()
            .copied()
            .filter(|cap| *cap != missing)
            .collect();
        let (ok, log) = attach_with(&keep, &node, &pins);
        assert!(
            !ok,
            "attach worked without {missing}: the set is not minimal\n{log}"
        );
        assert!(
            log.contains("ermission denied") || log.contains("ot permitted"),
            "without {missing} the error should say it is a permission problem:\n{log}"
        );
    }
}

/// Serving needs nothing more: the agent, with only those three capabilities, attaches,
/// serves a process its role through the real redirect, and answers `/readyz`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_needs_nothing_more() {
    if !require_root("serving_needs_nothing_more") {
        return;
    }
    let node = Node::new();
    let pod = node.pod();
    let file = bindings_file("caps", &[("app", &pod, "app")]);
    let moto = interceptor_tests::moto::MotoServer::shared_on(node.address);
    let upstream =
        interceptor_tests::fake_imds::FakeImds::start(std::net::IpAddr::from([127, 0, 0, 1])).await;
    let args = standalone_args(&node, &file, &upstream, &moto.endpoint());
    let pins = Pins::new("caps-serving");
    let mut agent = agent::Agent::run_with_capabilities(
        &NEEDED,
        &args,
        &pins.0,
        agent::free_port(),
        &AGENT_ENV,
    );
    agent.wait_ready(std::time::Duration::from_secs(30));
    // The agent runs with exactly those three (bounding and effective), not more: a
    // test that passed with extra capabilities would prove nothing about the set.
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let mask = |field: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .map(|hex| u64::from_str_radix(hex.trim(), 16).expect("a capability mask"))
            .unwrap_or_else(|| panic!("no {field} in {status}"))
    };
    // CAP_NET_ADMIN 12, CAP_BPF 39 (linux/capability.h).
    let exactly = (1u64 << 12) | (1 << 39);
    assert_eq!(mask("CapBnd:"), exactly, "bounding set: {status}");
    assert_eq!(mask("CapEff:"), exactly, "effective set: {status}");
    let sts = moto.endpoint();
    let arn = tokio::task::spawn_blocking(move || interceptor_tests::clients::boto3(&pod, &sts))
        .await
        .unwrap();
    assert_eq!(
        arn,
        "arn:aws:sts::123456789012:assumed-role/app/app",
        "{}",
        agent.log_text()
    );
    let _ = std::fs::remove_file(&file);
}
