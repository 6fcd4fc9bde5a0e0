//! Who is behind a cgroup: cgroup path -> pod UID and container, for the layouts the
//! kubelet really produces. Pure: no I/O, nothing async ([`index`] adds the lookups).
//!
//! Accepted layouts (below an optional prefix such as `/system.slice/kubelet.slice`):
//! - systemd driver: `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/<c>`
//!   and for Guaranteed pods `kubepods.slice/kubepods-pod<uid_>.slice/<c>`, where `<uid_>`
//!   is the UID with `_` for `-`, and slice names may carry a parent prefix
//!   (`kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/...`);
//! - cgroupfs driver: `kubepods/<qos>/pod<uid>/<c>` and `kubepods/pod<uid>/<c>`;
//! - `<c>`: `cri-containerd-<id>.scope`, `crio-<id>.scope`, `crio-conmon-<id>.scope`,
//!   `docker-<id>.scope` (systemd) or `<id>`, `crio-<id>`, `docker-<id>` (cgroupfs);
//!   optionally followed by one more component (some runtimes nest the workload one level
//!   deeper, e.g. `.../crio-<id>.scope/container`), attributed to that container.
//!
//! The pod's own slice (no container component) resolves with `container: None`.
//! Anything else is an error saying why: identity is only ever derived from a path that
//! has exactly one reading.

pub mod index;

use std::fmt;

/// A pod UID: the API's `metadata.uid`, lower-case `8-4-4-4-12` hex, or the 32-hex-digit
/// hash the kubelet uses as UID for static pods.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodUid(String);

impl PodUid {
    pub fn parse(text: &str) -> Result<Self, IdentityError> {
        let lower_hex = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        let groups: Vec<&str> = text.split('-').collect();
        let uuid = groups.len() == 5
            && groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
            && groups.iter().all(|g| lower_hex(g));
        let static_hash = text.len() == 32 && lower_hex(text);
        if uuid || static_hash {
            Ok(Self(text.to_owned()))
        } else {
            Err(IdentityError::BadPodUid(truncate(text)))
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Containerd,
    CriO,
    /// CRI-O's `conmon` monitor process of a container, not the workload itself.
    CriOConmon,
    Docker,
    /// cgroupfs driver: a bare container id, runtime not named.
    Unnamed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRef {
    pub runtime: Runtime,
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupIdentity {
    pub pod_uid: PodUid,
    pub qos: QosClass,
    /// `None`: the pod-level cgroup itself.
    pub container: Option<ContainerRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("cgroup path is empty, too long or contains NUL or `.`/`..` segments")]
    Malformed,
    #[error("not under the kubelet's pods cgroup (kubepods)")]
    NotKubepods,
    #[error("a kubepods or QoS cgroup, not a pod's")]
    NotAPod,
    #[error("unexpected cgroup name {0:?} where a QoS class or pod was expected")]
    BadPodComponent(String),
    #[error("QoS class of the pod cgroup {0:?} does not match its parent")]
    QosMismatch(String),
    #[error("malformed pod UID {0:?}")]
    BadPodUid(String),
    #[error("unrecognised container cgroup {0:?}")]
    BadContainer(String),
    #[error("cgroup path goes deeper than a container's")]
    TooDeep,
}

impl IdentityError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::NotKubepods => "not_kubepods",
            Self::NotAPod => "not_a_pod",
            Self::BadPodComponent(_) => "bad_pod_component",
            Self::QosMismatch(_) => "qos_mismatch",
            Self::BadPodUid(_) => "bad_pod_uid",
            Self::BadContainer(_) => "bad_container",
            Self::TooDeep => "too_deep",
        }
    }
}

/// The longest path parsed; cgroup paths are far shorter.
pub const MAX_PATH: usize = 4096;

fn truncate(text: &str) -> String {
    text.chars().take(80).collect()
}

/// Parses a cgroup v2 path (relative to the mount, or absolute with the mount prefix).
pub fn parse_cgroup_path(path: &str) -> Result<CgroupIdentity, IdentityError> {
    if path.is_empty() || path.len() > MAX_PATH || path.contains('\0') {
        return Err(IdentityError::Malformed);
    }
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if segments.iter().any(|s| *s == "." || *s == "..") {
        return Err(IdentityError::Malformed);
    }
    // The first kubepods component: `kubepods` (cgroupfs) or `[prefix-]kubepods.slice`.
    let (at, systemd_prefix) = segments
        .iter()
        .enumerate()
        .find_map(|(i, segment)| {
            if *segment == "kubepods" {
                Some((i, None))
            } else {
                segment
                    .strip_suffix("kubepods.slice")
                    .filter(|prefix| prefix.is_empty() || prefix.ends_with('-'))
                    .map(|prefix| (i, Some(prefix)))
            }
        })
        .ok_or(IdentityError::NotKubepods)?;
    let rest = &segments[at + 1..];
    match systemd_prefix {
        Some(prefix) => parse_systemd(prefix, rest),
        None => parse_cgroupfs(rest),
    }
}

fn parse_systemd(prefix: &str, rest: &[&str]) -> Result<CgroupIdentity, IdentityError> {
    let first = *rest.first().ok_or(IdentityError::NotAPod)?;
    let base = format!("{prefix}kubepods-");
    let body = first
        .strip_prefix(&base)
        .and_then(|s| s.strip_suffix(".slice"))
        .ok_or_else(|| IdentityError::BadPodComponent(truncate(first)))?;
    let (qos, pod_slice, after) = if let Some(uid) = body.strip_prefix("pod") {
        (QosClass::Guaranteed, uid.to_owned(), &rest[1..])
    } else {
        let qos = QosClass::from_name(body)
            .ok_or_else(|| IdentityError::BadPodComponent(truncate(first)))?;
        let second = *rest.get(1).ok_or(IdentityError::NotAPod)?;
        let expected = format!("{base}{body}-pod");
        let uid = second
            .strip_prefix(&expected)
            .and_then(|s| s.strip_suffix(".slice"))
            .ok_or_else(|| {
                if second.starts_with(&base)
                    && second.ends_with(".slice")
                    && second.contains("-pod")
                {
                    IdentityError::QosMismatch(truncate(second))
                } else {
                    IdentityError::BadPodComponent(truncate(second))
                }
            })?;
        (qos, uid.to_owned(), &rest[2..])
    };
    if pod_slice.contains('-') {
        // systemd escapes the UID's dashes as underscores; a dash here is not kubelet's.
        return Err(IdentityError::BadPodUid(truncate(&pod_slice)));
    }
    let pod_uid = PodUid::parse(&pod_slice.replace('_', "-"))?;
    Ok(CgroupIdentity {
        pod_uid,
        qos,
        container: parse_container(after, true)?,
    })
}

fn parse_cgroupfs(rest: &[&str]) -> Result<CgroupIdentity, IdentityError> {
    let first = *rest.first().ok_or(IdentityError::NotAPod)?;
    let (qos, pod, after) = match QosClass::from_name(first) {
        Some(qos) => (qos, *rest.get(1).ok_or(IdentityError::NotAPod)?, &rest[2..]),
        None => (QosClass::Guaranteed, first, &rest[1..]),
    };
    let uid = pod
        .strip_prefix("pod")
        .ok_or_else(|| IdentityError::BadPodComponent(truncate(pod)))?;
    Ok(CgroupIdentity {
        pod_uid: PodUid::parse(uid)?,
        qos,
        container: parse_container(after, false)?,
    })
}

fn parse_container(rest: &[&str], systemd: bool) -> Result<Option<ContainerRef>, IdentityError> {
    let Some(component) = rest.first() else {
        return Ok(None);
    };
    if rest.len() > 2 {
        return Err(IdentityError::TooDeep);
    }
    let bad = || IdentityError::BadContainer(truncate(component));
    let name = if systemd {
        component.strip_suffix(".scope").ok_or_else(bad)?
    } else {
        component
    };
    let (runtime, id) = [
        ("cri-containerd-", Runtime::Containerd),
        ("crio-conmon-", Runtime::CriOConmon),
        ("crio-", Runtime::CriO),
        ("docker-", Runtime::Docker),
    ]
    .iter()
    .find_map(|(prefix, runtime)| name.strip_prefix(prefix).map(|id| (*runtime, id)))
    .or((!systemd).then_some((Runtime::Unnamed, name)))
    .ok_or_else(bad)?;
    let hex = id
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex || !(12..=128).contains(&id.len()) {
        return Err(bad());
    }
    if let Some(leaf) = rest.get(1)
        && (leaf.len() > 64
            || !leaf
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)))
    {
        return Err(IdentityError::TooDeep);
    }
    Ok(Some(ContainerRef {
        runtime,
        id: id.to_owned(),
    }))
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
