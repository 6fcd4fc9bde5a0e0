//! Observe mode end to end (`interceptor run --observe`): the real agent on the simulated
//! node, pods from the real kube-apiserver (the test binary's shared control plane, a
//! node name and namespace per test), real boto3 in the pods.
//!
//! - Every pod, whatever enforcement would give it, is answered as the node would be: it
//!   gets the node's credentials, forwarded from the agent's upstream (the loopback fake
//!   of `--metadata-addr`, never the node's own metadata service, which the simulated
//!   node fails the test on), and nothing is assumed at STS. `interceptor report`, run as
//!   a process against the agent's admin port, shows per pod and container the paths
//!   asked, the node role's use, and what enforcement would give (the role and how it
//!   was chosen, none, or refused and why); the metrics carry the same counts; `/readyz`,
//!   `/metrics` and `interceptor status` say observe mode. A connection the kernel did
//!   not record is still refused, and a pod flooding distinct paths is bounded.
//! - Standalone mode observes the same way: a bound service would get its binding's
//!   role, an unbound one nothing; both get the node's answers meanwhile.
//! - Switching to enforcement is a restart on the same pins: pods asking in a loop get
//!   the node's credentials only before the observe agent goes, refusals while no agent
//!   runs, their own role afterwards, and never the node's credentials again.

use std::{
    io::{Read, Write},
    net::{IpAddr, TcpStream},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use interceptor_tests::{
    Node, Pod,
    agent::{Agent, binary, expect_series, free_port, series_value},
    clients::{CredsLoop, FAILURES_AFTER_READY, boto3_credentials, in_pod, is_refusal},
    cluster::{AGENT_ENV, AgentBuilder, Peers, bindings_file, standalone_args},
    control_plane::ControlPlane,
    fake_imds::{FakeImds, NODE_ACCESS_KEY, NODE_ROLE},
    moto::MotoServer,
    peers::venv,
    pins::Pins,
    require_root,
};

const ACCOUNT_ROLES: &str = "arn:aws:iam::123456789012:role/";
const CREDENTIALS: &str = "/latest/meta-data/iam/security-credentials/";
const ROLE: &str = "iam.amazonaws.com/role";

/// `interceptor ARGS` as a process: (exit code, stdout). Panics with stderr if it could
/// not run.
fn interceptor(args: &[&str]) -> (i32, String) {
    let out = Command::new(binary())
        .args(args)
        .output()
        .expect("run interceptor");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// One report row by pod name.
fn row<'a>(report: &'a serde_json::Value, pod: &str) -> &'a serde_json::Value {
    report["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .find(|row| row["pod"] == pod)
        .unwrap_or_else(|| panic!("no row for pod {pod}: {report:#}"))
}

/// `count` distinct paths asked from inside `pod` in one process (plain GETs, no token).
fn flood_paths(pod: &Pod, count: usize) {
    let script = format!(
        "import http.client\n\
         for i in range({count}):\n\
         \x20   c = http.client.HTTPConnection('169.254.169.254', 80, timeout=3)\n\
         \x20   c.request('GET', f'/latest/meta-data/flood-{{i}}')\n\
         \x20   c.getresponse().read()\n\
         print('done')\n"
    );
    let out = in_pod(
        pod,
        &venv().join("bin/python").display().to_string(),
        &["-c", &script],
    );
    assert_eq!(out, "done", "the flood did not run: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_mode_serves_the_node_s_answers_and_reports_what_enforcement_would_do() {
    let test = "observe_mode_serves_the_node_s_answers_and_reports_what_enforcement_would_do";
    if !require_root(test) {
        return;
    }
    let Some(plane) = ControlPlane::shared(test) else {
        return;
    };
    let scope = plane.scope("observe");
    scope.add_node(&[]).await;
    let team = scope.namespace_name("team");
    scope
        .namespace(
            &team,
            &[("iam.amazonaws.com/allowed-roles", r#"["role-a"]"#)],
        )
        .await;
    let node = Node::new();
    let annotated = scope
        .running_pod(&node, &team, "annotated", &[(ROLE, "role-a")])
        .await;
    let plain = scope.running_pod(&node, &team, "plain", &[]).await;
    let locked = scope
        .running_pod(&node, &team, "locked", &[(ROLE, "role-b")])
        .await;
    // A pod the API server does not know (as a static pod's cgroup is): enforcement would
    // refuse it; observing, it is answered as the node would, like the others.
    let stranger = node.pod();
    let moto = MotoServer::shared_on(node.address);
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let (agent, app_port) = AgentBuilder::new(
        "observe",
        &node,
        Peers::new(&scope, &upstream, &moto.endpoint()),
    )
    .args(&[
        "--observe",
        "--base-role-arn",
        ACCOUNT_ROLES,
        "--namespace-restrictions",
    ])
    .start()
    .await;
    assert!(
        agent
            .log_text()
            .contains("OBSERVE MODE: NOTHING IS ENFORCED"),
        "no warning at start:\n{}",
        agent.log_text()
    );

    let sts = moto.endpoint();
    let (keys, pods) = tokio::task::spawn_blocking(move || {
        let keys: Vec<String> = [&annotated, &plain, &locked, &stranger]
            .into_iter()
            .map(|pod| boto3_credentials(pod, &sts).1)
            .collect();
        flood_paths(&plain, interceptor::observe::MAX_PATHS + 8);
        (keys, (annotated, plain, locked, stranger))
    })
    .await
    .unwrap();
    let (annotated, plain, locked, stranger) = &pods;
    for (key, name) in keys
        .iter()
        .zip(["annotated", "plain", "locked", "stranger"])
    {
        assert_eq!(
            key, NODE_ACCESS_KEY,
            "{name}: observe mode answers as the node: its credentials"
        );
    }
    let forwarded = upstream
        .requests()
        .iter()
        .filter(|request| *request == &format!("GET {CREDENTIALS}{NODE_ROLE}"))
        .count();
    assert!(
        forwarded >= 4,
        "the node's credentials come from the agent's upstream: {:?}",
        upstream.requests()
    );

    // A connection the kernel did not record (dialled to the proxy directly) is refused.
    let mut direct = TcpStream::connect((node.address, app_port)).unwrap();
    write!(
        direct,
        "GET {CREDENTIALS}{NODE_ROLE} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    let _ = direct.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");

    // The report, as `interceptor report --json` prints it.
    let admin = agent.metrics.to_string();
    let (code, json) = interceptor(&["report", "--admin-addr", &admin, "--json"]);
    assert_eq!(code, 0, "interceptor report --json: {json}");
    let report: serde_json::Value = serde_json::from_str(&json).expect("report JSON");
    assert_eq!(report["mode"], "observe");
    assert_eq!(report["node"], scope.node.as_str());
    let stranger_name = format!("uid {}", stranger.uid);
    for (pod, name, namespace) in [
        (annotated, "annotated", team.as_str()),
        (plain, "plain", team.as_str()),
        (locked, "locked", team.as_str()),
        (stranger, stranger_name.as_str(), ""),
    ] {
        let row = row(&report, name);
        assert_eq!(row["namespace"], namespace, "{name}");
        assert_eq!(
            row["container"],
            format!("containerd://{}", pod.container_id),
            "{name}"
        );
        assert_eq!(row["used_node_role"], true, "{name}: {row:#}");
        let paths: Vec<&str> = row["paths"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|path| path.as_str())
            .collect();
        for asked in [
            "/latest/api/token",
            CREDENTIALS,
            &format!("{CREDENTIALS}{NODE_ROLE}"),
        ] {
            assert!(paths.contains(&asked), "{name}: {asked} not in {paths:?}");
        }
    }
    assert_eq!(
        row(&report, "annotated")["would_get"],
        serde_json::json!({
            "outcome": "role",
            "arn": format!("{ACCOUNT_ROLES}role-a"),
            "chosen_by": "pod_annotation",
        })
    );
    assert_eq!(
        row(&report, "plain")["would_get"],
        serde_json::json!({ "outcome": "none" })
    );
    assert_eq!(
        row(&report, "locked")["would_get"],
        serde_json::json!({ "outcome": "refused", "reason": "not_allowed" })
    );
    assert_eq!(
        row(&report, &stranger_name)["would_get"],
        serde_json::json!({ "outcome": "refused", "reason": "unknown_pod" })
    );
    // The flood is bounded: the paths kept, the rest counted.
    let flooded = row(&report, "plain");
    assert_eq!(
        flooded["paths"].as_array().unwrap().len(),
        interceptor::observe::MAX_PATHS,
        "{flooded:#}"
    );
    assert!(
        flooded["paths_dropped"].as_u64().unwrap() >= 8,
        "{flooded:#}"
    );

    // The table.
    let (code, table) = interceptor(&["report", "--admin-addr", &admin]);
    assert_eq!(code, 0, "interceptor report: {table}");
    eprintln!("{table}");
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with(&format!("OBSERVE MODE on {}", scope.node)),
        "{table}"
    );
    let line = |pod: &str| {
        lines
            .iter()
            .find(|line| line.split_whitespace().nth(1) == Some(pod))
            .unwrap_or_else(|| panic!("no line for {pod}:\n{table}"))
    };
    assert!(line("locked").contains("refused (not_allowed)"), "{table}");
    assert!(line("plain").contains(" none "), "{table}");
    assert!(
        line("annotated").contains(&format!("role {ACCOUNT_ROLES}role-a (pod_annotation)")),
        "{table}"
    );
    assert!(
        table.contains("refused (unknown_pod)"),
        "the stranger's line: {table}"
    );
    for pod in ["locked", "plain", "annotated"] {
        assert_eq!(
            line(pod).split_whitespace().nth(4),
            Some("yes"),
            "{pod} used the node's role: {table}"
        );
    }

    // The metrics carry the same counts.
    let (_, metrics) = agent.admin_get("/metrics").unwrap();
    let value = |series: &str| expect_series(&metrics, series);
    assert_eq!(value("interceptor_mode{mode=\"observe\"}"), 1.0);
    assert_eq!(value("interceptor_mode{mode=\"enforce\"}"), 0.0);
    let rows = report["rows"].as_array().unwrap();
    for would_get in ["role", "none", "refused"] {
        let requests: u64 = rows
            .iter()
            .filter(|row| row["would_get"]["outcome"] == would_get)
            .map(|row| row["requests"].as_u64().unwrap())
            .sum();
        assert_eq!(
            value(&format!(
                "interceptor_observed_requests_total{{would_get=\"{would_get}\"}}"
            )),
            requests as f64,
            "{would_get}"
        );
        let containers = rows
            .iter()
            .filter(|row| row["would_get"]["outcome"] == would_get)
            .count();
        assert_eq!(
            value(&format!(
                "interceptor_observed_containers{{used_node_role=\"true\",would_get=\"{would_get}\"}}"
            )),
            containers as f64,
            "{would_get}"
        );
    }
    assert_eq!(
        value("interceptor_observed_node_role_requests_total"),
        forwarded as f64
    );
    assert_eq!(
        value("interceptor_credentials_events_total{event=\"sts_calls\"}"),
        0.0,
        "observe mode never assumes a role"
    );
    // Every metric the agent exports is documented.
    let docs =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/imds.md"))
            .unwrap();
    for name in metrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| !name.starts_with("interceptor_process_"))
    {
        assert!(docs.contains(name), "{name} is not in docs/imds.md");
    }

    // `/readyz` and `interceptor status` say it.
    let (status, body) = agent.admin_get("/readyz").unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("OBSERVE MODE"), "{body}");
    let pins = agent.pin_dir.display().to_string();
    let (code, text) = interceptor(&["status", "--bpf-pin-dir", &pins, "--admin-addr", &admin]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("OBSERVE MODE"), "{text}");
    let (_, json) = interceptor(&[
        "status",
        "--bpf-pin-dir",
        &pins,
        "--admin-addr",
        &admin,
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["agent_mode"], "observe");
}

/// The (AccessKeyId, role) of a served attempt.
fn served(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix("ok ")?;
    Some(rest.split_once(' ').unwrap_or((rest, "")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_from_observe_to_enforcing_is_a_restart_after_which_no_node_credentials_reach_a_pod()
 {
    let test = "switching_from_observe_to_enforcing_is_a_restart_after_which_no_node_credentials_reach_a_pod";
    if !require_root(test) {
        return;
    }
    let Some(plane) = ControlPlane::shared(test) else {
        return;
    };
    let scope = plane.scope("observe-switch");
    scope.add_node(&[]).await;
    let team = scope.namespace_name("team");
    scope.namespace(&team, &[]).await;
    let node = Node::new();
    let pod_a = scope
        .running_pod(&node, &team, "app-a", &[(ROLE, "role-a")])
        .await;
    let pod_b = scope
        .running_pod(&node, &team, "app-b", &[(ROLE, "role-b")])
        .await;
    let moto = MotoServer::shared_on(node.address);
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let setup = AgentBuilder::new(
        "observe-switch",
        &node,
        Peers::new(&scope, &upstream, &moto.endpoint()),
    )
    .args(&["--base-role-arn", ACCOUNT_ROLES])
    .setup();
    let start = |observe: bool| {
        let mut args = setup.args.clone();
        if observe {
            args.push("--observe".to_owned());
        }
        let mut agent = Agent::run(&args, &setup.pin_dir, free_port(), &AGENT_ENV);
        agent.wait_ready(Duration::from_secs(30));
        agent
    };
    let mut observing = start(true);
    let wait = Duration::from_secs(60);

    let (enforcing, seen, switched_at) = tokio::task::block_in_place(|| {
        let loops = [
            ("a", CredsLoop::start(&pod_a)),
            ("b", CredsLoop::start(&pod_b)),
        ];
        // Observing: the node's credentials, several times each.
        for (tag, pod) in &loops {
            pod.wait_for(
                0,
                5,
                &format!("{tag}: the node's credentials"),
                wait,
                |line| served(line) == Some((NODE_ACCESS_KEY, NODE_ROLE)),
            );
        }
        // The switch: the observe agent stops (SIGTERM, as a DaemonSet update does), the
        // programs stay; each pod sees it gone (its first refusal from here on) before
        // the enforcing agent starts.
        let marks = loops.each_ref().map(|(_, pod)| pod.lines().len());
        observing.terminate();
        observing.leave_programs();
        let mut switched_at = [0, 0];
        for (at, (tag, pod)) in loops.iter().enumerate() {
            switched_at[at] = pod.wait_for(
                marks[at],
                1,
                &format!("{tag}: a refusal while no agent runs"),
                wait,
                is_refusal,
            );
        }
        let enforcing = start(false);
        assert!(
            enforcing.log_text().contains("Reused"),
            "the enforcing agent did not re-use the pinned programs:\n{}",
            enforcing.log_text()
        );
        for (tag, pod) in &loops {
            let ready_at = pod.lines().len();
            let role = format!("role-{tag}");
            let own = pod.wait_for(ready_at, 3, &format!("{tag}: its own role"), wait, |line| {
                let served = served(line);
                assert_ne!(
                    served.map(|(key, _)| key),
                    Some(NODE_ACCESS_KEY),
                    "LEAK: the node's credentials reached pod {tag} from the enforcing agent"
                );
                served.is_some_and(|(_, served)| served == role)
            });
            let failed = pod.lines()[ready_at..own]
                .iter()
                .filter(|line| !line.starts_with("ok "))
                .count();
            assert!(
                failed <= FAILURES_AFTER_READY,
                "{tag}: {failed} failures after the enforcing agent was ready: {:#?}",
                &pod.lines()[ready_at..own]
            );
        }
        let seen: Vec<(&str, Vec<String>)> = loops
            .into_iter()
            .map(|(tag, pod)| (tag, pod.stop()))
            .collect();
        (enforcing, seen, switched_at)
    });

    for ((tag, lines), switched) in seen.iter().zip(switched_at) {
        let role = format!("role-{tag}");
        // Up to its first refusal after the observe agent was told to stop, the pod was
        // answered by the observe agent only.
        let (before, after) = lines.split_at(switched - 1);
        for line in before {
            match served(line) {
                // Observing answers as the node: never a role of the pod's own yet.
                Some(answer) => assert_eq!(answer, (NODE_ACCESS_KEY, NODE_ROLE), "{tag}"),
                None => panic!("{tag}: observe mode failed an attempt: {line}"),
            }
        }
        let mut own = 0;
        for line in after {
            match served(line) {
                Some((key, served_role)) => {
                    assert_ne!(
                        key, NODE_ACCESS_KEY,
                        "LEAK: the node's credentials reached pod {tag} after the switch"
                    );
                    assert_eq!(served_role, role, "pod {tag} was served another role");
                    own += 1;
                }
                None => assert!(
                    is_refusal(line),
                    "pod {tag} got neither its role nor a refusal: {line}"
                ),
            }
        }
        assert!(own >= 3, "{tag}: {after:#?}");
        eprintln!(
            "pod {tag}: {} attempts observed, {} after the switch ({own} served its role)",
            before.len(),
            after.len()
        );
    }
    let (_, metrics) = enforcing.admin_get("/metrics").unwrap();
    assert_eq!(
        series_value(&metrics, "interceptor_mode{mode=\"enforce\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        series_value(&metrics, "interceptor_mode{mode=\"observe\"}"),
        Some(0.0),
        "{metrics}"
    );
    assert_eq!(enforcing.admin_get("/readyz").unwrap().1, "ready\n");
    let admin = enforcing.metrics.to_string();
    let (code, _) = interceptor(&["report", "--admin-addr", &admin]);
    assert_ne!(code, 0, "a report from an enforcing agent");
    let pins = setup.pin_dir.display().to_string();
    let (_, text) = interceptor(&["status", "--bpf-pin-dir", &pins, "--admin-addr", &admin]);
    assert!(
        text.contains("agent:    enforce") && !text.contains("OBSERVE"),
        "{text}"
    );
    node.assert_no_node_imds_reached();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_observe_mode_reports_bound_and_unbound_services() {
    if !require_root("standalone_observe_mode_reports_bound_and_unbound_services") {
        return;
    }
    let node = Node::new();
    let (bound, unbound) = (node.pod(), node.pod());
    let file = bindings_file("observe-standalone", &[("billing", &bound, "billing")]);
    let moto = MotoServer::shared_on(node.address);
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let mut args = standalone_args(&node, &file, &upstream, &moto.endpoint());
    args.push("--observe".to_owned());
    let pins = Pins::new("observe-standalone");
    let mut agent = Agent::run(&args, &pins.0, free_port(), &AGENT_ENV);
    agent.wait_ready(Duration::from_secs(30));
    let sts = moto.endpoint();
    let (keys, services) = tokio::task::spawn_blocking(move || {
        let keys: Vec<String> = [&bound, &unbound]
            .into_iter()
            .map(|pod| boto3_credentials(pod, &sts).1)
            .collect();
        (keys, (bound, unbound))
    })
    .await
    .unwrap();
    assert_eq!(keys, [NODE_ACCESS_KEY, NODE_ACCESS_KEY]);
    let (code, json) = interceptor(&[
        "report",
        "--admin-addr",
        &agent.metrics.to_string(),
        "--json",
    ]);
    assert_eq!(code, 0, "{json}");
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    let mount = interceptor::cgroupfs::cgroup2_mount().unwrap();
    let by_cgroup = |pod: &Pod| {
        let path = format!(
            "/{}",
            pod.container.path.strip_prefix(&mount).unwrap().display()
        );
        report["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["container"] == path.as_str())
            .unwrap_or_else(|| panic!("no row for {path}: {report:#}"))
            .clone()
    };
    let (bound, unbound) = &services;
    assert_eq!(
        by_cgroup(bound)["would_get"],
        serde_json::json!({
            "outcome": "role",
            "arn": format!("{ACCOUNT_ROLES}billing"),
            "chosen_by": "container_map",
        })
    );
    assert_eq!(
        by_cgroup(unbound)["would_get"],
        serde_json::json!({ "outcome": "none" })
    );
    assert_eq!(by_cgroup(unbound)["used_node_role"], true);
    assert_eq!(
        agent.metric("interceptor_credentials_events_total{event=\"sts_calls\"}"),
        0.0
    );
    let _ = std::fs::remove_file(&file);
}
