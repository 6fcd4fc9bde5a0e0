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
    credentials::{RoleRequest, session_name},
    ebpf::Attributed,
    identity::index::{CgroupIndex, Resolved},
    k8s::{EventSink, Lookup, NamespaceStore, PodInfo, PodStore},
    policy::{Decision, DenyReason, NamespacePolicy, PolicyConfig, RoleSource},
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
    pub cgroup: Arc<Resolved>,
    pub pid: u32,
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
    fn of(decision: Decision, pod: &PodInfo) -> Self {
        match decision {
            Decision::Role {
                arn,
                external_id,
                source,
            } => Self::Role {
                request: RoleRequest {
                    role_arn: arn.to_string().into(),
                    external_id: external_id.map(Into::into),
                    session_name: session_name(&pod.namespace, &pod.name).into(),
                },
                source,
            },
            Decision::NoRole => Self::NoRole,
            Decision::Denied(reason) => Self::Denied(reason),
        }
    }

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
    /// Compiled namespace policies by name, with the resourceVersion they came from.
    compiled: Mutex<HashMap<String, (String, Arc<NamespacePolicy>)>>,
    /// Each pod's last outcome and what it was decided from: reused while neither the
    /// pod nor its namespace's policy changed (deciding parses the ARN and runs the
    /// namespace's patterns: once per change, not per request), and a change is logged
    /// when it takes effect.
    last: Mutex<HashMap<String, Memo>>,
}

/// A pod's last outcome, and the pod and namespace policy it was decided from (the
/// stores replace both on any change, so pointer equality means "unchanged").
struct Memo {
    pod: Arc<PodInfo>,
    policy: Option<Arc<NamespacePolicy>>,
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
            compiled: Mutex::default(),
            last: Mutex::default(),
        }
    }

    pub fn index(&self) -> &Arc<CgroupIndex> {
        &self.index
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
        match self.pods.wait_for(&uid, self.unknown_pod_wait).await {
            Lookup::Found(_) => Ok(Caller {
                uid,
                cgroup,
                pid: record.pid,
            }),
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

    /// What the pod `uid` may have now: decided once per change of the pod or its
    /// namespace's policy, recalled otherwise. Denials are logged and posted as Events.
    pub fn decide(&self, uid: &str) -> Verdict {
        let Lookup::Found(pod) = self.pods.get(uid) else {
            return Verdict::Gone;
        };
        if self.keeps_node_identity(&pod) {
            self.remember(&pod, None, Outcome::NodeIdentity);
            return Verdict::Decided {
                pod,
                outcome: Outcome::NodeIdentity,
            };
        }
        let policy = self.namespace_policy(&pod.namespace);
        let outcome = match self.recall(&pod, &policy) {
            Some(outcome) => outcome,
            None => {
                let decision = crate::policy::decide(&pod.annotations, &policy, &self.policy);
                let outcome = Outcome::of(decision, &pod);
                self.remember(&pod, Some(policy), outcome.clone());
                outcome
            }
        };
        if let Outcome::Denied(reason) = &outcome
            && self
                .events
                .warn(&pod, reason.event_reason(), reason.to_string())
                == crate::k8s::events::Posted::Sent
        {
            tracing::warn!(pod = %pod.key(), %reason, "role refused");
        }
        Verdict::Decided { pod, outcome }
    }

    /// The outcome decided for this very pod object under this very namespace policy.
    fn recall(&self, pod: &Arc<PodInfo>, policy: &Arc<NamespacePolicy>) -> Option<Outcome> {
        let last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let memo = last.get(&pod.uid)?;
        let same = Arc::ptr_eq(&memo.pod, pod)
            && memo
                .policy
                .as_ref()
                .is_some_and(|seen| Arc::ptr_eq(seen, policy));
        match &memo.outcome {
            Outcome::NodeIdentity => None,
            outcome if same => Some(outcome.clone()),
            _ => None,
        }
    }

    /// Stores a pod's outcome, logging it when it differs from the last one. Entries of
    /// pods that are gone are dropped whenever the map outgrows the pods on the node.
    fn remember(&self, pod: &Arc<PodInfo>, policy: Option<Arc<NamespacePolicy>>, now: Outcome) {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(before) = last.get(&pod.uid)
            && before.outcome != now
        {
            tracing::info!(pod = %pod.key(), from = %before.outcome, to = %now, "decision changed");
        }
        last.insert(
            pod.uid.clone(),
            Memo {
                pod: Arc::clone(pod),
                policy,
                outcome: now,
            },
        );
        if last.len() > 2 * self.pods.len() + 64 {
            last.retain(|uid, _| matches!(self.pods.get(uid), Lookup::Found(_)));
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
