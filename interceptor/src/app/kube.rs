//! Kubernetes mode: callers are this node's pods. It plugs into the app the pod and
//! namespace watches, the resolver (cgroup -> pod -> policy), and its tasks: opt-outs,
//! prefetch and sweep, namespace pruning, and the startup taint's removal once ready.

use std::{sync::Arc, time::Duration};

use anyhow::Result;
use tokio::task::JoinSet;

use super::{
    Shared, admin,
    readiness::{Latch, Readiness},
};
use crate::{
    audit::{self, AuditLog, ChosenBy},
    config::KubeConfig,
    credentials::{Credentials, CredentialsError, RoleRequest},
    ebpf::Attributed,
    identity::index::Resolved,
    imds::{self, Authorization, CredentialsFailure, server::Unserved},
    k8s::{
        self, EventSink, Lookup, NamespaceStore, PodInfo, PodStore, ServiceAccountStore, events,
    },
    metrics::Metrics,
    observe::Who,
    optout::OptOuts,
    policy::PolicyConfig,
    resolve::{Caller, Outcome, Refusal, Resolver, Verdict},
};

/// How often opt-outs (node-identity pods) are synced into the kernel's exempt map.
const OPT_OUT_INTERVAL: Duration = Duration::from_secs(2);
/// How often compiled policies of deleted namespaces are forgotten.
const PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// The metadata server's view of pods.
pub(super) struct KubeBackend {
    resolver: Arc<Resolver>,
    shared: Arc<Shared>,
    events: EventSink,
    audit: AuditLog,
}

/// A pod's role for one request, and the request its credentials are fetched with; how
/// the role was chosen and the cgroup and process that asked, for the audit record.
pub(super) struct PodGrant {
    pod: Arc<PodInfo>,
    request: RoleRequest,
    chosen_by: ChosenBy,
    /// `None` for a caller with no connection behind it (no audit record then).
    cgroup: Option<Arc<Resolved>>,
    pid: u32,
}

impl imds::Grant for PodGrant {
    fn arn(&self) -> &str {
        &self.request.role_arn
    }

    fn chosen_by(&self) -> ChosenBy {
        self.chosen_by
    }
}

/// A container as observe mode's report names it: the id its pod's status shows
/// (`containerd://...`), else the cgroup's path.
fn container_of(cgroup: &Resolved) -> String {
    cgroup
        .identity
        .as_ref()
        .ok()
        .and_then(|identity| identity.container.as_ref())
        .map_or_else(
            || cgroup.path.clone(),
            crate::identity::ContainerRef::status_id,
        )
}

impl KubeBackend {
    /// A refused connection, named as far as the kernel's record and the cgroup tell.
    fn unserved(&self, record: Attributed, refusal: &Refusal) -> Unserved {
        let by_id = || format!("cgroup id {}", record.cgroup_id);
        let (pod, container) = match refusal {
            Refusal::UnknownCgroup { .. } => (String::new(), by_id()),
            Refusal::NotAPod { path, .. } => (String::new(), path.clone()),
            Refusal::UnknownPod { uid } | Refusal::DeletedPod { uid } => (
                format!("uid {uid}"),
                self.resolver
                    .index()
                    .resolve(record.cgroup_id, record.pid)
                    .map_or_else(by_id, |cgroup| container_of(&cgroup)),
            ),
        };
        Unserved {
            reason: refusal.metric_label(),
            who: Who {
                namespace: String::new(),
                pod,
                container,
            },
        }
    }
}

impl imds::Backend for KubeBackend {
    type Caller = Caller;
    type Grant = PodGrant;

    async fn caller(&self, record: Attributed) -> Result<Caller, Unserved> {
        match self.resolver.caller(record).await {
            Ok(caller) => Ok(caller),
            Err(refusal) => {
                self.shared
                    .metrics
                    .caller_refusals
                    .with_label_values(&[refusal.metric_label()])
                    .inc();
                tracing::debug!(?refusal, cgroup_id = record.cgroup_id, "connection refused");
                Err(self.unserved(record, &refusal))
            }
        }
    }

    fn binding<'a>(&self, caller: &'a Caller) -> &'a str {
        &caller.uid
    }

    fn who(&self, caller: &Caller) -> Who {
        let container = caller
            .cgroup()
            .map_or_else(String::new, |cgroup| container_of(cgroup));
        match self.resolver.pods().get(&caller.uid) {
            Lookup::Found(pod) => Who {
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
                container,
            },
            // Deleted since the connection was attributed.
            _ => Who {
                namespace: String::new(),
                pod: format!("uid {}", caller.uid),
                container,
            },
        }
    }

    fn authorize(&self, caller: &Caller) -> Authorization<PodGrant> {
        let verdict = self.resolver.decide(caller);
        let label = match &verdict {
            Verdict::Decided { outcome, .. } => outcome.metric_label(),
            Verdict::Gone => "gone",
        };
        self.shared
            .metrics
            .authorizations
            .with_label_values(&[label])
            .inc();
        match verdict {
            Verdict::Decided {
                pod,
                outcome: Outcome::Role { request, source },
            } => Authorization::Role(PodGrant {
                pod,
                request,
                chosen_by: source.into(),
                cgroup: caller.cgroup().cloned(),
                pid: caller.pid,
            }),
            Verdict::Decided {
                outcome: Outcome::NoRole,
                ..
            } => Authorization::NoRole,
            _ => Authorization::Denied(label),
        }
    }

    async fn credentials(&self, grant: &PodGrant) -> Result<Arc<Credentials>, CredentialsFailure> {
        let pod = &grant.pod;
        match self.shared.credentials(&grant.request).await {
            Ok(credentials) => {
                let handed = audit::Handed {
                    role_arn: &grant.request.role_arn,
                    access_key_id: &credentials.access_key_id,
                    expiration: credentials.expiration,
                    chosen_by: grant.chosen_by,
                };
                if let Some(cgroup) = &grant.cgroup
                    && let Some(record) =
                        self.audit
                            .handed_out(cgroup.cgroup_id, &pod.uid, &handed, || {
                                audit::Container::of(cgroup, grant.pid, pod)
                            })
                {
                    record.log();
                }
                Ok(credentials)
            }
            Err(error @ CredentialsError::Refused { .. }) => {
                if self
                    .events
                    .warn(pod, "AssumeRoleFailed", error.event_message())
                    == events::Posted::Sent
                {
                    tracing::warn!(pod = %pod.key(), %error, "STS refused the pod's role");
                }
                Err(super::refused(&error))
            }
            Err(error) => {
                tracing::warn!(pod = %pod.key(), %error, "no credentials to serve");
                Err(CredentialsFailure::Unavailable)
            }
        }
    }
}

/// What the Kubernetes mode plugs into the app.
pub(super) struct Kube {
    pub(super) backend: Arc<KubeBackend>,
    pub(super) state: Arc<KubeState>,
}

/// Starts the watches and the mode's tasks (owned by `tasks`); `synced` is released
/// once both stores have synced.
///
/// In observe mode nothing is assumed (no prefetch: observe mode never calls STS) and no
/// Event is posted: a Warning saying a pod's role was refused would be false while the
/// pod is served the node's credentials; the report says what enforcement would refuse.
pub(super) async fn start(
    config: &KubeConfig,
    observe: bool,
    policy: PolicyConfig,
    shared: &Arc<Shared>,
    tasks: &mut JoinSet<()>,
    synced: Latch,
    ready: Readiness,
) -> Result<Kube> {
    let client = k8s::client(config.kubeconfig.as_deref()).await?;
    let (pods, namespaces) = (PodStore::new(), NamespaceStore::new());
    tasks.spawn(k8s::pods::watch(
        client.clone(),
        config.node.clone(),
        pods.clone(),
    ));
    tasks.spawn(k8s::namespaces::watch(client.clone(), namespaces.clone()));
    let events = EventSink::new(
        (!observe).then(|| client.clone()),
        Some(config.node.clone()),
        events::Limits::default(),
    );
    let resolver = Resolver::new(
        shared.index.clone(),
        pods.clone(),
        namespaces.clone(),
        policy,
        config.node_identity_namespaces.clone(),
        config.unknown_pod_wait,
        events.clone(),
    )
    .with_session(config.session.clone());
    let accounts = config.service_account_roles.then(ServiceAccountStore::new);
    let resolver = match &accounts {
        Some(accounts) => {
            tasks.spawn(k8s::service_accounts::follow(
                client.clone(),
                pods.clone(),
                accounts.clone(),
            ));
            resolver.with_service_accounts(accounts.clone())
        }
        None => resolver,
    };
    let resolver = Arc::new(resolver);
    tasks.spawn(
        OptOuts::new(resolver.clone(), pods.clone(), shared.datapath.exempt())
            .run(OPT_OUT_INTERVAL),
    );
    tasks.spawn(super::prefetch::follow_pods(
        resolver.clone(),
        pods.clone(),
        namespaces.clone(),
        shared.credentials.clone(),
        config.prefetch && !observe,
    ));
    {
        let resolver = resolver.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(PRUNE_INTERVAL);
            loop {
                tick.tick().await;
                resolver.prune();
            }
        });
    }
    {
        let (pods, namespaces) = (pods.clone(), namespaces.clone());
        let (node, taint) = (config.node.clone(), config.startup_taint.clone());
        tasks.spawn(async move {
            pods.wait_synced().await;
            namespaces.wait_synced().await;
            tracing::info!("pod and namespace stores synced");
            drop(synced);
            // Pods may come once the kernel steers them to this agent (after the sync).
            ready.released().await;
            k8s::node::remove_taint_until_done(client, node, taint).await;
        });
    }
    let backend = Arc::new(KubeBackend {
        resolver: resolver.clone(),
        shared: shared.clone(),
        events,
        audit: AuditLog::new(config.node.clone()),
    });
    let state = Arc::new(KubeState {
        shared: shared.clone(),
        resolver,
        pods,
        namespaces,
        accounts,
    });
    Ok(Kube { backend, state })
}

/// What the admin endpoints show in Kubernetes mode.
pub(super) struct KubeState {
    shared: Arc<Shared>,
    resolver: Arc<Resolver>,
    pods: Arc<PodStore>,
    namespaces: Arc<NamespaceStore>,
    /// The ServiceAccounts followed (one watch each), unless `--no-service-account-roles`.
    accounts: Option<Arc<ServiceAccountStore>>,
}

impl admin::State for KubeState {
    fn refresh(&self, metrics: &Metrics) {
        let tracked = &metrics.tracked;
        tracked
            .with_label_values(&["pods"])
            .set(self.pods.len() as i64);
        tracked
            .with_label_values(&["namespaces"])
            .set(self.namespaces.len() as i64);
        if let Some(accounts) = &self.accounts {
            tracked
                .with_label_values(&["service_accounts"])
                .set(accounts.len() as i64);
        }
        self.shared.refresh(metrics);
    }

    fn debug_store(&self) -> serde_json::Value {
        let pods: Vec<serde_json::Value> = self
            .pods
            .pods()
            .into_iter()
            .map(|pod| {
                let cgroups = self.shared.index.cgroups_of_pod(&pod.uid);
                let decision = match self.resolver.decide(&Caller::for_pod(&pod.uid)) {
                    Verdict::Decided {
                        outcome: Outcome::Role { request, source },
                        ..
                    } => format!("role {} ({source:?})", request.role_arn),
                    Verdict::Decided {
                        outcome: Outcome::NoRole,
                        ..
                    } => "no role".into(),
                    Verdict::Decided {
                        outcome: Outcome::Denied(reason),
                        ..
                    } => format!("denied: {reason}"),
                    Verdict::Decided {
                        outcome: Outcome::NodeIdentity,
                        ..
                    } => "node identity (exempt)".into(),
                    Verdict::Gone => "gone".into(),
                };
                serde_json::json!({
                    "pod": pod.key(), "uid": pod.uid, "host_network": pod.host_network,
                    "cgroups": cgroups, "decision": decision,
                })
            })
            .collect();
        serde_json::json!({ "pods": pods, "credentials": self.shared.debug_credentials() })
    }
}
