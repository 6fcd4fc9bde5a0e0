//! deploy/'s RBAC against a real kube-apiserver (`--authorization-mode=Node,RBAC`): every
//! permission the ClusterRole grants is needed by a named behaviour of the agent (taking it
//! away makes that behaviour fail with 403), the agent's own token works for all of them,
//! and anything outside the rules is refused with 403, not served.

use futures::StreamExt;
use interceptor::k8s::node::{STARTUP_TAINT, remove_taint};
use interceptor_tests::control_plane::{AGENT_NAMESPACE, ControlPlane, Scope};
use k8s_openapi::api::{
    core::v1::{ConfigMap, Namespace, ObjectReference, Pod, Secret, ServiceAccount},
    rbac::v1::ClusterRole,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, PostParams, WatchParams},
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use serde_json::{Value, json};

/// One permission: (API group, resource, verb).
type Grant = (String, String, String);

/// The agent's behaviours, each named, with the permission it needs; run with `client`.
/// Every behaviour is the request the agent makes (the same code where it is a function
/// of its own).
const BEHAVIOURS: [(&str, (&str, &str, &str)); 10] = [
    ("the pod watch lists its node's pods", ("", "pods", "list")),
    ("the pod watch follows changes", ("", "pods", "watch")),
    (
        "namespace restrictions list namespaces",
        ("", "namespaces", "list"),
    ),
    (
        "namespace restrictions follow changes",
        ("", "namespaces", "watch"),
    ),
    (
        "the startup taint's removal reads the node",
        ("", "nodes", "get"),
    ),
    (
        "the startup taint's removal patches the node",
        ("", "nodes", "patch"),
    ),
    (
        "a refusal is posted as an Event",
        ("events.k8s.io", "events", "create"),
    ),
    (
        "a repeated refusal updates its Event series",
        ("events.k8s.io", "events", "patch"),
    ),
    (
        "a pod's ServiceAccount is listed by name (roles on ServiceAccounts)",
        ("", "serviceaccounts", "list"),
    ),
    (
        "a pod's ServiceAccount is followed (roles on ServiceAccounts)",
        ("", "serviceaccounts", "watch"),
    ),
];

/// Runs behaviour `index` as `client`; `Err(code)` with the HTTP status it failed with.
async fn behave(index: usize, client: &Client, scope: &Scope<'_>, pod: &Pod) -> Result<(), u16> {
    let fields = ListParams::default().fields(&format!("spec.nodeName={}", scope.node));
    match index {
        0 => Api::<Pod>::all(client.clone())
            .list(&fields)
            .await
            .map(drop)
            .map_err(code),
        1 => {
            let params = WatchParams::default()
                .fields(&format!("spec.nodeName={}", scope.node))
                .timeout(1);
            first_answer(Api::<Pod>::all(client.clone()).watch(&params, "0").await).await
        }
        2 => Api::<Namespace>::all(client.clone())
            .list_metadata(&ListParams::default())
            .await
            .map(drop)
            .map_err(code),
        3 => {
            first_answer(
                Api::<Namespace>::all(client.clone())
                    .watch_metadata(&WatchParams::default().timeout(1), "0")
                    .await,
            )
            .await
        }
        4 | 5 => {
            // The taint is put back first, so each run has one to remove.
            scope
                .plane
                .kubectl(&[
                    "taint",
                    "nodes",
                    &scope.node,
                    &format!("{STARTUP_TAINT}=:NoSchedule"),
                    "--overwrite",
                ])
                .unwrap();
            match remove_taint(client, &scope.node, STARTUP_TAINT).await {
                Ok(true) => Ok(()),
                Ok(false) => panic!("the taint was not there"),
                Err(error) => Err(code(error)),
            }
        }
        6 | 7 => {
            let recorder = Recorder::new(
                client.clone(),
                Reporter {
                    controller: "interceptor".into(),
                    instance: None,
                },
            );
            let event = Event {
                type_: EventType::Warning,
                reason: format!("RbacProbe{index}"),
                note: Some("probe".into()),
                action: "Refuse".into(),
                secondary: None,
            };
            let reference = ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                namespace: pod.metadata.namespace.clone(),
                uid: pod.metadata.uid.clone(),
                ..ObjectReference::default()
            };
            recorder.publish(&event, &reference).await.map_err(code)?;
            if index == 7 {
                // The same event again: kube's recorder patches the series.
                recorder.publish(&event, &reference).await.map_err(code)?;
            }
            Ok(())
        }
        8 => Api::<ServiceAccount>::namespaced(client.clone(), namespace_of(pod))
            .list_metadata(&ListParams::default().fields("metadata.name=default"))
            .await
            .map(drop)
            .map_err(code),
        9 => {
            let params = WatchParams::default()
                .fields("metadata.name=default")
                .timeout(1);
            first_answer(
                Api::<ServiceAccount>::namespaced(client.clone(), namespace_of(pod))
                    .watch_metadata(&params, "0")
                    .await,
            )
            .await
        }
        _ => unreachable!(),
    }
}

/// The HTTP status the server refused a request with; panics on anything but an API
/// answer.
fn code(error: kube::Error) -> u16 {
    match error {
        kube::Error::Api(status) => status.code,
        other => panic!("not an API answer: {other}"),
    }
}

/// A watch as the agent starts one: refused with `Err(code)` when it starts or with its
/// first answer, `Ok` otherwise.
async fn first_answer<T>(
    watch: kube::Result<impl futures::Stream<Item = kube::Result<T>>>,
) -> Result<(), u16> {
    let mut stream = std::pin::pin!(watch.map_err(code)?);
    match stream.next().await {
        Some(Err(error)) => Err(code(error)),
        _ => Ok(()),
    }
}

fn namespace_of(pod: &Pod) -> &str {
    pod.metadata.namespace.as_deref().expect("a namespaced pod")
}

/// The permissions a ClusterRole grants, one per (group, resource, verb).
fn grants(role: &ClusterRole) -> Vec<Grant> {
    let mut out = Vec::new();
    for rule in role.rules.iter().flatten() {
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    out.push((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    out
}

fn grant_of(behaviour: (&str, &str, &str)) -> Grant {
    (
        behaviour.0.to_owned(),
        behaviour.1.to_owned(),
        behaviour.2.to_owned(),
    )
}

/// A ServiceAccount bound to a ClusterRole granting exactly `grants`; a client with its
/// token (from the TokenRequest API).
async fn client_with(plane: &ControlPlane, name: &str, grants: &[Grant]) -> Client {
    let rules: Vec<Value> = grants
        .iter()
        .map(|(group, resource, verb)| {
            json!({ "apiGroups": [group], "resources": [resource], "verbs": [verb] })
        })
        .collect();
    let manifest = json!({ "apiVersion": "v1", "kind": "List", "items": [
        { "apiVersion": "v1", "kind": "ServiceAccount",
          "metadata": { "name": name, "namespace": AGENT_NAMESPACE } },
        { "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
          "metadata": { "name": name }, "rules": rules },
        { "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
          "metadata": { "name": name },
          "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name },
          "subjects": [{ "kind": "ServiceAccount", "name": name, "namespace": AGENT_NAMESPACE }] },
    ]});
    let file = std::env::temp_dir().join(format!(
        "interceptor-rbac-{}-{name}.json",
        std::process::id()
    ));
    std::fs::write(&file, manifest.to_string()).unwrap();
    plane
        .kubectl(&["apply", "-f", &file.display().to_string()])
        .unwrap();
    let _ = std::fs::remove_file(&file);
    let token = plane
        .kubectl(&["create", "token", name, "-n", AGENT_NAMESPACE])
        .unwrap();
    plane.client_with_token(token.trim()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_rbac_is_exactly_what_the_agent_needs() {
    let Some(plane) = ControlPlane::shared("deploys_rbac_is_exactly_what_the_agent_needs") else {
        return;
    };
    let scope = plane.scope("rbac");
    scope.add_node(&[]).await;
    let namespace = scope.namespace_name("team");
    scope.namespace(&namespace, &[]).await;
    let pod = scope.add_pod(&namespace, "app", &[]).await;

    // Every permission deploy/ grants has a behaviour that needs it, and no behaviour
    // needs one it does not grant.
    let role = Api::<ClusterRole>::all(plane.client().await)
        .get("interceptor")
        .await
        .unwrap();
    let granted = grants(&role);
    let needed: Vec<Grant> = BEHAVIOURS
        .iter()
        .map(|(_, grant)| grant_of(*grant))
        .collect();
    let mut sorted = granted.clone();
    sorted.sort();
    let mut needed_sorted = needed.clone();
    needed_sorted.sort();
    assert_eq!(
        sorted, needed_sorted,
        "deploy/'s ClusterRole must grant exactly what the named behaviours need"
    );

    // With the agent's own token (deploy/'s binding), every behaviour works.
    let agent = plane.agent_client().await;
    for (index, (name, _)) in BEHAVIOURS.iter().enumerate() {
        assert_eq!(behave(index, &agent, &scope, &pod).await, Ok(()), "{name}");
    }

    // Without any one permission, the behaviour that needs it is refused.
    for (index, (name, grant)) in BEHAVIOURS.iter().enumerate() {
        let missing = grant_of(*grant);
        let rest: Vec<Grant> = granted.iter().filter(|g| **g != missing).cloned().collect();
        let client = client_with(plane, &format!("{}-minus-{index}", scope.node), &rest).await;
        assert_eq!(
            behave(index, &client, &scope, &pod).await,
            Err(403),
            "{name} must need {missing:?}"
        );
    }

    // Outside the rules: refused, not served.
    let refused = |what: &str, result: Result<(), kube::Error>| match result {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => panic!("{what}: expected 403, got {other:?}"),
    };
    refused(
        "reading secrets",
        Api::<Secret>::all(agent.clone())
            .list(&ListParams::default())
            .await
            .map(drop),
    );
    refused(
        "reading config maps",
        Api::<ConfigMap>::namespaced(agent.clone(), &namespace)
            .list(&ListParams::default())
            .await
            .map(drop),
    );
    refused(
        "creating a pod",
        Api::<Pod>::namespaced(agent.clone(), &namespace)
            .create(
                &PostParams::default(),
                &interceptor_tests::objects::new_pod(&namespace, "intruder", &scope.node),
            )
            .await
            .map(drop),
    );
    refused(
        "deleting a pod",
        Api::<Pod>::namespaced(agent.clone(), &namespace)
            .delete("app", &DeleteParams::default())
            .await
            .map(drop),
    );
    refused(
        "reading one pod",
        Api::<Pod>::namespaced(agent.clone(), &namespace)
            .get("app")
            .await
            .map(drop),
    );
    refused(
        "deleting its node",
        Api::<k8s_openapi::api::core::v1::Node>::all(agent.clone())
            .delete(&scope.node, &DeleteParams::default())
            .await
            .map(drop),
    );
    refused(
        "core/v1 Events",
        Api::<k8s_openapi::api::core::v1::Event>::namespaced(agent, &namespace)
            .list(&ListParams::default())
            .await
            .map(drop),
    );
}
