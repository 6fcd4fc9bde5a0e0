//! Which role a pod may have, and why, compatible with kube2iam (and kiam's namespace
//! annotation). Pure: annotations and settings in, a [`Decision`] out.
//!
//! - The pod annotation `iam.amazonaws.com/role` (`--iam-role-key`) names a role: a full
//!   IAM role ARN (any account, an allowed partition) is used as is; a name (optionally
//!   with a path, `team/app`) is appended to `--base-role-arn`. `--default-role` applies
//!   to pods without the annotation. `iam.amazonaws.com/external-id` passes an ExternalId.
//! - With `--namespace-restrictions`, the namespace annotation
//!   `iam.amazonaws.com/allowed-roles` (`--namespace-key`) holds a JSON array of globs
//!   (`*` only, kube2iam's default) or anchored regexps (`--namespace-restriction-format
//!   regexp`). Entries that are not ARNs are resolved against the base ARN first, and
//!   matching is against the resolved full ARN. If that annotation is absent, kiam's
//!   `iam.amazonaws.com/permitted` (one anchored regexp) is honoured, matched against the
//!   role as the pod wrote it or its full ARN, so kiam users can switch as they are. A
//!   namespace with neither permits nothing.
//! - Anything malformed (ARN, external id, JSON, regexp) denies, with a reason an operator
//!   can act on. Nothing here panics or grants by default.

use std::{collections::BTreeMap, fmt};

use regex::{Regex, RegexBuilder};

pub const DEFAULT_ROLE_KEY: &str = "iam.amazonaws.com/role";
pub const DEFAULT_EXTERNAL_ID_KEY: &str = "iam.amazonaws.com/external-id";
pub const DEFAULT_NAMESPACE_KEY: &str = "iam.amazonaws.com/allowed-roles";
/// kiam's namespace annotation: one regexp of permitted roles.
pub const KIAM_PERMITTED_KEY: &str = "iam.amazonaws.com/permitted";

/// Restriction entries per namespace at most (each is compiled).
pub const MAX_RESTRICTIONS: usize = 256;
/// Compiled size limit of one restriction regexp.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RestrictionFormat {
    #[default]
    Glob,
    Regexp,
}

/// `arn:<partition>:iam::<account>:role/<path/><name>`.
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
    path: String,
}

impl BaseArn {
    /// Accepts `arn:aws:iam::123456789012:role/`, without the trailing slash, and with a
    /// path (`.../role/team/`).
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
            validate_resource(&format!("{path}x"), &with_slash)?;
        }
        Ok(Self {
            partition: partition.to_owned(),
            account: account.to_owned(),
            path,
        })
    }

    fn join(&self, name: &str) -> Result<RoleArn, PolicyError> {
        let resource = format!("{}{}", self.path, name.trim_start_matches('/'));
        let arn = RoleArn {
            partition: self.partition.clone(),
            account: self.account.clone(),
            resource,
        };
        validate_resource(&arn.resource, name)?;
        Ok(arn)
    }
}

#[derive(Debug, Clone)]
pub struct PolicyConfig {
    pub iam_role_key: String,
    pub iam_external_id_key: String,
    pub base_role_arn: Option<BaseArn>,
    /// A role name or ARN for pods without the annotation.
    pub default_role: Option<String>,
    pub namespace_restrictions: bool,
    pub namespace_key: String,
    pub restriction_format: RestrictionFormat,
    /// Partitions whose ARNs are accepted. Default: `aws`, `aws-cn`, `aws-us-gov` (the
    /// partitions with IMDS-based compute and STS); a cluster in one partition should
    /// narrow this to its own.
    pub allowed_partitions: Vec<String>,
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
        }
    }
}

/// Why a pod gets no role.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("{value:?} is not an IAM role ARN: {why}")]
    InvalidArn { value: String, why: &'static str },
    #[error(
        "role {role:?} is a name, but no --base-role-arn is set: use a full ARN or set --base-role-arn"
    )]
    NoBaseArn { role: String },
    #[error("role ARN partition {partition:?} is not allowed on this cluster")]
    PartitionNotAllowed { partition: String },
    #[error("external id annotation is invalid: {why}")]
    InvalidExternalId { why: &'static str },
    #[error("namespace {namespace} has invalid role restrictions ({key}): {why}")]
    InvalidRestrictions {
        namespace: String,
        key: String,
        why: String,
    },
    #[error(
        "namespace {namespace} allows no roles: annotate it with {key} (a JSON array of allowed roles)"
    )]
    NoAllowedRoles { namespace: String, key: String },
    #[error("role {role} is not allowed in namespace {namespace} (see its {key} annotation)")]
    NotAllowed {
        role: String,
        namespace: String,
        key: String,
    },
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
        }
    }

    /// The Kubernetes Event reason for this refusal.
    pub fn event_reason(&self) -> &'static str {
        match self {
            Self::NotAllowed { .. } | Self::NoAllowedRoles { .. } => "RoleNotAllowed",
            Self::InvalidRestrictions { .. } => "InvalidNamespaceRestrictions",
            _ => "InvalidRoleAnnotation",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleSource {
    Annotation,
    Default,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Role {
        arn: RoleArn,
        external_id: Option<String>,
        source: RoleSource,
    },
    /// No annotation and no default role.
    NoRole,
    Denied(PolicyError),
}

fn split_arn(text: &str) -> Result<(&str, &str, &str), PolicyError> {
    let invalid = |why| PolicyError::InvalidArn {
        value: text.chars().take(200).collect(),
        why,
    };
    if text.len() > 2048 {
        return Err(invalid("longer than 2048 characters"));
    }
    let parts: Vec<&str> = text.splitn(6, ':').collect();
    let [arn, partition, service, region, account, resource] = parts.as_slice() else {
        return Err(invalid(
            "expected arn:<partition>:iam::<account>:role/<name>",
        ));
    };
    if *arn != "arn" || *service != "iam" || !region.is_empty() {
        return Err(invalid(
            "expected arn:<partition>:iam::<account>:role/<name>",
        ));
    }
    if partition.is_empty()
        || !partition
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'-')
    {
        return Err(invalid("malformed partition"));
    }
    if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid("the account id must be 12 digits"));
    }
    let resource = resource
        .strip_prefix("role/")
        .ok_or_else(|| invalid("not a role ARN (resource must start with role/)"))?;
    Ok((partition, account, resource))
}

/// IAM's rules for role paths and names: `[\w+=,.@-]`, name 1..=64 characters.
fn validate_resource(resource: &str, original: &str) -> Result<(), PolicyError> {
    let invalid = |why| PolicyError::InvalidArn {
        value: original.chars().take(200).collect(),
        why,
    };
    let name = resource.rsplit('/').next().unwrap_or(resource);
    if name.is_empty() || name.len() > 64 {
        return Err(invalid("the role name must be 1 to 64 characters"));
    }
    let valid = |segment: &str| {
        !segment.is_empty()
            && segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_+=,.@-".contains(&b))
    };
    if !resource.split('/').all(valid) || resource.len() > 512 + 64 {
        return Err(invalid(
            "role paths and names may only contain letters, digits and _+=,.@-",
        ));
    }
    Ok(())
}

/// Parses a full IAM role ARN.
pub fn parse_role_arn(text: &str) -> Result<RoleArn, PolicyError> {
    let (partition, account, resource) = split_arn(text)?;
    validate_resource(resource, text)?;
    Ok(RoleArn {
        partition: partition.to_owned(),
        account: account.to_owned(),
        resource: resource.to_owned(),
    })
}

/// A role as written in an annotation or flag: a full ARN, or a name under the base ARN.
pub fn resolve_role(value: &str, config: &PolicyConfig) -> Result<RoleArn, PolicyError> {
    let value = value.trim();
    let arn = if value.starts_with("arn:") {
        parse_role_arn(value)?
    } else {
        let base = config
            .base_role_arn
            .as_ref()
            .ok_or_else(|| PolicyError::NoBaseArn {
                role: value.chars().take(200).collect(),
            })?;
        base.join(value)?
    };
    if !config.allowed_partitions.contains(&arn.partition) {
        return Err(PolicyError::PartitionNotAllowed {
            partition: arn.partition.clone(),
        });
    }
    Ok(arn)
}

fn external_id(value: &str) -> Result<String, PolicyError> {
    let value = value.trim();
    if !(2..=1224).contains(&value.len()) {
        return Err(PolicyError::InvalidExternalId {
            why: "must be 2 to 1224 characters",
        });
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_+=,.@:/-".contains(&b))
    {
        return Err(PolicyError::InvalidExternalId {
            why: "may only contain letters, digits and _+=,.@:/-",
        });
    }
    Ok(value.to_owned())
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

/// `*` matches any run of characters; everything else is literal (kube2iam's glob).
fn glob_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    true
}

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
    /// kiam's annotation: the role as written, or its ARN, must match.
    Permitted(Regex),
    Refused(PolicyError),
}

/// A namespace's restrictions, parsed once per namespace version (annotations change
/// rarely; requests are frequent).
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
        let restriction = if !config.namespace_restrictions {
            Restriction::Off
        } else if let Some(value) = annotations.get(&config.namespace_key) {
            match allowed_roles(value, config) {
                Ok(matchers) => Restriction::Allowed(matchers),
                Err(why) => Restriction::Refused(PolicyError::InvalidRestrictions {
                    namespace: namespace.to_owned(),
                    key: config.namespace_key.clone(),
                    why,
                }),
            }
        } else if let Some(value) = annotations.get(KIAM_PERMITTED_KEY) {
            match anchored(value.trim()) {
                Ok(regex) => Restriction::Permitted(regex),
                Err(error) => Restriction::Refused(PolicyError::InvalidRestrictions {
                    namespace: namespace.to_owned(),
                    key: KIAM_PERMITTED_KEY.into(),
                    why: error.to_string(),
                }),
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
                config.namespace_key.clone(),
            ),
            Restriction::Permitted(regex) => (
                regex.is_match(written.trim()) || regex.is_match(&full),
                KIAM_PERMITTED_KEY.to_owned(),
            ),
        };
        if allowed {
            Ok(())
        } else {
            Err(PolicyError::NotAllowed {
                role: full,
                namespace: self.namespace.clone(),
                key,
            })
        }
    }
}

fn allowed_roles(value: &str, config: &PolicyConfig) -> Result<Vec<Matcher>, String> {
    let entries: Vec<serde_json::Value> =
        serde_json::from_str(value).map_err(|error| format!("not a JSON array: {error}"))?;
    if entries.len() > MAX_RESTRICTIONS {
        return Err(format!("more than {MAX_RESTRICTIONS} entries"));
    }
    entries
        .iter()
        .map(|entry| {
            let entry = entry
                .as_str()
                .ok_or_else(|| format!("entry {entry} is not a string"))?
                .trim();
            // Names are resolved against the base ARN like pod annotations, so the
            // same string allows the same role in both places.
            let full = if entry.starts_with("arn:") {
                entry.to_owned()
            } else {
                match &config.base_role_arn {
                    Some(base) => format!(
                        "arn:{}:iam::{}:role/{}{}",
                        base.partition, base.account, base.path, entry
                    ),
                    None => entry.to_owned(),
                }
            };
            match config.restriction_format {
                RestrictionFormat::Glob => Ok(Matcher::Glob(full)),
                RestrictionFormat::Regexp => anchored(&full)
                    .map(Matcher::Regex)
                    .map_err(|error| format!("entry {entry:?}: {error}")),
            }
        })
        .collect()
}

/// The decision for a pod, given its annotations and its namespace's policy.
pub fn decide(
    pod_annotations: &BTreeMap<String, String>,
    namespace: &NamespacePolicy,
    config: &PolicyConfig,
) -> Decision {
    let annotated = pod_annotations
        .get(&config.iam_role_key)
        .map(|value| value.trim())
        .filter(|value| !value.is_empty());
    let (written, source) = match (annotated, config.default_role.as_deref()) {
        (Some(role), _) => (role, RoleSource::Annotation),
        (None, Some(default)) => (default, RoleSource::Default),
        (None, None) => return Decision::NoRole,
    };
    let arn = match resolve_role(written, config) {
        Ok(arn) => arn,
        Err(error) => return Decision::Denied(error),
    };
    if let Err(error) = namespace.check(written, &arn, config) {
        return Decision::Denied(error);
    }
    let external_id = match pod_annotations.get(&config.iam_external_id_key) {
        Some(value) => match external_id(value) {
            Ok(id) => Some(id),
            Err(error) => return Decision::Denied(error),
        },
        None => None,
    };
    Decision::Role {
        arn,
        external_id,
        source,
    }
}

#[cfg(test)]
mod tests;
