use super::*;

const BASE: &str = "arn:aws:iam::123456789012:role/";
const OTHER: &str = "arn:aws:iam::999999999999:role/";

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

fn namespace(pairs: &[(&str, &str)], config: &PolicyConfig) -> NamespacePolicy {
    NamespacePolicy::from_annotations("team-a", &annotations(pairs), config)
}

/// What a decision comes to, for table comparisons: the ARN, "no role" or the denial's
/// metric label.
fn outcome(decision: Decision) -> String {
    match decision {
        Decision::Role { arn, .. } => arn.to_string(),
        Decision::NoRole => "no role".into(),
        Decision::Denied(reason) => format!("denied: {}", reason.metric_label()),
    }
}

fn decide_role(value: &str, ns: &NamespacePolicy, config: &PolicyConfig) -> String {
    outcome(decide(&role(value), ns, config))
}

#[test]
fn names_and_arns_resolve_like_kube2iam() {
    let config = config();
    let ns = namespace(&[], &config);
    let name64 = "n".repeat(64);
    let cases = [
        ("app", format!("{BASE}app")),
        ("  app\t", format!("{BASE}app")),
        ("team/app", format!("{BASE}team/app")),
        ("/team/app", format!("{BASE}team/app")),
        ("a+=,.@-_1", format!("{BASE}a+=,.@-_1")),
        (name64.as_str(), format!("{BASE}{name64}")),
        (
            "arn:aws:iam::999999999999:role/other",
            format!("{OTHER}other"),
        ),
        (
            " arn:aws:iam::999999999999:role/p/q/other ",
            format!("{OTHER}p/q/other"),
        ),
        (
            "arn:aws-cn:iam::123456789012:role/cn",
            "arn:aws-cn:iam::123456789012:role/cn".into(),
        ),
        (
            "arn:aws-us-gov:iam::123456789012:role/p/gov",
            "arn:aws-us-gov:iam::123456789012:role/p/gov".into(),
        ),
    ];
    for (value, expected) in cases {
        assert_eq!(decide_role(value, &ns, &config), expected, "{value:?}");
    }
    let Decision::Role {
        arn,
        source,
        external_id,
        ..
    } = decide(&role("team/app"), &ns, &config)
    else {
        panic!("team/app must resolve")
    };
    assert_eq!(
        (
            arn.name(),
            arn.path_and_name(),
            arn.account(),
            arn.partition()
        ),
        ("app", "team/app", "123456789012", "aws")
    );
    assert_eq!((source, external_id), (RoleSource::Annotation, None));
}

#[test]
fn bad_roles_are_denied_with_the_reason() {
    let config = config();
    let ns = namespace(&[], &config);
    let long_name = format!("{BASE}{}", "a".repeat(65));
    let long_path = format!("{BASE}{}/x", "p".repeat(511));
    let huge = "x".repeat(5000);
    let cases: [(&str, &str); 20] = [
        ("arn:aws:iam::12345678901:role/x", "invalid_arn"),
        ("arn:aws:iam::1234567890123:role/x", "invalid_arn"),
        ("arn:aws:iam::12345678901a:role/x", "invalid_arn"),
        ("arn:aws:iam::123456789012:user/x", "invalid_arn"),
        ("arn:aws:iam::123456789012:x", "invalid_arn"),
        ("arn:aws:iam::123456789012:role/", "invalid_arn"),
        ("arn:aws:iam::123456789012:role/a/", "invalid_arn"),
        ("arn:aws:s3:::bucket", "invalid_arn"),
        ("arn:aws:iam:us-east-1:123456789012:role/x", "invalid_arn"),
        ("arn:AWS:iam::123456789012:role/x", "invalid_arn"),
        (
            "arn:aws-iso:iam::123456789012:role/x",
            "partition_not_allowed",
        ),
        (
            "arn:aws-iso-b:iam::123456789012:role/x",
            "partition_not_allowed",
        ),
        ("arn:", "invalid_arn"),
        ("rôle", "invalid_arn"),
        ("app name", "invalid_arn"),
        ("a//b", "invalid_arn"),
        ("app\u{200b}", "invalid_arn"),
        (&long_name, "invalid_arn"),
        (&long_path, "invalid_arn"),
        (&huge, "invalid_arn"),
    ];
    for (value, label) in cases {
        let got = decide_role(value, &ns, &config);
        assert_eq!(got, format!("denied: {label}"), "{value:?}");
    }
    let no_base = PolicyConfig::default();
    let Decision::Denied(reason) = decide(&role("app"), &namespace(&[], &no_base), &no_base) else {
        panic!("a name without a base ARN must be refused")
    };
    assert_eq!(reason.metric_label(), "no_base_arn");
    assert!(reason.to_string().contains("--base-role-arn"), "{reason}");
    assert_eq!(reason.event_reason(), "InvalidRoleAnnotation");
    // The evidence is kept, but bounded.
    let Err(error) = resolve_role(&huge, &config) else {
        panic!("too long")
    };
    assert!(error.to_string().contains("xxxx") && error.to_string().len() < 400);
    let Err(error) = resolve_role("arn:aws-iso:iam::123456789012:role/x", &config) else {
        panic!("partition")
    };
    assert!(
        error.to_string().contains("aws, aws-cn, aws-us-gov"),
        "{error}"
    );
}

#[test]
fn partitions_can_be_narrowed() {
    let config = PolicyConfig {
        allowed_partitions: vec!["aws-cn".into()],
        ..config()
    };
    let ns = namespace(&[], &config);
    let cases = [
        (
            "arn:aws-cn:iam::123456789012:role/x",
            "arn:aws-cn:iam::123456789012:role/x",
        ),
        (
            "arn:aws:iam::123456789012:role/x",
            "denied: partition_not_allowed",
        ),
        ("x", "denied: partition_not_allowed"),
    ];
    for (value, expected) in cases {
        assert_eq!(decide_role(value, &ns, &config), expected, "{value}");
    }
}

#[test]
fn base_arn_forms() {
    let cases = [
        ("arn:aws:iam::123456789012:role/", format!("{BASE}app")),
        ("arn:aws:iam::123456789012:role", format!("{BASE}app")),
        (
            " arn:aws:iam::123456789012:role/team/ ",
            format!("{BASE}team/app"),
        ),
        (
            "arn:aws:iam::123456789012:role/team",
            format!("{BASE}team/app"),
        ),
        (
            "arn:aws:iam::123456789012:role/org/team/",
            format!("{BASE}org/team/app"),
        ),
    ];
    for (base, expected) in cases {
        let config = PolicyConfig {
            base_role_arn: Some(BaseArn::parse(base).unwrap()),
            ..PolicyConfig::default()
        };
        assert_eq!(
            decide_role("app", &namespace(&[], &config), &config),
            expected,
            "{base}"
        );
    }
    let bad = [
        "",
        "x",
        "arn:aws:iam::1:role/",
        "arn:aws:iam::123456789012:user/",
        "arn:aws:iam::123456789012:role/te am/",
        "arn:aws:iam::123456789012:role//",
    ];
    for base in bad {
        let error = BaseArn::parse(base).map(|_| ()).unwrap_err();
        assert_eq!(error.metric_label(), "invalid_arn", "{base:?}");
    }
}

#[test]
fn default_role_and_no_role() {
    let plain = config();
    let with_default = PolicyConfig {
        default_role: Some("fallback".into()),
        ..config()
    };
    let ns = namespace(&[], &plain);
    let cases = [
        (&plain, BTreeMap::new(), "no role".to_owned(), None),
        (&plain, role("   "), "no role".to_owned(), None),
        (
            &with_default,
            BTreeMap::new(),
            format!("{BASE}fallback"),
            Some(RoleSource::Default),
        ),
        // Present but empty: an explicit opt-out, the default does not apply.
        (&with_default, role(""), "no role".to_owned(), None),
        (
            &with_default,
            role("app"),
            format!("{BASE}app"),
            Some(RoleSource::Annotation),
        ),
        // Another key's annotation does not count.
        (
            &with_default,
            annotations(&[("other/role", "app")]),
            format!("{BASE}fallback"),
            Some(RoleSource::Default),
        ),
    ];
    for (config, pod, expected, source) in cases {
        let decision = decide(&pod, &ns, config);
        let got_source = match &decision {
            Decision::Role { source, .. } => Some(*source),
            _ => None,
        };
        assert_eq!(
            (outcome(decision), got_source),
            (expected, source),
            "{pod:?}"
        );
    }
}

#[test]
fn custom_annotation_keys() {
    let config = PolicyConfig {
        iam_role_key: "example.com/role".into(),
        iam_external_id_key: "example.com/xid".into(),
        ..config()
    };
    let pod = annotations(&[
        ("example.com/role", "app"),
        ("example.com/xid", "tenant-1"),
        (DEFAULT_ROLE_KEY, "ignored"),
    ]);
    let Decision::Role {
        arn, external_id, ..
    } = decide(&pod, &namespace(&[], &config), &config)
    else {
        panic!("custom keys")
    };
    assert_eq!(
        (arn.name(), external_id.as_deref()),
        ("app", Some("tenant-1"))
    );
}

#[test]
fn external_ids() {
    let config = config();
    let ns = namespace(&[], &config);
    let with = |id: &str| annotations(&[(DEFAULT_ROLE_KEY, "app"), (DEFAULT_EXTERNAL_ID_KEY, id)]);
    let max = "a".repeat(1224);
    let good = [
        ("tenant-42:x/y", Some("tenant-42:x/y")),
        (" ab ", Some("ab")),
        ("a_+=,.@:/-9", Some("a_+=,.@:/-9")),
        (max.as_str(), Some(max.as_str())),
        ("", None),
        ("  ", None),
    ];
    for (id, expected) in good {
        match decide(&with(id), &ns, &config) {
            Decision::Role { external_id, .. } => {
                assert_eq!(external_id.as_deref(), expected, "{id:?}")
            }
            other => panic!("{id:?}: {other:?}"),
        }
    }
    for bad in [
        "x",
        "has space",
        &"a".repeat(1225),
        "ünïcode",
        "a;b",
        "a\nb",
    ] {
        let Decision::Denied(reason) = decide(&with(bad), &ns, &config) else {
            panic!("{bad:?} must be refused")
        };
        let PolicyError::InvalidExternalId { value, .. } = reason else {
            panic!("{bad:?}: {reason}")
        };
        let kept: String = bad.chars().take(200).collect();
        assert_eq!(value, kept);
    }
}

#[test]
fn glob_restrictions() {
    let config = restricted(RestrictionFormat::Glob);
    let allowed = namespace(
        &[(
            DEFAULT_NAMESPACE_KEY,
            r#"["team-*", "arn:aws:iam::999999999999:role/exact", "svc/*/reader"]"#,
        )],
        &config,
    );
    let any_account = namespace(
        &[(DEFAULT_NAMESPACE_KEY, r#"["arn:aws:iam::*:role/reader"]"#)],
        &config,
    );
    let star = namespace(&[(DEFAULT_NAMESPACE_KEY, r#"["*"]"#)], &config);
    let team_b = format!("{BASE}team-b");
    let cases = [
        (&allowed, "team-app", format!("{BASE}team-app")),
        (&allowed, "team-", format!("{BASE}team-")),
        (&allowed, team_b.as_str(), team_b.clone()),
        (
            &allowed,
            "arn:aws:iam::999999999999:role/exact",
            format!("{OTHER}exact"),
        ),
        (&allowed, "svc/a/b/reader", format!("{BASE}svc/a/b/reader")),
        (&allowed, "admin", "denied: not_allowed".into()),
        (&allowed, "xteam-app", "denied: not_allowed".into()),
        (
            &allowed,
            "arn:aws:iam::999999999999:role/team-app",
            "denied: not_allowed".into(),
        ),
        (
            &allowed,
            "arn:aws:iam::999999999999:role/exactly",
            "denied: not_allowed".into(),
        ),
        (
            &any_account,
            "arn:aws:iam::111111111111:role/reader",
            "arn:aws:iam::111111111111:role/reader".into(),
        ),
        (
            &any_account,
            "arn:aws:iam::111111111111:role/writer",
            "denied: not_allowed".into(),
        ),
        // "*" is resolved against the base ARN: any role of the base account only.
        (&star, "anything/at/all", format!("{BASE}anything/at/all")),
        (
            &star,
            "arn:aws:iam::999999999999:role/x",
            "denied: not_allowed".into(),
        ),
    ];
    for (ns, value, expected) in cases {
        assert_eq!(decide_role(value, ns, &config), expected, "{value}");
    }
    // The default role is restricted too.
    let with_default = PolicyConfig {
        default_role: Some("admin".into()),
        ..config.clone()
    };
    let decision = decide(&BTreeMap::new(), &allowed, &with_default);
    assert_eq!(outcome(decision.clone()), "denied: not_allowed");
    let Decision::Denied(reason) = decision else {
        unreachable!()
    };
    assert_eq!(reason.event_reason(), "RoleNotAllowed");
    assert!(
        reason.to_string().contains(DEFAULT_NAMESPACE_KEY),
        "{reason}"
    );
}

#[test]
fn regexp_restrictions_are_anchored() {
    let config = restricted(RestrictionFormat::Regexp);
    let ns = namespace(
        &[(
            DEFAULT_NAMESPACE_KEY,
            r#"["role-a", "team-[0-9]+", "arn:aws:iam::\\d{12}:role/ro-.*"]"#,
        )],
        &config,
    );
    let cases = [
        ("role-a", format!("{BASE}role-a")),
        ("team-42", format!("{BASE}team-42")),
        (
            "arn:aws:iam::999999999999:role/ro-x",
            format!("{OTHER}ro-x"),
        ),
        ("role-ab", "denied: not_allowed".into()),
        ("xrole-a", "denied: not_allowed".into()),
        ("team-4x", "denied: not_allowed".into()),
        (
            "arn:aws:iam::999999999999:role/role-a",
            "denied: not_allowed".into(),
        ),
    ];
    for (value, expected) in cases {
        assert_eq!(decide_role(value, &ns, &config), expected, "{value}");
    }
    // The base ARN is literal: a `.` in its path is not a wildcard.
    let dotted = PolicyConfig {
        base_role_arn: Some(BaseArn::parse("arn:aws:iam::123456789012:role/team.a/").unwrap()),
        ..config
    };
    let ns = namespace(&[(DEFAULT_NAMESPACE_KEY, r#"["x"]"#)], &dotted);
    assert_eq!(decide_role("x", &ns, &dotted), format!("{BASE}team.a/x"));
    assert_eq!(
        decide_role(&format!("{BASE}teamXa/x"), &ns, &dotted),
        "denied: not_allowed"
    );
}

#[test]
fn kiam_permitted_annotation() {
    let config = restricted(RestrictionFormat::Glob);
    let kiam = |expression: &str| namespace(&[(KIAM_PERMITTED_KEY, expression)], &config);
    let both = namespace(
        &[
            (KIAM_PERMITTED_KEY, ".*"),
            (DEFAULT_NAMESPACE_KEY, r#"["only"]"#),
        ],
        &config,
    );
    let cases = [
        // matched against the role as written
        (
            kiam("app-.*"),
            "app-web".to_owned(),
            format!("{BASE}app-web"),
        ),
        (
            kiam("app-.*"),
            "admin-app-web".into(),
            "denied: not_allowed".into(),
        ),
        (kiam("app"), "app2".into(), "denied: not_allowed".into()),
        // ... or its full ARN
        (
            kiam(&format!("{OTHER}x")),
            format!("{OTHER}x"),
            format!("{OTHER}x"),
        ),
        (
            kiam(&format!("{BASE}app")),
            "app".into(),
            format!("{BASE}app"),
        ),
        // ... or its name under the base ARN, never another account's same name
        (kiam("app"), format!("{BASE}app"), format!("{BASE}app")),
        (
            kiam("app"),
            format!("{OTHER}app"),
            "denied: not_allowed".into(),
        ),
        // real-world values: everything, nothing
        (kiam(" .* "), format!("{OTHER}x"), format!("{OTHER}x")),
        (kiam(""), "app".into(), "denied: not_allowed".into()),
        (kiam("^$"), "app".into(), "denied: not_allowed".into()),
        // kube2iam's annotation governs when both are present
        (both, "app-web".into(), "denied: not_allowed".into()),
    ];
    for (ns, value, expected) in cases {
        assert_eq!(decide_role(&value, &ns, &config), expected, "{value}");
    }
    let Decision::Denied(reason) = decide(&role("nope"), &kiam("app"), &config) else {
        panic!("refused")
    };
    assert!(reason.to_string().contains(KIAM_PERMITTED_KEY), "{reason}");
}

#[test]
fn malformed_restrictions_deny_and_never_grant() {
    let config = restricted(RestrictionFormat::Regexp);
    let too_many = serde_json::to_string(&vec!["x"; MAX_RESTRICTIONS + 1]).unwrap();
    let cases = [
        "not json",
        "",
        "{\"a\": 1}",
        "\"app\"",
        "[1, 2]",
        "[\"app\", null]",
        "[\"(unclosed\"]",
        too_many.as_str(),
        "[\"a{1000}{1000}{1000}\"]",
    ];
    for value in cases {
        let ns = namespace(&[(DEFAULT_NAMESPACE_KEY, value)], &config);
        let Decision::Denied(reason) = decide(&role("app"), &ns, &config) else {
            panic!("{value:?} must refuse")
        };
        assert_eq!(reason.metric_label(), "invalid_restrictions", "{value:?}");
        assert_eq!(reason.event_reason(), "InvalidNamespaceRestrictions");
        assert!(reason.to_string().contains("team-a"), "{reason}");
    }
    let limit = serde_json::to_string(&vec!["app"; MAX_RESTRICTIONS]).unwrap();
    let ns = namespace(&[(DEFAULT_NAMESPACE_KEY, &limit)], &config);
    assert_eq!(decide_role("app", &ns, &config), format!("{BASE}app"));
    let cases = [
        (
            namespace(&[(KIAM_PERMITTED_KEY, "(")], &config),
            "invalid_restrictions",
        ),
        (namespace(&[], &config), "no_allowed_roles"),
        (
            namespace(&[(DEFAULT_NAMESPACE_KEY, "[]")], &config),
            "not_allowed",
        ),
    ];
    for (ns, label) in cases {
        assert_eq!(decide_role("app", &ns, &config), format!("denied: {label}"));
    }
    // A name entry without a base ARN could never match: reported, not ignored.
    let no_base = PolicyConfig {
        base_role_arn: None,
        ..config.clone()
    };
    let ns = namespace(&[(DEFAULT_NAMESPACE_KEY, r#"["app"]"#)], &no_base);
    assert_eq!(
        decide_role(&format!("{BASE}app"), &ns, &no_base),
        "denied: invalid_restrictions"
    );
}

#[test]
fn restrictions_off_allow_any_well_formed_role() {
    let open = config();
    for pairs in [
        vec![],
        vec![(DEFAULT_NAMESPACE_KEY, "not json")],
        vec![(DEFAULT_NAMESPACE_KEY, "[]"), (KIAM_PERMITTED_KEY, "(")],
    ] {
        let ns = namespace(&pairs, &open);
        assert_eq!(
            decide_role("app", &ns, &open),
            format!("{BASE}app"),
            "{pairs:?}"
        );
        assert_eq!(
            decide_role("a b", &ns, &open),
            "denied: invalid_arn",
            "{pairs:?}"
        );
    }
}

#[test]
fn glob_matching() {
    let cases = [
        ("a*c", "abc", true),
        ("a*c", "ac", true),
        ("*", "", true),
        ("**", "x", true),
        ("a*b*c", "a-b-b-c", true),
        ("*ab*b", "abb", true),
        ("a*b*b", "abb", true),
        ("", "", true),
        ("a*c", "abcd", false),
        ("abc", "abcd", false),
        ("a*bc*c", "abc", false),
        ("a*a", "a", false),
        ("", "a", false),
        ("é*ü", "éxü", true),
    ];
    for (pattern, text, expected) in cases {
        assert_eq!(glob_match(pattern, text), expected, "{pattern:?} {text:?}");
    }
}

/// Annotations as written in a table.
type Pairs<'a> = &'a [(&'a str, &'a str)];

/// One caller's outcome under `decide_for`: pod annotations, ServiceAccount annotations,
/// container names and the calling container.
fn decide_subject(
    pod: &[(&str, &str)],
    service_account: Option<&[(&str, &str)]>,
    caller: Caller<'_>,
    config: &PolicyConfig,
) -> String {
    let containers = [
        "app".to_owned(),
        "istio-proxy".to_owned(),
        "init".to_owned(),
    ];
    let pod = annotations(pod);
    let service_account = service_account.map(annotations);
    let subject = Subject {
        pod: &pod,
        service_account: service_account.as_ref(),
        service_account_pending: false,
        containers: &containers,
        caller,
    };
    let ns = namespace(&[], config);
    outcome(decide_for(&subject, &ns, config))
}

#[test]
fn role_precedence_pod_then_service_account_then_default() {
    let plain = config();
    let irsa = PolicyConfig {
        irsa_annotations: true,
        default_role: Some("fallback".into()),
        ..config()
    };
    let with_default = PolicyConfig {
        default_role: Some("fallback".into()),
        ..config()
    };
    let sa_role: &[(&str, &str)] = &[(DEFAULT_ROLE_KEY, "from-sa")];
    let sa_irsa: &[(&str, &str)] = &[(IRSA_ROLE_KEY, "arn:aws:iam::123456789012:role/irsa")];
    let sa_both: &[(&str, &str)] = &[
        (DEFAULT_ROLE_KEY, "from-sa"),
        (IRSA_ROLE_KEY, "arn:aws:iam::123456789012:role/irsa"),
    ];
    let sa_empty: &[(&str, &str)] = &[(DEFAULT_ROLE_KEY, "")];
    let cases: [(Pairs<'_>, Option<Pairs<'_>>, &PolicyConfig, String); 10] = [
        (
            &[(DEFAULT_ROLE_KEY, "pod")],
            Some(sa_role),
            &plain,
            format!("{BASE}pod"),
        ),
        (&[], Some(sa_role), &plain, format!("{BASE}from-sa")),
        (&[], Some(sa_role), &with_default, format!("{BASE}from-sa")),
        (&[], None, &with_default, format!("{BASE}fallback")),
        // IRSA's annotation only with --irsa-annotations, and after ours.
        (&[], Some(sa_irsa), &plain, "no role".into()),
        (&[], Some(sa_irsa), &irsa, format!("{BASE}irsa")),
        (&[], Some(sa_both), &irsa, format!("{BASE}from-sa")),
        // An empty ServiceAccount annotation opts its pods out of the default.
        (&[], Some(sa_empty), &with_default, "no role".into()),
        // The pod's empty annotation wins over the ServiceAccount's role.
        (
            &[(DEFAULT_ROLE_KEY, "")],
            Some(sa_role),
            &plain,
            "no role".into(),
        ),
        (
            &[],
            Some(&[(DEFAULT_ROLE_KEY, "arn:bad")]),
            &plain,
            "denied: invalid_arn".into(),
        ),
    ];
    for (pod, sa, config, expected) in cases {
        assert_eq!(
            decide_subject(pod, sa, Caller::Pod, config),
            expected,
            "pod {pod:?} sa {sa:?}"
        );
    }
}

#[test]
fn service_account_roles_obey_namespace_restrictions() {
    let config = restricted(RestrictionFormat::Glob);
    let ns = namespace(&[(DEFAULT_NAMESPACE_KEY, r#"["allowed"]"#)], &config);
    let pod = annotations(&[]);
    let decide_sa = |role: &str| {
        let sa = annotations(&[(DEFAULT_ROLE_KEY, role)]);
        let subject = Subject {
            pod: &pod,
            service_account: Some(&sa),
            service_account_pending: false,
            containers: &[],
            caller: Caller::Pod,
        };
        outcome(decide_for(&subject, &ns, &config))
    };
    assert_eq!(decide_sa("allowed"), format!("{BASE}allowed"));
    assert_eq!(decide_sa("admin"), "denied: not_allowed");
}

#[test]
fn container_roles_per_calling_container() {
    let config = config();
    let map =
        r#"{"istio-proxy": "", "init": "arn:aws:iam::999999999999:role/setup", "app": "app-own"}"#;
    let pod: &[(&str, &str)] = &[(DEFAULT_ROLE_KEY, "pod-role"), (CONTAINER_ROLES_KEY, map)];
    let only_sidecar: &[(&str, &str)] = &[
        (DEFAULT_ROLE_KEY, "pod-role"),
        (CONTAINER_ROLES_KEY, r#"{"istio-proxy": ""}"#),
    ];
    let cases: [(Pairs<'_>, Caller<'_>, String); 9] = [
        (pod, Caller::Container("app"), format!("{BASE}app-own")),
        (pod, Caller::Container("istio-proxy"), "no role".into()),
        (pod, Caller::Container("init"), format!("{OTHER}setup")),
        // Unlisted containers, and the pod as a whole (prefetch), get the pod's role.
        (
            only_sidecar,
            Caller::Container("app"),
            format!("{BASE}pod-role"),
        ),
        (only_sidecar, Caller::Pod, format!("{BASE}pod-role")),
        // A container the status does not list yet never gets the pod's role.
        (
            only_sidecar,
            Caller::Unattributed,
            "denied: unknown_container".into(),
        ),
        // Fail closed on a typo or bad JSON, for every container.
        (
            &[
                (DEFAULT_ROLE_KEY, "pod-role"),
                (CONTAINER_ROLES_KEY, r#"{"istio-proxi": ""}"#),
            ],
            Caller::Container("app"),
            "denied: invalid_container_roles".into(),
        ),
        (
            &[(CONTAINER_ROLES_KEY, r#"["app"]"#)],
            Caller::Container("app"),
            "denied: invalid_container_roles".into(),
        ),
        (
            &[(CONTAINER_ROLES_KEY, r#"{"app": 5}"#)],
            Caller::Container("app"),
            "denied: invalid_container_roles".into(),
        ),
    ];
    for (pod, caller, expected) in cases {
        assert_eq!(
            decide_subject(pod, None, caller, &config),
            expected,
            "{pod:?} {caller:?}"
        );
    }
    // Without the annotation nothing changes, whoever calls.
    assert_eq!(
        decide_subject(
            &[(DEFAULT_ROLE_KEY, "pod-role")],
            None,
            Caller::Unattributed,
            &config
        ),
        format!("{BASE}pod-role")
    );
    // The container's role is scoped to it (its own session).
    let pod = annotations(pod);
    let containers = [
        "app".to_owned(),
        "istio-proxy".to_owned(),
        "init".to_owned(),
    ];
    let subject = Subject {
        pod: &pod,
        service_account: None,
        service_account_pending: false,
        containers: &containers,
        caller: Caller::Container("app"),
    };
    let Decision::Role {
        container, source, ..
    } = decide_for(&subject, &namespace(&[], &config), &config)
    else {
        panic!("a role");
    };
    assert_eq!(
        (container.as_deref(), source),
        (Some("app"), RoleSource::Container)
    );
}

#[test]
fn container_roles_obey_namespace_restrictions() {
    let config = restricted(RestrictionFormat::Glob);
    let ns = namespace(&[(DEFAULT_NAMESPACE_KEY, r#"["pod-role"]"#)], &config);
    let pod = annotations(&[
        (DEFAULT_ROLE_KEY, "pod-role"),
        (CONTAINER_ROLES_KEY, r#"{"app": "admin"}"#),
    ]);
    let containers = ["app".to_owned(), "sidecar".to_owned()];
    let decide_as = |caller| {
        let subject = Subject {
            pod: &pod,
            service_account: None,
            service_account_pending: false,
            containers: &containers,
            caller,
        };
        outcome(decide_for(&subject, &ns, &config))
    };
    assert_eq!(decide_as(Caller::Container("app")), "denied: not_allowed");
    assert_eq!(
        decide_as(Caller::Container("sidecar")),
        format!("{BASE}pod-role")
    );
}

#[test]
fn a_pending_service_account_holds_back_pods_without_their_own_role() {
    let config = PolicyConfig {
        default_role: Some("fallback".into()),
        ..config()
    };
    let ns = namespace(&[], &config);
    let decide_pending = |pod: &[(&str, &str)]| {
        let pod = annotations(pod);
        let subject = Subject {
            pod: &pod,
            service_account: None,
            service_account_pending: true,
            containers: &[],
            caller: Caller::Pod,
        };
        outcome(decide_for(&subject, &ns, &config))
    };
    assert_eq!(decide_pending(&[]), "denied: service_account_pending");
    assert_eq!(
        decide_pending(&[(DEFAULT_ROLE_KEY, "own")]),
        format!("{BASE}own")
    );
}
