//! Pods on this node, by UID.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::{Arc, RwLock},
    time::Duration,
};

use futures::{StreamExt, TryStreamExt};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::{Notify, broadcast, watch};

pub use self::view::PodView;

/// What the agent keeps of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub annotations: BTreeMap<String, String>,
    pub host_network: bool,
    pub service_account: Option<String>,
    /// Names of the pod's containers, init and ephemeral ones included.
    pub containers: Vec<String>,
    /// Container id (without the `containerd://` scheme) -> container name, from the
    /// pod's status: which container a connection came from. A container is listed only
    /// once the kubelet has reported it.
    pub container_ids: Vec<(String, String)>,
}

impl PodInfo {
    /// `None` for an object without the identity fields every real pod has.
    pub fn from_view(pod: PodView) -> Option<Self> {
        let PodView {
            metadata,
            spec,
            status,
        } = pod;
        let spec = spec.unwrap_or_default();
        let containers = [
            spec.containers,
            spec.init_containers,
            spec.ephemeral_containers,
        ];
        Some(Self {
            uid: metadata.uid?,
            namespace: metadata.namespace?,
            name: metadata.name?,
            annotations: metadata.annotations.unwrap_or_default(),
            host_network: spec.host_network.unwrap_or(false),
            service_account: spec.service_account_name,
            containers: containers
                .into_iter()
                .flatten()
                .flatten()
                .map(|c| c.name)
                .collect(),
            container_ids: status.map(container_ids).unwrap_or_default(),
        })
    }

    /// The name of the container with this id (as the cgroup path spells it), if the
    /// pod's status lists it.
    pub fn container_name(&self, id: &str) -> Option<&str> {
        self.container_ids
            .iter()
            .find(|(known, _)| known == id)
            .map(|(_, name)| name.as_str())
    }

    /// `namespace/name`, for logs and errors.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

fn container_ids(status: view::Status) -> Vec<(String, String)> {
    let all = [
        status.container_statuses,
        status.init_container_statuses,
        status.ephemeral_container_statuses,
    ];
    all.into_iter()
        .flatten()
        .flatten()
        .filter_map(|status| {
            // `<runtime>://<id>`; the cgroup path has the id alone.
            let full = status.container_id.as_deref()?;
            let id = full.rsplit_once("://").map_or(full, |(_, id)| id);
            (!id.is_empty()).then(|| (id.to_ascii_lowercase(), status.name))
        })
        .collect()
}

/// A pod looked up by UID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Found(Arc<PodInfo>),
    /// Seen and deleted: its cgroups get nothing, at once (no waiting).
    Deleted,
    /// Never seen (yet).
    Unknown,
}

/// A change, for those who act on pods appearing and going (credential prefetch,
/// exemptions).
#[derive(Debug, Clone)]
pub enum PodChange {
    Applied(Arc<PodInfo>),
    Deleted(Arc<PodInfo>),
}

/// How many deleted UIDs are remembered (a node runs at most a few hundred pods at once;
/// this covers a lot of churn and stays small: ~40 bytes each).
const TOMBSTONES: usize = 16_384;

#[derive(Default)]
struct Inner {
    by_uid: HashMap<String, Arc<PodInfo>>,
    deleted: HashSet<String>,
    deleted_order: VecDeque<String>,
    /// Pods received since the last `Init`, applied at `InitDone`.
    relist: Option<HashMap<String, Arc<PodInfo>>>,
}

impl Inner {
    fn tombstone(&mut self, uid: String) {
        if self.deleted.insert(uid.clone()) {
            self.deleted_order.push_back(uid);
            while self.deleted_order.len() > TOMBSTONES {
                if let Some(old) = self.deleted_order.pop_front() {
                    self.deleted.remove(&old);
                }
            }
        }
    }
}

/// The pods on this node, fed by the watch, read by every request.
pub struct PodStore {
    inner: RwLock<Inner>,
    changed: Notify,
    synced: watch::Sender<bool>,
    changes: broadcast::Sender<PodChange>,
}

impl PodStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: RwLock::default(),
            changed: Notify::new(),
            synced: watch::channel(false).0,
            changes: broadcast::channel(1024).0,
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn get(&self, uid: &str) -> Lookup {
        let inner = self.read();
        match inner.by_uid.get(uid) {
            Some(pod) => Lookup::Found(Arc::clone(pod)),
            None if inner.deleted.contains(uid) => Lookup::Deleted,
            None => Lookup::Unknown,
        }
    }

    /// Like [`get`](Self::get), but a pod the store does not know yet (created a moment
    /// ago; the watch event may trail the pod's first connection) is waited for, up to
    /// `timeout`.
    pub async fn wait_for(&self, uid: &str, timeout: Duration) -> Lookup {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            let lookup = self.get(uid);
            if lookup != Lookup::Unknown {
                return lookup;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.get(uid);
            }
        }
    }

    /// All pods, e.g. for `/debug/store` and prefetch at start.
    pub fn pods(&self) -> Vec<Arc<PodInfo>> {
        self.read().by_uid.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.read().by_uid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True once the first complete list has been applied.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Waits for the first complete list.
    pub async fn wait_synced(&self) {
        let mut synced = self.synced.subscribe();
        let _ = synced.wait_for(|synced| *synced).await;
    }

    pub fn subscribe(&self) -> broadcast::Receiver<PodChange> {
        self.changes.subscribe()
    }

    /// Applies one watch event.
    pub fn apply(&self, event: watcher::Event<PodView>) {
        let mut changes = Vec::new();
        {
            let mut inner = self.write();
            match event {
                watcher::Event::Apply(pod) => {
                    if let Some(info) = PodInfo::from_view(pod).map(Arc::new) {
                        apply_one(&mut inner, &info, &mut changes);
                    }
                }
                watcher::Event::Delete(pod) => {
                    if let Some(info) = PodInfo::from_view(pod) {
                        inner.by_uid.remove(&info.uid);
                        inner.tombstone(info.uid.clone());
                        changes.push(PodChange::Deleted(Arc::new(info)));
                    }
                }
                watcher::Event::Init => inner.relist = Some(HashMap::new()),
                watcher::Event::InitApply(pod) => {
                    if let Some(info) = PodInfo::from_view(pod) {
                        inner
                            .relist
                            .get_or_insert_with(HashMap::new)
                            .insert(info.uid.clone(), Arc::new(info));
                    }
                }
                watcher::Event::InitDone => {
                    let listed = inner.relist.take().unwrap_or_default();
                    // Pods not in the new list were deleted while we were not watching.
                    let gone: Vec<Arc<PodInfo>> = inner
                        .by_uid
                        .values()
                        .filter(|pod| !listed.contains_key(&pod.uid))
                        .cloned()
                        .collect();
                    for pod in gone {
                        inner.by_uid.remove(&pod.uid);
                        inner.tombstone(pod.uid.clone());
                        changes.push(PodChange::Deleted(pod));
                    }
                    for info in listed.into_values() {
                        apply_one(&mut inner, &info, &mut changes);
                    }
                    self.synced.send_replace(true);
                }
            }
        }
        for change in changes {
            let _ = self.changes.send(change);
        }
        self.changed.notify_waiters();
    }
}

fn apply_one(inner: &mut Inner, info: &Arc<PodInfo>, changes: &mut Vec<PodChange>) {
    if inner.deleted.contains(&info.uid) {
        // A late event about a pod already deleted: UIDs are never reused.
        return;
    }
    let unchanged = inner.by_uid.get(&info.uid).is_some_and(|old| old == info);
    if !unchanged {
        inner.by_uid.insert(info.uid.clone(), Arc::clone(info));
        changes.push(PodChange::Applied(Arc::clone(info)));
    }
}

/// Watches the pods of `node` into `store` until the task is dropped. Errors (API server
/// down, watch expired) are logged and retried with backoff; the store keeps its content.
pub async fn watch(client: Client, node: String, store: Arc<PodStore>) {
    let api: Api<PodView> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut events = watcher(api, config).default_backoff().boxed();
    loop {
        match events.try_next().await {
            Ok(Some(event)) => store.apply(event),
            Ok(None) => return,
            Err(error) => tracing::warn!(%error, "pod watch interrupted; retrying"),
        }
    }
}

mod view;

#[cfg(test)]
mod tests;
