//! An upgrade with a surge (`maxSurge: 1, maxUnavailable: 0`): the new agent starts beside
//! the old one on the same node, with the same pins, proxy address and metrics port; it
//! takes over once ready (one update of the kernel's proxy map), then the old one gets
//! SIGTERM, hands over and exits. Pods asking for credentials in a loop throughout see
//! **no** failed request: every attempt is answered with the pod's own role. Checked with
//! the same build (the programs re-used) and with a build whose programs differ (another
//! object hash: replaced while the old agent serves).
//!
//! The new agent's readiness is judged as the DaemonSet's probe judges it: by the file it
//! keeps (`--ready-file`, `interceptor ready`), since the metrics port is shared with the
//! old agent and an HTTP probe could reach the old one. Were the new agent ready before
//! taking over, the old one would be stopped first and the pods would see refusals.

use std::{collections::HashSet, net::IpAddr, time::Duration};

use interceptor_tests::{
    Node,
    agent::{Agent, free_port},
    clients::CredsLoop,
    cluster,
    fake_imds::{FakeImds, NODE_ACCESS_KEY},
    moto::MotoServer,
    pins::Pins,
    require_root,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_surge_takeover_fails_no_request() {
    if !require_root("a_surge_takeover_fails_no_request") {
        return;
    }
    takeover(Build::Same).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_surge_takeover_by_a_build_with_other_programs_fails_no_request() {
    if !require_root("a_surge_takeover_by_a_build_with_other_programs_fails_no_request") {
        return;
    }
    takeover(Build::OtherPrograms).await;
}

/// What the new agent finds pinned.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Build {
    /// Its own programs: re-used.
    Same,
    /// Programs of another build (same ABI, another object hash): replaced.
    OtherPrograms,
}

/// One pod's attempt: its own role, served.
fn served_key<'a>(tag: &str, line: &'a str) -> &'a str {
    let rest = line
        .strip_prefix("ok ")
        .unwrap_or_else(|| panic!("pod {tag}: a failed request during the takeover: {line}"));
    let (key, role) = rest.split_once(' ').unwrap_or((rest, ""));
    assert_ne!(
        key, NODE_ACCESS_KEY,
        "LEAK: the node's credentials reached {tag}"
    );
    assert_eq!(
        role,
        format!("role-{tag}"),
        "pod {tag} was served another role"
    );
    key
}

async fn takeover(build: Build) {
    let node = Node::new();
    let pods = [("a", node.pod()), ("b", node.pod())];
    let file = cluster::bindings_file(
        &format!("takeover-{build:?}"),
        &[
            ("role-a", &pods[0].1, "role-a"),
            ("role-b", &pods[1].1, "role-b"),
        ],
    );
    let moto = MotoServer::start_on(node.address, &[]);
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let args = cluster::standalone_args(&node, &file, &upstream, &moto.endpoint());
    let pins = Pins::new(&format!("takeover-{build:?}"));
    let metrics_port = free_port();
    let wait = Duration::from_secs(60);

    let mut old = Agent::run(&args, &pins.0, metrics_port, &cluster::AGENT_ENV);
    old.wait_ready(wait);
    old.leave_programs();

    tokio::task::block_in_place(|| {
        // Pod a asks as botocore does (a connection and a token per attempt), pod b as
        // SDKs that keep both: its connection to the old agent is open when the old
        // agent drains, and its token, minted by the old agent, must be good at the new.
        let loops: Vec<(&str, CredsLoop)> = vec![
            ("a", CredsLoop::start(&pods[0].1)),
            ("b", CredsLoop::start_keep_alive(&pods[1].1)),
        ];
        let mut old_keys: Vec<HashSet<String>> = Vec::new();
        for (tag, pod) in &loops {
            let at = pod.wait_for(
                0,
                3,
                &format!("{tag}: served by the old agent"),
                wait,
                |l| {
                    served_key(tag, l);
                    true
                },
            );
            old_keys.push(
                pod.lines()[..at]
                    .iter()
                    .map(|line| served_key(tag, line).to_owned())
                    .collect(),
            );
        }

        if build == Build::OtherPrograms {
            // What another build would have pinned: the same layout, another object.
            let mut config = interceptor::ebpf::maps::ConfigMap::open(&pins.0).unwrap();
            let mut pinned = config.get().unwrap();
            pinned.object_hash ^= 1;
            config.set(&pinned).unwrap();
        }
        // The surge: the new agent beside the old, same pins, same metrics port.
        let ready_file = std::env::temp_dir().join(format!(
            "interceptor-takeover-{}-{build:?}.ready",
            std::process::id()
        ));
        let mut new_args = args.clone();
        new_args.extend(["--ready-file".to_owned(), ready_file.display().to_string()]);
        let mut new = Agent::run(&new_args, &pins.0, metrics_port, &cluster::AGENT_ENV);
        let probe = || {
            std::process::Command::new(interceptor_tests::agent::binary())
                .args(["ready", "--file"])
                .arg(&ready_file)
                .status()
                .expect("interceptor ready")
                .success()
        };
        assert!(!probe(), "ready before it started");
        let deadline = std::time::Instant::now() + wait;
        while !probe() {
            assert!(
                std::time::Instant::now() < deadline,
                "the new agent never became ready:\n{}",
                new.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let expected = match build {
            Build::Same => "Reused",
            Build::OtherPrograms => "Reloaded",
        };
        assert!(
            new.log_text().contains(expected),
            "the new agent's programs were not {expected}:\n{}",
            new.log_text()
        );
        // Ready means taken over.
        assert!(
            new.log_text().contains("the kernel steers connections"),
            "ready before taking over:\n{}",
            new.log_text()
        );
        let marks: Vec<usize> = loops.iter().map(|(_, pod)| pod.lines().len()).collect();

        // The rollout stops the old pod only now.
        let status = old.terminate_status();
        assert!(
            status.success(),
            "the old agent did not exit cleanly: {status}\n{}",
            old.log_text()
        );
        assert!(
            old.log_text().contains("draining"),
            "the old agent did not drain:\n{}",
            old.log_text()
        );

        // The pods are served by the new agent: credentials it assumed itself.
        for ((tag, pod), (mark, old_keys)) in loops.iter().zip(marks.iter().zip(&old_keys)) {
            pod.wait_for(
                *mark,
                3,
                &format!("{tag}: served by the new agent"),
                wait,
                |line| !old_keys.contains(served_key(tag, line)),
            );
        }
        let mut attempts = 0;
        for (tag, pod) in loops {
            let lines = pod.stop();
            for line in &lines {
                served_key(tag, line);
            }
            attempts += lines.len();
        }
        eprintln!("{attempts} attempts through the takeover, none failed");
        new.terminate();
        assert!(!probe(), "still ready after the drain");
        drop(new);
    });
    assert!(
        upstream
            .requests()
            .iter()
            .all(|request| !request.contains("security-credentials")),
        "the agents' upstream was asked for credentials: {:?}",
        upstream.requests()
    );
    node.assert_no_node_imds_reached();
    let _ = std::fs::remove_file(&file);
}
