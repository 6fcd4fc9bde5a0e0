use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    api::core::v1::{Pod, PodSpec},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::runtime::watcher::Event;

use super::*;

/// `pod`, as the agent decodes it from the API server's JSON.
fn view(pod: &Pod) -> PodView {
    serde_json::from_value(serde_json::to_value(pod).unwrap()).unwrap()
}

fn pod(uid: &str, name: &str, role: Option<&str>) -> PodView {
    view(&Pod {
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
    })
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

/// A pod as kube-apiserver sends it, with the fields the agent skips (managedFields,
/// volumes, tolerations, conditions) around the ones it keeps.
#[test]
fn a_full_pod_decodes_to_what_the_agent_keeps() {
    let json = serde_json::json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": "web-0",
            "namespace": "team-a",
            "uid": "0b0e4c9e-6a2f-4d51-9a7e-1f0c2d3e4f50",
            "resourceVersion": "4711",
            "labels": {"app": "web"},
            "annotations": {"iam.amazonaws.com/role": "role-a", "other": "x"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet",
                                 "name": "web", "uid": "u", "controller": true}],
            "managedFields": [{"manager": "kubelet", "operation": "Update",
                               "apiVersion": "v1", "fieldsType": "FieldsV1",
                               "fieldsV1": {"f:status": {"f:conditions": {".": {}}}}}]
        },
        "spec": {
            "serviceAccountName": "web",
            "hostNetwork": true,
            "volumes": [{"name": "kube-api-access", "projected": {"sources": []}}],
            "initContainers": [{"name": "setup", "image": "busybox"}],
            "containers": [{"name": "app", "image": "nginx",
                            "ports": [{"containerPort": 80}],
                            "resources": {"limits": {"cpu": "1"}}}],
            "ephemeralContainers": [{"name": "debug", "image": "busybox"}],
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"}]
        },
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}],
            "podIP": "10.0.0.7",
            "initContainerStatuses": [{"name": "setup", "ready": true, "restartCount": 0,
                                       "image": "busybox", "imageID": "",
                                       "containerID": "containerd://AA11"}],
            "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0,
                                   "image": "nginx", "imageID": "",
                                   "containerID": "cri-o://bb22"},
                                  {"name": "waiting", "ready": false, "restartCount": 0,
                                   "image": "nginx", "imageID": ""}]
        }
    });
    let pod: PodView = serde_json::from_value(json).unwrap();
    assert_eq!(pod.metadata.resource_version.as_deref(), Some("4711"));
    let info = PodInfo::from_view(pod).unwrap();
    assert_eq!(
        info,
        PodInfo {
            uid: "0b0e4c9e-6a2f-4d51-9a7e-1f0c2d3e4f50".into(),
            namespace: "team-a".into(),
            name: "web-0".into(),
            annotations: BTreeMap::from([
                ("iam.amazonaws.com/role".into(), "role-a".into()),
                ("other".into(), "x".into()),
            ]),
            host_network: true,
            service_account: Some("web".into()),
            containers: vec!["app".into(), "setup".into(), "debug".into()],
            container_ids: vec![
                ("bb22".into(), "app".into()),
                ("aa11".into(), "setup".into())
            ],
        }
    );
}

/// Fields the API server may send as `null` or leave out decode as absent.
#[test]
fn a_sparse_pod_decodes() {
    let json = serde_json::json!({
        "metadata": {"name": "a", "namespace": "n", "uid": "u", "annotations": null},
        "spec": {"containers": null, "hostNetwork": null},
        "status": null
    });
    let info = PodInfo::from_view(serde_json::from_value(json).unwrap()).unwrap();
    assert!(info.annotations.is_empty() && info.containers.is_empty());
    assert!(!info.host_network && info.container_ids.is_empty());
}
