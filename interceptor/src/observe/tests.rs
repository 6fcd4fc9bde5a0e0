use std::time::{Duration, SystemTime};

use http::Method;

use super::*;

fn who(pod: &str) -> Who {
    Who {
        namespace: "team".into(),
        pod: pod.into(),
        container: format!("containerd://{pod}0123456789abcdef"),
    }
}

fn role(name: &str) -> WouldGet {
    WouldGet::Role {
        arn: format!("arn:aws:iam::123456789012:role/{name}"),
        chosen_by: ChosenBy::PodAnnotation,
    }
}

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

#[test]
fn each_container_gets_its_paths_node_role_use_and_last_decision() {
    let store = ObserveStore::new("node-a");
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let t1 = t0 + Duration::from_secs(60);
    store.record_at(who("a"), &Method::PUT, "/latest/api/token", role("a"), t0);
    store.record_at(who("a"), &Method::GET, CREDS, role("a"), t0);
    store.record_at(who("b"), &Method::GET, CREDS, WouldGet::None, t0);
    store.record_at(
        who("b"),
        &Method::GET,
        "/latest/meta-data/placement/region",
        WouldGet::None,
        t0,
    );
    store.record_at(who("c"), &Method::GET, CREDS, WouldGet::None, t0);
    store.record_at(
        who("c"),
        &Method::GET,
        &format!("{CREDS}node-role"),
        WouldGet::None,
        t0,
    );
    store.record_at(
        who("c"),
        &Method::GET,
        &format!("{CREDS}node-role"),
        WouldGet::Refused {
            reason: "not_allowed".into(),
        },
        t1,
    );
    let report = store.report();
    assert_eq!(
        (report.node.as_str(), report.mode.as_str()),
        ("node-a", "observe")
    );
    let row = |pod: &str| report.rows.iter().find(|row| row.who.pod == pod).unwrap();
    assert_eq!(row("a").requests, 2);
    assert!(
        !row("a").used_node_role,
        "listing and tokens are no use of the role"
    );
    assert_eq!(row("a").would_get, role("a"));
    assert!(!row("b").used_node_role);
    assert_eq!(row("b").paths.len(), 2);
    assert!(row("c").used_node_role);
    assert_eq!(row("c").paths.len(), 2, "distinct paths");
    assert_eq!(row("c").requests, 3);
    assert_eq!(
        row("c").would_get,
        WouldGet::Refused {
            reason: "not_allowed".into()
        }
    );
    assert_eq!(row("c").first_seen, crate::imds::ec2::timestamp(t0));
    assert_eq!(row("c").last_seen, crate::imds::ec2::timestamp(t1));
    let counts = store.counts();
    assert_eq!(counts.get(&("role", false)), Some(&1));
    assert_eq!(counts.get(&("none", false)), Some(&1));
    assert_eq!(counts.get(&("refused", true)), Some(&1));
}

#[test]
fn what_a_pod_sends_cannot_grow_the_store() {
    let store = ObserveStore::with_limit("node-a", 2);
    for index in 0..(MAX_PATHS + 5) {
        store.record(
            who("a"),
            &Method::GET,
            &format!("/latest/meta-data/x{index}"),
            WouldGet::None,
        );
    }
    let long = format!("/latest/{}\n", "y".repeat(10_000));
    store.record(who("b"), &Method::GET, &long, WouldGet::None);
    store.record(who("c"), &Method::GET, CREDS, WouldGet::None);
    store.record(who("d"), &Method::GET, CREDS, WouldGet::None);
    let report = store.report();
    assert_eq!(report.rows.len(), 2);
    assert_eq!(report.dropped, 2);
    let a = &report.rows[0];
    assert_eq!((a.paths.len(), a.paths_dropped), (MAX_PATHS, 5));
    let b = report.rows[1].paths.iter().next().unwrap();
    assert_eq!(b.chars().count(), MAX_PATH_CHARS + 1);
    assert!(b.ends_with('…') && !b.contains('\n'));
}

#[test]
fn the_report_round_trips_as_json_and_prints_a_table_worst_first() {
    let store = ObserveStore::new("node-a");
    store.record(who("fine"), &Method::GET, CREDS, role("fine"));
    store.record(
        who("refused"),
        &Method::GET,
        CREDS,
        WouldGet::Refused {
            reason: "invalid_arn".into(),
        },
    );
    store.record(
        who("needs-node"),
        &Method::GET,
        &format!("{CREDS}node-role"),
        WouldGet::None,
    );
    store.record(
        Who {
            namespace: String::new(),
            pod: String::new(),
            container: "cgroup id 42".into(),
        },
        &Method::GET,
        CREDS,
        WouldGet::Refused {
            reason: "unknown_cgroup".into(),
        },
    );
    let report = store.report();
    let json = serde_json::to_string(&report).unwrap();
    let back: Report = serde_json::from_str(&json).unwrap();
    assert_eq!(back, report);
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(value["rows"][0]["would_get"]["outcome"], "refused");
    assert_eq!(value["rows"][0]["namespace"], "");
    assert_eq!(value["rows"][1]["would_get"]["outcome"], "role");
    assert_eq!(value["rows"][1]["namespace"], "team");
    let table = report.table();
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("OBSERVE MODE on node-a"), "{table}");
    assert!(
        lines[1].starts_with("NAMESPACE") && lines[1].contains("UNDER ENFORCEMENT"),
        "{table}"
    );
    assert!(
        lines[2].starts_with("-          -  ") && lines[2].contains("refused (unknown_cgroup)"),
        "an unnamed caller's empty cells: {table}"
    );
    assert!(lines[3].contains("refused (invalid_arn)"), "{table}");
    assert!(
        lines[4].contains("needs-node") && lines[4].contains("yes") && lines[4].contains("none"),
        "{table}"
    );
    assert!(
        lines[5].contains("role arn:aws:iam::123456789012:role/fine (pod_annotation)"),
        "{table}"
    );
    assert!(
        lines[5].contains("containerd://fine01234567 "),
        "ids shortened: {table}"
    );
    // Columns line up.
    let column = lines[1].find("REQUESTS").unwrap();
    assert!(
        lines[2..]
            .iter()
            .all(|line| line[column..].starts_with(char::is_numeric)),
        "{table}"
    );
}

#[test]
fn the_client_reads_the_report_and_tells_an_enforcing_agent_apart() {
    let addr: std::net::SocketAddr = "127.0.0.1:8182".parse().unwrap();
    let store = ObserveStore::new("node-a");
    store.record(who("a"), &Method::GET, CREDS, role("a"));
    let report = store.report();
    let body = serde_json::to_string(&report).unwrap();
    let answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(client::parse(addr, answer.as_bytes()).unwrap(), report);
    assert!(matches!(
        client::parse(addr, b"HTTP/1.1 404 Not Found\r\n\r\nnot found\n"),
        Err(client::Error::NotObserving(_))
    ));
    assert!(matches!(
        client::parse(addr, b"HTTP/1.1 503 Service Unavailable\r\n\r\n"),
        Err(client::Error::Status { status: 503, .. })
    ));
    assert!(matches!(
        client::parse(addr, b"HTTP/1.1 200 OK\r\n\r\n{\"not\": \"a report\"}"),
        Err(client::Error::Invalid { .. })
    ));
    assert!(matches!(
        client::parse(addr, b"garbage"),
        Err(client::Error::Invalid { .. })
    ));
}
