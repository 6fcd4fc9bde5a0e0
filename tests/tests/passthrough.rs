//! The passthrough never forwards what bears credentials, whatever the allow-list says.
//!
//! The agent runs with the broadest allow-list there is (`--allow-route-regexp .*`), and
//! the node's metadata service (the agent's upstream, a fake) serves the node's identity
//! credentials and its signed instance identity. A pod asks for every credential-bearing
//! path in the spellings an upstream might accept: each is refused with 404 and none
//! reaches the upstream, while two harmless paths are forwarded (so the allow-list is
//! live, and a credential-bearing path the agent failed to deny would be forwarded and
//! seen here).

use std::net::IpAddr;

use interceptor_tests::{
    Node,
    cluster::{AgentBuilder, Peers},
    control_plane::ControlPlane,
    fake_imds::{FakeImds, NODE_ACCESS_KEY, NODE_SIGNATURE},
    moto::MotoServer,
    pod_client::PodClient,
    require_root,
};

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
