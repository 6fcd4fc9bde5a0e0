//! Which metadata request is this? Pure classification of method and path.
//!
//! Only a handful of paths are answered by interceptor itself; every other path is a
//! candidate for the upstream passthrough, which the allow-list decides. Paths that could
//! be read differently by us and by the upstream service (encoded characters, `.` or `..`
//! segments, empty segments) are never forwarded and never matched: they are refused.
//!
//! Paths that bear credentials on real EC2 are never forwarded either, whatever the
//! allow-list says ([`Route::Denied`]): a broad `--allow-route-regexp` must not hand a pod
//! the node's identity. [`AllowList`] holds the allow-list itself, with a named preset for
//! what SDKs read so that nobody needs a regex for that.

use regex::Regex;

/// A classified request, borrowing from the path (classifying allocates nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    /// `PUT /latest/api/token`: mint an IMDSv2 token.
    Token,
    /// `GET /<version>/meta-data/iam/security-credentials/`: the role name.
    CredentialsList,
    /// `GET /<version>/meta-data/iam/security-credentials/<name>`.
    Credentials(&'a str),
    /// `GET /<version>/meta-data/iam/info`.
    Info,
    /// Any other well-formed GET path: forwarded only if the allow-list matches it.
    Passthrough(&'a str),
    /// A well-formed path that bears credentials upstream (see [`credential_bearing`]):
    /// 404, never forwarded, whatever the allow-list says.
    Denied,
    /// A path that is not well formed (see the module docs): 404, never forwarded.
    Malformed,
    /// A method EC2 does not accept here.
    MethodNotAllowed,
}

impl Route<'_> {
    /// Low-cardinality label for metrics.
    pub fn class(&self) -> &'static str {
        match self {
            Self::Token => "token",
            Self::CredentialsList => "credentials_list",
            Self::Credentials(_) => "credentials",
            Self::Info => "info",
            Self::Passthrough(_) => "passthrough",
            Self::Denied => "denied",
            Self::Malformed => "malformed",
            Self::MethodNotAllowed => "method_not_allowed",
        }
    }
}

/// The longest path considered; longer ones are malformed.
pub const MAX_PATH: usize = 1024;

/// `latest` or a dated API version such as `2016-09-02`.
fn is_version(segment: &str) -> bool {
    if segment == "latest" {
        return true;
    }
    let bytes = segment.as_bytes();
    bytes.len() == 10
        && bytes.iter().enumerate().all(|(i, b)| match i {
            4 | 7 => *b == b'-',
            _ => b.is_ascii_digit(),
        })
}

fn well_formed(path: &str) -> bool {
    if path.len() > MAX_PATH || !path.starts_with('/') {
        return false;
    }
    // Characters outside a conservative set: percent-encoding, backslashes, control
    // characters, query-like characters are never needed by SDKs.
    if !path
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/-_.+=,@:".contains(&b))
    {
        return false;
    }
    let inner = path.trim_end_matches('/');
    let inner = inner.strip_prefix('/').unwrap_or(inner);
    inner.is_empty()
        || inner
            .split('/')
            .all(|segment| !matches!(segment, "" | "." | ".."))
}

/// Segments looked at: every route answered here has at most 5, so a path with more
/// than this many is only ever matched by the `..` patterns (or passed through).
const SEGMENTS: usize = 8;

/// Classifies `method path` (path without the query string).
pub fn classify<'a>(method: &http::Method, path: &'a str) -> Route<'a> {
    if !well_formed(path) {
        return Route::Malformed;
    }
    // The first SEGMENTS segments, on the stack; more are counted as SEGMENTS (see above).
    let mut segments = [""; SEGMENTS];
    let mut count = 0;
    for segment in path.trim_start_matches('/').split('/').take(SEGMENTS) {
        segments[count] = segment;
        count += 1;
    }
    let is_get = *method == http::Method::GET || *method == http::Method::HEAD;
    match (&segments[..count], is_get) {
        (["latest", "api", "token"], _) if *method == http::Method::PUT => Route::Token,
        (["latest", "api", "token"], _) => Route::MethodNotAllowed,
        (_, false) => Route::MethodNotAllowed,
        ([version, "meta-data", "iam", "security-credentials"], true)
        | ([version, "meta-data", "iam", "security-credentials", ""], true)
            if is_version(version) =>
        {
            Route::CredentialsList
        }
        ([version, "meta-data", "iam", "security-credentials", name], true)
            if is_version(version) =>
        {
            Route::Credentials(name)
        }
        (
            [version, "meta-data", "iam", "info"] | [version, "meta-data", "iam", "info", ""],
            true,
        ) if is_version(version) => Route::Info,
        // Anything deeper under security-credentials (e.g. `<name>/x`) is not an EC2
        // path; refuse rather than forward something that names credentials.
        ([version, "meta-data", "iam", "security-credentials", ..], true)
            if is_version(version) =>
        {
            Route::Malformed
        }
        (_, true) if credential_bearing(path) => Route::Denied,
        (_, true) => Route::Passthrough(path),
    }
}

/// Segments that name credentials, or what proves the node's identity, on real EC2:
/// `meta-data/iam/...` (the node's role; the agent answers its own `iam` paths before
/// this is asked), `meta-data/identity-credentials/...` (the node's own credentials) and
/// the signed instance-identity forms `pkcs7`, `signature` and `rsa2048` (enough to log
/// in as the node to Vault's EC2 auth, for example).
const CREDENTIAL_SEGMENTS: [&str; 5] = [
    "iam",
    "identity-credentials",
    "pkcs7",
    "signature",
    "rsa2048",
];

/// Whether a passthrough candidate bears credentials upstream. Deliberately broader than
/// EC2's own paths: any segment (at any depth, under any version spelling, in any letter
/// case) equal to one of [`CREDENTIAL_SEGMENTS`] denies the path, so an upstream that
/// accepts another version spelling (`1.0`) or case cannot be reached around the rule.
/// The cost is that such a segment elsewhere (an instance tag named `iam`) is never
/// forwarded either; the decision is to refuse that rather than to enumerate EC2's tree.
fn credential_bearing(path: &str) -> bool {
    path.split('/').any(|segment| {
        CREDENTIAL_SEGMENTS
            .iter()
            .any(|denied| segment.eq_ignore_ascii_case(denied))
    })
}

/// A named set of paths that is safe to forward, for `--allow-route-preset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// What the AWS SDKs read besides credentials: `meta-data/placement/region`,
    /// `placement/availability-zone`, `placement/availability-zone-id` and
    /// `dynamic/instance-identity/document` (unsigned: region, account, instance id).
    Sdk,
}

/// `(area, tail)` of each path in [`Preset::Sdk`], under any version [`classify`] knows.
const SDK_PATHS: [(&str, &[&str]); 4] = [
    ("meta-data", &["placement", "region"]),
    ("meta-data", &["placement", "availability-zone"]),
    ("meta-data", &["placement", "availability-zone-id"]),
    ("dynamic", &["instance-identity", "document"]),
];

impl Preset {
    fn allows(self, path: &str) -> bool {
        match self {
            Self::Sdk => {
                let mut segments = path.trim_start_matches('/').split('/');
                let (Some(version), Some(area)) = (segments.next(), segments.next()) else {
                    return false;
                };
                let tail: Vec<&str> = segments.collect();
                is_version(version)
                    && SDK_PATHS
                        .iter()
                        .any(|(want_area, want_tail)| area == *want_area && tail == *want_tail)
            }
        }
    }
}

/// Which passthrough candidates are forwarded: those the preset or the regex match.
/// Empty (the default) forwards nothing. Only [`Route::Passthrough`] paths are ever asked,
/// so a credential-bearing path is refused before either is consulted.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    pub preset: Option<Preset>,
    pub regex: Option<Regex>,
}

impl AllowList {
    pub fn allows(&self, path: &str) -> bool {
        self.preset.is_some_and(|preset| preset.allows(path))
            || self
                .regex
                .as_ref()
                .is_some_and(|regex| regex.is_match(path))
    }
}

#[cfg(test)]
mod tests {
    use http::Method;

    use super::*;

    #[test]
    fn credential_paths_for_latest_and_dated_versions() {
        let get = |path| classify(&Method::GET, path);
        assert_eq!(
            get("/latest/meta-data/iam/security-credentials/"),
            Route::CredentialsList
        );
        assert_eq!(
            get("/latest/meta-data/iam/security-credentials"),
            Route::CredentialsList
        );
        assert_eq!(
            get("/2016-09-02/meta-data/iam/security-credentials/"),
            Route::CredentialsList
        );
        assert_eq!(
            get("/latest/meta-data/iam/security-credentials/role-a"),
            Route::Credentials("role-a")
        );
        assert_eq!(
            get("/2012-01-12/meta-data/iam/security-credentials/role-a"),
            Route::Credentials("role-a")
        );
        assert_eq!(get("/latest/meta-data/iam/info"), Route::Info);
        assert_eq!(
            classify(&Method::HEAD, "/latest/meta-data/iam/info"),
            Route::Info
        );
        assert_eq!(classify(&Method::PUT, "/latest/api/token"), Route::Token);
    }

    #[test]
    fn other_paths_are_passthrough_candidates() {
        let get = |path| classify(&Method::GET, path);
        assert_eq!(
            get("/latest/meta-data/placement/availability-zone"),
            Route::Passthrough("/latest/meta-data/placement/availability-zone")
        );
        assert_eq!(get("/"), Route::Passthrough("/"));
        let deep = "/latest/meta-data/a/b/c/d/e/f/g/h/i";
        assert_eq!(get(deep), Route::Passthrough(deep));
        assert_eq!(
            get("/latest/dynamic/instance-identity/document").class(),
            "passthrough"
        );
        // Not a version: never one of ours (and denied, as it names `iam`).
        assert_eq!(get("/2016-9-02/meta-data/iam/info").class(), "denied");
    }

    #[test]
    fn tricks_are_malformed_and_never_forwarded() {
        let get = |path| classify(&Method::GET, path);
        for path in [
            "/latest/meta-data/iam/security-credentials/../info",
            "/latest/meta-data/iam/security-credentials/%2e%2e",
            "/latest/meta-data/iam/security-credentials%2Frole",
            "/latest//meta-data/iam/security-credentials/",
            "/latest/./meta-data/iam/info",
            "/latest/meta-data/iam/security-credentials/role/extra",
            "/latest/meta-data/iam/security-credentials/role\\x",
            "latest/meta-data",
            "",
            "/latest/meta-data/iam/security-credentials/a b",
            // Deeper than the segments classify looks at.
            "/latest/meta-data/iam/security-credentials/role/a/b/c/d/e/f",
        ] {
            assert_eq!(get(path), Route::Malformed, "{path:?}");
        }
        assert_eq!(
            get(&format!("/latest/{}", "a".repeat(MAX_PATH))),
            Route::Malformed
        );
    }

    #[test]
    fn credential_bearing_paths_are_denied_in_every_spelling() {
        let get = |path| classify(&Method::GET, path);
        for path in [
            "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
            "/latest/meta-data/identity-credentials/ec2/info",
            "/latest/meta-data/identity-credentials/",
            "/latest/dynamic/instance-identity/pkcs7",
            "/latest/dynamic/instance-identity/signature",
            "/latest/dynamic/instance-identity/rsa2048",
            "/latest/dynamic/instance-identity/rsa2048/",
            "/2021-01-03/dynamic/instance-identity/pkcs7",
            // `iam/` beyond the three paths answered here.
            "/latest/meta-data/iam/",
            "/latest/meta-data/iam",
            "/latest/meta-data/iam/security-credentials-x",
            // Version spellings classify does not take as ours, which upstream may.
            "/1.0/meta-data/iam/security-credentials/node-role",
            "/2016-9-02/meta-data/iam/info",
            "/meta-data/iam/security-credentials/node-role",
            // Letter case.
            "/latest/meta-data/IAM/security-credentials/node-role",
            "/latest/meta-data/Identity-Credentials/ec2/info",
            "/latest/dynamic/instance-identity/PKCS7",
            // Deeper than the segments classify looks at.
            "/latest/a/b/c/d/e/f/g/h/iam/x",
        ] {
            assert_eq!(get(path), Route::Denied, "{path:?}");
        }
        // The agent's own iam answers stay its own.
        assert_eq!(get("/latest/meta-data/iam/info"), Route::Info);
    }

    #[test]
    fn a_regex_matching_everything_forwards_no_credentials() {
        let allow = AllowList {
            preset: None,
            regex: Some(Regex::new("^/.*").unwrap()),
        };
        let forwarded = |path| match classify(&Method::GET, path) {
            Route::Passthrough(path) => allow.allows(path),
            _ => false,
        };
        assert!(!forwarded(
            "/latest/meta-data/identity-credentials/ec2/info"
        ));
        assert!(!forwarded("/latest/dynamic/instance-identity/signature"));
        assert!(forwarded("/latest/meta-data/instance-type"));
    }

    #[test]
    fn the_sdk_preset_forwards_region_zone_and_document_only() {
        let allow = AllowList {
            preset: Some(Preset::Sdk),
            regex: None,
        };
        for path in [
            "/latest/meta-data/placement/region",
            "/latest/meta-data/placement/availability-zone",
            "/latest/meta-data/placement/availability-zone-id",
            "/latest/dynamic/instance-identity/document",
            "/2016-09-02/dynamic/instance-identity/document",
        ] {
            assert!(allow.allows(path), "{path:?}");
        }
        for path in [
            "/latest/meta-data/placement/",
            "/latest/meta-data/placement/region/x",
            "/latest/user-data",
            "/latest/dynamic/instance-identity/",
            "/latest/meta-data/instance-id",
            "/1.0/meta-data/placement/region",
        ] {
            assert!(!allow.allows(path), "{path:?}");
        }
        assert!(!AllowList::default().allows("/latest/meta-data/placement/region"));
    }

    #[test]
    fn methods_as_ec2_accepts_them() {
        assert_eq!(
            classify(&Method::GET, "/latest/api/token"),
            Route::MethodNotAllowed
        );
        assert_eq!(
            classify(&Method::POST, "/latest/meta-data/iam/info"),
            Route::MethodNotAllowed
        );
        assert_eq!(
            classify(&Method::DELETE, "/latest/api/token"),
            Route::MethodNotAllowed
        );
        assert_eq!(
            classify(&Method::PUT, "/latest/meta-data/"),
            Route::MethodNotAllowed
        );
    }
}
