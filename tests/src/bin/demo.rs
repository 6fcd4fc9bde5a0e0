//! `cargo xtask demo`: interceptor on a simulated node on this machine.
//!
//! A node (a bridge and a cgroup tree) with three "pods" (network namespace + cgroup),
//! moto as STS, a stand-in for the node's own metadata service that holds the node's
//! credentials, and the real agent in standalone mode with a bindings file. The real AWS
//! CLI runs in each pod with no configuration but a region and the STS endpoint, and
//! calls `sts get-caller-identity`. Everything is removed at the end.

use std::{net::IpAddr, time::Duration};

use interceptor_tests::{
    Node, Pod,
    agent::{Agent, free_port},
    clients::aws_cli,
    cmd,
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

    let mount = interceptor::cgroupfs::cgroup2_mount().expect("cgroup2");
    let mut bindings = String::from("bindings:\n");
    for (name, pod, role) in &pods {
        if let Some(role) = role {
            let path = pod.container.path.strip_prefix(&mount).unwrap();
            bindings.push_str(&format!(
                "  - name: {name}\n    cgroup: /{}\n    role: {role}\n",
                path.display()
            ));
        }
    }
    let file = std::env::temp_dir().join(format!("interceptor-demo-{}.yaml", std::process::id()));
    std::fs::write(&file, &bindings).unwrap();
    println!("\n== bindings ({})\n{bindings}", file.display());

    let pins = Pins::new("demo");
    let args: Vec<String> = [
        "--bindings",
        &file.display().to_string(),
        "--host-ip",
        &node.address.to_string(),
        "--app-port",
        &free_port().to_string(),
        "--cgroup-root",
        &node.cgroup_top().display().to_string(),
        "--metadata-addr",
        &upstream.addr().to_string(),
        "--sts-endpoint",
        &moto.endpoint(),
        "--base-role-arn",
        "arn:aws:iam::123456789012:role/",
    ]
    .iter()
    .map(|arg| (*arg).to_owned())
    .collect();
    let mut agent = Agent::run(
        &args,
        &pins.0,
        free_port(),
        &[
            ("AWS_ACCESS_KEY_ID", "AKIAAGENTEXAMPLE0001"),
            ("AWS_SECRET_ACCESS_KEY", "agent-secret"),
            ("AWS_REGION", "us-east-1"),
        ],
    );
    agent.wait_ready(Duration::from_secs(30));
    let status = cmd::run(
        &interceptor_tests::agent::binary().display().to_string(),
        &["status", "--bpf-pin-dir", &pins.0.display().to_string()],
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
