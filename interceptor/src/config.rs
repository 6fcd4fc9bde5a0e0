//! Command line and environment: clap flags, the environment variables they fall back to,
//! and validation. Flag names follow kube2iam's where the meaning is the same, so a
//! kube2iam DaemonSet's arguments carry over (docs/migrating.md).
//!
//! Parsing takes the environment as a map ([`Env`]) instead of reading the process
//! environment, so tests feed settings without mutating global state. Bad configuration
//! is reported with what is wrong and exits 64 (EX_USAGE).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::PathBuf,
    time::Duration,
};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::ebpf::{METADATA_IPV4, METADATA_IPV6, Redirect};

/// Exit status for bad configuration (sysexits' EX_USAGE).
pub const EXIT_USAGE: i32 = 64;

/// The node's address pods can reach (downward API `status.hostIP`).
pub const ENV_HOST_IP: &str = "HOST_IP";
/// The node's IPv6 address pods can reach, if IPv6 metadata should be served.
pub const ENV_HOST_IPV6: &str = "HOST_IPV6";
/// The node's name (downward API `spec.nodeName`).
pub const ENV_NODE_NAME: &str = "NODE_NAME";
/// The agent's own pod UID (downward API `metadata.uid`).
pub const ENV_POD_UID: &str = "POD_UID";
/// The AWS region for STS.
pub const ENV_AWS_REGION: &str = "AWS_REGION";

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/interceptor";
pub const DEFAULT_APP_PORT: u16 = 8181;
/// `--metrics-port`'s default, and where `status` and `report` look for the agent.
pub const DEFAULT_METRICS_PORT: u16 = 8182;
const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:8182";

/// The environment as seen by the parser.
pub type Env = BTreeMap<String, String>;

#[derive(Debug, Parser)]
#[command(
    name = "interceptor",
    version,
    about = "Per-pod AWS IAM credentials from the kernel"
)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load (or re-use) the eBPF programs, attach them to the pods' cgroup, configure the
    /// redirect, and exit. The programs stay attached through their pins.
    Attach(AttachArgs),
    /// Remove every program, link and map interceptor pinned: pods reach the real metadata
    /// service again.
    Detach(PinArgs),
    /// Show what is attached and what the kernel holds.
    Status(StatusArgs),
    /// Run the agent: attach, watch this node's pods, serve the metadata API.
    Run(Box<RunArgs>),
    /// Print what an agent in observe mode (`run --observe`) recorded: per pod and
    /// container, the paths asked, whether it used the node's role, and what it would
    /// get under enforcement.
    Report(ReportArgs),
    /// Exit 0 when the agent that keeps FILE (`run --ready-file`) is ready, 1 when not:
    /// the DaemonSet's readiness probe, which must judge this pod's agent and never a
    /// predecessor sharing the metrics port during a surge.
    Ready(ReadyArgs),
}

#[derive(Debug, Args)]
pub struct ReadyArgs {
    /// The agent's `--ready-file`.
    #[arg(long)]
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The agent's admin port (`--metrics-port`).
    #[arg(long, default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// Print JSON (for scripts) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log level or tracing filter (e.g. `info`, `debug`, `interceptor=debug`).
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct PinArgs {
    /// bpffs directory holding interceptor's pinned programs and maps.
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub bpf_pin_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub pins: PinArgs,
    /// The running agent's admin port, asked for its mode (enforce or observe).
    #[arg(long, default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    #[command(flatten)]
    pub pins: PinArgs,
    /// The cgroup (v2) whose descendants are intercepted. Default: the kubelet's pods
    /// cgroup (`kubepods.slice` or `kubepods`) under the cgroup2 mount.
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// The node address the proxy listens on and pods are redirected to [env: HOST_IP].
    #[arg(long)]
    pub host_ip: Option<Ipv4Addr>,
    /// The node's IPv6 address for the IPv6 metadata endpoint [env: HOST_IPV6]. Without
    /// it, connects to [fd00:ec2::254] are refused.
    #[arg(long)]
    pub host_ipv6: Option<Ipv6Addr>,
    /// The proxy's port on the node.
    #[arg(long, default_value_t = DEFAULT_APP_PORT)]
    pub app_port: u16,
    /// The real metadata service: where allowed requests are forwarded and the node's
    /// own role is discovered (kube2iam's flag). Tests point it at a local fake.
    #[arg(long, default_value = "169.254.169.254:80")]
    pub metadata_addr: SocketAddr,
    /// The address pods' connections are intercepted at. EC2's is fixed; this exists for
    /// unusual environments only.
    #[arg(long, default_value = "169.254.169.254:80", hide = true)]
    pub intercept_addr: SocketAddr,
    /// Replace pinned programs with this build's (no gap: the new programs are attached
    /// before the old ones are removed; connections in flight at that moment may be refused
    /// once and retried by the SDK).
    #[arg(long)]
    pub reload: bool,
}

/// `interceptor run`. Flag names are kube2iam's where the meaning is the same.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub attach: AttachArgs,
    /// This node's name (field selector for the pod watch) [env: NODE_NAME].
    #[arg(long)]
    pub node: Option<String>,
    /// kubeconfig file; default: in-cluster service account, else KUBECONFIG.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Port of /healthz, /readyz, /metrics (and /debug/store with --debug). Separate from
    /// the credential port, so that what can scrape metrics cannot assume roles.
    #[arg(long, default_value_t = DEFAULT_METRICS_PORT)]
    pub metrics_port: u16,
    /// Observe mode, for migrating: NOTHING IS ENFORCED. Pods are answered as the node
    /// would answer them (the node's own credentials included, forwarded from
    /// --metadata-addr), and the agent records per container what it asked for and what
    /// it would get under enforcement (`interceptor report`). Restart without it to
    /// enforce.
    #[arg(long)]
    pub observe: bool,
    /// Serve /debug/store: pods, cgroups, decisions and credential expiries (no secrets).
    #[arg(long)]
    pub debug: bool,
    /// Refuse requests without an IMDSv2 token (EC2's HttpTokens=required).
    #[arg(long)]
    pub imdsv2_required: bool,
    /// Metadata paths forwarded to the real metadata service (kiam's flag); default none.
    /// Whatever it matches, paths bearing credentials upstream are never forwarded: any
    /// `iam` segment beyond the agent's own answers, `identity-credentials`, and the
    /// instance identity's `pkcs7`, `signature` and `rsa2048`.
    #[arg(long)]
    pub allow_route_regexp: Option<String>,
    /// A named set of paths forwarded without a regex (added to --allow-route-regexp):
    /// `sdk` is the region, availability zone (and its id) and the instance identity
    /// document, which SDKs read.
    #[arg(long, value_enum)]
    pub allow_route_preset: Option<crate::imds::route::Preset>,
    /// Pod annotation naming the role.
    #[arg(long, default_value = crate::policy::DEFAULT_ROLE_KEY)]
    pub iam_role_key: String,
    /// Pod annotation holding the ExternalId.
    #[arg(long, default_value = crate::policy::DEFAULT_EXTERNAL_ID_KEY)]
    pub iam_external_id: String,
    /// Prefix for role names: arn:aws:iam::<account>:role/[path/].
    #[arg(long)]
    pub base_role_arn: Option<String>,
    /// Role for pods without the annotation (name or ARN).
    #[arg(long)]
    pub default_role: Option<String>,
    /// Take the base role ARN from the node's instance profile (upstream metadata).
    #[arg(long)]
    pub auto_discover_base_arn: bool,
    /// Take the default role from the node's instance profile (upstream metadata).
    #[arg(long)]
    pub auto_discover_default_role: bool,
    /// Check roles against the namespace's allowed-roles annotation.
    #[arg(long)]
    pub namespace_restrictions: bool,
    /// Namespace annotation listing allowed roles (JSON array).
    #[arg(long, default_value = crate::policy::DEFAULT_NAMESPACE_KEY)]
    pub namespace_key: String,
    #[arg(long, value_enum, default_value_t = crate::policy::RestrictionFormat::Glob)]
    pub namespace_restriction_format: crate::policy::RestrictionFormat,
    /// Ignore roles named on ServiceAccounts (no ServiceAccount watch; for clusters where
    /// the agent may not read serviceaccounts). Pods without a role of their own wait for
    /// their ServiceAccount to be read otherwise.
    #[arg(long)]
    pub no_service_account_roles: bool,
    /// Honour IRSA's `eks.amazonaws.com/role-arn` on a pod's ServiceAccount (after the
    /// pod's and the ServiceAccount's role annotation).
    #[arg(long)]
    pub irsa_annotations: bool,
    /// Tag role sessions like EKS Pod Identity (kubernetes-namespace, -service-account,
    /// -pod-name, -pod-uid, -container-name; eks-cluster-name with --cluster-name), as
    /// transitive tags. Trust policies must allow sts:TagSession.
    #[arg(long)]
    pub session_tags: bool,
    /// The `eks-cluster-name` session tag (with --session-tags).
    #[arg(long)]
    pub cluster_name: Option<String>,
    /// Set SourceIdentity to `<namespace>.<pod>` on role sessions. Trust policies must
    /// allow sts:SetSourceIdentity.
    #[arg(long)]
    pub source_identity: bool,
    /// Namespaces whose pods keep the node's identity (not intercepted); repeatable.
    #[arg(long = "node-identity-namespace")]
    pub node_identity_namespaces: Vec<String>,
    /// How long a connection from a pod the watch has not delivered yet waits for it.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub unknown_pod_wait: std::time::Duration,
    /// Time a client has to send a request's headers; also how long an idle keep-alive
    /// connection is kept open.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub header_read_timeout: std::time::Duration,
    /// Time to answer one request (STS included) once its headers are read; then 503.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: std::time::Duration,
    /// Age at which a proxy connection is closed (after the request in flight).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub connection_max_age: std::time::Duration,
    /// Largest request head (request line and headers) in bytes; larger ones get 431.
    #[arg(long, default_value_t = 16 * 1024)]
    pub max_header_bytes: usize,
    /// Proxy connections served at once; more wait in the kernel's accept queue.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Proxy connections served at once per container cgroup (unattributed connections
    /// count as one cgroup); more are closed at once, so one pod cannot starve the others.
    #[arg(long, default_value_t = 64)]
    pub max_connections_per_cgroup: usize,
    /// Proxy connections served at once per pod, all its containers together; more are
    /// closed at once, so a pod with many containers cannot take the whole pool.
    #[arg(long, default_value_t = 128)]
    pub max_connections_per_pod: usize,
    /// STS session duration of pods' credentials (e.g. 1h, 3600s).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub iam_role_session_ttl: std::time::Duration,
    /// Assume a pod's role only at its first request instead of when the pod appears
    /// (kube2iam's behaviour): for `cargo xtask bench`, which measures what prefetch buys.
    #[arg(long, hide = true)]
    pub no_prefetch: bool,
    /// STS endpoint URL (e.g. a VPC endpoint).
    #[arg(long)]
    pub sts_endpoint: Option<String>,
    /// Use the regional STS endpoint of --region / AWS_REGION.
    #[arg(long)]
    pub use_regional_sts_endpoint: bool,
    /// AWS region [env: AWS_REGION].
    #[arg(long)]
    pub region: Option<String>,
    /// An intermediate role assumed first; pods' roles are assumed with its credentials.
    #[arg(long)]
    pub assume_role_arn: Option<String>,
    /// The agent's own pod UID [env: POD_UID] (downward API `metadata.uid`): its cgroups
    /// are exempted at start, so its own metadata requests are never redirected to itself.
    #[arg(long)]
    pub pod_uid: Option<String>,
    /// A file that exists while this agent is ready: created once the kernel steers pods
    /// to it, removed when it drains. The DaemonSet's readiness probe checks it
    /// (`interceptor ready --file`): during an upgrade's surge the metrics port is shared
    /// with the old agent, so an HTTP probe could reach the wrong one.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Taint removed from this node once the agent is ready (register nodes with it so no
    /// pod starts before interception is active; see docs/install.md).
    #[arg(long, default_value = crate::k8s::node::STARTUP_TAINT)]
    pub startup_taint: String,
    /// Standalone mode, without Kubernetes: a YAML file binding cgroup path patterns to
    /// roles (docs/standalone.md), reloaded when it changes.
    #[arg(long)]
    pub bindings: Option<PathBuf>,
}

/// Durations as kube2iam writes them: `900`, `900s`, `15m`, `1h`, `500ms`.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 900s, 15m, 1h)"))?;
    let seconds = |factor: u64| {
        value
            .checked_mul(factor)
            .map(std::time::Duration::from_secs)
    };
    match unit {
        "" | "s" => seconds(1),
        "m" => seconds(60),
        "h" => seconds(3600),
        "ms" => Some(std::time::Duration::from_millis(value)),
        _ => None,
    }
    .ok_or_else(|| format!("{text:?} is not a duration (e.g. 900s, 15m, 1h)"))
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no node address: pass --host-ip or set HOST_IP (the address pods reach the node on)")]
    NoHostIp,
    #[error("{name}={value:?} is not an IPv4 address")]
    BadEnvAddress { name: &'static str, value: String },
    #[error("--host-ip {0} cannot be the proxy address: it must be a node address pods can reach")]
    UnusableHostIp(Ipv4Addr),
    #[error("--app-port 0 is not a port")]
    ZeroPort,
    #[error("--intercept-addr {0} must be an IPv4 address and port (e.g. 169.254.169.254:80)")]
    MetadataNotIpv4(SocketAddr),
    #[error("no node name: pass --node or set NODE_NAME (downward API spec.nodeName)")]
    NoNode,
    #[error("--allow-route-regexp {pattern:?}: {source}")]
    BadRegex {
        pattern: String,
        #[source]
        source: regex::Error,
    },
    #[error("--base-role-arn: {0}")]
    BadBaseArn(#[source] crate::policy::PolicyError),
    #[error("--default-role: {0}")]
    BadDefaultRole(#[source] crate::policy::PolicyError),
    #[error("--iam-role-session-ttl {0:?} is outside STS's 15 min to 12 h")]
    BadSessionTtl(std::time::Duration),
    #[error("--unknown-pod-wait {0:?} must stay under the SDKs' 1 s metadata timeout")]
    BadUnknownPodWait(std::time::Duration),
    #[error("--{flag} {value}: must be {allowed}")]
    BadLimit {
        flag: &'static str,
        value: String,
        allowed: &'static str,
    },
    #[error("--metrics-port {0} must differ from --app-port")]
    MetricsOnAppPort(u16),
    #[error("--use-regional-sts-endpoint needs a region: pass --region or set AWS_REGION")]
    RegionalWithoutRegion,
    /// An identity flag that would be silently ignored: refused, since what a session
    /// carries (or which role a pod gets) must be what the operator asked for.
    #[error("--{flag}: {why}")]
    IgnoredIdentityFlag {
        flag: &'static str,
        why: &'static str,
    },
}

impl ConfigError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::NoHostIp => "no_host_ip",
            Self::BadEnvAddress { .. } => "bad_env_address",
            Self::UnusableHostIp(_) => "unusable_host_ip",
            Self::ZeroPort => "zero_port",
            Self::MetadataNotIpv4(_) => "metadata_not_ipv4",
            Self::NoNode => "no_node",
            Self::BadRegex { .. } => "bad_regex",
            Self::BadBaseArn(_) => "bad_base_arn",
            Self::BadDefaultRole(_) => "bad_default_role",
            Self::BadSessionTtl(_) => "bad_session_ttl",
            Self::BadUnknownPodWait(_) => "bad_unknown_pod_wait",
            Self::BadLimit { .. } => "bad_limit",
            Self::MetricsOnAppPort(_) => "metrics_on_app_port",
            Self::RegionalWithoutRegion => "regional_without_region",
            Self::IgnoredIdentityFlag { .. } => "ignored_identity_flag",
        }
    }
}

impl AttachArgs {
    /// The redirect the kernel programs should apply, validated.
    pub fn redirect(&self, env: &Env) -> Result<Redirect, ConfigError> {
        let host_ip = match self.host_ip {
            Some(ip) => ip,
            None => env_ip(env, ENV_HOST_IP)?.ok_or(ConfigError::NoHostIp)?,
        };
        // Redirecting to loopback would reach each pod's own loopback, not the node;
        // unspecified and multicast addresses are not reachable destinations.
        if host_ip.is_loopback() || host_ip.is_unspecified() || host_ip.is_multicast() {
            return Err(ConfigError::UnusableHostIp(host_ip));
        }
        if self.app_port == 0 {
            return Err(ConfigError::ZeroPort);
        }
        let host_ipv6 = match self.host_ipv6 {
            Some(ip) => Some(ip),
            None => env_ip6(env, ENV_HOST_IPV6)?,
        };
        let SocketAddr::V4(metadata4) = self.intercept_addr else {
            return Err(ConfigError::MetadataNotIpv4(self.intercept_addr));
        };
        Ok(Redirect {
            metadata4,
            metadata6: if *metadata4.ip() == METADATA_IPV4 {
                METADATA_IPV6
            } else {
                Ipv6Addr::UNSPECIFIED
            },
            proxy4: Some(SocketAddrV4::new(host_ip, self.app_port)),
            proxy6: host_ipv6.map(|ip| SocketAddrV6::new(ip, self.app_port, 0, 0)),
        })
    }
}

fn env_ip(env: &Env, name: &'static str) -> Result<Option<Ipv4Addr>, ConfigError> {
    env.get(name)
        .filter(|value| !value.is_empty())
        .map(|value| {
            value.parse().map_err(|_| ConfigError::BadEnvAddress {
                name,
                value: value.clone(),
            })
        })
        .transpose()
}

fn env_ip6(env: &Env, name: &'static str) -> Result<Option<Ipv6Addr>, ConfigError> {
    env.get(name)
        .filter(|value| !value.is_empty())
        .map(|value| match value.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => Ok(ip),
            _ => Err(ConfigError::BadEnvAddress {
                name,
                value: value.clone(),
            }),
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attach(args: &[&str]) -> AttachArgs {
        let cli = Cli::try_parse_from([&["interceptor", "attach"], args].concat()).unwrap();
        match cli.command {
            Command::Attach(args) => args,
            other => panic!("parsed {other:?}"),
        }
    }

    #[test]
    fn host_ip_comes_from_flag_or_environment() {
        let env = Env::from([(ENV_HOST_IP.into(), "10.0.0.7".into())]);
        let redirect = attach(&[]).redirect(&env).unwrap();
        assert_eq!(redirect.proxy4, Some("10.0.0.7:8181".parse().unwrap()));
        assert_eq!(redirect.metadata4, "169.254.169.254:80".parse().unwrap());
        assert_eq!(redirect.proxy6, None);
        let redirect = attach(&["--host-ip", "10.9.9.9", "--app-port", "9000"])
            .redirect(&env)
            .unwrap();
        assert_eq!(redirect.proxy4, Some("10.9.9.9:9000".parse().unwrap()));
    }

    #[test]
    fn bad_addresses_are_refused_with_the_reason() {
        assert!(matches!(
            attach(&[]).redirect(&Env::new()),
            Err(ConfigError::NoHostIp)
        ));
        let env = Env::from([(ENV_HOST_IP.into(), "node-1".into())]);
        assert!(matches!(
            attach(&[]).redirect(&env),
            Err(ConfigError::BadEnvAddress {
                name: ENV_HOST_IP,
                ..
            })
        ));
        assert!(matches!(
            attach(&["--host-ip", "127.0.0.1"]).redirect(&Env::new()),
            Err(ConfigError::UnusableHostIp(_))
        ));
        assert!(matches!(
            attach(&["--host-ip", "10.0.0.1", "--app-port", "0"]).redirect(&Env::new()),
            Err(ConfigError::ZeroPort)
        ));
        assert!(Cli::try_parse_from(["interceptor", "attach", "--host-ip", "300.1.1.1"]).is_err());
        assert!(Cli::try_parse_from(["interceptor", "attach", "--metadata-addr", "x"]).is_err());
        assert!(matches!(
            attach(&["--host-ip", "10.0.0.1", "--intercept-addr", "[::1]:80"])
                .redirect(&Env::new()),
            Err(ConfigError::MetadataNotIpv4(_))
        ));
        // The upstream address does not move the interception point.
        let redirect = attach(&["--host-ip", "10.0.0.1", "--metadata-addr", "127.0.0.1:9"])
            .redirect(&Env::new())
            .unwrap();
        assert_eq!(redirect.metadata4, "169.254.169.254:80".parse().unwrap());
    }

    fn run(args: &[&str]) -> RunArgs {
        let cli = Cli::try_parse_from([&["interceptor", "run"], args].concat()).unwrap();
        match cli.command {
            Command::Run(args) => *args,
            other => panic!("parsed {other:?}"),
        }
    }

    #[test]
    fn run_flags_are_validated_with_the_reason() {
        let env = Env::from([
            (ENV_HOST_IP.into(), "10.0.0.7".into()),
            (ENV_NODE_NAME.into(), "node-a".into()),
        ]);
        let config = run(&[
            "--base-role-arn",
            "arn:aws:iam::123456789012:role/",
            "--default-role",
            "app",
        ])
        .validate(&env)
        .unwrap();
        let Mode::Kubernetes(kube) = &config.mode else {
            panic!("not the Kubernetes mode: {:?}", config.mode);
        };
        assert_eq!(kube.node, "node-a");
        assert!(kube.prefetch);
        assert_eq!(kube.unknown_pod_wait, std::time::Duration::from_millis(500));
        assert_eq!(kube.startup_taint, crate::k8s::node::STARTUP_TAINT);
        assert_eq!(config.admin.addr.port(), 8182);
        assert!(!config.admin.debug);
        assert_eq!(config.upstream, "169.254.169.254:80".parse().unwrap());
        assert_eq!(config.datapath.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
        assert_eq!(config.session_ttl, std::time::Duration::from_secs(3600));
        assert!(
            !config.server.imdsv2_required
                && config.server.allow_route.preset.is_none()
                && config.server.allow_route.regex.is_none()
        );
        assert_eq!(config.policy.default_role.as_deref(), Some("app"));
        assert!(!config.observe, "enforcing unless asked");
        assert!(run(&["--observe"]).validate(&env).unwrap().observe);
        let label = |args: &[&str], env: &Env| run(args).validate(env).unwrap_err().metric_label();
        assert_eq!(
            label(&[], &Env::from([(ENV_HOST_IP.into(), "10.0.0.7".into())])),
            "no_node"
        );
        assert_eq!(
            label(&["--allow-route-regexp", "(unclosed"], &env),
            "bad_regex"
        );
        assert_eq!(
            label(&["--base-role-arn", "arn:aws:iam::1:role/"], &env),
            "bad_base_arn"
        );
        assert_eq!(label(&["--default-role", "app"], &env), "bad_default_role");
        assert_eq!(
            label(&["--iam-role-session-ttl", "5m"], &env),
            "bad_session_ttl"
        );
        assert_eq!(
            label(&["--iam-role-session-ttl", "13h"], &env),
            "bad_session_ttl"
        );
        assert_eq!(
            label(&["--unknown-pod-wait", "2s"], &env),
            "bad_unknown_pod_wait"
        );
        assert_eq!(
            label(&["--metrics-port", "8181"], &env),
            "metrics_on_app_port"
        );
        assert_eq!(
            label(&["--use-regional-sts-endpoint"], &env),
            "regional_without_region"
        );
        assert!(
            Cli::try_parse_from(["interceptor", "run", "--iam-role-session-ttl", "soon"]).is_err()
        );
        assert!(
            Cli::try_parse_from(["interceptor", "run", "--namespace-restriction-format", "x"])
                .is_err()
        );
    }

    #[test]
    fn durations_as_kube2iam_writes_them() {
        use std::time::Duration;
        assert_eq!(parse_duration("900"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        for bad in ["", "m", "1d", "-5s", "99999999999999999999h", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn proxy_limits_have_defaults_and_bounds() {
        use std::time::Duration;
        let env = Env::from([
            (ENV_HOST_IP.into(), "10.0.0.7".into()),
            (ENV_NODE_NAME.into(), "node-a".into()),
        ]);
        let limits = run(&[]).validate(&env).unwrap().server;
        assert_eq!(
            (
                limits.header_read_timeout,
                limits.request_timeout,
                limits.connection_max_age,
                limits.max_header_bytes,
                limits.max_connections,
                limits.max_connections_per_cgroup,
                limits.max_connections_per_pod,
            ),
            (
                Duration::from_secs(5),
                Duration::from_secs(10),
                Duration::from_secs(300),
                16 * 1024,
                1024,
                64,
                128,
            )
        );
        let limits = run(&[
            "--header-read-timeout",
            "2s",
            "--max-connections",
            "100",
            "--max-connections-per-cgroup",
            "100",
        ])
        .validate(&env)
        .unwrap()
        .server;
        assert_eq!(limits.header_read_timeout, Duration::from_secs(2));
        assert_eq!(limits.max_connections_per_cgroup, 100);
        for (args, flag) in [
            (&["--header-read-timeout", "0s"][..], "header-read-timeout"),
            (&["--header-read-timeout", "2m"], "header-read-timeout"),
            (&["--request-timeout", "500ms"], "request-timeout"),
            (&["--request-timeout", "1h"], "request-timeout"),
            (
                &[
                    "--header-read-timeout",
                    "30s",
                    "--connection-max-age",
                    "10s",
                ],
                "connection-max-age",
            ),
            (&["--connection-max-age", "25h"], "connection-max-age"),
            (&["--max-header-bytes", "4096"], "max-header-bytes"),
            (&["--max-header-bytes", "2000000"], "max-header-bytes"),
            (&["--max-connections", "0"], "max-connections"),
            (
                &["--max-connections-per-cgroup", "0"],
                "max-connections-per-cgroup",
            ),
            (
                &[
                    "--max-connections",
                    "10",
                    "--max-connections-per-cgroup",
                    "11",
                ],
                "max-connections-per-cgroup",
            ),
        ] {
            match run(args).validate(&env) {
                Err(ConfigError::BadLimit { flag: got, .. }) => assert_eq!(got, flag, "{args:?}"),
                other => panic!("{args:?} accepted or refused for another reason: {other:?}"),
            }
        }
        assert!(Cli::try_parse_from(["interceptor", "run", "--max-connections", "-1"]).is_err());
        assert!(Cli::try_parse_from(["interceptor", "run", "--request-timeout", "soon"]).is_err());
    }

    #[test]
    fn bindings_select_standalone_mode_without_a_node() {
        let env = Env::from([(ENV_HOST_IP.into(), "10.0.0.7".into())]);
        let config = run(&["--bindings", "/etc/interceptor/bindings.yaml"])
            .validate(&env)
            .unwrap();
        match config.mode {
            Mode::Standalone { bindings } => {
                assert_eq!(bindings, PathBuf::from("/etc/interceptor/bindings.yaml"))
            }
            other => panic!("not standalone: {other:?}"),
        }
        assert_eq!(config.datapath.cgroup_root, None);
        let config = run(&["--no-prefetch", "--node", "n", "--pod-uid", " "])
            .validate(&env)
            .unwrap();
        let Mode::Kubernetes(kube) = config.mode else {
            panic!("not the Kubernetes mode");
        };
        assert!(!kube.prefetch);
        assert_eq!(config.pod_uid, None, "a blank POD_UID is no UID");
    }

    #[test]
    fn identity_flags_are_refused_where_they_would_be_ignored() {
        let env = Env::from([
            (ENV_HOST_IP.into(), "10.0.0.7".into()),
            (ENV_NODE_NAME.into(), "node-a".into()),
        ]);
        let config = run(&[
            "--session-tags",
            "--cluster-name",
            "prod",
            "--source-identity",
            "--irsa-annotations",
        ])
        .validate(&env)
        .unwrap();
        let Mode::Kubernetes(kube) = &config.mode else {
            panic!("not the Kubernetes mode");
        };
        assert!(kube.session.tags && kube.session.source_identity);
        assert_eq!(kube.session.cluster_name.as_deref(), Some("prod"));
        assert!(kube.service_account_roles);
        assert!(config.policy.irsa_annotations);
        for (args, flag) in [
            (&["--cluster-name", "prod"][..], "cluster-name"),
            (
                &["--irsa-annotations", "--no-service-account-roles"],
                "irsa-annotations",
            ),
            (&["--bindings", "/b.yaml", "--session-tags"], "session-tags"),
            (
                &["--bindings", "/b.yaml", "--source-identity"],
                "source-identity",
            ),
        ] {
            match run(args).validate(&env) {
                Err(ConfigError::IgnoredIdentityFlag { flag: got, .. }) => {
                    assert_eq!(got, flag, "{args:?}")
                }
                other => panic!("{args:?} accepted or refused for another reason: {other:?}"),
            }
        }
        // A blank cluster name (an empty env-substituted value) is no cluster name.
        let config = run(&["--cluster-name", " "]).validate(&env).unwrap();
        let Mode::Kubernetes(kube) = config.mode else {
            panic!("not the Kubernetes mode");
        };
        assert_eq!(kube.session.cluster_name, None);
    }

    #[test]
    fn ipv6_proxy_only_when_configured() {
        let env = Env::from([
            (ENV_HOST_IP.into(), "10.0.0.7".into()),
            (ENV_HOST_IPV6.into(), "fd00::7".into()),
        ]);
        let redirect = attach(&[]).redirect(&env).unwrap();
        assert_eq!(redirect.proxy6, Some("[fd00::7]:8181".parse().unwrap()));
        assert_eq!(redirect.metadata6, METADATA_IPV6);
    }
}

/// `interceptor run`'s settings, validated completely: the only thing the agent reads
/// (flags and environment are never looked at again after [`RunArgs::validate`]).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub datapath: DatapathConfig,
    /// The real metadata service (`--metadata-addr`): passthrough and discovery.
    pub upstream: SocketAddr,
    pub admin: AdminConfig,
    /// The metadata proxy's switches and limits (docs/imds.md, "Limits").
    pub server: crate::imds::ServerConfig,
    pub policy: crate::policy::PolicyConfig,
    pub discover: Discover,
    pub sts: crate::credentials::StsConfig,
    /// STS session duration of the credentials served (`--iam-role-session-ttl`).
    pub session_ttl: Duration,
    /// The agent's own pod UID: its cgroups are exempted at start.
    pub pod_uid: Option<String>,
    pub mode: Mode,
    /// `--observe`: answer as the node would and record what enforcement would do.
    pub observe: bool,
    /// `--ready-file`: exists while the agent is ready.
    pub ready_file: Option<PathBuf>,
}

/// Where and how the kernel programs are attached.
#[derive(Debug, Clone)]
pub struct DatapathConfig {
    pub pin_dir: PathBuf,
    /// `--cgroup-root`; `None`: the kubelet's pods cgroup (Kubernetes) or the whole cgroup2
    /// mount (standalone), found at start.
    pub cgroup_root: Option<PathBuf>,
    pub redirect: Redirect,
    pub reload: bool,
}

/// The admin server (`/healthz`, `/readyz`, `/metrics`, `/debug/store`).
#[derive(Debug, Clone, Copy)]
pub struct AdminConfig {
    pub addr: SocketAddr,
    pub debug: bool,
}

/// What is taken from the node's instance profile at start.
#[derive(Debug, Clone, Copy, Default)]
pub struct Discover {
    pub base_arn: bool,
    pub default_role: bool,
}

/// Who the callers are: pods of this node, or services bound by a file.
#[derive(Debug, Clone)]
pub enum Mode {
    Kubernetes(KubeConfig),
    /// `--bindings`: cgroup path patterns bound to roles, reloaded when the file changes.
    Standalone {
        bindings: PathBuf,
    },
}

/// The Kubernetes mode's settings.
#[derive(Debug, Clone)]
pub struct KubeConfig {
    pub node: String,
    pub kubeconfig: Option<PathBuf>,
    pub node_identity_namespaces: BTreeSet<String>,
    pub unknown_pod_wait: Duration,
    pub startup_taint: String,
    /// Assume a pod's role when it appears (off: `--no-prefetch`).
    pub prefetch: bool,
    /// Roles named on ServiceAccounts apply (off: `--no-service-account-roles`, and then
    /// no ServiceAccount is watched).
    pub service_account_roles: bool,
    /// What role sessions carry besides their name.
    pub session: crate::resolve::SessionSettings,
}

impl RunArgs {
    /// The identity flags (docs/identity.md) only where they take effect.
    fn check_identity_flags(&self) -> Result<(), ConfigError> {
        let refuse = |flag, why| Err(ConfigError::IgnoredIdentityFlag { flag, why });
        let cluster_name = self
            .cluster_name
            .as_deref()
            .is_some_and(|name| !name.trim().is_empty());
        if self.bindings.is_some() {
            let kube_only = "Kubernetes mode only (not with --bindings)";
            for (flag, set) in [
                ("session-tags", self.session_tags),
                ("source-identity", self.source_identity),
                ("cluster-name", cluster_name),
                ("irsa-annotations", self.irsa_annotations),
            ] {
                if set {
                    return refuse(flag, kube_only);
                }
            }
        }
        if cluster_name && !self.session_tags {
            return refuse("cluster-name", "is a session tag: needs --session-tags");
        }
        if self.irsa_annotations && self.no_service_account_roles {
            return refuse(
                "irsa-annotations",
                "reads ServiceAccounts, which --no-service-account-roles turns off",
            );
        }
        Ok(())
    }

    pub fn validate(&self, env: &Env) -> Result<AgentConfig, ConfigError> {
        let redirect = self.attach.redirect(env)?;
        let node = self
            .node
            .clone()
            .or_else(|| env.get(ENV_NODE_NAME).cloned())
            .filter(|node| !node.trim().is_empty());
        let allow_route_regex = self
            .allow_route_regexp
            .as_ref()
            .map(|pattern| {
                regex::RegexBuilder::new(pattern)
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|source| ConfigError::BadRegex {
                        pattern: pattern.clone(),
                        source,
                    })
            })
            .transpose()?;
        let allow_route = crate::imds::route::AllowList {
            preset: self.allow_route_preset,
            regex: allow_route_regex,
        };
        let base_role_arn = self
            .base_role_arn
            .as_deref()
            .map(crate::policy::BaseArn::parse)
            .transpose()
            .map_err(ConfigError::BadBaseArn)?;
        let policy = crate::policy::PolicyConfig {
            iam_role_key: self.iam_role_key.clone(),
            iam_external_id_key: self.iam_external_id.clone(),
            base_role_arn,
            default_role: self.default_role.clone(),
            namespace_restrictions: self.namespace_restrictions,
            namespace_key: self.namespace_key.clone(),
            restriction_format: self.namespace_restriction_format,
            irsa_annotations: self.irsa_annotations,
            ..crate::policy::PolicyConfig::default()
        };
        if let Some(default) = &self.default_role {
            crate::policy::resolve_role(default, &policy).map_err(ConfigError::BadDefaultRole)?;
        }
        let ttl = self.iam_role_session_ttl;
        if ttl < Duration::from_secs(900) || ttl > Duration::from_secs(12 * 3600) {
            return Err(ConfigError::BadSessionTtl(ttl));
        }
        if self.unknown_pod_wait >= Duration::from_millis(900) {
            return Err(ConfigError::BadUnknownPodWait(self.unknown_pod_wait));
        }
        self.check_limits()?;
        if self.metrics_port == self.attach.app_port {
            return Err(ConfigError::MetricsOnAppPort(self.metrics_port));
        }
        let region = self
            .region
            .clone()
            .or_else(|| env.get(ENV_AWS_REGION).cloned());
        if self.use_regional_sts_endpoint && region.is_none() {
            return Err(ConfigError::RegionalWithoutRegion);
        }
        self.check_identity_flags()?;
        // Standalone mode watches no node.
        let mode = match (&self.bindings, node) {
            (Some(bindings), _) => Mode::Standalone {
                bindings: bindings.clone(),
            },
            (None, Some(node)) => Mode::Kubernetes(KubeConfig {
                node,
                kubeconfig: self.kubeconfig.clone(),
                node_identity_namespaces: self.node_identity_namespaces.iter().cloned().collect(),
                unknown_pod_wait: self.unknown_pod_wait,
                startup_taint: self.startup_taint.clone(),
                prefetch: !self.no_prefetch,
                service_account_roles: !self.no_service_account_roles,
                session: crate::resolve::SessionSettings {
                    tags: self.session_tags,
                    cluster_name: self
                        .cluster_name
                        .clone()
                        .filter(|name| !name.trim().is_empty()),
                    source_identity: self.source_identity,
                },
            }),
            (None, None) => return Err(ConfigError::NoNode),
        };
        Ok(AgentConfig {
            datapath: DatapathConfig {
                pin_dir: self.attach.pins.bpf_pin_dir.clone(),
                cgroup_root: self.attach.cgroup_root.clone(),
                redirect,
                reload: self.attach.reload,
            },
            upstream: self.attach.metadata_addr,
            admin: AdminConfig {
                addr: SocketAddr::from(([0, 0, 0, 0], self.metrics_port)),
                debug: self.debug,
            },
            server: crate::imds::ServerConfig {
                imdsv2_required: self.imdsv2_required,
                allow_route,
                header_read_timeout: self.header_read_timeout,
                request_timeout: self.request_timeout,
                connection_max_age: self.connection_max_age,
                max_header_bytes: self.max_header_bytes,
                max_connections: self.max_connections,
                max_connections_per_cgroup: self.max_connections_per_cgroup,
                max_connections_per_pod: self.max_connections_per_pod.min(self.max_connections),
            },
            policy,
            discover: Discover {
                base_arn: self.auto_discover_base_arn,
                default_role: self.auto_discover_default_role,
            },
            sts: crate::credentials::StsConfig {
                endpoint: self.sts_endpoint.clone(),
                region,
                regional: self.use_regional_sts_endpoint,
                intermediate_role: self.assume_role_arn.clone(),
                agent_credentials: None,
            },
            session_ttl: ttl,
            pod_uid: self
                .pod_uid
                .clone()
                .or_else(|| env.get(ENV_POD_UID).cloned())
                .filter(|uid| !uid.trim().is_empty()),
            mode,
            observe: self.observe,
            ready_file: self.ready_file.clone(),
        })
    }

    /// The proxy limits' bounds (docs/imds.md, "Limits").
    fn check_limits(&self) -> Result<(), ConfigError> {
        let check = |ok: bool, flag: &'static str, value: String, allowed: &'static str| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::BadLimit {
                    flag,
                    value,
                    allowed,
                })
            }
        };
        let within = |value: Duration, low: Duration, high: Duration| low <= value && value <= high;
        check(
            within(
                self.header_read_timeout,
                Duration::from_millis(100),
                Duration::from_secs(60),
            ),
            "header-read-timeout",
            format!("{:?}", self.header_read_timeout),
            "from 100ms to 60s",
        )?;
        check(
            within(
                self.request_timeout,
                Duration::from_secs(1),
                Duration::from_secs(300),
            ),
            "request-timeout",
            format!("{:?}", self.request_timeout),
            "from 1s to 5m",
        )?;
        check(
            within(
                self.connection_max_age,
                self.header_read_timeout.max(Duration::from_secs(1)),
                Duration::from_secs(24 * 3600),
            ),
            "connection-max-age",
            format!("{:?}", self.connection_max_age),
            "at least 1s and --header-read-timeout, at most 24h",
        )?;
        // hyper's read buffer cannot be smaller than 8 KiB.
        check(
            (8 * 1024..=1024 * 1024).contains(&self.max_header_bytes),
            "max-header-bytes",
            self.max_header_bytes.to_string(),
            "from 8192 to 1048576",
        )?;
        check(
            (1..=65_536).contains(&self.max_connections),
            "max-connections",
            self.max_connections.to_string(),
            "from 1 to 65536",
        )?;
        check(
            (1..=self.max_connections).contains(&self.max_connections_per_cgroup),
            "max-connections-per-cgroup",
            self.max_connections_per_cgroup.to_string(),
            "from 1 to --max-connections",
        )?;
        // Above --max-connections it bounds nothing; the default (128) is allowed with a
        // lower --max-connections (and then served as --max-connections) rather than
        // making that an error.
        check(
            self.max_connections_per_pod >= 1,
            "max-connections-per-pod",
            self.max_connections_per_pod.to_string(),
            "at least 1",
        )
    }
}
