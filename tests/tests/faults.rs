//! Faults of the agent's peers that `outages.rs` does not reach, end to end with the real
//! agent and pods: the agent starting while the API server is down, everything that
//! changed while it was down (annotation, deletion, new pod, namespace narrowed) caught up
//! through a 410 relist, and STS refusing, failing under a pod's request loop and
//! answering slower than the SDKs wait. Every answer a pod gets is checked to carry
//! neither the node's credentials nor its role.
//!
//! The API server is a real kube-apiserver. The two tests about its absence have a
//! control plane of their own: the first stops and starts its process. In the second the
//! cluster must change while the agent cannot see it, which a stopped server cannot do:
//! a [`Forwarder`] cuts the agent off (a partition between the node and the control
//! plane) while the changes are made, etcd is compacted and kube-apiserver restarts (its
//! watch cache then starts past what the agent has seen); the relist is checked in the
//! server's audit log. The STS tests share the test binary's plane.

use std::{
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use interceptor_tests::{
    Node,
    agent::{Agent, free_port, series_value},
    ask::{CREDS, access_key, ask_until, assert_upstream_untouched, get},
    clients::{boto3, in_pod},
    cluster::{AGENT_ENV, AgentBuilder, Peers, Through},
    control_plane::ControlPlane,
    fake_imds::{FakeImds, NODE_ROLE},
    forwarder::Forwarder,
    moto::MotoServer,
    objects::wait_for,
    peers::venv,
    pins::Pins,
    require_root,
    sts_proxy::{Fault, StsProxy},
};

const BASE_ARN: &str = "arn:aws:iam::123456789012:role/";
const ROLE: &str = "iam.amazonaws.com/role";
const ALLOWED: &str = "iam.amazonaws.com/allowed-roles";

/// AssumeRole calls the proxy saw for `role`.
fn calls_for(sts: &StsProxy, role: &str) -> usize {
    let arn = format!("{BASE_ARN}{role}");
    sts.assumed_roles()
        .iter()
        .filter(|assumed| **assumed == arn)
        .count()
}

/// The agent crashes and comes back while the API server is down: it knows no pod, so
/// every pod (the one with a role and the one that would get the configured default
/// alike) gets nothing: the new agent says it is not ready and does not take over the
/// kernel's proxy map until it has synced. Once the API server is back it serves both
/// their decisions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_started_while_the_api_server_is_down_serves_no_one_it_cannot_see() {
    if !require_root("an_agent_started_while_the_api_server_is_down_serves_no_one_it_cannot_see") {
        return;
    }
    let Some(plane) = ControlPlane::private(
        "an_agent_started_while_the_api_server_is_down_serves_no_one_it_cannot_see",
    ) else {
        return;
    };
    let scope = plane.scope("faults-restart");
    let team = scope.namespace_name("team");
    scope.namespace(&team, &[]).await;
    let node = Node::new();
    let pod_a = scope
        .simulated_pod(&node, &team, "app-a", &[(ROLE, "role-a")])
        .await;
    let pod_u = scope.simulated_pod(&node, &team, "app-u", &[]).await;
    let moto = MotoServer::shared_on(node.address);
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let name = "faults-restart";
    let setup = AgentBuilder::new(name, &node, Peers::new(&scope, &upstream, &moto.endpoint()))
        .args(&[
            "--base-role-arn",
            BASE_ARN,
            "--default-role",
            "default-role",
        ])
        .setup();
    // The same directory the agents pin in: detached on drop, panics included.
    let pins = Pins::new(name);
    assert_eq!(pins.0, setup.pin_dir);
    let start = || Agent::run(&setup.args, &setup.pin_dir, free_port(), &AGENT_ENV);

    let mut first = start();
    first.wait_ready(Duration::from_secs(30));
    assert_eq!(get(&pod_a, CREDS), (200, "role-a".to_owned()));
    assert_eq!(get(&pod_u, CREDS), (200, "default-role".to_owned()));

    plane.stop_apiserver();
    first.kill();
    first.leave_programs();
    let mut agent = start();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(agent.admin_get("/healthz"), Some((200, _))) {
        assert!(
            Instant::now() < deadline,
            "the agent never came up:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _) = agent.admin_get("/readyz").expect("readyz");
    assert_eq!(status, 503, "not ready without the API server");
    let refused_metric = "interceptor_caller_refusals_total{reason=\"unknown_pod\"}";
    let probes = [
        (&pod_a, CREDS.to_owned()),
        (&pod_a, format!("{CREDS}role-a")),
        (&pod_u, CREDS.to_owned()),
        (&pod_u, format!("{CREDS}default-role")),
    ];
    for (pod, path) in &probes {
        let (status, body) = get(pod, path);
        assert!(
            status != 200 && !body.contains("role-a") && !body.contains("default-role"),
            "a pod the agent cannot see yet is refused, not given a role: {path} -> {status} {body}\n{}",
            agent.log_text()
        );
    }
    // An agent whose pod store has not synced does not take over the kernel's proxy map
    // (the surge rule, tests/tests/takeover.rs): the pods' connections reach no agent
    // (the crashed one's socket is gone), which fails closed as surely as a refusal, and
    // this agent saw none of them.
    let log = agent.log_text();
    assert!(
        !log.contains("the kernel steers connections"),
        "took over without a synced pod store:\n{log}"
    );
    let (_, metrics) = agent.admin_get("/metrics").expect("the agent's /metrics");
    assert_eq!(
        series_value(&metrics, refused_metric),
        None,
        "no request reached the agent that has not taken over"
    );

    plane.start_apiserver().unwrap();
    agent.wait_ready(Duration::from_secs(30));
    for (pod, role) in [(&pod_a, "role-a"), (&pod_u, "default-role")] {
        let answer = ask_until(pod, CREDS, Duration::from_secs(10), |answer| {
            answer.0 == 200
        })
        .await;
        assert_eq!(answer, (200, role.to_owned()), "{}", agent.log_text());
        let (status, body) = get(pod, &format!("{CREDS}{role}"));
        assert_eq!(status, 200, "{body}");
        access_key(&body);
    }
    assert_upstream_untouched(&upstream);
}

/// While the agent cannot reach the API server, pod a's role annotation changes, pod c is
/// deleted, pod b is created and pod d's namespace narrows its allowed roles, etcd is
/// compacted and kube-apiserver restarts. The agent keeps serving what it knew; once it
/// reaches the server again its watch resumes from a compacted resourceVersion, gets
/// 410, it relists, and every one of those changes takes effect: none is lost in the
/// gap, the deleted pod's credentials are forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_changed_while_the_api_server_was_down_is_caught_up_through_expiry() {
    let test = "what_changed_while_the_api_server_was_down_is_caught_up_through_expiry";
    if !require_root(test) {
        return;
    }
    let Some(plane) = ControlPlane::private(test) else {
        return;
    };
    let scope = plane.scope("faults-catch-up");
    // With --namespace-restrictions a namespace allows only the roles it lists.
    let (team, locked) = (scope.namespace_name("team"), scope.namespace_name("locked"));
    scope.namespace(&team, &[(ALLOWED, r#"["role-*"]"#)]).await;
    scope
        .namespace(&locked, &[(ALLOWED, r#"["role-d"]"#)])
        .await;
    let node = Node::new();
    let pod_a = scope
        .simulated_pod(&node, &team, "app-a", &[(ROLE, "role-a")])
        .await;
    let pod_c = scope
        .simulated_pod(&node, &team, "app-c", &[(ROLE, "role-c")])
        .await;
    let pod_d = scope
        .simulated_pod(&node, &locked, "app-d", &[(ROLE, "role-d")])
        .await;
    let forwarder = Forwarder::start(plane.addr()).await;
    let moto = MotoServer::shared_on(node.address);
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let (agent, _) = AgentBuilder::new(
        "faults-catch-up",
        &node,
        Peers::new(
            &Through {
                scope: &scope,
                via: forwarder.addr(),
            },
            &upstream,
            &moto.endpoint(),
        ),
    )
    .args(&[
        "--base-role-arn",
        BASE_ARN,
        "--namespace-restrictions",
        "--debug",
    ])
    .start()
    .await;
    for (pod, role) in [(&pod_a, "role-a"), (&pod_c, "role-c"), (&pod_d, "role-d")] {
        let (status, body) = get(pod, &format!("{CREDS}{role}"));
        assert_eq!(status, 200, "{role}: {body}");
        access_key(&body);
    }
    assert!(agent.holds_credentials(&format!("{BASE_ARN}role-c")));

    let lists = plane.agent_pod_lists(&scope.node);
    forwarder.cut();
    scope.annotate_pod(&team, "app-a", ROLE, "role-x").await;
    scope.delete_pod(&team, "app-c").await;
    let pod_b = scope
        .simulated_pod(&node, &team, "app-b", &[(ROLE, "role-b")])
        .await;
    scope
        .annotate_namespace(&locked, ALLOWED, r#"["role-z"]"#)
        .await;
    let compacted = plane.compact().unwrap();
    plane.stop_apiserver();
    plane.start_apiserver().unwrap();
    // Nothing of that is visible yet: the known pod keeps its last decision.
    assert_eq!(get(&pod_a, CREDS), (200, "role-a".to_owned()));

    forwarder.restore();
    wait_for(
        "a watch resumed from before the compaction, then a relist",
        Duration::from_secs(30),
        || plane.agent_relisted(&scope.node, lists, compacted),
    )
    .await;

    let within = Duration::from_secs(20);
    let answer = ask_until(&pod_a, CREDS, within, |answer| answer.1 == "role-x").await;
    assert_eq!(
        answer,
        (200, "role-x".to_owned()),
        "the annotation changed during the outage\n{}",
        agent.log_text()
    );
    let (status, body) = get(&pod_a, &format!("{CREDS}role-a"));
    assert_eq!(status, 404, "the old role is no longer served: {body}");
    let answer = ask_until(&pod_b, CREDS, within, |answer| answer.0 == 200).await;
    assert_eq!(
        answer,
        (200, "role-b".to_owned()),
        "the pod created during the outage"
    );
    let answer = ask_until(&pod_c, CREDS, within, |answer| answer.0 != 200).await;
    assert!(
        matches!(answer.0, 403 | 404),
        "the pod deleted during the outage is refused: {answer:?}"
    );
    let (status, body) = get(&pod_c, &format!("{CREDS}role-c"));
    assert!(matches!(status, 403 | 404), "{status} {body}");
    let answer = ask_until(&pod_d, CREDS, within, |answer| answer.0 != 200).await;
    assert_eq!(
        answer.0, 404,
        "the namespace narrowed during the outage: {answer:?}"
    );
    let (status, body) = get(&pod_d, &format!("{CREDS}role-d"));
    assert_eq!(status, 404, "{body}");

    wait_for(
        "the deleted pod's credentials forgotten",
        Duration::from_secs(10),
        || {
            if agent.holds_credentials(&format!("{BASE_ARN}role-c")) {
                Err(agent.admin_get("/debug/store").unwrap_or_default().1)
            } else {
                Ok(())
            }
        },
    )
    .await;
    let log = agent.log_text();
    assert!(
        log.contains("decision changed") && log.contains(&format!("role {BASE_ARN}role-x")),
        "the change is logged:\n{log}"
    );
    scope.wait_event(&locked, "app-d", "RoleNotAllowed").await;
    assert_upstream_untouched(&upstream);
}

/// STS refuses a role, then is down while a pod asks in a tight loop, then answers slower
/// than the SDKs' 1 s metadata timeout. The refused pod gets EC2's
/// `AssumeRoleUnauthorizedAccess` and an Event, without the agent asking STS again per
/// request; the looping pod gets 503 every time while STS sees a small fraction of its
/// requests; a cached pod is served throughout; with STS slow, boto3 in a pod created
/// meanwhile gets its role because prefetch fetched it when the pod appeared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sts_refusing_failing_under_load_and_slow_with_a_real_sdk() {
    if !require_root("sts_refusing_failing_under_load_and_slow_with_a_real_sdk") {
        return;
    }
    let Some(plane) =
        ControlPlane::shared("sts_refusing_failing_under_load_and_slow_with_a_real_sdk")
    else {
        return;
    };
    let scope = plane.scope("faults-sts");
    let team = scope.namespace_name("team");
    scope.namespace(&team, &[]).await;
    let node = Node::new();
    let pod_a = scope
        .simulated_pod(&node, &team, "app-a", &[(ROLE, "role-a")])
        .await;
    let moto = MotoServer::shared_on(node.address);
    let sts = StsProxy::start(moto.addr()).await;
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let (agent, _) = AgentBuilder::new(
        "faults-sts",
        &node,
        Peers::new(&scope, &upstream, &sts.endpoint()),
    )
    .args(&["--base-role-arn", BASE_ARN, "--debug"])
    .start()
    .await;
    let role_a = format!("{CREDS}role-a");
    let (status, body) = get(&pod_a, &role_a);
    assert_eq!(status, 200, "{body}");
    let key_a = access_key(&body);
    let assert_a_served = |fault: &str| {
        let (status, body) = get(&pod_a, &role_a);
        assert_eq!(status, 200, "the cached pod is served ({fault}): {body}");
        assert_eq!(access_key(&body), key_a, "from the cache ({fault})");
    };

    // Refused: a clear answer, an Event, and no call per request.
    sts.set_fault(Fault::Deny);
    let pod_r = scope
        .simulated_pod(&node, &team, "app-r", &[(ROLE, "role-r")])
        .await;
    let answer = ask_until(&pod_r, CREDS, Duration::from_secs(10), |answer| {
        answer.0 == 200
    })
    .await;
    assert_eq!(answer, (200, "role-r".to_owned()), "the pod is known");
    for _ in 0..10 {
        let (status, body) = get(&pod_r, &format!("{CREDS}role-r"));
        let document: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|_| panic!("an EC2 credentials document: {status} {body}"));
        assert_eq!(
            document["Code"], "AssumeRoleUnauthorizedAccess",
            "{status} {body}"
        );
        assert!(
            document.get("AccessKeyId").is_none()
                && document["Message"]
                    .as_str()
                    .is_some_and(|message| message.contains("AccessDenied")),
            "says why, holds no key: {body}"
        );
    }
    let refused_calls = calls_for(&sts, "role-r");
    assert!(
        (1..=3).contains(&refused_calls),
        "{refused_calls} AssumeRole calls for a refused role and 10 requests"
    );
    let event = scope.wait_event(&team, "app-r", "AssumeRoleFailed").await;
    let note = event["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("AccessDenied") && note.contains("role-r"),
        "{note}"
    );
    assert_a_served("refused");

    // Down while a pod with nothing cached asks in a loop: 503 each time, few STS calls.
    sts.set_fault(Fault::Unavailable);
    let pod_u = scope
        .simulated_pod(&node, &team, "app-u", &[(ROLE, "role-u")])
        .await;
    let answer = ask_until(&pod_u, CREDS, Duration::from_secs(10), |answer| {
        answer.0 == 200
    })
    .await;
    assert_eq!(answer, (200, "role-u".to_owned()), "the pod is known");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers/py/creds_loop.py");
    let (python, script) = (
        venv().join("bin/python").display().to_string(),
        script.display().to_string(),
    );
    let calls_before = calls_for(&sts, "role-u");
    let out = tokio::task::block_in_place(|| in_pod(&pod_u, &python, &[&script, "8"]));
    let calls = calls_for(&sts, "role-u") - calls_before;
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.len() >= 20, "the loop ran: {out}");
    assert!(
        lines.iter().all(|line| *line == "status creds 503"),
        "every request while STS is down is a 503: {out}"
    );
    eprintln!(
        "STS down: {} requests, {calls} AssumeRole calls",
        lines.len()
    );
    assert!(
        calls * 4 <= lines.len(),
        "{calls} AssumeRole calls for {} requests: a storm",
        lines.len()
    );
    assert_a_served("unavailable");

    sts.set_fault(Fault::None);
    let answer = ask_until(
        &pod_u,
        &format!("{CREDS}role-u"),
        Duration::from_secs(30),
        |answer| answer.0 == 200,
    )
    .await;
    assert_eq!(answer.0, 200, "served once STS is back: {answer:?}");
    access_key(&answer.1);

    // Slower than the SDKs wait: prefetch takes the latency before the pod asks.
    sts.set_delay(Duration::from_secs(2));
    let pod_s = scope
        .simulated_pod(&node, &team, "app-s", &[(ROLE, "role-s")])
        .await;
    wait_for("prefetch stored role-s", Duration::from_secs(20), || {
        if agent.holds_credentials(&format!("{BASE_ARN}role-s")) {
            Ok(())
        } else {
            Err(agent.admin_get("/debug/store").unwrap_or_default().1)
        }
    })
    .await;
    // The clients check their identity with moto directly (not through the slow proxy).
    let endpoint = moto.endpoint();
    let (new_pod, cached_pod) =
        tokio::task::block_in_place(|| (boto3(&pod_s, &endpoint), boto3(&pod_a, &endpoint)));
    assert_eq!(
        new_pod,
        format!("arn:aws:sts::123456789012:assumed-role/role-s/{team}.app-s"),
        "boto3 (1 s metadata timeout) in the new pod\n{}",
        agent.log_text()
    );
    assert_eq!(
        cached_pod,
        format!("arn:aws:sts::123456789012:assumed-role/role-a/{team}.app-a")
    );
    assert!(
        !new_pod.contains(NODE_ROLE) && !cached_pod.contains(NODE_ROLE),
        "{new_pod} {cached_pod}"
    );
    assert_upstream_untouched(&upstream);
}

/// While STS is down, a pod keeps getting its cached credentials until shortly before
/// they expire (the agent's stale floor, 2 min), then a 503; never credentials closer to
/// their expiry, never the node's. STS hands out credentials that expire 10 s past that
/// floor, so the whole course runs in seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_credentials_flow_through_an_sts_outage_until_shortly_before_expiry() {
    if !require_root("cached_credentials_flow_through_an_sts_outage_until_shortly_before_expiry") {
        return;
    }
    /// `Settings::stale_floor`.
    const STALE_FLOOR: Duration = Duration::from_secs(120);
    const MARGIN: Duration = Duration::from_secs(10);
    let Some(plane) = ControlPlane::shared(
        "cached_credentials_flow_through_an_sts_outage_until_shortly_before_expiry",
    ) else {
        return;
    };
    let scope = plane.scope("faults-expiry");
    let team = scope.namespace_name("team");
    scope.namespace(&team, &[]).await;
    let node = Node::new();
    let pod = scope
        .simulated_pod(&node, &team, "app-e", &[(ROLE, "role-e")])
        .await;
    let moto = MotoServer::shared_on(node.address);
    let sts = StsProxy::start(moto.addr()).await;
    sts.set_expires_in(Some(STALE_FLOOR + MARGIN));
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let (agent, _) = AgentBuilder::new(
        "faults-expiry",
        &node,
        Peers::new(&scope, &upstream, &sts.endpoint()),
    )
    .args(&["--base-role-arn", BASE_ARN])
    .start()
    .await;
    let path = format!("{CREDS}role-e");
    let document = |body: &str| -> (String, String) {
        let value: serde_json::Value = serde_json::from_str(body).expect("credentials JSON");
        (
            value["AccessKeyId"]
                .as_str()
                .expect("AccessKeyId")
                .to_owned(),
            value["Expiration"].as_str().expect("Expiration").to_owned(),
        )
    };
    let answer = ask_until(&pod, &path, Duration::from_secs(10), |answer| {
        answer.0 == 200
    })
    .await;
    assert_eq!(answer.0, 200, "served while STS answers: {answer:?}");
    let (key, expiration) = document(&answer.1);

    sts.set_fault(Fault::Unavailable);
    // Timestamps are in one fixed format, so comparing them as strings compares times.
    let at = |time: std::time::SystemTime| interceptor::imds::ec2::timestamp(time);
    let started = Instant::now();
    let mut seen = Vec::new();
    while started.elapsed() < MARGIN * 3 {
        let sent = std::time::SystemTime::now();
        let (status, body) = get(&pod, &path);
        let received = std::time::SystemTime::now();
        let since = started.elapsed();
        match status {
            200 => {
                assert_eq!(
                    document(&body),
                    (key.clone(), expiration.clone()),
                    "only the cached credentials while STS is down ({since:?})"
                );
                assert!(
                    at(sent + STALE_FLOOR - Duration::from_secs(1)) <= expiration,
                    "served at {} with less than {STALE_FLOOR:?} left to {expiration}",
                    at(sent)
                );
            }
            503 => assert!(
                at(received + STALE_FLOOR + Duration::from_secs(2)) >= expiration,
                "refused at {} with more than {STALE_FLOOR:?} left to {expiration}: {body}",
                at(received)
            ),
            _ => panic!("{status} {body} while STS is down"),
        }
        seen.push((since, status));
        if seen
            .iter()
            .rev()
            .take(3)
            .filter(|(_, status)| *status == 503)
            .count()
            == 3
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let statuses: Vec<u16> = seen.iter().map(|(_, status)| *status).collect();
    let served = statuses.iter().take_while(|status| **status == 200).count();
    assert!(
        served >= 4 && statuses[served..].iter().all(|status| *status == 503),
        "cached credentials first, then 503 for good: {seen:?}"
    );
    assert!(
        statuses.len() > served,
        "the credentials were still served {:?} into the outage: {seen:?}",
        started.elapsed()
    );
    assert!(
        agent.metric(r#"interceptor_credentials_events_total{event="stale_served"}"#)
            >= served as f64,
        "every cached answer of the outage is counted"
    );
    eprintln!("STS down: {served} cached answers, then 503 ({seen:?})");

    // STS back: new credentials at once.
    sts.set_fault(Fault::None);
    sts.set_expires_in(None);
    let answer = ask_until(&pod, &path, Duration::from_secs(15), |answer| {
        answer.0 == 200
    })
    .await;
    assert_eq!(answer.0, 200, "served once STS is back: {answer:?}");
    assert_ne!(document(&answer.1).0, key, "new credentials from STS");
    assert_upstream_untouched(&upstream);
}
