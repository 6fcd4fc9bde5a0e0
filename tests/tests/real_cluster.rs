//! The agent against a real kube-apiserver (built from k8s.io/kubernetes, RBAC on), with
//! deploy/ applied and nothing but its ServiceAccount's token: it serves a pod's role, lifts
//! its node's startup taint through the real node patch, and its refusal Events pass the
//! real server's validation.

use std::{net::IpAddr, time::Duration};

use interceptor_tests::{
    Node, Pod,
    agent::Agent,
    clients::boto3,
    cluster::{AgentBuilder, Peers},
    control_plane::{ControlPlane, wait_until},
    fake_imds::FakeImds,
    moto::MotoServer,
    require_root,
};

const ROLE: &str = "iam.amazonaws.com/role";
const ALLOWED: &str = "iam.amazonaws.com/allowed-roles";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_with_deploys_rbac_serves_roles_lifts_its_taint_and_posts_events() {
    let test = "the_agent_with_deploys_rbac_serves_roles_lifts_its_taint_and_posts_events";
    if !require_root(test) {
        return;
    }
    let Some(plane) = ControlPlane::shared(test) else {
        return;
    };
    let scope = plane.scope("e2e");
    // The node registers with the startup taint, and one the agent must leave alone.
    scope
        .add_node(&["interceptor.dev/agent-not-ready", "other.example/keep"])
        .await;
    let team = scope.namespace_name("team");
    let locked = scope.namespace_name("locked");
    scope.namespace(&team, &[(ALLOWED, r#"["role-a"]"#)]).await;
    scope
        .namespace(&locked, &[(ALLOWED, r#"["role-a"]"#)])
        .await;

    // The pods are created through the API; their UIDs name the simulated pods' cgroups,
    // and the harness writes their status as the kubelet would.
    let node = Node::new();
    let pod_a = scope
        .running_pod(&node, &team, "app-a", &[(ROLE, "role-a")])
        .await;
    let pod_b = scope
        .running_pod(&node, &locked, "wants-b", &[(ROLE, "role-b")])
        .await;

    let moto = MotoServer::shared_on(node.address);
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let (agent, _) = AgentBuilder::new(
        "real-cluster",
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
    let mut taints = taints;
    taints.sort();
    // TaintNodesByCondition (real admission) added not-ready when the node registered; the
    // node lifecycle controller, which does not run here, would lift it.
    assert_eq!(
        taints,
        ["node.kubernetes.io/not-ready", "other.example/keep"],
        "only the agent's taint is removed"
    );

    served(
        &agent,
        &moto.endpoint(),
        &pod_a,
        &format!("role-a/{team}.app-a"),
    )
    .await;
    let b = tokio::task::block_in_place(|| boto3(&pod_b, &moto.endpoint()));
    let log = agent.log_text();
    assert!(
        b.starts_with("ERROR") && b.contains("NoCredentials"),
        "a role the namespace forbids is not served: {b}\n{log}"
    );

    // The refusal reached the real server as an events.k8s.io Event on that pod.
    let event = scope.wait_event(&locked, "wants-b", "RoleNotAllowed").await;
    assert_eq!(event["regarding"]["uid"], pod_b.uid.as_str());
    assert_eq!(event["type"], "Warning");
    assert!(
        event["note"]
            .as_str()
            .unwrap()
            .contains(&format!("not allowed in namespace {locked}")),
        "{event}"
    );
}

/// The real watch protocol's worst case: etcd is compacted past what the agent has seen
/// and kube-apiserver restarts, so the agent's watch resumes from a resourceVersion the
/// server no longer has. The server answers 410 Gone, the agent relists, and a pod
/// created after the outage is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_compaction_and_an_apiserver_restart_the_agent_relists_and_serves_new_pods() {
    let test = "after_compaction_and_an_apiserver_restart_the_agent_relists_and_serves_new_pods";
    if !require_root(test) {
        return;
    }
    let Some(plane) = ControlPlane::private(test) else {
        return;
    };
    let scope = plane.scope("relist");
    scope.add_node(&[]).await;
    let team = scope.namespace_name("team");
    scope.namespace(&team, &[]).await;
    let node = Node::new();
    let pod_a = scope
        .running_pod(&node, &team, "app-a", &[(ROLE, "role-a")])
        .await;

    let moto = MotoServer::shared_on(node.address);
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let (agent, _) = AgentBuilder::new(
        "real-relist",
        &node,
        Peers::new(&scope, &upstream, &moto.endpoint()),
    )
    .args(&["--base-role-arn", "arn:aws:iam::123456789012:role/"])
    .start()
    .await;
    // The first AssumeRole of a cold STS may outlast a client's 1 s timeout: ask until
    // the role is served.
    served(
        &agent,
        &moto.endpoint(),
        &pod_a,
        &format!("role-a/{team}.app-a"),
    )
    .await;

    // Writes the agent's node-scoped watch does not see move etcd past its
    // resourceVersion; compaction then drops everything up to now.
    let other = scope.namespace_name("elsewhere");
    scope.namespace(&other, &[]).await;
    for index in 0..5 {
        scope
            .plane
            .kubectl(&[
                "create",
                "configmap",
                &format!("bump-{index}"),
                "-n",
                &other,
            ])
            .unwrap();
    }
    let revision = plane.compact().unwrap();
    assert!(revision > 0);
    plane.stop_apiserver();
    plane.start_apiserver().unwrap();

    let pod_b = scope
        .running_pod(&node, &team, "app-b", &[(ROLE, "role-b")])
        .await;
    served(
        &agent,
        &moto.endpoint(),
        &pod_b,
        &format!("role-b/{team}.app-b"),
    )
    .await;
    let log = agent.log_text();
    assert!(
        log.contains("too old resource version") || log.contains("Expired"),
        "the watch resumed without a 410 (the scenario did not happen):\n{log}"
    );
}

/// Asks boto3 in `pod` until STS reports `assumed-role/{session}`: the first AssumeRole of a
/// cold STS may outlast the client's 1 s timeout.
async fn served(agent: &Agent, sts: &str, pod: &Pod, session: &str) {
    let expected = format!("arn:aws:sts::123456789012:assumed-role/{session}");
    wait_until("the pod's role", Duration::from_secs(60), || {
        let answer = tokio::task::block_in_place(|| boto3(pod, sts));
        let result = if answer == expected {
            Ok(())
        } else {
            Err(format!("{answer}\n{}", agent.log_text()))
        };
        async move { result }
    })
    .await;
}
