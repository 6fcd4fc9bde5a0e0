use super::*;

const BASE: &str = "arn:aws:iam::123456789012:role/";

fn config() -> PolicyConfig {
    PolicyConfig {
        base_role_arn: Some(BaseArn::parse(BASE).unwrap()),
        ..PolicyConfig::default()
    }
}

fn restricted(format: RestrictionFormat) -> PolicyConfig {
    PolicyConfig {
        namespace_restrictions: true,
        restriction_format: format,
        ..config()
    }
}

fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn role(value: &str) -> BTreeMap<String, String> {
    annotations(&[(DEFAULT_ROLE_KEY, value)])
}

fn open_namespace(config: &PolicyConfig) -> NamespacePolicy {
    NamespacePolicy::from_annotations("team-a", &BTreeMap::new(), config)
}

fn arn_of(decision: Decision) -> String {
    match decision {
        Decision::Role { arn, .. } => arn.to_string(),
        other => panic!("expected a role, got {other:?}"),
    }
}

fn denial(decision: Decision) -> &'static str {
    match decision {
        Decision::Denied(error) => error.metric_label(),
        other => panic!("expected a denial, got {other:?}"),
    }
}

#[test]
fn names_and_arns_resolve_like_kube2iam() {
    let config = config();
    let ns = open_namespace(&config);
    let cases = [
        ("app", "arn:aws:iam::123456789012:role/app"),
        ("  app  ", "arn:aws:iam::123456789012:role/app"),
        ("team/app", "arn:aws:iam::123456789012:role/team/app"),
        (
            "arn:aws:iam::999999999999:role/other",
            "arn:aws:iam::999999999999:role/other",
        ),
        (
            "arn:aws-cn:iam::123456789012:role/cn",
            "arn:aws-cn:iam::123456789012:role/cn",
        ),
        (
            "arn:aws-us-gov:iam::123456789012:role/p/gov",
            "arn:aws-us-gov:iam::123456789012:role/p/gov",
        ),
        ("a+=,.@-_1", "arn:aws:iam::123456789012:role/a+=,.@-_1"),
    ];
    for (value, expected) in cases {
        assert_eq!(
            arn_of(decide(&role(value), &ns, &config)),
            expected,
            "{value}"
        );
    }
    let Decision::Role { arn, source, .. } = decide(&role("team/app"), &ns, &config) else {
        unreachable!()
    };
    assert_eq!((arn.name(), source), ("app", RoleSource::Annotation));
}

#[test]
fn bad_roles_are_denied_with_the_reason() {
    let config = config();
    let ns = open_namespace(&config);
    let cases = [
        ("arn:aws:iam::12345678901:role/x", "invalid_arn"),
        ("arn:aws:iam::1234567890123:role/x", "invalid_arn"),
        ("arn:aws:iam::123456789012:user/x", "invalid_arn"),
        ("arn:aws:iam::123456789012:role/", "invalid_arn"),
        ("arn:aws:s3:::bucket", "invalid_arn"),
        ("arn:aws:iam:us-east-1:123456789012:role/x", "invalid_arn"),
        (
            "arn:aws-iso:iam::123456789012:role/x",
            "partition_not_allowed",
        ),
        ("arn:", "invalid_arn"),
        ("rôle", "invalid_arn"),
        ("app name", "invalid_arn"),
        ("a//b", "invalid_arn"),
    ];
    for (value, label) in cases {
        assert_eq!(denial(decide(&role(value), &ns, &config)), label, "{value}");
    }
    let long = format!("{BASE}{}", "a".repeat(65));
    assert_eq!(denial(decide(&role(&long), &ns, &config)), "invalid_arn");
    assert_eq!(
        denial(decide(&role(&"x".repeat(5000)), &ns, &config)),
        "invalid_arn"
    );
    let no_base = PolicyConfig::default();
    assert_eq!(
        denial(decide(&role("app"), &open_namespace(&no_base), &no_base)),
        "no_base_arn"
    );
    let message = match decide(&role("app"), &open_namespace(&no_base), &no_base) {
        Decision::Denied(error) => error.to_string(),
        _ => unreachable!(),
    };
    assert!(message.contains("--base-role-arn"), "{message}");
}

#[test]
fn base_arn_forms() {
    for (base, expected) in [
        (
            "arn:aws:iam::123456789012:role/",
            "arn:aws:iam::123456789012:role/app",
        ),
        (
            "arn:aws:iam::123456789012:role",
            "arn:aws:iam::123456789012:role/app",
        ),
        (
            "arn:aws:iam::123456789012:role/team/",
            "arn:aws:iam::123456789012:role/team/app",
        ),
        (
            "arn:aws:iam::123456789012:role/team",
            "arn:aws:iam::123456789012:role/team/app",
        ),
    ] {
        let config = PolicyConfig {
            base_role_arn: Some(BaseArn::parse(base).unwrap()),
            ..PolicyConfig::default()
        };
        assert_eq!(
            arn_of(decide(&role("app"), &open_namespace(&config), &config)),
            expected,
            "{base}"
        );
    }
    for bad in [
        "",
        "arn:aws:iam::1:role/",
        "arn:aws:iam::123456789012:user/",
        "x",
    ] {
        assert!(BaseArn::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn default_role_and_no_role() {
    let config = config();
    let ns = open_namespace(&config);
    assert_eq!(decide(&BTreeMap::new(), &ns, &config), Decision::NoRole);
    assert_eq!(decide(&role("   "), &ns, &config), Decision::NoRole);
    let with_default = PolicyConfig {
        default_role: Some("fallback".into()),
        ..config
    };
    let Decision::Role { arn, source, .. } = decide(&BTreeMap::new(), &ns, &with_default) else {
        panic!("default role expected")
    };
    assert_eq!(
        (arn.to_string().as_str(), source),
        (
            "arn:aws:iam::123456789012:role/fallback",
            RoleSource::Default
        )
    );
}

#[test]
fn external_ids() {
    let config = config();
    let ns = open_namespace(&config);
    let with = |id: &str| annotations(&[(DEFAULT_ROLE_KEY, "app"), (DEFAULT_EXTERNAL_ID_KEY, id)]);
    match decide(&with("tenant-42:x/y"), &ns, &config) {
        Decision::Role { external_id, .. } => {
            assert_eq!(external_id.as_deref(), Some("tenant-42:x/y"))
        }
        other => panic!("{other:?}"),
    }
    for bad in ["x", "has space", &"a".repeat(1225), "ünïcode"] {
        assert_eq!(
            denial(decide(&with(bad), &ns, &config)),
            "invalid_external_id",
            "{bad}"
        );
    }
}

#[test]
fn glob_restrictions() {
    let config = restricted(RestrictionFormat::Glob);
    let ns = |allowed: &str| {
        NamespacePolicy::from_annotations(
            "team-a",
            &annotations(&[(DEFAULT_NAMESPACE_KEY, allowed)]),
            &config,
        )
    };
    let allowed = ns(r#"["team-*", "arn:aws:iam::999999999999:role/exact"]"#);
    assert_eq!(
        arn_of(decide(&role("team-app"), &allowed, &config)),
        "arn:aws:iam::123456789012:role/team-app"
    );
    assert!(matches!(
        decide(
            &role("arn:aws:iam::999999999999:role/exact"),
            &allowed,
            &config
        ),
        Decision::Role { .. }
    ));
    assert_eq!(
        denial(decide(&role("admin"), &allowed, &config)),
        "not_allowed"
    );
    assert_eq!(
        denial(decide(
            &role("arn:aws:iam::999999999999:role/exactly"),
            &allowed,
            &config
        )),
        "not_allowed"
    );
    // A glob written as a full ARN with wildcards.
    let any_account = ns(r#"["arn:aws:iam::*:role/reader"]"#);
    assert!(matches!(
        decide(
            &role("arn:aws:iam::111111111111:role/reader"),
            &any_account,
            &config
        ),
        Decision::Role { .. }
    ));
    // The default role is restricted too.
    let with_default = PolicyConfig {
        default_role: Some("admin".into()),
        ..config.clone()
    };
    assert_eq!(
        denial(decide(&BTreeMap::new(), &allowed, &with_default)),
        "not_allowed"
    );
}

#[test]
fn regexp_restrictions_are_anchored() {
    let config = restricted(RestrictionFormat::Regexp);
    let ns = NamespacePolicy::from_annotations(
        "team-a",
        &annotations(&[(DEFAULT_NAMESPACE_KEY, r#"["role-a", "team-[0-9]+"]"#)]),
        &config,
    );
    assert!(matches!(
        decide(&role("role-a"), &ns, &config),
        Decision::Role { .. }
    ));
    assert!(matches!(
        decide(&role("team-42"), &ns, &config),
        Decision::Role { .. }
    ));
    assert_eq!(
        denial(decide(&role("role-ab"), &ns, &config)),
        "not_allowed"
    );
    assert_eq!(
        denial(decide(&role("xrole-a"), &ns, &config)),
        "not_allowed"
    );
}

#[test]
fn kiam_permitted_annotation() {
    let config = restricted(RestrictionFormat::Glob);
    let ns = NamespacePolicy::from_annotations(
        "legacy",
        &annotations(&[(KIAM_PERMITTED_KEY, "app-.*")]),
        &config,
    );
    assert!(matches!(
        decide(&role("app-web"), &ns, &config),
        Decision::Role { .. }
    ));
    assert_eq!(
        denial(decide(&role("admin-app-web"), &ns, &config)),
        "not_allowed"
    );
    // kube2iam's annotation governs when both are present.
    let both = NamespacePolicy::from_annotations(
        "both",
        &annotations(&[
            (KIAM_PERMITTED_KEY, ".*"),
            (DEFAULT_NAMESPACE_KEY, r#"["only"]"#),
        ]),
        &config,
    );
    assert_eq!(
        denial(decide(&role("app-web"), &both, &config)),
        "not_allowed"
    );
}

#[test]
fn malformed_restrictions_deny_and_never_grant() {
    let config = restricted(RestrictionFormat::Regexp);
    let too_many = serde_json::to_string(&vec!["x"; MAX_RESTRICTIONS + 1]).unwrap();
    for value in [
        "not json",
        "{\"a\": 1}",
        "[1, 2]",
        "[\"(unclosed\"]",
        too_many.as_str(),
        "[\"a{1000}{1000}{1000}\"]",
    ] {
        let ns = NamespacePolicy::from_annotations(
            "team-a",
            &annotations(&[(DEFAULT_NAMESPACE_KEY, value)]),
            &config,
        );
        assert_eq!(
            denial(decide(&role("app"), &ns, &config)),
            "invalid_restrictions",
            "{value}"
        );
    }
    let bad_kiam =
        NamespacePolicy::from_annotations("k", &annotations(&[(KIAM_PERMITTED_KEY, "(")]), &config);
    assert_eq!(
        denial(decide(&role("app"), &bad_kiam, &config)),
        "invalid_restrictions"
    );
    let bare = NamespacePolicy::from_annotations("empty", &BTreeMap::new(), &config);
    assert_eq!(
        denial(decide(&role("app"), &bare, &config)),
        "no_allowed_roles"
    );
    // With restrictions off, the same namespace allows anything well formed.
    let open = self::config();
    let ns = NamespacePolicy::from_annotations(
        "team-a",
        &annotations(&[(DEFAULT_NAMESPACE_KEY, "not json")]),
        &open,
    );
    assert!(matches!(
        decide(&role("app"), &ns, &open),
        Decision::Role { .. }
    ));
}

#[test]
fn glob_matching() {
    assert!(glob_match("a*c", "abc"));
    assert!(glob_match("a*c", "ac"));
    assert!(glob_match("*", ""));
    assert!(glob_match("a*b*c", "a-b-b-c"));
    assert!(!glob_match("a*c", "abcd"));
    assert!(!glob_match("abc", "abcd"));
    assert!(!glob_match("a*bc*c", "abc"));
}

#[test]
fn glob_entries_with_arns_of_other_accounts() {
    let config = restricted(RestrictionFormat::Glob);
    let ns = NamespacePolicy::from_annotations(
        "team-a",
        &annotations(&[(
            DEFAULT_NAMESPACE_KEY,
            r#"["*", "arn:aws:iam::999999999999:role/*"]"#,
        )]),
        &config,
    );
    assert!(matches!(
        decide(&role("arn:aws:iam::999999999999:role/role-b"), &ns, &config),
        Decision::Role { .. }
    ));
    assert!(matches!(
        decide(&role("role-a"), &ns, &config),
        Decision::Role { .. }
    ));
}
