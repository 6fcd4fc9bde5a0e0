//! The programs' aya-log records reach the agent's tracing output at debug level, and only
//! when asked for: by default the programs log nothing.

use std::{
    net::SocketAddrV4,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use interceptor::ebpf;
use interceptor_tests::{
    Node,
    agent::{Agent, free_port},
    clients, cluster,
    fake_imds::FakeImds,
    moto::MotoServer,
    pins::Pins,
    probe, require_root,
};
use tracing::{Event, Subscriber, field::Visit};
use tracing_subscriber::{Layer, layer::Context, prelude::*};

/// Collects the messages of `interceptor::kernel` events.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<String>>>);

impl<S: Subscriber> Layer<S> for Captured {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        if event.metadata().target() != "interceptor::kernel" {
            return;
        }
        struct Message(String);
        impl Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        self.0.lock().unwrap().push(message.0);
    }
}

fn refused_ipv6_connect(pod: &interceptor_tests::Pod) {
    let report = probe::run(pod.command(probe::binary(), &["[fd00:ec2::254]:80", "1", "v6"]));
    assert_eq!(report.connected, 0, "{report:?}");
}

fn wait_for(captured: &Captured, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    loop {
        let seen = captured.0.lock().unwrap().clone();
        if !seen.is_empty() || Instant::now() > deadline {
            return seen;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn kernel_log_reaches_tracing_only_when_enabled() {
    if !require_root("kernel_log_reaches_tracing_only_when_enabled") {
        return;
    }
    let captured = Captured::default();
    tracing_subscriber::registry().with(captured.clone()).init();
    let node = Node::new();
    let pod = node.pod();
    for enabled in [false, true] {
        let pins = Pins::new(&format!("log-{enabled}"));
        let mut datapath = ebpf::Datapath::open(&ebpf::Options {
            kernel_log: enabled,
            ..pins.options(&node, SocketAddrV4::new(node.address, 8181))
        })
        .expect("attach");
        datapath.spawn_kernel_log();
        refused_ipv6_connect(&pod);
        let seen = wait_for(&captured, Duration::from_secs(if enabled { 5 } else { 2 }));
        if enabled {
            assert!(
                seen.iter().any(|m| m.contains("connect6 refused")),
                "expected the program's debug record in tracing, saw {seen:?}"
            );
        } else {
            assert!(
                seen.is_empty(),
                "the programs must log nothing by default: {seen:?}"
            );
        }
        drop(datapath);
        drop(pins);
    }
}

/// The agent itself forwards the programs' records: with `interceptor::kernel=debug` (the
/// test agent's `--log-level info,interceptor=debug` includes it), its stderr shows the
/// record of a pod's redirected connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_logs_the_programs_records_when_asked() {
    if !require_root("the_agent_logs_the_programs_records_when_asked") {
        return;
    }
    let node = Node::new();
    let pod = std::sync::Arc::new(node.pod());
    let file = cluster::bindings_file("kernel-log", &[("logged", &pod, "role-l")]);
    let moto = MotoServer::shared_on(node.address);
    let upstream = FakeImds::start(std::net::IpAddr::from([127, 0, 0, 1])).await;
    let args = cluster::standalone_args(&node, &file, &upstream, &moto.endpoint());
    let pins = Pins::new("kernel-log-agent");
    let mut agent = Agent::run(&args, &pins.0, free_port(), &cluster::AGENT_ENV);
    agent.wait_ready(Duration::from_secs(30));
    let asked = pod.clone();
    let (status, body) = tokio::task::spawn_blocking(move || {
        clients::raw(
            &asked,
            "GET",
            "/latest/meta-data/iam/security-credentials/",
            &[],
        )
    })
    .await
    .unwrap();
    assert_eq!(
        (status, body.trim()),
        (200, "role-l"),
        "redirected and answered"
    );
    let record = format!(
        "imds connect redirected to the proxy: cgroup {}",
        pod.container.id()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !agent.log_text().contains(&record) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = agent.log_text();
    assert!(
        log.contains(&record) && log.contains("interceptor::kernel"),
        "no program record for the pod's connection ({record:?}) in the agent's log:\n{log}"
    );
}
