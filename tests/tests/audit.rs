//! The audit record end to end: the real agent (`--log-format json`) on the simulated
//! node, pods from the real kube-apiserver (the binary's shared control plane), boto3 in
//! pods getting their credentials through the metadata address. Each
//! container handed a key gets exactly one `interceptor::audit` record however often it
//! asks, and the record holds what the SDK received (AccessKeyId, role) and what the
//! kernel recorded (the pod's cgroup, the pid and executable of the asking process), and
//! how the role was chosen; neither the secret key nor the session token appears
//! anywhere in the agent's log.

use std::{net::IpAddr, path::PathBuf};

use interceptor_tests::{
    Node,
    clients::boto3_credentials,
    cluster::{AgentBuilder, Peers},
    control_plane::ControlPlane,
    fake_imds::FakeImds,
    moto::MotoServer,
    require_root,
};

/// The agent's audit records (JSON lines with the audit target), as their fields.
fn audit_records(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["target"] == "interceptor::audit")
        .map(|line| line["fields"].clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_record_per_key_and_container_matching_what_the_sdk_received() {
    let test = "one_record_per_key_and_container_matching_what_the_sdk_received";
    if !require_root(test) {
        return;
    }
    let Some(plane) = ControlPlane::shared(test) else {
        return;
    };
    let scope = plane.scope("audit");
    scope.add_node(&[]).await;
    let team = scope.namespace_name("team");
    scope.namespace(&team, &[]).await;
    let node = Node::new();
    let annotated = scope
        .running_pod(
            &node,
            &team,
            "annotated",
            &[("iam.amazonaws.com/role", "role-a")],
        )
        .await;
    let defaulted = scope.running_pod(&node, &team, "defaulted", &[]).await;
    let moto = MotoServer::shared_on(node.address);
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let (agent, _) = AgentBuilder::new(
        "audit",
        &node,
        Peers::new(&scope, &upstream, &moto.endpoint()),
    )
    .args(&[
        "--log-format",
        "json",
        "--base-role-arn",
        "arn:aws:iam::123456789012:role/",
        "--default-role",
        "role-d",
    ])
    .start()
    .await;
    let sts = moto.endpoint();
    let (received, pods) = tokio::task::spawn_blocking(move || {
        // The annotated pod asks three times (three processes): one key, one record.
        let received = (
            (0..3)
                .map(|_| boto3_credentials(&annotated, &sts))
                .collect::<Vec<_>>(),
            boto3_credentials(&defaulted, &sts),
        );
        (received, (annotated, defaulted))
    })
    .await
    .unwrap();
    let (annotated, defaulted) = &pods;
    let (annotated_runs, defaulted_run) = received;
    let log = agent.log_text();
    let records = audit_records(&log);

    for (pod, name, runs, role, chosen_by) in [
        (
            annotated,
            "annotated",
            &annotated_runs[..],
            "role-a",
            "pod_annotation",
        ),
        (
            defaulted,
            "defaulted",
            std::slice::from_ref(&defaulted_run),
            "role-d",
            "default",
        ),
    ] {
        let (arn, key, secret, token) = &runs[0];
        assert!(
            arn.contains(&format!("assumed-role/{role}/")),
            "{name}: {arn}"
        );
        assert!(
            runs.iter().all(|run| &run.1 == key),
            "{name}: the cached key is handed each time: {runs:?}"
        );
        assert!(
            !log.contains(secret.as_str()) && !log.contains(token.as_str()),
            "{name}: the agent's log holds the secret key or the session token"
        );
        let mine: Vec<&serde_json::Value> = records
            .iter()
            .filter(|record| record["pod_uid"] == pod.uid.as_str())
            .collect();
        assert_eq!(
            mine.len(),
            1,
            "{name}: one record per key and container:\n{records:#?}"
        );
        let record = mine[0];
        assert_eq!(record["access_key_id"], key.as_str(), "{name}: {record}");
        assert_eq!(
            record["role_arn"],
            format!("arn:aws:iam::123456789012:role/{role}"),
            "{name}"
        );
        assert_eq!(record["chosen_by"], chosen_by, "{name}");
        assert_eq!(record["node"], scope.node.as_str());
        assert_eq!(record["namespace"], team.as_str());
        assert_eq!(record["pod"], name);
        assert_eq!(
            record["container_id"],
            format!("containerd://{}", pod.container_id),
            "{name}"
        );
        assert_eq!(record["cgroup_id"], pod.container.id(), "{name}");
        assert!(record["pid"].as_u64().unwrap_or(0) > 0, "{name}: {record}");
        // The agent runs in the host's PID namespace here and the client was alive
        // while it asked: the executable is the SDK's interpreter.
        let executable = record["executable"].as_str().unwrap_or_default();
        assert!(
            PathBuf::from(executable)
                .file_name()
                .is_some_and(|file| file.to_string_lossy().starts_with("python")),
            "{name}: executable {executable:?} ({record})"
        );
        assert_eq!(record["executable_unavailable"], "", "{name}");
        assert!(record["expiration"].as_str().unwrap_or("").ends_with('Z'));
        for field in record.as_object().unwrap().keys() {
            let field = field.to_lowercase();
            assert!(
                !field.contains("secret") && !field.contains("token"),
                "{field}"
            );
        }
    }
    assert_eq!(records.len(), 2, "{records:#?}");
}
