//! Who is asking, and what may they have: kernel record -> cgroup -> pod -> policy.
//!
//! A connection is attributed once ([`Resolver::caller`]): the kernel's cgroup id becomes
//! a pod UID through the cgroup index, and the pod is looked up in the node's pod store,
//! waiting a bounded time for a pod the watch has not delivered yet. The role is decided
//! per request ([`Resolver::decide`]) from the pod's and its namespace's current
//! annotations, so a change takes effect on the next request. Every refusal is logged
//! once per (pod, reason) and posted as a rate-limited Event on the pod.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{
    credentials::{RoleRequest, SessionTags, session_name},
    ebpf::Attributed,
    identity::index::{CgroupIndex, Resolved},
    k8s::{
        EventSink, Lookup, NamespaceStore, PodInfo, PodStore, ServiceAccountStore,
        service_accounts::Account,
    },
    policy::{self, Decision, DenyReason, NamespacePolicy, PolicyConfig, RoleSource, Subject},
};

/// Annotation on a pod asking to keep the node's own identity (CNI and CSI agents...).
/// Honoured only in namespaces that allow it (see [`ALLOW_NODE_IDENTITY`]) or that are
/// listed with `--node-identity-namespace`, so a workload cannot opt itself out.
pub const NODE_IDENTITY: &str = "interceptor.dev/node-identity";
/// Namespace annotation (set by cluster admins) allowing pods in it to opt out.
pub const ALLOW_NODE_IDENTITY: &str = "interceptor.dev/allow-node-identity";

/// Why a connection is not served for any pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The cgroup no longer exists, or is not under the pods' tree.
    UnknownCgroup { cgroup_id: u64 },
    /// The cgroup is not a pod's (a kubepods or QoS slice, a stray process).
    NotAPod { path: String, reason: String },
    /// The watch has not delivered the pod within the wait.
    UnknownPod { uid: String },
    /// The pod was deleted: its cgroups get nothing.
    DeletedPod { uid: String },
}

impl Refusal {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::UnknownCgroup { .. } => "unknown_cgroup",
            Self::NotAPod { .. } => "not_a_pod",
            Self::UnknownPod { .. } => "unknown_pod",
            Self::DeletedPod { .. } => "deleted_pod",
        }
    }
}

/// An attributed connection's caller: a pod of this node, known by its UID (what its
/// IMDSv2 tokens are bound to), with the cgroup and process the kernel recorded (what the
/// audit record names).
#[derive(Debug, Clone)]
pub struct Caller {
    pub uid: String,
    /// The connection's cgroup (`None`: a caller known only by its pod, with no
    /// connection behind it, as for prefetch and `/debug/store`).
    cgroup: Option<Arc<Resolved>>,
    /// The process that connected (0 with no connection), for the audit record.
    pub pid: u32,
}

impl Caller {
    /// A caller known only by its pod (prefetch, `/debug/store`): no connection behind it.
    pub fn for_pod(uid: &str) -> Self {
        Self {
            uid: uid.to_owned(),
            cgroup: None,
            pid: 0,
        }
    }

    /// The connection's cgroup, when there is a connection behind this caller.
    pub fn cgroup(&self) -> Option<&Arc<Resolved>> {
        self.cgroup.as_ref()
    }

    /// Which of `pod`'s containers this caller is, for `container-roles`.
    fn container<'a>(&self, pod: &'a PodInfo) -> policy::Caller<'a> {
        match self.cgroup.as_ref().map(|cgroup| &cgroup.identity) {
            // No connection behind it: the pod as a whole.
            None | Some(Err(_)) => policy::Caller::Pod,
            Some(Ok(identity)) => identity
                .container
                .as_ref()
                .and_then(|container| pod.container_name(&container.id))
                .map_or(policy::Caller::Unattributed, policy::Caller::Container),
        }
    }
}

/// What a pod may have right now, as decided from its and its namespace's annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The role and the STS request for it (built once per decision, shared after).
    Role {
        request: RoleRequest,
        source: RoleSource,
    },
    /// No annotation (or an empty one) and no default role.
    NoRole,
    Denied(DenyReason),
    /// The pod keeps the node's identity: it should not have been redirected (its cgroups
    /// are in the kernel's exempt map once the agent has seen them); refused meanwhile.
    NodeIdentity,
}

impl Outcome {
    /// Low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Role { .. } => "role",
            Self::NoRole => "no_role",
            Self::Denied(reason) => reason.metric_label(),
            Self::NodeIdentity => "node_identity",
        }
    }
}

/// What a caller may have right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Decided {
        pod: Arc<PodInfo>,
        outcome: Outcome,
    },
    /// Deleted since the connection was attributed.
    Gone,
}

pub struct Resolver {
    index: Arc<CgroupIndex>,
    pods: Arc<PodStore>,
    namespaces: Arc<NamespaceStore>,
    policy: PolicyConfig,
    node_identity_namespaces: BTreeSet<String>,
    unknown_pod_wait: Duration,
    events: EventSink,
    /// `--session-tags`, `--cluster-name`, `--source-identity`.
    session: SessionSettings,
    /// The ServiceAccounts of the node's pods (`None`: roles on ServiceAccounts are off).
    service_accounts: Option<Arc<ServiceAccountStore>>,
    /// Compiled namespace policies by name, with the resourceVersion they came from.
    compiled: Mutex<HashMap<String, (String, Arc<NamespacePolicy>)>>,
    /// Each pod's last outcome and what it was decided from: reused while neither the
    /// pod nor its namespace's policy changed (deciding parses the ARN and runs the
    /// namespace's patterns: once per change, not per request), and a change is logged
    /// when it takes effect. By pod UID, then by caller (a pod has a few containers): a
    /// request looks its memo up without building a key.
    last: Mutex<HashMap<String, Vec<(MemoCaller, Memo)>>>,
}

/// What the role session carries besides its name.
#[derive(Debug, Clone, Default)]
pub struct SessionSettings {
    /// `--session-tags`: EKS Pod Identity's transitive session tags.
    pub tags: bool,
    /// `--cluster-name`: the `eks-cluster-name` tag.
    pub cluster_name: Option<String>,
    /// `--source-identity`: SourceIdentity from the namespace and pod name.
    pub source_identity: bool,
}

/// Whom a memoised outcome is for: the pod as a whole, or one of its containers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum MemoCaller {
    Pod,
    Container(String),
    Unattributed,
}

impl MemoCaller {
    fn is(&self, caller: policy::Caller<'_>) -> bool {
        match (self, caller) {
            (Self::Pod, policy::Caller::Pod) => true,
            (Self::Container(name), policy::Caller::Container(asking)) => name == asking,
            (Self::Unattributed, policy::Caller::Unattributed) => true,
            _ => false,
        }
    }
}

impl From<policy::Caller<'_>> for MemoCaller {
    fn from(caller: policy::Caller<'_>) -> Self {
        match caller {
            policy::Caller::Pod => Self::Pod,
            policy::Caller::Container(name) => Self::Container(name.to_owned()),
            policy::Caller::Unattributed => Self::Unattributed,
        }
    }
}

/// A pod's last outcome, and the pod and namespace policy it was decided from (the
/// stores replace both on any change, so pointer equality means "unchanged").
struct Memo {
    pod: Arc<PodInfo>,
    policy: Option<Arc<NamespacePolicy>>,
    /// The pod's ServiceAccount as it was (replaced on any change, like the others).
    account: Option<Arc<Account>>,
    outcome: Outcome,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NodeIdentity => f.write_str("node identity"),
            Self::Role { request, .. } => write!(f, "role {}", request.role_arn),
            Self::NoRole => f.write_str("no role"),
            Self::Denied(reason) => write!(f, "refused: {reason}"),
        }
    }
}

impl Resolver {
    pub fn new(
        index: Arc<CgroupIndex>,
        pods: Arc<PodStore>,
        namespaces: Arc<NamespaceStore>,
        policy: PolicyConfig,
        node_identity_namespaces: BTreeSet<String>,
        unknown_pod_wait: Duration,
        events: EventSink,
    ) -> Self {
        Self {
            index,
            pods,
            namespaces,
            policy,
            node_identity_namespaces,
            unknown_pod_wait,
            events,
            session: SessionSettings::default(),
            service_accounts: None,
            compiled: Mutex::default(),
            last: Mutex::default(),
        }
    }

    /// Roles named on ServiceAccounts apply (pod first, then ServiceAccount, then default).
    #[must_use]
    pub fn with_service_accounts(mut self, store: Arc<ServiceAccountStore>) -> Self {
        self.service_accounts = Some(store);
        self
    }

    /// What role sessions carry besides their name (default: nothing).
    #[must_use]
    pub fn with_session(mut self, session: SessionSettings) -> Self {
        self.session = session;
        self
    }

    /// What a decision gives: for a role, the AssumeRole request, built once here.
    ///
    /// Session names are `<namespace>.<pod>`, and `<namespace>.<pod>@<container>` for a
    /// container's own role ([`session_name`] keeps them within STS's limits and unique).
    fn outcome(&self, pod: &PodInfo, decision: Decision) -> Outcome {
        let (arn, external_id, source, container) = match decision {
            Decision::Role {
                arn,
                external_id,
                source,
                container,
            } => (arn, external_id, source, container),
            Decision::NoRole => return Outcome::NoRole,
            Decision::Denied(reason) => return Outcome::Denied(reason),
        };
        let mut tags = SessionTags::default();
        if self.session.tags {
            let mut add = |key: &str, value: &str| tags.push(key, value);
            if let Some(cluster) = &self.session.cluster_name {
                add("eks-cluster-name", cluster);
            }
            add("kubernetes-namespace", &pod.namespace);
            add(
                "kubernetes-service-account",
                pod.service_account.as_deref().unwrap_or("default"),
            );
            add("kubernetes-pod-name", &pod.name);
            add("kubernetes-pod-uid", &pod.uid);
            if let Some(container) = &container {
                add("kubernetes-container-name", container);
            }
        }
        let source_identity = self
            .session
            .source_identity
            .then(|| crate::credentials::source_identity(&pod.namespace, &pod.name).into());
        Outcome::Role {
            request: RoleRequest {
                role_arn: arn.to_string().into(),
                external_id: external_id.map(Into::into),
                session_name: session_name(&pod.namespace, &pod.name, container.as_deref()).into(),
                tags,
                source_identity,
            },
            source,
        }
    }

    pub fn index(&self) -> &Arc<CgroupIndex> {
        &self.index
    }

    /// The node's pods, as the watch delivers them.
    pub fn pods(&self) -> &Arc<PodStore> {
        &self.pods
    }

    /// The pod behind a kernel record.
    pub async fn caller(&self, record: Attributed) -> Result<Caller, Refusal> {
        let cgroup =
            self.index
                .resolve(record.cgroup_id, record.pid)
                .ok_or(Refusal::UnknownCgroup {
                    cgroup_id: record.cgroup_id,
                })?;
        let uid = match &cgroup.identity {
            Ok(identity) => identity.pod_uid.as_str().to_owned(),
            Err(reason) => {
                return Err(Refusal::NotAPod {
                    path: cgroup.path.clone(),
                    reason: reason.clone(),
                });
            }
        };
        let deadline = tokio::time::Instant::now() + self.unknown_pod_wait;
        match self.pods.wait_for(&uid, self.unknown_pod_wait).await {
            Lookup::Found(pod) => {
                // Its ServiceAccount may name its role: wait (the same bound) for it.
                if let Some(accounts) = &self.service_accounts {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    accounts.wait_known(&pod, left).await;
                }
                Ok(Caller {
                    uid,
                    cgroup: Some(cgroup),
                    pid: record.pid,
                })
            }
            Lookup::Deleted => Err(Refusal::DeletedPod { uid }),
            Lookup::Unknown => Err(Refusal::UnknownPod { uid }),
        }
    }

    /// Does this pod keep the node's identity?
    pub fn keeps_node_identity(&self, pod: &PodInfo) -> bool {
        if self.node_identity_namespaces.contains(&pod.namespace) {
            return true;
        }
        let asks = pod
            .annotations
            .get(NODE_IDENTITY)
            .is_some_and(|value| value.trim() == "true");
        asks && self.namespaces.get(&pod.namespace).is_some_and(|ns| {
            ns.annotations
                .get(ALLOW_NODE_IDENTITY)
                .is_some_and(|value| value.trim() == "true")
        })
    }

    fn namespace_policy(&self, namespace: &str) -> Arc<NamespacePolicy> {
        let info = self.namespaces.get(namespace);
        let version = info.as_ref().map_or("", |ns| ns.resource_version.as_str());
        let mut compiled = self
            .compiled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((seen, policy)) = compiled.get(namespace)
            && seen == version
        {
            return Arc::clone(policy);
        }
        let version = version.to_owned();
        let empty = Default::default();
        let annotations = info.as_ref().map_or(&empty, |ns| &ns.annotations);
        let policy = Arc::new(NamespacePolicy::from_annotations(
            namespace,
            annotations,
            &self.policy,
        ));
        compiled.insert(namespace.to_owned(), (version, Arc::clone(&policy)));
        policy
    }

    /// What the caller (its pod, or its container with `container-roles`) may have now:
    /// decided once per change of the pod, its ServiceAccount or its namespace's policy,
    /// recalled otherwise. Denials are logged and posted as Events.
    pub fn decide(&self, caller: &Caller) -> Verdict {
        let Lookup::Found(pod) = self.pods.get(&caller.uid) else {
            return Verdict::Gone;
        };
        if self.keeps_node_identity(&pod) {
            self.remember(&pod, policy::Caller::Pod, None, None, Outcome::NodeIdentity);
            return Verdict::Decided {
                pod,
                outcome: Outcome::NodeIdentity,
            };
        }
        let policy = self.namespace_policy(&pod.namespace);
        let container = caller.container(&pod);
        let account = self
            .service_accounts
            .as_ref()
            .and_then(|store| store.of_pod(&pod));
        let outcome = match self.recall(&pod, container, &policy, account.as_ref()) {
            Some(outcome) => outcome,
            None => {
                let subject = Subject {
                    pod: &pod.annotations,
                    service_account: match account.as_deref() {
                        Some(Account::Known(annotations)) => Some(annotations),
                        _ => None,
                    },
                    // Followed but not listed yet (or not followed yet: the store
                    // follows a pod's ServiceAccount once it sees the pod).
                    service_account_pending: self.service_accounts.is_some()
                        && account
                            .as_deref()
                            .is_none_or(|account| *account == Account::Pending),
                    containers: &pod.containers,
                    caller: container,
                };
                let decision = policy::decide_for(&subject, &policy, &self.policy);
                self.warn_session_name(&pod);
                let outcome = self.outcome(&pod, decision);
                self.remember(&pod, container, Some(policy), account, outcome.clone());
                outcome
            }
        };
        if let Outcome::Denied(reason) = &outcome {
            let message = match container {
                policy::Caller::Container(name) => format!("container {name}: {reason}"),
                _ => reason.to_string(),
            };
            if self
                .events
                .warn(&pod, reason.event_reason(), message.clone())
                == crate::k8s::events::Posted::Sent
            {
                tracing::warn!(pod = %pod.key(), %message, "role refused");
            }
        }
        Verdict::Decided { pod, outcome }
    }

    /// kiam's session-name annotation is not honoured: said once per pod version (the
    /// Event sink rate-limits further).
    fn warn_session_name(&self, pod: &PodInfo) {
        if let Some(name) = pod.annotations.get(policy::KIAM_SESSION_NAME_KEY) {
            let message = format!(
                "annotation {} ({:?}) is ignored: session names are always \
                 <namespace>.<pod>, so CloudTrail can tell pods apart (this one: {})",
                policy::KIAM_SESSION_NAME_KEY,
                name.chars().take(64).collect::<String>(),
                session_name(&pod.namespace, &pod.name, None)
            );
            let _ = self.events.warn(pod, "SessionNameIgnored", message);
        }
    }

    /// The outcome decided for this very pod object, ServiceAccount and namespace policy.
    fn recall(
        &self,
        pod: &Arc<PodInfo>,
        caller: policy::Caller<'_>,
        policy: &Arc<NamespacePolicy>,
        account: Option<&Arc<Account>>,
    ) -> Option<Outcome> {
        let last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (_, memo) = last
            .get(pod.uid.as_str())?
            .iter()
            .find(|(whom, _)| whom.is(caller))?;
        let same = Arc::ptr_eq(&memo.pod, pod)
            && memo
                .policy
                .as_ref()
                .is_some_and(|seen| Arc::ptr_eq(seen, policy))
            && match (&memo.account, account) {
                (None, None) => true,
                (Some(seen), Some(now)) => Arc::ptr_eq(seen, now),
                _ => false,
            };
        match &memo.outcome {
            Outcome::NodeIdentity => None,
            outcome if same => Some(outcome.clone()),
            _ => None,
        }
    }

    /// Stores a pod's outcome, logging it when it differs from the last one. Entries of
    /// pods that are gone are dropped whenever the map outgrows the pods on the node.
    fn remember(
        &self,
        pod: &Arc<PodInfo>,
        caller: policy::Caller<'_>,
        policy: Option<Arc<NamespacePolicy>>,
        account: Option<Arc<Account>>,
        now: Outcome,
    ) {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let memo = Memo {
            pod: Arc::clone(pod),
            policy,
            account,
            outcome: now,
        };
        let Some(callers) = last.get_mut(pod.uid.as_str()) else {
            last.insert(pod.uid.clone(), vec![(caller.into(), memo)]);
            if last.len() > self.pods.len() + 64 {
                last.retain(|uid, _| matches!(self.pods.get(uid), Lookup::Found(_)));
            }
            return;
        };
        match callers.iter_mut().find(|(whom, _)| whom.is(caller)) {
            Some((_, before)) => {
                if before.outcome != memo.outcome {
                    let container = match caller {
                        policy::Caller::Container(name) => name,
                        policy::Caller::Pod => "",
                        policy::Caller::Unattributed => "(unattributed)",
                    };
                    tracing::info!(pod = %pod.key(), container, from = %before.outcome, to = %memo.outcome, "decision changed");
                }
                *before = memo;
            }
            None => callers.push((caller.into(), memo)),
        }
    }

    /// Forgets a deleted pod: its cgroups and its last decision.
    pub fn forget_pod(&self, uid: &str) {
        self.index.forget_pod(uid);
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(uid);
    }

    /// Forgets what is cached about namespaces that are gone (call periodically).
    pub fn prune(&self) {
        let mut compiled = self
            .compiled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        compiled.retain(|namespace, _| self.namespaces.get(namespace).is_some());
    }
}
