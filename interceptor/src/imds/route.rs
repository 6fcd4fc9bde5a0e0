//! Which metadata request is this? Pure classification of method and path.
//!
//! Only a handful of paths are answered by interceptor itself; every other path is a
//! candidate for the upstream passthrough, which the allow-list decides. Paths that could
//! be read differently by us and by the upstream service (encoded characters, `.` or `..`
//! segments, empty segments) are never forwarded and never matched: they are refused.

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
        (_, true) => Route::Passthrough(path),
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
        // Not a version: never one of ours.
        assert_eq!(get("/2016-9-02/meta-data/iam/info").class(), "passthrough");
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
