//! On the simulated node: the kernel's record -> cgroup -> pod (from the real
//! kube-apiserver, watched by the agent's own code with its ServiceAccount's token) ->
//! policy, for pods that must each get exactly their expected decision.

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use interceptor::{
    cgroupfs,
    ebpf::{self, Attribution},
    identity::index::{CgroupIndex, Limits},
    k8s::{self, EventSink, NamespaceStore, PodStore, events},
    optout::OptOuts,
    policy::{BaseArn, PolicyConfig},
    resolve::{Outcome, Resolver, Verdict},
};
use interceptor_tests::{
    Node, Pod,
    control_plane::{ControlPlane, wait_until},
    node::in_cgroup,
    objects::wait_for,
    pins::Pins,
    probe, require_root,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpListener,
};

const ROLE_KEY: &str = "iam.amazonaws.com/role";
const ALLOWED: &str = "iam.amazonaws.com/allowed-roles";

/// What the test's proxy concluded per tag.
type Seen = Arc<Mutex<HashMap<String, Vec<String>>>>;

fn summary(verdict: &Verdict) -> String {
    match verdict {
        Verdict::Decided {
            pod,
            outcome: Outcome::Role { request, .. },
        } => format!("{} role {}", pod.key(), request.role_arn),
        Verdict::Decided {
            pod,
            outcome: Outcome::NoRole,
        } => format!("{} no-role", pod.key()),
        Verdict::Decided {
            pod,
            outcome: Outcome::Denied(reason),
        } => {
            format!("{} denied {}", pod.key(), reason.metric_label())
        }
        Verdict::Decided {
            pod,
            outcome: Outcome::NodeIdentity,
        } => format!("{} node-identity", pod.key()),
        Verdict::Gone => "gone".into(),
    }
}

fn serve(
    listener: TcpListener,
    attribution: Arc<Attribution>,
    resolver: Arc<Resolver>,
    seen: Seen,
) {
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            let local = stream.local_addr().unwrap();
            let record = attribution.take(peer, local).expect("map lookup");
            let (resolver, seen) = (resolver.clone(), seen.clone());
            tokio::spawn(async move {
                let answer = match record {
                    None => "unattributed".to_owned(),
                    Some(record) => match resolver.caller(record).await {
                        Ok(caller) => summary(&resolver.decide(&caller)),
                        Err(refusal) => format!("refused {}", refusal.metric_label()),
                    },
                };
                let (read, mut write) = stream.into_split();
                let mut tag = String::new();
                let _ = BufReader::new(read).read_line(&mut tag).await;
                // Recorded before the reply: a client that has its reply may count on it.
                seen.lock()
                    .unwrap()
                    .entry(tag.trim().to_owned())
                    .or_default()
                    .push(answer.clone());
                let _ = write.write_all(format!("{answer}\n").as_bytes()).await;
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pod_gets_exactly_its_decision() {
    if !require_root("every_pod_gets_exactly_its_decision") {
        return;
    }
    let Some(plane) = ControlPlane::shared("every_pod_gets_exactly_its_decision") else {
        return;
    };
    let scope = plane.scope("decisions");
    let (team_a, locked, infra) = (
        scope.namespace_name("team-a"),
        scope.namespace_name("locked"),
        scope.namespace_name("infra"),
    );
    // Names are resolved against the base ARN, so "*" means any role of that account.
    scope
        .namespace(
            &team_a,
            &[(ALLOWED, r#"["*", "arn:aws:iam::999999999999:role/*"]"#)],
        )
        .await;
    scope
        .namespace(&locked, &[(ALLOWED, r#"["role-a"]"#)])
        .await;
    scope.namespace(&infra, &[]).await;

    let node = Node::new();
    let pods: Vec<(&str, Pod)> = vec![
        (
            "a",
            scope
                .simulated_pod(&node, &team_a, "app-a", &[(ROLE_KEY, "role-a")])
                .await,
        ),
        (
            "b",
            scope
                .simulated_pod(
                    &node,
                    &team_a,
                    "app-b",
                    &[(ROLE_KEY, "arn:aws:iam::999999999999:role/role-b")],
                )
                .await,
        ),
        (
            "plain",
            scope.simulated_pod(&node, &team_a, "plain", &[]).await,
        ),
        (
            "locked",
            scope
                .simulated_pod(&node, &locked, "wants-b", &[(ROLE_KEY, "role-b")])
                .await,
        ),
        (
            "host",
            scope
                .simulated_pod(&node, &team_a, "host-net", &[(ROLE_KEY, "role-host")])
                .await,
        ),
        (
            "cni",
            scope.simulated_pod(&node, &infra, "cni-agent", &[]).await,
        ),
    ];
    let pod = |tag: &str| &pods.iter().find(|(t, _)| *t == tag).unwrap().1;

    // The agent's client: its ServiceAccount's token, from a kubeconfig.
    let kubeconfig = std::env::temp_dir().join(format!(
        "interceptor-decisions-{}.kubeconfig",
        std::process::id()
    ));
    plane.write_agent_kubeconfig(&kubeconfig).unwrap();
    let client = k8s::client(Some(&kubeconfig))
        .await
        .expect("the agent's client");
    let node_name = scope.node.clone();
    let (pod_store, namespace_store) = (PodStore::new(), NamespaceStore::new());
    let watches = [
        tokio::spawn(k8s::pods::watch(
            client.clone(),
            node_name.clone(),
            pod_store.clone(),
        )),
        tokio::spawn(k8s::namespaces::watch(
            client.clone(),
            namespace_store.clone(),
        )),
    ];
    tokio::time::timeout(Duration::from_secs(20), async {
        pod_store.wait_synced().await;
        namespace_store.wait_synced().await;
    })
    .await
    .expect("stores sync");

    let pins = Pins::new("decisions");
    let listener = TcpListener::bind((node.address, 0)).await.unwrap();
    let SocketAddr::V4(proxy) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    let datapath = ebpf::Datapath::open(&pins.options(&node, proxy)).expect("attach");
    datapath
        .steer_to(&listener)
        .expect("steer to the test proxy");
    let index = Arc::new(CgroupIndex::new(
        cgroupfs::cgroup2_mount().unwrap(),
        node.kubepods.clone(),
        Limits::default(),
    ));
    let resolver = Arc::new(Resolver::new(
        index,
        pod_store.clone(),
        namespace_store.clone(),
        PolicyConfig {
            base_role_arn: Some(BaseArn::parse("arn:aws:iam::123456789012:role/").unwrap()),
            namespace_restrictions: true,
            ..PolicyConfig::default()
        },
        BTreeSet::from([infra.clone()]),
        Duration::from_millis(300),
        EventSink::new(Some(client), Some(node_name), events::Limits::default()),
    ));
    let mut optouts = OptOuts::new(resolver.clone(), pod_store.clone(), datapath.exempt());
    optouts.sync();
    assert!(
        datapath
            .exempt()
            .list()
            .contains(&pod("cni").container.id()),
        "the opted-out pod's container is exempt in the kernel"
    );
    // The opted-out pod reaches the node's own service: checked below.
    node.allow_node_imds();
    let seen_by_proxy: Seen = Arc::default();
    serve(
        listener,
        datapath.attribution(),
        resolver.clone(),
        seen_by_proxy.clone(),
    );

    let mut reports = HashMap::new();
    for (tag, pod) in &pods {
        let command = if *tag == "host" {
            // hostNetwork: the node's network namespace, the pod's own cgroup.
            in_cgroup(
                &pod.container,
                None,
                probe::binary(),
                &["169.254.169.254:80", "3", tag],
            )
        } else {
            pod.command(probe::binary(), &["169.254.169.254:80", "3", tag])
        };
        reports.insert(
            *tag,
            tokio::task::spawn_blocking(move || probe::run(command))
                .await
                .unwrap(),
        );
    }

    let seen = seen_by_proxy.lock().unwrap().clone();
    let expect = |tag: &str, answer: &str| {
        let answers = seen
            .get(tag)
            .unwrap_or_else(|| panic!("{tag}: nothing reached the proxy: {:?}", reports[tag]));
        assert_eq!(answers.len(), 3, "{tag}: {answers:?}");
        assert!(
            answers.iter().all(|a| a == answer),
            "{tag}: expected {answer:?}, got {answers:?}"
        );
    };
    expect(
        "a",
        &format!("{team_a}/app-a role arn:aws:iam::123456789012:role/role-a"),
    );
    expect(
        "b",
        &format!("{team_a}/app-b role arn:aws:iam::999999999999:role/role-b"),
    );
    expect("plain", &format!("{team_a}/plain no-role"));
    expect("locked", &format!("{locked}/wants-b denied not_allowed"));
    expect(
        "host",
        &format!("{team_a}/host-net role arn:aws:iam::123456789012:role/role-host"),
    );
    assert!(
        !seen.contains_key("cni"),
        "the opted-out pod must not be redirected: {seen:?}"
    );
    // It reached the node's own service instead, as the exemption means; nothing else
    // did.
    assert_eq!(reports["cni"].connected, 3, "{:?}", reports["cni"]);
    let reached: Vec<_> = node
        .node_imds_seen()
        .iter()
        .filter(|seen| seen.request.is_none())
        .map(|seen| seen.peer.ip())
        .collect();
    assert_eq!(
        reached,
        vec![std::net::IpAddr::from(pod("cni").ip); 3],
        "{:#?}",
        node.node_imds_seen()
    );

    // The refusal became one Event on that pod, however often it asked.
    let event = wait_until(
        "the RoleNotAllowed event",
        Duration::from_secs(20),
        || async {
            let events = scope.events(&locked).await;
            match events
                .iter()
                .filter(|e| e["reason"] == "RoleNotAllowed")
                .collect::<Vec<_>>()
                .as_slice()
            {
                [one] => Ok((*one).clone()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert_eq!(event["regarding"]["uid"], pod("locked").uid.as_str());
    assert!(
        event["note"]
            .as_str()
            .unwrap()
            .contains(&format!("not allowed in namespace {locked}"))
    );

    // The decision follows annotation changes, and a deleted pod gets nothing.
    scope
        .annotate_pod(&team_a, "app-a", ROLE_KEY, "role-a2")
        .await;
    wait_for(
        "the changed role",
        Duration::from_secs(10),
        || match pod_store.get(&pod("a").uid) {
            k8s::Lookup::Found(info) if info.annotations[ROLE_KEY] == "role-a2" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    scope.delete_pod(&team_a, "app-b").await;
    wait_for("the delete", Duration::from_secs(10), || {
        match pod_store.get(&pod("b").uid) {
            k8s::Lookup::Deleted => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    for tag in ["a", "b"] {
        let command = pod(tag).command(
            probe::binary(),
            &["169.254.169.254:80", "1", &format!("{tag}-after")],
        );
        tokio::task::spawn_blocking(move || probe::run(command))
            .await
            .unwrap();
    }
    let after = seen_by_proxy.lock().unwrap().clone();
    assert_eq!(
        after.get("a-after").map(Vec::as_slice),
        Some(
            &[format!(
                "{team_a}/app-a role arn:aws:iam::123456789012:role/role-a2"
            )][..]
        )
    );
    assert_eq!(
        after.get("b-after").map(Vec::as_slice),
        Some(&["refused deleted_pod".to_owned()][..])
    );
    for watch in watches {
        watch.abort();
    }
}
