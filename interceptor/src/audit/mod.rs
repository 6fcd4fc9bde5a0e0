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
pub const TARGET: &str = "interceptor::audit";

/// At most this many (container, key) pairs are remembered for de-duplication.
pub const MAX_REMEMBERED: usize = 65_536;

/// How the role a container got was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChosenBy {
    /// The pod's role annotation.
    PodAnnotation,
    /// The pod's ServiceAccount.
    ServiceAccount,
    /// `--default-role`.
    Default,
    /// Standalone mode's bindings file (cgroup -> role).
    ContainerMap,
}

impl ChosenBy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PodAnnotation => "pod_annotation",
            Self::ServiceAccount => "service_account",
            Self::Default => "default",
            Self::ContainerMap => "container_map",
        }
    }
}

/// Why a record has no executable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecutableUnavailable {
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
    pub fn as_str(self) -> &'static str {
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
pub fn executable(
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
pub struct Container {
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
    /// `runtime://id` from the cgroup path, when the cgroup is a container's.
    pub container_id: Option<String>,
    pub cgroup_id: u64,
    /// The cgroup's path from the cgroup2 mount.
    pub cgroup_path: String,
    pub pid: u32,
}

/// The credentials handed out, without their secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handed {
    pub role_arn: String,
    pub access_key_id: String,
    pub expiration: SystemTime,
    pub chosen_by: ChosenBy,
}

/// One audit record. Every field is safe to log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Record {
    /// RFC 3339, UTC.
    pub time: String,
    pub node: String,
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
    pub container_id: Option<String>,
    pub cgroup_id: u64,
    pub pid: u32,
    pub executable: Option<String>,
    pub executable_unavailable: Option<ExecutableUnavailable>,
    pub role_arn: String,
    pub access_key_id: String,
    /// RFC 3339, UTC.
    pub expiration: String,
    pub chosen_by: ChosenBy,
}

impl Record {
    /// Logs the record at INFO under [`TARGET`], one field per member.
    pub fn log(&self) {
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

/// Remembers which container was handed which key, and makes the record the first time.
pub struct AuditLog {
    node: String,
    proc: PathBuf,
    /// (cgroup id, pod UID, AccessKeyId) -> the key's expiry.
    seen: Mutex<HashMap<(u64, String, String), SystemTime>>,
    max: usize,
}

impl AuditLog {
    pub fn new(node: impl Into<String>) -> Self {
        Self::with(node, PathBuf::from("/proc"), MAX_REMEMBERED)
    }

    /// With another procfs and bound (tests).
    pub fn with(node: impl Into<String>, proc: PathBuf, max: usize) -> Self {
        Self {
            node: node.into(),
            proc,
            seen: Mutex::new(HashMap::new()),
            max: max.max(1),
        }
    }

    /// `container` was handed `handed` now: the record to log if this container has not
    /// been handed this key before, else `None`.
    pub fn handed_out(&self, container: &Container, handed: &Handed) -> Option<Record> {
        self.handed_out_at(container, handed, SystemTime::now())
    }

    pub(crate) fn handed_out_at(
        &self,
        container: &Container,
        handed: &Handed,
        now: SystemTime,
    ) -> Option<Record> {
        let key = (
            container.cgroup_id,
            container.pod_uid.clone(),
            handed.access_key_id.clone(),
        );
        {
            let mut seen = self
                .seen
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            if seen.contains_key(&key) {
                return None;
            }
            if seen.len() >= self.max {
                seen.retain(|_, expiry| *expiry > now);
            }
            while seen.len() >= self.max {
                // The key that expires first is the one least likely to be handed again.
                let Some(oldest) = seen
                    .iter()
                    .min_by_key(|(_, expiry)| **expiry)
                    .map(|(key, _)| key.clone())
                else {
                    break;
                };
                seen.remove(&oldest);
            }
            seen.insert(key, handed.expiration);
        }
        let (executable, executable_unavailable) =
            match executable(&self.proc, container.pid, &container.cgroup_path) {
                Ok(path) => (Some(path.display().to_string()), None),
                Err(why) => (None, Some(why)),
            };
        Some(Record {
            time: rfc3339(now),
            node: self.node.clone(),
            namespace: container.namespace.clone(),
            pod: container.pod.clone(),
            pod_uid: container.pod_uid.clone(),
            container_id: container.container_id.clone(),
            cgroup_id: container.cgroup_id,
            pid: container.pid,
            executable,
            executable_unavailable,
            role_arn: handed.role_arn.clone(),
            access_key_id: handed.access_key_id.clone(),
            expiration: rfc3339(handed.expiration),
            chosen_by: handed.chosen_by,
        })
    }

    /// Pairs remembered now.
    pub fn len(&self) -> usize {
        self.seen
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn rfc3339(time: SystemTime) -> String {
    crate::imds::ec2::timestamp(time)
}

#[cfg(test)]
mod tests;
