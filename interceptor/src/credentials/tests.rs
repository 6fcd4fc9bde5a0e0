use super::session_name;

#[test]
fn session_names_identify_the_pod_within_sts_rules() {
    assert_eq!(session_name("team-a", "web-5f7d8"), "team-a.web-5f7d8");
    let long = session_name(
        "a-very-long-namespace-name-for-a-team",
        "and-an-even-longer-pod-name-abcdef-12345",
    );
    assert_eq!(long.len(), 64);
    let other = session_name(
        "a-very-long-namespace-name-for-a-team",
        "and-an-even-longer-pod-name-abcdef-12346",
    );
    assert_ne!(
        long, other,
        "truncation must not make two pods share a session"
    );
    let odd = session_name("ns", "pod/with spaces");
    assert!(odd.starts_with("ns.pod-with-spaces-"), "{odd}");
    assert_ne!(odd, session_name("ns", "pod-with-spaces"));
    for name in [&long, &odd] {
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c)),
            "{name}"
        );
    }
}
