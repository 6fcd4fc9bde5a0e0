//! The kernel half on the real kernel: redirect, attribution, exemptions, IPv6 refusal,
//! pins that outlive the loader, and detach. Runs as root (see `require_root`).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, SocketAddrV4},
    process::Command,
    sync::{Arc, Mutex},
};

use interceptor::ebpf::{self, Attributed, Attribution, Redirect};
use interceptor_tests::{
    Node, Pod, cmd,
    node::in_cgroup,
    pins::{Pins, redirect_to},
    probe, require_root,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpListener,
};

/// What the test proxy saw: per tag, the attribution of each connection.
type Seen = Arc<Mutex<HashMap<String, Vec<Option<Attributed>>>>>;

fn probe_metadata(pod: &Pod, count: usize, tag: &str) -> probe::ProbeReport {
    probe::run(pod.command(
        probe::binary(),
        &["169.254.169.254:80", &count.to_string(), tag, "4"],
    ))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pods_are_attributed_to_their_own_cgroups() {
    if !require_root("concurrent_pods_are_attributed_to_their_own_cgroups") {
        return;
    }
    const PER_POD: usize = 300;
    let node = Node::new();
    let (pod_a, pod_b) = (Arc::new(node.pod()), Arc::new(node.pod()));
    let pins = Pins::new("attribution");

    // The listener must exist before the programs point at it.
    let placeholder = TcpListener::bind((node.address, 0)).await.unwrap();
    let SocketAddr::V4(proxy) = placeholder.local_addr().unwrap() else {
        unreachable!()
    };
    drop(placeholder);
    let datapath = ebpf::Datapath::open(&pins.options(&node, proxy)).expect("attach");
    assert_eq!(datapath.outcome(), ebpf::Outcome::Loaded);
    let listener = TcpListener::bind(proxy)
        .await
        .expect("re-bind the proxy port");
    datapath
        .steer_to(&listener)
        .expect("steer to the test proxy");
    let seen: Seen = Arc::default();
    spawn_accept_loop(listener, datapath.attribution(), seen.clone());

    let tree = cmd::run(
        "bpftool",
        &["cgroup", "tree", &node.cgroup_top().display().to_string()],
    );
    for program in ["imds_connect4", "imds_connect6", "imds_sockops"] {
        assert!(
            tree.contains(program),
            "bpftool cgroup tree shows no {program}:\n{tree}"
        );
    }

    let (a, b) = (pod_a.clone(), pod_b.clone());
    let run_a = tokio::task::spawn_blocking(move || probe_metadata(&a, PER_POD, "a"));
    let run_b = tokio::task::spawn_blocking(move || probe_metadata(&b, PER_POD, "b"));
    let (report_a, report_b) = (run_a.await.unwrap(), run_b.await.unwrap());
    for report in [&report_a, &report_b] {
        assert_eq!(
            (report.connected, report.failed, report.replies),
            (PER_POD, 0, PER_POD),
            "every connect reaches the proxy and is answered: {report:?}"
        );
    }

    let seen = seen.lock().unwrap();
    for (tag, pod) in [("a", &pod_a), ("b", &pod_b)] {
        let attributions = &seen[tag];
        assert_eq!(attributions.len(), PER_POD);
        let wrong: Vec<_> = attributions
            .iter()
            .filter(|a| a.map(|a| a.cgroup_id) != Some(pod.container.id()))
            .collect();
        assert!(
            wrong.is_empty(),
            "pod {tag} (cgroup {}): {} of {PER_POD} connections misattributed, e.g. {:?}",
            pod.container.id(),
            wrong.len(),
            wrong.first()
        );
        let original = attributions[0].unwrap().original_destination;
        assert_eq!(
            original,
            "169.254.169.254:80".parse::<SocketAddr>().unwrap()
        );
        assert!(attributions[0].unwrap().pid > 1);
    }
    let counters: HashMap<_, _> = datapath.counters().into_iter().collect();
    assert!(counters["redirected"] >= 2 * PER_POD as u64, "{counters:?}");
    assert!(counters["recorded"] >= 2 * PER_POD as u64, "{counters:?}");
    // Each record was consumed exactly once.
    let status = ebpf::status(&pins.0).unwrap();
    assert_eq!(status.conn_entries, Some(0), "{status}");
    // The loading process's own cgroup is exempt, so the agent never redirects itself.
    let own = interceptor::cgroupfs::own_cgroup_dir().unwrap().unwrap();
    assert!(
        status
            .exempt_cgroups
            .contains(&interceptor::cgroupfs::cgroup_id(&own).unwrap())
    );
}

/// A stand-in for the agent's accept loop: attributes each connection from the kernel's
/// record, reads the client's tag, answers one line.
fn spawn_accept_loop(listener: TcpListener, attribution: Arc<Attribution>, seen: Seen) {
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                return;
            };
            let local = stream.local_addr().unwrap();
            let attributed = attribution.take(peer, local).expect("map lookup");
            let seen = seen.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut tag = String::new();
                let _ = BufReader::new(read).read_line(&mut tag).await;
                // Recorded before the reply: a client that has its reply may count on it.
                seen.lock()
                    .unwrap()
                    .entry(tag.trim().to_owned())
                    .or_default()
                    .push(attributed);
                let _ = write.write_all(b"ok\n").await;
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_and_exempt_cgroups_are_left_alone_and_ipv6_is_refused() {
    if !require_root("outside_and_exempt_cgroups_are_left_alone_and_ipv6_is_refused") {
        return;
    }
    let node = Node::new();
    let pod = Arc::new(node.pod());
    let exempt_pod = Arc::new(node.pod());
    let pins = Pins::new("exempt");
    let placeholder = TcpListener::bind((node.address, 0)).await.unwrap();
    let SocketAddr::V4(proxy) = placeholder.local_addr().unwrap() else {
        unreachable!()
    };
    drop(placeholder);
    let datapath = ebpf::Datapath::open(&pins.options(&node, proxy)).expect("attach");
    datapath.exempt().insert(exempt_pod.container.id()).unwrap();
    let (_, seen) = test_proxy_on(proxy, &pins, datapath.attribution()).await;

    // A pod in the attached tree is redirected.
    let p = pod.clone();
    let report = blocking(move || probe_metadata(&p, 5, "pod")).await;
    assert_eq!((report.connected, report.failed), (5, 0), "{report:?}");

    // An exempt pod is not: its connect goes to 169.254.169.254 for real, which the pod
    // reaches through its route to the node, as on a real node.
    node.allow_node_imds();
    let e = exempt_pod.clone();
    let report = blocking(move || probe_metadata(&e, 3, "exempt")).await;
    assert_eq!(
        report.connected, 3,
        "an exempt pod reaches the node's own service: {report:?}"
    );

    // A process outside the attached cgroup, in the same netns, is not redirected.
    let outside = node.outside_cgroup("system.slice/other.service");
    let command = in_cgroup(
        &outside,
        Some(&pod.netns),
        probe::binary(),
        &["169.254.169.254:80", "3", "outside"],
    );
    let report = blocking(move || probe::run(command)).await;
    assert_eq!(
        report.connected, 3,
        "a process outside the tree reaches the node's own service: {report:?}"
    );
    // Those six, and nothing else, reached the node's service.
    let mut reached: Vec<IpAddr> = node
        .node_imds_seen()
        .iter()
        .filter(|seen| seen.request.is_none())
        .map(|seen| seen.peer.ip())
        .collect();
    reached.sort();
    let mut expected = vec![IpAddr::from(exempt_pod.ip); 3];
    expected.extend([IpAddr::from(pod.ip); 3]);
    expected.sort();
    assert_eq!(reached, expected, "{:#?}", node.node_imds_seen());

    // IPv6 metadata without a configured IPv6 proxy: refused by the program (EPERM).
    let p = pod.clone();
    let report = blocking(move || {
        probe::run(p.command(probe::binary(), &["[fd00:ec2::254]:80", "2", "v6"]))
    })
    .await;
    assert_eq!(report.connected, 0, "{report:?}");
    assert!(
        report.first_error.contains("errno 1)"),
        "EPERM expected: {report:?}"
    );

    // A dual-stack socket dialling the IPv4-mapped metadata address is redirected too.
    let p = pod.clone();
    let report = blocking(move || {
        probe::run(p.command(
            probe::binary(),
            &["[::ffff:169.254.169.254]:80", "3", "mapped"],
        ))
    })
    .await;
    assert_eq!((report.connected, report.failed), (3, 0), "{report:?}");

    let seen = seen.lock().unwrap();
    assert_eq!(seen.get("pod").map(Vec::len), Some(5));
    assert!(
        seen["pod"]
            .iter()
            .all(|a| a.map(|a| a.cgroup_id) == Some(pod.container.id()))
    );
    assert!(
        seen["mapped"]
            .iter()
            .all(|a| a.map(|a| a.cgroup_id) == Some(pod.container.id()))
    );
    assert!(
        !seen.contains_key("exempt") && !seen.contains_key("outside") && !seen.contains_key("v6")
    );
    let counters: HashMap<_, _> = datapath.counters().into_iter().collect();
    assert!(
        counters["exempt"] >= 3 && counters["refused"] >= 2,
        "{counters:?}"
    );
}

/// A test proxy on `proxy`, put in the kernel's proxy map under `pins` (the steering
/// refuses connections to the proxy address that no socket there would take).
async fn test_proxy_on(
    proxy: SocketAddrV4,
    pins: &Pins,
    attribution: Arc<Attribution>,
) -> (SocketAddrV4, Seen) {
    let listener = TcpListener::bind(proxy).await.expect("bind the proxy port");
    ebpf::ProxySockets::open(&pins.0)
        .and_then(|map| map.insert(&listener))
        .expect("steer to the test proxy");
    let seen: Seen = Arc::default();
    spawn_accept_loop(listener, attribution, seen.clone());
    (proxy, seen)
}

fn agent_cmd(args: &[&str]) -> std::process::Output {
    Command::new(interceptor_tests::agent::binary())
        .args(args)
        .output()
        .expect("run interceptor")
}

/// Every `# bpftool ...` command of docs/ebpf.md's console blocks, run with the test's
/// cgroup and pin directory in place of the documented ones: (command, stdout). Panics if
/// one fails or the doc has none.
fn documented_bpftool(cgroup: &str, pin_dir: &str) -> Vec<(String, String)> {
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/ebpf.md"),
    )
    .expect("docs/ebpf.md");
    let commands: Vec<String> = doc
        .lines()
        .filter_map(|line| line.strip_prefix("# bpftool "))
        .map(|rest| rest.split(" # ").next().unwrap_or(rest).trim().to_owned())
        .map(|rest| {
            rest.replace("/sys/fs/cgroup/kubepods.slice", cgroup)
                .replace("/sys/fs/bpf/interceptor", pin_dir)
        })
        .collect();
    assert!(
        commands.len() >= 6,
        "bpftool commands in docs/ebpf.md: {commands:?}"
    );
    commands
        .into_iter()
        .map(|rest| {
            let args: Vec<&str> = rest.split_whitespace().collect();
            let out = cmd::run("bpftool", &args);
            (format!("bpftool {rest}"), out)
        })
        .collect()
}

/// Asserts that none of `ids` is loaded any more. Removing a link's pin releases the link
/// from a kernel workqueue (`bpf_link_put` defers), so its program goes shortly after the
/// unlink, not during it: each is waited for, within a bound (a busy machine once showed
/// one still loaded right after `detach`).
fn assert_unloaded(ids: &[u32], when: &str) {
    for id in ids {
        let loaded = || {
            cmd::output("bpftool", &["prog", "show", "id", &id.to_string()])
                .status
                .success()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while loaded() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(!loaded(), "program {id} still loaded 10 s {when}");
    }
}

fn program_ids(pins: &Pins) -> Vec<u32> {
    let out = agent_cmd(&[
        "status",
        "--json",
        "--bpf-pin-dir",
        &pins.0.display().to_string(),
    ]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    status["programs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["program_id"].as_u64().expect("attached") as u32)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_outlive_the_loader_are_reused_reloaded_and_detached() {
    if !require_root("pins_outlive_the_loader_are_reused_reloaded_and_detached") {
        return;
    }
    let node = Node::new();
    let pod = Arc::new(node.pod());
    let pins = Pins::new("pins");
    let placeholder = TcpListener::bind((node.address, 0)).await.unwrap();
    let SocketAddr::V4(proxy) = placeholder.local_addr().unwrap() else {
        unreachable!()
    };
    drop(placeholder);
    let pin_dir = pins.0.display().to_string();
    let cgroup = node.kubepods.display().to_string();
    let (host_ip, port) = (proxy.ip().to_string(), proxy.port().to_string());
    let attach = |extra: &[&str]| {
        let mut args = vec![
            "attach",
            "--bpf-pin-dir",
            &pin_dir,
            "--cgroup-root",
            &cgroup,
        ];
        args.extend_from_slice(&["--host-ip", &host_ip, "--app-port", &port]);
        args.extend_from_slice(extra);
        let out = agent_cmd(&args);
        assert!(
            out.status.success(),
            "attach {extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    // The loader process exits; the redirect stays (pinned links).
    let log = attach(&[]);
    assert!(log.contains("Loaded"), "{log}");
    let first = program_ids(&pins);
    let attribution = Arc::new(Attribution::open(&pins.0).expect("open the pinned map"));
    let (_, seen) = test_proxy_on(proxy, &pins, attribution).await;
    let p = pod.clone();
    let report = blocking(move || probe_metadata(&p, 10, "after-exit")).await;
    assert_eq!((report.connected, report.replies), (10, 10), "{report:?}");

    // A restarted loader re-uses what is pinned: same programs.
    let log = attach(&[]);
    assert!(log.contains("Reused"), "{log}");
    assert_eq!(program_ids(&pins), first);

    // --reload swaps in new programs; the redirect keeps working.
    let log = attach(&["--reload"]);
    assert!(log.contains("Reloaded"), "{log}");
    let second = program_ids(&pins);
    assert!(
        second.iter().all(|id| !first.contains(id)),
        "{first:?} -> {second:?}"
    );
    assert_unloaded(&first, "after --reload");
    // docs/ebpf.md: its bpftool commands work on what is attached, and `status` says
    // attached (exit 0) in its text form.
    let second_ids: Vec<String> = second.iter().map(u32::to_string).collect();
    for (command, out) in documented_bpftool(&cgroup, &pin_dir) {
        if command.contains("cgroup tree") {
            for name in ["imds_connect4", "imds_connect6", "imds_sockops"] {
                assert!(
                    out.contains(name),
                    "`{command}` does not list {name}:\n{out}"
                );
            }
        }
        if command.contains("prog show name") {
            assert!(
                second_ids
                    .iter()
                    .any(|id| out.lines().any(|line| line.starts_with(&format!("{id}: ")))),
                "`{command}` shows none of {second_ids:?}:\n{out}"
            );
        }
    }
    let out = agent_cmd(&["status", "--bpf-pin-dir", &pin_dir]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "status while attached: {text}");
    assert!(text.starts_with(&format!("pins: {pin_dir}\n")), "{text}");
    for name in ["imds_connect4", "imds_connect6", "imds_sockops"] {
        assert!(
            text.lines()
                .any(|line| line.trim_start().starts_with(name)
                    && line.contains(" attached (link id ")),
            "status does not show {name} attached:\n{text}"
        );
    }
    let p = pod.clone();
    let report = blocking(move || probe_metadata(&p, 10, "after-reload")).await;
    assert_eq!((report.connected, report.replies), (10, 10), "{report:?}");
    {
        let seen = seen.lock().unwrap();
        for tag in ["after-exit", "after-reload"] {
            assert!(
                seen[tag]
                    .iter()
                    .all(|a| a.map(|a| a.cgroup_id) == Some(pod.container.id())),
                "{tag}: {:?}",
                seen[tag]
            );
        }
    }

    // A reload to another cgroup without --reload is refused with the reason.
    let other_cgroup = node.outside_cgroup("other.slice");
    let other = other_cgroup.path.display().to_string();
    let out = agent_cmd(&[
        "attach",
        "--bpf-pin-dir",
        &pin_dir,
        "--cgroup-root",
        &other,
        "--host-ip",
        &host_ip,
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("attached to cgroup id") && stderr.contains("--reload"),
        "{stderr}"
    );

    // detach: nothing of ours is loaded, and pods are no longer redirected.
    let out = agent_cmd(&["detach", "--bpf-pin-dir", &pin_dir]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!pins.0.exists());
    // The test's own map handle keeps the map (not the programs) alive; drop it first.
    drop(seen);
    assert_unloaded(&second, "after detach");
    // Detached, the pod's connects go to the node's own service: exactly these two.
    node.allow_node_imds();
    let p = pod.clone();
    let report = blocking(move || probe_metadata(&p, 2, "after-detach")).await;
    assert_eq!(report.connected, 2, "{report:?}");
    let reached: Vec<IpAddr> = node
        .node_imds_seen()
        .iter()
        .filter(|seen| seen.request.is_none())
        .map(|seen| seen.peer.ip())
        .collect();
    assert_eq!(reached, vec![IpAddr::from(pod.ip); 2]);
    // docs/ebpf.md: `status` exits 3 when nothing is attached.
    let out = agent_cmd(&["status", "--bpf-pin-dir", &pin_dir]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "status once detached: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("not attached: "),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_metadata_is_redirected_and_attributed_when_configured() {
    if !require_root("ipv6_metadata_is_redirected_and_attributed_when_configured") {
        return;
    }
    let node = Node::new();
    let pod = Arc::new(node.pod());
    let pins = Pins::new("ipv6");
    let listener4 = TcpListener::bind((node.address, 0)).await.unwrap();
    let listener6 = TcpListener::bind((node.address6, 0))
        .await
        .expect("bind the IPv6 proxy");
    let (SocketAddr::V4(proxy4), SocketAddr::V6(proxy6)) = (
        listener4.local_addr().unwrap(),
        listener6.local_addr().unwrap(),
    ) else {
        unreachable!()
    };
    let datapath = ebpf::Datapath::open(&ebpf::Options {
        redirect: Redirect {
            proxy6: Some(proxy6),
            ..redirect_to(proxy4)
        },
        ..pins.options(&node, proxy4)
    })
    .expect("attach");
    datapath
        .steer_to(&listener4)
        .expect("steer to the IPv4 proxy");
    datapath
        .steer_to(&listener6)
        .expect("steer to the IPv6 proxy");
    let seen: Seen = Arc::default();
    spawn_accept_loop(listener6, datapath.attribution(), seen.clone());
    spawn_accept_loop(listener4, datapath.attribution(), seen.clone());

    let p = pod.clone();
    let report = blocking(move || {
        probe::run(p.command(probe::binary(), &["[fd00:ec2::254]:80", "20", "v6", "4"]))
    })
    .await;
    assert_eq!((report.connected, report.replies), (20, 20), "{report:?}");
    let seen = seen.lock().unwrap();
    let records = &seen["v6"];
    assert_eq!(records.len(), 20);
    for record in records {
        let record = record.expect("attributed");
        assert_eq!(record.cgroup_id, pod.container.id());
        assert_eq!(
            record.original_destination,
            "[fd00:ec2::254]:80".parse::<SocketAddr>().unwrap()
        );
    }
}
