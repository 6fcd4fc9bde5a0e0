//! Graceful drain: SIGTERM while a pod's request is in flight (its STS call under way)
//! ends with the request answered, the agent exiting by itself once it is, and the
//! programs still attached (fail closed: pods never reach the real metadata service).

use std::{net::IpAddr, time::Duration};

use interceptor_tests::{
    Node,
    agent::{Agent, free_port},
    clients, cluster,
    fake_imds::FakeImds,
    moto::MotoServer,
    pins::Pins,
    require_root,
    sts_proxy::StsProxy,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_the_request_in_flight_then_exits_with_programs_attached() {
    if !require_root("sigterm_answers_the_request_in_flight_then_exits_with_programs_attached") {
        return;
    }
    let node = Node::new();
    let pod = std::sync::Arc::new(node.pod());
    let file = cluster::bindings_file("drain", &[("drained", &pod, "role-d")]);
    let moto = MotoServer::shared_on(node.address);
    let sts = StsProxy::start(moto.addr()).await;
    // Slow enough to be caught in flight, quicker than the agent's wait for STS (800 ms),
    // so the answer is the credentials, not a 503.
    sts.set_delay(Duration::from_millis(500));
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let args = cluster::standalone_args(&node, &file, &upstream, &sts.endpoint());
    let pins = Pins::new("drain");
    let mut agent = Agent::run(&args, &pins.0, free_port(), &cluster::AGENT_ENV);
    agent.wait_ready(Duration::from_secs(30));

    let asking = {
        let pod = pod.clone();
        tokio::task::spawn_blocking(move || {
            clients::raw(
                &pod,
                "GET",
                "/latest/meta-data/iam/security-credentials/role-d",
                &[],
            )
        })
    };
    // The request is in flight once its AssumeRole reached STS.
    for _ in 0..600 {
        if sts.count("AssumeRole") > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sts.count("AssumeRole"), 1, "the request never reached STS");
    let status = tokio::task::block_in_place(|| agent.terminate_status());
    let (code, body) = asking.await.unwrap();
    let log = agent.log_text();
    // Answered by the agent, not cut off (status 0): its credentials, or its 503 when STS
    // took longer than the agent's 800 ms wait (a loaded machine).
    assert!(
        (code == 200 && body.contains("\"AccessKeyId\"")) || code == 503,
        "the request in flight at SIGTERM was not answered ({code}): {body}\n{log}"
    );
    assert!(status.success(), "the agent exited with {status}:\n{log}");
    assert!(
        log.contains("draining") && log.contains("stopped; the programs stay attached"),
        "the drain did not wait for the open connection:\n{log}"
    );
    assert!(
        !log.contains("drain bound reached"),
        "the request outlived the drain bound:\n{log}"
    );
    let pinned = interceptor::ebpf::status(&pins.0).unwrap();
    assert!(
        pinned.attached(),
        "the programs were detached at exit:\n{pinned}"
    );
}
