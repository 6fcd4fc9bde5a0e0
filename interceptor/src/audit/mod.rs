//! Audit: one structured record for each credential set handed to a container, so that
//! an `AccessKeyId` seen in CloudTrail leads back to the workload (docs/troubleshooting.md).
//!
//! A record is logged under the target [`TARGET`] (JSON with `--log-format json`) the
//! first time a container is handed a given `AccessKeyId`, not on every request: pods
//! ask for their credentials every few minutes and a log line each time would bury the
//! one that matters. It names the node, the pod and the container, the process the kernel
//! recorded for the connection (pid, and its executable when the agent can see it), the
//! role, the `AccessKeyId` and its expiry, and how the role was chosen. Never the secret
//! key nor the session token: [`Record`] has no field that could hold them.
//!
//! Decisions written down:
//! - "Container" is the kernel's cgroup (its id, and the container id the cgroup path
//!   names): that is what the kernel recorded. The container's *name* is not in the
//!   cgroup; `kubectl get pod -o jsonpath='{.status.containerStatuses}'` maps the id to it.
//! - The executable is read from `/proc/PID/exe` only after `/proc/PID/cgroup` shows the
//!   process still in the recorded cgroup: a pid reused by another process, or a pid of
//!   another PID namespace (the agent without `hostPID`), must not name the wrong
//!   program. When it cannot be read the record says why instead
//!   ([`ExecutableUnavailable`]).
//! - Memory is bounded: keys are forgotten once expired, and at [`MAX_REMEMBERED`] the
//!   oldest are dropped first. A forgotten key handed out again is logged again: a
//!   duplicate record is better than a missing one.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Mutex,
    time::SystemTime,
};

use serde::{Deserialize, Serialize};

/// The tracing target of audit records: route or filter on it
/// (`--log-level info,interceptor::audit=info`).
pub(crate) const TARGET: &str = "interceptor::audit";

/// At most this many (container, key) pairs are remembered for de-duplication.
pub(crate) const MAX_REMEMBERED: usize = 65_536;

/// How the role a container got was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChosenBy {
    /// The pod's role annotation.
    PodAnnotation,
    /// The pod's `container-roles` entry for the calling container.
    ContainerAnnotation,
    /// The pod's ServiceAccount (`--iam-role-key` on it).
    ServiceAccount,
    /// The ServiceAccount's IRSA annotation (`--irsa-annotations`).
    Irsa,
    /// `--default-role`.
    Default,
    /// Standalone mode's bindings file (cgroup -> role).
    ContainerMap,
}

impl ChosenBy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PodAnnotation => "pod_annotation",
            Self::ContainerAnnotation => "container_annotation",
            Self::ServiceAccount => "service_account",
            Self::Irsa => "irsa",
            Self::Default => "default",
            Self::ContainerMap => "container_map",
        }
    }
}

/// Why a record has no executable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ExecutableUnavailable {
    /// The kernel recorded no pid (a connection attributed without one).
    NoPid,
    /// No such process any more (it exited), or not in the agent's PID namespace.
    ProcessGone,
    /// The pid now belongs to a process outside the recorded cgroup (reused, or another
    /// PID namespace's numbering): not reported, it would name the wrong program.
    OtherCgroup,
    /// The process exists but its executable cannot be read (another user's process
    /// without CAP_SYS_PTRACE).
    NotReadable,
}

impl ExecutableUnavailable {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::NoPid => "no_pid",
            Self::ProcessGone => "process_gone",
            Self::OtherCgroup => "other_cgroup",
            Self::NotReadable => "not_readable",
        }
    }
}

/// The executable of `pid`, if that process is still in the cgroup at `cgroup_path`
/// (relative to the cgroup2 mount, as the identity index holds it). `proc` is the procfs
/// mount (`/proc`).
pub(crate) fn executable(
    proc: &Path,
    pid: u32,
    cgroup_path: &str,
) -> Result<PathBuf, ExecutableUnavailable> {
    if pid == 0 {
        return Err(ExecutableUnavailable::NoPid);
    }
    let dir = proc.join(pid.to_string());
    let cgroups = std::fs::read_to_string(dir.join("cgroup"))
        .map_err(|_| ExecutableUnavailable::ProcessGone)?;
    if !in_cgroup(&cgroups, cgroup_path) {
        return Err(ExecutableUnavailable::OtherCgroup);
    }
    std::fs::read_link(dir.join("exe")).map_err(|error| match error.kind() {
        std::io::ErrorKind::NotFound => ExecutableUnavailable::ProcessGone,
        _ => ExecutableUnavailable::NotReadable,
    })
}

/// Whether `/proc/PID/cgroup` text puts the process in `expected` (a path from the
/// cgroup2 mount). The unified line (`0::PATH`) is relative to the reader's cgroup
/// namespace, so it may be shorter or start with `/..` segments: it matches when, without
/// those, it is a whole-component suffix of `expected`.
pub(crate) fn in_cgroup(proc_cgroup: &str, expected: &str) -> bool {
    let Some(seen) = proc_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
    else {
        return false;
    };
    let seen: Vec<&str> = seen
        .split('/')
        .filter(|part| !part.is_empty())
        .skip_while(|part| *part == "..")
        .collect();
    let expected: Vec<&str> = expected
        .split('/')
        .filter(|part| !part.is_empty())
        .collect();
    !seen.is_empty() && expected.ends_with(&seen)
}

/// The container that was handed credentials, as the kernel and the pod store know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Container {
    pub(crate) namespace: String,
    pub(crate) pod: String,
    pub(crate) pod_uid: String,
    /// `runtime://id` from the cgroup path, when the cgroup is a container's.
    pub(crate) container_id: Option<String>,
    pub(crate) cgroup_id: u64,
    /// The cgroup's path from the cgroup2 mount.
    pub(crate) cgroup_path: String,
    pub(crate) pid: u32,
}

impl Container {
    /// The container behind a connection the kernel recorded from `pid` in `cgroup`,
    /// in `pod`.
    pub(crate) fn of(
        cgroup: &crate::identity::index::Resolved,
        pid: u32,
        pod: &crate::k8s::PodInfo,
    ) -> Self {
        let container_id = cgroup
            .identity
            .as_ref()
            .ok()
            .and_then(|identity| identity.container.as_ref())
            .map(crate::identity::ContainerRef::status_id);
        Self {
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            pod_uid: pod.uid.clone(),
            container_id,
            cgroup_id: cgroup.cgroup_id,
            cgroup_path: cgroup.path.clone(),
            pid,
        }
    }
}

impl From<crate::policy::RoleSource> for ChosenBy {
    fn from(source: crate::policy::RoleSource) -> Self {
        match source {
            crate::policy::RoleSource::Annotation => Self::PodAnnotation,
            crate::policy::RoleSource::Container => Self::ContainerAnnotation,
            crate::policy::RoleSource::ServiceAccount => Self::ServiceAccount,
            crate::policy::RoleSource::Irsa => Self::Irsa,
            crate::policy::RoleSource::Default => Self::Default,
        }
    }
}

/// The credentials handed out, without their secrets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Handed<'a> {
    pub(crate) role_arn: &'a str,
    pub(crate) access_key_id: &'a str,
    pub(crate) expiration: SystemTime,
    pub(crate) chosen_by: ChosenBy,
}

/// One audit record. Every field is safe to log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Record {
    /// RFC 3339, UTC.
    pub(crate) time: String,
    pub(crate) node: String,
    pub(crate) namespace: String,
    pub(crate) pod: String,
    pub(crate) pod_uid: String,
    pub(crate) container_id: Option<String>,
    pub(crate) cgroup_id: u64,
    pub(crate) pid: u32,
    pub(crate) executable: Option<String>,
    pub(crate) executable_unavailable: Option<ExecutableUnavailable>,
    pub(crate) role_arn: String,
    pub(crate) access_key_id: String,
    /// RFC 3339, UTC.
    pub(crate) expiration: String,
    pub(crate) chosen_by: ChosenBy,
}

impl Record {
    /// Logs the record at INFO under [`TARGET`], one field per member.
    pub(crate) fn log(&self) {
        tracing::info!(
            target: TARGET,
            time = %self.time,
            node = %self.node,
            namespace = %self.namespace,
            pod = %self.pod,
            pod_uid = %self.pod_uid,
            container_id = self.container_id.as_deref().unwrap_or(""),
            cgroup_id = self.cgroup_id,
            pid = self.pid,
            executable = self.executable.as_deref().unwrap_or(""),
            executable_unavailable = self.executable_unavailable.map_or("", ExecutableUnavailable::as_str),
            role_arn = %self.role_arn,
            access_key_id = %self.access_key_id,
            expiration = %self.expiration,
            chosen_by = self.chosen_by.as_str(),
            "credentials handed out"
        );
    }
}

/// A key remembered as handed to a container.
struct Seen {
    pod_uid: String,
    access_key_id: String,
    expiration: SystemTime,
}

/// Remembers which container was handed which key, and makes the record the first time.
/// Asking costs no allocation when the container already had the key (every request
/// after the first): keys are found by cgroup id, then compared in place.
pub(crate) struct AuditLog {
    node: String,
    proc: PathBuf,
    seen: Mutex<Remembered>,
    max: usize,
}

#[derive(Default)]
struct Remembered {
    /// Cgroup id -> the keys its processes were handed (a few at a time: the current
    /// credentials and the ones they replace).
    by_cgroup: HashMap<u64, Vec<Seen>>,
    len: usize,
}

impl Remembered {
    fn forget_expired(&mut self, now: SystemTime) {
        self.by_cgroup.retain(|_, seen| {
            seen.retain(|one| one.expiration > now);
            !seen.is_empty()
        });
        self.recount();
    }

    /// Drops the key that expires first: the least likely to be handed again.
    fn forget_first_expiring(&mut self) {
        let first = self
            .by_cgroup
            .iter()
            .flat_map(|(cgroup, seen)| {
                seen.iter()
                    .enumerate()
                    .map(move |(index, one)| (one.expiration, *cgroup, index))
            })
            .min();
        if let Some((_, cgroup, index)) = first
            && let Some(seen) = self.by_cgroup.get_mut(&cgroup)
        {
            seen.swap_remove(index);
            if seen.is_empty() {
                self.by_cgroup.remove(&cgroup);
            }
        }
        self.recount();
    }

    fn recount(&mut self) {
        self.len = self.by_cgroup.values().map(Vec::len).sum();
    }
}

impl AuditLog {
    pub(crate) fn new(node: impl Into<String>) -> Self {
        Self::with(node, PathBuf::from("/proc"), MAX_REMEMBERED)
    }

    /// With another procfs and bound (tests).
    pub(crate) fn with(node: impl Into<String>, proc: PathBuf, max: usize) -> Self {
        Self {
            node: node.into(),
            proc,
            seen: Mutex::new(Remembered::default()),
            max: max.max(1),
        }
    }

    /// The container in cgroup `cgroup_id` of pod `pod_uid` was handed `handed` now: the
    /// record to log if it had not been handed this key before, else `None`.
    /// `container` is asked only then.
    pub(crate) fn handed_out(
        &self,
        cgroup_id: u64,
        pod_uid: &str,
        handed: &Handed<'_>,
        container: impl FnOnce() -> Container,
    ) -> Option<Record> {
        self.handed_out_at(cgroup_id, pod_uid, handed, container, SystemTime::now())
    }

    pub(crate) fn handed_out_at(
        &self,
        cgroup_id: u64,
        pod_uid: &str,
        handed: &Handed<'_>,
        container: impl FnOnce() -> Container,
        now: SystemTime,
    ) -> Option<Record> {
        {
            let mut seen = self
                .seen
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            let known = seen.by_cgroup.get(&cgroup_id).is_some_and(|keys| {
                keys.iter()
                    .any(|one| one.access_key_id == handed.access_key_id && one.pod_uid == pod_uid)
            });
            if known {
                return None;
            }
            if seen.len >= self.max {
                seen.forget_expired(now);
            }
            while seen.len >= self.max {
                seen.forget_first_expiring();
            }
            seen.by_cgroup.entry(cgroup_id).or_default().push(Seen {
                pod_uid: pod_uid.to_owned(),
                access_key_id: handed.access_key_id.to_owned(),
                expiration: handed.expiration,
            });
            seen.len += 1;
        }
        let container = container();
        let (executable, executable_unavailable) =
            match executable(&self.proc, container.pid, &container.cgroup_path) {
                Ok(path) => (Some(path.display().to_string()), None),
                Err(why) => (None, Some(why)),
            };
        Some(Record {
            time: rfc3339(now),
            node: self.node.clone(),
            namespace: container.namespace,
            pod: container.pod,
            pod_uid: container.pod_uid,
            container_id: container.container_id,
            cgroup_id: container.cgroup_id,
            pid: container.pid,
            executable,
            executable_unavailable,
            role_arn: handed.role_arn.to_owned(),
            access_key_id: handed.access_key_id.to_owned(),
            expiration: rfc3339(handed.expiration),
            chosen_by: handed.chosen_by,
        })
    }

    /// Pairs remembered now (tests: the bound holds).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.seen
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .len
    }
}

fn rfc3339(time: SystemTime) -> String {
    crate::imds::ec2::timestamp(time)
}

#[cfg(test)]
mod tests;
