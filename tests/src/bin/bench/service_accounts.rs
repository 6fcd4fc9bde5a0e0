//! Scenario 8: roles from ServiceAccounts in a large cluster. The agent follows only the
//! ServiceAccounts its node's pods run as (one single-object watch each), so its memory
//! should follow the node's pods, not the cluster's namespaces and ServiceAccounts.
//!
//! Two conditions, each on an API server of its own: the same handful of pods on the
//! agent's node, in a cluster of `namespaces` namespaces with [`ACCOUNTS`] ServiceAccounts
//! each (and one pod on another node per 100 namespaces), against the same with
//! [`BASELINE_NAMESPACES`] namespaces, and, as a control, the large cluster with
//! `--no-service-account-roles` (the same role as the default), which splits what the
//! namespaces cost from what following ServiceAccounts costs. Figures: the agent's RSS and peak RSS (VmRSS,
//! VmHWM) after every pod has been served credentials from its ServiceAccount's role,
//! and the ServiceAccount watches it opened, counted by the API server. That count must
//! equal the ServiceAccounts the node's pods use (a correctness check, not a time).

use std::collections::BTreeSet;

use anyhow::{Context, Result, bail};
use interceptor_tests::{
    Node, Pod,
    agent::Agent,
    apiserver::{FakeApiServer, new_namespace, new_node, new_pod},
};
use k8s_openapi::api::core::v1::ServiceAccount;
use serde_json::json;

use crate::{
    METADATA, NODE, World, agent_metric, credentials_path,
    load::run_all,
    places,
    report::{Figure, Report},
    run_strings, start_agent_on, usage,
};

/// The role every ServiceAccount names (the pods name none of their own).
const ROLE: &str = "bench-sa-role";
/// ServiceAccounts in every namespace.
const ACCOUNTS: [&str; 2] = ["app", "batch"];
/// The pods on the agent's node: (namespace index, ServiceAccount). Two share one
/// ServiceAccount, so the node uses 4 ServiceAccounts.
const NODE_PODS: [(usize, &str); 5] = [
    (0, "app"),
    (0, "app"),
    (0, "batch"),
    (1, "app"),
    (2, "batch"),
];
/// The baseline cluster's size.
pub const BASELINE_NAMESPACES: usize = 10;
const OTHER_NODE: &str = "bench-node-other";

/// What one agent showed.
struct Measured {
    namespaces: usize,
    rss_kib: u64,
    peak_kib: u64,
    /// Distinct ServiceAccounts the API server saw a watch for.
    watched: BTreeSet<String>,
    /// The agent's own count (`interceptor_tracked{kind="service_accounts"}`); absent
    /// with `--no-service-account-roles`.
    followed: Option<f64>,
    /// Whether ServiceAccount roles were on.
    roles_on: bool,
    /// Namespaces the agent holds (`interceptor_tracked{kind="namespaces"}`).
    tracked_namespaces: f64,
}

fn namespace(index: usize) -> String {
    format!("team-{index}")
}

fn account(namespace: &str, name: &str) -> ServiceAccount {
    let mut account = ServiceAccount::default();
    account.metadata.name = Some(name.to_owned());
    account.metadata.namespace = Some(namespace.to_owned());
    account.metadata.annotations = Some(
        [("iam.amazonaws.com/role".to_owned(), ROLE.to_owned())]
            .into_iter()
            .collect(),
    );
    account
}

/// A fresh API server holding the cluster: `namespaces` namespaces with their
/// ServiceAccounts, `pods` on the agent's node, one pod per 100 namespaces elsewhere.
async fn cluster(namespaces: usize, pods: &[Pod]) -> FakeApiServer {
    let api = FakeApiServer::start().await;
    api.add_node(new_node(NODE));
    for index in 0..namespaces {
        let name = namespace(index);
        api.add_namespace(new_namespace(&name));
        for service_account in ACCOUNTS {
            api.add_service_account(account(&name, service_account));
        }
        if index % 100 == 99 {
            let mut pod = new_pod(&name, "elsewhere", OTHER_NODE);
            pod.spec.get_or_insert_default().service_account_name = Some("app".into());
            api.add_pod(pod);
        }
    }
    for (index, (pod, (ns, service_account))) in pods.iter().zip(NODE_PODS).enumerate() {
        let mut api_pod = new_pod(&namespace(ns), &format!("sa-{index}"), NODE);
        api_pod.metadata.uid = Some(pod.uid.clone());
        api_pod.spec.get_or_insert_default().service_account_name =
            Some(service_account.to_owned());
        api.add_pod(api_pod);
    }
    api
}

/// The ServiceAccounts watched, from the API server's request log (`namespace/name`);
/// fails if any ServiceAccount request was not for one named object (a wider watch).
fn watched_accounts(api: &FakeApiServer) -> Result<BTreeSet<String>> {
    let requests = api.requests();
    // The log keeps the last 1000: a fuller one may have lost the first watches.
    if requests.len() >= 1000 {
        bail!("the API server's request log overflowed; the count would be partial");
    }
    let mut watched = BTreeSet::new();
    for request in requests.iter().filter(|r| r.contains("/serviceaccounts")) {
        let target = request.split_whitespace().nth(1).unwrap_or_default();
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let mut name = None;
        let mut watch = false;
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match &*key {
                "fieldSelector" => name = value.strip_prefix("metadata.name=").map(str::to_owned),
                "watch" => watch = value == "true" || value == "1",
                _ => {}
            }
        }
        let Some(name) = name else {
            bail!("a ServiceAccount request not for one object: {request}");
        };
        let namespace = path
            .strip_prefix("/api/v1/namespaces/")
            .and_then(|rest| rest.strip_suffix("/serviceaccounts"))
            .with_context(|| format!("a ServiceAccount request outside a namespace: {request}"))?;
        if watch {
            watched.insert(format!("{namespace}/{name}"));
        }
    }
    Ok(watched)
}

/// One agent on a cluster of `namespaces`; with `roles_on` false, the control: no
/// ServiceAccount roles (`--no-service-account-roles`), the same role as the default.
async fn measure(
    world: &World,
    node: &Node,
    pods: &[Pod],
    namespaces: usize,
    roles_on: bool,
) -> Result<Measured> {
    let api = cluster(namespaces, pods).await;
    let control = ["--no-service-account-roles", "--default-role", ROLE];
    let agent = start_agent_on(
        world,
        &api,
        &format!("bench-accounts-{namespaces}-{roles_on}"),
        node,
        if roles_on { &[] } else { &control },
    )?;
    wait_for_namespaces(&agent, namespaces).await?;
    // Every pod is served its ServiceAccount's role: the watches are open and read. The
    // first credential is waited for as an SDK retries (STS may be cold when this
    // scenario runs alone), then each pod makes a few more requests.
    let path = credentials_path(ROLE);
    let firsts = run_all(&places(pods), &["first", METADATA, &path, "30000"])?;
    if let Some(load) = firsts.iter().find(|load| load.ok != 1) {
        bail!(
            "{namespaces} namespaces: a pod got no credentials from its ServiceAccount: {:?}\n{}",
            load.first_error,
            agent.log_text()
        );
    }
    let args = [
        "http".to_owned(),
        METADATA.to_owned(),
        path,
        "new".to_owned(),
        "1".to_owned(),
        "20".to_owned(),
        "0".to_owned(),
    ];
    let loads = run_strings(&places(pods), &args)?;
    if let Some(load) = loads.iter().find(|load| load.errors > 0 || load.ok == 0) {
        bail!(
            "{namespaces} namespaces: a pod got no credentials from its ServiceAccount: {:?}\n{}",
            load.first_error,
            agent.log_text()
        );
    }
    let (_, rss_kib, peak_kib) = usage(agent.pid())?;
    let measured = Measured {
        namespaces,
        rss_kib,
        peak_kib,
        watched: watched_accounts(&api)?,
        followed: agent_metric(&agent, "interceptor_tracked{kind=\"service_accounts\"}").ok(),
        roles_on,
        tracked_namespaces: agent_metric(&agent, "interceptor_tracked{kind=\"namespaces\"}")?,
    };
    drop(agent);
    Ok(measured)
}

/// Until the agent holds all `namespaces` (its namespace watch has listed them).
async fn wait_for_namespaces(agent: &Agent, namespaces: usize) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let tracked = agent_metric(agent, "interceptor_tracked{kind=\"namespaces\"}")?;
        if tracked >= namespaces as f64 {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("the agent holds {tracked} of {namespaces} namespaces");
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

pub async fn service_accounts(world: &World, node: &Node, report: &mut Report) -> Result<()> {
    let pods: Vec<Pod> = NODE_PODS.iter().map(|_| node.pod()).collect();
    let expected: BTreeSet<String> = NODE_PODS
        .iter()
        .map(|(ns, service_account)| format!("{}/{service_account}", namespace(*ns)))
        .collect();
    let baseline = measure(world, node, &pods, BASELINE_NAMESPACES, true).await?;
    let large = measure(world, node, &pods, world.sizes.namespaces, true).await?;
    let control = measure(world, node, &pods, world.sizes.namespaces, false).await?;
    for measured in [&baseline, &large] {
        if measured.watched != expected || measured.followed != Some(expected.len() as f64) {
            bail!(
                "{} namespaces: the agent watched {:?} (and follows {:?}), its node's pods use {expected:?}",
                measured.namespaces,
                measured.watched,
                measured.followed
            );
        }
    }
    if !control.watched.is_empty() {
        bail!(
            "--no-service-account-roles, yet ServiceAccounts were watched: {:?}",
            control.watched
        );
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    let label = format!(
        "{} namespaces x {} ServiceAccounts, {} pods here",
        large.namespaces,
        ACCOUNTS.len(),
        NODE_PODS.len()
    );
    report.add(Figure {
        scenario: "8",
        measure: format!("agent RSS, {label}"),
        ours: mib(large.rss_kib),
        baseline: Some(mib(baseline.rss_kib)),
        unit: "MiB",
        target: None,
    });
    report.add(Figure {
        scenario: "8",
        measure: format!("agent peak RSS, {label}"),
        ours: mib(large.peak_kib),
        baseline: Some(mib(baseline.peak_kib)),
        unit: "MiB",
        target: None,
    });
    report.add(Figure {
        scenario: "8",
        measure: format!(
            "agent RSS, {} namespaces, ServiceAccount roles on vs off",
            large.namespaces
        ),
        ours: mib(large.rss_kib),
        baseline: Some(mib(control.rss_kib)),
        unit: "MiB",
        target: None,
    });
    report.add(Figure {
        scenario: "8",
        measure: format!("ServiceAccount watches, {label}"),
        ours: large.watched.len() as f64,
        baseline: Some(baseline.watched.len() as f64),
        unit: "watches",
        target: None,
    });
    let details: Vec<_> = [&baseline, &large, &control]
        .iter()
        .map(|measured| {
            json!({
                "namespaces": measured.namespaces,
                "service_accounts": measured.namespaces * ACCOUNTS.len(),
                "pods_on_node": NODE_PODS.len(),
                "pods_elsewhere": measured.namespaces / 100,
                "agent_namespaces": measured.tracked_namespaces,
                "rss_mib": mib(measured.rss_kib),
                "peak_mib": mib(measured.peak_kib),
                "watched": measured.watched,
                "followed": measured.followed,
                "service_account_roles": measured.roles_on,
            })
        })
        .collect();
    report
        .details
        .insert("8_service_accounts".into(), json!(details));
    Ok(())
}
