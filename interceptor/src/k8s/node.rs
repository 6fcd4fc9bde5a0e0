//! The startup taint: nodes register with a taint only the agent tolerates (kubelet
//! `--register-with-taints=interceptor.dev/agent-not-ready=:NoSchedule`), and the agent
//! removes it from its own node once it is ready, so no pod is ever scheduled on a fresh
//! node before interception is active.

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};

/// The taint key the agent removes by default.
pub const STARTUP_TAINT: &str = "interceptor.dev/agent-not-ready";

/// Removes every taint with `key` from `node`. Returns whether one was removed. The patch
/// carries the resourceVersion it was computed from, so a concurrent change to the taints
/// is never overwritten (the caller retries on conflict).
pub async fn remove_taint(client: &Client, node: &str, key: &str) -> Result<bool, kube::Error> {
    let api: Api<Node> = Api::all(client.clone());
    let current = api.get(node).await?;
    let taints = current
        .spec
        .as_ref()
        .and_then(|spec| spec.taints.clone())
        .unwrap_or_default();
    let kept: Vec<_> = taints
        .iter()
        .filter(|taint| taint.key != key)
        .cloned()
        .collect();
    if kept.len() == taints.len() {
        return Ok(false);
    }
    let patch = serde_json::json!({
        "metadata": { "resourceVersion": current.metadata.resource_version },
        "spec": { "taints": kept },
    });
    api.patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(true)
}

/// Keeps trying [`remove_taint`] (API server down, conflicts) with a capped backoff until
/// it is done.
pub async fn remove_taint_until_done(client: Client, node: String, key: String) {
    let mut pause = Duration::from_millis(200);
    loop {
        match remove_taint(&client, &node, &key).await {
            Ok(true) => {
                tracing::info!(
                    node,
                    taint = key,
                    "startup taint removed: pods may be scheduled"
                );
                return;
            }
            Ok(false) => return,
            Err(error) => {
                tracing::warn!(node, %error, "could not remove the startup taint; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(10));
            }
        }
    }
}
