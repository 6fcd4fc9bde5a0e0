//! The agent against a real kube-apiserver (built from k8s.io/kubernetes, RBAC on), with
//! deploy/ applied and nothing but its ServiceAccount's token: it serves a pod's role, lifts
//! its node's startup taint through the real node patch, and its refusal Events pass the
//! real server's validation.

use std::{net::IpAddr, time::Duration};

use interceptor_tests::{
    Node,
    clients::boto3,
    cluster::{AGENT_ENV, Peers, start_agent},
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
    let api_a = scope.add_pod(&team, "app-a", &[(ROLE, "role-a")]).await;
    let api_b = scope.add_pod(&locked, "wants-b", &[(ROLE, "role-b")]).await;
    let pod_a = node.pod_with_uid(api_a.metadata.uid.clone().unwrap());
    let pod_b = node.pod_with_uid(api_b.metadata.uid.clone().unwrap());
    scope.set_running(&api_a, &pod_a).await;
    scope.set_running(&api_b, &pod_b).await;

    let moto = MotoServer::start_on(node.address, &[]);
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let (agent, _) = start_agent(
        "real-cluster",
        &node,
        Peers {
            api: &scope,
            upstream: &upstream,
            sts: &moto.endpoint(),
        },
        &[
            "--base-role-arn",
            "arn:aws:iam::123456789012:role/",
            "--namespace-restrictions",
        ],
        &AGENT_ENV,
        None,
    )
    .await;

    let taints = wait_until(
        "the startup taint's removal",
        Duration::from_secs(30),
        || async {
            let taints: Vec<String> = scope
                .node_object()
                .await
                .and_then(|node| node.spec)
                .and_then(|spec| spec.taints)
                .unwrap_or_default()
                .into_iter()
                .map(|taint| taint.key)
                .collect();
            if taints
                .iter()
                .any(|key| key == "interceptor.dev/agent-not-ready")
            {
                Err(format!("{taints:?}"))
            } else {
                Ok(taints)
            }
        },
    )
    .await;
    let mut taints = taints;
    taints.sort();
    // TaintNodesByCondition (real admission) added not-ready when the node registered; the
    // node lifecycle controller, which does not run here, would lift it.
    assert_eq!(
        taints,
        ["node.kubernetes.io/not-ready", "other.example/keep"],
        "only the agent's taint is removed"
    );

    let sts = moto.endpoint();
    let (a, b) = tokio::task::spawn_blocking(move || (boto3(&pod_a, &sts), boto3(&pod_b, &sts)))
        .await
        .unwrap();
    let log = agent.log_text();
    assert_eq!(
        a,
        format!("arn:aws:sts::123456789012:assumed-role/role-a/{team}.app-a"),
        "{log}"
    );
    assert!(
        b.starts_with("ERROR") && b.contains("NoCredentials"),
        "a role the namespace forbids is not served: {b}\n{log}"
    );

    // The refusal reached the real server as an events.k8s.io Event on that pod.
    let event = wait_until(
        "the RoleNotAllowed event",
        Duration::from_secs(30),
        || async {
            let events = scope.events(&locked).await;
            events
                .iter()
                .find(|e| e["reason"] == "RoleNotAllowed")
                .cloned()
                .ok_or_else(|| format!("{events:?}"))
        },
    )
    .await;
    assert_eq!(
        event["regarding"]["uid"],
        api_b.metadata.uid.unwrap().as_str()
    );
    assert_eq!(event["type"], "Warning");
    assert!(
        event["note"]
            .as_str()
            .unwrap()
            .contains(&format!("not allowed in namespace {locked}")),
        "{event}"
    );
}
