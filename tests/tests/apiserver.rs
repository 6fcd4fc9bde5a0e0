//! The fake API server against the real `kube` client: watcher, reflector, events, patches.
//! No root needed.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{StreamExt, TryStreamExt};
use interceptor_tests::apiserver::{
    FakeApiServer, Options, new_namespace, new_node, new_pod, wait_for,
};
use k8s_openapi::api::{
    core::v1::{Event as CoreEvent, Namespace, Node, ObjectReference, Pod, Taint},
    events::v1::Event as EventsV1,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt,
        events::{Event as RecordedEvent, EventType, Recorder, Reporter},
        reflector::{self, Store},
        watcher,
    },
};
use serde_json::json;
use tokio::task::JoinHandle;

const DEADLINE: Duration = Duration::from_secs(10);
const ANNOTATION: &str = "example.com/role";

/// A reflector over `api` with `config`, driven by a task; every event it sees is recorded
/// as `"apply ns/name"`, `"delete ns/name"`, `"init-apply ns/name"`, `"init"`, `"init-done"`
/// or `"error: ..."`.
struct Reflector<K: kube::Resource + Clone + 'static>
where
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    store: Store<K>,
    seen: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl<K> Reflector<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    fn start(api: Api<K>, config: watcher::Config) -> Self {
        let (store, writer) = reflector::store();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let stream = reflector::reflector(writer, watcher(api, config)).default_backoff();
        let task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                let line = match event {
                    Ok(watcher::Event::Apply(o)) => format!("apply {}", key(&o)),
                    Ok(watcher::Event::Delete(o)) => format!("delete {}", key(&o)),
                    Ok(watcher::Event::InitApply(o)) => format!("init-apply {}", key(&o)),
                    Ok(watcher::Event::Init) => "init".to_owned(),
                    Ok(watcher::Event::InitDone) => "init-done".to_owned(),
                    Err(e) => format!("error: {e}"),
                };
                log.lock().unwrap().push(line);
            }
        });
        Self { store, seen, task }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    /// `namespace/name` of every object in the store, sorted.
    fn keys(&self) -> BTreeSet<String> {
        self.store.state().iter().map(|o| key(o.as_ref())).collect()
    }

    fn get(&self, namespace: &str, name: &str) -> Option<Arc<K>> {
        self.store
            .state()
            .into_iter()
            .find(|o| o.namespace().as_deref().unwrap_or("") == namespace && o.name_any() == name)
    }

    /// Waits until the watcher has listed, the store holds exactly `keys` and `check`
    /// passes on it.
    async fn wait_converged(&self, keys: &[&str], check: impl Fn(&Self) -> Result<(), String>) {
        let want: BTreeSet<String> = keys.iter().map(|k| (*k).to_owned()).collect();
        wait_for(&format!("store == {want:?}"), DEADLINE, || {
            if !self.seen().iter().any(|e| e == "init-done") {
                return Err(format!("not listed yet; events {:?}", self.seen()));
            }
            let have = self.keys();
            if have != want {
                return Err(format!("store {have:?}; events {:?}", self.seen()));
            }
            check(self).map_err(|e| format!("{e}; events {:?}", self.seen()))
        })
        .await;
    }
}

impl<K: kube::Resource + Clone + 'static> Drop for Reflector<K>
where
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn key<K: kube::Resource>(o: &K) -> String {
    format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any())
}

fn annotation<K: kube::Resource>(o: &K) -> Option<String> {
    o.annotations().get(ANNOTATION).cloned()
}

fn pod_with_annotation(namespace: &str, name: &str, node: &str, value: &str) -> Pod {
    let mut pod = new_pod(namespace, name, node);
    pod.annotations_mut()
        .insert(ANNOTATION.to_owned(), value.to_owned());
    pod
}

fn set_annotation<K: kube::Resource>(value: &str) -> impl FnOnce(&mut K) {
    let value = value.to_owned();
    move |o: &mut K| {
        o.annotations_mut().insert(ANNOTATION.to_owned(), value);
    }
}

fn node_a_pods(client: Client) -> Reflector<Pod> {
    Reflector::start(
        Api::all(client),
        watcher::Config::default().fields("spec.nodeName=node-a"),
    )
}

fn has_annotation(
    namespace: &'static str,
    name: &'static str,
    value: &'static str,
) -> impl Fn(&Reflector<Pod>) -> Result<(), String> {
    move |r| {
        let got = r.get(namespace, name).and_then(|p| annotation(p.as_ref()));
        if got.as_deref() == Some(value) {
            Ok(())
        } else {
            Err(format!(
                "{namespace}/{name} annotation {got:?}, want {value:?}"
            ))
        }
    }
}

#[tokio::test]
async fn node_scoped_watcher_follows_pods_of_its_node_only() {
    let server = FakeApiServer::start().await;
    server.add_pod(pod_with_annotation("default", "a1", "node-a", "one"));
    server.add_pod(new_pod("default", "b1", "node-b"));
    server.add_pod(new_pod("kube-system", "a0", "node-a"));

    let pods = node_a_pods(server.client().await);
    pods.wait_converged(
        &["default/a1", "kube-system/a0"],
        has_annotation("default", "a1", "one"),
    )
    .await;
    wait_for("an open watch", DEADLINE, || {
        (server.open_watches() == 1)
            .then_some(())
            .ok_or(format!("{} open watches", server.open_watches()))
    })
    .await;

    // Added while watching, on both nodes.
    server.add_pod(new_pod("default", "a2", "node-a"));
    server.add_pod(new_pod("default", "b2", "node-b"));
    pods.wait_converged(&["default/a1", "default/a2", "kube-system/a0"], |_| Ok(()))
        .await;

    // Annotation changed.
    server.update_pod("default", "a1", set_annotation("two"));
    server.update_pod("default", "b1", set_annotation("two"));
    pods.wait_converged(
        &["default/a1", "default/a2", "kube-system/a0"],
        has_annotation("default", "a1", "two"),
    )
    .await;

    // Deleted.
    server.delete_pod("default", "a2");
    server.delete_pod("default", "b2");
    pods.wait_converged(
        &["default/a1", "kube-system/a0"],
        has_annotation("default", "a1", "two"),
    )
    .await;

    let seen = pods.seen();
    assert!(
        seen.iter().all(|e| !e.contains("/b")),
        "a node-a watcher saw node-b pods: {seen:?}"
    );
    assert!(seen.contains(&"apply default/a2".to_owned()), "{seen:?}");
    assert!(seen.contains(&"delete default/a2".to_owned()), "{seen:?}");
    assert!(!seen.iter().any(|e| e.starts_with("error")), "{seen:?}");
    // One LIST, then one WATCH that stayed open: no re-list.
    assert_eq!(server.list_count(), 1, "{:?}", server.requests());
    assert_eq!(server.watch_count(), 1, "{:?}", server.requests());
    let requests = server.requests();
    assert!(
        requests.iter().any(|r| r.starts_with("GET /api/v1/pods?")
            && r.contains("fieldSelector=spec.nodeName%3Dnode-a")
            && r.contains("watch=true")
            && r.contains("allowWatchBookmarks=true")),
        "{requests:?}"
    );
}

#[tokio::test]
async fn pod_scheduled_onto_the_node_is_added_and_moved_away_is_deleted() {
    let server = FakeApiServer::start().await;
    server.add_pod(new_pod("default", "p", ""));
    let pods = node_a_pods(server.client().await);
    pods.wait_converged(&[], |_| Ok(())).await;

    // Bound to node-a: MODIFIED for the apiserver, ADDED for a node-a watch.
    server.update_pod("default", "p", |p| {
        p.spec.as_mut().unwrap().node_name = Some("node-a".to_owned());
    });
    pods.wait_converged(&["default/p"], |_| Ok(())).await;
    // Out of the selection: DELETED for the node-a watch.
    server.update_pod("default", "p", |p| {
        p.spec.as_mut().unwrap().node_name = Some("node-b".to_owned());
    });
    pods.wait_converged(&[], |_| Ok(())).await;
    let seen = pods.seen();
    assert!(seen.contains(&"apply default/p".to_owned()), "{seen:?}");
    assert!(seen.contains(&"delete default/p".to_owned()), "{seen:?}");
}

#[tokio::test]
async fn watcher_relists_after_compaction_and_dropped_watches() {
    let server = FakeApiServer::start().await;
    server.add_pod(pod_with_annotation("default", "a1", "node-a", "one"));
    server.add_pod(new_pod("default", "a2", "node-a"));
    let pods = node_a_pods(server.client().await);
    pods.wait_converged(
        &["default/a1", "default/a2"],
        has_annotation("default", "a1", "one"),
    )
    .await;
    let lists = server.list_count();

    server.compact();
    // A change the open watch still delivers (compaction does not end open watches).
    server.update_pod("default", "a1", set_annotation("two"));
    pods.wait_converged(
        &["default/a1", "default/a2"],
        has_annotation("default", "a1", "two"),
    )
    .await;
    assert_eq!(
        server.list_count(),
        lists,
        "compaction alone made the watcher re-list"
    );

    // Compacted again and the watch cut: the watcher resumes from a compacted
    // resourceVersion, gets 410 and has to re-list. Changes made meanwhile must show.
    server.compact();
    server.drop_watches();
    server.add_pod(new_pod("default", "a3", "node-a"));
    server.delete_pod("default", "a2");
    server.update_pod("default", "a1", set_annotation("three"));
    pods.wait_converged(
        &["default/a1", "default/a3"],
        has_annotation("default", "a1", "three"),
    )
    .await;
    wait_for("a re-list", DEADLINE, || {
        (server.list_count() > lists && server.expired_count() >= 1)
            .then_some(())
            .ok_or(format!(
                "lists {} (before {lists}), 410s {}; {:?}",
                server.list_count(),
                server.expired_count(),
                server.requests()
            ))
    })
    .await;

    // And it goes on watching from the new list.
    server.add_pod(new_pod("default", "a4", "node-a"));
    pods.wait_converged(&["default/a1", "default/a3", "default/a4"], |_| Ok(()))
        .await;
}

#[tokio::test]
async fn watcher_recovers_when_the_server_restarts() {
    let server = FakeApiServer::start().await;
    server.add_pod(pod_with_annotation("default", "a1", "node-a", "one"));
    server.add_pod(new_pod("default", "a2", "node-a"));
    let pods = node_a_pods(server.client().await);
    pods.wait_converged(&["default/a1", "default/a2"], |_| Ok(()))
        .await;
    let lists = server.list_count();

    server.stop().await;
    assert!(!server.is_running());
    server.update_pod("default", "a1", set_annotation("two"));
    server.delete_pod("default", "a2");
    server.add_pod(new_pod("default", "a3", "node-a"));
    server.add_pod(new_pod("default", "b1", "node-b"));
    // The watcher notices the outage (its connection is gone, reconnects are refused)
    // before the server comes back.
    wait_for("the watcher to see the outage", DEADLINE, || {
        let seen = pods.seen();
        if seen.iter().any(|e| e.starts_with("error")) {
            Ok(())
        } else {
            Err(format!("{seen:?}"))
        }
    })
    .await;
    server.restart().await;
    assert!(server.is_running());

    pods.wait_converged(
        &["default/a1", "default/a3"],
        has_annotation("default", "a1", "two"),
    )
    .await;
    // The history survived the restart: the watcher resumed its watch, no re-list needed.
    assert_eq!(server.list_count(), lists, "{:?}", server.requests());
    let seen = pods.seen();
    assert!(
        seen.iter().any(|e| e.starts_with("error")),
        "no outage seen: {seen:?}"
    );
    assert!(seen.iter().all(|e| !e.contains("/b")), "{seen:?}");
}

#[tokio::test]
async fn events_created_through_kube_are_stored() {
    let server = FakeApiServer::start().await;
    let client = server.client().await;
    let pod = server.add_pod(new_pod("team-a", "web", "node-a"));

    // v1 Event through Api::create.
    let events: Api<CoreEvent> = Api::namespaced(client.clone(), "team-a");
    let created = events
        .create(
            &PostParams::default(),
            &CoreEvent {
                metadata: kube::api::ObjectMeta {
                    generate_name: Some("web.".to_owned()),
                    ..Default::default()
                },
                involved_object: ObjectReference {
                    kind: Some("Pod".to_owned()),
                    namespace: Some("team-a".to_owned()),
                    name: Some("web".to_owned()),
                    uid: pod.metadata.uid.clone(),
                    ..Default::default()
                },
                reason: Some("CredentialsDenied".to_owned()),
                message: Some("no role for this pod".to_owned()),
                type_: Some("Warning".to_owned()),
                ..Default::default()
            },
        )
        .await
        .expect("create v1 Event");
    assert!(created.name_any().starts_with("web."));
    assert_eq!(created.namespace().as_deref(), Some("team-a"));

    // events.k8s.io/v1 through the runtime's Recorder, twice: the second is a series PATCH.
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "interceptor".to_owned(),
            instance: Some("node-a".to_owned()),
        },
    );
    let reference = ObjectReference {
        api_version: Some("v1".to_owned()),
        kind: Some("Pod".to_owned()),
        namespace: Some("team-a".to_owned()),
        name: Some("web".to_owned()),
        uid: pod.metadata.uid.clone(),
        ..Default::default()
    };
    let recorded = RecordedEvent {
        type_: EventType::Normal,
        reason: "CredentialsServed".to_owned(),
        note: Some("role arn:aws:iam::123456789012:role/web".to_owned()),
        action: "Serve".to_owned(),
        secondary: None,
    };
    recorder
        .publish(&recorded, &reference)
        .await
        .expect("publish");
    recorder
        .publish(&recorded, &reference)
        .await
        .expect("publish again");

    let stored = server.events();
    assert_eq!(stored.len(), 2, "{stored:#?}");
    let core = &stored[0];
    assert_eq!(core["apiVersion"], "v1");
    assert_eq!(core["reason"], "CredentialsDenied");
    assert_eq!(core["involvedObject"]["name"], "web");
    let series = &stored[1];
    assert_eq!(series["apiVersion"], "events.k8s.io/v1");
    assert_eq!(series["metadata"]["namespace"], "team-a");
    assert_eq!(series["reason"], "CredentialsServed");
    assert_eq!(series["reportingController"], "interceptor");
    assert_eq!(series["regarding"]["uid"], json!(pod.metadata.uid));
    assert_eq!(series["series"]["count"], 2, "{series:#}");

    // And readable through the API too.
    let listed: Api<EventsV1> = Api::namespaced(client.clone(), "team-a");
    let listed = listed.list(&ListParams::default()).await.expect("list");
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].note, recorded.note);
    let all: Api<CoreEvent> = Api::all(client);
    let all = all
        .list(&ListParams::default().fields("involvedObject.name=web"))
        .await
        .expect("list");
    assert_eq!(all.items.len(), 1);
}

#[tokio::test]
async fn namespace_watch_sees_annotation_changes() {
    let server = FakeApiServer::start().await;
    server.add_namespace(new_namespace("default"));
    let client = server.client().await;
    let namespaces = Reflector::start(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    );
    namespaces.wait_converged(&["/default"], |_| Ok(())).await;

    let mut team = new_namespace("team-a");
    team.annotations_mut()
        .insert(ANNOTATION.to_owned(), "arn:aws:iam::1:role/a".to_owned());
    server.add_namespace(team);
    let role = |want: &'static str| {
        move |r: &Reflector<Namespace>| {
            let got = r.get("", "team-a").and_then(|n| annotation(n.as_ref()));
            (got.as_deref() == Some(want))
                .then_some(())
                .ok_or(format!("team-a annotation {got:?}, want {want:?}"))
        }
    };
    namespaces
        .wait_converged(&["/default", "/team-a"], role("arn:aws:iam::1:role/a"))
        .await;
    server.update_namespace("team-a", set_annotation("arn:aws:iam::1:role/b"));
    namespaces
        .wait_converged(&["/default", "/team-a"], role("arn:aws:iam::1:role/b"))
        .await;
    server.delete_namespace("team-a");
    namespaces.wait_converged(&["/default"], |_| Ok(())).await;

    // GET of one namespace, as the apiserver fills it in, and 404 as the apiserver says it.
    let api: Api<Namespace> = Api::all(client);
    let default = api.get("default").await.expect("get default");
    assert_eq!(
        default
            .labels()
            .get("kubernetes.io/metadata.name")
            .map(String::as_str),
        Some("default")
    );
    assert_eq!(
        default.status.and_then(|s| s.phase).as_deref(),
        Some("Active")
    );
    match api.get("team-a").await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 404);
            assert_eq!(status.reason, "NotFound");
            assert_eq!(status.message, "namespaces \"team-a\" not found");
        }
        other => panic!("get of a deleted namespace: {other:?}"),
    }
}

#[tokio::test]
async fn metadata_only_namespace_watch() {
    let server = FakeApiServer::start().await;
    let mut team = new_namespace("team-a");
    team.annotations_mut()
        .insert(ANNOTATION.to_owned(), "a".to_owned());
    server.add_namespace(team);
    let client = server.client().await;
    let api: Api<kube::core::PartialObjectMeta<Namespace>> = Api::all(client);
    let list = api
        .list(&ListParams::default())
        .await
        .expect("metadata list");
    assert_eq!(list.items.len(), 1);
    assert_eq!(
        list.items[0]
            .annotations()
            .get(ANNOTATION)
            .map(String::as_str),
        Some("a")
    );

    let stream = watcher(api, watcher::Config::default()).touched_objects();
    let mut stream = std::pin::pin!(stream);
    let first = tokio::time::timeout(DEADLINE, stream.try_next())
        .await
        .expect("in time")
        .expect("no error")
        .expect("an object");
    assert_eq!(first.name_any(), "team-a");
    server.update_namespace("team-a", set_annotation("b"));
    let second = tokio::time::timeout(DEADLINE, stream.try_next())
        .await
        .expect("in time")
        .expect("no error")
        .expect("an object");
    assert_eq!(
        second.annotations().get(ANNOTATION).map(String::as_str),
        Some("b")
    );
    let types: BTreeSet<String> = ["PartialObjectMetadata", "PartialObjectMetadataList"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    assert!(types.contains(&second.types.expect("typed").kind));
}

#[tokio::test]
async fn list_pages_and_selectors() {
    let server = FakeApiServer::start().await;
    for i in 0..7 {
        let mut pod = new_pod(
            "default",
            &format!("p{i}"),
            if i % 2 == 0 { "node-a" } else { "node-b" },
        );
        pod.labels_mut().insert(
            "app".to_owned(),
            if i < 3 { "web" } else { "db" }.to_owned(),
        );
        server.add_pod(pod);
    }
    let api: Api<Pod> = Api::namespaced(server.client().await, "default");

    let mut names = Vec::new();
    let mut params = ListParams::default().limit(3);
    let mut pages = 0;
    loop {
        let page = api.list(&params).await.expect("list page");
        pages += 1;
        names.extend(page.items.iter().map(ResourceExt::name_any));
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(names, ["p0", "p1", "p2", "p3", "p4", "p5", "p6"]);

    let names_for = |lp: ListParams| {
        let api = api.clone();
        async move {
            let list = api.list(&lp).await.expect("list");
            list.items
                .iter()
                .map(ResourceExt::name_any)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        names_for(ListParams::default().labels("app=web")).await,
        ["p0", "p1", "p2"]
    );
    assert_eq!(
        names_for(
            ListParams::default()
                .labels("app!=web")
                .fields("spec.nodeName=node-a")
        )
        .await,
        ["p4", "p6"]
    );
    assert_eq!(
        names_for(
            ListParams::default()
                .labels("app in (db,cache)")
                .fields("metadata.name=p3")
        )
        .await,
        ["p3"]
    );
    match api
        .list(&ListParams::default().fields("spec.bogus=1"))
        .await
    {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 400),
        other => panic!("unsupported field selector: {other:?}"),
    }

    // A paging watcher (page_size 2) lists everything.
    let pods = Reflector::start(api.clone(), watcher::Config::default().page_size(2));
    pods.wait_converged(
        &[
            "default/p0",
            "default/p1",
            "default/p2",
            "default/p3",
            "default/p4",
            "default/p5",
            "default/p6",
        ],
        |_| Ok(()),
    )
    .await;
}

#[tokio::test]
async fn raw_watch_protocol() {
    let server = FakeApiServer::start_with(Options {
        bookmark_interval: Duration::from_millis(200),
        ..Options::default()
    })
    .await;
    server.add_pod(new_pod("default", "a1", "node-a"));
    let api: Api<Pod> = Api::all(server.client().await);

    // From "0": the current state as ADDED, BOOKMARKs, closed after timeoutSeconds.
    let params = WatchParams::default()
        .timeout(1)
        .fields("spec.nodeName=node-a");
    let events: Vec<_> = tokio::time::timeout(
        Duration::from_secs(5),
        api.watch(&params, "0")
            .await
            .expect("watch")
            .collect::<Vec<_>>(),
    )
    .await
    .expect("the watch ends after timeoutSeconds");
    let events: Vec<WatchEvent<Pod>> = events.into_iter().map(|e| e.expect("event")).collect();
    assert!(
        matches!(&events[0], WatchEvent::Added(p) if p.name_any() == "a1"),
        "{events:?}"
    );
    let bookmarks: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            WatchEvent::Bookmark(b) => Some(b.metadata.resource_version.clone()),
            _ => None,
        })
        .collect();
    assert!(bookmarks.len() >= 2, "{events:?}");
    assert_eq!(
        bookmarks.last().unwrap(),
        &server.resource_version().to_string()
    );

    // Replay from a resourceVersion: exactly the changes after it.
    let rv = server.resource_version().to_string();
    server.update_pod("default", "a1", set_annotation("x"));
    server.delete_pod("default", "a1");
    let mut stream = api.watch(&params, &rv).await.expect("watch").boxed();
    let first = stream.try_next().await.expect("ok").expect("event");
    assert!(
        matches!(&first, WatchEvent::Modified(p) if annotation(p).as_deref() == Some("x")),
        "{first:?}"
    );
    let second = stream.try_next().await.expect("ok").expect("event");
    assert!(matches!(second, WatchEvent::Deleted(_)), "{second:?}");

    // Compacted: 200 and an ERROR event with 410 Expired.
    server.compact();
    let mut stream = api.watch(&params, &rv).await.expect("watch").boxed();
    match stream.try_next().await.expect("ok").expect("event") {
        WatchEvent::Error(status) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
            assert!(
                status
                    .message
                    .starts_with(&format!("too old resource version: {rv} ("))
            );
        }
        other => panic!("expected 410, got {other:?}"),
    }
    assert!(
        stream.try_next().await.expect("ok").is_none(),
        "the stream ends after the 410"
    );
    assert_eq!(server.expired_count(), 1);
}

#[tokio::test]
async fn open_watch_that_falls_behind_the_history_gets_410() {
    let server = FakeApiServer::start_with(Options {
        history_limit: 3,
        ..Options::default()
    })
    .await;
    let api: Api<Pod> = Api::all(server.client().await);
    let rv = server.resource_version().to_string();
    let mut stream = api
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("watch")
        .boxed();
    // No await in between: the watch cannot keep up, the history (3) overflows.
    for i in 0..5 {
        server.add_pod(new_pod("default", &format!("p{i}"), "node-a"));
    }
    match stream.try_next().await.expect("ok").expect("event") {
        WatchEvent::Error(status) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
        }
        other => panic!("expected 410, got {other:?}"),
    }
    assert!(stream.try_next().await.expect("ok").is_none());
}

#[tokio::test]
async fn streaming_list_watcher() {
    let server = FakeApiServer::start().await;
    server.add_pod(new_pod("default", "a1", "node-a"));
    server.add_pod(new_pod("default", "b1", "node-b"));
    let pods = Reflector::start(
        Api::<Pod>::all(server.client().await),
        watcher::Config::default()
            .fields("spec.nodeName=node-a")
            .streaming_lists(),
    );
    pods.wait_converged(&["default/a1"], |_| Ok(())).await;
    server.add_pod(new_pod("default", "a2", "node-a"));
    pods.wait_converged(&["default/a1", "default/a2"], |_| Ok(()))
        .await;
    assert_eq!(server.list_count(), 0, "a streaming list does not LIST");
    let requests = server.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.contains("sendInitialEvents=true")),
        "{requests:?}"
    );
}

#[tokio::test]
async fn node_taint_removed_by_patch() {
    let server = FakeApiServer::start().await;
    let mut node = new_node("node-a");
    node.spec.as_mut().unwrap().taints = Some(vec![
        Taint {
            key: "example.com/agent-not-ready".to_owned(),
            effect: "NoSchedule".to_owned(),
            ..Default::default()
        },
        Taint {
            key: "other".to_owned(),
            effect: "NoExecute".to_owned(),
            ..Default::default()
        },
    ]);
    server.add_node(node);
    let api: Api<Node> = Api::all(server.client().await);

    let node = api.get("node-a").await.expect("get node");
    let keep: Vec<Taint> = node
        .spec
        .unwrap()
        .taints
        .unwrap()
        .into_iter()
        .filter(|t| t.key != "example.com/agent-not-ready")
        .collect();
    let patched = api
        .patch(
            "node-a",
            &PatchParams::default(),
            &Patch::Strategic(json!({ "spec": { "taints": keep } })),
        )
        .await
        .expect("strategic merge patch");
    let keys = |n: &Node| -> Vec<String> {
        n.spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .map(|t| t.iter().map(|t| t.key.clone()).collect())
            .unwrap_or_default()
    };
    assert_eq!(keys(&patched), ["other"]);
    assert_eq!(keys(&server.node("node-a").unwrap()), ["other"]);

    // JSON patch with a test, and a merge patch with a stale resourceVersion (409).
    let patch: json_patch::Patch = serde_json::from_value(json!([
        { "op": "test", "path": "/spec/taints/0/key", "value": "other" },
        { "op": "remove", "path": "/spec/taints" },
    ]))
    .unwrap();
    let patched = api
        .patch("node-a", &PatchParams::default(), &Patch::<()>::Json(patch))
        .await
        .expect("JSON patch");
    assert!(keys(&patched).is_empty());
    let stale = json!({ "metadata": { "resourceVersion": "1", "labels": { "x": "y" } } });
    match api
        .patch("node-a", &PatchParams::default(), &Patch::Merge(stale))
        .await
    {
        Err(kube::Error::Api(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"))
        }
        other => panic!("stale patch: {other:?}"),
    }
    match api.get("node-b").await {
        Err(kube::Error::Api(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"))
        }
        other => panic!("missing node: {other:?}"),
    }
}

#[tokio::test]
async fn kubeconfig_file_works_with_kube() {
    let server = FakeApiServer::start().await;
    server.add_pod(new_pod("default", "a1", "node-a"));
    let dir = std::env::temp_dir().join(format!("fake-apiserver-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("kubeconfig");
    server.write_kubeconfig(&path).unwrap();
    let kubeconfig = Kubeconfig::read_from(&path).expect("read kubeconfig");
    std::fs::remove_dir_all(&dir).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config");
    assert_eq!(
        config.cluster_url.to_string().trim_end_matches('/'),
        server.url()
    );
    assert_eq!(config.default_namespace, "default");
    let client = Client::try_from(config).expect("client");
    let pods: Api<Pod> = Api::default_namespaced(client);
    let names: Vec<String> = pods
        .list(&ListParams::default())
        .await
        .expect("list")
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    assert_eq!(names, ["a1"]);

    // Unknown paths: a 404 Status.
    let body = raw_http_get(&format!("{}/api/v1/widgets", server.url())).await;
    let status: BTreeMap<String, serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["code"], 404);
    assert_eq!(status["reason"], "NotFound");
}

/// GET over a plain TCP connection (no HTTP client crate needed); returns the body.
async fn raw_http_get(url: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    stream
        .write_all(
            format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
    response.split_once("\r\n\r\n").unwrap().1.to_owned()
}
