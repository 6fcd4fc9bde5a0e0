//! Command line and environment: clap flags, the environment variables they fall back to,
//! and validation. Flag names follow kube2iam's where the meaning is the same, so a
//! kube2iam DaemonSet's arguments carry over (docs/migrating.md).
//!
//! Parsing takes the environment as a map ([`Env`]) instead of reading the process
//! environment, so tests feed settings without mutating global state. Bad configuration
//! is reported with what is wrong and exits 64 (EX_USAGE).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::PathBuf,
};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::ebpf::{METADATA_IPV4, METADATA_IPV6, Redirect};

/// Exit status for bad configuration (sysexits' EX_USAGE).
pub const EXIT_USAGE: i32 = 64;

/// The node's address pods can reach (downward API `status.hostIP`).
pub const ENV_HOST_IP: &str = "HOST_IP";
/// The node's IPv6 address pods can reach, if IPv6 metadata should be served.
pub const ENV_HOST_IPV6: &str = "HOST_IPV6";

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/interceptor";
pub const DEFAULT_APP_PORT: u16 = 8181;

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
    /// The metadata address pods dial, and where allowed requests are forwarded.
    #[arg(long, default_value = "169.254.169.254:80")]
    pub metadata_addr: SocketAddr,
    /// Replace pinned programs with this build's (no gap: the new programs are attached
    /// before the old ones are removed; connections in flight at that moment may be refused
    /// once and retried by the SDK).
    #[arg(long)]
    pub reload: bool,
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
    #[error("--metadata-addr {0} must be an IPv4 address and port (e.g. 169.254.169.254:80)")]
    MetadataNotIpv4(SocketAddr),
}

impl ConfigError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::NoHostIp => "no_host_ip",
            Self::BadEnvAddress { .. } => "bad_env_address",
            Self::UnusableHostIp(_) => "unusable_host_ip",
            Self::ZeroPort => "zero_port",
            Self::MetadataNotIpv4(_) => "metadata_not_ipv4",
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
        let SocketAddr::V4(metadata4) = self.metadata_addr else {
            return Err(ConfigError::MetadataNotIpv4(self.metadata_addr));
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
