//! Standalone mode's bindings: cgroup path patterns -> roles, for hosts without
//! Kubernetes (per-service roles for systemd units or containers on one EC2 instance).
//!
//! ```yaml
//! bindings:
//!   - name: billing                      # STS session name, and the log/metrics label
//!     cgroup: /system.slice/billing.service
//!     role: arn:aws:iam::123456789012:role/billing   # or a name under --base-role-arn
//!   - name: workers
//!     cgroup: /system.slice/worker@*.service         # `*` matches any run of characters
//!     role: worker
//!     externalId: tenant-42                         # optional
//! ```
//! Paths are relative to the cgroup2 mount. The first binding whose pattern matches the
//! caller's cgroup (or one of its parents) wins; no match means no role. Roles go through
//! the same checks as pod annotations (`policy::resolve_role`), so a bad entry is refused
//! when the file is loaded, with the entry named.

use std::{path::Path, sync::Arc};

use serde::Deserialize;

use crate::policy::{PolicyConfig, PolicyError, RoleArn, resolve_role};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    bindings: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Entry {
    name: String,
    cgroup: String,
    role: String,
    external_id: Option<String>,
}

/// One loaded binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub name: String,
    pub pattern: String,
    pub role: RoleArn,
    pub external_id: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BindingsError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid bindings file: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_norway::Error,
    },
    #[error("binding {name:?}: {source}")]
    Role {
        name: String,
        #[source]
        source: PolicyError,
    },
    #[error("binding {name:?}: {why}")]
    Invalid { name: String, why: &'static str },
}

impl BindingsError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Read { .. } => "read",
            Self::Parse { .. } => "parse",
            Self::Role { .. } => "role",
            Self::Invalid { .. } => "invalid",
        }
    }
}

/// A loaded, validated bindings file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bindings(Vec<Binding>);

impl Bindings {
    pub fn parse(text: &str, source: &str, policy: &PolicyConfig) -> Result<Self, BindingsError> {
        let file: File =
            serde_norway::from_str(text).map_err(|source_error| BindingsError::Parse {
                path: source.to_owned(),
                source: source_error,
            })?;
        let mut bindings = Vec::with_capacity(file.bindings.len());
        for entry in file.bindings {
            let invalid = |why| BindingsError::Invalid {
                name: entry.name.clone(),
                why,
            };
            if entry.name.is_empty() || entry.name.len() > 64 {
                return Err(invalid("the name must be 1 to 64 characters"));
            }
            if !entry.cgroup.starts_with('/') || entry.cgroup.contains("..") {
                return Err(invalid(
                    "the cgroup pattern must be an absolute path without `..`",
                ));
            }
            if bindings.iter().any(|b: &Binding| b.name == entry.name) {
                return Err(invalid("the name is used twice"));
            }
            let role = resolve_role(&entry.role, policy).map_err(|source| BindingsError::Role {
                name: entry.name.clone(),
                source,
            })?;
            bindings.push(Binding {
                name: entry.name,
                pattern: entry.cgroup.trim_end_matches('/').to_owned(),
                role,
                external_id: entry.external_id,
            });
        }
        Ok(Self(bindings))
    }

    pub fn load(path: &Path, policy: &PolicyConfig) -> Result<Self, BindingsError> {
        let text = std::fs::read_to_string(path).map_err(|source| BindingsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string(), policy)
    }

    /// The binding for a cgroup path: the first whose pattern matches the path or one of
    /// its parents (a service's processes may sit in sub-cgroups of its unit).
    pub fn matching(&self, cgroup_path: &str) -> Option<&Binding> {
        let mut candidate = cgroup_path.trim_end_matches('/');
        loop {
            if let Some(binding) = self.0.iter().find(|b| glob(&b.pattern, candidate)) {
                return Some(binding);
            }
            match candidate.rfind('/') {
                Some(0) | None => return None,
                Some(at) => candidate = &candidate[..at],
            }
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `*` matches any run of characters, everything else literally.
fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let [first, middle @ .., last] = parts.as_slice() else {
        return pattern == text;
    };
    if parts.len() == 1 {
        return pattern == text;
    }
    if !text.starts_with(first)
        || !text[first.len()..].ends_with(last)
        || text.len() < first.len() + last.len()
    {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// The current bindings, replaced whole when the file changes.
pub type Shared = Arc<std::sync::RwLock<Arc<Bindings>>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::BaseArn;

    fn policy() -> PolicyConfig {
        PolicyConfig {
            base_role_arn: Some(BaseArn::parse("arn:aws:iam::123456789012:role/").unwrap()),
            ..PolicyConfig::default()
        }
    }

    const FILE: &str = "
bindings:
  - name: billing
    cgroup: /system.slice/billing.service
    role: arn:aws:iam::999999999999:role/billing
  - name: workers
    cgroup: /system.slice/worker@*.service
    role: worker
    externalId: tenant-42
";

    #[test]
    fn first_match_on_the_path_or_a_parent() {
        let bindings = Bindings::parse(FILE, "test", &policy()).unwrap();
        assert_eq!(bindings.len(), 2);
        let billing = bindings.matching("/system.slice/billing.service").unwrap();
        assert_eq!(
            billing.role.to_string(),
            "arn:aws:iam::999999999999:role/billing"
        );
        let nested = bindings
            .matching("/system.slice/billing.service/child")
            .unwrap();
        assert_eq!(nested.name, "billing");
        let worker = bindings.matching("/system.slice/worker@3.service").unwrap();
        assert_eq!(
            worker.role.to_string(),
            "arn:aws:iam::123456789012:role/worker"
        );
        assert_eq!(worker.external_id.as_deref(), Some("tenant-42"));
        assert!(bindings.matching("/system.slice/sshd.service").is_none());
        assert!(bindings.matching("/").is_none());
        assert!(
            bindings
                .matching("/system.slice/billing.service2")
                .is_none()
        );
    }

    #[test]
    fn bad_files_are_refused_with_the_entry_named() {
        let cases = [
            ("not: [yaml", "parse"),
            (
                "bindings:\n  - name: a\n    cgroup: /x\n    role: arn:aws:s3:::b\n",
                "role",
            ),
            (
                "bindings:\n  - name: a\n    cgroup: x\n    role: r\n",
                "invalid",
            ),
            (
                "bindings:\n  - name: a\n    cgroup: /a/../b\n    role: r\n",
                "invalid",
            ),
            (
                "bindings:\n  - name: a\n    cgroup: /x\n    role: r\n  - name: a\n    cgroup: /y\n    role: r\n",
                "invalid",
            ),
            (
                "bindings:\n  - name: a\n    cgroup: /x\n    role: r\n    extra: 1\n",
                "parse",
            ),
            (
                "bindings:\n  - name: \"\"\n    cgroup: /x\n    role: r\n",
                "invalid",
            ),
        ];
        for (text, label) in cases {
            let error = Bindings::parse(text, "test", &policy()).unwrap_err();
            assert_eq!(error.metric_label(), label, "{text}: {error}");
        }
        let error = Bindings::parse(
            "bindings:\n  - name: svc\n    cgroup: /x\n    role: r\n",
            "f",
            &PolicyConfig::default(),
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("\"svc\"") && error.to_string().contains("--base-role-arn"),
            "{error}"
        );
    }
}
