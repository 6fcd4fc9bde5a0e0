//! Scenario 8: roles from ServiceAccounts in a large cluster. The agent follows only the
//! ServiceAccounts its node's pods run as (one single-object watch each), so its memory
//! should follow the node's pods, not the cluster's namespaces and ServiceAccounts.
//!
//! One real API server for the run, which only grows: the same handful of pods on a node
//! of their own (the agent's `--node`), first in a cluster of [`BASELINE_NAMESPACES`]
//! namespaces with [`ACCOUNTS`] ServiceAccounts each (the baseline), then once the
//! cluster has grown to `namespaces` of them (and one pod on another node per 100
//! namespaces: [`grow_cluster`]), and, as a control, that large cluster with
//! `--no-service-account-roles` (the same role as the default), which splits what the
//! namespaces cost from what following ServiceAccounts costs. Figures: the agent's RSS and
//! peak RSS (VmRSS, VmHWM) after every pod has been served credentials from its
//! ServiceAccount's role, and the ServiceAccount watches it opened, as the API server
//! recorded them.
//!
//! The count comes from kube-apiserver's own audit log ([`audit_policy`]: every
//! ServiceAccount request by the agent's ServiceAccount, at the Metadata level), read from
//! where it ended before each agent started: the requests are inside TLS, so a forwarder
//! could not see them without terminating it, and the server's /metrics count requests
//! by verb and scope, not by the object they name. It must equal the ServiceAccounts the
//! node's pods use, and every ServiceAccount request must name one object (a
//! correctness check, not a time): the run fails otherwise.

use std::{
    collections::BTreeSet,
    io::{Read, Seek, SeekFrom},
    path::Path,
    time::Instant,
};

use anyhow::{Context, Result, bail};
use interceptor_tests::{
    Node, Pod,
    agent::Agent,
    control_plane::{AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT, Scope},
    objects::{new_namespace, new_pod},
};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Api;
use serde_json::{Value, json};

use crate::{
    METADATA, World, agent_metric, bulk, credentials_path,
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

/// The audit policy of the run: ServiceAccount requests by the agent's ServiceAccount,
/// with their URIs (Metadata level: no bodies); nothing else, so the log stays small
/// while the bench creates 20,000 ServiceAccounts.
pub fn audit_policy() -> String {
    format!(
        "apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n\
         - level: Metadata\n  users: [\"{}\"]\n  resources:\n  - group: \"\"\n    \
         resources: [\"serviceaccounts\"]\n\
         - level: None\n",
        agent_user()
    )
}

/// The user the agent's token authenticates as.
fn agent_user() -> String {
    format!("system:serviceaccount:{AGENT_NAMESPACE}:{AGENT_SERVICE_ACCOUNT}")
}

/// What one agent showed.
struct Measured {
    namespaces: usize,
    rss_kib: u64,
    peak_kib: u64,
    /// What the agent asked the API server for: ServiceAccounts (`namespace/name`) it
    /// watched, and any it requested.
    asked: Asked,
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

/// Grows the cluster to `namespaces` `team-N` namespaces (no-op if it has them): each
/// with [`ACCOUNTS`] ServiceAccounts naming [`ROLE`], and one pod on another node (as
/// `app`) per 100 namespaces. Through the API, many requests at once ([`bulk`]). The
/// namespaces get no `default` ServiceAccount: no pod here runs as it, and the agent
/// never lists ServiceAccounts, so 10,000 more objects would only slow the setup.
pub async fn grow_cluster(world: &World<'_>, namespaces: usize) -> Result<()> {
    let have = *world.teams();
    if have >= namespaces {
        return Ok(());
    }
    let started = Instant::now();
    let client = &world.client;
    bulk::create_all(
        (have..namespaces)
            .map(|index| new_namespace(&namespace(index)))
            .collect(),
        |_| Api::all(client.clone()),
    )
    .await?;
    let accounts: Vec<ServiceAccount> = (have..namespaces)
        .flat_map(|index| ACCOUNTS.map(|name| account(&namespace(index), name)))
        .collect();
    let created_accounts = accounts.len();
    bulk::create_namespaced(client, accounts).await?;
    let elsewhere: Vec<_> = (have..namespaces)
        .filter(|index| index % 100 == 99)
        .map(|index| {
            let mut pod = new_pod(&namespace(index), "elsewhere", OTHER_NODE);
            pod.spec.get_or_insert_default().service_account_name = Some("app".into());
            pod
        })
        .collect();
    let created_pods = elsewhere.len();
    bulk::create_namespaced(client, elsewhere).await?;
    *world.teams() = namespaces;
    println!(
        "cluster grown to {namespaces} namespaces: {} namespaces, {created_accounts} \
         ServiceAccounts and {created_pods} pods created in {:.1} s",
        namespaces - have,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What the agent asked for, from the audit log.
#[derive(Debug, Default, PartialEq)]
struct Asked {
    /// ServiceAccounts (`namespace/name`) it watched.
    watched: BTreeSet<String>,
    /// ServiceAccounts it made any request for (watches included).
    requested: BTreeSet<String>,
}

/// The agent's ServiceAccount requests in the audit log after byte `from`.
fn asked_since(log: &Path, from: u64) -> Result<Asked> {
    let mut file =
        std::fs::File::open(log).with_context(|| format!("the audit log {}", log.display()))?;
    file.seek(SeekFrom::Start(from))?;
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    asked(&text, &agent_user())
}

/// Where the audit log ends now (0 before its first event).
fn audit_end(log: &Path) -> u64 {
    std::fs::metadata(log).map_or(0, |meta| meta.len())
}

/// The ServiceAccounts `user` asked for in `log` (audit events, one JSON object a line;
/// each request counted once, at its `RequestReceived` stage, which is written while the
/// client waits, so before the agent that sent it is stopped). Fails if a request did not
/// name one ServiceAccount (a namespace's or the cluster's, i.e. a wider watch).
fn asked(log: &str, user: &str) -> Result<Asked> {
    let mut asked = Asked::default();
    for line in log.lines().filter(|line| !line.trim().is_empty()) {
        let event: Value =
            serde_json::from_str(line).with_context(|| format!("an audit event: {line}"))?;
        if event["stage"] != "RequestReceived"
            || event["user"]["username"] != user
            || event["objectRef"]["resource"] != "serviceaccounts"
        {
            continue;
        }
        let uri = event["requestURI"].as_str().unwrap_or_default();
        let verb = event["verb"].as_str().unwrap_or_default();
        let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
        let selected = form_urlencoded::parse(query.as_bytes())
            .find(|(key, _)| key == "fieldSelector")
            .and_then(|(_, value)| {
                value
                    .strip_prefix("metadata.name=")
                    .filter(|name| !name.is_empty() && !name.contains(','))
                    .map(str::to_owned)
            });
        let (namespace, named) = path
            .strip_prefix("/api/v1/namespaces/")
            .and_then(|rest| rest.split_once("/serviceaccounts"))
            .with_context(|| {
                format!("a ServiceAccount request outside a namespace: {verb} {uri}")
            })?;
        let name = match named.strip_prefix('/') {
            Some(name) if !name.is_empty() && !name.contains('/') => Some(name.to_owned()),
            _ if named.is_empty() => selected,
            _ => None,
        };
        let Some(name) = name else {
            bail!("a ServiceAccount request not for one object: {verb} {uri}");
        };
        let key = format!("{namespace}/{name}");
        if verb == "watch" {
            asked.watched.insert(key.clone());
        }
        asked.requested.insert(key);
    }
    Ok(asked)
}

/// Scenario 8's node and pods, with the baseline measured.
pub struct ServiceAccounts<'a> {
    scope: Scope<'a>,
    pods: Vec<Pod>,
    baseline: Measured,
}

impl<'a> ServiceAccounts<'a> {
    /// The pods on a node of their own in a cluster grown to [`BASELINE_NAMESPACES`], and
    /// the baseline agent measured there.
    pub async fn baseline(world: &World<'a>, node: &Node) -> Result<Self> {
        let scope = world.scope.plane.scope("bench-sa");
        scope.add_node(&[]).await;
        grow_cluster(world, BASELINE_NAMESPACES).await?;
        let mut pods = Vec::new();
        for (index, (ns, service_account)) in NODE_PODS.into_iter().enumerate() {
            let mut api_pod = new_pod(&namespace(ns), &format!("sa-{index}"), &scope.node);
            api_pod.spec.get_or_insert_default().service_account_name =
                Some(service_account.to_owned());
            let created = scope.create_pod(api_pod).await;
            let pod = node.pod_with_uid(created.metadata.uid.clone().context("a pod's UID")?);
            scope.set_running(&created, &pod).await;
            pods.push(pod);
        }
        let baseline = measure(world, &scope, node, &pods, true).await?;
        Ok(Self {
            scope,
            pods,
            baseline,
        })
    }

    /// The same pods in the grown cluster, with and without ServiceAccount roles; the
    /// figures against the baseline.
    pub async fn large(self, world: &World<'_>, node: &Node, report: &mut Report) -> Result<()> {
        let large = measure(world, &self.scope, node, &self.pods, true).await?;
        let control = measure(world, &self.scope, node, &self.pods, false).await?;
        figures(self.baseline, large, control, report)
    }
}

/// One agent on the cluster as it is now; with `roles_on` false, the control: no
/// ServiceAccount roles (`--no-service-account-roles`), the same role as the default.
async fn measure(
    world: &World<'_>,
    scope: &Scope<'_>,
    node: &Node,
    pods: &[Pod],
    roles_on: bool,
) -> Result<Measured> {
    let namespaces = *world.teams();
    let control = ["--no-service-account-roles", "--default-role", ROLE];
    let log = scope.plane.audit_log();
    let from = audit_end(&log);
    let agent = start_agent_on(
        world,
        scope,
        &format!("bench-accounts-{namespaces}-{roles_on}"),
        node,
        if roles_on { &[] } else { &control },
    )
    .await;
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
        asked: asked_since(&log, from)?,
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

fn figures(
    baseline: Measured,
    large: Measured,
    control: Measured,
    report: &mut Report,
) -> Result<()> {
    let expected: BTreeSet<String> = NODE_PODS
        .iter()
        .map(|(ns, service_account)| format!("{}/{service_account}", namespace(*ns)))
        .collect();
    for measured in [&baseline, &large] {
        if measured.asked.watched != expected
            || measured.asked.requested != expected
            || measured.followed != Some(expected.len() as f64)
        {
            bail!(
                "{} namespaces: the agent watched {:?}, asked for {:?} (and follows {:?}), its node's pods use {expected:?}",
                measured.namespaces,
                measured.asked.watched,
                measured.asked.requested,
                measured.followed
            );
        }
    }
    if !control.asked.requested.is_empty() {
        bail!(
            "--no-service-account-roles, yet ServiceAccounts were asked for: {:?}",
            control.asked.requested
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
        ours: large.asked.watched.len() as f64,
        baseline: Some(baseline.asked.watched.len() as f64),
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
                "api_server": "kube-apiserver, audit log",
                "agent_namespaces": measured.tracked_namespaces,
                "rss_mib": mib(measured.rss_kib),
                "peak_mib": mib(measured.peak_kib),
                "watched": measured.asked.watched,
                "requested": measured.asked.requested,
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

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: &str = "system:serviceaccount:interceptor-system:interceptor";

    /// An audit event as kube-apiserver writes it (the fields read here).
    fn event(stage: &str, user: &str, verb: &str, uri: &str) -> String {
        json!({
            "kind": "Event", "apiVersion": "audit.k8s.io/v1", "level": "Metadata",
            "auditID": "0", "stage": stage, "requestURI": uri, "verb": verb,
            "user": { "username": user },
            "objectRef": { "resource": "serviceaccounts", "apiVersion": "v1" },
        })
        .to_string()
    }

    #[test]
    fn single_object_watches_and_lists_are_counted_once_per_request() {
        let log = [
            event(
                "RequestReceived",
                AGENT,
                "list",
                "/api/v1/namespaces/team-0/serviceaccounts?fieldSelector=metadata.name%3Dapp",
            ),
            event(
                "RequestReceived",
                AGENT,
                "watch",
                "/api/v1/namespaces/team-0/serviceaccounts?allowWatchBookmarks=true&fieldSelector=metadata.name%3Dapp&resourceVersion=12&watch=true",
            ),
            // The same watch's later stages, and the administrator's creations.
            event(
                "ResponseComplete",
                AGENT,
                "watch",
                "/api/v1/serviceaccounts?watch=true",
            ),
            event(
                "RequestReceived",
                "interceptor-test-admin",
                "create",
                "/api/v1/namespaces/team-1/serviceaccounts",
            ),
            event(
                "RequestReceived",
                AGENT,
                "get",
                "/api/v1/namespaces/team-1/serviceaccounts/batch",
            ),
        ]
        .join("\n");
        let asked = asked(&log, AGENT).unwrap();
        assert_eq!(asked.watched, BTreeSet::from(["team-0/app".to_owned()]));
        assert_eq!(
            asked.requested,
            BTreeSet::from(["team-0/app".to_owned(), "team-1/batch".to_owned()])
        );
    }

    #[test]
    fn a_request_for_more_than_one_service_account_fails_the_count() {
        for uri in [
            "/api/v1/serviceaccounts?limit=500",
            "/api/v1/serviceaccounts?fieldSelector=metadata.name%3Dapp&watch=true",
            "/api/v1/namespaces/team-0/serviceaccounts?watch=true",
            "/api/v1/namespaces/team-0/serviceaccounts?fieldSelector=metadata.namespace%3Dteam-0",
            "/api/v1/namespaces/team-0/serviceaccounts?fieldSelector=metadata.name%3Dapp%2Cmetadata.name%3Dbatch",
        ] {
            let log = event("RequestReceived", AGENT, "watch", uri);
            let error = asked(&log, AGENT).expect_err(uri).to_string();
            assert!(
                error.contains("not for one object") || error.contains("outside a namespace"),
                "{uri}: {error}"
            );
        }
    }
}
