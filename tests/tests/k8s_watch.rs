//! The agent's pod and namespace stores, fed by the real `kube` client from the test API
//! server: node scoping, changes, deletes, 410 re-lists, API server restarts, Events.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use interceptor::k8s::{self, EventSink, Lookup, NamespaceStore, PodStore, events};
use interceptor_tests::apiserver::{FakeApiServer, new_namespace, new_pod, wait_for};

const WAIT: Duration = Duration::from_secs(10);

fn with_uid(
    mut pod: k8s_openapi::api::core::v1::Pod,
    uid: &str,
) -> k8s_openapi::api::core::v1::Pod {
    pod.metadata.uid = Some(uid.into());
    pod
}

fn role_of(store: &PodStore, uid: &str) -> Result<Option<String>, String> {
    match store.get(uid) {
        Lookup::Found(pod) => Ok(pod.annotations.get("iam.amazonaws.com/role").cloned()),
        other => Err(format!("{uid}: {other:?}")),
    }
}

struct Agent {
    pods: Arc<PodStore>,
    namespaces: Arc<NamespaceStore>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn agent(server: &FakeApiServer, node: &str) -> Agent {
    let dir = std::env::temp_dir().join(format!("interceptor-kubeconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{}.yaml", server.addr().port()));
    server.write_kubeconfig(&path).unwrap();
    // The agent's own client construction path (--kubeconfig).
    let client = k8s::client(Some(&path))
        .await
        .expect("client from kubeconfig");
    let (pods, namespaces) = (PodStore::new(), NamespaceStore::new());
    let tasks = vec![
        tokio::spawn(k8s::pods::watch(client.clone(), node.into(), pods.clone())),
        tokio::spawn(k8s::namespaces::watch(client, namespaces.clone())),
    ];
    Agent {
        pods,
        namespaces,
        tasks,
    }
}

#[tokio::test]
async fn node_scoped_pods_follow_adds_changes_and_deletes() {
    let server = FakeApiServer::start().await;
    let mut pod = with_uid(new_pod("team-a", "web", "node-a"), "uid-web");
    pod.metadata.annotations = Some(BTreeMap::from([(
        "iam.amazonaws.com/role".into(),
        "role-a".into(),
    )]));
    server.add_pod(pod);
    server.add_pod(with_uid(new_pod("team-a", "elsewhere", "node-b"), "uid-b"));
    let agent = agent(&server, "node-a").await;
    tokio::time::timeout(WAIT, agent.pods.wait_synced())
        .await
        .expect("pod store syncs");
    assert_eq!(role_of(&agent.pods, "uid-web"), Ok(Some("role-a".into())));
    assert_eq!(
        agent.pods.get("uid-b"),
        Lookup::Unknown,
        "pods of other nodes are not watched"
    );

    server.update_pod("team-a", "web", |pod| {
        pod.metadata.annotations = Some(BTreeMap::from([(
            "iam.amazonaws.com/role".into(),
            "role-b".into(),
        )]));
    });
    wait_for("the relabelled role", WAIT, || {
        match role_of(&agent.pods, "uid-web")? {
            Some(role) if role == "role-b" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // A pod created after the start is waited for by a request that races its event.
    let waiter = {
        let pods = agent.pods.clone();
        tokio::spawn(async move { pods.wait_for("uid-new", Duration::from_secs(5)).await })
    };
    server.add_pod(with_uid(new_pod("team-a", "new", "node-a"), "uid-new"));
    assert!(matches!(waiter.await.unwrap(), Lookup::Found(_)));

    server.delete_pod("team-a", "web");
    wait_for("the delete", WAIT, || match agent.pods.get("uid-web") {
        Lookup::Deleted => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .await;
}

#[tokio::test]
async fn stores_survive_expiry_and_api_server_restarts() {
    let server = FakeApiServer::start().await;
    server.add_pod(with_uid(new_pod("ns", "a", "node-a"), "uid-a"));
    server.add_pod(with_uid(new_pod("ns", "b", "node-a"), "uid-b"));
    let agent = agent(&server, "node-a").await;
    tokio::time::timeout(WAIT, agent.pods.wait_synced())
        .await
        .expect("sync");
    let lists = server.list_count();

    // 410 Gone: history compacted while a pod was deleted and another added.
    server.delete_pod("ns", "a");
    server.add_pod(with_uid(new_pod("ns", "c", "node-a"), "uid-c"));
    server.compact();
    server.drop_watches();
    wait_for("the re-list after 410", WAIT, || {
        match (
            agent.pods.get("uid-a"),
            agent.pods.get("uid-c"),
            server.list_count() > lists,
        ) {
            (Lookup::Deleted, Lookup::Found(_), true) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(
        matches!(agent.pods.get("uid-b"), Lookup::Found(_)),
        "kept through the re-list"
    );

    // API server down: the store keeps serving; back up: it converges.
    server.stop().await;
    assert!(matches!(agent.pods.get("uid-b"), Lookup::Found(_)));
    server.add_pod(with_uid(new_pod("ns", "d", "node-a"), "uid-d"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        matches!(agent.pods.get("uid-b"), Lookup::Found(_)),
        "served while the API is down"
    );
    server.restart().await;
    wait_for(
        "the pod created while the API was down",
        WAIT,
        || match agent.pods.get("uid-d") {
            Lookup::Found(_) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
}

#[tokio::test]
async fn namespace_annotations_are_followed() {
    let server = FakeApiServer::start().await;
    let mut namespace = new_namespace("team-a");
    namespace.metadata.annotations = Some(BTreeMap::from([(
        "iam.amazonaws.com/allowed-roles".into(),
        r#"["role-a"]"#.into(),
    )]));
    server.add_namespace(namespace);
    let agent = agent(&server, "node-a").await;
    tokio::time::timeout(WAIT, agent.namespaces.wait_synced())
        .await
        .expect("sync");
    let allowed = |store: &NamespaceStore| {
        store.get("team-a").and_then(|ns| {
            ns.annotations
                .get("iam.amazonaws.com/allowed-roles")
                .cloned()
        })
    };
    assert_eq!(allowed(&agent.namespaces).as_deref(), Some(r#"["role-a"]"#));
    server.update_namespace("team-a", |ns| {
        ns.metadata.annotations = Some(BTreeMap::from([(
            "iam.amazonaws.com/allowed-roles".into(),
            r#"["role-b"]"#.into(),
        )]));
    });
    wait_for("the changed restriction", WAIT, || {
        match allowed(&agent.namespaces) {
            Some(value) if value.contains("role-b") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

#[tokio::test]
async fn refusals_become_rate_limited_events_on_the_pod() {
    let server = FakeApiServer::start().await;
    server.add_pod(with_uid(new_pod("team-a", "web", "node-a"), "uid-web"));
    let agent = agent(&server, "node-a").await;
    tokio::time::timeout(WAIT, agent.pods.wait_synced())
        .await
        .expect("sync");
    let Lookup::Found(pod) = agent.pods.get("uid-web") else {
        panic!("pod not in store")
    };
    let sink = EventSink::new(
        Some(server.client().await),
        Some("node-a".into()),
        events::Limits::default(),
    );
    let message =
        "role arn:aws:iam::123456789012:role/admin is not allowed in namespace team-a".to_owned();
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
    let event = wait_for("the event", WAIT, || {
        let events = server.events();
        match events.len() {
            1 => Ok(events[0].clone()),
            n => Err(format!("{n} events: {events:?}")),
        }
    })
    .await;
    assert_eq!(event["reason"], "RoleNotAllowed");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["regarding"]["uid"], "uid-web");
    assert!(
        event["note"]
            .as_str()
            .unwrap()
            .contains("not allowed in namespace team-a")
    );
    // The 20 repeats were answered Duplicate, a decision taken before any post is
    // started: the one event the server holds is all there will be.
    assert_eq!(
        server.events().len(),
        1,
        "a retrying SDK must not flood the API server"
    );
}
