//! Creating many objects through the real API server in reasonable time: the large
//! cluster of scenarios 6 and 8 is 30,000 objects, which one request after another (as
//! `kubectl create -f` of a List sends them) would take minutes on this machine.
//! Requests go [`CONCURRENCY`] at a time on one administrator's client; the harness is in
//! `system:masters`, which API Priority and Fairness exempts, so nothing queues them but
//! the server's own work.

use std::fmt::Debug;

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::NamespaceResourceScope;
use kube::{Api, Client, Resource, ResourceExt, api::PostParams};
use serde::{Serialize, de::DeserializeOwned};

/// Requests in flight at once: enough to keep both cores busy while a response is on
/// its way, far below the server's `--max-mutating-requests-inflight` (200).
const CONCURRENCY: usize = 32;

/// Creates `objects` (each through the API `api_for` gives for it); the created objects,
/// in order. The first failure stops the run with the object's name.
pub async fn create_all<K>(objects: Vec<K>, api_for: impl Fn(&K) -> Api<K>) -> Result<Vec<K>>
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned,
    K::DynamicType: Default,
{
    stream::iter(objects.into_iter().map(|object| {
        let api = api_for(&object);
        async move {
            api.create(&PostParams::default(), &object)
                .await
                .with_context(|| {
                    format!(
                        "creating {} {}/{}",
                        K::kind(&Default::default()),
                        object.namespace().unwrap_or_default(),
                        object.name_any()
                    )
                })
        }
    }))
    .buffered(CONCURRENCY)
    .try_collect()
    .await
}

/// [`create_all`] for namespaced objects, each in the namespace its metadata names.
pub async fn create_namespaced<K>(client: &Client, objects: Vec<K>) -> Result<Vec<K>>
where
    K: Resource<Scope = NamespaceResourceScope> + Clone + Debug + Serialize + DeserializeOwned,
    K::DynamicType: Default,
{
    create_all(objects, |object| {
        Api::namespaced(client.clone(), &object.namespace().unwrap_or_default())
    })
    .await
}
