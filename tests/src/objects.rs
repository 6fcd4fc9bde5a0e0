//! Kubernetes objects the end-to-end tests create, and a poll-until helper for what the
//! agent (or the API server) does in the background.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, NodeSpec, Pod, PodSpec};
use kube::api::ObjectMeta;

/// A pod `namespace/name` scheduled on `node` (`spec.nodeName`), with one container.
pub fn new_pod(namespace: &str, name: &str, node: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.to_owned()),
            containers: vec![k8s_openapi::api::core::v1::Container {
                name: "main".to_owned(),
                image: Some("registry.invalid/app:1".to_owned()),
                ..Default::default()
            }],
            ..PodSpec::default()
        }),
        status: None,
    }
}

pub fn new_namespace(name: &str) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    }
}

pub fn new_node(name: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec::default()),
        status: None,
    }
}

/// Polls `probe` every 20 ms until it returns `Ok`, for at most `timeout`; then panics with
/// `what` and the last `Err` (say there what was seen).
pub async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match probe() {
            Ok(value) => return value,
            Err(seen) if tokio::time::Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last seen: {seen}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}
