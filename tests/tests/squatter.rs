//! A squatter on the proxy port (docs/security.md): a process of the node that binds
//! `HOST_IP:APP_PORT` while the agent is down, or beside it, must receive no pod's
//! connection. The kernel steers connections to the proxy address to the agent's own
//! socket (`imds_steer`, sk_lookup, and the `imds_proxy` SOCKMAP) and refuses them when
//! that socket is not there. Runs as root (see `require_root`), in the test process's own
//! network namespace (the node's, `interceptor_tests::world`), where the programs attach.

use std::{
    io::{BufRead, BufReader, Read},
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use interceptor::ebpf;
use interceptor_tests::{
    Node, Pod,
    agent::{Agent, free_port},
    ask::{CREDS, get},
    cluster::{AGENT_ENV, bindings_file, standalone_args_at},
    fake_imds::FakeImds,
    moto::MotoServer,
    pins::Pins,
    probe, require_root,
};

/// A plain TCP server on `HOST PORT` (SO_REUSEPORT if the third argument is 1) that
/// answers every request with credentials of its choosing and prints one line per
/// connection it accepts. Prints `ready` once it listens, or `bind ERRNO`.
const SQUATTER: &str = r#"
import socket, sys
host, port, reuseport = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if reuseport:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
try:
    s.bind((host, port))
except OSError as error:
    print("bind", error.errno, flush=True)
    sys.exit(0)
s.listen(128)
print("ready", flush=True)
body = b'{"Code":"Success","AccessKeyId":"AKIASQUATTER00000001","SecretAccessKey":"squatted","Token":"squatted"}'
while True:
    conn, peer = s.accept()
    print("accepted", peer[0], flush=True)
    try:
        conn.settimeout(2)
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    except OSError:
        pass
    conn.close()
"#;

/// The squatter process, killed by its PID when dropped.
struct Squatter {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Squatter {
    /// Starts the squatter on `addr`; `Err(errno)` if it could not bind.
    fn start(host: Ipv4Addr, port: u16, reuseport: bool) -> Result<Self, String> {
        let mut child = Command::new("python3")
            .args(["-c", SQUATTER, &host.to_string(), &port.to_string()])
            .arg(if reuseport { "1" } else { "0" })
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the squatter");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).expect("the squatter's first line");
        let squatter = Self { child, out };
        match line.trim() {
            "ready" => Ok(squatter),
            other => Err(other.to_owned()),
        }
    }

    /// Stops the squatter; returns the connections it accepted (one line each).
    fn stop(mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut rest = String::new();
        let _ = self.out.read_to_string(&mut rest);
        rest.lines()
            .filter(|line| line.starts_with("accepted"))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Squatter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What every test here needs: a node with one pod, pins, the node's upstream metadata
/// service stand-in, STS, and the proxy port.
struct Setup {
    node: Node,
    pod: Arc<Pod>,
    pins: Pins,
    upstream: FakeImds,
    moto: MotoServer,
    app_port: u16,
    bindings: PathBuf,
}

impl Setup {
    async fn new(name: &str) -> Self {
        let node = Node::new();
        let pod = Arc::new(node.pod());
        let pins = Pins::new(name);
        let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
        let moto = MotoServer::shared_on(node.address);
        let bindings = bindings_file(&format!("squat-{name}"), &[("a", &*pod, "role-a")]);
        Self {
            node,
            pod,
            pins,
            upstream,
            moto,
            app_port: free_port(),
            bindings,
        }
    }

    fn pin_dir(&self) -> String {
        self.pins.0.display().to_string()
    }

    /// `interceptor attach` (the boot path: programs, no agent).
    fn attach(&self) {
        let out = Command::new(interceptor_tests::agent::binary())
            .args(["attach", "--bpf-pin-dir", &self.pin_dir()])
            .args(["--cgroup-root", &self.node.kubepods.display().to_string()])
            .args(["--host-ip", &self.node.address.to_string()])
            .args(["--app-port", &self.app_port.to_string()])
            .args(["--metadata-addr", &self.upstream.addr().to_string()])
            .output()
            .expect("run interceptor attach");
        assert!(
            out.status.success(),
            "attach: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The real agent in standalone mode, serving role-a to the pod.
    fn agent(&self) -> Agent {
        let args = standalone_args_at(
            &self.node.kubepods,
            self.app_port,
            &self.node,
            &self.bindings,
            &self.upstream,
            &self.moto.endpoint(),
        );
        Agent::run(&args, &self.pins.0, free_port(), &AGENT_ENV)
    }

    /// The pod's credential role listing through 169.254.169.254: (status, body).
    async fn ask(&self) -> (u16, String) {
        get(&self.pod, CREDS)
    }

    /// `count` metadata connects from the pod (no HTTP): how many connected.
    async fn connects(&self, count: usize) -> probe::ProbeReport {
        let pod = self.pod.clone();
        tokio::task::spawn_blocking(move || {
            probe::run(pod.command(
                probe::binary(),
                &["169.254.169.254:80", &count.to_string(), "squat", "4"],
            ))
        })
        .await
        .unwrap()
    }

    fn counter(&self, name: &str) -> u64 {
        ebpf::status(&self.pins.0)
            .expect("status")
            .counters
            .into_iter()
            .find(|(counter, _)| *counter == name)
            .map_or_else(|| panic!("no kernel counter {name}"), |(_, value)| value)
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.bindings);
    }
}

/// Programs attached at boot, no agent, a squatter listening on the proxy address: every
/// pod connection is refused and the squatter receives nothing; an agent started then
/// cannot bind the address, says who to look for, and exits without serving; once the
/// squatter is gone the agent starts and the same pod is served its role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_squatter_on_the_proxy_port_receives_nothing_while_the_agent_is_down() {
    if !require_root("a_squatter_on_the_proxy_port_receives_nothing_while_the_agent_is_down") {
        return;
    }
    let setup = Setup::new("squatdown").await;
    setup.attach();
    let squatter = Squatter::start(setup.node.address, setup.app_port, false)
        .expect("the squatter binds the proxy address while no agent listens");

    let refused = setup.connects(10).await;
    let asked = setup.ask().await;
    assert_eq!(
        (refused.connected, refused.failed),
        (0, 10),
        "with no agent, every metadata connect is refused, squatter or not: {refused:?}"
    );
    assert_ne!(asked.0, 200, "a pod got an answer: {asked:?}");

    // An agent cannot take the address from the squatter: it exits with the reason and
    // never serves; pods stay refused.
    let mut blocked = setup.agent();
    let status = blocked.wait_exit(Duration::from_secs(30));
    let log = blocked.log_text();
    assert!(
        !status.success(),
        "the agent ran beside the squatter:\n{log}"
    );
    let addr = format!("{}:{}", setup.node.address, setup.app_port);
    assert!(
        log.contains("another process holds the metadata proxy address") && log.contains(&addr),
        "the agent's error names the held address {addr}:\n{log}"
    );
    blocked.leave_programs();
    drop(blocked);
    let still = setup.connects(5).await;
    assert_eq!((still.connected, still.failed), (0, 5), "{still:?}");

    let accepted = squatter.stop();
    assert_eq!(
        accepted,
        Vec::<String>::new(),
        "the squatter received pods' connections"
    );
    assert!(
        setup.counter("proxy_down") >= 16,
        "the refusals are counted: {}",
        ebpf::status(&setup.pins.0).unwrap()
    );
    setup.node.assert_no_node_imds_reached();

    // The squatter is gone: the agent starts and the same pod is served.
    let mut agent = setup.agent();
    agent.wait_ready(Duration::from_secs(30));
    let served = setup.ask().await;
    assert_eq!(served, (200, "role-a".to_owned()), "{}", agent.log_text());
    assert!(setup.counter("steered") >= 1);
}

/// The agent running, a squatter (root, as hostNetwork pods can be) joins the agent's
/// SO_REUSEPORT group on the proxy address: without the steering the kernel would share
/// the connections between the two; with it every one reaches the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_squatter_beside_the_agent_receives_nothing() {
    if !require_root("a_squatter_beside_the_agent_receives_nothing") {
        return;
    }
    const CONNECTS: usize = 40;
    let setup = Setup::new("squatbeside").await;
    let mut agent = setup.agent();
    agent.wait_ready(Duration::from_secs(30));
    let squatter = Squatter::start(setup.node.address, setup.app_port, true)
        .expect("root binds beside the agent with SO_REUSEPORT");

    let report = setup.connects(CONNECTS).await;
    let served = setup.ask().await;
    let accepted = squatter.stop();
    assert_eq!(
        accepted,
        Vec::<String>::new(),
        "the squatter received pods' connections (of {CONNECTS} connects: {report:?})"
    );
    assert_eq!(report.connected, CONNECTS, "{report:?}");
    assert_eq!(served, (200, "role-a".to_owned()), "{}", agent.log_text());
    assert!(setup.counter("steered") >= CONNECTS as u64);
}

/// `interceptor status` lists the steering program and the namespace it is attached to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_steering_in_this_network_namespace() {
    if !require_root("status_shows_the_steering_in_this_network_namespace") {
        return;
    }
    let setup = Setup::new("squatstatus").await;
    setup.attach();
    let status = ebpf::status(&setup.pins.0).expect("status");
    let steer = status
        .programs
        .iter()
        .find(|program| program.name == "imds_steer")
        .expect("status lists imds_steer");
    assert!(steer.attached, "{status}");
    let own = std::fs::metadata(Path::new("/proc/self/ns/net"))
        .map(|meta| std::os::unix::fs::MetadataExt::ino(&meta))
        .unwrap();
    assert_eq!(status.config.as_ref().unwrap().netns_id, own, "{status}");
    let shown = interceptor_tests::cmd::run("bpftool", &["link", "show"]);
    assert!(
        shown.contains("sk_lookup") && shown.contains(&format!("netns_ino {own}")),
        "bpftool shows the sk_lookup link in the test's namespace:\n{shown}"
    );
}
