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

impl<'a> Peers<'a> {
    pub fn new(api: &'a dyn ApiEndpoint, upstream: &'a FakeImds, sts: &'a str) -> Self {
        Self { api, upstream, sts }
    }
}

/// How [`AgentBuilder`] runs the agent: its `run` arguments, pin directory and proxy
/// port, for tests that start it again themselves (a restart with the same flags).
pub struct AgentSetup {
    pub args: Vec<String>,
    pub pin_dir: PathBuf,
    pub app_port: u16,
}

/// The real agent on `node`: pods from `peers.api`, roles assumed at `peers.sts`, the
/// node's own metadata service faked by `peers.upstream`. By default it runs with
/// [`AGENT_ENV`] as its own AWS credentials, no flags beyond those, and outside any pod.
pub struct AgentBuilder<'a> {
    name: &'a str,
    node: &'a Node,
    peers: Peers<'a>,
    extra: Vec<String>,
    env: &'a [(&'a str, &'a str)],
    own_pod: Option<&'a Pod>,
}

impl<'a> AgentBuilder<'a> {
    pub fn new(name: &'a str, node: &'a Node, peers: Peers<'a>) -> Self {
        Self {
            name,
            node,
            peers,
            extra: Vec::new(),
            env: &AGENT_ENV,
            own_pod: None,
        }
    }

    /// Appends `extra` to the agent's `run` flags.
    pub fn args(mut self, extra: &[&str]) -> Self {
        self.extra.extend(extra.iter().map(|arg| (*arg).to_owned()));
        self
    }

    /// The agent's own environment (its AWS credentials) instead of [`AGENT_ENV`].
    pub fn env(mut self, env: &'a [(&'a str, &'a str)]) -> Self {
        self.env = env;
        self
    }

    /// Runs the agent in `pod`'s container, exempted by the pod's UID.
    pub fn own_pod(mut self, pod: &'a Pod) -> Self {
        self.own_pod = Some(pod);
        self
    }

    /// The arguments, pin directory and proxy port [`Self::start`] uses (it writes the
    /// kubeconfig for `peers.api`), for a test that starts the agent itself.
    pub fn setup(&self) -> AgentSetup {
        let Self {
            name,
            node,
            peers:
                Peers {
                    api: server,
                    upstream,
                    sts,
                },
            ..
        } = self;
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
            (*sts).into(),
        ];
        args.extend(self.extra.iter().cloned());
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/interceptor-test-{}-{name}",
            std::process::id()
        ));
        if let Some(pod) = self.own_pod {
            args.extend(["--pod-uid".to_owned(), pod.uid.clone()]);
        }
        AgentSetup {
            args,
            pin_dir,
            app_port,
        }
    }

    /// Starts the agent and returns once `/readyz` says ready, with the proxy port.
    pub async fn start(self) -> (Agent, u16) {
        let setup = self.setup();
        let mut agent = Agent::run_in(
            self.own_pod.map(|pod| &pod.container),
            &setup.args,
            &setup.pin_dir,
            free_port(),
            self.env,
        );
        agent.wait_ready(Duration::from_secs(30));
        (agent, setup.app_port)
    }
}

/// A standalone-mode bindings file binding each `(name, pod, role)` by the pod's
/// container cgroup path; returns its path.
pub fn bindings_file(file_name: &str, services: &[(&str, &Pod, &str)]) -> PathBuf {
    let cgroups: Vec<(&str, &Path, &str)> = services
        .iter()
        .map(|(name, pod, role)| (*name, pod.container.path.as_path(), *role))
        .collect();
    cgroup_bindings_file(file_name, &cgroups)
}

/// A standalone-mode bindings file binding each `(name, cgroup, role)` by the cgroup's
/// path (under the cgroup2 mount); written to a file named after `file_name` and this
/// process, whose path it returns. Writing it again with the same `file_name` replaces
/// it (a reload).
pub fn cgroup_bindings_file(file_name: &str, bindings: &[(&str, &Path, &str)]) -> PathBuf {
    let mount = interceptor::cgroupfs::cgroup2_mount().unwrap();
    let mut text = String::from("bindings:\n");
    for (name, cgroup, role) in bindings {
        let path = cgroup.strip_prefix(&mount).unwrap();
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
    standalone_args_at(
        node.cgroup_top(),
        free_port(),
        node,
        bindings,
        upstream,
        sts,
    )
}

/// [`standalone_args`] with the programs attached at `cgroup_root` and the proxy on
/// `app_port`: for a test that dials the proxy itself or attached programs first
/// (`interceptor attach`), which the agent must find at the same root and port.
pub fn standalone_args_at(
    cgroup_root: &Path,
    app_port: u16,
    node: &Node,
    bindings: &Path,
    upstream: &FakeImds,
    sts: &str,
) -> Vec<String> {
    [
        "--bindings",
        &bindings.display().to_string(),
        "--host-ip",
        &node.address.to_string(),
        "--app-port",
        &app_port.to_string(),
        "--cgroup-root",
        &cgroup_root.display().to_string(),
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
