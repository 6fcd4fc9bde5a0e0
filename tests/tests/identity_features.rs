//! End to end on the simulated node, with boto3 in pods and the real kube-apiserver (the
//! test binary's shared control plane; pods, ServiceAccounts and the kubelet's status
//! writes go through its API, and the agent's Events are read back from it):
//! per-container roles told apart by the kernel's cgroup of the connecting container,
//! roles from ServiceAccounts (and IRSA's annotation), and Pod Identity-compatible session
//! tags and SourceIdentity as they reach STS (through the counting forwarder in front of
//! moto).
//!
//! What the agent asks the API server for ServiceAccounts is read from the server's own
//! metrics (`apiserver_request_total`, `apiserver_longrunning_requests`), whose `scope`
//! label on an open watch says whether it names one object (`resource`, which a
//! `metadata.name` field selector counts as) or a whole namespace or the cluster. They
//! count every client of the shared plane, so they cannot be pinned to one agent: the
//! test asserts what holds for every agent of the binary while its own runs (no watch of
//! a namespace's ServiceAccounts open; the one cluster-wide watch open is the server's own
//! admission informer's), what holds for its agent (its by-name watches open, no
//! cluster-wide list while it ran: that informer lists only when it starts) and the
//! agent's own count of watches (`interceptor_tracked`).
//! The alternatives were weighed: a forwarder in front of the server sees only TLS unless
//! it terminates it (a second certificate authority for the agent to trust), and the
//! server's audit log needs a change to how the shared plane is started.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use interceptor_tests::{
    Node, Pod,
    clients::boto3,
    cluster::{AGENT_ENV, AgentBuilder, Peers},
    control_plane::{ControlPlane, Scope, wait_until},
    fake_imds::FakeImds,
    moto::MotoServer,
    node::Cgroup,
    objects::new_pod,
    require_root,
    sts_proxy::{Fault, StsProxy},
};
use k8s_openapi::api::core::v1::{Container, ContainerStatus, ServiceAccount};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;

const ROLE: &str = "iam.amazonaws.com/role";

const ACCOUNT_ARN: &str = "arn:aws:sts::123456789012:assumed-role";

/// A second container of `pod`: its own cgroup beside the pod's first one, with its id.
fn extra_container(pod: &Pod, seed: &str) -> (String, Cgroup) {
    let id = format!("{:0>64}", format!("{seed}{}", std::process::id()));
    let cgroup = Cgroup::create(
        pod.pod_slice
            .path
            .join(format!("cri-containerd-{id}.scope")),
    );
    (id, cgroup)
}

/// boto3 run from `cgroup` (a container of `pod` other than its first) in the pod's
/// network: the pod's first container cgroup is swapped with it for the call.
fn boto3_in(pod: &mut Pod, cgroup: &mut Cgroup, sts: &str) -> String {
    std::mem::swap(&mut pod.container, cgroup);
    let answer = boto3(pod, sts);
    std::mem::swap(&mut pod.container, cgroup);
    answer
}

fn container(name: &str) -> Container {
    Container {
        name: name.to_owned(),
        image: Some("registry.invalid/app:1".to_owned()),
        ..Default::default()
    }
}

fn status(name: &str, id: &str) -> serde_json::Value {
    let status = ContainerStatus {
        name: name.to_owned(),
        container_id: Some(format!("containerd://{id}")),
        image: "registry.invalid/app:1".to_owned(),
        image_id: String::new(),
        ready: true,
        restart_count: 0,
        ..Default::default()
    };
    serde_json::to_value(status).unwrap()
}

/// The value of form parameter `key` in one AssumeRole call.
fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The session tags of one AssumeRole call, and its transitive tag keys.
fn tags(params: &[(String, String)]) -> (BTreeMap<String, String>, Vec<String>) {
    let mut tags = BTreeMap::new();
    for n in 1.. {
        let Some(key) = param(params, &format!("Tags.member.{n}.Key")) else {
            break;
        };
        let value = param(params, &format!("Tags.member.{n}.Value")).unwrap_or_default();
        tags.insert(key.to_owned(), value.to_owned());
    }
    let transitive = (1..)
        .map_while(|n| param(params, &format!("TransitiveTagKeys.member.{n}")))
        .map(str::to_owned)
        .collect();
    (tags, transitive)
}

/// A pod `namespace/name` on the scope's node that runs as the ServiceAccount `account`,
/// with the role annotation `role` if any.
fn pod_as(
    scope: &Scope<'_>,
    namespace: &str,
    name: &str,
    role: Option<&str>,
    account: &str,
) -> k8s_openapi::api::core::v1::Pod {
    let mut api = new_pod(namespace, name, &scope.node);
    api.metadata.annotations = role.map(|role| [(ROLE.to_owned(), role.to_owned())].into());
    api.spec.get_or_insert_default().service_account_name = Some(account.into());
    api
}

/// Waits until the real server holds an Event in `namespace` whose JSON contains
/// `needle`.
async fn wait_for_event(scope: &Scope<'_>, namespace: &str, needle: &str) {
    wait_until(
        &format!("an Event with {needle:?}"),
        Duration::from_secs(30),
        || async {
            let events: Vec<String> = scope
                .events(namespace)
                .await
                .iter()
                .map(serde_json::Value::to_string)
                .collect();
            if events.iter().any(|event| event.contains(needle)) {
                Ok(())
            } else {
                Err(format!("{events:?}"))
            }
        },
    )
    .await;
}

/// A scope of the shared plane with its node registered and a namespace `team`: `None`
/// (the test skips) when the plane cannot start outside CI.
async fn scope_with_team(test: &str, name: &str) -> Option<(Scope<'static>, String)> {
    let scope = ControlPlane::shared(test)?.scope(name);
    scope.add_node(&[]).await;
    let team = scope.namespace_name("team");
    scope.namespace(&team, &[]).await;
    Some((scope, team))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_container_gets_its_own_role_with_pod_identity_tags() {
    let test = "each_container_gets_its_own_role_with_pod_identity_tags";
    if !require_root(test) {
        return;
    }
    let Some((scope, team)) = scope_with_team(test, "idc").await else {
        return;
    };
    add_service_account(&scope, service_account(&team, "web-sa", &[])).await;
    let node = Node::new();
    let mut api = pod_as(&scope, &team, "web", Some("app-role"), "web-sa");
    let spec = api.spec.get_or_insert_default();
    spec.containers = vec![container("app"), container("istio-proxy")];
    spec.init_containers = Some(vec![container("late")]);
    api.metadata.annotations.get_or_insert_default().insert(
        "iam.amazonaws.com/container-roles".into(),
        r#"{"istio-proxy": "mesh-role", "late": "late-role"}"#.into(),
    );
    // kiam's annotation: ignored (the session names below stay the pod's), with an Event.
    api.metadata.annotations.get_or_insert_default().insert(
        "iam.amazonaws.com/session-name".into(),
        "someone-else".into(),
    );
    let api = scope.create_pod(api).await;
    let mut pod = node.pod_with_uid(api.metadata.uid.clone().expect("a UID"));
    let (sidecar_id, mut sidecar) = extra_container(&pod, "5");
    let (_late_id, mut late) = extra_container(&pod, "6");
    // The kubelet's status write. `late` is not in the status yet: its connections must
    // not get the pod's role.
    let status = json!({ "status": {
        "phase": "Running",
        "podIP": pod.ip.to_string(),
        "containerStatuses": [
            status("app", &pod.container_id),
            status("istio-proxy", &sidecar_id),
        ],
    }});
    Api::<k8s_openapi::api::core::v1::Pod>::namespaced(scope.plane.client().await, &team)
        .patch_status("web", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("the pod's status");

    let moto = MotoServer::shared_on(node.address);
    let sts = StsProxy::start(moto.addr()).await;
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let (agent, _) = AgentBuilder::new(
        "identity-containers",
        &node,
        Peers::new(&scope, &upstream, &sts.endpoint()),
    )
    .args(&[
        "--base-role-arn",
        "arn:aws:iam::123456789012:role/",
        "--session-tags",
        "--cluster-name",
        "prod-1",
        "--source-identity",
    ])
    .start()
    .await;
    let whoami = moto.endpoint();
    let uid = pod.uid.clone();
    let (app, mesh, refused) = tokio::task::spawn_blocking(move || {
        let app = boto3(&pod, &whoami);
        let mesh = boto3_in(&mut pod, &mut sidecar, &whoami);
        let refused = boto3_in(&mut pod, &mut late, &whoami);
        // Cgroups go in order: the extra containers', then the pod's.
        drop((sidecar, late));
        (app, mesh, refused)
    })
    .await
    .unwrap();
    let log = agent.log_text();
    assert_eq!(
        app,
        format!("{ACCOUNT_ARN}/app-role/{team}.web"),
        "an unlisted container has the pod's role\n{log}"
    );
    assert_eq!(
        mesh,
        format!("{ACCOUNT_ARN}/mesh-role/{team}.web@istio-proxy"),
        "the sidecar has its own role, in a session of its own\n{log}"
    );
    assert!(
        refused.starts_with("ERROR"),
        "a container missing from the status gets nothing: {refused}\n{log}"
    );
    let roles = sts.assumed_roles();
    assert!(
        !roles.iter().any(|role| role.ends_with("/late-role")),
        "{roles:?}"
    );

    let calls = sts.assume_params();
    let call_for = |session: &str| {
        calls
            .iter()
            .find(|params| param(params, "RoleSessionName") == Some(session))
            .unwrap_or_else(|| panic!("an AssumeRole for {session} in {calls:?}"))
    };
    let pod_call = call_for(&format!("{team}.web"));
    let (pod_tags, transitive) = tags(pod_call);
    let expected: BTreeMap<String, String> = [
        ("eks-cluster-name", "prod-1"),
        ("kubernetes-namespace", team.as_str()),
        ("kubernetes-service-account", "web-sa"),
        ("kubernetes-pod-name", "web"),
        ("kubernetes-pod-uid", uid.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(pod_tags, expected);
    let mut transitive_sorted = transitive.clone();
    transitive_sorted.sort();
    assert_eq!(
        transitive_sorted,
        expected.keys().cloned().collect::<Vec<_>>(),
        "all tags transitive"
    );
    assert_eq!(
        param(pod_call, "SourceIdentity"),
        Some(format!("{team}.web").as_str())
    );

    let (mesh_tags, _) = tags(call_for(&format!("{team}.web@istio-proxy")));
    assert_eq!(
        mesh_tags
            .get("kubernetes-container-name")
            .map(String::as_str),
        Some("istio-proxy")
    );
    assert_eq!(
        mesh_tags.get("kubernetes-pod-name").map(String::as_str),
        Some("web")
    );
    // The refusal is posted on the pod, and kiam's session name is refused visibly.
    wait_for_event(&scope, &team, "UnknownContainer").await;
    wait_for_event(&scope, &team, "SessionNameIgnored").await;
    assert!(
        !calls
            .iter()
            .any(|params| param(params, "RoleSessionName") == Some("someone-else")),
        "{calls:?}"
    );
}

/// Creates `account` through the API (in its `metadata.namespace`).
async fn add_service_account(scope: &Scope<'_>, account: ServiceAccount) {
    let namespace = account.metadata.namespace.clone().expect("a namespace");
    Api::<ServiceAccount>::namespaced(scope.plane.client().await, &namespace)
        .create(&PostParams::default(), &account)
        .await
        .unwrap_or_else(|e| panic!("creating ServiceAccount {:?}: {e}", account.metadata.name));
}

fn service_account(namespace: &str, name: &str, annotations: &[(&str, &str)]) -> ServiceAccount {
    let mut account = ServiceAccount::default();
    account.metadata.name = Some(name.to_owned());
    account.metadata.namespace = Some(namespace.to_owned());
    account.metadata.annotations = Some(
        annotations
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    );
    account
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_come_from_the_service_account_and_follow_its_changes() {
    let test = "roles_come_from_the_service_account_and_follow_its_changes";
    if !require_root(test) {
        return;
    }
    let Some((scope, team)) = scope_with_team(test, "idsa").await else {
        return;
    };
    add_service_account(
        &scope,
        service_account(&team, "builder", &[(ROLE, "sa-role")]),
    )
    .await;
    add_service_account(
        &scope,
        service_account(
            &team,
            "irsa",
            &[(
                "eks.amazonaws.com/role-arn",
                "arn:aws:iam::123456789012:role/irsa-role",
            )],
        ),
    )
    .await;
    let node = Node::new();
    let mut pods = Vec::new();
    for (name, role, account) in [
        ("own", Some("pod-role"), "builder"),
        ("from-sa", None, "builder"),
        ("irsa", None, "irsa"),
    ] {
        pods.push(
            scope
                .run_pod(&node, pod_as(&scope, &team, name, role, account))
                .await,
        );
    }
    let [own, from_sa, irsa]: [Pod; 3] = pods.try_into().expect("three pods");
    // The server's count of cluster-wide lists before this test's agent starts (see the
    // module doc).
    let plane = scope.plane;
    let accounts = |family: &str, verb: &str, scope: &str| {
        plane
            .server_metric(
                family,
                &[
                    ("resource", "serviceaccounts"),
                    ("verb", verb),
                    ("scope", scope),
                ],
            )
            .unwrap()
    };
    let (total, open) = ("apiserver_request_total", "apiserver_longrunning_requests");
    let cluster_lists = accounts(total, "LIST", "cluster");
    let moto = MotoServer::shared_on(node.address);
    let sts = StsProxy::start(moto.addr()).await;
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let (agent, _) = AgentBuilder::new(
        "identity-service-accounts",
        &node,
        Peers::new(&scope, &upstream, &sts.endpoint()),
    )
    .args(&[
        "--base-role-arn",
        "arn:aws:iam::123456789012:role/",
        "--default-role",
        "fallback",
        "--irsa-annotations",
    ])
    .start()
    .await;
    let whoami = moto.endpoint();
    let (own, from_sa, irsa, answers) = tokio::task::spawn_blocking({
        let whoami = whoami.clone();
        move || {
            let answers = [
                boto3(&own, &whoami),
                boto3(&from_sa, &whoami),
                boto3(&irsa, &whoami),
            ];
            (own, from_sa, irsa, answers)
        }
    })
    .await
    .unwrap();
    let log = agent.log_text();
    assert_eq!(
        answers,
        [
            format!("{ACCOUNT_ARN}/pod-role/{team}.own"),
            format!("{ACCOUNT_ARN}/sa-role/{team}.from-sa"),
            format!("{ACCOUNT_ARN}/irsa-role/{team}.irsa"),
        ],
        "pod, then ServiceAccount, then IRSA's annotation\n{log}"
    );
    // One watch per ServiceAccount the node's pods use: `builder` (two pods) and `irsa`.
    assert_eq!(
        agent.metric("interceptor_tracked{kind=\"service_accounts\"}"),
        2.0
    );

    // The ServiceAccount's annotation changes: its pods follow, the pod with its own
    // role does not.
    Api::<ServiceAccount>::namespaced(scope.plane.client().await, &team)
        .patch(
            "builder",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "annotations": { ROLE: "sa-role-2" } } })),
        )
        .await
        .expect("the ServiceAccount's new role");
    let expected = format!("{ACCOUNT_ARN}/sa-role-2/{team}.from-sa");
    let (own, from_sa) = {
        let mut pods = (own, from_sa);
        let mut last = String::new();
        for _ in 0..50 {
            let whoami = whoami.clone();
            let (answer, back) = tokio::task::spawn_blocking(move || {
                let answer = boto3(&pods.1, &whoami);
                (answer, pods)
            })
            .await
            .unwrap();
            pods = back;
            last = answer;
            if last == expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(last, expected, "{}", agent.log_text());
        pods
    };
    let own_answer = tokio::task::spawn_blocking(move || boto3(&own, &whoami))
        .await
        .unwrap();
    assert_eq!(own_answer, format!("{ACCOUNT_ARN}/pod-role/{team}.own"));
    drop((from_sa, irsa));
    // Only the ServiceAccounts pods use were followed, each by name, as the server
    // counts the requests. (Only its gauge of open watches tells a watch by name from a
    // namespace's: its totals count a list or an ended watch by name as a namespace's,
    // so those are told apart only from the cluster's.) This agent's two by-name watches
    // are open now:
    let by_name = accounts(open, "WATCH", "resource");
    assert!(
        by_name >= 2.0,
        "by-name ServiceAccount watches open: {by_name}"
    );
    // no agent of this test binary watches a whole namespace's ServiceAccounts;
    assert_eq!(
        accounts(open, "WATCH", "namespace"),
        0.0,
        "ServiceAccount watches of a whole namespace open"
    );
    // the only cluster-wide watch open is the server's own (its ServiceAccount admission
    // plugin's informer);
    let cluster_wide = accounts(open, "WATCH", "cluster");
    assert!(
        cluster_wide <= 1.0,
        "cluster-wide ServiceAccount watches open: {cluster_wide}"
    );
    // and nobody listed them across the cluster while the agent ran.
    assert_eq!(
        accounts(total, "LIST", "cluster"),
        cluster_lists,
        "a cluster-wide list of ServiceAccounts while the agent ran"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trust_policy_without_tag_session_is_named_in_the_pods_event() {
    let test = "a_trust_policy_without_tag_session_is_named_in_the_pods_event";
    if !require_root(test) {
        return;
    }
    let Some((scope, team)) = scope_with_team(test, "idtag").await else {
        return;
    };
    let node = Node::new();
    let pod = scope
        .running_pod(&node, &team, "tagged", &[(ROLE, "strict-role")])
        .await;
    let moto = MotoServer::shared_on(node.address);
    let sts = StsProxy::start(moto.addr()).await;
    sts.set_fault(Fault::DenyWith(
        "User: arn:aws:iam::123456789012:user/node is not authorized to perform: \
         sts:TagSession on resource: arn:aws:iam::123456789012:role/strict-role"
            .into(),
    ));
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let (_agent, _) = AgentBuilder::new(
        "identity-tag-session",
        &node,
        Peers::new(&scope, &upstream, &sts.endpoint()),
    )
    .args(&[
        "--base-role-arn",
        "arn:aws:iam::123456789012:role/",
        "--session-tags",
    ])
    .start()
    .await;
    let whoami = moto.endpoint();
    let answer = tokio::task::spawn_blocking(move || boto3(&pod, &whoami))
        .await
        .unwrap();
    assert!(answer.starts_with("ERROR"), "{answer}");
    wait_for_event(&scope, &team, "must allow sts:TagSession").await;
}

/// kube2iam's `--assume-role-arn`: the agent assumes one intermediate role with its own
/// credentials, then every pod's role with the intermediate session's. The pod's
/// SourceIdentity and tags go on the pod's (chained) call; the intermediate session,
/// shared by all pods, carries neither, since AWS keeps a SourceIdentity and transitive
/// tags for the rest of a chain and would then refuse every pod's own (docs/identity.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_identity_and_tags_go_on_the_chained_call_through_the_intermediate_role() {
    if !require_root(
        "source_identity_and_tags_go_on_the_chained_call_through_the_intermediate_role",
    ) {
        return;
    }
    const HOP: &str = "arn:aws:iam::123456789012:role/interceptor-hop";
    let test = "source_identity_and_tags_go_on_the_chained_call_through_the_intermediate_role";
    let Some((scope, team)) = scope_with_team(test, "idhop").await else {
        return;
    };
    add_service_account(&scope, service_account(&team, "web-sa", &[])).await;
    let node = Node::new();
    let api = pod_as(&scope, &team, "web", Some("app-role"), "web-sa");
    let pod = scope.run_pod(&node, api).await;
    let moto = MotoServer::shared_on(node.address);
    let sts = StsProxy::start(moto.addr()).await;
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let (agent, _) = AgentBuilder::new(
        "identity-chained",
        &node,
        Peers::new(&scope, &upstream, &sts.endpoint()),
    )
    .args(&[
        "--base-role-arn",
        "arn:aws:iam::123456789012:role/",
        "--assume-role-arn",
        HOP,
        "--session-tags",
        "--source-identity",
    ])
    .start()
    .await;
    let whoami = moto.endpoint();
    let uid = pod.uid.clone();
    let answer = tokio::task::spawn_blocking(move || boto3(&pod, &whoami))
        .await
        .unwrap();
    let log = agent.log_text();
    assert_eq!(
        answer,
        format!("{ACCOUNT_ARN}/app-role/{team}.web"),
        "the pod's SDK holds the pod's role\n{log}"
    );

    let calls = sts.assume_calls();
    let role_of = |call: &interceptor_tests::sts_proxy::AssumeCall| {
        param(&call.params, "RoleArn").map(str::to_owned)
    };
    let hops: Vec<_> = calls
        .iter()
        .filter(|call| role_of(call).as_deref() == Some(HOP))
        .collect();
    let pod_calls: Vec<_> = calls
        .iter()
        .filter(|call| role_of(call).as_deref() == Some("arn:aws:iam::123456789012:role/app-role"))
        .collect();
    assert!(
        !hops.is_empty(),
        "the intermediate role is assumed: {calls:?}"
    );
    assert!(
        !pod_calls.is_empty(),
        "the pod's role is assumed: {calls:?}"
    );
    let agent_key = AGENT_ENV
        .iter()
        .find_map(|(name, value)| (*name == "AWS_ACCESS_KEY_ID").then_some(*value));
    for hop in &hops {
        assert_eq!(
            hop.signer.as_deref(),
            agent_key,
            "the intermediate role is assumed with the agent's own credentials: {hop:?}"
        );
        assert_eq!(
            param(&hop.params, "SourceIdentity"),
            None,
            "the shared intermediate session sets no SourceIdentity (it could never be \
             changed for a pod afterwards): {hop:?}"
        );
        assert_eq!(
            tags(&hop.params),
            (BTreeMap::new(), Vec::new()),
            "and no tags: {hop:?}"
        );
    }
    let hop_keys: Vec<&str> = hops
        .iter()
        .filter_map(|hop| hop.issued.as_deref())
        .collect();
    let expected: BTreeMap<String, String> = [
        ("kubernetes-namespace", team.as_str()),
        ("kubernetes-service-account", "web-sa"),
        ("kubernetes-pod-name", "web"),
        ("kubernetes-pod-uid", uid.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    for call in &pod_calls {
        assert!(
            call.signer
                .as_deref()
                .is_some_and(|signer| hop_keys.contains(&signer)),
            "the pod's role is assumed with the intermediate session's credentials \
             ({hop_keys:?}), not the agent's own: {call:?}"
        );
        let session = format!("{team}.web");
        assert_eq!(
            param(&call.params, "SourceIdentity"),
            Some(session.as_str()),
            "the chained call carries the pod's SourceIdentity: {call:?}"
        );
        assert_eq!(
            param(&call.params, "RoleSessionName"),
            Some(session.as_str())
        );
        let (pod_tags, mut transitive) = tags(&call.params);
        assert_eq!(pod_tags, expected, "{call:?}");
        transitive.sort();
        assert_eq!(
            transitive,
            expected.keys().cloned().collect::<Vec<_>>(),
            "all tags transitive"
        );
    }
}
