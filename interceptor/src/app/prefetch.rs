//! Kubernetes mode's pod follower: prefetches credentials for pods that appear with a
//! role (unless `--no-prefetch`), forgets the credentials and cgroups of pods that go.

use std::{collections::BTreeSet, sync::Arc};

use tokio::sync::broadcast::error::RecvError;

use crate::{
    credentials::{CredentialCache, session_name},
    k8s::{NamespaceStore, PodChange, PodInfo, PodStore},
    resolve::{Caller, Outcome, Resolver, Verdict},
};

pub(super) async fn follow_pods(
    resolver: Arc<Resolver>,
    pods: Arc<PodStore>,
    namespaces: Arc<NamespaceStore>,
    credentials: Arc<CredentialCache>,
    prefetch: bool,
) {
    let prefetch = |pod: &PodInfo| {
        if !prefetch {
            return;
        }
        if let Verdict::Decided {
            outcome: Outcome::Role { request, .. },
            ..
        } = resolver.decide(&Caller::for_pod(&pod.uid))
        {
            credentials.prefetch(&request);
        }
    };
    // Keys of pods no longer on the node are forgotten (their refreshers stop).
    let sweep = || {
        let live: BTreeSet<String> = pods
            .pods()
            .iter()
            .flat_map(|pod| {
                // The pod's session, and its containers' own (`container-roles`).
                let containers = pod.containers.iter().map(Some);
                std::iter::once(None)
                    .chain(containers)
                    .map(|container| {
                        session_name(&pod.namespace, &pod.name, container.map(String::as_str))
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        credentials.retain(|key| live.contains(&*key.request.session_name));
    };
    // Subscribe first, then cover what the store already holds: no pod is missed. The
    // decisions need the namespaces' restrictions, so the first pass waits for both
    // stores (changes meanwhile queue in the subscription).
    let mut changes = pods.subscribe();
    pods.wait_synced().await;
    namespaces.wait_synced().await;
    for pod in pods.pods() {
        prefetch(&pod);
    }
    loop {
        match changes.recv().await {
            Ok(PodChange::Applied(pod)) => prefetch(&pod),
            Ok(PodChange::Deleted(pod)) => {
                resolver.forget_pod(&pod.uid);
                sweep();
            }
            Err(RecvError::Lagged(_)) => {
                // Changes were missed, deletions among them.
                sweep();
                for pod in pods.pods() {
                    prefetch(&pod);
                }
            }
            Err(RecvError::Closed) => return,
        }
    }
}
