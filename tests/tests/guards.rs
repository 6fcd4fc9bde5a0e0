//! Kernel guards against bypasses (docs/security.md), on the real kernel; runs as root
//! (see `require_root`):
//! * the raw-packet backstop (`imds_egress`, cgroup_skb/egress): packets to the metadata
//!   addresses that no connect hook saw (raw sockets, UDP) never leave a pod's cgroup;
//! * colliding connection keys: a record is never replaced by another caller's.
//!
//! The backstop's world is the test's own: a "node" network namespace holding 169.254.169.254
//! and fd00:ec2::254 on its loopback, and a "pod" namespace joined to it by a veth
//! pair. A packet capture on the node's end of the pair records what arrives. Nothing is
//! added to the machine's own namespace.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    net::{SocketAddr, SocketAddrV4},
    process::{Child, Command, Stdio},
};

use interceptor::ebpf::{self, METADATA_IPV6};
use interceptor_tests::{
    Node,
    ask::{CREDS, assert_upstream_untouched, get},
    cluster::{AGENT_ENV, bindings_file, cgroup_bindings_file, standalone_args_at},
    fake_imds::FakeImds,
    moto::MotoServer,
    node::{Cgroup, Netns, in_cgroup},
    pins::Pins,
    probe, require_root,
};

const NODE4: &str = "10.251.0.1";
const POD4: &str = "10.251.0.2";
const NODE6: &str = "fd99:251::1";
const POD6: &str = "fd99:251::2";

/// Captures on `dev` (in the namespace it runs in) every frame arriving from the pod and
/// prints its IP destination, one a line, until both end markers (UDP to the node's own
/// addresses) have arrived. Prints `ready` once the capture is open.
const CAPTURE: &str = r#"
import socket, struct, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((sys.argv[1], 0))
print("ready", flush=True)
markers = {sys.argv[2], sys.argv[3]}
while markers:
    frame, addr = s.recvfrom(65535)
    if addr[2] == socket.PACKET_OUTGOING:
        continue
    kind = struct.unpack("!H", frame[12:14])[0]
    if kind == 0x0800:
        dst, proto = socket.inet_ntop(socket.AF_INET, frame[30:34]), frame[23]
    elif kind == 0x86DD:
        dst, proto = socket.inet_ntop(socket.AF_INET6, frame[38:54]), frame[20]
    else:
        continue
    if proto == 58:
        continue  # neighbour discovery
    print(dst, flush=True)
    if proto == 17 and dst in markers:
        markers.discard(dst)
"#;

/// Sends, from the pod, a hand-made TCP SYN over a raw socket and a UDP datagram to each
/// metadata address, then one UDP end marker to each of the node's addresses. Prints what
/// each send returned.
const SEND: &str = r#"
import socket, struct, sys
meta4, meta6, node4, node6 = sys.argv[1:5]
syn = struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
for family, dst in ((socket.AF_INET, meta4), (socket.AF_INET6, meta6)):
    for kind, proto, payload, port in ((socket.SOCK_RAW, socket.IPPROTO_TCP, syn, 0), (socket.SOCK_DGRAM, 0, b"x", 80)):
        try:
            socket.socket(family, kind, proto).sendto(payload, (dst, port))
            print("sent", dst, kind, flush=True)
        except OSError as error:
            print("refused", dst, kind, error.errno, flush=True)
for family, dst in ((socket.AF_INET, node4), (socket.AF_INET6, node6)):
    socket.socket(family, socket.SOCK_DGRAM).sendto(b"end", (dst, 9))
"#;

/// A node namespace and a pod namespace joined by a veth pair (both ends are deleted with
/// the namespaces).
struct World {
    pod: Netns,
    node: Netns,
}

impl World {
    fn new() -> Self {
        let tag = std::process::id() % 100_000;
        let node = Netns::create(format!("icbn{tag}"));
        let pod = Netns::create(format!("icbp{tag}"));
        node.exec(&[
            "ip", "link", "add", "n0", "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
        ]);
        for (netns, dev, v4, v6) in [(&node, "n0", NODE4, NODE6), (&pod, "eth0", POD4, POD6)] {
            netns.exec(&["ip", "addr", "add", &format!("{v4}/24"), "dev", dev]);
            netns.exec(&[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ]);
            netns.exec(&["ip", "link", "set", dev, "up"]);
            netns.exec(&["ip", "link", "set", "lo", "up"]);
        }
        // The node's loopback holds the metadata addresses (no dummy driver here).
        node.exec(&["ip", "addr", "add", "169.254.169.254/32", "dev", "lo"]);
        node.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            "fd00:ec2::254/128",
            "dev",
            "lo",
            "nodad",
        ]);
        pod.exec(&["ip", "route", "add", "169.254.169.254/32", "via", NODE4]);
        pod.exec(&[
            "ip",
            "-6",
            "route",
            "add",
            "fd00:ec2::254/128",
            "via",
            NODE6,
        ]);
        Self { pod, node }
    }
}

/// A child process killed (by PID) when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends the probe packets from `cgroup` in the pod and returns (what the sender printed,
/// the destinations that arrived at the node).
fn send_and_capture(world: &World, cgroup: &Cgroup) -> (String, Vec<String>) {
    let mut capture = Reaped(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &world.node.name,
                "python3",
                "-c",
                CAPTURE,
                "n0",
            ])
            .args([NODE4, NODE6])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the capture"),
    );
    let mut lines = BufReader::new(capture.0.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    let meta6 = METADATA_IPV6.to_string();
    let sent = in_cgroup(
        cgroup,
        Some(&world.pod),
        "python3",
        &["-c", SEND, "169.254.169.254", &meta6, NODE4, NODE6],
    )
    .output()
    .expect("run the sender");
    assert!(
        sent.status.success(),
        "sender: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    // The capture ends once both markers arrived: every earlier packet is in by then.
    let arrived: Vec<String> = lines.map(|line| line.unwrap()).collect();
    (String::from_utf8_lossy(&sent.stdout).into_owned(), arrived)
}

#[test]
fn raw_packets_to_the_metadata_addresses_never_leave_a_pod() {
    if !require_root("raw_packets_to_the_metadata_addresses_never_leave_a_pod") {
        return;
    }
    let node = Node::new();
    let pod = node.pod_cgroups();
    let world = World::new();
    let pins = Pins::new("backstop");
    let metadata = |arrived: &[String]| {
        arrived
            .iter()
            .filter(|dst| *dst == "169.254.169.254" || *dst == "fd00:ec2::254")
            .count()
    };

    // Without programs, the pod's hand-made packets reach the node's metadata service.
    let (sent, arrived) = send_and_capture(&world, &pod.container);
    assert_eq!(
        metadata(&arrived),
        4,
        "without the backstop a raw SYN and a datagram per family arrive (sender: {sent}); \
         arrived: {arrived:?}"
    );

    let datapath =
        ebpf::Datapath::open(&pins.options(&node, SocketAddrV4::new(NODE4.parse().unwrap(), 8181)))
            .expect("attach");
    let (sent, arrived) = send_and_capture(&world, &pod.container);
    assert_eq!(
        metadata(&arrived),
        0,
        "with the backstop nothing reaches the metadata addresses (sender: {sent}); \
         arrived: {arrived:?}"
    );
    // Unrelated traffic still flows: the markers arrived, or the capture would not end.
    assert!(arrived.iter().any(|dst| dst == NODE4) && arrived.iter().any(|dst| dst == NODE6));
    let counters: HashMap<_, _> = datapath.counters().into_iter().collect();
    assert_eq!(counters["backstop_dropped"], 4, "{counters:?}");
    let status = ebpf::status(&pins.0).expect("status").to_string();
    assert!(
        status.contains("backstop_dropped=4"),
        "interceptor status shows the drops:\n{status}"
    );
}

/// Connects from `cgroup` in `netns`, bound to `CLIENT:40000`, to the metadata address
/// (redirected to `PROXY:8181`, where nothing listens: refused after sock_ops ran).
fn connect_bound(cgroup: &Cgroup, netns: &Netns) -> String {
    const CONNECT: &str = r#"
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.252.0.2", 40000))
try:
    s.connect(("169.254.169.254", 80))
    print("connected")
except OSError as error:
    print("errno", error.errno)
"#;
    let output = in_cgroup(cgroup, Some(netns), "python3", &["-c", CONNECT])
        .output()
        .expect("run the client");
    assert!(
        output.status.success(),
        "client: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[test]
fn a_colliding_record_is_deleted_not_substituted() {
    if !require_root("a_colliding_record_is_deleted_not_substituted") {
        return;
    }
    let node = Node::new();
    let (pod_a, pod_b) = (node.pod_cgroups(), node.pod_cgroups());
    let tag = std::process::id() % 100_000;
    // Two pods whose namespaces hold the same addresses (as two clusters' overlapping pod
    // ranges, or a pod that copies another's address, can): the client's and the proxy's.
    let (netns_a, netns_b) = (
        Netns::create(format!("icca{tag}")),
        Netns::create(format!("iccb{tag}")),
    );
    for netns in [&netns_a, &netns_b] {
        for address in ["10.252.0.1/32", "10.252.0.2/32"] {
            netns.exec(&["ip", "addr", "add", address, "dev", "lo"]);
        }
        netns.exec(&["ip", "link", "set", "lo", "up"]);
    }
    let pins = Pins::new("collision");
    let proxy = SocketAddrV4::new("10.252.0.1".parse().unwrap(), 8181);
    let datapath = ebpf::Datapath::open(&pins.options(&node, proxy)).expect("attach");
    let attribution = datapath.attribution();
    let (peer, local) = (
        "10.252.0.2:40000".parse::<SocketAddr>().unwrap(),
        SocketAddr::V4(proxy),
    );

    // One connect alone is recorded under these addresses.
    assert_eq!(connect_bound(&pod_a.container, &netns_a), "errno 111");
    let alone = attribution.take(peer, local).expect("lookup");
    assert_eq!(
        alone.map(|record| record.cgroup_id),
        Some(pod_a.container.id()),
        "a single connect is recorded under the key"
    );

    // Pod a's connection is pending (not accepted); pod b's connect has the same key.
    assert_eq!(connect_bound(&pod_a.container, &netns_a), "errno 111");
    assert_eq!(connect_bound(&pod_b.container, &netns_b), "errno 111");
    let after = attribution.take(peer, local).expect("lookup");
    assert_eq!(
        after.map(|record| record.cgroup_id),
        None,
        "pod a's pending record must be deleted, not replaced by pod b's (a = {}, b = {})",
        pod_a.container.id(),
        pod_b.container.id()
    );
    let counters: HashMap<_, _> = datapath.counters().into_iter().collect();
    assert_eq!(counters["collided"], 1, "{counters:?}");
}

/// `interceptor attach` run from `cgroup` under `unshare -C` (a private cgroup namespace,
/// as in every containerd or CRI-O container on cgroup v2, where `/proc/self/cgroup`
/// reads `0::/`), then the exempt cgroups the kernel holds.
#[test]
fn the_agent_exempts_exactly_its_own_cgroup_inside_a_cgroup_namespace() {
    if !require_root("the_agent_exempts_exactly_its_own_cgroup_inside_a_cgroup_namespace") {
        return;
    }
    let node = Node::new();
    let own = node.outside_cgroup("system.slice/interceptor-attach.service");
    let pins = Pins::new("cgroupns");
    let binary = interceptor_tests::agent::binary().display().to_string();
    let (pin_dir, cgroup_root, host_ip) = (
        pins.0.display().to_string(),
        node.kubepods.display().to_string(),
        node.address.to_string(),
    );
    let output = in_cgroup(
        &own,
        None,
        "unshare",
        &[
            "-C",
            &binary,
            "attach",
            "--bpf-pin-dir",
            &pin_dir,
            "--cgroup-root",
            &cgroup_root,
            "--host-ip",
            &host_ip,
        ],
    )
    .output()
    .expect("run interceptor attach");
    assert!(
        output.status.success(),
        "attach: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let status = ebpf::status(&pins.0).expect("status");
    assert_eq!(
        status.exempt_cgroups,
        vec![own.id()],
        "exactly the attaching process's own cgroup is exempt (the cgroup2 root is {})",
        interceptor::cgroupfs::cgroup_id(&interceptor::cgroupfs::cgroup2_mount().unwrap()).unwrap()
    );
}

/// An exemption pinned by an earlier agent (here: made directly in the map, as an agent
/// run with `--node-identity-namespace kube-system` made it for a kube-system pod) is gone
/// once an agent whose configuration does not make it is ready.
#[test]
fn exemptions_of_an_earlier_configuration_are_gone_when_the_agent_is_ready() {
    if !require_root("exemptions_of_an_earlier_configuration_are_gone_when_the_agent_is_ready") {
        return;
    }
    let node = Node::new();
    let pod = node.pod_cgroups();
    let pins = Pins::new("reconcile");
    {
        let earlier =
            ebpf::Datapath::open(&pins.options(&node, SocketAddrV4::new(node.address, 8181)))
                .expect("attach");
        earlier.exempt().insert(pod.container.id()).expect("exempt");
    }
    assert!(
        ebpf::status(&pins.0)
            .unwrap()
            .exempt_cgroups
            .contains(&pod.container.id())
    );

    let bindings = cgroup_bindings_file("reconcile", &[("a", &pod.container.path, "role-a")]);
    let args: Vec<String> = [
        "--bindings",
        &bindings.display().to_string(),
        "--host-ip",
        &node.address.to_string(),
        "--app-port",
        &interceptor_tests::agent::free_port().to_string(),
        "--cgroup-root",
        &node.kubepods.display().to_string(),
        "--base-role-arn",
        "arn:aws:iam::123456789012:role/",
    ]
    .iter()
    .map(|arg| (*arg).to_owned())
    .collect();
    let mut agent = interceptor_tests::agent::Agent::run(
        &args,
        &pins.0,
        interceptor_tests::agent::free_port(),
        &AGENT_ENV,
    );
    agent.wait_ready(std::time::Duration::from_secs(30));
    let exempt = ebpf::status(&pins.0).unwrap().exempt_cgroups;
    let _ = std::fs::remove_file(&bindings);
    assert!(
        !exempt.contains(&pod.container.id()),
        "the pod's exemption outlived the configuration that made it: {exempt:?}\n{}",
        agent.log_text()
    );
}

/// The node's boot path: `interceptor attach` before the kubelet, no agent yet. Pods'
/// metadata connects are redirected to the proxy port where nothing listens: refused,
/// and nothing reaches the node's metadata service. Then the agent starts on the same
/// pins and port and the same pods are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attached_at_boot_pods_are_refused_until_the_agent_serves_them() {
    if !require_root("attached_at_boot_pods_are_refused_until_the_agent_serves_them") {
        return;
    }
    let node = Node::new();
    let pod = node.pod();
    let pins = Pins::new("boot");
    let upstream = FakeImds::start(std::net::IpAddr::from([127, 0, 0, 1])).await;
    let app_port = interceptor_tests::agent::free_port();
    let attach = Command::new(interceptor_tests::agent::binary())
        .args(["attach", "--bpf-pin-dir", &pins.0.display().to_string()])
        .args(["--cgroup-root", &node.kubepods.display().to_string()])
        .args([
            "--host-ip",
            &node.address.to_string(),
            "--app-port",
            &app_port.to_string(),
        ])
        .args(["--metadata-addr", &upstream.addr().to_string()])
        .output()
        .expect("run interceptor attach");
    assert!(
        attach.status.success(),
        "attach: {}",
        String::from_utf8_lossy(&attach.stderr)
    );

    let pod = std::sync::Arc::new(pod);
    let probing = pod.clone();
    let refused = tokio::task::spawn_blocking(move || {
        probe::run(probing.command(probe::binary(), &["169.254.169.254:80", "5", "boot", "4"]))
    })
    .await
    .unwrap();
    assert_eq!(
        (refused.connected, refused.failed),
        (0, 5),
        "with no agent, every metadata connect is refused: {refused:?}"
    );

    let moto = MotoServer::shared_on(node.address);
    let bindings = bindings_file("boot", &[("a", &*pod, "role-a")]);
    // The agent finds the programs where `attach` put them: the same root and port.
    let args = standalone_args_at(
        &node.kubepods,
        app_port,
        &node,
        &bindings,
        &upstream,
        &moto.endpoint(),
    );
    let admin_port = interceptor_tests::agent::free_port();
    let mut agent = interceptor_tests::agent::Agent::run(&args, &pins.0, admin_port, &AGENT_ENV);
    agent.wait_ready(std::time::Duration::from_secs(30));
    let _ = std::fs::remove_file(&bindings);

    // The admin port closes a connection that sends no request head (header-read
    // timeout, 5 s) instead of holding it: read sees the end of the stream. Without the
    // timeout the read would block until its own 30 s limit and fail the test.
    let silent = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", admin_port)).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let mut buffer = [0u8; 512];
        stream.read(&mut buffer).map_err(|error| error.kind())
    })
    .await
    .unwrap();
    assert!(
        silent.is_ok(),
        "a silent admin connection was held open: {silent:?}"
    );
    assert!(
        agent.log_text().contains("Reused"),
        "the agent takes over the programs attached at boot:\n{}",
        agent.log_text()
    );
    let served = get(&pod, CREDS);
    assert_eq!(served, (200, "role-a".to_owned()), "{}", agent.log_text());
    assert_upstream_untouched(&upstream);
}

/// Pinned programs of another build (same ABI version, another object hash, as a
/// kernel-side fix that did not bump the ABI leaves them) are replaced, not re-used.
#[test]
fn programs_of_another_build_are_replaced_not_reused() {
    if !require_root("programs_of_another_build_are_replaced_not_reused") {
        return;
    }
    let node = Node::new();
    let pins = Pins::new("otherbuild");
    let options = pins.options(&node, SocketAddrV4::new(node.address, 8181));
    let first = ebpf::Datapath::open(&options).expect("attach");
    assert_eq!(first.outcome(), ebpf::Outcome::Loaded);
    drop(first);
    // What another build would have pinned: the same layout, another object.
    let mut config = ebpf::maps::ConfigMap::open(&pins.0).expect("config map");
    let mut pinned = config.get().unwrap();
    pinned.object_hash ^= 1;
    config.set(&pinned).unwrap();
    drop(config);

    let second = ebpf::Datapath::open(&options).expect("attach again");
    assert_eq!(second.outcome(), ebpf::Outcome::Reloaded);
    assert_eq!(
        ebpf::maps::ConfigMap::open(&pins.0)
            .and_then(|config| config.get())
            .unwrap()
            .object_hash,
        ebpf::object_hash()
    );
    drop(second);
    let third = ebpf::Datapath::open(&options).expect("attach a third time");
    assert_eq!(
        third.outcome(),
        ebpf::Outcome::Reused,
        "this build's own programs are re-used"
    );
}
