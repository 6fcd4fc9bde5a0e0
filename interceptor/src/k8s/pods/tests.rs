use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    api::core::v1::{Pod, PodSpec},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::runtime::watcher::Event;

use super::*;

fn pod(uid: &str, name: &str, role: Option<&str>) -> Pod {
    Pod {
        metadata: ObjectMeta {
            uid: Some(uid.into()),
            name: Some(name.into()),
            namespace: Some("team-a".into()),
            annotations: role
                .map(|role| BTreeMap::from([("iam.amazonaws.com/role".into(), role.into())])),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            host_network: Some(name.starts_with("host")),
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

#[test]
fn applies_adds_updates_and_deletes() {
    let store = PodStore::new();
    assert_eq!(store.get("u1"), Lookup::Unknown);
    store.apply(Event::Apply(pod("u1", "web", Some("role-a"))));
    let Lookup::Found(found) = store.get("u1") else {
        panic!("u1 not found")
    };
    assert_eq!(found.key(), "team-a/web");
    assert_eq!(found.annotations["iam.amazonaws.com/role"], "role-a");
    store.apply(Event::Apply(pod("u1", "web", Some("role-b"))));
    let Lookup::Found(found) = store.get("u1") else {
        panic!("u1 not found")
    };
    assert_eq!(found.annotations["iam.amazonaws.com/role"], "role-b");
    store.apply(Event::Delete(pod("u1", "web", Some("role-b"))));
    assert_eq!(store.get("u1"), Lookup::Deleted);
    // A late Apply for a deleted pod does not resurrect it.
    store.apply(Event::Apply(pod("u1", "web", Some("role-b"))));
    assert_eq!(store.get("u1"), Lookup::Deleted);
}

#[test]
fn relist_replaces_the_store_and_marks_missing_pods_deleted() {
    let store = PodStore::new();
    assert!(!store.is_synced());
    store.apply(Event::Init);
    store.apply(Event::InitApply(pod("u1", "a", None)));
    store.apply(Event::InitApply(pod("u2", "b", None)));
    assert_eq!(
        store.get("u1"),
        Lookup::Unknown,
        "nothing applied before InitDone"
    );
    store.apply(Event::InitDone);
    assert!(store.is_synced());
    assert_eq!(store.len(), 2);
    // A re-list after a 410 in which u1 is gone and u3 is new.
    store.apply(Event::Init);
    store.apply(Event::InitApply(pod("u2", "b", None)));
    store.apply(Event::InitApply(pod("u3", "c", None)));
    assert_eq!(
        store.len(),
        2,
        "the old content is served during the re-list"
    );
    store.apply(Event::InitDone);
    assert_eq!(store.get("u1"), Lookup::Deleted);
    assert!(matches!(store.get("u3"), Lookup::Found(_)));
}

#[test]
fn objects_without_identity_are_ignored() {
    let store = PodStore::new();
    let mut nameless = pod("u1", "a", None);
    nameless.metadata.name = None;
    store.apply(Event::Apply(nameless));
    assert!(store.is_empty());
}

/// On tokio's paused clock: time moves only when every task waits, straight to the next
/// timer, so the bound is checked exactly and the waiter is known to be waiting.
#[tokio::test(start_paused = true)]
async fn waits_a_bounded_time_for_a_pod_that_is_not_known_yet() {
    let store = PodStore::new();
    let waiter = {
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.wait_for("late", Duration::from_secs(5)).await })
    };
    // The waiter has run and is waiting on the store after a second; the pod arrives.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiter.is_finished());
    store.apply(Event::Apply(pod("late", "new", None)));
    assert!(matches!(waiter.await.unwrap(), Lookup::Found(_)));
    let started = tokio::time::Instant::now();
    assert_eq!(
        store.wait_for("never", Duration::from_millis(100)).await,
        Lookup::Unknown
    );
    assert_eq!(started.elapsed(), Duration::from_millis(100));
}

#[test]
fn changes_are_broadcast() {
    let store = PodStore::new();
    let mut changes = store.subscribe();
    store.apply(Event::Apply(pod("u1", "a", Some("r"))));
    store.apply(Event::Apply(pod("u1", "a", Some("r"))));
    store.apply(Event::Delete(pod("u1", "a", Some("r"))));
    assert!(matches!(changes.try_recv(), Ok(PodChange::Applied(p)) if p.uid == "u1"));
    assert!(matches!(changes.try_recv(), Ok(PodChange::Deleted(p)) if p.uid == "u1"));
    assert!(
        changes.try_recv().is_err(),
        "an unchanged re-apply is not a change"
    );
}
