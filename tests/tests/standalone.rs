//! Standalone mode on the simulated node: no Kubernetes, a bindings file maps cgroup paths
//! to roles; the same kernel data path, policy checks and credentials cache. The AWS CLI
//! and boto3 in each "service" get exactly their bound role; an unbound one gets nothing;
//! a changed file takes effect without a restart.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use interceptor_tests::{
    Node,
    agent::{Agent, free_port},
    clients::{aws_cli, boto3, raw},
    cluster::{AGENT_ENV, bindings_file, standalone_args},
    fake_imds::FakeImds,
    moto::MotoServer,
    require_root,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bound_services_get_their_roles_and_the_file_is_reloaded() {
    if !require_root("bound_services_get_their_roles_and_the_file_is_reloaded") {
        return;
    }
    let node = Node::new();
    let (billing, web, unbound) = (node.pod(), node.pod(), node.pod());
    let file = bindings_file(
        "bindings",
        &[
            ("billing", &billing, "billing"),
            ("web", &web, "arn:aws:iam::999999999999:role/web"),
        ],
    );
    let moto = MotoServer::shared_on(node.address);
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let args = standalone_args(&node, &file, &upstream, &moto.endpoint());
    let pin_dir = PathBuf::from(format!(
        "/sys/fs/bpf/interceptor-test-{}-standalone",
        std::process::id()
    ));
    let mut agent = Agent::run(&args, &pin_dir, free_port(), &AGENT_ENV);
    agent.wait_ready(Duration::from_secs(30));
    let sts = moto.endpoint();
    let results = {
        let sts = sts.clone();
        tokio::task::spawn_blocking(move || {
            let out = (
                boto3(&billing, &sts),
                aws_cli(&web, &sts),
                boto3(&unbound, &sts),
            );
            (out, billing, web, unbound)
        })
        .await
        .unwrap()
    };
    let ((billing_arn, web_arn, unbound_out), billing, web, _unbound) = results;
    let log = agent.log_text();
    assert_eq!(
        billing_arn, "arn:aws:sts::123456789012:assumed-role/billing/billing",
        "{log}"
    );
    assert_eq!(
        web_arn, "arn:aws:sts::999999999999:assumed-role/web/web",
        "{log}"
    );
    assert!(
        unbound_out.contains("NoCredentials"),
        "an unbound service gets nothing: {unbound_out}"
    );

    // A broken file is refused and the bindings in force stay: once the agent has
    // reported it, a request made while it is broken is still served as bound.
    std::fs::write(&file, "bindings: [oops").unwrap();
    interceptor_tests::objects::wait_for(
        "the broken file reported",
        Duration::from_secs(15),
        || {
            let log = agent.log_text();
            if log.contains("bindings file not reloaded") {
                Ok(())
            } else {
                Err(log)
            }
        },
    )
    .await;
    let sts3 = sts.clone();
    let (while_broken, billing) =
        tokio::task::spawn_blocking(move || (boto3(&billing, &sts3), billing))
            .await
            .unwrap();
    assert_eq!(
        while_broken, "arn:aws:sts::123456789012:assumed-role/billing/billing",
        "served as bound while the file is broken"
    );
    // Swap the roles: the file is reloaded without a restart.
    bindings_file(
        "bindings",
        &[
            ("billing", &billing, "web-swapped"),
            ("web", &web, "billing"),
        ],
    );
    let sts2 = sts.clone();
    let swapped = interceptor_tests::objects::wait_for(
        "the reloaded bindings",
        Duration::from_secs(15),
        || {
            let arn = boto3(&billing, &sts2);
            if arn.contains("web-swapped") {
                Ok(arn)
            } else {
                Err(arn)
            }
        },
    )
    .await;
    assert_eq!(
        swapped,
        "arn:aws:sts::123456789012:assumed-role/web-swapped/billing"
    );
    let _ = std::fs::remove_file(&file);
}

/// The agent's passthrough speaks IMDSv2 to the node's service (which requires it): it
/// fetches a token, re-uses it, and fetches a new one when the service answers 401 (as
/// after the instance's tokens are invalidated); pods never see that 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_passthrough_fetches_a_new_token_after_a_401() {
    if !require_root("the_passthrough_fetches_a_new_token_after_a_401") {
        return;
    }
    let node = Node::new();
    let pod = node.pod();
    let file = bindings_file("bindings-token", &[("app", &pod, "app")]);
    let moto = MotoServer::shared_on(node.address);
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let mut args = standalone_args(&node, &file, &upstream, &moto.endpoint());
    args.extend(["--allow-route-regexp", "^/latest/meta-data/placement/.*"].map(str::to_owned));
    let pins = interceptor_tests::pins::Pins::new("token-refetch");
    let mut agent = Agent::run(&args, &pins.0, free_port(), &AGENT_ENV);
    agent.wait_ready(Duration::from_secs(30));
    const ZONE: &str = "/latest/meta-data/placement/availability-zone";
    let ask = |pod: &interceptor_tests::Pod| {
        let (status, token) = raw(
            pod,
            "PUT",
            "/latest/api/token",
            &["X-aws-ec2-metadata-token-ttl-seconds=60"],
        );
        assert_eq!(status, 200, "{token}");
        raw(
            pod,
            "GET",
            ZONE,
            &[&format!("X-aws-ec2-metadata-token={}", token.trim())],
        )
    };
    let (first, pod) = tokio::task::spawn_blocking(move || (ask(&pod), pod))
        .await
        .unwrap();
    assert_eq!(
        first,
        (200, "us-east-1a".to_owned()),
        "{}",
        agent.log_text()
    );
    assert_eq!(upstream.token_counts(), (1, 0), "one token, no refusal");

    upstream.revoke_tokens();
    let (second, _pod) = tokio::task::spawn_blocking(move || (ask(&pod), pod))
        .await
        .unwrap();
    assert_eq!(
        second,
        (200, "us-east-1a".to_owned()),
        "{}",
        agent.log_text()
    );
    assert_eq!(
        upstream.token_counts(),
        (2, 1),
        "the 401 made the agent fetch a second token"
    );
    assert_eq!(
        upstream.requests(),
        [
            "PUT /latest/api/token",
            &format!("GET {ZONE}"),
            &format!("GET {ZONE}"),
            "PUT /latest/api/token",
            &format!("GET {ZONE}"),
        ]
    );
    let _ = std::fs::remove_file(&file);
}
