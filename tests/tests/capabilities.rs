//! The smallest capability set the agent needs, found by trying: attaching works with
//! exactly these, and fails without any one of them. deploy/ ships this set (no
//! `privileged: true`). CAP_SYS_ADMIN is needed only to mount bpffs where the host has
//! not (the DaemonSet mounts the host's /sys/fs/bpf instead).

use interceptor_tests::{Node, agent, cmd, pins::Pins, require_root};

/// What deploy/base/daemonset.yaml grants.
const NEEDED: [&str; 3] = ["cap_bpf", "cap_net_admin", "cap_perfmon"];

/// Runs `interceptor attach` with only `keep` of the current bounding set.
fn attach_with(keep: &[&str], node: &Node, pins: &Pins) -> (bool, String) {
    let bounding = cmd::run("capsh", &["--print"]);
    let all: Vec<&str> = bounding
        .lines()
        .find_map(|line| line.strip_prefix("Bounding set ="))
        .expect("capsh prints the bounding set")
        .split(',')
        .map(str::trim)
        .collect();
    let drop: Vec<&str> = all.into_iter().filter(|cap| !keep.contains(cap)).collect();
    let command = format!(
        "{} attach --bpf-pin-dir {} --cgroup-root {} --host-ip {}",
        agent::binary().display(),
        pins.0.display(),
        node.kubepods.display(),
        node.address
    );
    let out = cmd::output(
        "capsh",
        &[&format!("--drop={}", drop.join(",")), "--", "-c", &command],
    );
    let _ = interceptor::ebpf::detach(&pins.0);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn attaching_needs_exactly_bpf_net_admin_and_perfmon() {
    if !require_root("attaching_needs_exactly_bpf_net_admin_and_perfmon") {
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
