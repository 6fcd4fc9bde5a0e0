//! A stand-in for the Kubernetes API server, for tests of code that uses the real `kube`
//! client (list + watch, reflectors, event recorders) where no real apiserver can run.
//!
//! [`FakeApiServer`] is an in-process HTTP/1.1 server on 127.0.0.1 that speaks the
//! apiserver's JSON protocol for Pods, Namespaces, Nodes and Events (`v1` and
//! `events.k8s.io/v1`), keeping the objects in memory with one global, etcd-like
//! resourceVersion that every write bumps:
//!
//! - LIST (`GET /api/v1/pods`, `/api/v1/namespaces/{ns}/pods`, `/api/v1/namespaces`, ...):
//!   a `PodList` etc. with `metadata.resourceVersion`, honouring `fieldSelector` (`=`, `==`,
//!   `!=`; the field labels the apiserver supports, e.g. `spec.nodeName`, `metadata.name`),
//!   `labelSelector` (`=`, `==`, `!=`, `in`, `notin`, exists, `!`) and `limit` + `continue`.
//! - WATCH (the same paths with `watch=true`/`watch=1`): a chunked stream of
//!   newline-delimited `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":...}`,
//!   starting after `resourceVersion` (replayed from a bounded history; `""`/`"0"` start
//!   with the current objects as ADDED; `sendInitialEvents=true` ends those with the
//!   `k8s.io/initial-events-end` BOOKMARK), BOOKMARKs every
//!   [`Options::bookmark_interval`] with `allowWatchBookmarks=true`, closed after
//!   `timeoutSeconds`. A change that moves an object into (out of) a selector's selection
//!   is sent as ADDED (DELETED). A resourceVersion older than the history gets, as from the
//!   apiserver, a 200 stream with one `ERROR` event carrying a 410 `Expired` `Status`, on
//!   which kube's watcher re-lists.
//! - GET / PUT / PATCH (JSON patch, merge patch; strategic merge and apply treated as merge
//!   patch) / DELETE on items, POST on collections (Events, and anything else).
//! - 404 / 409 / 410 ... answers as `Status` objects.
//!
//! Tests change the world with [`FakeApiServer::add_pod`], [`FakeApiServer::update_pod`],
//! [`FakeApiServer::delete_pod`] and friends, and inject faults with
//! [`FakeApiServer::stop`] / [`FakeApiServer::restart`] (same port, the store survives),
//! [`FakeApiServer::compact`] and [`FakeApiServer::drop_watches`].

mod http;
mod selector;
mod store;
mod watch;

use std::{
    collections::VecDeque,
    fmt::Debug,
    io,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use hyper::{Request, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::{
    Client,
    config::{KubeConfigOptions, Kubeconfig},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use tokio::{
    net::{TcpListener, TcpSocket},
    task::{JoinHandle, JoinSet},
};

use self::store::{Kind, Store};
pub use crate::objects::{new_namespace, new_node, new_pod, wait_for};

/// Tuning of a [`FakeApiServer`].
#[derive(Clone, Debug)]
pub struct Options {
    /// How often an open watch with `allowWatchBookmarks=true` gets a BOOKMARK (the real
    /// apiserver: about a minute).
    pub bookmark_interval: Duration,
    /// How many changes the watch history keeps; a watch from before the oldest kept change
    /// gets 410 Expired (the real apiserver: its watch cache, then etcd compaction).
    pub history_limit: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            bookmark_interval: Duration::from_secs(1),
            history_limit: 1000,
        }
    }
}

/// State shared by the server's tasks and the test's handle.
struct Shared {
    store: Mutex<Store>,
    /// The current resourceVersion, sent after every write: wakes the watches.
    rv_tx: tokio::sync::watch::Sender<u64>,
    /// Bumped by `drop_watches`: every open watch ends abruptly.
    epoch_tx: tokio::sync::watch::Sender<u64>,
    options: Options,
    lists: AtomicU64,
    watches: AtomicU64,
    expired: AtomicU64,
    open_watches: AtomicUsize,
    requests: Mutex<VecDeque<String>>,
}

const REQUEST_LOG_LIMIT: usize = 1000;

impl Shared {
    fn lock_store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs a write on the store, then wakes the watches.
    fn mutate<R>(&self, write: impl FnOnce(&mut Store) -> R) -> R {
        let (result, rv) = {
            let mut store = self.lock_store();
            let result = write(&mut store);
            (result, store.rv)
        };
        self.rv_tx.send_replace(rv);
        result
    }

    fn log_request<B>(&self, req: &Request<B>) {
        let mut log = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
        if log.len() == REQUEST_LOG_LIMIT {
            log.pop_front();
        }
        log.push_back(format!("{} {}", req.method(), req.uri()));
    }
}

/// An in-process stand-in for kube-apiserver; see the [module docs](self).
///
/// Dropping it shuts the server down.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl FakeApiServer {
    /// Starts a server on 127.0.0.1 on a free port, with [`Options::default`].
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    /// Starts a server on 127.0.0.1 on a free port.
    pub async fn start_with(options: Options) -> Self {
        let (rv_tx, _) = tokio::sync::watch::channel(0);
        let (epoch_tx, _) = tokio::sync::watch::channel(0);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(options.history_limit)),
            rv_tx,
            epoch_tx,
            options,
            lists: AtomicU64::new(0),
            watches: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            open_watches: AtomicUsize::new(0),
            requests: Mutex::new(VecDeque::new()),
        });
        let listener =
            bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("FakeApiServer: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("FakeApiServer: local address");
        let server = tokio::spawn(serve(listener, Arc::clone(&shared)));
        Self {
            shared,
            addr,
            server: Mutex::new(Some(server)),
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kubeconfig for this server: plain HTTP, no credentials, namespace `default`.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: fake\n  cluster:\n    server: {url}\n\
             users:\n\
             - name: fake\n  user: {{}}\n\
             contexts:\n\
             - name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\n",
            url = self.url()
        )
    }

    /// Writes [`Self::kubeconfig_yaml`] to `path` (e.g. for `KUBECONFIG` of a child process).
    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> io::Result<()> {
        std::fs::write(path, self.kubeconfig_yaml())
    }

    /// A `kube::Client` for this server, built from [`Self::kubeconfig_yaml`] as a program
    /// given that kubeconfig would build it.
    pub async fn client(&self) -> Client {
        let kubeconfig =
            Kubeconfig::from_yaml(&self.kubeconfig_yaml()).expect("FakeApiServer: kubeconfig");
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .expect("FakeApiServer: kube config from kubeconfig");
        Client::try_from(config).expect("FakeApiServer: kube client")
    }

    // ---- Fault injection ----

    /// Takes the server down: closes the listening socket and every connection (open
    /// watches end abruptly). Requests are refused until [`Self::restart`]; the store and
    /// the history are kept, and the test API keeps working meanwhile.
    pub async fn stop(&self) {
        let server = self
            .server
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(server) = server {
            server.abort();
            let _ = server.await;
        }
    }

    /// Brings the server back on the same address (after [`Self::stop`]; a no-op while up).
    pub async fn restart(&self) {
        if self.is_running() {
            return;
        }
        let mut attempt = 0;
        let listener = loop {
            match bind(self.addr) {
                Ok(listener) => break listener,
                Err(err) if attempt < 50 => {
                    attempt += 1;
                    tracing::debug!(%err, "FakeApiServer: rebinding {}", self.addr);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(err) => panic!("FakeApiServer: rebinding {}: {err}", self.addr),
            }
        };
        let server = tokio::spawn(serve(listener, Arc::clone(&self.shared)));
        *self.server.lock().unwrap_or_else(PoisonError::into_inner) = Some(server);
    }

    pub fn is_running(&self) -> bool {
        self.server
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(|s| !s.is_finished())
    }

    /// Drops the watch history and moves to a fresh resourceVersion, as if etcd had been
    /// compacted: a watch from any resourceVersion issued before this call gets 410 Expired,
    /// so its client has to re-list. Watches already open keep running (as with etcd);
    /// combine with [`Self::drop_watches`] to make them resume, and fail.
    pub fn compact(&self) {
        self.shared.mutate(Store::compact);
    }

    /// Ends every open watch stream abruptly (the connection is cut mid-stream, without the
    /// final chunk), as when an apiserver instance goes away behind a load balancer.
    pub fn drop_watches(&self) {
        self.shared.epoch_tx.send_modify(|epoch| *epoch += 1);
    }

    // ---- Counters ----

    /// LIST requests served (including pages after the first).
    pub fn list_count(&self) -> u64 {
        self.shared.lists.load(Ordering::Relaxed)
    }

    /// WATCH requests served.
    pub fn watch_count(&self) -> u64 {
        self.shared.watches.load(Ordering::Relaxed)
    }

    /// Watches answered or ended with 410 Expired.
    pub fn expired_count(&self) -> u64 {
        self.shared.expired.load(Ordering::Relaxed)
    }

    /// Watch streams open right now.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::Relaxed)
    }

    /// The last requests served, as `METHOD /path?query` (the most recent 1000).
    pub fn requests(&self) -> Vec<String> {
        let log = self
            .shared
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        log.iter().cloned().collect()
    }

    /// The current (last issued) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock_store().rv
    }

    // ---- Objects ----

    /// Creates a pod in its `metadata.namespace` (default `default`), as `kubectl create`
    /// would: fills in uid, creationTimestamp, resourceVersion and `status.phase` (Pending)
    /// when missing. Returns the stored pod. Panics if it exists.
    pub fn add_pod(&self, pod: Pod) -> Pod {
        self.add(Kind::Pod, pod)
    }

    /// Changes a pod (e.g. its annotations) with `change`; MODIFIED to the watches, unless
    /// nothing changed. Returns the stored pod. Panics if there is no such pod.
    pub fn update_pod(&self, namespace: &str, name: &str, change: impl FnOnce(&mut Pod)) -> Pod {
        self.update(Kind::Pod, namespace, name, change)
    }

    /// Deletes a pod at once (no graceful termination); DELETED to the watches. Returns it,
    /// or `None` if there was no such pod.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        self.delete(Kind::Pod, namespace, name)
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        self.get(Kind::Pod, namespace, name)
    }

    /// All pods, in (namespace, name) order.
    pub fn pods(&self) -> Vec<Pod> {
        self.all(Kind::Pod)
    }

    /// Creates a namespace (with the `kubernetes.io/metadata.name` label and phase Active,
    /// as the apiserver adds). Panics if it exists.
    pub fn add_namespace(&self, namespace: Namespace) -> Namespace {
        self.add(Kind::Namespace, namespace)
    }

    /// Changes a namespace with `change`. Panics if there is no such namespace.
    pub fn update_namespace(&self, name: &str, change: impl FnOnce(&mut Namespace)) -> Namespace {
        self.update(Kind::Namespace, "", name, change)
    }

    /// Deletes a namespace at once (its pods stay: there is no namespace controller).
    pub fn delete_namespace(&self, name: &str) -> Option<Namespace> {
        self.delete(Kind::Namespace, "", name)
    }

    pub fn namespace(&self, name: &str) -> Option<Namespace> {
        self.get(Kind::Namespace, "", name)
    }

    /// Creates a ServiceAccount in its `metadata.namespace`. Panics if it exists.
    pub fn add_service_account(
        &self,
        account: k8s_openapi::api::core::v1::ServiceAccount,
    ) -> k8s_openapi::api::core::v1::ServiceAccount {
        self.add(Kind::ServiceAccount, account)
    }

    /// Changes a ServiceAccount with `change`. Panics if there is no such object.
    pub fn update_service_account(
        &self,
        namespace: &str,
        name: &str,
        change: impl FnOnce(&mut k8s_openapi::api::core::v1::ServiceAccount),
    ) -> k8s_openapi::api::core::v1::ServiceAccount {
        self.update(Kind::ServiceAccount, namespace, name, change)
    }

    /// Creates a node. Panics if it exists.
    pub fn add_node(&self, node: Node) -> Node {
        self.add(Kind::Node, node)
    }

    /// Changes a node with `change`. Panics if there is no such node.
    pub fn update_node(&self, name: &str, change: impl FnOnce(&mut Node)) -> Node {
        self.update(Kind::Node, "", name, change)
    }

    pub fn node(&self, name: &str) -> Option<Node> {
        self.get(Kind::Node, "", name)
    }

    /// The stored Events, both `v1` and `events.k8s.io/v1` (tell them apart by
    /// `apiVersion`), oldest write first.
    pub fn events(&self) -> Vec<Value> {
        let store = self.shared.lock_store();
        let mut events: Vec<Value> = [Kind::CoreEvent, Kind::Event]
            .into_iter()
            .flat_map(|kind| store.iter(kind, None).map(|(_, obj)| obj.clone()))
            .collect();
        events.sort_by_key(|e| {
            e["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|rv| rv.parse::<u64>().ok())
        });
        events
    }

    fn add<K: Serialize + DeserializeOwned>(&self, kind: Kind, obj: K) -> K {
        let obj = to_value(&obj);
        let namespace = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        let stored = self
            .shared
            .mutate(|s| s.create(kind, &namespace, obj))
            .unwrap_or_else(|e| panic!("FakeApiServer: adding a {}: {}", kind.kind(), e.message));
        from_value(stored)
    }

    fn update<K: Serialize + DeserializeOwned>(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
        change: impl FnOnce(&mut K),
    ) -> K {
        let stored = self.shared.mutate(|s| {
            let current = s.get(kind, namespace, name).cloned().unwrap_or_else(|| {
                panic!(
                    "FakeApiServer: no {} {namespace}/{name} to update",
                    kind.kind()
                )
            });
            let mut obj: K = from_value(current);
            change(&mut obj);
            let mut obj = to_value(&obj);
            // The test edits the current object: no resourceVersion precondition.
            if let Some(meta) = obj["metadata"].as_object_mut() {
                meta.remove("resourceVersion");
            }
            s.replace(kind, namespace, name, obj)
        });
        let stored = stored.unwrap_or_else(|e| {
            panic!(
                "FakeApiServer: updating {} {namespace}/{name}: {}",
                kind.kind(),
                e.message
            )
        });
        from_value(stored)
    }

    fn delete<K: DeserializeOwned>(&self, kind: Kind, namespace: &str, name: &str) -> Option<K> {
        self.shared
            .mutate(|s| s.delete(kind, namespace, name))
            .ok()
            .map(from_value)
    }

    fn get<K: DeserializeOwned>(&self, kind: Kind, namespace: &str, name: &str) -> Option<K> {
        let store = self.shared.lock_store();
        store.get(kind, namespace, name).cloned().map(from_value)
    }

    fn all<K: DeserializeOwned>(&self, kind: Kind) -> Vec<K> {
        let store = self.shared.lock_store();
        store
            .iter(kind, None)
            .map(|(_, obj)| from_value(obj.clone()))
            .collect()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(server) = self
            .server
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            server.abort();
        }
    }
}

impl Debug for FakeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("url", &self.url())
            .field("running", &self.is_running())
            .finish_non_exhaustive()
    }
}

/// A listening socket with SO_REUSEADDR, so that a restart can take the same port while
/// connections of the previous run linger in TIME_WAIT.
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(128)
}

/// Accepts connections until aborted; aborting drops the connections' tasks too.
async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let shared = Arc::clone(&shared);
                    connections.spawn(async move {
                        let service =
                            service_fn(move |req| http::handle(Arc::clone(&shared), req));
                        if let Err(err) = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await
                        {
                            tracing::debug!(%err, "FakeApiServer: connection ended");
                        }
                    });
                }
                Err(err) => {
                    tracing::warn!(%err, "FakeApiServer: accept");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

fn to_value<K: Serialize>(obj: &K) -> Value {
    serde_json::to_value(obj).expect("FakeApiServer: object serializes")
}

fn from_value<K: DeserializeOwned>(value: Value) -> K {
    serde_json::from_value(value).expect("FakeApiServer: stored object deserializes")
}
