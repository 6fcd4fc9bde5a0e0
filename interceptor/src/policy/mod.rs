//! Which role a pod may have, and why, compatible with kube2iam (and kiam's namespace
//! annotation). Pure: annotations and settings in, a [`Decision`] out.
//!
//! - The pod annotation `iam.amazonaws.com/role` (`--iam-role-key`), trimmed, names a
//!   role: a full IAM role ARN (any account, an allowed partition) is used as is; a name
//!   (optionally with a path, `team/app`) is appended to `--base-role-arn`, and without a
//!   base ARN it is refused. `--default-role` applies to pods without the annotation; a
//!   pod whose annotation is present but empty gets no role (an explicit opt-out of the
//!   default; kube2iam would build an unusable nameless ARN there).
//! - `iam.amazonaws.com/external-id` passes an ExternalId (STS's rules: 2 to 1224 of
//!   `[\w+=,.@:/-]`); empty means none, as in kube2iam.
//! - With `--namespace-restrictions`, the namespace annotation
//!   `iam.amazonaws.com/allowed-roles` (`--namespace-key`) holds a JSON array of globs
//!   (`*` only, kube2iam's default) or regexps (`--namespace-restriction-format
//!   regexp`). Entries that are not ARNs are resolved against the base ARN first, as
//!   kube2iam does, and matching is against the resolved full ARN.
//! - If that annotation is absent, kiam's `iam.amazonaws.com/permitted` (one regexp) is
//!   honoured, so kiam users can switch as they are: it must match, as kiam does, the
//!   role as the pod wrote it, or else its full ARN, or else (for roles under the base
//!   ARN) its name relative to the base ARN. A namespace with neither permits nothing.
//!
//! Deliberate differences from kube2iam, all towards refusing:
//! - regexps are anchored (kube2iam searches, so its `role-a` also allows `role-ab`);
//!   kiam anchors too. The base ARN prefix of a name entry is matched literally.
//! - the default role is subject to namespace restrictions (kube2iam exempts it).
//! - a name entry in the allowed roles while no base ARN is set is a configuration error
//!   (it could never match), reported instead of silently ignored.
//!
//! Anything malformed (ARN, external id, JSON, regexp) denies, with a reason an operator
//! can act on. Nothing here panics or grants by default.

use std::{collections::BTreeMap, fmt};

use regex::{Regex, RegexBuilder};

pub const DEFAULT_ROLE_KEY: &str = "iam.amazonaws.com/role";
pub const DEFAULT_EXTERNAL_ID_KEY: &str = "iam.amazonaws.com/external-id";
pub const DEFAULT_NAMESPACE_KEY: &str = "iam.amazonaws.com/allowed-roles";
/// kiam's namespace annotation: one regexp of permitted roles.
pub const KIAM_PERMITTED_KEY: &str = "iam.amazonaws.com/permitted";
/// kiam's pod annotation choosing the STS session name: not honoured (session names are
/// the audit trail back to the pod, docs/migrating.md); a pod using it gets an Event.
pub const KIAM_SESSION_NAME_KEY: &str = "iam.amazonaws.com/session-name";
/// IRSA's ServiceAccount annotation, honoured with `--irsa-annotations`.
pub const IRSA_ROLE_KEY: &str = "eks.amazonaws.com/role-arn";
/// Pod annotation: a JSON object from container name to role (name, ARN, or `""` for no
/// credentials), see [`ContainerRoles`].
pub const CONTAINER_ROLES_KEY: &str = "iam.amazonaws.com/container-roles";

/// Restriction entries per namespace at most (each is compiled).
pub const MAX_RESTRICTIONS: usize = 256;
/// Compiled size limit of one restriction regexp: generous for any real list of roles,
/// small enough that a hostile annotation cannot make the agent allocate much.
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// ARNs longer than this are refused before they are looked at (IAM's own limit).
pub const MAX_ARN: usize = 2048;
/// IAM's limits: role names 1 to 64 characters, paths up to 512.
const MAX_ROLE_NAME: usize = 64;
const MAX_ROLE_PATH: usize = 512;
/// Errors keep at most this many characters of the offending input.
const EVIDENCE_CHARS: usize = 200;

fn evidence(text: &str) -> String {
    text.chars().take(EVIDENCE_CHARS).collect()
}

/// `--namespace-restriction-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RestrictionFormat {
    /// `*` matches any run of characters (including `/`); everything else is literal.
    #[default]
    Glob,
    /// Rust `regex` syntax, anchored at both ends.
    Regexp,
}

/// `arn:<partition>:iam::<account>:role/<path/><name>`, validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RoleArn {
    partition: String,
    account: String,
    /// Path and name after `role/`, e.g. `team/app`.
    resource: String,
}

impl RoleArn {
    /// The role's name: what IMDS lists under `security-credentials/`.
    pub fn name(&self) -> &str {
        self.resource.rsplit('/').next().unwrap_or(&self.resource)
    }

    /// The path and name after `role/`, e.g. `team/app`.
    pub fn path_and_name(&self) -> &str {
        &self.resource
    }

    pub fn account(&self) -> &str {
        &self.account
    }

    pub fn partition(&self) -> &str {
        &self.partition
    }
}

impl fmt::Display for RoleArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "arn:{}:iam::{}:role/{}",
            self.partition, self.account, self.resource
        )
    }
}

/// `--base-role-arn`: partition, account and an optional path prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseArn {
    partition: String,
    account: String,
    /// Empty, or a path ending in `/` (`team/`).
    path: String,
}

impl BaseArn {
    /// Accepts `arn:aws:iam::123456789012:role/`, the same without the trailing slash, and
    /// with a path (`.../role/team/`, `.../role/team`): kube2iam appends the missing `/`.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let text = text.trim();
        let with_slash = if text.ends_with(":role") {
            format!("{text}/")
        } else {
            text.to_owned()
        };
        let (partition, account, resource) = split_arn(&with_slash)?;
        let path = if resource.is_empty() || resource.ends_with('/') {
            resource.to_owned()
        } else {
            format!("{resource}/")
        };
        if !path.is_empty() {
            // Validate the path with a placeholder name.
            validate_resource(&format!("{path}x"), text)?;
        }
        Ok(Self {
            partition: partition.to_owned(),
            account: account.to_owned(),
            path,
        })
    }

    /// `arn:<partition>:iam::<account>:role/<path/>`: what names are appended to.
    pub fn prefix(&self) -> String {
        format!(
            "arn:{}:iam::{}:role/{}",
            self.partition, self.account, self.path
        )
    }

    fn join(&self, name: &str) -> Result<RoleArn, PolicyError> {
        let arn = RoleArn {
            partition: self.partition.clone(),
            account: self.account.clone(),
            resource: format!("{}{}", self.path, name.trim_start_matches('/')),
        };
        validate_resource(&arn.resource, name)?;
        Ok(arn)
    }

    /// The role as a name relative to this base, if it lies under it.
    fn relative<'a>(&self, arn: &'a RoleArn) -> Option<&'a str> {
        if arn.partition != self.partition || arn.account != self.account {
            return None;
        }
        arn.resource.strip_prefix(self.path.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// `--iam-role-key`.
    pub iam_role_key: String,
    /// `--iam-external-id`.
    pub iam_external_id_key: String,
    /// `--base-role-arn`.
    pub base_role_arn: Option<BaseArn>,
    /// `--default-role`: a role name or ARN for pods without the annotation.
    pub default_role: Option<String>,
    /// `--namespace-restrictions`.
    pub namespace_restrictions: bool,
    /// `--namespace-key`.
    pub namespace_key: String,
    /// `--namespace-restriction-format`.
    pub restriction_format: RestrictionFormat,
    /// Partitions whose ARNs are accepted. Default: `aws`, `aws-cn`, `aws-us-gov` (the
    /// partitions kube2iam users run in); a cluster in one partition may narrow this to
    /// its own. Others (`aws-iso*`, typos) are refused.
    pub allowed_partitions: Vec<String>,
    /// `--irsa-annotations`: a ServiceAccount's `eks.amazonaws.com/role-arn` names its
    /// pods' role when neither the pod nor the ServiceAccount carry `--iam-role-key`.
    pub irsa_annotations: bool,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            iam_role_key: DEFAULT_ROLE_KEY.into(),
            iam_external_id_key: DEFAULT_EXTERNAL_ID_KEY.into(),
            base_role_arn: None,
            default_role: None,
            namespace_restrictions: false,
            namespace_key: DEFAULT_NAMESPACE_KEY.into(),
            restriction_format: RestrictionFormat::Glob,
            allowed_partitions: vec!["aws".into(), "aws-cn".into(), "aws-us-gov".into()],
            irsa_annotations: false,
        }
    }
}

/// Why a pod gets no role (the payload of [`Decision::Denied`]).
pub type DenyReason = PolicyError;

/// Why a pod gets no role, or why a setting is invalid. Each variant keeps the offending
/// input (cut to 200 characters); the message says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("invalid role {value:?}: {why}")]
    InvalidArn { value: String, why: &'static str },
    #[error(
        "role {role:?} is a name, but no --base-role-arn is set: use a full ARN or set --base-role-arn"
    )]
    NoBaseArn { role: String },
    #[error(
        "role {arn} is in partition {partition:?}, which is not allowed here (allowed: {allowed})"
    )]
    PartitionNotAllowed {
        arn: String,
        partition: String,
        allowed: String,
    },
    #[error("external id {value:?} is invalid: {why}")]
    InvalidExternalId { value: String, why: &'static str },
    #[error("namespace {namespace} has invalid role restrictions in {key}: {why}")]
    InvalidRestrictions {
        namespace: String,
        key: String,
        why: String,
    },
    #[error(
        "namespace {namespace} allows no roles: annotate it with {key} (a JSON array of allowed roles)"
    )]
    NoAllowedRoles { namespace: String, key: String },
    #[error(
        "role {role} is not allowed in namespace {namespace}: add it to the namespace's {key} annotation"
    )]
    NotAllowed {
        role: String,
        namespace: String,
        key: String,
    },
    #[error("pod annotation {key} is invalid: {why}")]
    InvalidContainerRoles { key: String, why: String },
    #[error(
        "the connection comes from a container the pod's status does not list yet (or from \
         outside its containers), and the pod gives its containers different roles: refused \
         until the kubelet reports the container"
    )]
    UnknownContainer,
    #[error(
        "the pod's ServiceAccount is not known yet (it may name the pod's role): refused until it is"
    )]
    ServiceAccountPending,
}

impl PolicyError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::InvalidArn { .. } => "invalid_arn",
            Self::NoBaseArn { .. } => "no_base_arn",
            Self::PartitionNotAllowed { .. } => "partition_not_allowed",
            Self::InvalidExternalId { .. } => "invalid_external_id",
            Self::InvalidRestrictions { .. } => "invalid_restrictions",
            Self::NoAllowedRoles { .. } => "no_allowed_roles",
            Self::NotAllowed { .. } => "not_allowed",
            Self::InvalidContainerRoles { .. } => "invalid_container_roles",
            Self::UnknownContainer => "unknown_container",
            Self::ServiceAccountPending => "service_account_pending",
        }
    }

    /// The Kubernetes Event reason for this refusal.
    pub fn event_reason(&self) -> &'static str {
        match self {
            Self::NotAllowed { .. } | Self::NoAllowedRoles { .. } => "RoleNotAllowed",
            Self::InvalidRestrictions { .. } => "InvalidNamespaceRestrictions",
            Self::InvalidContainerRoles { .. } => "InvalidContainerRoles",
            Self::UnknownContainer => "UnknownContainer",
            Self::ServiceAccountPending => "ServiceAccountPending",
            _ => "InvalidRoleAnnotation",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleSource {
    /// The pod's role annotation.
    Annotation,
    /// The pod's `container-roles` entry for the calling container.
    Container,
    /// The ServiceAccount's `--iam-role-key` annotation.
    ServiceAccount,
    /// The ServiceAccount's IRSA annotation (`--irsa-annotations`).
    Irsa,
    /// `--default-role`.
    Default,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Role {
        arn: RoleArn,
        external_id: Option<String>,
        source: RoleSource,
        /// The container this role is for, when the pod gives it a role of its own
        /// (`container-roles`): its credentials are a session of their own.
        container: Option<String>,
    },
    /// No annotation (or an empty one) and no default role.
    NoRole,
    Denied(DenyReason),
}

const ARN_SHAPE: &str = "expected arn:<partition>:iam::<12-digit account>:role/<path/><name>";

/// Splits a role ARN into partition, account and what follows `role/`.
fn split_arn(text: &str) -> Result<(&str, &str, &str), PolicyError> {
    let invalid = |why| PolicyError::InvalidArn {
        value: evidence(text),
        why,
    };
    if text.len() > MAX_ARN {
        return Err(invalid("longer than 2048 characters"));
    }
    let parts: Vec<&str> = text.splitn(6, ':').collect();
    let [arn, partition, service, region, account, resource] = parts.as_slice() else {
        return Err(invalid(ARN_SHAPE));
    };
    if *arn != "arn" || *service != "iam" || !region.is_empty() {
        return Err(invalid(ARN_SHAPE));
    }
    let partition_ok = !partition.is_empty()
        && partition
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'-');
    if !partition_ok {
        return Err(invalid("malformed partition"));
    }
    if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid("the account id must be 12 digits"));
    }
    let resource = resource
        .strip_prefix("role/")
        .ok_or_else(|| invalid("not a role ARN (the resource must start with role/)"))?;
    Ok((partition, account, resource))
}

/// IAM's rules for role paths and names: components of `[\w+=,.@-]` (ASCII), the name 1
/// to 64 characters, the path at most 512.
fn validate_resource(resource: &str, original: &str) -> Result<(), PolicyError> {
    let invalid = |why| PolicyError::InvalidArn {
        value: evidence(original),
        why,
    };
    let (path, name) = resource.rsplit_once('/').unwrap_or(("", resource));
    if name.is_empty() || name.len() > MAX_ROLE_NAME {
        return Err(invalid("the role name must be 1 to 64 characters"));
    }
    if path.len() + 2 > MAX_ROLE_PATH {
        return Err(invalid("the role path must be at most 512 characters"));
    }
    let valid = |segment: &str| {
        !segment.is_empty()
            && segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_+=,.@-".contains(&b))
    };
    if !resource.split('/').all(valid) {
        return Err(invalid(
            "role paths and names may only contain letters, digits and _+=,.@- (no empty path components)",
        ));
    }
    Ok(())
}

/// Parses a full IAM role ARN (any partition: [`resolve_role`] checks the allowed ones).
pub fn parse_role_arn(text: &str) -> Result<RoleArn, PolicyError> {
    let (partition, account, resource) = split_arn(text)?;
    validate_resource(resource, text)?;
    Ok(RoleArn {
        partition: partition.to_owned(),
        account: account.to_owned(),
        resource: resource.to_owned(),
    })
}

/// A role as written in an annotation or flag: a full ARN (starts with `arn:`), or a name
/// (optionally with a path) under the base ARN. Trimmed; partition checked.
pub fn resolve_role(value: &str, config: &PolicyConfig) -> Result<RoleArn, PolicyError> {
    let value = value.trim();
    let arn = if value.starts_with("arn:") {
        parse_role_arn(value)?
    } else {
        let base = config
            .base_role_arn
            .as_ref()
            .ok_or_else(|| PolicyError::NoBaseArn {
                role: evidence(value),
            })?;
        base.join(value)?
    };
    if !config.allowed_partitions.contains(&arn.partition) {
        return Err(PolicyError::PartitionNotAllowed {
            arn: arn.to_string(),
            partition: arn.partition.clone(),
            allowed: config.allowed_partitions.join(", "),
        });
    }
    Ok(arn)
}

/// STS's rules for ExternalId. Empty (after trimming) means none, as in kube2iam.
fn external_id(value: &str) -> Result<Option<String>, PolicyError> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    let invalid = |why| PolicyError::InvalidExternalId {
        value: evidence(value),
        why,
    };
    if !(2..=1224).contains(&value.len()) {
        return Err(invalid("must be 2 to 1224 characters"));
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"_+=,.@:/-".contains(&b);
    if !value.bytes().all(allowed) {
        return Err(invalid("may only contain letters, digits and _+=,.@:/-"));
    }
    Ok(Some(value.to_owned()))
}

#[derive(Debug, Clone)]
enum Matcher {
    Glob(String),
    Regex(Regex),
}

impl Matcher {
    fn matches(&self, text: &str) -> bool {
        match self {
            Self::Glob(pattern) => glob_match(pattern, text),
            Self::Regex(regex) => regex.is_match(text),
        }
    }
}

/// `*` matches any run of characters; everything else is literal (kube2iam's go-glob).
/// The first and last pieces are anchored; taking each middle piece leftmost is exact for
/// `*`-only globs (no backtracking needed).
fn glob_match(pattern: &str, text: &str) -> bool {
    let pieces: Vec<&str> = pattern.split('*').collect();
    let [first, middle @ .., last] = pieces.as_slice() else {
        // No `*` at all: a literal.
        return pattern == text;
    };
    let Some(inner) = text
        .strip_prefix(first)
        .and_then(|rest| rest.strip_suffix(last))
    else {
        return false;
    };
    let mut rest = inner;
    for piece in middle {
        match rest.find(piece) {
            Some(at) => rest = &rest[at + piece.len()..],
            None => return false,
        }
    }
    true
}

/// Compiles `pattern` to match whole strings only, with a size limit.
fn anchored(pattern: &str) -> Result<Regex, regex::Error> {
    RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
}

#[derive(Debug, Clone)]
enum Restriction {
    /// `--namespace-restrictions` is off.
    Off,
    /// kube2iam's annotation: the resolved ARN must match one entry.
    Allowed(Vec<Matcher>),
    /// kiam's annotation: the role as written, its ARN or its base-relative name must match.
    Permitted(Regex),
    /// Every role is refused with this reason (no annotation, or a malformed one).
    Refused(PolicyError),
}

/// A namespace's restrictions, parsed once per namespace version (annotations change
/// rarely; requests are frequent). A malformed annotation is kept as the reason every
/// role in the namespace is refused.
#[derive(Debug, Clone)]
pub struct NamespacePolicy {
    namespace: String,
    restriction: Restriction,
}

impl NamespacePolicy {
    pub fn from_annotations(
        namespace: &str,
        annotations: &BTreeMap<String, String>,
        config: &PolicyConfig,
    ) -> Self {
        let invalid = |key: &str, why: String| {
            Restriction::Refused(PolicyError::InvalidRestrictions {
                namespace: namespace.to_owned(),
                key: key.to_owned(),
                why,
            })
        };
        let restriction = if !config.namespace_restrictions {
            Restriction::Off
        } else if let Some(value) = annotations.get(&config.namespace_key) {
            match allowed_roles(value, config) {
                Ok(matchers) => Restriction::Allowed(matchers),
                Err(why) => invalid(&config.namespace_key, why),
            }
        } else if let Some(value) = annotations.get(KIAM_PERMITTED_KEY) {
            match anchored(value.trim()) {
                Ok(regex) => Restriction::Permitted(regex),
                Err(error) => invalid(KIAM_PERMITTED_KEY, error.to_string()),
            }
        } else {
            Restriction::Refused(PolicyError::NoAllowedRoles {
                namespace: namespace.to_owned(),
                key: config.namespace_key.clone(),
            })
        };
        Self {
            namespace: namespace.to_owned(),
            restriction,
        }
    }

    fn check(
        &self,
        written: &str,
        arn: &RoleArn,
        config: &PolicyConfig,
    ) -> Result<(), PolicyError> {
        let full = arn.to_string();
        let (allowed, key) = match &self.restriction {
            Restriction::Off => return Ok(()),
            Restriction::Refused(error) => return Err(error.clone()),
            Restriction::Allowed(matchers) => (
                matchers.iter().any(|matcher| matcher.matches(&full)),
                config.namespace_key.as_str(),
            ),
            Restriction::Permitted(regex) => {
                let relative = config
                    .base_role_arn
                    .as_ref()
                    .and_then(|base| base.relative(arn));
                let allowed = regex.is_match(written)
                    || regex.is_match(&full)
                    || relative.is_some_and(|name| regex.is_match(name));
                (allowed, KIAM_PERMITTED_KEY)
            }
        };
        if allowed {
            Ok(())
        } else {
            Err(PolicyError::NotAllowed {
                role: full,
                namespace: self.namespace.clone(),
                key: key.to_owned(),
            })
        }
    }
}

/// kube2iam's allowed-roles annotation: a JSON array of at most [`MAX_RESTRICTIONS`]
/// strings, each compiled per the restriction format.
fn allowed_roles(value: &str, config: &PolicyConfig) -> Result<Vec<Matcher>, String> {
    let entries: Vec<serde_json::Value> = serde_json::from_str(value)
        .map_err(|error| format!("not a JSON array of strings: {error}"))?;
    if entries.len() > MAX_RESTRICTIONS {
        return Err(format!(
            "{} entries, more than the {MAX_RESTRICTIONS} allowed",
            entries.len()
        ));
    }
    entries
        .iter()
        .map(|entry| {
            let entry = entry
                .as_str()
                .ok_or_else(|| format!("entry {} is not a string", evidence(&entry.to_string())))?;
            matcher(entry.trim(), config)
        })
        .collect()
}

/// One allowed-roles entry. Entries that are not ARNs are resolved against the base ARN
/// like pod annotations, so the same string allows the same role in both places; the
/// base ARN is literal text even in a regexp.
fn matcher(entry: &str, config: &PolicyConfig) -> Result<Matcher, String> {
    let base = if entry.starts_with("arn:") {
        String::new()
    } else {
        config
            .base_role_arn
            .as_ref()
            .map(BaseArn::prefix)
            .ok_or_else(|| {
                format!(
                    "entry {:?} is a role name but no --base-role-arn is set: write a full ARN",
                    evidence(entry)
                )
            })?
    };
    match config.restriction_format {
        RestrictionFormat::Glob => Ok(Matcher::Glob(format!("{base}{entry}"))),
        RestrictionFormat::Regexp => anchored(&format!("{}{entry}", regex::escape(&base)))
            .map(Matcher::Regex)
            .map_err(|error| format!("entry {:?}: {error}", evidence(entry))),
    }
}

/// The decision for a pod, given its annotations and its namespace's policy (no
/// ServiceAccount, no container: see [`decide_for`]).
pub fn decide(
    pod_annotations: &BTreeMap<String, String>,
    namespace: &NamespacePolicy,
    config: &PolicyConfig,
) -> Decision {
    decide_for(
        &Subject {
            pod: pod_annotations,
            service_account: None,
            service_account_pending: false,
            containers: &[],
            caller: Caller::Pod,
        },
        namespace,
        config,
    )
}

/// Which of a pod's containers is asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller<'a> {
    /// No connection: the pod as a whole (prefetch, `/debug/store`).
    Pod,
    /// A connection from this container (its name, from the pod's status).
    Container(&'a str),
    /// A connection whose container the pod's status does not list (yet), or from the
    /// pod's own cgroup outside any container.
    Unattributed,
}

/// Everything a decision is made from.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub pod: &'a BTreeMap<String, String>,
    /// The annotations of the pod's ServiceAccount, if it exists and is known.
    pub service_account: Option<&'a BTreeMap<String, String>>,
    /// The pod's ServiceAccount is not known yet (its watch has not listed it): a pod
    /// without a role of its own is refused meanwhile rather than given the default.
    pub service_account_pending: bool,
    /// The names of the pod's containers (init, sidecar and ephemeral included), to check
    /// `container-roles` against.
    pub containers: &'a [String],
    pub caller: Caller<'a>,
}

/// `iam.amazonaws.com/container-roles`: a JSON object from container name to role.
///
/// Fail closed: a malformed object, or one naming a container the pod does not have (a
/// typo would otherwise hand the pod's role to the very sidecar the entry was meant to
/// keep off it), refuses every container of the pod until it is fixed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRoles(BTreeMap<String, String>);

/// Entries in `container-roles` at most (a pod has a handful of containers).
pub const MAX_CONTAINER_ROLES: usize = 64;

impl ContainerRoles {
    pub fn parse(value: &str, containers: &[String]) -> Result<Self, PolicyError> {
        let invalid = |why: String| PolicyError::InvalidContainerRoles {
            key: CONTAINER_ROLES_KEY.to_owned(),
            why,
        };
        let map: BTreeMap<String, serde_json::Value> = serde_json::from_str(value)
            .map_err(|error| invalid(format!("not a JSON object of strings: {error}")))?;
        if map.len() > MAX_CONTAINER_ROLES {
            return Err(invalid(format!(
                "{} entries, more than the {MAX_CONTAINER_ROLES} allowed",
                map.len()
            )));
        }
        let mut roles = BTreeMap::new();
        for (name, role) in map {
            if !containers.contains(&name) {
                return Err(invalid(format!(
                    "container {:?} is not a container of the pod",
                    evidence(&name)
                )));
            }
            let role = role.as_str().ok_or_else(|| {
                invalid(format!(
                    "the role of container {:?} is not a string",
                    evidence(&name)
                ))
            })?;
            roles.insert(name, role.trim().to_owned());
        }
        Ok(Self(roles))
    }

    /// The role written for `container`, if it has one of its own.
    pub fn get(&self, container: &str) -> Option<&str> {
        self.0.get(container).map(String::as_str)
    }
}

/// The decision for a pod's caller. Precedence: the calling container's entry in
/// `container-roles`, the pod's role annotation, the ServiceAccount's (`--iam-role-key`,
/// then IRSA's with `--irsa-annotations`), `--default-role`. An empty value at any level
/// means no role and stops there. Namespace restrictions apply to the result.
pub fn decide_for(
    subject: &Subject<'_>,
    namespace: &NamespacePolicy,
    config: &PolicyConfig,
) -> Decision {
    let mut container = None;
    let mut chosen = None;
    if let Some(value) = subject.pod.get(CONTAINER_ROLES_KEY) {
        let roles = match ContainerRoles::parse(value, subject.containers) {
            Ok(roles) => roles,
            Err(error) => return Decision::Denied(error),
        };
        match subject.caller {
            Caller::Unattributed => return Decision::Denied(PolicyError::UnknownContainer),
            Caller::Pod => {}
            Caller::Container(name) => {
                if let Some(role) = roles.get(name) {
                    container = Some(name.to_owned());
                    chosen = Some((role.to_owned(), RoleSource::Container));
                }
            }
        }
    }
    let from_service_account = || {
        let annotations = subject.service_account?;
        if let Some(value) = annotations.get(&config.iam_role_key) {
            return Some((value.clone(), RoleSource::ServiceAccount));
        }
        if config.irsa_annotations {
            return annotations
                .get(IRSA_ROLE_KEY)
                .map(|value| (value.clone(), RoleSource::Irsa));
        }
        None
    };
    let chosen = chosen.or_else(|| {
        subject
            .pod
            .get(&config.iam_role_key)
            .map(|value| (value.clone(), RoleSource::Annotation))
    });
    if chosen.is_none() && subject.service_account_pending {
        return Decision::Denied(PolicyError::ServiceAccountPending);
    }
    let chosen = chosen.or_else(from_service_account).or_else(|| {
        config
            .default_role
            .as_deref()
            .map(str::trim)
            .filter(|default| !default.is_empty())
            .map(|default| (default.to_owned(), RoleSource::Default))
    });
    let Some((written, source)) = chosen else {
        return Decision::NoRole;
    };
    // Present but empty: no role, not the next level's.
    let written = written.trim();
    if written.is_empty() {
        return Decision::NoRole;
    }
    let arn = match resolve_role(written, config) {
        Ok(arn) => arn,
        Err(error) => return Decision::Denied(error),
    };
    if let Err(error) = namespace.check(written, &arn, config) {
        return Decision::Denied(error);
    }
    let external_id = subject
        .pod
        .get(&config.iam_external_id_key)
        .map_or(Ok(None), |value| external_id(value));
    match external_id {
        Ok(external_id) => Decision::Role {
            arn,
            external_id,
            source,
            container,
        },
        Err(error) => Decision::Denied(error),
    }
}

#[cfg(test)]
mod tests;
