//! The agent killed (SIGKILL) and restarted repeatedly, or upgraded (SIGTERM, then a new
//! agent with `--reload` replacing the pinned programs), while pods ask for credentials in
//! a loop: every answer a pod gets is its own role or a failure, never the node's
//! credentials and never another pod's. The programs stay attached (pinned) throughout.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    path::PathBuf,
    time::Duration,
};

use interceptor_tests::{
    Node,
    agent::{Agent, free_port},
    clients::in_pod,
    fake_imds::{FakeImds, NODE_ACCESS_KEY},
    moto::MotoServer,
    peers::venv,
    pins::Pins,
    require_root,
};

/// How the agent is replaced while pods keep asking.
#[derive(Clone, Copy, Debug)]
enum Restart {
    /// SIGKILL (a crash), then the same agent again (re-uses the pinned programs).
    Kill,
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
async fn reloading_the_programs_never_leaks_node_or_foreign_credentials() {
    if !require_root("reloading_the_programs_never_leaks_node_or_foreign_credentials") {
        return;
    }
    restarts_under_load(Restart::Reload).await;
}

async fn restarts_under_load(restart: Restart) {
    const RESTARTS: usize = 3;
    let node = Node::new();
    let (pod_a, pod_b) = (node.pod(), node.pod());
    let mount = interceptor::cgroupfs::cgroup2_mount().unwrap();
    let file = std::env::temp_dir().join(format!(
        "interceptor-restarts-{restart:?}-{}.yaml",
        std::process::id()
    ));
    let mut bindings = String::from("bindings:\n");
    for (name, pod) in [("role-a", &pod_a), ("role-b", &pod_b)] {
        let path = pod.container.path.strip_prefix(&mount).unwrap();
        bindings.push_str(&format!(
            "  - name: {name}\n    cgroup: /{}\n    role: {name}\n",
            path.display()
        ));
    }
    std::fs::write(&file, bindings).unwrap();
    let moto = MotoServer::start_on(node.address, &[]);
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let app_port = free_port();
    let args: Vec<String> = [
        "--bindings",
        &file.display().to_string(),
        "--host-ip",
        &node.address.to_string(),
        "--app-port",
        &app_port.to_string(),
        "--cgroup-root",
        &node.cgroup_top().display().to_string(),
        "--metadata-addr",
        &upstream.addr().to_string(),
        "--sts-endpoint",
        &moto.endpoint(),
        "--base-role-arn",
        "arn:aws:iam::123456789012:role/",
        // The node's own credentials are one allow-list entry away: make sure they are not.
        "--allow-route-regexp",
        "^/latest/meta-data/placement/.*",
    ]
    .iter()
    .map(|arg| (*arg).to_owned())
    .collect();
    let env = [
        ("AWS_ACCESS_KEY_ID", "AKIAAGENTEXAMPLE0001"),
        ("AWS_SECRET_ACCESS_KEY", "x"),
        ("AWS_REGION", "us-east-1"),
    ];
    let pins = Pins::new(&format!("restarts-{restart:?}"));
    let start = |pins: &Pins, reload: bool| {
        let mut args = args.clone();
        if reload {
            args.push("--reload".to_owned());
        }
        let mut agent = Agent::run(&args, &pins.0, free_port(), &env);
        agent.wait_ready(Duration::from_secs(30));
        agent
    };
    let mut agent = start(&pins, false);

    // Both pods ask in a loop while the agent is killed and restarted.
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers/py/creds_loop.py");
    let python = venv().join("bin/python").display().to_string();
    let seconds = "12";
    let loops: Vec<_> = [("a", pod_a), ("b", pod_b)]
        .into_iter()
        .map(|(tag, pod)| {
            let (script, python) = (script.display().to_string(), python.clone());
            tokio::task::spawn_blocking(move || (tag, in_pod(&pod, &python, &[&script, seconds])))
        })
        .collect();
    for _ in 0..RESTARTS {
        tokio::time::sleep(Duration::from_secs(2)).await;
        match restart {
            Restart::Kill => agent.kill(),
            Restart::Reload => agent.terminate(),
        }
        agent.leave_programs();
        tokio::time::sleep(Duration::from_millis(500)).await;
        agent = start(&pins, matches!(restart, Restart::Reload));
        let expected = match restart {
            Restart::Kill => "Reused",
            Restart::Reload => "Reloaded",
        };
        assert!(
            agent.log_text().contains(expected),
            "the new agent's programs were not {expected}:\n{}",
            agent.log_text()
        );
    }
    let mut seen: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for handle in loops {
        let (tag, out) = handle.await.unwrap();
        seen.insert(tag, out.lines().map(str::to_owned).collect());
    }

    let keys = |tag: &str, role: &str| -> HashSet<String> {
        seen[tag]
            .iter()
            .filter_map(|line| line.strip_prefix("ok "))
            .map(|rest| {
                let (key, served_role) = rest.split_once(' ').unwrap_or((rest, ""));
                assert_eq!(
                    served_role, role,
                    "pod {tag} was served another role: {rest}"
                );
                key.to_owned()
            })
            .collect()
    };
    let (keys_a, keys_b) = (keys("a", "role-a"), keys("b", "role-b"));
    assert!(
        !keys_a.is_empty() && !keys_b.is_empty(),
        "both pods were served at some point: {seen:?}"
    );
    assert!(
        keys_a.is_disjoint(&keys_b),
        "a credential was served to both pods"
    );
    for key in keys_a.iter().chain(&keys_b) {
        assert_ne!(key, NODE_ACCESS_KEY, "the node's credentials reached a pod");
    }
    let failures: usize = seen
        .values()
        .flatten()
        .filter(|line| line.starts_with("fail"))
        .count();
    let total: usize = seen.values().map(Vec::len).sum();
    eprintln!("{total} attempts, {failures} failed while the agent was away");
    assert!(
        upstream
            .requests()
            .iter()
            .all(|request| !request.contains("security-credentials")),
        "the node's metadata service was asked for credentials: {:?}",
        upstream.requests()
    );
    let _ = std::fs::remove_file(&file);
}
