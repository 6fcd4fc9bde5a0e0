//! Hostile pods against the real agent (API-server mode, against the real kube-apiserver
//! of the test binary's shared control plane): forged headers, path tricks,
//! request smuggling, oversized and slow requests, connection floods and forged IMDSv2
//! tokens. None may yield another pod's or the node's credentials, the agent stays up, and
//! what a pod can hold stays within the limits (docs/imds.md, "Limits").
//!
//! The node's metadata service is a fake handing out `NODE_ACCESS_KEY`, so a leak of the
//! node's credentials is visible in any answer; pod b's own credentials are fetched first
//! so that a leak of them to pod a is visible too.

use std::{io::Read, net::IpAddr, path::PathBuf, time::Duration};

use interceptor_tests::{
    Node, Pod,
    agent::{Agent, series_value},
    clients::{in_pod, raw},
    cluster::{AgentBuilder, Peers},
    control_plane::{ControlPlane, Scope},
    fake_imds::{FakeImds, NODE_ACCESS_KEY, NODE_ROLE},
    moto::MotoServer,
    objects::wait_for,
    peers::venv,
    pod_client::{PodClient, Request},
    require_root,
};
use serde_json::Value;

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";
/// The limits the agent runs with here: small, so that tests reach them quickly.
const LIMITS: [&str; 12] = [
    "--header-read-timeout",
    "2s",
    "--request-timeout",
    "2s",
    "--connection-max-age",
    "4s",
    "--max-header-bytes",
    "16384",
    "--max-connections",
    "64",
    "--max-connections-per-cgroup",
    "16",
];
/// `--max-connections-per-cgroup` above.
const PER_CGROUP: i64 = 16;

/// The agent, its peers and two pods with roles, in a scope of the shared control plane
/// (its node, and a namespace `team` holding the pods). Fields drop in order: the agent
/// first (killed, programs detached), the pods, then the node.
struct Cluster {
    agent: Agent,
    pod_a: Pod,
    pod_b: Pod,
    scope: Scope<'static>,
    team: String,
    upstream: FakeImds,
    _moto: MotoServer,
    node: Node,
}

impl Cluster {
    /// `None` (the test skips) when the control plane cannot start outside CI; `more_pods`
    /// are `(name, role)`, returned in that order.
    async fn start(test: &str, name: &str, more_pods: &[(&str, &str)]) -> Option<(Self, Vec<Pod>)> {
        let scope = ControlPlane::shared(test)?.scope(name);
        scope.add_node(&[]).await;
        let team = scope.namespace_name("team");
        scope.namespace(&team, &[]).await;
        let node = Node::new();
        let role = |role| [("iam.amazonaws.com/role", role)];
        let pod_a = scope
            .running_pod(&node, &team, "app-a", &role("role-a"))
            .await;
        let pod_b = scope
            .running_pod(&node, &team, "app-b", &role("role-b"))
            .await;
        let mut more = Vec::new();
        for (app, pod_role) in more_pods {
            more.push(scope.running_pod(&node, &team, app, &role(pod_role)).await);
        }
        let moto = MotoServer::shared_on(node.address);
        let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
        let mut extra = vec![
            "--base-role-arn",
            "arn:aws:iam::123456789012:role/",
            // The node's own credentials are one allow-list entry away from these paths.
            "--allow-route-regexp",
            "^/latest/meta-data/placement/.*",
        ];
        extra.extend(LIMITS);
        let (agent, _) =
            AgentBuilder::new(name, &node, Peers::new(&scope, &upstream, &moto.endpoint()))
                .args(&extra)
                .start()
                .await;
        let cluster = Self {
            agent,
            pod_a,
            pod_b,
            scope,
            team,
            upstream,
            _moto: moto,
            node,
        };
        Some((cluster, more))
    }

    /// Only the allowed passthrough (and the agent's own upstream token) ever reached the
    /// node's metadata service: never a credentials path.
    fn assert_upstream_never_asked_for_credentials(&self) {
        let requests = self.upstream.requests();
        assert!(
            requests
                .iter()
                .all(|request| request == "PUT /latest/api/token"
                    || request.starts_with("GET /latest/meta-data/placement/")),
            "the upstream service was asked for more than the allowed paths: {requests:?}"
        );
    }

    /// The series' value, `None` while `/metrics` does not answer or lacks the series
    /// (read exactly: `x 1` is not `x 12`).
    fn metric(&self, series: &str) -> Option<i64> {
        let (_, metrics) = self.agent.admin_get("/metrics")?;
        series_value(&metrics, series).map(|value| value as i64)
    }
}

/// The AccessKeyId a pod gets for its own role, through the redirect: on the first
/// request (moto is warmed before any test uses it, so STS answers within the agent's
/// request wait).
fn own_key(client: &mut PodClient, role: &str) -> String {
    let (status, body) = client
        .ask(&Request::get(&format!("{CREDS}{role}")))
        .status_body();
    assert_eq!(status, 200, "{role}: {body}");
    let document: Value = serde_json::from_str(&body).expect("credentials JSON");
    document["AccessKeyId"]
        .as_str()
        .expect("AccessKeyId")
        .to_owned()
}

fn hostile(pod: &Pod, args: &[&str]) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers/py/hostile.py");
    let script = script.display().to_string();
    let mut all = vec![script.as_str()];
    all.extend_from_slice(args);
    let out = in_pod(pod, &venv().join("bin/python").display().to_string(), &all);
    serde_json::from_str(&out).unwrap_or_else(|_| panic!("hostile.py {args:?}: {out}"))
}

/// `bytes` sent raw on a new connection of `client`: (what came back within 5 s, closed
/// by the agent). Panics if the connection itself failed.
fn send(client: &mut PodClient, bytes: &[u8]) -> (String, bool) {
    let answer = client.ask(&Request::bytes(bytes, 5.0));
    match answer.closed {
        Some(closed) => (answer.data, closed),
        None => panic!("sending {:?}: {answer:?}", String::from_utf8_lossy(bytes)),
    }
}

/// The status codes of every response in `data`, in order.
fn statuses(data: &str) -> Vec<u16> {
    data.match_indices("HTTP/1.1 ")
        .filter_map(|(at, _)| data.get(at + 9..at + 12)?.parse().ok())
        .collect()
}

fn get(target: &str, headers: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: 169.254.169.254\r\n{headers}Connection: close\r\n\r\n")
        .into_bytes()
}

/// Collects failed checks so that one run reports them all.
struct Checks {
    foreign: Vec<String>,
    failed: Vec<String>,
}

impl Checks {
    fn new(foreign_keys: &[&str]) -> Self {
        let mut foreign = vec![NODE_ACCESS_KEY.to_owned()];
        foreign.extend(foreign_keys.iter().map(|key| (*key).to_owned()));
        Self {
            foreign,
            failed: Vec::new(),
        }
    }

    /// Nothing foreign in `data`, and its statuses are one of `allowed` each.
    fn answer(&mut self, what: &str, data: &str, allowed: &[u16]) -> Vec<u16> {
        self.no_leak(what, data);
        let got = statuses(data);
        if got.is_empty() || got.iter().any(|status| !allowed.contains(status)) {
            self.failed.push(format!(
                "{what}: statuses {got:?}, wanted {allowed:?}: {data:?}"
            ));
        }
        got
    }

    fn no_leak(&mut self, what: &str, data: &str) {
        for key in &self.foreign {
            if data.contains(key.as_str()) {
                self.failed.push(format!("{what}: LEAKED {key}: {data:?}"));
            }
        }
    }

    fn that(&mut self, what: &str, ok: bool, seen: impl std::fmt::Debug) {
        if !ok {
            self.failed.push(format!("{what}: {seen:?}"));
        }
    }

    fn assert_none_failed(&self, agent: &Agent) {
        assert!(
            self.failed.is_empty(),
            "failed checks:\n{}\n{}",
            self.failed.join("\n"),
            agent.log_text()
        );
    }
}

/// Forged headers, path tricks, smuggling, conflicting lengths, oversized heads, slow and
/// silent clients: pod a only ever gets its own role, and the agent keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_never_yield_foreign_credentials() {
    let test = "hostile_requests_never_yield_foreign_credentials";
    if !require_root(test) {
        return;
    }
    let Some((cluster, _)) = Cluster::start(test, "hostile-http", &[]).await else {
        return;
    };
    let node_address = cluster.node.address;
    let failed = tokio::task::block_in_place(|| {
        let (a, b) = (&cluster.pod_a, &cluster.pod_b);
        let (mut client_a, mut client_b) = (PodClient::start(a), PodClient::start(b));
        let key_a = own_key(&mut client_a, "role-a");
        let key_b = own_key(&mut client_b, "role-b");
        let mut checks = Checks::new(&[&key_b]);
        let b_ip = b.ip.to_string();

        // Forged Host / X-Forwarded-For / X-Real-IP / Forwarded: identity is the cgroup.
        let forged = format!(
            "X-Forwarded-For: {b_ip}\r\nX-Real-IP: {b_ip}\r\nForwarded: for={b_ip}\r\n\
             X-Forwarded-Host: {node_address}\r\n"
        );
        for host in [b_ip.as_str(), "169.254.169.254", "localhost:8182", ""] {
            let with_host = |target: &str| {
                format!(
                    "GET {target} HTTP/1.1\r\nHost: {host}\r\n{forged}Connection: close\r\n\r\n"
                )
                .into_bytes()
            };
            let (data, _) = send(&mut client_a, &with_host(CREDS));
            checks.answer(&format!("list, Host {host:?}"), &data, &[200]);
            checks.that("list names pod a's role", data.ends_with("role-a"), &data);
            let (data, _) = send(&mut client_a, &with_host(&format!("{CREDS}role-a")));
            checks.answer(&format!("own role, Host {host:?}"), &data, &[200]);
            checks.that("own credentials", data.contains(&key_a), &data);
            for other in ["role-b", NODE_ROLE] {
                let (data, _) = send(&mut client_a, &with_host(&format!("{CREDS}{other}")));
                checks.answer(&format!("{other}, forged Host {host:?}"), &data, &[404]);
            }
            let (data, _) = send(&mut client_a, &with_host("/metrics"));
            checks.answer(&format!("admin path, Host {host:?}"), &data, &[404]);
        }

        // Path tricks: never another role, never forwarded.
        let role_b = "role-b";
        for target in [
            format!("/{CREDS}{role_b}"),
            format!("{CREDS}/{role_b}"),
            "/latest//meta-data/iam/security-credentials/role-a".to_owned(),
            format!("{CREDS}./{role_b}"),
            format!("{CREDS}role-a/../{role_b}"),
            format!("{CREDS}%2e%2e/security-credentials/{role_b}"),
            format!("{CREDS}role-a%2F..%2F{role_b}"),
            format!("/latest/meta-data/iam/security-credentials%2F{role_b}"),
            format!("{CREDS}{role_b}%00"),
            format!("{CREDS}ROLE-B"),
            format!("{CREDS}{role_b}"),
            format!("{CREDS}{NODE_ROLE}"),
            format!("/2016-09-02/meta-data/iam/security-credentials/{role_b}"),
            format!("/2016-09-02/meta-data/iam/security-credentials/{NODE_ROLE}"),
            format!("/1.0/meta-data/iam/security-credentials/{NODE_ROLE}"),
            format!("/LATEST/meta-data/iam/security-credentials/{NODE_ROLE}"),
            format!("/latest/meta-data/placement/../iam/security-credentials/{NODE_ROLE}"),
            format!("/latest/meta-data/placement/%2e%2e/iam/security-credentials/{NODE_ROLE}"),
            "/latest/meta-data/placement/..%2Fiam/security-credentials/".to_owned(),
            "/latest/meta-data/placement//../iam/info".to_owned(),
            "/latest/meta-data/placement/%2E%2E%2F%2E%2E%2Fiam/info".to_owned(),
            format!("http://169.254.169.254{CREDS}{NODE_ROLE}"),
            "http://169.254.169.254/latest/meta-data/placement/../iam/info".to_owned(),
        ] {
            let (data, _) = send(&mut client_a, &get(&target, ""));
            checks.answer(&format!("GET {target}"), &data, &[400, 404]);
        }
        // Dated versions and query strings still name pod a's own role only.
        for target in [
            "/2016-09-02/meta-data/iam/security-credentials/role-a".to_owned(),
            format!("{CREDS}role-a?role=role-b"),
            format!("http://{b_ip}{CREDS}role-a"),
        ] {
            let (data, _) = send(&mut client_a, &get(&target, ""));
            checks.answer(&format!("GET {target}"), &data, &[200]);
            checks.that(&format!("{target}: own"), data.contains(&key_a), &data);
        }

        // Conflicting lengths and smuggling: whatever the second request is, it is pod a's.
        let head = |target: &str, headers: &str| {
            format!("GET {target} HTTP/1.1\r\nHost: 169.254.169.254\r\n{headers}\r\n")
        };
        let own = format!("{CREDS}role-a");
        let other = format!("{CREDS}role-b");
        let node_creds = format!("{CREDS}{NODE_ROLE}");
        let inner = head(&other, "");
        let smuggling = [
            (
                "CL.TE",
                format!(
                    "{}0\r\n\r\n{}",
                    head(&own, "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"),
                    head(&other, "Connection: close\r\n")
                ),
            ),
            (
                "TE.CL",
                format!(
                    "{}{:x}\r\n{inner}\r\n0\r\n\r\n{}",
                    head(&own, "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n"),
                    inner.len(),
                    head(&node_creds, "Connection: close\r\n")
                ),
            ),
            (
                "two different Content-Lengths",
                format!(
                    "{}{inner}",
                    head(
                        &own,
                        &format!("Content-Length: 0\r\nContent-Length: {}\r\n", inner.len())
                    )
                ),
            ),
            (
                "Transfer-Encoding not chunked",
                format!("{}{inner}", head(&own, "Transfer-Encoding: xchunked\r\n")),
            ),
            (
                "Transfer-Encoding chunked, identity",
                format!(
                    "{}{inner}",
                    head(&own, "Transfer-Encoding: chunked, identity\r\n")
                ),
            ),
            (
                "Transfer-Encoding folded",
                format!(
                    "{}{inner}",
                    head(&own, "X-Pad: x\r\n Transfer-Encoding: chunked\r\n")
                ),
            ),
            (
                "HTTP/1.0 with Transfer-Encoding",
                format!("GET {own} HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{inner}"),
            ),
            (
                "a request inside the body",
                format!(
                    "{}{}",
                    head(
                        &own,
                        &format!("Content-Length: {}\r\nConnection: close\r\n", inner.len())
                    ),
                    inner
                ),
            ),
            (
                "pipelined: own role, then another",
                format!(
                    "{}{}{}",
                    head(&own, ""),
                    head(&node_creds, ""),
                    head(&other, "Connection: close\r\n")
                ),
            ),
        ];
        for (what, request) in &smuggling {
            let (data, _) = send(&mut client_a, request.as_bytes());
            let got = checks.answer(what, &data, &[200, 400, 404, 501]);
            // A 200 is only ever pod a's own credentials, once per request for them.
            let ok = got.iter().filter(|status| **status == 200).count();
            checks.that(&format!("{what}: at most one 200"), ok <= 1, &data);
        }

        // Oversized heads: refused, the connection closed.
        let pad = "a".repeat(20_000);
        let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
        for (what, request, allowed) in [
            (
                "20 kB header",
                get(&own, &format!("X-Pad: {pad}\r\n")),
                &[431][..],
            ),
            ("150 headers", get(&own, &many), &[431]),
            (
                "20 kB URI",
                get(&format!("/latest/meta-data/{pad}"), ""),
                &[414, 431],
            ),
            (
                "3 kB URI",
                get(&format!("{CREDS}{}", "a".repeat(3000)), ""),
                &[404],
            ),
        ] {
            let (data, closed) = send(&mut client_a, &request);
            checks.answer(what, &data, allowed);
            checks.that(&format!("{what}: connection closed"), closed, &data);
        }
        checks.that(
            "served after the oversized requests",
            own_key(&mut client_a, "role-a") == key_a,
            "",
        );

        // Slow clients: a silent one and one sending a byte a second are closed after the
        // header timeout; meanwhile the other pod is served.
        std::thread::scope(|scope| {
            let silent = scope.spawn(|| hostile(a, &["silent", "15"]));
            let drip = scope.spawn(|| hostile(a, &["drip", "15"]));
            let idle = scope.spawn(|| hostile(a, &["idle", "15"]));
            // More answers than the socket buffers hold (credentials are ~750 bytes).
            let own = format!("{CREDS}role-a");
            let unread = scope.spawn(move || hostile(a, &["unread", "20000", "12", &own]));
            for round in 0..5 {
                let (status, body) = client_b
                    .ask(&Request::get(&format!("{CREDS}role-b")))
                    .status_body();
                checks.that(
                    &format!("pod b served while pod a is slow ({round})"),
                    status == 200 && body.contains(&key_b),
                    (status, &body),
                );
            }
            let silent = silent.join().unwrap();
            checks.that("silent client closed", silent["closed"] == true, &silent);
            let drip = drip.join().unwrap();
            checks.that("byte-a-second client closed", drip["closed"] == true, &drip);
            checks.that(
                "byte-a-second client got no answer",
                drip["sent"].as_u64() < Some(get(CREDS, "").len() as u64)
                    && !drip["data"].as_str().unwrap_or_default().contains("200"),
                &drip,
            );
            let idle = idle.join().unwrap();
            checks.that(
                "idle keep-alive connection answered, then closed",
                idle["closed"] == true && idle["status_line"] == "HTTP/1.1 200 OK",
                &idle,
            );
            let unread = unread.join().unwrap();
            checks.that(
                "a client not reading its answers is closed",
                unread["closed"] == true,
                &unread,
            );
        });
        checks.that(
            "served after the slow clients",
            own_key(&mut client_a, "role-a") == key_a && own_key(&mut client_b, "role-b") == key_b,
            "",
        );
        checks
    });
    failed.assert_none_failed(&cluster.agent);
    cluster.assert_upstream_never_asked_for_credentials();
    assert!(
        cluster
            .agent
            .admin_get("/healthz")
            .is_some_and(|(s, _)| s == 200),
        "the agent is not healthy:\n{}",
        cluster.agent.log_text()
    );
}

/// IMDSv2 token forgery: random, modified, expired, another pod's, a deleted pod's: all
/// 401, never credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_foreign_tokens_are_refused() {
    let test = "forged_and_foreign_tokens_are_refused";
    if !require_root(test) {
        return;
    }
    let Some((cluster, mut more)) =
        Cluster::start(test, "hostile-tokens", &[("app-c", "role-c")]).await
    else {
        return;
    };
    let pod_c = more.pop().expect("pod c");
    let mint = |client: &mut PodClient, seconds: u32| {
        let ttl = seconds.to_string();
        let request = Request::new("PUT", "/latest/api/token")
            .header("X-aws-ec2-metadata-token-ttl-seconds", &ttl);
        let (status, token) = client.ask(&request).status_body();
        assert_eq!(status, 200, "token: {token}");
        token.trim().to_owned()
    };
    let (a, b) = (&cluster.pod_a, &cluster.pod_b);
    let (mut client_a, mut client_b, mut client_c) = (
        PodClient::start(a),
        PodClient::start(b),
        PodClient::start(&pod_c),
    );
    let (key_a, key_b, key_c) = tokio::task::block_in_place(|| {
        (
            own_key(&mut client_a, "role-a"),
            own_key(&mut client_b, "role-b"),
            own_key(&mut client_c, "role-c"),
        )
    });
    let (token_a, token_b, token_c, short) = tokio::task::block_in_place(|| {
        (
            mint(&mut client_a, 60),
            mint(&mut client_b, 60),
            mint(&mut client_c, 60),
            mint(&mut client_a, 1),
        )
    });
    let with = |token: &str| Request::get(CREDS).header("X-aws-ec2-metadata-token", token);
    assert_eq!(
        tokio::task::block_in_place(|| client_a.ask(&with(&token_a)).status_body()),
        (200, "role-a".to_owned()),
        "pod a's own token works"
    );

    // Pod c is deleted from the API server and its cgroups removed; the agent forgets it.
    cluster.scope.delete_pod(&cluster.team, "app-c").await;
    drop(client_c);
    drop(pod_c);
    wait_for(
        "the agent to forget pod c",
        Duration::from_secs(10),
        || match cluster.metric(r#"interceptor_tracked{kind="pods"}"#) {
            Some(2) => Ok(()),
            seen => Err(format!("tracked pods: {seen:?}")),
        },
    )
    .await;
    // The 1 s token is past its expiry now.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let alphabet: Vec<char> = ('A'..='Z')
        .chain('a'..='z')
        .chain('0'..='9')
        .chain(['-', '_'])
        .collect();
    let mut random_bytes = vec![0u8; token_a.len()];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut file| file.read_exact(&mut random_bytes))
        .unwrap();
    let random: String = random_bytes
        .iter()
        .map(|byte| alphabet[usize::from(*byte) % alphabet.len()])
        .collect();
    let modified = |at: usize| {
        let mut chars: Vec<char> = token_a.chars().collect();
        chars[at] = if chars[at] == 'A' { 'B' } else { 'A' };
        chars.into_iter().collect::<String>()
    };
    let middle = token_a.len() / 2;
    let last = token_a.len() - 1;
    let cases: Vec<(&str, &Pod, String)> = vec![
        ("random token", a, random),
        ("pod a's token, first byte modified", a, modified(0)),
        ("pod a's token, a middle byte modified", a, modified(middle)),
        ("pod a's token, last byte modified", a, modified(last)),
        ("pod a's token, truncated", a, token_a[..last].to_owned()),
        ("pod a's token twice", a, format!("{token_a}{token_a}")),
        ("an overlong token", a, "A".repeat(4000)),
        ("an expired token of pod a", a, short),
        ("pod b's token in pod a", a, token_b.clone()),
        ("pod a's token in pod b", b, token_a.clone()),
        ("deleted pod c's token in pod a", a, token_c.clone()),
        ("deleted pod c's token in pod b", b, token_c),
    ];
    let checks = tokio::task::block_in_place(|| {
        let mut checks = Checks::new(&[&key_c]);
        for (what, pod, token) in &cases {
            // The pod's own key is not foreign to it, the others' are.
            let (client, foreign) = if std::ptr::eq(*pod, a) {
                (&mut client_a, &key_b)
            } else {
                (&mut client_b, &key_a)
            };
            for path in [
                CREDS.to_owned(),
                format!("{CREDS}role-a"),
                format!("{CREDS}role-b"),
            ] {
                let request = Request::get(&path).header("X-aws-ec2-metadata-token", token);
                let (status, body) = client.ask(&request).status_body();
                checks.no_leak(what, &body);
                checks.that(
                    &format!("{what}: GET {path}"),
                    status == 401 && !body.contains(foreign.as_str()),
                    (status, &body),
                );
            }
        }
        checks
    });
    checks.assert_none_failed(&cluster.agent);
    cluster.assert_upstream_never_asked_for_credentials();
}

/// A pod opening thousands of connections while another pod keeps asking for its
/// credentials: the agent stays up, its open connections stay within the limit and its
/// memory bounded, and the other pod is served its own role throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_neither_starves_other_pods_nor_grows_the_agent() {
    let test = "a_connection_flood_neither_starves_other_pods_nor_grows_the_agent";
    if !require_root(test) {
        return;
    }
    const FLOOD: usize = 2500;
    let Some((cluster, _)) = Cluster::start(test, "hostile-flood", &[]).await else {
        return;
    };
    let (a, b) = (&cluster.pod_a, &cluster.pod_b);
    let mut client_b = PodClient::start(b);
    let key_b = tokio::task::block_in_place(|| own_key(&mut client_b, "role-b"));
    let rss = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|line| line.strip_prefix("VmRSS:"))
                    .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .expect("the agent's VmRSS (is it still running?)")
    };
    let pid = cluster.agent.pid();
    let rss_before = rss(pid);

    let (flood, victim, peak_connections, peak_rss) = std::thread::scope(|scope| {
        let flood = scope.spawn(|| hostile(a, &["flood", &FLOOD.to_string(), "5"]));
        let victim = scope.spawn(|| {
            let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers/py/creds_loop.py");
            in_pod(
                b,
                &venv().join("bin/python").display().to_string(),
                &[&script.display().to_string(), "15"],
            )
        });
        let (mut peak_connections, mut peak_rss) = (0, 0);
        while !(flood.is_finished() && victim.is_finished()) {
            if let Some(open) = cluster.metric("interceptor_proxy_connections") {
                peak_connections = peak_connections.max(open);
            }
            peak_rss = peak_rss.max(rss(pid));
            std::thread::sleep(Duration::from_millis(100));
        }
        (
            flood.join().unwrap(),
            victim.join().unwrap(),
            peak_connections,
            peak_rss,
        )
    });
    let log = || cluster.agent.log_text();

    // The flood connects one socket after another: the kernel completes each handshake
    // into the listen backlog whatever the agent does, and the agent accepts and closes
    // what it will not serve at once, so every connection is opened.
    let opened = flood["opened"].as_u64().unwrap_or(0);
    assert_eq!(opened, FLOOD as u64, "{flood}");
    assert_eq!(
        flood["closed_by_server"], opened,
        "every connection of the flood was closed by the agent (limit or header timeout): {flood}"
    );
    // The cgroup holds at most 16 at a time, each for at most the 2 s header timeout,
    // while the flood opens 2500 within seconds: all but a few dozen are refused at once
    // (2452 of 2500 when measured).
    let refused = cluster
        .agent
        .metric(r#"interceptor_connection_refusals_total{reason="cgroup_limit"}"#);
    assert!(
        refused >= opened as f64 * 0.9,
        "the per-cgroup limit refused {refused} of {opened}: {flood}"
    );
    // The flood filled its cgroup's share (held for the header timeout, so sampled every
    // 100 ms it is seen), and beyond it only pod b's one connection at a time, with room
    // for a connection being closed: far below the global limit of 64.
    assert!(
        (PER_CGROUP..=PER_CGROUP + 3).contains(&peak_connections),
        "open connections peaked at {peak_connections}; one cgroup may hold {PER_CGROUP}"
    );
    // What the flood may cost: at most 16 + a few live connections, each buffering at
    // most the 16 KiB header limit plus hyper's buffers (under 1 MiB together), and
    // allocator slack. Measured: +1.1 MiB. 6 MiB fails a leak of 2.5 KiB per flood
    // connection (2500 of them).
    let ceiling = rss_before + 6 * 1024;
    assert!(
        peak_rss <= ceiling,
        "the agent's RSS grew from {rss_before} kB to {peak_rss} kB under the flood"
    );

    // Pod b kept being served its own role during the flood, never anything else.
    let lines: Vec<&str> = victim.lines().collect();
    let ok: Vec<&&str> = lines
        .iter()
        .filter(|line| line.starts_with("ok "))
        .collect();
    assert!(
        !ok.is_empty(),
        "pod b was not served during the flood: {victim}\n{}",
        log()
    );
    assert!(
        ok.iter().all(|line| **line == format!("ok {key_b} role-b")),
        "pod b got something other than its own credentials: {victim}"
    );
    assert!(!victim.contains(NODE_ACCESS_KEY), "{victim}");
    eprintln!(
        "flood: {flood}; pod b: {} ok of {} attempts; peak connections {peak_connections}; \
         RSS {rss_before} -> {peak_rss} kB; refused {refused}",
        ok.len(),
        lines.len()
    );

    // The agent is up and serves both pods afterwards.
    assert!(
        cluster
            .agent
            .admin_get("/healthz")
            .is_some_and(|(s, _)| s == 200),
        "{}",
        log()
    );
    let after = tokio::task::block_in_place(|| raw(a, "GET", CREDS, &[]));
    assert_eq!(after, (200, "role-a".to_owned()), "{}", log());
    assert_eq!(
        tokio::task::block_in_place(|| own_key(&mut client_b, "role-b")),
        key_b
    );
    cluster.assert_upstream_never_asked_for_credentials();
}
