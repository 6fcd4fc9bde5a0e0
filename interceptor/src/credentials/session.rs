/// The STS session name for a pod: `<namespace>.<pod>`, or `<namespace>.<pod>@<container>`
/// for a container's own role (`container-roles`), so CloudTrail shows which pod (and
/// container) used a role. (`@` cannot occur in namespace, pod or container names, so a
/// container's session never reads like another pod's.) Characters STS does not accept (`[\w+=,.@-]` only) become `-`. A name that had
/// to be changed or cut to STS's 64 characters ends in a hash of the original, so two pods
/// never share a session name by sanitising or truncation. STS also wants at least two
/// characters: a shorter name (only from empty names) gets the hash suffix as well.
pub fn session_name(namespace: &str, pod: &str, container: Option<&str>) -> String {
    let full = match container {
        Some(container) => format!("{namespace}.{pod}@{container}"),
        None => format!("{namespace}.{pod}"),
    };
    sts_name(&full)
}

/// The SourceIdentity for a pod: `<namespace>.<pod>` under STS's rules for it (2 to 64 of
/// `[\w+=,.@-]`, hashed like session names when changed or cut). It stays with every
/// session chained from this one, so it is the pod, not the container.
pub fn source_identity(namespace: &str, pod: &str) -> String {
    session_name(namespace, pod, None)
}

/// `full` made an acceptable STS name (RoleSessionName and SourceIdentity share the
/// rules): see [`session_name`].
fn sts_name(full: &str) -> String {
    const MIN: usize = 2;
    const MAX: usize = 64;
    let clean: String = full
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    if clean == full && (MIN..=MAX).contains(&clean.len()) {
        return clean;
    }
    let hash = full.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let suffix = format!("-{:08x}", hash as u32);
    let keep = (MAX - suffix.len()).min(clean.len());
    format!("{}{suffix}", &clean[..keep])
}

/// Session tags for AssumeRole (all transitive: they follow role chaining, as EKS Pod
/// Identity's do). Values are cut to STS's 256 characters; keys are ours and short.
/// Shared: cloning a request does not copy its tags.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct SessionTags(std::sync::Arc<Vec<(String, String)>>);

impl SessionTags {
    /// STS's limit on a tag value.
    const MAX_VALUE: usize = 256;

    pub fn push(&mut self, key: &str, value: &str) {
        let value: String = value.chars().take(Self::MAX_VALUE).collect();
        std::sync::Arc::make_mut(&mut self.0).push((key.to_owned(), value));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str()))
    }
}
