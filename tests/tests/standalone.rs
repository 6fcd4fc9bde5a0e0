//! Standalone mode on the simulated node: no Kubernetes, a bindings file maps cgroup paths
//! to roles; the same kernel data path, policy checks and credentials cache. The AWS CLI
//! and boto3 in each "service" get exactly their bound role; an unbound one gets nothing;
//! a changed file takes effect without a restart.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use interceptor_tests::{
    Node,
    agent::{Agent, free_port},
    clients::{aws_cli, boto3},
    fake_imds::FakeImds,
    moto::MotoServer,
    require_root,
};

fn bindings(node: &Node, services: &[(&str, &interceptor_tests::Pod, &str)]) -> String {
    let mount = interceptor::cgroupfs::cgroup2_mount().unwrap();
    let mut text = String::from("bindings:\n");
    for (name, pod, role) in services {
        let path = pod.container.path.strip_prefix(&mount).unwrap();
        text.push_str(&format!(
            "  - name: {name}\n    cgroup: /{}\n    role: {role}\n",
            path.display()
        ));
    }
    let _ = node;
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bound_services_get_their_roles_and_the_file_is_reloaded() {
    if !require_root("bound_services_get_their_roles_and_the_file_is_reloaded") {
        return;
    }
    let node = Node::new();
    let (billing, web, unbound) = (node.pod(), node.pod(), node.pod());
    let file =
        std::env::temp_dir().join(format!("interceptor-bindings-{}.yaml", std::process::id()));
    std::fs::write(
        &file,
        bindings(
            &node,
            &[
                ("billing", &billing, "billing"),
                ("web", &web, "arn:aws:iam::999999999999:role/web"),
            ],
        ),
    )
    .unwrap();
    let moto = MotoServer::start_on(node.address, &[]);
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let args: Vec<String> = [
        "--bindings",
        &file.display().to_string(),
        "--host-ip",
        &node.address.to_string(),
        "--app-port",
        &free_port().to_string(),
        // Only the test's own tree: standalone attaches to the whole host by default.
        "--cgroup-root",
        &node.cgroup_top().display().to_string(),
        "--metadata-addr",
        &upstream.addr().to_string(),
        "--sts-endpoint",
        &moto.endpoint(),
        "--base-role-arn",
        "arn:aws:iam::123456789012:role/",
    ]
    .iter()
    .map(|arg| (*arg).to_owned())
    .collect();
    let pin_dir = PathBuf::from(format!(
        "/sys/fs/bpf/interceptor-test-{}-standalone",
        std::process::id()
    ));
    let mut agent = Agent::run(
        &args,
        &pin_dir,
        free_port(),
        &[
            ("AWS_ACCESS_KEY_ID", "AKIAAGENTEXAMPLE0001"),
            ("AWS_SECRET_ACCESS_KEY", "x"),
            ("AWS_REGION", "us-east-1"),
        ],
    );
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

    // A broken file is refused and the bindings in force stay.
    std::fs::write(&file, "bindings: [oops").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Swap the roles: the file is reloaded without a restart.
    std::fs::write(
        &file,
        bindings(
            &node,
            &[
                ("billing", &billing, "web-swapped"),
                ("web", &web, "billing"),
            ],
        ),
    )
    .unwrap();
    let sts2 = sts.clone();
    let swapped = interceptor_tests::apiserver::wait_for(
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
    let log = agent.log_text();
    assert!(
        log.contains("bindings file not reloaded"),
        "the broken file is reported:\n{log}"
    );
    let _ = std::fs::remove_file(&file);
}
