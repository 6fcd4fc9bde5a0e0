//! `cargo xtask demo`: interceptor on a simulated node on this machine, in two acts.
//!
//! First, Kubernetes mode against a real control plane (kube-apiserver and etcd built by
//! `cargo xtask setup`, RBAC on, deploy/ applied): pods created through the API with role
//! annotations, one of them in a namespace whose `allowed-roles` refuse its role, the agent
//! running with nothing but its ServiceAccount's token. Then standalone mode: a node (a bridge and a cgroup tree) with three "pods" (network namespace + cgroup),
//! moto as STS, a stand-in for the node's own metadata service that holds the node's
//! credentials, and the real agent in standalone mode with a bindings file. The real AWS
//! CLI runs in each pod with no configuration but a region and the STS endpoint, and
//! calls `sts get-caller-identity`. Everything is removed at the end.

use std::{net::IpAddr, time::Duration};

use interceptor_tests::{
    Node, Pod,
    agent::{Agent, free_port},
    clients::aws_cli,
    cluster::{AGENT_ENV, AgentBuilder, Peers, bindings_file, standalone_args},
    cmd,
    control_plane::{AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT, ControlPlane, wait_until},
    fake_imds::{FakeImds, NODE_ACCESS_KEY},
    moto::MotoServer,
    pins::Pins,
    require_root,
};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if !require_root("demo") {
        std::process::exit(1);
    }
    kubernetes_act().await;
    standalone_act().await;
}

const ROLE: &str = "iam.amazonaws.com/role";
const ALLOWED: &str = "iam.amazonaws.com/allowed-roles";
const TAINT: &str = "interceptor.dev/agent-not-ready";

async fn kubernetes_act() {
    println!("== act 1: Kubernetes mode, against a real kube-apiserver (RBAC on, deploy/ applied)");
    let plane = ControlPlane::start().unwrap_or_else(|reason| {
        eprintln!("the control plane did not start: {reason}");
        std::process::exit(1);
    });
    let subject = format!("system:serviceaccount:{AGENT_NAMESPACE}:{AGENT_SERVICE_ACCOUNT}");
    println!(
        "\n== what deploy/ lets the agent do (kubectl auth can-i --list --as={subject})\n{}",
        plane
            .kubectl(&["auth", "can-i", "--list", &format!("--as={subject}")])
            .unwrap_or_else(|e| e)
    );
    let scope = plane.scope("demo");
    scope.add_node(&[TAINT]).await;
    scope
        .namespace("payments", &[(ALLOWED, r#"["billing", "analytics"]"#)])
        .await;
    scope
        .namespace("sandbox", &[(ALLOWED, r#"["readonly"]"#)])
        .await;
    let node = Node::new();
    let mut pods = Vec::new();
    for (namespace, name, role) in [
        ("payments", "billing", "billing"),
        ("payments", "analytics", "analytics"),
        ("sandbox", "intruder", "billing"),
    ] {
        let pod = scope
            .running_pod(&node, namespace, name, &[(ROLE, role)])
            .await;
        pods.push((format!("{namespace}/{name}"), pod, role));
    }
    println!(
        "== pods, created through the API, annotated\n{}",
        plane
            .kubectl(&[
                "get",
                "pods",
                "-A",
                "-o",
                "custom-columns=POD:.metadata.name,NAMESPACE:.metadata.namespace,\
                 NODE:.spec.nodeName,ROLE:.metadata.annotations.iam\\.amazonaws\\.com/role,\
                 PHASE:.status.phase",
            ])
            .unwrap_or_else(|e| e)
    );

    let moto = MotoServer::start_on(node.address, &[]);
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let (agent, _) = AgentBuilder::new(
        "demo-k8s",
        &node,
        Peers::new(&scope, &upstream, &moto.endpoint()),
    )
    .args(&[
        "--base-role-arn",
        "arn:aws:iam::123456789012:role/",
        "--namespace-restrictions",
    ])
    .start()
    .await;
    let taints = scope.wait_startup_taint_removed().await;
    println!(
        "== the agent is ready and lifted {TAINT} from node {}: taints now {taints:?}\n",
        scope.node
    );

    println!("{:<20} {:<10} identity STS reports", "pod", "role");
    let sts = moto.endpoint();
    for (name, pod, role) in pods {
        let sts = sts.clone();
        let (answer, _pod) = tokio::task::spawn_blocking(move || (aws_cli(&pod, &sts), pod))
            .await
            .unwrap();
        let identity = if answer.starts_with("arn:") {
            answer
        } else {
            format!("refused: {}", answer.lines().last().unwrap_or_default())
        };
        println!("{name:<20} {role:<10} {identity}");
    }
    let events = wait_until("the refusal's Event", Duration::from_secs(30), || async {
        let events = scope.events("sandbox").await;
        if events.is_empty() {
            Err("none yet".to_owned())
        } else {
            Ok(events)
        }
    })
    .await;
    println!("\n== Events the agent posted (events.k8s.io/v1, accepted by the real server)");
    for event in events {
        println!(
            "{} {} {}: {}",
            event["type"].as_str().unwrap_or_default(),
            event["reason"].as_str().unwrap_or_default(),
            event["regarding"]["name"].as_str().unwrap_or_default(),
            event["note"].as_str().unwrap_or_default()
        );
    }
    drop(agent);
    println!("\n(cleaning up: agent, pods, kube-apiserver, etcd)\n");
}

async fn standalone_act() {
    println!("== act 2: standalone mode (--bindings), no Kubernetes");
    println!("== a node with three pods, moto as STS, the node's metadata service faked");
    let node = Node::new();
    let pods: Vec<(&str, Pod, Option<&str>)> = vec![
        ("billing", node.pod(), Some("billing")),
        (
            "analytics",
            node.pod(),
            Some("arn:aws:iam::210987654321:role/analytics"),
        ),
        ("intruder", node.pod(), None),
    ];
    let moto = MotoServer::start_on(node.address, &[]);
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;

    let bound: Vec<(&str, &Pod, &str)> = pods
        .iter()
        .filter_map(|(name, pod, role)| Some((*name, pod, (*role)?)))
        .collect();
    let file = bindings_file("demo", &bound);
    let bindings = std::fs::read_to_string(&file).unwrap();
    println!("\n== bindings ({})\n{bindings}", file.display());

    let pins = Pins::new("demo");
    let args = standalone_args(&node, &file, &upstream, &moto.endpoint());
    let mut agent = Agent::run(&args, &pins.0, free_port(), &AGENT_ENV);
    agent.wait_ready(Duration::from_secs(30));
    let status = cmd::run(
        &interceptor_tests::agent::binary().display().to_string(),
        &[
            "status",
            "--bpf-pin-dir",
            &pins.0.display().to_string(),
            "--admin-addr",
            &agent.metrics.to_string(),
        ],
    );
    println!("== interceptor status\n{status}");
    let top = node.cgroup_top().display().to_string();
    println!(
        "\n== bpftool cgroup tree {top}\n{}",
        cmd::run("bpftool", &["cgroup", "tree", &top])
    );

    println!("== in each pod: aws sts get-caller-identity (credentials from 169.254.169.254)\n");
    println!("{:<10} {:<45} identity STS reports", "pod", "role bound");
    let sts = moto.endpoint();
    let mut leaked = false;
    for (name, pod, role) in pods {
        let sts = sts.clone();
        let (answer, _pod) = tokio::task::spawn_blocking(move || (aws_cli(&pod, &sts), pod))
            .await
            .unwrap();
        leaked |= answer.contains(NODE_ACCESS_KEY);
        let identity = if answer.starts_with("arn:") {
            answer
        } else {
            format!("refused: {}", answer.lines().last().unwrap_or_default())
        };
        println!("{name:<10} {:<45} {identity}", role.unwrap_or("(none)"));
    }
    println!(
        "\nnode credentials reached a pod: {}; requests that reached the node's metadata service: {:?}",
        if leaked { "YES" } else { "no" },
        upstream.requests()
    );
    let (_, metrics) = agent.admin_get("/metrics").unwrap_or_default();
    for line in metrics
        .lines()
        .filter(|line| line.starts_with("interceptor_requests_total"))
    {
        println!("{line}");
    }
    let _ = std::fs::remove_file(&file);
    println!("\n(cleaning up: agent, programs, pins, netns, veth, cgroups)");
}
