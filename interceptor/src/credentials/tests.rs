use std::time::Duration;

use super::{
    Settings,
    cache::{refresh_wait, retry_wait},
    session_name,
};

fn valid_for_sts(name: &str) -> bool {
    (2..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c))
}

#[test]
fn session_names_identify_the_pod_within_sts_rules() {
    assert_eq!(
        session_name("team-a", "web-5f7d8", None),
        "team-a.web-5f7d8"
    );
    let long = session_name(
        "a-very-long-namespace-name-for-a-team",
        "and-an-even-longer-pod-name-abcdef-12345",
        None,
    );
    assert_eq!(long.len(), 64);
    let other = session_name(
        "a-very-long-namespace-name-for-a-team",
        "and-an-even-longer-pod-name-abcdef-12346",
        None,
    );
    assert_ne!(
        long, other,
        "truncation must not make two pods share a session"
    );
    assert_eq!(
        long,
        session_name(
            "a-very-long-namespace-name-for-a-team",
            "and-an-even-longer-pod-name-abcdef-12345",
            None
        ),
        "deterministic"
    );
    let odd = session_name("ns", "pod/with spaces", None);
    assert!(odd.starts_with("ns.pod-with-spaces-"), "{odd}");
    assert_ne!(odd, session_name("ns", "pod-with-spaces", None));
    let unicode = session_name("ns", "pød-é", None);
    let empty = session_name("", "", None);
    for name in [&long, &odd, &unicode, &empty] {
        assert!(valid_for_sts(name), "{name}");
    }
    // Exactly at the limit: kept as is.
    let at_limit = session_name(&"n".repeat(30), &"p".repeat(33), None);
    assert_eq!(at_limit.len(), 64);
    assert!(!at_limit.contains('-'), "{at_limit}");
}

#[test]
fn container_sessions_are_distinct_from_every_pod_session() {
    // A pod named `web.app` and the container `app` of the pod `web` must not share a
    // session: `@` is in no Kubernetes name.
    assert_eq!(session_name("ns", "web", Some("app")), "ns.web@app");
    assert_ne!(
        session_name("ns", "web", Some("app")),
        session_name("ns", "web.app", None)
    );
    assert_ne!(
        session_name("ns", "web", Some("app")),
        session_name("ns", "web", Some("sidecar"))
    );
    let long = session_name(&"n".repeat(63), &"p".repeat(253), Some("istio-proxy"));
    let other = session_name(&"n".repeat(63), &"p".repeat(253), Some("app"));
    assert!(
        valid_for_sts(&long) && valid_for_sts(&other),
        "{long} {other}"
    );
    assert_ne!(long, other, "truncation keeps containers apart");
    let identity = super::source_identity("team-a", "web-1");
    assert_eq!(identity, "team-a.web-1");
    assert!(valid_for_sts(&super::source_identity(&"n".repeat(63), "p")));
}

const MIN: Duration = Duration::from_secs(60);

#[test]
fn defaults_keep_fifteen_minutes_for_the_sdks() {
    let settings = Settings::default();
    assert_eq!(settings.session_duration, Duration::from_secs(3600));
    assert_eq!(settings.refresh_lead, 30 * MIN);
    assert_eq!(settings.serve_floor, 15 * MIN);
    for ttl in [15, 20, 30, 40, 45, 60, 90, 120, 360, 720] {
        let settings = Settings::for_session(ttl * MIN);
        let name = format!("{ttl} min");
        // Refreshing happens well above the floor (room for STS retries) and leaves the
        // credential in use for a while first.
        assert!(
            settings.refresh_lead >= settings.serve_floor + 5 * MIN,
            "{name}: {settings:?}"
        );
        assert!(
            settings.refresh_lead <= settings.session_duration * 2 / 3,
            "{name}: {settings:?}"
        );
        assert!(settings.stale_floor < settings.serve_floor, "{name}");
        if ttl >= 45 {
            assert_eq!(settings.serve_floor, 15 * MIN, "{name}");
        }
        // The first refresh waits at least a third of the session.
        let first = refresh_wait(settings.session_duration, &settings, 1.0);
        assert!(first >= settings.session_duration / 4, "{name}: {first:?}");
    }
    // Clamped to what STS accepts.
    assert_eq!(Settings::for_session(MIN).session_duration, 15 * MIN);
    assert_eq!(
        Settings::for_session(48 * 60 * MIN).session_duration,
        12 * 60 * MIN
    );
}

#[test]
fn refresh_wait_shortens_the_wait_not_the_lead() {
    let settings = Settings::default();
    // A fresh 1 h credential: refreshed after 30 min, up to 3 min earlier with jitter.
    assert_eq!(refresh_wait(60 * MIN, &settings, 0.0), 30 * MIN);
    assert_eq!(refresh_wait(60 * MIN, &settings, 1.0), 27 * MIN);
    let middle = refresh_wait(60 * MIN, &settings, 0.5);
    assert!(middle > 27 * MIN && middle < 30 * MIN, "{middle:?}");
    // Out-of-range jitter is clamped.
    assert_eq!(refresh_wait(60 * MIN, &settings, 7.0), 27 * MIN);
    // Already past the refresh point: as soon as the rate limit allows.
    assert_eq!(refresh_wait(20 * MIN, &settings, 0.5), MIN);
    assert_eq!(refresh_wait(Duration::ZERO, &settings, 0.5), MIN);
}

#[test]
fn no_settings_make_a_refresh_loop() {
    // A lead longer than the session (what a caller computing its own lead could pass)
    // still waits the minimum interval between refreshes.
    let settings = Settings {
        session_duration: 15 * MIN,
        refresh_lead: 20 * MIN,
        ..Settings::default()
    };
    assert_eq!(refresh_wait(15 * MIN, &settings, 0.0), MIN);
    // Tests shorten everything explicitly: 900 s sessions refreshed within seconds.
    let quick = Settings {
        session_duration: 15 * MIN,
        refresh_lead: Duration::from_secs(898),
        min_refresh_interval: Duration::ZERO,
        ..Settings::default()
    };
    let wait = refresh_wait(Duration::from_secs(900), &quick, 1.0);
    assert!(wait <= Duration::from_secs(2) && wait >= Duration::from_millis(1800));
}

#[test]
fn failed_refreshes_back_off_with_jitter_up_to_a_minute() {
    let settings = Settings::default();
    assert_eq!(retry_wait(1, &settings, 0.0), Duration::from_secs(2));
    assert_eq!(retry_wait(2, &settings, 0.0), Duration::from_secs(4));
    assert_eq!(retry_wait(3, &settings, 1.0), Duration::from_secs(9));
    assert_eq!(retry_wait(30, &settings, 0.0), Duration::from_secs(60));
    assert_eq!(
        retry_wait(u32::MAX, &settings, 1.0),
        Duration::from_secs(61)
    );
}

#[test]
fn refusals_name_the_trust_policy_permission_the_options_need() {
    let refused = |message: &str| super::CredentialsError::Refused {
        role: "arn:aws:iam::123456789012:role/app".into(),
        code: "AccessDenied".into(),
        message: message.into(),
    };
    let cases = [
        (
            "User: arn:aws:sts::123456789012:assumed-role/node/i-1 is not authorized to perform: sts:TagSession on resource: arn:aws:iam::123456789012:role/app",
            Some("sts:TagSession"),
        ),
        (
            "... is not authorized to perform: sts:SetSourceIdentity on resource: ...",
            Some("sts:SetSourceIdentity"),
        ),
        (
            "... is not authorized to perform: sts:AssumeRole on resource: ...",
            None,
        ),
    ];
    for (message, expected) in cases {
        let error = refused(message);
        assert_eq!(error.missing_permission(), expected, "{message}");
        let event = error.event_message();
        match expected {
            Some(permission) => assert!(
                event.contains(&format!("must allow {permission}")),
                "{event}"
            ),
            None => assert_eq!(event, error.to_string()),
        }
    }
    let unavailable = super::CredentialsError::Unavailable {
        role: "r".into(),
        reason: "sts:TagSession".into(),
    };
    assert_eq!(unavailable.missing_permission(), None);
}
