//! Namespaces and their annotations (role restrictions, opt-outs).
//!
//! Only metadata is watched (a metadata watch): the agent needs annotations, and a cluster
//! may hold thousands of namespaces.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::watch;

use super::slim::Metadata;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub name: String,
    pub annotations: BTreeMap<String, String>,
    /// Changes whenever the object does: lets readers cache what they derive from it.
    pub resource_version: String,
}

impl NamespaceInfo {
    fn from_meta(meta: Metadata<Namespace>) -> Option<Self> {
        let meta = meta.metadata;
        Some(Self {
            name: meta.name?,
            annotations: meta.annotations.unwrap_or_default(),
            resource_version: meta.resource_version.unwrap_or_default(),
        })
    }
}

#[derive(Default)]
struct Inner {
    by_name: HashMap<String, Arc<NamespaceInfo>>,
    relist: Option<HashMap<String, Arc<NamespaceInfo>>>,
}

pub struct NamespaceStore {
    inner: RwLock<Inner>,
    synced: watch::Sender<bool>,
}

impl NamespaceStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: RwLock::default(),
            synced: watch::channel(false).0,
        })
    }

    pub fn get(&self, name: &str) -> Option<Arc<NamespaceInfo>> {
        let inner = self
            .inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.by_name.get(name).cloned()
    }

    pub fn len(&self) -> usize {
        let inner = self
            .inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    pub async fn wait_synced(&self) {
        let mut synced = self.synced.subscribe();
        let _ = synced.wait_for(|synced| *synced).await;
    }

    pub fn apply(&self, event: watcher::Event<Metadata<Namespace>>) {
        let mut inner = self
            .inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match event {
            watcher::Event::Apply(meta) => {
                if let Some(info) = NamespaceInfo::from_meta(meta) {
                    inner.by_name.insert(info.name.clone(), Arc::new(info));
                }
            }
            watcher::Event::Delete(meta) => {
                if let Some(name) = meta.metadata.name {
                    inner.by_name.remove(&name);
                }
            }
            watcher::Event::Init => inner.relist = Some(HashMap::new()),
            watcher::Event::InitApply(meta) => {
                if let Some(info) = NamespaceInfo::from_meta(meta) {
                    inner
                        .relist
                        .get_or_insert_with(HashMap::new)
                        .insert(info.name.clone(), Arc::new(info));
                }
            }
            watcher::Event::InitDone => {
                inner.by_name = inner.relist.take().unwrap_or_default();
                self.synced.send_replace(true);
            }
        }
    }
}

/// Watches every namespace's metadata into `store` until the task is dropped.
pub async fn watch(client: Client, store: Arc<NamespaceStore>) {
    // An `Api` over `Metadata` makes metadata-only requests, decoded sparingly.
    let api: Api<Metadata<Namespace>> = Api::all(client);
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    loop {
        match events.try_next().await {
            Ok(Some(event)) => store.apply(event),
            Ok(None) => return,
            Err(error) => tracing::warn!(%error, "namespace watch interrupted; retrying"),
        }
    }
}
