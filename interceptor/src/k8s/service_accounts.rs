//! The annotations of the ServiceAccounts this node's pods run as (roles named on the
//! ServiceAccount apply to pods without their own).
//!
//! Kept cheap: there is no cluster-wide watch. Each ServiceAccount some pod on this node
//! uses gets a metadata-only watch of that one object (`metadata.name=<name>` in its
//! namespace), started when the first such pod appears and stopped when the last one
//! goes, so memory and API server work follow the node's pods, not the cluster's
//! namespaces. The agent needs get/list/watch on serviceaccounts (deploy/base/rbac.yaml).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::{
    Api, Client,
    core::PartialObjectMeta,
    runtime::{WatchStreamExt, watcher},
};
use tokio_util::task::AbortOnDropHandle;

use super::{PodChange, PodInfo, PodStore};

/// `(namespace, name)`.
pub type Key = (String, String);

/// What is known of one ServiceAccount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Account {
    /// Its watch has not listed it yet: decisions that depend on it wait (refuse).
    Pending,
    /// Listed, and absent (a pod may name a ServiceAccount that does not exist).
    Missing,
    /// Its annotations.
    Known(BTreeMap<String, String>),
}

/// ServiceAccounts by `(namespace, name)`, fed by [`follow`], read by every decision.
#[derive(Default)]
pub struct ServiceAccountStore {
    by_key: RwLock<Accounts>,
    changed: tokio::sync::Notify,
}

/// By namespace, then by name: a decision looks its pod's ServiceAccount up with the
/// pod's own strings, without building a key.
#[derive(Default)]
struct Accounts(HashMap<String, HashMap<String, Arc<Account>>>);

impl Accounts {
    fn get(&self, namespace: &str, name: &str) -> Option<&Arc<Account>> {
        self.0.get(namespace)?.get(name)
    }

    fn get_mut(&mut self, (namespace, name): &Key) -> Option<&mut Arc<Account>> {
        self.0.get_mut(namespace)?.get_mut(name)
    }

    fn insert(&mut self, (namespace, name): &Key, account: Account) {
        self.0
            .entry(namespace.clone())
            .or_default()
            .insert(name.clone(), Arc::new(account));
    }

    fn remove(&mut self, (namespace, name): &Key) {
        if let Some(names) = self.0.get_mut(namespace) {
            names.remove(name);
            if names.is_empty() {
                self.0.remove(namespace);
            }
        }
    }

    fn len(&self) -> usize {
        self.0.values().map(HashMap::len).sum()
    }
}

impl ServiceAccountStore {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// The ServiceAccount of `pod` (`default` when the spec names none). `None` when
    /// nothing follows it (the store is not in use).
    pub fn of_pod(&self, pod: &PodInfo) -> Option<Arc<Account>> {
        self.read().get(&pod.namespace, account_name(pod)).cloned()
    }

    /// Waits, up to `timeout`, until `pod`'s ServiceAccount has been read (a pod's first
    /// connection may come before its ServiceAccount's watch has listed it).
    pub async fn wait_known(&self, pod: &PodInfo, timeout: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            let known = self
                .of_pod(pod)
                .is_some_and(|account| *account != Account::Pending);
            if known || tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Accounts> {
        self.by_key
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Accounts> {
        self.by_key
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts following `key` (as pending) unless it is already followed.
    fn follow(&self, key: &Key) -> bool {
        let mut by_key = self.write();
        if by_key.get_mut(key).is_some() {
            return false;
        }
        by_key.insert(key, Account::Pending);
        drop(by_key);
        self.changed.notify_waiters();
        true
    }

    fn forget(&self, key: &Key) {
        self.write().remove(key);
    }

    /// Applies one event of `key`'s watch (which sees that object only).
    fn apply(&self, key: &Key, event: watcher::Event<PartialObjectMeta<ServiceAccount>>) {
        let account = match event {
            watcher::Event::Apply(meta) | watcher::Event::InitApply(meta) => {
                Account::Known(meta.metadata.annotations.unwrap_or_default())
            }
            watcher::Event::Delete(_) => Account::Missing,
            // A relist: absent unless it lists the object again.
            watcher::Event::Init => return,
            watcher::Event::InitDone => {
                let mut by_key = self.write();
                if let Some(account) = by_key.get_mut(key)
                    && **account == Account::Pending
                {
                    *account = Arc::new(Account::Missing);
                }
                drop(by_key);
                self.changed.notify_waiters();
                return;
            }
        };
        let mut by_key = self.write();
        // Only while followed: a late event must not bring back a forgotten entry.
        if let Some(slot) = by_key.get_mut(key)
            && **slot != account
        {
            *slot = Arc::new(account);
        }
        drop(by_key);
        self.changed.notify_waiters();
    }
}

/// The ServiceAccount `pod` runs as: `default` when its spec names none.
fn account_name(pod: &PodInfo) -> &str {
    pod.service_account.as_deref().unwrap_or("default")
}

fn key_of(pod: &PodInfo) -> Key {
    (pod.namespace.clone(), account_name(pod).to_owned())
}

/// Follows the ServiceAccounts of the pods in `pods` into `store` until dropped: one
/// single-object watch per ServiceAccount in use on this node (the watches are aborted
/// with it: whoever owns this task owns them).
pub async fn follow(client: Client, pods: Arc<PodStore>, store: Arc<ServiceAccountStore>) {
    let mut watches: HashMap<Key, AbortOnDropHandle<()>> = HashMap::new();
    let mut changes = pods.subscribe();
    loop {
        let used: std::collections::HashSet<Key> =
            pods.pods().iter().map(|pod| key_of(pod)).collect();
        for key in &used {
            if store.follow(key) {
                let task = AbortOnDropHandle::new(tokio::spawn(watch_one(
                    client.clone(),
                    key.clone(),
                    store.clone(),
                )));
                watches.insert(key.clone(), task);
            }
        }
        watches.retain(|key, task| {
            let keep = used.contains(key);
            if !keep {
                task.abort();
                store.forget(key);
            }
            keep
        });
        // Any change may add or remove a ServiceAccount; a lagged receiver just recomputes.
        match changes.recv().await {
            Ok(PodChange::Applied(_) | PodChange::Deleted(_))
            | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

async fn watch_one(client: Client, key: Key, store: Arc<ServiceAccountStore>) {
    let (namespace, name) = &key;
    let api: Api<PartialObjectMeta<ServiceAccount>> = Api::namespaced(client, namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(api, config).default_backoff().boxed();
    loop {
        match events.try_next().await {
            Ok(Some(event)) => store.apply(&key, event),
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(%error, namespace, name, "serviceaccount watch interrupted; retrying");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(annotations: &[(&str, &str)]) -> PartialObjectMeta<ServiceAccount> {
        let mut meta = PartialObjectMeta::<ServiceAccount>::default();
        meta.metadata.name = Some("app".into());
        meta.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        );
        meta
    }

    #[test]
    fn pending_until_listed_then_follows_changes_and_deletion() {
        let store = ServiceAccountStore::new();
        let key: Key = ("team-a".into(), "app".into());
        let get = || store.read().get(&key.0, &key.1).map(|a| (**a).clone());
        // Not followed: events are ignored.
        store.apply(&key, watcher::Event::Apply(meta(&[])));
        assert_eq!(get(), None);
        assert!(store.follow(&key));
        assert!(!store.follow(&key), "followed once");
        assert_eq!(get(), Some(Account::Pending));
        store.apply(&key, watcher::Event::Init);
        store.apply(&key, watcher::Event::InitDone);
        assert_eq!(get(), Some(Account::Missing), "listed and absent");
        store.apply(&key, watcher::Event::Apply(meta(&[("r", "x")])));
        let known = |pairs: &[(&str, &str)]| {
            Some(Account::Known(
                pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ))
        };
        assert_eq!(get(), known(&[("r", "x")]));
        store.apply(&key, watcher::Event::Apply(meta(&[("r", "y")])));
        assert_eq!(get(), known(&[("r", "y")]));
        store.apply(&key, watcher::Event::Delete(meta(&[])));
        assert_eq!(get(), Some(Account::Missing));
        store.forget(&key);
        store.apply(&key, watcher::Event::Apply(meta(&[])));
        assert_eq!(get(), None, "a late event does not bring it back");
    }
}
