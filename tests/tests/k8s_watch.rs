//! The agent's pod and namespace stores, fed by its own watch code (`k8s::pods::watch`,
//! `k8s::namespaces::watch`, the client from `--kubeconfig` with its ServiceAccount's
//! token) from a real kube-apiserver: node scoping by field selector, changes, a pod bound
//! to the node after its creation (the scheduler's way), deletes, a relist after 410 Gone
//! (etcd compacted while the agent was cut off), Events.
//!
//! What the agent asks is counted on the server's side, from its audit log
//! ([`ControlPlane::agent_requests`]); a [`Forwarder`] the test can cut stands between
//! the agent and the server where the agent must miss changes while the server takes them.
//!
//! Bookmarks: the agent asks for them (`allowWatchBookmarks=true`, checked below). A
//! bookmark only moves the resourceVersion kube-runtime's watcher resumes from; no event
//! reaches the stores. The real server sends one about once a minute (not configurable:
//! the watcher's own `timeoutSeconds`, 290 s, sets the watch's deadline), and on a test
//! cluster's few writes its watch cache still holds the agent's last resourceVersion a
//! minute later, so a resume from a bookmark and one from the last event both succeed
//! without a relist: a test would wait over a minute to see nothing it can tell apart.
//! Receiving bookmarks is therefore not tested here; what they protect (a resume that
//! needs no relist) is, after a short cut below, and the relist when the history is gone.

use std::{sync::Arc, time::Duration};

use interceptor::k8s::{self, EventSink, Lookup, NamespaceStore, PodStore, events};
use interceptor_tests::{
    control_plane::{ControlPlane, Scope, wait_until},
    forwarder::Forwarder,
    objects::{new_pod, wait_for},
};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    api::{PostParams, ResourceExt},
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);
const ROLE: &str = "iam.amazonaws.com/role";
const ALLOWED: &str = "iam.amazonaws.com/allowed-roles";

fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().expect("a UID from the server")
}

fn role_of(store: &PodStore, uid: &str) -> Result<Option<String>, String> {
    match store.get(uid) {
        Lookup::Found(pod) => Ok(pod.annotations.get(ROLE).cloned()),
        other => Err(format!("{uid}: {other:?}")),
    }
}

fn found(store: &PodStore, uid: &str) -> bool {
    matches!(store.get(uid), Lookup::Found(_))
}

/// The agent's watches, in this process, with the agent's ServiceAccount token.
struct Agent {
    pods: Arc<PodStore>,
    namespaces: Arc<NamespaceStore>,
    client: kube::Client,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Starts the agent's watches for `scope`'s node, reaching the server at `via` (a
/// forwarder) or directly; returns once both stores have listed.
async fn agent(scope: &Scope<'_>, via: Option<&Forwarder>) -> Agent {
    let path = std::env::temp_dir().join(format!(
        "interceptor-k8s-watch-{}-{}.kubeconfig",
        std::process::id(),
        scope.node
    ));
    match via {
        Some(forwarder) => scope
            .plane
            .write_agent_kubeconfig_via(&path, &format!("https://{}", forwarder.addr())),
        None => scope.plane.write_agent_kubeconfig(&path),
    }
    .unwrap();
    // The agent's own client construction path (--kubeconfig).
    let client = k8s::client(Some(&path))
        .await
        .expect("client from kubeconfig");
    let (pods, namespaces) = (PodStore::new(), NamespaceStore::new());
    let tasks = vec![
        tokio::spawn(k8s::pods::watch(
            client.clone(),
            scope.node.clone(),
            pods.clone(),
        )),
        tokio::spawn(k8s::namespaces::watch(client.clone(), namespaces.clone())),
    ];
    tokio::time::timeout(WAIT, async {
        pods.wait_synced().await;
        namespaces.wait_synced().await;
    })
    .await
    .expect("the stores sync");
    Agent {
        pods,
        namespaces,
        client,
        tasks,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_scoped_pods_follow_adds_bindings_changes_and_deletes() {
    let test = "node_scoped_pods_follow_adds_bindings_changes_and_deletes";
    let Some(plane) = ControlPlane::shared(test) else {
        return;
    };
    let scope = plane.scope("watch");
    let elsewhere = plane.scope("watch-other");
    let team = scope.namespace_name("team");
    scope.namespace(&team, &[]).await;
    let web = scope.add_pod(&team, "web", &[(ROLE, "role-a")]).await;
    let other = elsewhere
        .add_pod(&team, "elsewhere", &[(ROLE, "role-a")])
        .await;
    let agent = agent(&scope, None).await;
    assert_eq!(role_of(&agent.pods, &uid(&web)), Ok(Some("role-a".into())));
    assert_eq!(
        agent.pods.get(&uid(&other)),
        Lookup::Unknown,
        "pods of other nodes are not watched"
    );

    // The other node's pod changes first, then this node's: the watch delivers in
    // resourceVersion order, so once the second change is seen the first would have been.
    elsewhere
        .update_pod(&team, "elsewhere", |pod| {
            pod.annotations_mut().insert(ROLE.into(), "role-b".into());
        })
        .await;
    scope
        .update_pod(&team, "web", |pod| {
            pod.annotations_mut().insert(ROLE.into(), "role-b".into());
        })
        .await;
    wait_for("the relabelled role", WAIT, || {
        match role_of(&agent.pods, &uid(&web))? {
            Some(role) if role == "role-b" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(
        agent.pods.get(&uid(&other)),
        Lookup::Unknown,
        "a change to another node's pod never reaches the agent"
    );

    // A pod created after the start is waited for by a request that races its event.
    let new = scope.add_pod(&team, "new", &[]).await;
    let waited = tokio::time::timeout(WAIT, agent.pods.wait_for(&uid(&new), WAIT))
        .await
        .expect("the wait ends");
    assert!(matches!(waited, Lookup::Found(_)), "{waited:?}");

    // Created unscheduled, then bound to the node (what the scheduler does): a MODIFIED
    // for the server, an ADDED for the node's watch.
    let mut unscheduled = new_pod(&team, "bound-later", "");
    unscheduled.spec.as_mut().unwrap().node_name = None;
    let unscheduled = scope.create_pod(unscheduled).await;
    let binding = json!({
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": { "name": "bound-later" },
        "target": { "apiVersion": "v1", "kind": "Node", "name": scope.node },
    });
    Api::<Pod>::namespaced(plane.client().await, &team)
        .create_subresource::<_, serde_json::Value>(
            "binding",
            "bound-later",
            &PostParams::default(),
            &binding,
        )
        .await
        .expect("binding the pod to the node");
    wait_for("the pod bound to the node", WAIT, || {
        found(&agent.pods, &uid(&unscheduled))
            .then_some(())
            .ok_or_else(|| format!("{:?}", agent.pods.get(&uid(&unscheduled))))
    })
    .await;

    scope.delete_pod(&team, "web").await;
    wait_for("the delete", WAIT, || match agent.pods.get(&uid(&web)) {
        Lookup::Deleted => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .await;

    // What the agent asked: its node's pods only, one LIST and then a WATCH that asks for
    // bookmarks, and no relist.
    let requests = plane.agent_pod_requests(&scope.node);
    assert_eq!(plane.agent_pod_lists(&scope.node), 1, "{requests:#?}");
    assert!(
        requests.iter().any(|request| request.verb == "watch"
            && request.stage == "ResponseStarted"
            && request.uri.contains("allowWatchBookmarks=true")),
        "{requests:#?}"
    );
}

/// The agent is cut off from the API server (a partition: the server stays up) while a
/// pod is deleted and another created, etcd is compacted and kube-apiserver restarts with
/// an empty watch cache: its watch resumes from a resourceVersion the server no longer
/// has, gets 410 Gone, relists, and the store catches up (the pod deleted meanwhile is
/// `Deleted`, not kept) while it kept serving what it knew all along. A shorter cut,
/// within the server's watch history, resumes the watch without a relist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_after_compaction_relists_and_a_short_cut_resumes() {
    let test = "a_410_after_compaction_relists_and_a_short_cut_resumes";
    let Some(plane) = ControlPlane::private(test) else {
        return;
    };
    let scope = plane.scope("expiry");
    let team = scope.namespace_name("team");
    scope.namespace(&team, &[]).await;
    let a = scope.add_pod(&team, "a", &[]).await;
    let b = scope.add_pod(&team, "b", &[]).await;
    let forwarder = Forwarder::start(plane.addr()).await;
    let agent = agent(&scope, Some(&forwarder)).await;
    assert!(found(&agent.pods, &uid(&a)) && found(&agent.pods, &uid(&b)));
    let lists_before = plane.agent_pod_lists(&scope.node);

    forwarder.cut();
    scope.delete_pod(&team, "a").await;
    let c = scope.add_pod(&team, "c", &[]).await;
    let compacted = plane.compact().unwrap();
    plane.stop_apiserver();
    plane.start_apiserver().unwrap();
    // Cut off, the store serves what it had.
    assert!(found(&agent.pods, &uid(&a)) && found(&agent.pods, &uid(&b)));
    assert_eq!(agent.pods.get(&uid(&c)), Lookup::Unknown);

    forwarder.restore();
    wait_for("the relist after 410", WAIT, || {
        match (
            agent.pods.get(&uid(&a)),
            agent.pods.get(&uid(&c)),
            plane.agent_pod_lists(&scope.node),
        ) {
            (Lookup::Deleted, Lookup::Found(_), lists) if lists > lists_before => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(found(&agent.pods, &uid(&b)), "kept through the relist");
    if let Err(missing) = plane.agent_relisted(&scope.node, lists_before, compacted) {
        panic!("the relist came from a 410: {missing}");
    }

    // A short cut: the server still has the history the watch resumes from.
    let lists_before = plane.agent_pod_lists(&scope.node);
    forwarder.cut();
    let d = scope.add_pod(&team, "d", &[]).await;
    assert_eq!(agent.pods.get(&uid(&d)), Lookup::Unknown);
    forwarder.restore();
    wait_for("the pod created while cut off", WAIT, || {
        found(&agent.pods, &uid(&d))
            .then_some(())
            .ok_or_else(|| format!("{:?}", agent.pods.get(&uid(&d))))
    })
    .await;
    assert_eq!(
        plane.agent_pod_lists(&scope.node),
        lists_before,
        "resumed, not relisted: {:#?}",
        plane.agent_pod_requests(&scope.node)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_annotations_are_followed() {
    let test = "namespace_annotations_are_followed";
    let Some(plane) = ControlPlane::shared(test) else {
        return;
    };
    let scope = plane.scope("namespaces");
    let team = scope.namespace_name("team");
    scope.namespace(&team, &[(ALLOWED, r#"["role-a"]"#)]).await;
    let agent = agent(&scope, None).await;
    let allowed = |store: &NamespaceStore| {
        store
            .get(&team)
            .and_then(|ns| ns.annotations.get(ALLOWED).cloned())
    };
    wait_for("the namespace", WAIT, || match allowed(&agent.namespaces) {
        Some(value) if value == r#"["role-a"]"# => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .await;
    scope
        .update_namespace(&team, |ns| {
            ns.annotations_mut()
                .insert(ALLOWED.into(), r#"["role-b"]"#.into());
        })
        .await;
    wait_for("the changed restriction", WAIT, || {
        match allowed(&agent.namespaces) {
            Some(value) if value.contains("role-b") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_become_rate_limited_events_on_the_pod() {
    let test = "refusals_become_rate_limited_events_on_the_pod";
    let Some(plane) = ControlPlane::shared(test) else {
        return;
    };
    let scope = plane.scope("events");
    let team = scope.namespace_name("team");
    scope.namespace(&team, &[]).await;
    let web = scope.add_pod(&team, "web", &[]).await;
    let agent = agent(&scope, None).await;
    let Lookup::Found(pod) = agent.pods.get(&uid(&web)) else {
        panic!("pod not in store")
    };
    let sink = EventSink::new(
        Some(agent.client.clone()),
        Some(scope.node.clone()),
        events::Limits::default(),
    );
    let message =
        format!("role arn:aws:iam::123456789012:role/admin is not allowed in namespace {team}");
    assert_eq!(
        sink.warn(&pod, "RoleNotAllowed", message.clone()),
        events::Posted::Sent
    );
    for _ in 0..20 {
        assert_eq!(
            sink.warn(&pod, "RoleNotAllowed", message.clone()),
            events::Posted::Duplicate
        );
    }
    let event = wait_until("the event", WAIT, || async {
        let events = scope.events(&team).await;
        match events.as_slice() {
            [one] => Ok(one.clone()),
            _ => Err(format!("{events:?}")),
        }
    })
    .await;
    assert_eq!(event["reason"], "RoleNotAllowed");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["regarding"]["uid"], uid(&web).as_str());
    assert!(
        event["note"]
            .as_str()
            .unwrap()
            .contains(&format!("not allowed in namespace {team}"))
    );
    // The 20 repeats were answered Duplicate, a decision taken before any post is
    // started: the one event the server holds is all there will be.
    assert_eq!(
        scope.events(&team).await.len(),
        1,
        "a retrying SDK must not flood the API server"
    );
}
