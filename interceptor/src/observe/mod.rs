//! Observe mode (`interceptor run --observe`): the agent attaches and redirects as usual
//! but answers every request as the node would (it forwards to the real metadata
//! service: the situation before installing), and records, per pod and container, what
//! it asked for, whether it used the node's role, and what it would get under
//! enforcement. `interceptor report` prints that record from the admin port
//! (`/observe`), so a team replacing the node role, kube2iam or kiam knows which
//! workloads still need the node's role and which would be refused, before enforcing.
//!
//! The answering is the metadata server's (`imds::server`, observe mode): it asks the
//! backend for the very decision enforcement acts on (`Backend::authorize`, the resolver
//! in Kubernetes mode) and records it here, then forwards the request with the agent's
//! own upstream client (its IMDSv2 token handling included).
//!
//! Decisions written down:
//! - Connections the kernel did not record are still refused (403) in observe mode:
//!   before installing nothing dialled the agent's port, so nothing that does so now
//!   is owed the node's credentials.
//! - Connections the kernel recorded but enforcement would refuse outright (a pod the
//!   watch does not know, as a static pod's cgroup; a cgroup that is no pod's) are
//!   answered as the node would and recorded as refused with the reason: they are the
//!   workloads a switch would break, and observing must not break them first.
//! - Everything is forwarded, credential-bearing paths that enforcement never forwards
//!   (`identity-credentials/`, the signed instance identity) included: the node answered
//!   them before installing, and the report lists them among the paths. Only paths that
//!   are not well formed (404) and methods EC2 refuses (405) are answered by the agent,
//!   and IMDSv2 tokens are the agent's own, bound to the caller as under enforcement.
//! - Nothing is assumed at STS (no prefetch, no credentials fetched) and no Event is
//!   posted: an Event saying a pod's role was refused would be false while the pod is
//!   served the node's credentials.
//! - What pods send is untrusted: at most [`MAX_PATHS`] distinct paths per container,
//!   each cut to [`MAX_PATH_CHARS`], and at most [`MAX_CONTAINERS`] containers (the
//!   rest counted in `dropped`), so a pod cannot grow the agent's memory.
//! - "Used the node's role" means it fetched credentials
//!   (`.../iam/security-credentials/NAME`); listing the role name alone is not a use.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    sync::Mutex,
    time::SystemTime,
};

use serde::{Deserialize, Serialize};

use crate::{audit::ChosenBy, imds::route::Route};

pub mod client;

/// Distinct paths remembered per container.
pub const MAX_PATHS: usize = 32;
/// A path longer than this is cut (and marked with `…`).
pub const MAX_PATH_CHARS: usize = 256;
/// Containers remembered; more are counted, not recorded.
pub const MAX_CONTAINERS: usize = 10_000;

/// What a caller would get under enforcement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum WouldGet {
    /// This role.
    Role { arn: String, chosen_by: ChosenBy },
    /// Nothing: no role (404 on the credentials paths).
    None,
    /// Refused, and why (the metric label of the refusal or denial).
    Refused { reason: String },
}

impl WouldGet {
    /// `role`, `none` or `refused`: the metrics' label.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Self::Role { .. } => "role",
            Self::None => "none",
            Self::Refused { .. } => "refused",
        }
    }
}

/// Who asked: a pod's container, as the kernel's record and the pod store know it.
/// Callers the agent cannot name (unknown cgroups) are keyed by what it has.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Who {
    pub namespace: String,
    pub pod: String,
    /// `runtime://id`, or the cgroup path when it names no container.
    pub container: String,
}

/// One container's observations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    #[serde(flatten)]
    pub who: Who,
    pub requests: u64,
    pub paths: BTreeSet<String>,
    /// Distinct paths beyond [`MAX_PATHS`], not listed.
    pub paths_dropped: u64,
    pub used_node_role: bool,
    /// The last decision made for it.
    pub would_get: WouldGet,
    /// RFC 3339.
    pub first_seen: String,
    pub last_seen: String,
}

/// What `/observe` serves and `interceptor report` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub node: String,
    pub mode: String,
    pub rows: Vec<Row>,
    /// Requests from containers beyond [`MAX_CONTAINERS`], not recorded per container.
    pub dropped: u64,
}

/// The observations of a running agent.
pub struct ObserveStore {
    node: String,
    rows: Mutex<BTreeMap<Who, Row>>,
    dropped: Mutex<u64>,
    max_containers: usize,
}

impl ObserveStore {
    pub fn new(node: impl Into<String>) -> Self {
        Self::with_limit(node, MAX_CONTAINERS)
    }

    pub fn with_limit(node: impl Into<String>, max_containers: usize) -> Self {
        Self {
            node: node.into(),
            rows: Mutex::new(BTreeMap::new()),
            dropped: Mutex::new(0),
            max_containers,
        }
    }

    /// `who` asked `method path` and would get `would_get` under enforcement.
    pub fn record(&self, who: Who, method: &http::Method, path: &str, would_get: WouldGet) {
        self.record_at(who, method, path, would_get, SystemTime::now());
    }

    pub(crate) fn record_at(
        &self,
        who: Who,
        method: &http::Method,
        path: &str,
        would_get: WouldGet,
        now: SystemTime,
    ) {
        let used_node_role = matches!(
            crate::imds::route::classify(method, path),
            Route::Credentials(_)
        );
        let now = crate::imds::ec2::timestamp(now);
        let mut rows = self
            .rows
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if !rows.contains_key(&who) && rows.len() >= self.max_containers {
            drop(rows);
            *self
                .dropped
                .lock()
                .unwrap_or_else(|poison| poison.into_inner()) += 1;
            return;
        }
        let row = rows.entry(who.clone()).or_insert_with(|| Row {
            who,
            requests: 0,
            paths: BTreeSet::new(),
            paths_dropped: 0,
            used_node_role: false,
            would_get: WouldGet::None,
            first_seen: now.clone(),
            last_seen: now.clone(),
        });
        row.requests += 1;
        row.last_seen = now;
        row.used_node_role |= used_node_role;
        row.would_get = would_get;
        let path = cut(path);
        if !row.paths.contains(&path) {
            if row.paths.len() < MAX_PATHS {
                row.paths.insert(path);
            } else {
                row.paths_dropped += 1;
            }
        }
    }

    pub fn report(&self) -> Report {
        let rows = self
            .rows
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        Report {
            node: self.node.clone(),
            mode: "observe".into(),
            rows: rows.values().cloned().collect(),
            dropped: *self
                .dropped
                .lock()
                .unwrap_or_else(|poison| poison.into_inner()),
        }
    }

    /// Containers by what they would get (`role`, `none`, `refused`) and whether they
    /// used the node's role: the counts the metrics carry.
    pub fn counts(&self) -> BTreeMap<(&'static str, bool), u64> {
        let rows = self
            .rows
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let mut counts = BTreeMap::new();
        for row in rows.values() {
            *counts
                .entry((row.would_get.label(), row.used_node_role))
                .or_default() += 1;
        }
        counts
    }
}

fn cut(path: &str) -> String {
    let printable: String = path
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    match printable.char_indices().nth(MAX_PATH_CHARS) {
        Some((at, _)) => format!("{}…", &printable[..at]),
        None => printable,
    }
}

impl Report {
    /// The report as a table for people: one line per container, worst first (those
    /// that would be refused, then those using the node's role that would get nothing).
    pub fn table(&self) -> String {
        let mut rows: Vec<&Row> = self.rows.iter().collect();
        rows.sort_by_key(|row| {
            let rank = match (&row.would_get, row.used_node_role) {
                (WouldGet::Refused { .. }, _) => 0,
                (WouldGet::None, true) => 1,
                (WouldGet::Role { .. }, true) => 2,
                _ => 3,
            };
            (rank, row.who.clone())
        });
        let header = [
            "NAMESPACE",
            "POD",
            "CONTAINER",
            "REQUESTS",
            "NODE ROLE USED",
            "UNDER ENFORCEMENT",
            "PATHS",
        ];
        let lines: Vec<[String; 7]> = rows
            .iter()
            .map(|row| {
                let would = match &row.would_get {
                    WouldGet::Role { arn, chosen_by } => {
                        format!("role {arn} ({})", chosen_by.as_str())
                    }
                    WouldGet::None => "none".into(),
                    WouldGet::Refused { reason } => format!("refused ({reason})"),
                };
                let mut paths = row.paths.iter().cloned().collect::<Vec<_>>().join(",");
                if row.paths_dropped > 0 {
                    let _ = write!(paths, ",+{} more", row.paths_dropped);
                }
                // A caller the agent could not name has no namespace (nor pod).
                let or_dash = |text: &str| {
                    if text.is_empty() {
                        "-".to_owned()
                    } else {
                        text.to_owned()
                    }
                };
                [
                    or_dash(&row.who.namespace),
                    or_dash(&row.who.pod),
                    or_dash(&short_container(&row.who.container)),
                    row.requests.to_string(),
                    if row.used_node_role { "yes" } else { "no" }.into(),
                    would,
                    paths,
                ]
            })
            .collect();
        let mut widths = header.map(str::len);
        for line in &lines {
            for (width, cell) in widths.iter_mut().zip(line) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = format!(
            "OBSERVE MODE on {}: pods get the node's answers; nothing below is enforced.\n",
            self.node
        );
        let mut push = |cells: &[String]| {
            let last = cells.len() - 1;
            for (index, (cell, width)) in cells.iter().zip(widths).enumerate() {
                if index == last {
                    out.push_str(cell);
                } else {
                    let _ = write!(out, "{cell:<width$}  ");
                }
            }
            out.push('\n');
        };
        push(&header.map(String::from));
        for line in &lines {
            push(line);
        }
        if self.dropped > 0 {
            let _ = writeln!(
                out,
                "{} requests from containers beyond the first {MAX_CONTAINERS} not recorded",
                self.dropped
            );
        }
        out
    }
}

/// `containerd://0123456789abcdef...` -> `containerd://0123456789ab` (as `kubectl` and
/// `crictl` shorten ids); other values unchanged.
fn short_container(container: &str) -> String {
    match container.split_once("://") {
        Some((runtime, id)) if id.len() > 12 && id.is_ascii() => {
            format!("{runtime}://{}", &id[..12])
        }
        _ => container.to_owned(),
    }
}

#[cfg(test)]
mod tests;
