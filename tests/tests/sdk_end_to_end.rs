//! End to end on the simulated node: the real agent binary, the real kube-apiserver (the
//! test binary's shared control plane, RBAC on, the agent holding deploy/'s permissions
//! only; a node name and namespaces per test), moto as STS, a fake upstream metadata
//! service holding node credentials, and real AWS clients in pods (boto3, the AWS CLI)
//! that know nothing but a region and the STS endpoint.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, process::Command, time::Duration};

use interceptor_tests::{
    Node,
    agent::Agent,
    ask::{CREDS, ask_until},
    clients::{aws_cli, boto3, in_pod, in_pod_with, raw, sdk_js, sdk_rust},
    cluster::{AgentBuilder, Peers},
    control_plane::{ControlPlane, Scope},
    fake_imds::{FakeImds, NODE_ACCESS_KEY, NODE_SIGNATURE},
    moto::MotoServer,
    peers::venv,
    pod_client::PodClient,
    require_root,
};

const ROLE: &str = "iam.amazonaws.com/role";
const ALLOWED: &str = "iam.amazonaws.com/allowed-roles";

/// A pod's annotations: `role` when it has one.
fn role(role: Option<&str>) -> Vec<(&str, &str)> {
    role.map(|role| (ROLE, role)).into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_sdks_in_pods_get_exactly_their_own_role() {
    let test = "real_sdks_in_pods_get_exactly_their_own_role";
    if !require_root(test) {
        return;
    }
    let Some(plane) = ControlPlane::shared(test) else {
        return;
    };
    let scope = plane.scope("sdks");
    // The node registers with the startup taint (the agent removes it once ready, through
    // the real node patch) and one the agent must leave alone.
    scope
        .add_node(&["interceptor.dev/agent-not-ready", "other.example/keep"])
        .await;
    let team = scope.namespace_name("team-a");
    let locked_ns = scope.namespace_name("locked");
    scope
        .namespace(&team, &[(ALLOWED, r#"["role-a", "role-b"]"#)])
        .await;
    scope
        .namespace(&locked_ns, &[(ALLOWED, r#"["role-a"]"#)])
        .await;
    let node = Node::new();
    let pod_a = scope
        .running_pod(&node, &team, "app-a", &role(Some("role-a")))
        .await;
    let pod_b = scope
        .running_pod(&node, &team, "app-b", &role(Some("role-b")))
        .await;
    let plain = scope.running_pod(&node, &team, "plain", &[]).await;
    let locked = scope
        .running_pod(&node, &locked_ns, "wants-b", &role(Some("role-b")))
        .await;

    // STS on the node's address, so that pods reach it too.
    let moto = MotoServer::shared_on(node.address);
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let extra = [
        "--auto-discover-base-arn",
        "--auto-discover-default-role",
        "--namespace-restrictions",
        "--debug",
    ];
    let (agent, _) = AgentBuilder::new(
        "e2e",
        &node,
        Peers::new(&scope, &upstream, &moto.endpoint()),
    )
    .args(&extra)
    .start()
    .await;
    let mut taints = scope.wait_startup_taint_removed().await;
    taints.sort();
    // TaintNodesByCondition (real admission) added not-ready when the node registered; the
    // node lifecycle controller, which does not run here, would lift it.
    assert_eq!(
        taints,
        ["node.kubernetes.io/not-ready", "other.example/keep"],
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
    let role_a = format!("arn:aws:sts::123456789012:assumed-role/role-a/{team}.app-a");
    let role_b = format!("arn:aws:sts::123456789012:assumed-role/role-b/{team}.app-b");
    for (client, got_a, got_b) in [
        ("boto3", &a.0, &b.0),
        ("AWS CLI", &a.1, &b.1),
        ("aws-sdk-rust", &a.2, &b.2),
        ("AWS SDK for JavaScript", &a.3, &b.3),
    ] {
        assert_eq!(got_a, &role_a, "{client} in pod a\n{log}");
        assert_eq!(got_b, &role_b, "{client} in pod b\n{log}");
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
    let value = |series: &str| agent.metric(series);
    // Pods with roles were prefetched when the watch delivered them, so their requests
    // were answered from memory: one AssumeRole per pod, not per request.
    assert!(value(r#"interceptor_credentials_events_total{event="prefetches"}"#) >= 2.0);
    assert!(value(r#"interceptor_credentials_events_total{event="hits"}"#) >= 2.0);
    assert_eq!(
        value(r#"interceptor_credentials_events_total{event="sts_calls"}"#),
        2.0
    );
    let (_, store) = agent.admin_get("/debug/store").expect("debug store");
    assert!(
        store.contains(&format!("{team}/app-a")) && !store.contains("SecretAccessKey"),
        "{store}"
    );
}

/// moto checks the agent's own IAM policy: a pod whose role the agent may not assume is
/// told so through the metadata API (and an Event), and never gets other credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_sts_refuses_reaches_the_pod_as_an_error_and_an_event() {
    let test = "a_role_sts_refuses_reaches_the_pod_as_an_error_and_an_event";
    if !require_root(test) {
        return;
    }
    let Some(plane) = ControlPlane::shared(test) else {
        return;
    };
    let scope = plane.scope("deny");
    scope.add_node(&[]).await;
    let team = scope.namespace_name("team-a");
    scope.namespace(&team, &[]).await;
    let node = Node::new();
    let allowed = scope
        .running_pod(&node, &team, "allowed", &role(Some("role-a")))
        .await;
    let refused = scope
        .running_pod(&node, &team, "refused", &role(Some("role-secret")))
        .await;
    let refused_uid = refused.uid.clone();
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
    let (agent, _) = AgentBuilder::new(
        "e2e-deny",
        &node,
        Peers::new(&scope, &upstream, &moto.endpoint()),
    )
    .args(&extra)
    .env(&env)
    .start()
    .await;
    let sts = moto.endpoint();
    let (ok, denied) =
        tokio::task::spawn_blocking(move || (boto3(&allowed, &sts), boto3(&refused, &sts)))
            .await
            .unwrap();
    let log = agent.log_text();
    assert_eq!(
        ok,
        format!("arn:aws:sts::123456789012:assumed-role/role-a/{team}.allowed"),
        "{log}"
    );
    assert!(
        denied.starts_with("ERROR"),
        "the refused pod must get no credentials: {denied}\n{log}"
    );
    assert!(!denied.contains("assumed-role"), "{denied}");
    // The Event was created (and validated) by the real server, on the refused pod.
    let event = scope.wait_event(&team, "refused", "AssumeRoleFailed").await;
    let note = event["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("AccessDenied") && note.contains("role-secret"),
        "{note}"
    );
    assert_eq!(event["regarding"]["name"], "refused");
    assert_eq!(event["regarding"]["uid"], refused_uid.as_str());
    assert_eq!(event["type"], "Warning");
}

/// The metadata API's edges, as EC2 answers them, and what a pod must not get.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metadata_api_answers_as_ec2_and_holds_against_misuse() {
    let test = "the_metadata_api_answers_as_ec2_and_holds_against_misuse";
    if !require_root(test) {
        return;
    }
    let Some(plane) = ControlPlane::shared(test) else {
        return;
    };
    let scope = plane.scope("edges");
    scope.add_node(&[]).await;
    let team = scope.namespace_name("team-a");
    scope.namespace(&team, &[]).await;
    let node = Node::new();
    let pod_a = scope
        .running_pod(&node, &team, "app-a", &role(Some("role-a")))
        .await;
    let pod_b = scope
        .running_pod(&node, &team, "app-b", &role(Some("role-b")))
        .await;
    let moto = MotoServer::shared_on(node.address);
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
    let (agent, app_port) = AgentBuilder::new(
        "e2e-api",
        &node,
        Peers::new(&scope, &upstream, &moto.endpoint()),
    )
    .args(&extra)
    .own_pod(&agent_pod)
    .start()
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
    let role_b = format!("arn:aws:sts::123456789012:assumed-role/role-b/{team}.app-b");

    let checks = tokio::task::spawn_blocking(move || {
        let mut client_a = PodClient::start(&pod_a);
        let ttl = "X-aws-ec2-metadata-token-ttl-seconds=60";
        let (status, token_a) = client_a.raw("PUT", "/latest/api/token", &[ttl]);
        assert_eq!(status, 200, "token: {token_a}");
        let token_a = token_a.trim().to_owned();
        let with_a = format!("X-aws-ec2-metadata-token={token_a}");
        let creds = "/latest/meta-data/iam/security-credentials/";
        let mut results = Vec::new();
        let mut check = |what: &str, got: (u16, String), status: u16, needle: &str| {
            results.push((what.to_owned(), got.0 == status && got.1.contains(needle), format!("{got:?}")));
        };
        check("list with token", client_a.raw("GET", creds, &[&with_a]), 200, "role-a");
        check("dated version", client_a.raw("GET", "/2016-09-02/meta-data/iam/security-credentials/", &[&with_a]), 200, "role-a");
        check(
            "own credentials",
            client_a.raw("GET", &format!("{creds}role-a"), &[&with_a]),
            200,
            "\"Code\" : \"Success\"",
        );
        check("another role's name", client_a.raw("GET", &format!("{creds}role-b"), &[&with_a]), 404, "404 - Not Found");
        check("iam/info", client_a.raw("GET", "/latest/meta-data/iam/info", &[&with_a]), 200, "instance-profile/role-a");
        check("HEAD", client_a.raw("HEAD", creds, &[&with_a]), 200, "");
        check("tokenless with --imdsv2-required", client_a.raw("GET", creds, &[]), 401, "");
        check("pod a's token in pod b", raw(&pod_b, "GET", creds, &[&with_a]), 401, "");
        check("forged token", client_a.raw("GET", creds, &["X-aws-ec2-metadata-token=AAAA"]), 401, "");
        check("token PUT with X-Forwarded-For", client_a.raw("PUT", "/latest/api/token", &[ttl, "X-Forwarded-For=1.2.3.4"]), 403, "");
        check("TTL out of range", client_a.raw("PUT", "/latest/api/token", &["X-aws-ec2-metadata-token-ttl-seconds=21601"]), 400, "");
        check("TTL missing", client_a.raw("PUT", "/latest/api/token", &[]), 400, "");
        check("allowed passthrough", client_a.raw("GET", "/latest/meta-data/placement/availability-zone", &[&with_a]), 200, "us-east-1a");
        check("not allowed: identity document", client_a.raw("GET", "/latest/dynamic/instance-identity/document", &[&with_a]), 404, "");
        check("path trick", client_a.raw("GET", "/latest/meta-data/placement/../iam/security-credentials/", &[&with_a]), 404, "");
        check("encoded trick", client_a.raw("GET", "/latest/meta-data/placement/%2e%2e/iam/info", &[&with_a]), 404, "");
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
            v2_only == role_b,
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

/// A node for the tests below: a scope of the shared control plane (its node and a
/// namespace holding the pods), moto on the node's address (pods reach it), the agent's
/// own upstream fake and the agent. Fields drop in order: the agent first, the pods, the
/// node last.
struct Cluster {
    agent: Agent,
    pods: Vec<interceptor_tests::Pod>,
    scope: Scope<'static>,
    team: String,
    moto: MotoServer,
    _upstream: FakeImds,
    node: Node,
}

impl Cluster {
    /// `None` (the test skips) when the control plane cannot start outside CI. `pods`
    /// are `(name, role)`, created through the API and simulated, in that order.
    async fn start(
        test: &str,
        name: &str,
        node: Node,
        pods: &[(&str, Option<&str>)],
        extra: &[&str],
    ) -> Option<Self> {
        let scope = ControlPlane::shared(test)?.scope(name);
        scope.add_node(&[]).await;
        let team = scope.namespace_name("team");
        scope.namespace(&team, &[]).await;
        let mut simulated = Vec::new();
        for (app, pod_role) in pods {
            simulated.push(scope.running_pod(&node, &team, app, &role(*pod_role)).await);
        }
        let moto = MotoServer::shared_on(node.address);
        let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
        let mut flags = vec!["--base-role-arn", "arn:aws:iam::123456789012:role/"];
        flags.extend_from_slice(extra);
        let (agent, _) =
            AgentBuilder::new(name, &node, Peers::new(&scope, &upstream, &moto.endpoint()))
                .args(&flags)
                .start()
                .await;
        Some(Self {
            agent,
            pods: simulated,
            scope,
            team,
            moto,
            _upstream: upstream,
            node,
        })
    }
}

/// `whoami.py` (boto3's default chain, then GetCallerIdentity) in `pod`, with `env`
/// added: the caller ARN and the AccessKeyId boto3 received, or the error.
fn boto3_with(pod: &interceptor_tests::Pod, sts: &str, env: &[(&str, &str)]) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers/py/whoami.py");
    in_pod_with(
        pod,
        &venv().join("bin/python").display().to_string(),
        &[&script.display().to_string(), sts, "--credentials"],
        env,
    )
}

/// botocore's IPv6 endpoint mode: it asks [fd00:ec2::254] only.
const IPV6_MODE: [(&str, &str); 1] = [("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "IPv6")];

/// `--host-ipv6`: an SDK set to the IPv6 metadata endpoint gets its pod's role through
/// the connect6 redirect. The answer really came over IPv6: once the pod cannot route to
/// the node's IPv6 address (where connect6 sends it), the same SDK gets nothing, while
/// IPv4 is untouched. And no connection reached the node's own service (the node's
/// drop check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sdk_gets_its_role_over_ipv6() {
    let test = "an_sdk_gets_its_role_over_ipv6";
    if !require_root(test) {
        return;
    }
    let node = Node::new();
    let host6 = node.address6.to_string();
    let Some(cluster) = Cluster::start(
        test,
        "ipv6",
        node,
        &[("app-a", Some("role-a"))],
        &["--host-ipv6", &host6],
    )
    .await
    else {
        return;
    };
    let pod = &cluster.pods[0];
    let sts = cluster.moto.endpoint();
    let (over_v6, v4, cut_off) = tokio::task::block_in_place(|| {
        let over_v6 = boto3_with(pod, &sts, &IPV6_MODE);
        let v4 = boto3_with(pod, &sts, &[]);
        pod.netns.exec(&[
            "ip",
            "-6",
            "route",
            "add",
            "prohibit",
            &format!("{host6}/128"),
        ]);
        let cut_off = boto3_with(pod, &sts, &IPV6_MODE);
        (over_v6, v4, cut_off)
    });
    let role_a = format!(
        "arn:aws:sts::123456789012:assumed-role/role-a/{}.app-a",
        cluster.team
    );
    let log = || cluster.agent.log_text();
    assert!(
        over_v6.starts_with(&format!("{role_a} ASIA")),
        "{over_v6}\n{}",
        log()
    );
    assert!(v4.starts_with(&format!("{role_a} ASIA")), "{v4}");
    assert!(
        cut_off.starts_with("ERROR") && cut_off.contains("NoCredentials"),
        "with the node's IPv6 address unreachable the SDK still got credentials: {cut_off}"
    );
    // The same credentials over both families: one cache, one role.
    let key = |answer: &str| answer.split(' ').nth(1).map(str::to_owned);
    assert_eq!(key(&over_v6), key(&v4));
    assert!(
        !over_v6.contains(NODE_ACCESS_KEY) && !cut_off.contains(NODE_ACCESS_KEY),
        "{over_v6} {cut_off}"
    );
}

/// After a pod's role annotation changes, the credentials an SDK gets are the new
/// role's, as STS itself reports them (GetCallerIdentity with those credentials).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_annotation_change_sts_reports_the_new_role() {
    let test = "after_an_annotation_change_sts_reports_the_new_role";
    if !require_root(test) {
        return;
    }
    let Some(cluster) = Cluster::start(
        test,
        "reannotate",
        Node::new(),
        &[("app-a", Some("role-a"))],
        &[],
    )
    .await
    else {
        return;
    };
    let (pod, team) = (&cluster.pods[0], &cluster.team);
    let sts = cluster.moto.endpoint();
    let before = tokio::task::block_in_place(|| boto3_with(pod, &sts, &[]));
    assert!(
        before.starts_with(&format!(
            "arn:aws:sts::123456789012:assumed-role/role-a/{team}.app-a ASIA"
        )),
        "{before}"
    );
    cluster
        .scope
        .annotate_pod(team, "app-a", ROLE, "role-b")
        .await;
    // The agent has seen the change once the pod's role listing names the new role.
    let listed = ask_until(pod, CREDS, Duration::from_secs(10), |(status, role)| {
        *status == 200 && role == "role-b"
    })
    .await;
    assert_eq!(listed, (200, "role-b".to_owned()));
    let after = tokio::task::block_in_place(|| boto3_with(pod, &sts, &[]));
    assert!(
        after.starts_with(&format!(
            "arn:aws:sts::123456789012:assumed-role/role-b/{team}.app-a ASIA"
        )),
        "{after}\n{}",
        cluster.agent.log_text()
    );
    let key = |answer: &str| answer.split(' ').nth(1).map(str::to_owned);
    assert_ne!(key(&before), key(&after), "new credentials, not role-a's");
}

/// The `/metrics` list of docs/imds.md, section "Operating it": each family
/// (`interceptor_x{label,...}`, `{label=a|b}` naming every value, or a `*` prefix) with
/// the words in backticks that follow it before the next family (values of its label).
/// Spans with a space are expressions (`interceptor_tracked / interceptor_capacity`).
fn documented_metrics() -> Vec<(String, Vec<String>)> {
    let doc =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/imds.md"))
            .expect("docs/imds.md");
    let start = doc
        .find("- `/metrics`:")
        .expect("the /metrics list in docs/imds.md");
    let end = start + doc[start..].find("\n- `/debug").expect("the list's end");
    let list = &doc[start + "- `/metrics`:".len()..end];
    let mut families: Vec<(String, Vec<String>)> = Vec::new();
    for (index, span) in list.split('`').enumerate() {
        if index % 2 == 0 {
            continue;
        }
        // A family, not an expression over families (`a / b`).
        if span.starts_with("interceptor_") && !span.contains(' ') {
            families.push((span.to_owned(), Vec::new()));
        } else if let Some((_, words)) = families.last_mut() {
            words.push(span.to_owned());
        }
    }
    families
}

/// Families exposed (from `# TYPE` lines), each with its type.
fn exposed_families(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .map(|(name, kind)| (name.to_owned(), kind.to_owned()))
        .collect()
}

/// Label name -> values over the series of `family` (a histogram's from its `_count`).
fn exposed_labels(text: &str, family: &str, kind: &str) -> BTreeMap<String, Vec<String>> {
    let series = if kind == "histogram" {
        format!("{family}_count")
    } else {
        family.to_owned()
    };
    let mut labels: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let Some(rest) = line.strip_prefix(&series) else {
            continue;
        };
        let Some(inner) = rest.strip_prefix('{').and_then(|r| r.split_once('}')) else {
            continue;
        };
        for pair in inner.0.split(',').filter(|pair| !pair.is_empty()) {
            let (name, value) = pair.split_once('=').expect("label=value");
            labels
                .entry(name.to_owned())
                .or_default()
                .push(value.trim_matches('"').to_owned());
        }
    }
    labels
}

/// Every metric family docs/imds.md lists is on a running agent's `/metrics` with the
/// labels the document gives it (and every value it enumerates), and every family the
/// agent exposes is in the list: a renamed, lost or undocumented metric fails here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_metric_is_exposed_with_its_labels() {
    let test = "every_documented_metric_is_exposed_with_its_labels";
    if !require_root(test) {
        return;
    }
    let Some(cluster) = Cluster::start(
        test,
        "metrics",
        Node::new(),
        &[("app-a", Some("role-a")), ("crowd", None)],
        &["--max-connections-per-cgroup", "2"],
    )
    .await
    else {
        return;
    };
    let (pod, crowd) = (&cluster.pods[0], &cluster.pods[1]);
    let stranger = cluster.node.pod();
    // Traffic that gives each labelled family a series: a served request (requests,
    // authorizations, credentials), a pod the API server does not know (a caller
    // refusal), and more connections at once than one cgroup may hold (a connection
    // refusal).
    let sts = cluster.moto.endpoint();
    tokio::task::block_in_place(|| {
        let served = boto3_with(pod, &sts, &[]);
        assert!(served.contains("assumed-role/role-a/"), "{served}");
        let (status, _) = raw(
            &stranger,
            "GET",
            "/latest/meta-data/iam/security-credentials/",
            &[],
        );
        assert_ne!(status, 200);
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers/py/hostile.py");
        in_pod(
            crowd,
            &venv().join("bin/python").display().to_string(),
            &[&script.display().to_string(), "flood", "6", "1"],
        );
    });
    let (status, text) = cluster.agent.admin_get("/metrics").expect("/metrics");
    assert_eq!(status, 200);
    let exposed = exposed_families(&text);
    let documented = documented_metrics();
    assert!(documented.len() >= 15, "{documented:?}");

    let mut problems = Vec::new();
    for (entry, words) in &documented {
        if let Some(prefix) = entry.strip_suffix('*') {
            if !exposed.keys().any(|name| name.starts_with(prefix)) {
                problems.push(format!("no family {entry}"));
            }
            continue;
        }
        let (family, labels) = match entry.split_once('{') {
            Some((family, labels)) => (family, labels.trim_end_matches('}')),
            None => (entry.as_str(), ""),
        };
        let Some(kind) = exposed.get(family) else {
            problems.push(format!("documented {entry} is not exposed"));
            continue;
        };
        let live = exposed_labels(&text, family, kind);
        let mut want: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for label in labels.split(',').filter(|label| !label.is_empty()) {
            let (name, values) = label.split_once('=').unwrap_or((label, ""));
            let values = values.split('|').filter(|value| !value.is_empty());
            want.insert(name.to_owned(), values.map(str::to_owned).collect());
        }
        // The words after the credentials events are every event the cache counts, all
        // exported from the start (copied from its counters at each scrape); the words
        // after other families are examples of their values, not the full set.
        if family == "interceptor_credentials_events_total" {
            want.insert("event".into(), words.clone());
        }
        let live_names: Vec<&String> = live.keys().collect();
        let want_names: Vec<&String> = want.keys().collect();
        if live_names != want_names {
            problems.push(format!(
                "{family}: labels {live_names:?} exposed, {want_names:?} documented"
            ));
        }
        for (name, values) in &want {
            for value in values {
                if !live.get(name).is_some_and(|seen| seen.contains(value)) {
                    problems.push(format!("{family}: no series with {name}=\"{value}\""));
                }
            }
        }
    }
    for family in exposed
        .keys()
        .filter(|name| name.starts_with("interceptor_"))
    {
        let listed = documented.iter().any(|(entry, _)| {
            let documented = entry.split('{').next().unwrap_or(entry);
            match documented.strip_suffix('*') {
                Some(prefix) => family.starts_with(prefix),
                None => documented == family,
            }
        });
        if !listed {
            problems.push(format!("exposed {family} is not in docs/imds.md"));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}\n{text}");
}

// The passthrough never forwards what bears credentials, whatever the allow-list says.
// The agent runs with the broadest allow-list there is (`--allow-route-regexp .*`), and
// the node's metadata service (the agent's upstream, a fake) serves the node's identity
// credentials and its signed instance identity. A pod asks for every credential-bearing
// path in the spellings an upstream might accept: each is refused with 404 and none
// reaches the upstream, while two harmless paths are forwarded (so the allow-list is
// live, and a credential-bearing path the agent failed to deny would be forwarded and
// seen here).

/// Paths that bear the node's credentials or prove its identity on real EC2, in the
/// spellings an upstream might accept (dated and odd versions, letter case, a trailing
/// slash, deeper paths).
const CREDENTIAL_BEARING: [&str; 14] = [
    "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
    "/latest/meta-data/identity-credentials/ec2/info",
    "/latest/meta-data/identity-credentials/",
    "/2016-09-02/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
    "/1.0/meta-data/identity-credentials/ec2/info",
    "/latest/meta-data/IDENTITY-CREDENTIALS/ec2/info",
    "/latest/dynamic/instance-identity/pkcs7",
    "/latest/dynamic/instance-identity/signature",
    "/latest/dynamic/instance-identity/rsa2048",
    "/2016-09-02/dynamic/instance-identity/PKCS7",
    "/latest/meta-data/iam/security-credentials/node-instance-role/extra",
    "/1.0/meta-data/iam/security-credentials/",
    "/latest/meta-data/iam/",
    "/latest/meta-data/placement/iam/info",
];

/// Harmless paths the allow-list forwards: `(path, what the node answers)`.
const FORWARDED: [(&str, &str); 2] = [
    (
        "/latest/meta-data/placement/availability-zone",
        "us-east-1a",
    ),
    ("/latest/dynamic/instance-identity/document", "\"region\""),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_allow_list_forwards_a_credential_bearing_path() {
    let test = "no_allow_list_forwards_a_credential_bearing_path";
    if !require_root(test) {
        return;
    }
    let Some(plane) = ControlPlane::shared(test) else {
        return;
    };
    let scope = plane.scope("passthrough");
    scope.add_node(&[]).await;
    let team = scope.namespace_name("team");
    scope.namespace(&team, &[]).await;
    let node = Node::new();
    let pod = scope
        .running_pod(&node, &team, "app", &[("iam.amazonaws.com/role", "role-a")])
        .await;
    let moto = MotoServer::shared();
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let (agent, _) = AgentBuilder::new(
        "passthrough",
        &node,
        Peers::new(&scope, &upstream, &moto.endpoint()),
    )
    .args(&[
        "--base-role-arn",
        "arn:aws:iam::123456789012:role/",
        "--allow-route-regexp",
        ".*",
    ])
    .start()
    .await;

    let (refused, forwarded) = tokio::task::block_in_place(|| {
        let mut client = PodClient::start(&pod);
        let refused: Vec<(&str, (u16, String))> = CREDENTIAL_BEARING
            .iter()
            .map(|path| (*path, client.raw("GET", path, &[])))
            .collect();
        let forwarded: Vec<(&str, &str, (u16, String))> = FORWARDED
            .iter()
            .map(|(path, body)| (*path, *body, client.raw("GET", path, &[])))
            .collect();
        (refused, forwarded)
    });

    for (path, (status, body)) in &refused {
        assert!(
            !body.contains(NODE_ACCESS_KEY) && !body.contains(NODE_SIGNATURE),
            "LEAK: GET {path} answered with the node's credentials or identity: {body}"
        );
        assert_eq!(*status, 404, "GET {path}: {body}\n{}", agent.log_text());
    }
    for (path, expected, (status, body)) in &forwarded {
        assert_eq!(
            (*status, body.contains(expected)),
            (200, true),
            "GET {path} (allowed) was not forwarded: {status} {body}\n{}",
            agent.log_text()
        );
    }
    let reached = upstream.requests();
    let unexpected: Vec<&String> = reached
        .iter()
        .filter(|request| {
            *request != "PUT /latest/api/token"
                && !FORWARDED
                    .iter()
                    .any(|(path, _)| **request == format!("GET {path}"))
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "the node's metadata service was asked for more than the harmless paths: {unexpected:?}"
    );
}
