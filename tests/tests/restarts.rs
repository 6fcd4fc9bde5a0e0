//! The agent replaced while pods ask for credentials in a loop: killed (SIGKILL, a crash)
//! and started again, stopped gracefully (SIGTERM, as a DaemonSet update sends) and started
//! again, or upgraded (SIGTERM, then a new agent with `--reload` replacing the pinned
//! programs). The programs stay attached (pinned) throughout, so every answer a pod gets is
//! its own role or a refusal (connection refused or cut, 4xx, 503): never the node's
//! credentials, never another pod's, and no connection ever reaches the node's own
//! metadata service (the simulated node's `Drop` fails the test if one did). Service
//! resumes after every restart, within a bounded number of attempts.

use std::{collections::HashSet, net::IpAddr, time::Duration};

use interceptor_tests::{
    Node,
    agent::{Agent, free_port},
    clients::{CredsLoop, FAILURES_AFTER_READY, is_refusal},
    cluster::{AGENT_ENV, bindings_file, standalone_args},
    fake_imds::{FakeImds, NODE_ACCESS_KEY},
    moto::MotoServer,
    pins::Pins,
    require_root,
};

/// How the agent is replaced while pods keep asking.
#[derive(Clone, Copy, Debug)]
enum Restart {
    /// SIGKILL (a crash), then the same agent again (re-uses the pinned programs).
    Kill,
    /// SIGTERM (a DaemonSet update), then the same agent again (re-uses them).
    Graceful,
    /// SIGTERM (a rolling upgrade), then a new agent that replaces the programs.
    Reload,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_agent_never_leaks_node_or_foreign_credentials() {
    if !require_root("killing_the_agent_never_leaks_node_or_foreign_credentials") {
        return;
    }
    restarts_under_load(Restart::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_agent_gracefully_never_leaks_node_or_foreign_credentials() {
    if !require_root("stopping_the_agent_gracefully_never_leaks_node_or_foreign_credentials") {
        return;
    }
    restarts_under_load(Restart::Graceful).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloading_the_programs_never_leaks_node_or_foreign_credentials() {
    if !require_root("reloading_the_programs_never_leaks_node_or_foreign_credentials") {
        return;
    }
    restarts_under_load(Restart::Reload).await;
}

/// Panics at once if `line` is an answer with credentials other than pod `tag`'s own role
/// (the node's, or another pod's): a leak ends the test with what leaked.
fn assert_own(tag: &str, line: &str) {
    if let Some(rest) = line.strip_prefix("ok ") {
        let (key, role) = rest.split_once(' ').unwrap_or((rest, ""));
        assert_ne!(
            key, NODE_ACCESS_KEY,
            "LEAK: the node's credentials reached pod {tag}"
        );
        assert_eq!(
            role,
            format!("role-{tag}"),
            "LEAK: pod {tag} was served another role"
        );
    }
}

async fn restarts_under_load(restart: Restart) {
    const RESTARTS: usize = 3;
    let node = Node::new();
    let (pod_a, pod_b) = (node.pod(), node.pod());
    let file = bindings_file(
        &format!("restarts-{restart:?}"),
        &[("role-a", &pod_a, "role-a"), ("role-b", &pod_b, "role-b")],
    );
    let moto = MotoServer::shared_on(node.address);
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let mut args = standalone_args(&node, &file, &upstream, &moto.endpoint());
    // The node's own credentials are one allow-list entry away: make sure they are not.
    args.extend(["--allow-route-regexp", "^/latest/meta-data/placement/.*"].map(str::to_owned));
    let pins = Pins::new(&format!("restarts-{restart:?}"));
    let start = |pins: &Pins, reload: bool| {
        let mut args = args.clone();
        if reload {
            args.push("--reload".to_owned());
        }
        let mut agent = Agent::run(&args, &pins.0, free_port(), &AGENT_ENV);
        agent.wait_ready(Duration::from_secs(30));
        agent
    };
    let mut agent = start(&pins, false);
    let expected = match restart {
        Restart::Kill | Restart::Graceful => "Reused",
        Restart::Reload => "Reloaded",
    };
    let wait = Duration::from_secs(60);

    tokio::task::block_in_place(|| {
        // Both pods ask in a loop (one process each) while the agent is replaced.
        let loops = [
            ("a", CredsLoop::start(&pod_a)),
            ("b", CredsLoop::start(&pod_b)),
        ];
        let mut marks = [0, 0];
        for (at, (tag, pod)) in loops.iter().enumerate() {
            marks[at] = pod.wait_for(0, 3, &format!("{tag}: served"), wait, |line| {
                assert_own(tag, line);
                line.starts_with("ok ")
            });
        }
        for round in 0..RESTARTS {
            match restart {
                Restart::Kill => agent.kill(),
                Restart::Graceful | Restart::Reload => agent.terminate(),
            }
            agent.leave_programs();
            // Each pod sees the agent gone (the redirect holds; nobody listens) before the
            // new one starts.
            for (at, (tag, pod)) in loops.iter().enumerate() {
                marks[at] = pod.wait_for(
                    marks[at],
                    1,
                    &format!("{tag}: a refusal while the agent is away (round {round})"),
                    wait,
                    |line| {
                        assert_own(tag, line);
                        is_refusal(line)
                    },
                );
            }
            agent = start(&pins, matches!(restart, Restart::Reload));
            assert!(
                agent.log_text().contains(expected),
                "the new agent's programs were not {expected}:\n{}",
                agent.log_text()
            );
            // Service resumes, within a bounded number of failed attempts.
            for (at, (tag, pod)) in loops.iter().enumerate() {
                let ready_at = pod.lines().len();
                let served = pod.wait_for(
                    ready_at,
                    1,
                    &format!("{tag}: served again (round {round})"),
                    wait,
                    |line| {
                        assert_own(tag, line);
                        line.starts_with("ok ")
                    },
                );
                let failed = served - 1 - ready_at;
                assert!(
                    failed <= FAILURES_AFTER_READY,
                    "{tag}: {failed} failures after the new agent was ready (round {round}): {:#?}",
                    &pod.lines()[ready_at..served]
                );
                marks[at] = served;
            }
        }
        let seen: Vec<(&str, Vec<String>)> = loops
            .into_iter()
            .map(|(tag, pod)| (tag, pod.stop()))
            .collect();

        let mut keys: Vec<HashSet<String>> = Vec::new();
        for (tag, lines) in &seen {
            let role = format!("role-{tag}");
            let mut served = HashSet::new();
            for line in lines {
                if let Some(rest) = line.strip_prefix("ok ") {
                    let (key, served_role) = rest.split_once(' ').unwrap_or((rest, ""));
                    assert_eq!(
                        served_role, role,
                        "pod {tag} was served another role: {line}"
                    );
                    assert_ne!(
                        key, NODE_ACCESS_KEY,
                        "the node's credentials reached pod {tag}"
                    );
                    served.insert(key.to_owned());
                } else {
                    assert!(
                        is_refusal(line),
                        "pod {tag} got neither its role nor a refusal: {line}"
                    );
                }
            }
            let failures = lines.iter().filter(|line| !line.starts_with("ok ")).count();
            eprintln!("pod {tag}: {} attempts, {failures} refused", lines.len());
            keys.push(served);
        }
        assert!(
            keys[0].is_disjoint(&keys[1]),
            "a credential was served to both pods"
        );
    });
    assert!(
        upstream
            .requests()
            .iter()
            .all(|request| !request.contains("security-credentials")),
        "the agent's upstream was asked for credentials: {:?}",
        upstream.requests()
    );
    node.assert_no_node_imds_reached();
    let _ = std::fs::remove_file(&file);
}
