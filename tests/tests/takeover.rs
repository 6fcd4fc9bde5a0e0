//! An upgrade with a surge (`maxSurge: 1, maxUnavailable: 0`): the new agent starts beside
//! the old one on the same node, with the same pins, proxy address and metrics port; it
//! takes over once ready (one update of the kernel's proxy map), then the old one gets
//! SIGTERM, hands over and exits. Pods asking for credentials in a loop throughout see
//! **no** failed request: every attempt is answered with the pod's own role. One pod asks
//! as botocore does (a connection and a token per attempt), the other as SDKs that keep
//! both: its connection to the old agent is open when the old agent drains, and its token,
//! minted by the old agent, must be good at the new one.
//!
//! Checked with the same build (the programs re-used), with a build whose programs differ
//! (another object hash: replaced while the old agent serves), and in Kubernetes mode,
//! where the new agent takes over only once its pod store has synced: with the API server
//! down when it starts, the old agent keeps serving every pod for as long as it takes.
//!
//! The new agent's readiness is judged as the DaemonSet's probe judges it: by the file it
//! keeps (`--ready-file`, `interceptor ready`), since the metrics port is shared with the
//! old agent and an HTTP probe could reach the old one. Were the new agent ready before
//! taking over, the old one would be stopped first and the pods would see refusals.

use std::{collections::HashSet, net::IpAddr, path::PathBuf, time::Duration};

use interceptor_tests::{
    Node,
    agent::{Agent, free_port},
    clients::CredsLoop,
    cluster::{self, Peers},
    control_plane::ControlPlane,
    fake_imds::{FakeImds, NODE_ACCESS_KEY},
    moto::MotoServer,
    pins::Pins,
    require_root,
};

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_surge_takeover_fails_no_request() {
    if !require_root("a_surge_takeover_fails_no_request") {
        return;
    }
    standalone_takeover(Build::Same).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_surge_takeover_by_a_build_with_other_programs_fails_no_request() {
    if !require_root("a_surge_takeover_by_a_build_with_other_programs_fails_no_request") {
        return;
    }
    standalone_takeover(Build::OtherPrograms).await;
}

/// What the new agent finds pinned.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Build {
    /// Its own programs: re-used.
    Same,
    /// Programs of another build (same ABI, another object hash): replaced.
    OtherPrograms,
}

async fn standalone_takeover(build: Build) {
    let node = Node::new();
    let pods = [node.pod(), node.pod()];
    let file = cluster::bindings_file(
        &format!("takeover-{build:?}"),
        &[
            ("role-a", &pods[0], "role-a"),
            ("role-b", &pods[1], "role-b"),
        ],
    );
    let moto = MotoServer::shared_on(node.address);
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let args = cluster::standalone_args(&node, &file, &upstream, &moto.endpoint());
    let pins = Pins::new(&format!("takeover-{build:?}"));
    let surge = Surge::new(&format!("{build:?}"), &args);

    let mut old = Agent::run(&args, &pins.0, surge.metrics_port, &cluster::AGENT_ENV);
    old.wait_ready(WAIT);
    old.leave_programs();
    let loops = Loops::start(&pods);
    let old_keys = tokio::task::block_in_place(|| loops.served_by_the_first_agent());

    if build == Build::OtherPrograms {
        // What another build would have pinned: the same layout, another object.
        let mut config = interceptor::ebpf::maps::ConfigMap::open(&pins.0).unwrap();
        let mut pinned = config.get().unwrap();
        pinned.object_hash ^= 1;
        config.set(&pinned).unwrap();
    }
    let mut new = surge.start(&pins.0);
    tokio::task::block_in_place(|| surge.wait_ready(&new));
    let expected = match build {
        Build::Same => "Reused",
        Build::OtherPrograms => "Reloaded",
    };
    assert!(
        new.log_text().contains(expected),
        "the new agent's programs were not {expected}:\n{}",
        new.log_text()
    );
    tokio::task::block_in_place(|| {
        surge.stop_old_then_check(&mut old, &loops, &old_keys);
        // The loops end before the last agent, which detaches the programs.
        loops.stop();
        surge.stop_new(&mut new);
    });
    drop(new);
    assert!(
        upstream
            .requests()
            .iter()
            .all(|request| !request.contains("security-credentials")),
        "the agents' upstream was asked for credentials: {:?}",
        upstream.requests()
    );
    node.assert_no_node_imds_reached();
    let _ = std::fs::remove_file(&file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_agent_takes_over_only_once_its_pods_are_synced() {
    let test = "a_new_agent_takes_over_only_once_its_pods_are_synced";
    if !require_root(test) {
        return;
    }
    let Some(plane) = ControlPlane::private(test) else {
        return;
    };
    let scope = plane.scope("takeover");
    scope.add_node(&[]).await;
    let team = scope.namespace_name("team");
    scope.namespace(&team, &[]).await;
    let node = Node::new();
    let mut pods = Vec::new();
    for tag in ["a", "b"] {
        let role = format!("role-{tag}");
        let annotations = [("iam.amazonaws.com/role", role.as_str())];
        let pod = scope
            .running_pod(&node, &team, &format!("app-{tag}"), &annotations)
            .await;
        pods.push(pod);
    }
    let moto = MotoServer::shared_on(node.address);
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let setup = cluster::AgentBuilder::new(
        "takeover-kube",
        &node,
        Peers::new(&scope, &upstream, &moto.endpoint()),
    )
    .args(&["--base-role-arn", "arn:aws:iam::123456789012:role/"])
    .setup();
    let surge = Surge::new("kube", &setup.args);
    let mut old = Agent::run(
        &setup.args,
        &setup.pin_dir,
        surge.metrics_port,
        &cluster::AGENT_ENV,
    );
    old.wait_ready(WAIT);
    old.leave_programs();
    let loops = Loops::start(&pods);
    let old_keys = tokio::task::block_in_place(|| loops.served_by_the_first_agent());

    // The new agent starts while the API server is down: it attaches (re-using the
    // programs) but cannot sync its pod store, so it must not take over.
    plane.stop_apiserver();
    let mut new = surge.start(&setup.pin_dir);
    tokio::task::block_in_place(|| {
        wait_until("the new agent attached", || {
            new.log_text()
                .contains("programs attached")
                .then_some(())
                .ok_or_else(|| new.log_text())
        });
        // The pods go on being served by the old agent (its credentials) for as long as
        // each asks 20 more times.
        for ((tag, pod), old_keys) in loops.0.iter().zip(&old_keys) {
            let from = pod.lines().len();
            pod.wait_for(
                from,
                20,
                &format!("{tag}: served while the new agent cannot sync"),
                WAIT,
                |line| old_keys.contains(served_key(tag, line)),
            );
        }
        assert!(!surge.ready(), "ready without a synced pod store");
        assert!(
            !new.log_text().contains("the kernel steers connections"),
            "took over without a synced pod store:\n{}",
            new.log_text()
        );
    });

    plane.start_apiserver().expect("restart kube-apiserver");
    tokio::task::block_in_place(|| {
        surge.wait_ready(&new);
        surge.stop_old_then_check(&mut old, &loops, &old_keys);
        // The loops end before the last agent, which detaches the programs.
        loops.stop();
        surge.stop_new(&mut new);
    });
    drop(new);
    node.assert_no_node_imds_reached();
}

/// The new agent of a surge: the old agent's flags plus its ready file, the old agent's
/// metrics port.
struct Surge {
    args: Vec<String>,
    ready_file: PathBuf,
    metrics_port: u16,
}

impl Surge {
    fn new(name: &str, old_args: &[String]) -> Self {
        let ready_file = std::env::temp_dir().join(format!(
            "interceptor-takeover-{}-{name}.ready",
            std::process::id()
        ));
        let mut args = old_args.to_vec();
        args.extend(["--ready-file".to_owned(), ready_file.display().to_string()]);
        Self {
            args,
            ready_file,
            metrics_port: free_port(),
        }
    }

    /// Starts the new agent beside the old one: same pins, same metrics port.
    fn start(&self, pin_dir: &std::path::Path) -> Agent {
        let agent = Agent::run(&self.args, pin_dir, self.metrics_port, &cluster::AGENT_ENV);
        assert!(!self.ready(), "ready before it started");
        agent
    }

    /// The DaemonSet's readiness probe.
    fn ready(&self) -> bool {
        std::process::Command::new(interceptor_tests::agent::binary())
            .args(["ready", "--file"])
            .arg(&self.ready_file)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("interceptor ready")
            .success()
    }

    fn wait_ready(&self, new: &Agent) {
        wait_until("the new agent ready", || {
            self.ready().then_some(()).ok_or_else(|| new.log_text())
        });
        // Ready means taken over.
        assert!(
            new.log_text().contains("the kernel steers connections"),
            "ready before taking over:\n{}",
            new.log_text()
        );
    }

    /// What the rollout does once the new pod is ready: SIGTERM to the old one. Then the
    /// pods are served by the new agent, and no attempt ever failed.
    fn stop_old_then_check(&self, old: &mut Agent, loops: &Loops, old_keys: &[HashSet<String>]) {
        let marks: Vec<usize> = loops.0.iter().map(|(_, pod)| pod.lines().len()).collect();
        let status = old.terminate_status();
        assert!(
            status.success(),
            "the old agent did not exit cleanly: {status}\n{}",
            old.log_text()
        );
        assert!(
            old.log_text().contains("draining"),
            "the old agent did not drain:\n{}",
            old.log_text()
        );
        loops.served_by_the_new_agent(&marks, old_keys);
    }

    fn stop_new(&self, new: &mut Agent) {
        new.terminate();
        assert!(!self.ready(), "still ready after the drain");
    }
}

/// Pod a asks with a connection and a token per attempt, pod b keeps both.
struct Loops(Vec<(&'static str, CredsLoop)>);

impl Loops {
    fn start(pods: &[interceptor_tests::Pod]) -> Self {
        Self(vec![
            ("a", CredsLoop::start(&pods[0])),
            ("b", CredsLoop::start_keep_alive(&pods[1])),
        ])
    }

    /// Ends the loops; every attempt they made was served.
    fn stop(self) {
        for (tag, pod) in self.0 {
            for line in pod.stop() {
                served_key(tag, &line);
            }
        }
    }

    /// Waits until each pod was served 3 times; the keys it got so far.
    fn served_by_the_first_agent(&self) -> Vec<HashSet<String>> {
        self.0
            .iter()
            .map(|(tag, pod)| {
                let at = pod.wait_for(0, 3, &format!("{tag}: served"), WAIT, |line| {
                    served_key(tag, line);
                    true
                });
                pod.lines()[..at]
                    .iter()
                    .map(|line| served_key(tag, line).to_owned())
                    .collect()
            })
            .collect()
    }

    /// Waits until each pod was served 3 times after `marks` with keys the old agent
    /// never gave (the new agent's own); then checks that every attempt was served.
    fn served_by_the_new_agent(&self, marks: &[usize], old_keys: &[HashSet<String>]) {
        for ((tag, pod), (mark, old_keys)) in self.0.iter().zip(marks.iter().zip(old_keys)) {
            pod.wait_for(
                *mark,
                3,
                &format!("{tag}: served by the new agent"),
                WAIT,
                |line| !old_keys.contains(served_key(tag, line)),
            );
        }
        let mut attempts = 0;
        for (tag, pod) in &self.0 {
            let lines = pod.lines();
            for line in &lines {
                served_key(tag, line);
            }
            attempts += lines.len();
        }
        eprintln!("{attempts} attempts through the takeover, none failed");
    }
}

/// One pod's attempt: its own role, served (anything else fails the test).
fn served_key<'a>(tag: &str, line: &'a str) -> &'a str {
    let rest = line
        .strip_prefix("ok ")
        .unwrap_or_else(|| panic!("pod {tag}: a failed request during the takeover: {line}"));
    let (key, role) = rest.split_once(' ').unwrap_or((rest, ""));
    assert_ne!(
        key, NODE_ACCESS_KEY,
        "LEAK: the node's credentials reached {tag}"
    );
    assert_eq!(
        role,
        format!("role-{tag}"),
        "pod {tag} was served another role"
    );
    key
}

/// Polls `probe` every 50 ms until it gives `Ok`; panics with what it last saw after
/// [`WAIT`].
fn wait_until(what: &str, mut probe: impl FnMut() -> Result<(), String>) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match probe() {
            Ok(()) => return,
            Err(seen) if std::time::Instant::now() >= deadline => {
                panic!("timed out waiting for {what}; last seen:\n{seen}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}
