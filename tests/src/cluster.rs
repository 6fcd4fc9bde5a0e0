//! The real agent on a simulated node in API-server mode: pods come from the real API
//! server (`control_plane`), roles are assumed at a given STS endpoint, and the node's own metadata service
//! is a fake holding the node's credentials.

use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    Node, Pod,
    agent::{Agent, free_port},
    control_plane::Scope,
    fake_imds::FakeImds,
};

/// An API server the agent can be pointed at: how it authenticates and which node it
/// runs for.
pub trait ApiEndpoint {
    /// Writes the kubeconfig the agent runs with.
    fn write_kubeconfig(&self, path: &Path) -> io::Result<()>;
    /// The agent's `--node`.
    fn node_name(&self) -> &str;
}

/// The real API server: the agent authenticates with its ServiceAccount's token, so it
/// has exactly deploy/'s permissions.
impl ApiEndpoint for Scope<'_> {
    fn write_kubeconfig(&self, path: &Path) -> io::Result<()> {
        self.plane.write_agent_kubeconfig(path)
    }

    fn node_name(&self) -> &str {
        &self.node
    }
}

/// The real API server reached through a [`crate::forwarder::Forwarder`] at `via` (which
/// the test can cut): the agent's kubeconfig names the forwarder.
pub struct Through<'a> {
    pub scope: &'a Scope<'a>,
    pub via: std::net::SocketAddr,
}

impl ApiEndpoint for Through<'_> {
    fn write_kubeconfig(&self, path: &Path) -> io::Result<()> {
        self.scope
            .plane
            .write_agent_kubeconfig_via(path, &format!("https://{}", self.via))
    }

    fn node_name(&self) -> &str {
        &self.scope.node
    }
}

/// Agent credentials for the tests where STS (moto) checks nothing.
pub const AGENT_ENV: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "AKIAAGENTEXAMPLE0001"),
    ("AWS_SECRET_ACCESS_KEY", "agent-secret"),
    ("AWS_REGION", "us-east-1"),
];

/// What the agent under test talks to: the API server, the node's metadata service
/// (faked) and STS.
pub struct Peers<'a> {
    pub api: &'a dyn ApiEndpoint,
    pub upstream: &'a FakeImds,
    pub sts: &'a str,
}

/// How [`start_agent`] runs the agent: its `run` arguments, pin directory and proxy
/// port, for tests that start it again themselves (a restart with the same flags).
pub struct AgentSetup {
    pub args: Vec<String>,
    pub pin_dir: PathBuf,
    pub app_port: u16,
}

/// The real agent on `node`: pods from `peers.api`, roles assumed at `peers.sts`, the
/// node's own metadata service faked by `peers.upstream`, its own AWS credentials from
/// `env`, plus `extra` flags; started in `own_pod` when given (exempted by its UID).
/// Returns once `/readyz` says ready, with the proxy port.
pub async fn start_agent(
    name: &str,
    node: &Node,
    peers: Peers<'_>,
    extra: &[&str],
    env: &[(&str, &str)],
    own_pod: Option<&Pod>,
) -> (Agent, u16) {
    let setup = agent_setup(name, node, peers, extra, own_pod);
    let mut agent = Agent::run_in(
        own_pod.map(|pod| &pod.container),
        &setup.args,
        &setup.pin_dir,
        free_port(),
        env,
    );
    agent.wait_ready(Duration::from_secs(30));
    (agent, setup.app_port)
}

/// The arguments, pin directory and proxy port [`start_agent`] uses (it writes the
/// kubeconfig for `peers.api`).
pub fn agent_setup(
    name: &str,
    node: &Node,
    peers: Peers<'_>,
    extra: &[&str],
    own_pod: Option<&Pod>,
) -> AgentSetup {
    let Peers {
        api: server,
        upstream,
        sts,
    } = peers;
    let kubeconfig = std::env::temp_dir().join(format!(
        "interceptor-{name}-{}.kubeconfig",
        std::process::id()
    ));
    server.write_kubeconfig(&kubeconfig).unwrap();
    let app_port = free_port();
    let mut args: Vec<String> = vec![
        "--host-ip".into(),
        node.address.to_string(),
        "--app-port".into(),
        app_port.to_string(),
        "--cgroup-root".into(),
        node.kubepods.display().to_string(),
        "--node".into(),
        server.node_name().into(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        "--metadata-addr".into(),
        upstream.addr().to_string(),
        "--sts-endpoint".into(),
        sts.into(),
    ];
    args.extend(extra.iter().map(|arg| (*arg).to_owned()));
    let pin_dir = PathBuf::from(format!(
        "/sys/fs/bpf/interceptor-test-{}-{name}",
        std::process::id()
    ));
    if let Some(pod) = own_pod {
        args.extend(["--pod-uid".to_owned(), pod.uid.clone()]);
    }
    AgentSetup {
        args,
        pin_dir,
        app_port,
    }
}

/// A standalone-mode bindings file binding each `(name, pod, role)` by the pod's
/// container cgroup path; returns its path.
pub fn bindings_file(file_name: &str, services: &[(&str, &Pod, &str)]) -> PathBuf {
    let mount = interceptor::cgroupfs::cgroup2_mount().unwrap();
    let mut text = String::from("bindings:\n");
    for (name, pod, role) in services {
        let path = pod.container.path.strip_prefix(&mount).unwrap();
        text.push_str(&format!(
            "  - name: {name}\n    cgroup: /{}\n    role: {role}\n",
            path.display()
        ));
    }
    let file = std::env::temp_dir().join(format!(
        "interceptor-{file_name}-{}.yaml",
        std::process::id()
    ));
    std::fs::write(&file, text).unwrap();
    file
}

/// `run` arguments of a standalone-mode agent on `node` (only the node's own cgroup
/// tree), bindings from `bindings`, roles under account 123456789012 assumed at `sts`.
pub fn standalone_args(
    node: &Node,
    bindings: &std::path::Path,
    upstream: &FakeImds,
    sts: &str,
) -> Vec<String> {
    [
        "--bindings",
        &bindings.display().to_string(),
        "--host-ip",
        &node.address.to_string(),
        "--app-port",
        &free_port().to_string(),
        "--cgroup-root",
        &node.cgroup_top().display().to_string(),
        "--metadata-addr",
        &upstream.addr().to_string(),
        "--sts-endpoint",
        sts,
        "--base-role-arn",
        "arn:aws:iam::123456789012:role/",
    ]
    .iter()
    .map(|arg| (*arg).to_owned())
    .collect()
}
