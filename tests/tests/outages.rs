//! The agent's peers failing, end to end with the real agent and pods: the API server
//! unreachable or expiring its watch history, STS down, throttling or slow, and the
//! decisions following changes to a pod's annotation and its namespace's restrictions.
//! Pods are served their own role or refused; never a default they should not have,
//! never the node's credentials.
//!
//! The API server is a real kube-apiserver. The outage test has a control plane of its
//! own and stops and starts its kube-apiserver process; the others share the test
//! binary's plane. A pod created while the server is down cannot exist (creating it
//! takes the server), so the pod the agent cannot see is created while a [`Forwarder`]
//! cuts the agent off, just before the server goes down: from the agent's side, an event
//! lost in the outage. Expiry is etcd compacted and kube-apiserver restarted (its watch
//! cache then starts past what the agent has seen), counted in the server's audit log.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use interceptor_tests::{
    Node,
    agent::Agent,
    ask::{CREDS, access_key, ask_until, assert_upstream_untouched, get},
    clients::CredsLoop,
    cluster::{AgentBuilder, Peers, Through},
    control_plane::ControlPlane,
    fake_imds::FakeImds,
    forwarder::Forwarder,
    moto::MotoServer,
    objects::wait_for,
    require_root,
    sts_proxy::{Fault, StsProxy},
};

/// A bound for a broken run, never the thing tested.
const WAIT: Duration = Duration::from_secs(60);

const ROLE: &str = "iam.amazonaws.com/role";
const ALLOWED: &str = "iam.amazonaws.com/allowed-roles";

fn counter(agent: &Agent, event: &str) -> u64 {
    agent.metric(&format!(
        "interceptor_credentials_events_total{{event=\"{event}\"}}"
    )) as u64
}

/// The API server goes away: the pod the agent knows keeps being served; a pod whose
/// creation the agent missed is refused (the agent has a default role and must not hand
/// it out to a pod it cannot see) and is served its own role once the watch is back.
/// Then the watch history expires (etcd compacted, kube-apiserver restarted) three times
/// while a pod asks in a loop: no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_outage_and_expiry() {
    let test = "api_server_outage_and_expiry";
    if !require_root(test) {
        return;
    }
    let Some(plane) = ControlPlane::private(test) else {
        return;
    };
    let scope = plane.scope("outage");
    let team = scope.namespace_name("team");
    scope.namespace(&team, &[]).await;
    let node = Node::new();
    let pod_a = scope
        .simulated_pod(&node, &team, "app-a", &[(ROLE, "role-a")])
        .await;
    let forwarder = Forwarder::start(plane.addr()).await;
    let moto = MotoServer::shared_on(node.address);
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let (agent, _) = AgentBuilder::new(
        "outage-api",
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
        "arn:aws:iam::123456789012:role/",
        "--default-role",
        "default-role",
    ])
    .start()
    .await;
    assert_eq!(get(&pod_a, CREDS), (200, "role-a".to_owned()));

    forwarder.cut();
    let pod_b = scope
        .simulated_pod(&node, &team, "app-b", &[(ROLE, "role-b")])
        .await;
    plane.stop_apiserver();
    forwarder.restore();
    let (status, body) = get(&pod_a, &format!("{CREDS}role-a"));
    assert_eq!(
        status, 200,
        "a known pod is served while the API server is down: {body}"
    );
    access_key(&body);
    for path in [CREDS.to_owned(), format!("{CREDS}default-role")] {
        let (status, body) = get(&pod_b, &path);
        assert!(
            status != 200 && !body.contains("default-role"),
            "a pod the agent cannot see must be refused, not given the default: {path} -> {status} {body}"
        );
    }

    plane.start_apiserver().unwrap();
    let answer = ask_until(&pod_b, CREDS, Duration::from_secs(30), |answer| {
        answer.0 == 200
    })
    .await;
    assert_eq!(
        answer,
        (200, "role-b".to_owned()),
        "served once the watch is back\n{}",
        agent.log_text()
    );

    // Expiry: etcd compacted past what the agent has seen and kube-apiserver restarted,
    // three times, while pod a asks in a loop. Each round starts after the pod was served
    // twice more and ends once the agent's watch resumed from before the compaction and
    // relisted (waiting on what was seen, not on a clock); the loop ends once it was
    // served twice after the last relist.
    let other = scope.namespace_name("elsewhere");
    scope.namespace(&other, &[]).await;
    let lines = tokio::task::block_in_place(|| {
        let looping = CredsLoop::start(&pod_a);
        let mut mark = 0;
        for round in 0..3 {
            mark = looping.wait_for(mark, 2, &format!("served (round {round})"), WAIT, |line| {
                line.starts_with("ok ")
            });
            let lists = plane.agent_pod_lists(&scope.node);
            // Writes the node's watch does not see move etcd past its resourceVersion.
            for index in 0..2 {
                let name = format!("bump-{round}-{index}");
                plane
                    .kubectl(&["create", "configmap", &name, "-n", &other])
                    .unwrap();
            }
            let compacted = plane.compact().unwrap();
            plane.stop_apiserver();
            plane.start_apiserver().unwrap();
            let deadline = Instant::now() + WAIT;
            while let Err(missing) = plane.agent_relisted(&scope.node, lists, compacted) {
                assert!(
                    Instant::now() < deadline,
                    "round {round}: the watch never resumed from before the compaction and \
                     relisted (the scenario did not happen): {missing}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let seen = looping.lines().len();
        looping.wait_for(seen, 2, "served after the relists", WAIT, |line| {
            line.starts_with("ok ")
        });
        looping.stop()
    });
    let out = lines.join("\n");
    assert!(lines.len() >= 8, "the loop ran: {out}");
    for line in &lines {
        assert!(
            line.starts_with("ok ") && line.ends_with(" role-a"),
            "every request during the relists is served: {line}\n{out}"
        );
    }
    assert_upstream_untouched(&upstream);
}

/// STS fails: unavailable, then throttling, then slow (above the SDKs' 1 s timeout). A
/// pod with cached credentials keeps getting them; STS is not stormed; a pod with nothing
/// cached gets a clear error and is served once STS is back; with STS slow, a new pod's
/// first request is already a cache hit because prefetch fetched its credentials when it
/// appeared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sts_outage_throttling_and_latency() {
    if !require_root("sts_outage_throttling_and_latency") {
        return;
    }
    let Some(plane) = ControlPlane::shared("sts_outage_throttling_and_latency") else {
        return;
    };
    let scope = plane.scope("outage-sts");
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
        "outage-sts",
        &node,
        Peers::new(&scope, &upstream, &sts.endpoint()),
    )
    .args(&[
        "--base-role-arn",
        "arn:aws:iam::123456789012:role/",
        "--debug",
    ])
    .start()
    .await;
    let role_a = format!("{CREDS}role-a");
    let (status, body) = get(&pod_a, &role_a);
    assert_eq!(status, 200, "{body}");
    let key_a = access_key(&body);

    let mut waiting = Vec::new();
    for fault in [Fault::Unavailable, Fault::Throttle] {
        sts.set_fault(fault.clone());
        let calls_before = sts.count("AssumeRole");
        for _ in 0..10 {
            let (status, body) = get(&pod_a, &role_a);
            assert_eq!(
                status, 200,
                "cached credentials keep flowing ({fault:?}): {body}"
            );
            assert_eq!(access_key(&body), key_a);
        }
        // A pod with nothing cached: a clear refusal, and STS is not asked once per
        // request (failures are held and retried with backoff).
        // Object names are lowercase (the server validates them).
        let name = format!("app-{fault:?}").to_lowercase();
        let pod_c = scope
            .simulated_pod(&node, &team, &name, &[(ROLE, &name)])
            .await;
        let mut answers = Vec::new();
        for _ in 0..10 {
            answers.push(get(&pod_c, &format!("{CREDS}{name}")));
        }
        waiting.push((name, pod_c));
        assert!(
            answers.iter().all(|(status, _)| *status == 503),
            "no credentials while STS fails ({fault:?}): {answers:?}"
        );
        let calls = sts.count("AssumeRole") - calls_before;
        eprintln!("{fault:?}: {calls} AssumeRole calls");
        assert!(
            calls <= 5,
            "{calls} AssumeRole calls for 10 refused requests ({fault:?}): a storm"
        );
    }

    sts.set_fault(Fault::None);
    for (name, pod_c) in &waiting {
        let answer = ask_until(
            pod_c,
            &format!("{CREDS}{name}"),
            Duration::from_secs(30),
            |answer| answer.0 == 200,
        )
        .await;
        assert_eq!(answer.0, 200, "served once STS is back: {answer:?}");
    }

    // Slow STS: prefetch fetches when the pod appears; its first request is a hit.
    sts.set_delay(Duration::from_millis(1500));
    let pod_d = scope
        .simulated_pod(&node, &team, "app-d", &[(ROLE, "role-d")])
        .await;
    wait_for("prefetch stored role-d", Duration::from_secs(20), || {
        if agent.holds_credentials("arn:aws:iam::123456789012:role/role-d") {
            Ok(())
        } else {
            Err(agent.admin_get("/debug/store").unwrap_or_default().1)
        }
    })
    .await;
    let (hits, misses) = (counter(&agent, "hits"), counter(&agent, "misses"));
    let (status, body) = get(&pod_d, &format!("{CREDS}role-d"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (
            counter(&agent, "hits") - hits,
            counter(&agent, "misses") - misses
        ),
        (1, 0),
        "the new pod's first request was served from memory"
    );
    assert_upstream_untouched(&upstream);
}

/// A pod's role annotation changes, then its namespace narrows the roles it allows: each
/// time the next answers follow within the watch latency, and the agent logs the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_follow_annotation_and_restriction_changes() {
    if !require_root("decisions_follow_annotation_and_restriction_changes") {
        return;
    }
    let Some(plane) = ControlPlane::shared("decisions_follow_annotation_and_restriction_changes")
    else {
        return;
    };
    let scope = plane.scope("outage-policy");
    let team = scope.namespace_name("team");
    scope
        .namespace(&team, &[(ALLOWED, r#"["role-a", "role-x"]"#)])
        .await;
    let node = Node::new();
    let pod = scope
        .simulated_pod(&node, &team, "app", &[(ROLE, "role-a")])
        .await;
    let moto = MotoServer::shared_on(node.address);
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let (agent, _) = AgentBuilder::new(
        "outage-policy",
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
    assert_eq!(get(&pod, CREDS), (200, "role-a".to_owned()));

    scope.annotate_pod(&team, "app", ROLE, "role-x").await;
    let answer = ask_until(&pod, CREDS, Duration::from_secs(10), |answer| {
        answer.1 == "role-x"
    })
    .await;
    assert_eq!(answer, (200, "role-x".to_owned()), "{}", agent.log_text());
    let (status, body) = get(&pod, &format!("{CREDS}role-a"));
    assert_eq!(status, 404, "the old role is no longer served: {body}");

    scope
        .annotate_namespace(&team, ALLOWED, r#"["role-a"]"#)
        .await;
    let answer = ask_until(&pod, CREDS, Duration::from_secs(10), |answer| {
        answer.0 != 200
    })
    .await;
    assert_eq!(
        answer.0, 404,
        "refused once the namespace forbids the role: {answer:?}"
    );
    let (status, _) = get(&pod, &format!("{CREDS}role-x"));
    assert_eq!(status, 404);

    let log = agent.log_text();
    for needle in [
        "decision changed",
        "role arn:aws:iam::123456789012:role/role-x",
        "role refused",
    ] {
        assert!(log.contains(needle), "the log says {needle:?}:\n{log}");
    }
    let event = scope.wait_event(&team, "app", "RoleNotAllowed").await;
    assert_eq!(event["type"], "Warning", "{event}");
    assert_upstream_untouched(&upstream);
}
