//! Who is behind a cgroup: cgroup path -> pod UID and container, for the layouts the
//! kubelet really produces. Pure: no I/O, nothing async ([`index`] adds the lookups).
//!
//! Accepted layouts (below an optional prefix such as the cgroup2 mount point,
//! `/system.slice/kubelet.slice` or `/kind/node1`):
//! - systemd driver: `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/<c>`
//!   and for Guaranteed pods `kubepods.slice/kubepods-pod<uid_>.slice/<c>`, where `<uid_>`
//!   is the UID with `_` for `-`, and slice names may carry a parent prefix
//!   (`kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/...`);
//! - cgroupfs driver: `kubepods/<qos>/pod<uid>/<c>` and `kubepods/pod<uid>/<c>`;
//! - `<qos>`: `burstable` or `besteffort`;
//! - `<c>`: `cri-containerd-<id>.scope`, `crio-<id>.scope`, `crio-conmon-<id>.scope`,
//!   `docker-<id>.scope` (systemd) or `<id>`, `crio-<id>`, `crio-conmon-<id>`,
//!   `docker-<id>` (cgroupfs); optionally followed by one more plain component (some
//!   setups nest the workload one level deeper, e.g. `.../crio-<id>.scope/container`),
//!   attributed to that container.
//!
//! The pod's own slice (no container component) resolves with `container: None`.
//! Anything else is an [`IdentityError`] saying why: identity is only ever derived from a
//! path that has exactly one reading, so look-alikes, mixed escapings, upper-case and
//! `..` are refused rather than normalised.

pub mod index;

use std::fmt;

/// A pod UID, canonical: lower-case, with dashes.
///
/// Two forms are accepted, the only two the kubelet names pod cgroups with:
/// - `8-4-4-4-12` hex, the API server's `metadata.uid` (always generated lower-case);
/// - 32 hex digits, the hash the kubelet uses as UID of static pods (their mirror pods in
///   the API carry it in the `kubernetes.io/config.mirror` annotation).
///
/// Upper-case is refused rather than folded: neither source ever produces it, so an
/// upper-case name was not made by the kubelet and has no single reading.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodUid(String);

impl PodUid {
    pub fn parse(text: &str) -> Result<Self, IdentityError> {
        let uuid = text.len() == 36
            && text.split('-').map(str::len).eq([8, 4, 4, 4, 12])
            && text.split('-').all(is_lower_hex);
        let static_hash = text.len() == 32 && is_lower_hex(text);
        if uuid || static_hash {
            Ok(Self(text.to_owned()))
        } else {
            Err(IdentityError::BadPodUid(evidence(text)))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    /// The QoS cgroup's name; Guaranteed pods have none (they sit directly under kubepods).
    fn from_name(name: &str) -> Option<Self> {
        match name {
            "burstable" => Some(Self::Burstable),
            "besteffort" => Some(Self::BestEffort),
            _ => None,
        }
    }

    fn name(self) -> Option<&'static str> {
        match self {
            Self::Guaranteed => None,
            Self::Burstable => Some("burstable"),
            Self::BestEffort => Some("besteffort"),
        }
    }
}

/// Which runtime named the container's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Runtime {
    /// `cri-containerd-<id>.scope`.
    Containerd,
    /// `crio-<id>.scope` (`crio-<id>` with the cgroupfs driver).
    CriO,
    /// `crio-conmon-<id>.scope`: CRI-O's `conmon` monitor of container `<id>`, not the
    /// workload itself (see [`ContainerRef::is_workload`]).
    CriOConmon,
    /// `docker-<id>.scope` (`docker-<id>` with the cgroupfs driver).
    Docker,
    /// cgroupfs driver: a bare container id, runtime not named (containerd, Docker).
    Unnamed,
}

/// A container of the pod. Pause (sandbox) containers are containers like any other: the
/// path does not tell them apart, and they belong to the same pod.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContainerRef {
    pub runtime: Runtime,
    /// Lower-case hex, [`MIN_CONTAINER_ID`]..=[`MAX_CONTAINER_ID`] digits (64 in practice).
    pub id: String,
}

impl ContainerRef {
    /// The id as the pod's `status.containerStatuses[].containerID` shows it
    /// (`containerd://<id>`), so that a record leads to the container's name.
    pub fn status_id(&self) -> String {
        let scheme = match self.runtime {
            Runtime::Containerd => "containerd://",
            Runtime::CriO | Runtime::CriOConmon => "cri-o://",
            Runtime::Docker => "docker://",
            Runtime::Unnamed => "",
        };
        format!("{scheme}{}", self.id)
    }

    /// `false` for a runtime's helper process (CRI-O's conmon) living in the pod's cgroups.
    pub fn is_workload(&self) -> bool {
        self.runtime != Runtime::CriOConmon
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CgroupIdentity {
    pub pod_uid: PodUid,
    pub qos: QosClass,
    /// `None`: the pod-level cgroup itself.
    pub container: Option<ContainerRef>,
}

/// Why a path names no pod. Each variant keeps the offending input (cut to
/// [`EVIDENCE_CHARS`] characters) except where its size is the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("cgroup path is empty")]
    Empty,
    #[error("cgroup path is {len} bytes, over the {MAX_PATH}-byte limit")]
    TooLong { len: usize },
    #[error("cgroup path {0:?} contains a NUL byte")]
    Nul(String),
    #[error("cgroup path {0:?} has a `.` or `..` segment")]
    Traversal(String),
    #[error("cgroup {0:?} is not under the kubelet's pods cgroup (kubepods)")]
    NotKubepods(String),
    #[error("cgroup {0:?} is the kubepods or a QoS cgroup, not a pod's")]
    NotAPod(String),
    #[error("unexpected cgroup name {0:?} where a QoS class or pod was expected")]
    BadPodComponent(String),
    #[error("QoS class of the pod cgroup {0:?} does not match its parent")]
    QosMismatch(String),
    #[error("malformed pod UID {0:?}")]
    BadPodUid(String),
    #[error("unrecognised container cgroup {0:?}")]
    BadContainer(String),
    #[error("cgroup {0:?} goes deeper than a container's")]
    TooDeep(String),
}

impl IdentityError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::TooLong { .. } => "too_long",
            Self::Nul(_) => "nul",
            Self::Traversal(_) => "traversal",
            Self::NotKubepods(_) => "not_kubepods",
            Self::NotAPod(_) => "not_a_pod",
            Self::BadPodComponent(_) => "bad_pod_component",
            Self::QosMismatch(_) => "qos_mismatch",
            Self::BadPodUid(_) => "bad_pod_uid",
            Self::BadContainer(_) => "bad_container",
            Self::TooDeep(_) => "too_deep",
        }
    }
}

/// The longest path parsed (checked before anything is allocated); real cgroup paths are
/// a few hundred bytes.
pub const MAX_PATH: usize = 4096;
/// Container ids shorter than this are refused: every runtime names cgroups with the full
/// 64-digit id, and 12 (Docker's short id) is the least any tool prints. Accepting fewer
/// would read any short hex-looking directory under a cgroupfs pod as a container.
pub const MIN_CONTAINER_ID: usize = 12;
pub const MAX_CONTAINER_ID: usize = 128;
/// A nested leaf under a container (`container`, `init.scope`) is at most this long.
const MAX_LEAF: usize = 64;
/// Errors keep at most this many characters of the input.
pub const EVIDENCE_CHARS: usize = 256;

fn evidence(text: &str) -> String {
    text.chars().take(EVIDENCE_CHARS).collect()
}

fn is_lower_hex(text: &str) -> bool {
    text.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Parses a cgroup v2 path, relative to the mount (`/kubepods.slice/...`) or absolute
/// with the mount and any parent prefix in front (`/sys/fs/cgroup/kubelet.slice/...`):
/// the first `kubepods` component anchors the parse.
pub fn parse_cgroup_path(path: &str) -> Result<CgroupIdentity, IdentityError> {
    if path.is_empty() {
        return Err(IdentityError::Empty);
    }
    if path.len() > MAX_PATH {
        return Err(IdentityError::TooLong { len: path.len() });
    }
    if path.contains('\0') {
        return Err(IdentityError::Nul(evidence(path)));
    }
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if segments.iter().any(|s| *s == "." || *s == "..") {
        return Err(IdentityError::Traversal(evidence(path)));
    }
    let (at, systemd_prefix) = segments
        .iter()
        .enumerate()
        .find_map(|(i, segment)| kubepods_root(segment).map(|prefix| (i, prefix)))
        .ok_or_else(|| IdentityError::NotKubepods(evidence(path)))?;
    let rest = &segments[at + 1..];
    let parsed = match systemd_prefix {
        Some(prefix) => parse_systemd(prefix, rest),
        None => parse_cgroupfs(rest),
    };
    parsed.map_err(|error| match error {
        IdentityError::NotAPod(_) => IdentityError::NotAPod(evidence(path)),
        other => other,
    })
}

/// `Some(None)` for cgroupfs' `kubepods`, `Some(Some(prefix))` for systemd's
/// `[<prefix>-]kubepods.slice` (a kubelet under a parent slice names its slices
/// `kubelet-kubepods.slice`, `kubelet-kubepods-besteffort.slice`, ...).
fn kubepods_root(segment: &str) -> Option<Option<&str>> {
    if segment == "kubepods" {
        return Some(None);
    }
    segment
        .strip_suffix("kubepods.slice")
        .filter(|prefix| prefix.is_empty() || prefix.ends_with('-'))
        .map(Some)
}

/// Placeholder evidence; [`parse_cgroup_path`] replaces it with the whole path.
fn not_a_pod() -> IdentityError {
    IdentityError::NotAPod(String::new())
}

fn parse_systemd(prefix: &str, rest: &[&str]) -> Result<CgroupIdentity, IdentityError> {
    let first = *rest.first().ok_or_else(not_a_pod)?;
    let base = format!("{prefix}kubepods-");
    let body = first
        .strip_prefix(&base)
        .and_then(|s| s.strip_suffix(".slice"))
        .ok_or_else(|| IdentityError::BadPodComponent(evidence(first)))?;
    let (qos, escaped_uid, after) = if let Some(uid) = body.strip_prefix("pod") {
        (QosClass::Guaranteed, uid, &rest[1..])
    } else {
        let qos = QosClass::from_name(body)
            .ok_or_else(|| IdentityError::BadPodComponent(evidence(first)))?;
        let second = *rest.get(1).ok_or_else(not_a_pod)?;
        let uid = second
            .strip_prefix(&format!("{base}{body}-pod"))
            .and_then(|s| s.strip_suffix(".slice"))
            .ok_or_else(|| pod_slice_mismatch(&base, second))?;
        (qos, uid, &rest[2..])
    };
    if escaped_uid.contains('-') {
        // systemd escapes the UID's dashes as underscores; a dash here is not kubelet's.
        return Err(IdentityError::BadPodUid(evidence(escaped_uid)));
    }
    Ok(CgroupIdentity {
        pod_uid: PodUid::parse(&escaped_uid.replace('_', "-"))?,
        qos,
        container: parse_container(after, true)?,
    })
}

/// A pod slice under a QoS slice that does not carry that QoS: another QoS's pod slice
/// (mismatch) or something else entirely.
fn pod_slice_mismatch(base: &str, component: &str) -> IdentityError {
    let looks_like_pod = component
        .strip_prefix(base)
        .and_then(|s| s.strip_suffix(".slice"))
        .and_then(|s| s.split_once("-pod"))
        .is_some_and(|(qos, _)| QosClass::from_name(qos).is_some());
    if looks_like_pod {
        IdentityError::QosMismatch(evidence(component))
    } else {
        IdentityError::BadPodComponent(evidence(component))
    }
}

fn parse_cgroupfs(rest: &[&str]) -> Result<CgroupIdentity, IdentityError> {
    let first = *rest.first().ok_or_else(not_a_pod)?;
    let (qos, pod, after) = match QosClass::from_name(first) {
        Some(qos) => (qos, *rest.get(1).ok_or_else(not_a_pod)?, &rest[2..]),
        None => (QosClass::Guaranteed, first, &rest[1..]),
    };
    let uid = pod
        .strip_prefix("pod")
        .ok_or_else(|| IdentityError::BadPodComponent(evidence(pod)))?;
    Ok(CgroupIdentity {
        pod_uid: PodUid::parse(uid)?,
        qos,
        container: parse_container(after, false)?,
    })
}

/// Runtime prefixes, longest first where one is a prefix of another (`crio-conmon-`).
const RUNTIME_PREFIXES: [(&str, Runtime); 4] = [
    ("cri-containerd-", Runtime::Containerd),
    ("crio-conmon-", Runtime::CriOConmon),
    ("crio-", Runtime::CriO),
    ("docker-", Runtime::Docker),
];

/// The components below the pod: none, a container, or a container and one nested leaf.
fn parse_container(rest: &[&str], systemd: bool) -> Result<Option<ContainerRef>, IdentityError> {
    let (component, leaf) = match rest {
        [] => return Ok(None),
        [component] => (*component, None),
        [component, leaf] => (*component, Some(*leaf)),
        [_, _, deeper, ..] => return Err(IdentityError::TooDeep(evidence(deeper))),
    };
    let bad = || IdentityError::BadContainer(evidence(component));
    let name = if systemd {
        component.strip_suffix(".scope").ok_or_else(bad)?
    } else {
        component
    };
    let (runtime, id) = RUNTIME_PREFIXES
        .iter()
        .find_map(|(prefix, runtime)| name.strip_prefix(prefix).map(|id| (*runtime, id)))
        .or((!systemd).then_some((Runtime::Unnamed, name)))
        .ok_or_else(bad)?;
    if !is_lower_hex(id) || !(MIN_CONTAINER_ID..=MAX_CONTAINER_ID).contains(&id.len()) {
        return Err(bad());
    }
    if let Some(leaf) = leaf
        && !is_leaf_name(leaf)
    {
        return Err(IdentityError::BadContainer(evidence(leaf)));
    }
    Ok(Some(ContainerRef {
        runtime,
        id: id.to_owned(),
    }))
}

/// A nested cgroup some setups create inside a container's scope (`container`,
/// `init.scope`): a plain name, attributed to the enclosing container.
fn is_leaf_name(leaf: &str) -> bool {
    leaf.len() <= MAX_LEAF
        && leaf
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// The systemd-driver slice name of a pod, as the kubelet names it (test harnesses build
/// kubelet-shaped trees with it).
pub fn pod_slice_name(uid: &PodUid, qos: QosClass) -> String {
    let escaped = uid.as_str().replace('-', "_");
    match qos.name() {
        Some(qos) => format!("kubepods-{qos}-pod{escaped}.slice"),
        None => format!("kubepods-pod{escaped}.slice"),
    }
}

#[cfg(test)]
mod tests;
