//! End to end on the simulated node: the real agent binary, the test API server, moto as
//! STS, a fake upstream metadata service holding node credentials, and real AWS clients
//! in pods (boto3, the AWS CLI) that know nothing but a region and the STS endpoint.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, process::Command, time::Duration};

use interceptor_tests::{
    Node,
    apiserver::{FakeApiServer, new_namespace, new_node},
    clients::{aws_cli, boto3, raw, sdk_js, sdk_rust},
    cluster::{AGENT_ENV, NODE, Peers, api_pod, start_agent},
    fake_imds::{FakeImds, NODE_ACCESS_KEY},
    moto::MotoServer,
    peers::venv,
    require_root,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_sdks_in_pods_get_exactly_their_own_role() {
    if !require_root("real_sdks_in_pods_get_exactly_their_own_role") {
        return;
    }
    let node = Node::new();
    let (pod_a, pod_b, plain, locked) = (node.pod(), node.pod(), node.pod(), node.pod());

    let server = FakeApiServer::start().await;
    let mut open = new_namespace("team-a");
    open.metadata.annotations = Some(BTreeMap::from([(
        "iam.amazonaws.com/allowed-roles".to_owned(),
        r#"["role-a", "role-b"]"#.to_owned(),
    )]));
    server.add_namespace(open);
    let mut locked_ns = new_namespace("locked");
    locked_ns.metadata.annotations = Some(BTreeMap::from([(
        "iam.amazonaws.com/allowed-roles".to_owned(),
        r#"["role-a"]"#.to_owned(),
    )]));
    server.add_namespace(locked_ns);
    server.add_pod(api_pod(&pod_a.uid, "team-a", "app-a", Some("role-a")));
    server.add_pod(api_pod(&pod_b.uid, "team-a", "app-b", Some("role-b")));
    server.add_pod(api_pod(&plain.uid, "team-a", "plain", None));
    server.add_pod(api_pod(&locked.uid, "locked", "wants-b", Some("role-b")));
    // The node registered with the startup taint; the agent removes it once ready.
    let mut api_node = new_node(NODE);
    api_node.spec.get_or_insert_default().taints = Some(vec![
        k8s_openapi::api::core::v1::Taint {
            key: "interceptor.dev/agent-not-ready".into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        },
        k8s_openapi::api::core::v1::Taint {
            key: "other.example/keep".into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        },
    ]);
    server.add_node(api_node);

    // STS on the node's address, so that pods reach it too.
    let moto = MotoServer::start_on(node.address, &[]);
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let extra = [
        "--auto-discover-base-arn",
        "--auto-discover-default-role",
        "--namespace-restrictions",
        "--debug",
    ];
    let (agent, _) = start_agent(
        "e2e",
        &node,
        Peers {
            api: &server,
            upstream: &upstream,
            sts: &moto.endpoint(),
        },
        &extra,
        &AGENT_ENV,
        None,
    )
    .await;
    let taints = interceptor_tests::apiserver::wait_for(
        "the startup taint's removal",
        Duration::from_secs(10),
        || {
            let taints: Vec<String> = server
                .node(NODE)
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
    assert_eq!(
        taints,
        ["other.example/keep"],
        "only the agent's taint is removed"
    );
    let sts = moto.endpoint();

    let (a, b, p, l) = tokio::task::spawn_blocking({
        let sts = sts.clone();
        move || {
            let a = (
                boto3(&pod_a, &sts),
                aws_cli(&pod_a, &sts),
                sdk_rust(&pod_a, &sts),
                sdk_js(&pod_a, &sts),
            );
            let b = (
                boto3(&pod_b, &sts),
                aws_cli(&pod_b, &sts),
                sdk_rust(&pod_b, &sts),
                sdk_js(&pod_b, &sts),
            );
            let p = boto3(&plain, &sts);
            let l = boto3(&locked, &sts);
            (a, b, p, l)
        }
    })
    .await
    .unwrap();
    let log = agent.log_text();
    let role_a = "arn:aws:sts::123456789012:assumed-role/role-a/team-a.app-a";
    let role_b = "arn:aws:sts::123456789012:assumed-role/role-b/team-a.app-b";
    for (client, got_a, got_b) in [
        ("boto3", &a.0, &b.0),
        ("AWS CLI", &a.1, &b.1),
        ("aws-sdk-rust", &a.2, &b.2),
        ("AWS SDK for JavaScript", &a.3, &b.3),
    ] {
        assert_eq!(got_a, role_a, "{client} in pod a\n{log}");
        assert_eq!(got_b, role_b, "{client} in pod b\n{log}");
    }
    assert!(
        p.starts_with("ERROR") && p.contains("NoCredentials"),
        "an unannotated pod gets nothing: {p}"
    );
    assert!(
        l.starts_with("ERROR") && l.contains("NoCredentials"),
        "a forbidden role is not served: {l}"
    );

    // Nothing of the node's identity went anywhere: only the agent's own discovery read
    // the upstream service, never its credentials.
    let upstream_requests = upstream.requests();
    assert!(
        upstream_requests
            .iter()
            .all(|r| !r.contains(NODE_ACCESS_KEY) && !r.contains("security-credentials/node")),
        "{upstream_requests:?}"
    );
    let (status, metrics) = agent.admin_get("/metrics").expect("metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("interceptor_requests_total"), "{metrics}");
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
    };
    // Pods with roles were prefetched when the watch delivered them, so their requests
    // were answered from memory: one AssumeRole per pod, not per request.
    assert!(value(r#"interceptor_credentials_events_total{event="prefetches"}"#) >= 2);
    assert!(value(r#"interceptor_credentials_events_total{event="hits"}"#) >= 2);
    assert_eq!(
        value(r#"interceptor_credentials_events_total{event="sts_calls"}"#),
        2
    );
    let (_, store) = agent.admin_get("/debug/store").expect("debug store");
    assert!(
        store.contains("team-a/app-a") && !store.contains("SecretAccessKey"),
        "{store}"
    );
}

/// moto checks the agent's own IAM policy: a pod whose role the agent may not assume is
/// told so through the metadata API (and an Event), and never gets other credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_sts_refuses_reaches_the_pod_as_an_error_and_an_event() {
    if !require_root("a_role_sts_refuses_reaches_the_pod_as_an_error_and_an_event") {
        return;
    }
    let node = Node::new();
    let (allowed, refused) = (node.pod(), node.pod());
    let server = FakeApiServer::start().await;
    server.add_namespace(new_namespace("team-a"));
    server.add_pod(api_pod(&allowed.uid, "team-a", "allowed", Some("role-a")));
    server.add_pod(api_pod(
        &refused.uid,
        "team-a",
        "refused",
        Some("role-secret"),
    ));
    let moto = MotoServer::start_on(node.address, &[("INITIAL_NO_AUTH_ACTION_COUNT", "3")]);
    let setup = Command::new(venv().join("bin/python"))
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers/py/moto_iam_user.py"))
        .args([&moto.endpoint(), "123456789012", "role-a"])
        .output()
        .expect("IAM setup");
    assert!(
        setup.status.success(),
        "{}",
        String::from_utf8_lossy(&setup.stderr)
    );
    let key: serde_json::Value = serde_json::from_slice(&setup.stdout).expect("access key JSON");

    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let env = [
        ("AWS_ACCESS_KEY_ID", key["id"].as_str().unwrap()),
        ("AWS_SECRET_ACCESS_KEY", key["secret"].as_str().unwrap()),
        ("AWS_REGION", "us-east-1"),
    ];
    let extra = ["--base-role-arn", "arn:aws:iam::123456789012:role/"];
    let (agent, _) = start_agent(
        "e2e-deny",
        &node,
        Peers {
            api: &server,
            upstream: &upstream,
            sts: &moto.endpoint(),
        },
        &extra,
        &env,
        None,
    )
    .await;
    let sts = moto.endpoint();
    let (ok, denied) =
        tokio::task::spawn_blocking(move || (boto3(&allowed, &sts), boto3(&refused, &sts)))
            .await
            .unwrap();
    let log = agent.log_text();
    assert_eq!(
        ok, "arn:aws:sts::123456789012:assumed-role/role-a/team-a.allowed",
        "{log}"
    );
    assert!(
        denied.starts_with("ERROR"),
        "the refused pod must get no credentials: {denied}\n{log}"
    );
    assert!(!denied.contains("assumed-role"), "{denied}");
    let event = interceptor_tests::apiserver::wait_for(
        "the AssumeRoleFailed event",
        Duration::from_secs(10),
        || {
            let events = server.events();
            events
                .iter()
                .find(|e| e["reason"] == "AssumeRoleFailed")
                .cloned()
                .ok_or_else(|| format!("{events:?}"))
        },
    )
    .await;
    let note = event["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("AccessDenied") && note.contains("role-secret"),
        "{note}"
    );
    assert_eq!(event["regarding"]["name"], "refused");
}

/// The metadata API's edges, as EC2 answers them, and what a pod must not get.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metadata_api_answers_as_ec2_and_holds_against_misuse() {
    if !require_root("the_metadata_api_answers_as_ec2_and_holds_against_misuse") {
        return;
    }
    let node = Node::new();
    let (pod_a, pod_b) = (node.pod(), node.pod());
    let server = FakeApiServer::start().await;
    server.add_namespace(new_namespace("team-a"));
    server.add_pod(api_pod(&pod_a.uid, "team-a", "app-a", Some("role-a")));
    server.add_pod(api_pod(&pod_b.uid, "team-a", "app-b", Some("role-b")));
    let moto = MotoServer::start_on(node.address, &[]);
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let extra = [
        "--base-role-arn",
        "arn:aws:iam::123456789012:role/",
        "--allow-route-regexp",
        "^/latest/meta-data/placement/.*",
        "--imdsv2-required",
    ];
    // The agent runs in a pod of its own below the attach point (hostNetwork, as the
    // DaemonSet), so its cgroups must be exempted by its pod UID.
    let agent_pod = node.pod();
    let (agent, app_port) = start_agent(
        "e2e-api",
        &node,
        Peers {
            api: &server,
            upstream: &upstream,
            sts: &moto.endpoint(),
        },
        &extra,
        &AGENT_ENV,
        Some(&agent_pod),
    )
    .await;
    let status = std::process::Command::new(interceptor_tests::agent::binary())
        .args([
            "status",
            "--json",
            "--bpf-pin-dir",
            &agent.pin_dir.display().to_string(),
        ])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status --json");
    let exempt: Vec<u64> = status["exempt_cgroups"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(serde_json::Value::as_u64)
        .collect();
    assert!(
        exempt.contains(&agent_pod.container.id()),
        "the agent's own container is not exempt: {exempt:?}"
    );
    assert!(
        exempt.contains(&agent_pod.pod_slice.id()),
        "the agent's own pod slice is not exempt: {exempt:?}"
    );
    let sts = moto.endpoint();
    let node_address = node.address;

    let checks = tokio::task::spawn_blocking(move || {
        let ttl = "X-aws-ec2-metadata-token-ttl-seconds=60";
        let (status, token_a) = raw(&pod_a, "PUT", "/latest/api/token", &[ttl]);
        assert_eq!(status, 200, "token: {token_a}");
        let token_a = token_a.trim().to_owned();
        let with_a = format!("X-aws-ec2-metadata-token={token_a}");
        let creds = "/latest/meta-data/iam/security-credentials/";
        let mut results = Vec::new();
        let mut check = |what: &str, got: (u16, String), status: u16, needle: &str| {
            results.push((what.to_owned(), got.0 == status && got.1.contains(needle), format!("{got:?}")));
        };
        check("list with token", raw(&pod_a, "GET", creds, &[&with_a]), 200, "role-a");
        check("dated version", raw(&pod_a, "GET", "/2016-09-02/meta-data/iam/security-credentials/", &[&with_a]), 200, "role-a");
        check(
            "own credentials",
            raw(&pod_a, "GET", &format!("{creds}role-a"), &[&with_a]),
            200,
            "\"Code\" : \"Success\"",
        );
        check("another role's name", raw(&pod_a, "GET", &format!("{creds}role-b"), &[&with_a]), 404, "404 - Not Found");
        check("iam/info", raw(&pod_a, "GET", "/latest/meta-data/iam/info", &[&with_a]), 200, "instance-profile/role-a");
        check("HEAD", raw(&pod_a, "HEAD", creds, &[&with_a]), 200, "");
        check("tokenless with --imdsv2-required", raw(&pod_a, "GET", creds, &[]), 401, "");
        check("pod a's token in pod b", raw(&pod_b, "GET", creds, &[&with_a]), 401, "");
        check("forged token", raw(&pod_a, "GET", creds, &["X-aws-ec2-metadata-token=AAAA"]), 401, "");
        check("token PUT with X-Forwarded-For", raw(&pod_a, "PUT", "/latest/api/token", &[ttl, "X-Forwarded-For=1.2.3.4"]), 403, "");
        check("TTL out of range", raw(&pod_a, "PUT", "/latest/api/token", &["X-aws-ec2-metadata-token-ttl-seconds=21601"]), 400, "");
        check("TTL missing", raw(&pod_a, "PUT", "/latest/api/token", &[]), 400, "");
        check("allowed passthrough", raw(&pod_a, "GET", "/latest/meta-data/placement/availability-zone", &[&with_a]), 200, "us-east-1a");
        check("not allowed: identity document", raw(&pod_a, "GET", "/latest/dynamic/instance-identity/document", &[&with_a]), 404, "");
        check("path trick", raw(&pod_a, "GET", "/latest/meta-data/placement/../iam/security-credentials/", &[&with_a]), 404, "");
        check("encoded trick", raw(&pod_a, "GET", "/latest/meta-data/placement/%2e%2e/iam/info", &[&with_a]), 404, "");
        // A client that dials the proxy directly, not through the redirect: no kernel
        // record, so no answer but 403 (here from the node's own network namespace).
        let direct = std::process::Command::new(venv().join("bin/python"))
            .args([
                "-c",
                &format!(
                    "import http.client as h; c=h.HTTPConnection('{node_address}', {app_port}, timeout=3); \
                     c.request('GET', '/latest/meta-data/iam/security-credentials/'); print(c.getresponse().status)"
                ),
            ])
            .output()
            .unwrap();
        results.push((
            "direct connection".into(),
            String::from_utf8_lossy(&direct.stdout).trim() == "403",
            format!("{direct:?}"),
        ));
        let v2_only = boto3(&pod_b, &sts);
        results.push((
            "boto3 with IMDSv2 required".into(),
            v2_only == "arn:aws:sts::123456789012:assumed-role/role-b/team-a.app-b",
            v2_only,
        ));
        results
    })
    .await
    .unwrap();
    let failed: Vec<_> = checks.iter().filter(|(_, ok, _)| !ok).collect();
    assert!(
        failed.is_empty(),
        "failed checks: {failed:#?}\n{}",
        agent.log_text()
    );

    // Only the allowed path reached the upstream service (plus the agent's own token).
    let upstream_requests = upstream.requests();
    assert!(
        upstream_requests
            .iter()
            .all(|r| r == "PUT /latest/api/token"
                || r == "GET /latest/meta-data/placement/availability-zone"),
        "{upstream_requests:?}"
    );
    assert!(
        upstream_requests.contains(&"GET /latest/meta-data/placement/availability-zone".to_owned())
    );
    assert_eq!(agent.metric("interceptor_attribution_misses_total"), 1.0);
}
