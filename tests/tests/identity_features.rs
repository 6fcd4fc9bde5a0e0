//! End to end on the simulated node, with boto3 in pods: per-container roles told apart
//! by the kernel's cgroup of the connecting container, roles from ServiceAccounts (and
//! IRSA's annotation), and Pod Identity-compatible session tags and SourceIdentity as they
//! reach STS (through the counting forwarder in front of moto).

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use interceptor_tests::{
    Node, Pod,
    apiserver::{FakeApiServer, new_namespace, wait_for},
    clients::boto3,
    cluster::{AGENT_ENV, Peers, api_pod, start_agent},
    fake_imds::FakeImds,
    moto::MotoServer,
    node::Cgroup,
    require_root,
    sts_proxy::{Fault, StsProxy},
};
use k8s_openapi::api::core::v1::{Container, ContainerStatus, PodStatus, ServiceAccount};

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

fn status(name: &str, id: &str) -> ContainerStatus {
    ContainerStatus {
        name: name.to_owned(),
        container_id: Some(format!("containerd://{id}")),
        image: "registry.invalid/app:1".to_owned(),
        image_id: String::new(),
        ready: true,
        restart_count: 0,
        ..Default::default()
    }
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

fn event_texts(server: &FakeApiServer) -> Vec<String> {
    server
        .events()
        .iter()
        .map(serde_json::Value::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_container_gets_its_own_role_with_pod_identity_tags() {
    if !require_root("each_container_gets_its_own_role_with_pod_identity_tags") {
        return;
    }
    let node = Node::new();
    let mut pod = node.pod();
    let (sidecar_id, mut sidecar) = extra_container(&pod, "5");
    let (_late_id, mut late) = extra_container(&pod, "6");

    let server = FakeApiServer::start().await;
    server.add_namespace(new_namespace("team-a"));
    let mut api = api_pod(&pod.uid, "team-a", "web", Some("app-role"));
    let spec = api.spec.get_or_insert_default();
    spec.containers = vec![container("app"), container("istio-proxy")];
    spec.init_containers = Some(vec![container("late")]);
    spec.service_account_name = Some("web-sa".into());
    api.metadata.annotations.get_or_insert_default().insert(
        "iam.amazonaws.com/container-roles".into(),
        r#"{"istio-proxy": "mesh-role", "late": "late-role"}"#.into(),
    );
    // kiam's annotation: ignored (the session names below stay the pod's), with an Event.
    api.metadata.annotations.get_or_insert_default().insert(
        "iam.amazonaws.com/session-name".into(),
        "someone-else".into(),
    );
    // `late` is not in the status yet: its connections must not get the pod's role.
    api.status = Some(PodStatus {
        container_statuses: Some(vec![
            status("app", &pod.container_id),
            status("istio-proxy", &sidecar_id),
        ]),
        ..Default::default()
    });
    server.add_pod(api);

    let moto = MotoServer::start_on(node.address, &[]);
    let sts = StsProxy::start(moto.addr()).await;
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let (agent, _) = start_agent(
        "identity-containers",
        &node,
        Peers {
            api: &server,
            upstream: &upstream,
            sts: &sts.endpoint(),
        },
        &[
            "--base-role-arn",
            "arn:aws:iam::123456789012:role/",
            "--session-tags",
            "--cluster-name",
            "prod-1",
            "--source-identity",
        ],
        &AGENT_ENV,
        None,
    )
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
        format!("{ACCOUNT_ARN}/app-role/team-a.web"),
        "an unlisted container has the pod's role\n{log}"
    );
    assert_eq!(
        mesh,
        format!("{ACCOUNT_ARN}/mesh-role/team-a.web@istio-proxy"),
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
    let pod_call = call_for("team-a.web");
    let (pod_tags, transitive) = tags(pod_call);
    let expected: BTreeMap<String, String> = [
        ("eks-cluster-name", "prod-1"),
        ("kubernetes-namespace", "team-a"),
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
    assert_eq!(param(pod_call, "SourceIdentity"), Some("team-a.web"));

    let (mesh_tags, _) = tags(call_for("team-a.web@istio-proxy"));
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
    let events = event_texts(&server);
    assert!(
        events
            .iter()
            .any(|event| event.contains("UnknownContainer")),
        "the refusal is posted on the pod: {events:?}"
    );
    assert!(
        events
            .iter()
            .any(|event| event.contains("SessionNameIgnored")),
        "kiam's session name is refused visibly: {events:?}"
    );
    assert!(
        !calls
            .iter()
            .any(|params| param(params, "RoleSessionName") == Some("someone-else")),
        "{calls:?}"
    );
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
    if !require_root("roles_come_from_the_service_account_and_follow_its_changes") {
        return;
    }
    let node = Node::new();
    let (own, from_sa, irsa) = (node.pod(), node.pod(), node.pod());
    let server = FakeApiServer::start().await;
    server.add_namespace(new_namespace("team-a"));
    server.add_service_account(service_account(
        "team-a",
        "builder",
        &[("iam.amazonaws.com/role", "sa-role")],
    ));
    server.add_service_account(service_account(
        "team-a",
        "irsa",
        &[(
            "eks.amazonaws.com/role-arn",
            "arn:aws:iam::123456789012:role/irsa-role",
        )],
    ));
    for (pod, name, role, account) in [
        (&own, "own", Some("pod-role"), "builder"),
        (&from_sa, "from-sa", None, "builder"),
        (&irsa, "irsa", None, "irsa"),
    ] {
        let mut api = api_pod(&pod.uid, "team-a", name, role);
        api.spec.get_or_insert_default().service_account_name = Some(account.into());
        server.add_pod(api);
    }
    let moto = MotoServer::start_on(node.address, &[]);
    let sts = StsProxy::start(moto.addr()).await;
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let (agent, _) = start_agent(
        "identity-service-accounts",
        &node,
        Peers {
            api: &server,
            upstream: &upstream,
            sts: &sts.endpoint(),
        },
        &[
            "--base-role-arn",
            "arn:aws:iam::123456789012:role/",
            "--default-role",
            "fallback",
            "--irsa-annotations",
        ],
        &AGENT_ENV,
        None,
    )
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
            format!("{ACCOUNT_ARN}/pod-role/team-a.own"),
            format!("{ACCOUNT_ARN}/sa-role/team-a.from-sa"),
            format!("{ACCOUNT_ARN}/irsa-role/team-a.irsa"),
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
    server.update_service_account("team-a", "builder", |account| {
        account
            .metadata
            .annotations
            .get_or_insert_default()
            .insert("iam.amazonaws.com/role".into(), "sa-role-2".into());
    });
    let expected = format!("{ACCOUNT_ARN}/sa-role-2/team-a.from-sa");
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
    assert_eq!(own_answer, format!("{ACCOUNT_ARN}/pod-role/team-a.own"));
    drop((from_sa, irsa));
    // Only the ServiceAccounts pods use were asked for, each by name.
    let requests = server.requests();
    let account_requests: Vec<&String> = requests
        .iter()
        .filter(|request| request.contains("serviceaccounts"))
        .collect();
    assert!(
        account_requests
            .iter()
            .all(|request| request.contains("metadata.name")),
        "{account_requests:?}"
    );
    assert!(!account_requests.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trust_policy_without_tag_session_is_named_in_the_pods_event() {
    if !require_root("a_trust_policy_without_tag_session_is_named_in_the_pods_event") {
        return;
    }
    let node = Node::new();
    let pod = node.pod();
    let server = FakeApiServer::start().await;
    server.add_namespace(new_namespace("team-a"));
    server.add_pod(api_pod(&pod.uid, "team-a", "tagged", Some("strict-role")));
    let moto = MotoServer::start_on(node.address, &[]);
    let sts = StsProxy::start(moto.addr()).await;
    sts.set_fault(Fault::DenyWith(
        "User: arn:aws:iam::123456789012:user/node is not authorized to perform: \
         sts:TagSession on resource: arn:aws:iam::123456789012:role/strict-role"
            .into(),
    ));
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let (_agent, _) = start_agent(
        "identity-tag-session",
        &node,
        Peers {
            api: &server,
            upstream: &upstream,
            sts: &sts.endpoint(),
        },
        &[
            "--base-role-arn",
            "arn:aws:iam::123456789012:role/",
            "--session-tags",
        ],
        &AGENT_ENV,
        None,
    )
    .await;
    let whoami = moto.endpoint();
    let answer = tokio::task::spawn_blocking(move || boto3(&pod, &whoami))
        .await
        .unwrap();
    assert!(answer.starts_with("ERROR"), "{answer}");
    wait_for(
        "an Event naming sts:TagSession",
        Duration::from_secs(10),
        || {
            let events = event_texts(&server);
            if events
                .iter()
                .any(|event| event.contains("must allow sts:TagSession"))
            {
                Ok(())
            } else {
                Err(format!("{events:?}"))
            }
        },
    )
    .await;
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
    let node = Node::new();
    let pod = node.pod();
    let server = FakeApiServer::start().await;
    server.add_namespace(new_namespace("team-a"));
    let mut api = api_pod(&pod.uid, "team-a", "web", Some("app-role"));
    api.spec.get_or_insert_default().service_account_name = Some("web-sa".into());
    server.add_pod(api);
    let moto = MotoServer::start_on(node.address, &[]);
    let sts = StsProxy::start(moto.addr()).await;
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let (agent, _) = start_agent(
        "identity-chained",
        &node,
        Peers {
            api: &server,
            upstream: &upstream,
            sts: &sts.endpoint(),
        },
        &[
            "--base-role-arn",
            "arn:aws:iam::123456789012:role/",
            "--assume-role-arn",
            HOP,
            "--session-tags",
            "--source-identity",
        ],
        &AGENT_ENV,
        None,
    )
    .await;
    let whoami = moto.endpoint();
    let uid = pod.uid.clone();
    let answer = tokio::task::spawn_blocking(move || boto3(&pod, &whoami))
        .await
        .unwrap();
    let log = agent.log_text();
    assert_eq!(
        answer,
        format!("{ACCOUNT_ARN}/app-role/team-a.web"),
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
        ("kubernetes-namespace", "team-a"),
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
        assert_eq!(
            param(&call.params, "SourceIdentity"),
            Some("team-a.web"),
            "the chained call carries the pod's SourceIdentity: {call:?}"
        );
        assert_eq!(param(&call.params, "RoleSessionName"), Some("team-a.web"));
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
