//! Properties of the parsers that take pod-controlled input, checked on arbitrary bytes.
//!
//! Shared by the `cargo fuzz` targets (`fuzz_targets/*.rs`) and by
//! `interceptor/tests/fuzz_corpus.rs`, which replays the committed corpus and regressions
//! in the normal test suite. Each check panics when a property fails; "no panic" alone is
//! never the whole property.

#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use http::Method;
use interceptor::{
    bindings::Bindings,
    identity::{PodUid, parse_cgroup_path},
    imds::{
        route::{Route, classify},
        token::{TokenMinter, parse_ttl},
    },
    policy::{
        BaseArn, Decision, NamespacePolicy, PolicyConfig, RestrictionFormat, decide,
        parse_role_arn, resolve_role,
    },
};

const BASE: &str = "arn:aws:iam::123456789012:role/";
const KIAM_PERMITTED: &str = "iam.amazonaws.com/permitted";

fn is_version(segment: &str) -> bool {
    segment == "latest"
        || (segment.len() == 10
            && segment.bytes().enumerate().all(|(i, b)| match i {
                4 | 7 => b == b'-',
                _ => b.is_ascii_digit(),
            }))
}

/// The request router. First byte: the method; the rest: the path.
///
/// - Only `PUT /latest/api/token` mints tokens.
/// - A credentials route names exactly one plain segment, under a version, reached by
///   GET or HEAD.
/// - A passthrough path is forwarded exactly as received and could not be read differently
///   upstream: no percent-encoding, backslashes, `.`/`..` or empty segments; and it never
///   names credentials under a version.
pub fn imds_route(data: &[u8]) {
    let Some((&method, path)) = data.split_first() else {
        return;
    };
    let method = match method % 5 {
        0 => Method::GET,
        1 => Method::HEAD,
        2 => Method::PUT,
        3 => Method::POST,
        _ => Method::DELETE,
    };
    let Ok(path) = std::str::from_utf8(path) else {
        return;
    };
    let get = method == Method::GET || method == Method::HEAD;
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match classify(&method, path) {
        Route::Token => assert!(method == Method::PUT && path == "/latest/api/token"),
        Route::Credentials(name) => {
            assert!(get, "{method} {path:?} routed to credentials");
            assert!(
                !name.is_empty() && !name.contains('/') && name != "." && name != "..",
                "{path:?} names credentials {name:?}"
            );
            assert_eq!(
                segments.get(..4).map(|s| s[1..].to_vec()),
                Some(vec!["meta-data", "iam", "security-credentials"]),
                "{path:?}"
            );
            assert!(is_version(segments[0]), "{path:?}");
            assert_eq!(segments.get(4), Some(&name), "{path:?}");
        }
        Route::CredentialsList | Route::Info => {
            assert!(get, "{method} {path:?}");
            assert!(is_version(segments[0]), "{path:?}");
        }
        Route::Passthrough(forwarded) => {
            assert!(get, "{method} {path:?} passed through");
            assert_eq!(forwarded, path, "forwarded as received");
            assert!(
                !path.contains(['%', '\\', '?', '#'])
                    && !path.bytes().any(|b| b.is_ascii_control()),
                "{path:?} could be decoded differently upstream"
            );
            let inner = path.trim_end_matches('/').trim_start_matches('/');
            assert!(
                inner.is_empty() || inner.split('/').all(|s| !matches!(s, "" | "." | "..")),
                "{path:?} has empty or dot segments"
            );
            assert!(
                !(is_version(segments[0])
                    && segments.get(1..4)
                        == Some(&["meta-data", "iam", "security-credentials"][..])),
                "{path:?} names credentials but would be passed through"
            );
            assert!(
                !segments.iter().any(|s| [
                    "iam",
                    "identity-credentials",
                    "pkcs7",
                    "signature",
                    "rsa2048"
                ]
                .iter()
                .any(|denied| s.eq_ignore_ascii_case(denied))),
                "{path:?} bears credentials upstream but would be passed through"
            );
        }
        Route::Malformed | Route::MethodNotAllowed | Route::Denied => {}
    }
}

/// IMDSv2 tokens and their TTL header.
///
/// - A TTL is accepted only within EC2's 1..=21600 seconds.
/// - No string is accepted as a token by a minter that did not mint it, and a minted
///   token changed at any one position (by the input) is refused; a token is refused for
///   another caller.
pub fn imds_token(data: &[u8]) {
    if let Some(ttl) = parse_ttl(Some(data)) {
        assert!((1..=21_600).contains(&ttl.as_secs()), "{data:?} -> {ttl:?}");
    }
    let minter = TokenMinter::new();
    let now = SystemTime::now();
    if let Ok(text) = std::str::from_utf8(data) {
        assert!(
            minter.verify(text, "pod-a", now).is_err(),
            "{text:?} accepted by a minter that never issued it"
        );
    }
    let token = minter.mint("pod-a", Duration::from_secs(60), now);
    assert!(minter.verify(&token, "pod-a", now).is_ok());
    assert!(minter.verify(&token, "pod-b", now).is_err());
    if let [at, byte, ..] = *data {
        let mut changed = token.clone().into_bytes();
        let at = usize::from(at) % changed.len();
        changed[at] = byte;
        if let Ok(changed) = String::from_utf8(changed)
            && changed.trim() != token
        {
            assert!(
                minter.verify(&changed, "pod-a", now).is_err(),
                "a token changed at {at} is still accepted: {changed:?}"
            );
        }
    }
}

fn config(format: RestrictionFormat) -> PolicyConfig {
    PolicyConfig {
        base_role_arn: Some(BaseArn::parse(BASE).expect("base ARN")),
        namespace_restrictions: true,
        restriction_format: format,
        ..PolicyConfig::default()
    }
}

/// Role annotations, ARNs and namespace restrictions. Input: NUL-separated fields
/// `role`, `restriction`, `flags`, `external id` (flags: `r` regexp format, `k` kiam's
/// annotation, `n` no restriction annotation, `e` an external id).
///
/// - A parsed ARN re-renders to text that parses to the same ARN, with a 12-digit account
///   and a name without `/`; a resolved role is such an ARN.
/// - A role is granted only by a well-formed restriction: never without one, never by a
///   malformed or empty allow-list; with a glob list without wildcards, only a role the
///   list names.
pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut fields = text.split('\0');
    let role = fields.next().unwrap_or_default();
    let restriction = fields.next().unwrap_or_default();
    let flags = fields.next().unwrap_or_default();
    let external = fields.next().unwrap_or_default();

    if let Ok(arn) = parse_role_arn(role) {
        let again = parse_role_arn(&arn.to_string()).expect("a parsed ARN re-parses");
        assert_eq!(again, arn);
        assert!(arn.account().len() == 12 && arn.account().bytes().all(|b| b.is_ascii_digit()));
        assert!(!arn.name().is_empty() && !arn.name().contains('/'));
    }
    let format = if flags.contains('r') {
        RestrictionFormat::Regexp
    } else {
        RestrictionFormat::Glob
    };
    let config = config(format);
    if let Ok(arn) = resolve_role(role, &config) {
        assert_eq!(parse_role_arn(&arn.to_string()).as_ref(), Ok(&arn));
    }

    let kiam = flags.contains('k');
    let mut namespace = BTreeMap::new();
    if !flags.contains('n') {
        let key = if kiam {
            KIAM_PERMITTED.to_owned()
        } else {
            config.namespace_key.clone()
        };
        namespace.insert(key, restriction.to_owned());
    }
    let policy = NamespacePolicy::from_annotations("team", &namespace, &config);
    let mut pod = BTreeMap::from([(config.iam_role_key.clone(), role.to_owned())]);
    if flags.contains('e') {
        pod.insert(config.iam_external_id_key.clone(), external.to_owned());
    }
    let Decision::Role { arn, .. } = decide(&pod, &policy, &config) else {
        return;
    };
    assert!(
        !flags.contains('n'),
        "granted {arn} without a restriction annotation"
    );
    if kiam {
        return;
    }
    let entries: Vec<String> = serde_json::from_str(restriction)
        .unwrap_or_else(|_| panic!("granted {arn} by a malformed allow-list {restriction:?}"));
    assert!(!entries.is_empty(), "granted {arn} by an empty allow-list");
    if format == RestrictionFormat::Glob && entries.iter().all(|entry| !entry.contains('*')) {
        let full = arn.to_string();
        assert!(
            entries.iter().any(|entry| {
                let entry = entry.trim();
                entry == full || format!("{BASE}{entry}") == full
            }),
            "granted {full}, which {entries:?} does not name"
        );
    }
}

/// cgroup paths and pod UIDs: a path that names a pod names a valid UID that appears in
/// the path (as written, or with `_` for `-` as systemd writes it); a parsed UID
/// re-parses to itself.
pub fn cgroup_path(data: &[u8]) {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(identity) = parse_cgroup_path(path) {
        let uid = identity.pod_uid.as_str();
        assert_eq!(
            PodUid::parse(uid).expect("a parsed UID re-parses").as_str(),
            uid
        );
        assert!(
            path.contains(uid) || path.contains(&uid.replace('-', "_")),
            "{path:?} -> pod {uid}, which it does not name"
        );
    }
    if let Ok(uid) = PodUid::parse(path) {
        assert_eq!(
            PodUid::parse(uid.as_str()).map(|u| u.as_str().to_owned()),
            Ok(uid.as_str().to_owned())
        );
    }
}

/// The standalone bindings file: whatever parses binds only well-formed ARNs, and looking
/// a cgroup path up never panics.
pub fn bindings(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(bindings) = Bindings::parse(text, "fuzz", &config(RestrictionFormat::Glob)) else {
        return;
    };
    let probes = text
        .lines()
        .filter_map(|line| line.split_once("cgroup:").map(|(_, path)| path.trim()))
        .chain(["/", "", "/system.slice/a.service", "//"]);
    for probe in probes {
        if let Some(binding) = bindings.matching(probe) {
            assert_eq!(
                parse_role_arn(&binding.role.to_string()).as_ref(),
                Ok(&binding.role)
            );
        }
    }
}
