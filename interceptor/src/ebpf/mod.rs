//! The kernel side: load, pin or re-use, attach, detach and inspect interceptor's eBPF
//! programs. This is the only module that talks to aya.
//!
//! Everything lives under one bpffs directory (`--bpf-pin-dir`, default
//! `/sys/fs/bpf/interceptor`): the maps by their names (`imds_config`, ...) and one pinned
//! link per program (`link_imds_connect4`, ...). The connect, sock_ops and egress programs
//! attach to the pods' cgroup; the steering program (`imds_steer`, sk_lookup) to the
//! network namespace the calling thread runs in, which for the agent (hostNetwork) and
//! for `interceptor attach` on the node is the node's: that is where pods' connections to
//! the proxy address arrive. Pinned links keep the programs attached
//! when the agent exits, so a restart or an upgrade never opens a window in which a pod
//! reaches the real metadata service. On start the agent re-uses what is pinned; `--reload`
//! loads this build's programs, attaches them next to the old ones, then removes the old
//! links, so the redirect is never absent (see docs/ebpf.md).

mod error;
mod log;
pub mod maps;
mod object;
mod status;

use std::{
    fs::{self, File},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{
    EbpfLoader,
    programs::{CgroupAttachMode, CgroupSkbAttachType, Program, links::FdLink},
};
pub use error::Error;
use interceptor_ebpf::{
    ABI_VERSION, FLAG_PROXY4, FLAG_PROXY6, MAP_CONFIG, MAPS, PROGRAMS, RedirectConfig,
    TOKEN_KEY_LEN,
};
pub use maps::{Attributed, Attribution, ExemptCgroups, ProxySockets};
pub use object::object_hash;
pub use status::{ProgramStatus, Status, status};

use self::{
    log::KernelLog,
    maps::{ConfigMap, Stats, TokenKeyMap, ipv4_to_word, ipv6_to_words},
};

/// The IPv4 address of the EC2 instance metadata service.
pub const METADATA_IPV4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The IPv6 address of the EC2 instance metadata service (`fd00:ec2::254`).
pub const METADATA_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// The network namespace of the calling thread (a thread may have been moved to another
/// than its process's; what counts is where this code binds and attaches).
const OWN_NETNS: &str = "/proc/thread-self/ns/net";

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// What the programs rewrite, and to where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// The metadata address pods dial (IPv4); its port is used for IPv6 too.
    pub metadata4: SocketAddrV4,
    /// The IPv6 metadata address.
    pub metadata6: Ipv6Addr,
    /// The proxy for IPv4 (and IPv4-mapped) connects; `None` refuses them.
    pub proxy4: Option<SocketAddrV4>,
    /// The proxy for IPv6 connects; `None` refuses them (EPERM).
    pub proxy6: Option<SocketAddrV6>,
}

/// How to bring up the data path.
#[derive(Debug, Clone)]
pub struct Options {
    /// The bpffs directory that holds our pins.
    pub pin_dir: PathBuf,
    /// The cgroup the programs attach to; they apply to every cgroup below it.
    pub cgroup_root: PathBuf,
    pub redirect: Redirect,
    /// Replace pinned programs with this build's, without a gap.
    pub reload: bool,
    /// Let the programs log through aya-log (debug level). Off: the log calls cost a load
    /// and a branch and emit nothing.
    pub kernel_log: bool,
}

/// What [`Datapath::open`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Nothing was pinned: this build's programs were loaded and attached.
    Loaded,
    /// Attached programs were found pinned and re-used as they are.
    Reused,
    /// Pinned programs were replaced by this build's (`--reload`).
    Reloaded,
}

/// The attached programs and handles on their maps.
pub struct Datapath {
    outcome: Outcome,
    cgroup_id: u64,
    exempt: Arc<ExemptCgroups>,
    attribution: Arc<Attribution>,
    stats: Stats,
    proxy: ProxySockets,
    token_key: Mutex<TokenKeyMap>,
    kernel_log: Option<KernelLog>,
    /// The cgroup exempted as this process's own, if it was found.
    own_cgroup: Option<u64>,
}

impl Datapath {
    /// Makes sure this build's (or compatible pinned) programs are attached to
    /// `options.cgroup_root` with `options.redirect` configured, and exempts this process's
    /// own cgroup.
    pub fn open(options: &Options) -> Result<Self, Error> {
        ensure_bpffs(&options.pin_dir)?;
        fs::create_dir_all(&options.pin_dir)
            .map_err(Error::io(format!("creating {}", options.pin_dir.display())))?;
        let cgroup = File::open(&options.cgroup_root).map_err(|source| Error::Cgroup {
            path: options.cgroup_root.clone(),
            source,
        })?;
        let cgroup_id = cgroup
            .metadata()
            .map_err(|source| Error::Cgroup {
                path: options.cgroup_root.clone(),
                source,
            })?
            .ino();
        let netns = File::open(OWN_NETNS).map_err(Error::io(format!("opening {OWN_NETNS}")))?;
        let netns_id = netns
            .metadata()
            .map_err(Error::io(format!("reading {OWN_NETNS}")))?
            .ino();
        let targets = Targets {
            cgroup: &cgroup,
            cgroup_id,
            netns: &netns,
            netns_id,
        };

        let pinned = PROGRAMS
            .iter()
            .filter(|name| link_pin(&options.pin_dir, name).exists())
            .count();
        // Programs of another build (same ABI, same cgroup, another object hash: a
        // kernel-side fix that did not bump the ABI) are replaced, never reused silently;
        // the replacement attaches the new programs before removing the old (no gap).
        let other_build = ConfigMap::open(&options.pin_dir)
            .and_then(|map| map.get())
            .is_ok_and(|pinned| {
                pinned.abi_version == ABI_VERSION
                    && pinned.cgroup_id == cgroup_id
                    && pinned.netns_id == netns_id
                    && pinned.object_hash != object_hash()
            });
        if other_build && pinned == PROGRAMS.len() && !options.reload {
            tracing::info!(
                "the pinned programs are of another build; replacing them without a gap"
            );
        }
        let (outcome, kernel_log) = if pinned == PROGRAMS.len() && !options.reload && !other_build {
            reuse(options, &targets)?
        } else {
            let outcome = if pinned > 0 {
                Outcome::Reloaded
            } else {
                Outcome::Loaded
            };
            (outcome, load_and_attach(options, &targets)?)
        };

        let mut datapath = Self {
            outcome,
            cgroup_id,
            exempt: Arc::new(ExemptCgroups::open(&options.pin_dir)?),
            attribution: Arc::new(Attribution::open(&options.pin_dir)?),
            stats: Stats::open(&options.pin_dir)?,
            proxy: ProxySockets::open(&options.pin_dir)?,
            token_key: Mutex::new(TokenKeyMap::open(&options.pin_dir)?),
            kernel_log,
            own_cgroup: None,
        };
        // The agent's own connections (e.g. to the real metadata service for its own
        // credentials or allowed passthrough) must never be redirected to itself. Exactly
        // its own cgroup, or none when it cannot be found (never the host's root, which a
        // cgroup namespace would otherwise make it name).
        match crate::cgroupfs::own_cgroup_dir() {
            Ok(Some(own)) => match crate::cgroupfs::cgroup_id(&own) {
                Ok(id) => {
                    datapath.exempt.insert(id)?;
                    datapath.own_cgroup = Some(id);
                }
                Err(error) => tracing::warn!(%error, "exempting no cgroup of this process"),
            },
            Ok(None) => tracing::warn!(
                "this process's cgroup is not visible under the cgroup2 mount; exempting none"
            ),
            Err(error) => {
                tracing::warn!(%error, "this process's cgroup is unknown; exempting none")
            }
        }
        Ok(datapath)
    }

    /// Removes every exemption except this process's own cgroup, returning the ids
    /// removed. Exemptions live in a pinned map that outlives the agent, so one made under
    /// an earlier configuration (a namespace since dropped from
    /// `--node-identity-namespace`) would otherwise stay in force; the agent calls this at
    /// start, before readiness, and exempts again what its configuration wants.
    pub fn forget_exemptions(&self) -> Result<Vec<u64>, Error> {
        let stale: Vec<u64> = self
            .exempt
            .list()
            .into_iter()
            .filter(|id| Some(*id) != self.own_cgroup)
            .collect();
        for id in &stale {
            self.exempt.remove(*id)?;
        }
        Ok(stale)
    }

    pub fn outcome(&self) -> Outcome {
        self.outcome
    }

    /// The id of the cgroup the programs are attached to.
    pub fn cgroup_id(&self) -> u64 {
        self.cgroup_id
    }

    /// The kernel's per-connection records, shared with the proxy's accept loop.
    pub fn attribution(&self) -> Arc<Attribution> {
        Arc::clone(&self.attribution)
    }

    /// The kernel's exempt cgroups, shared with whoever manages opt-outs.
    pub fn exempt(&self) -> Arc<ExemptCgroups> {
        Arc::clone(&self.exempt)
    }

    /// Makes `listener` the socket the kernel hands connections to the proxy address of
    /// its family (see [`ProxySockets::insert`]); returns the address it is bound to.
    /// Until this is called, those connections are refused.
    pub fn steer_to(&self, listener: impl AsFd) -> Result<SocketAddr, Error> {
        self.proxy.insert(listener)
    }

    /// The IMDSv2 token key pinned beside the maps; `fresh` becomes it when there is none
    /// yet (see [`TokenKeyMap`]).
    pub fn token_key(&self, fresh: [u8; TOKEN_KEY_LEN]) -> Result<[u8; TOKEN_KEY_LEN], Error> {
        self.token_key
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_or_insert(fresh)
    }

    /// The programs' event counters, summed over CPUs.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        self.stats.read()
    }

    /// Starts forwarding the programs' aya-log records into tracing. Needs a Tokio runtime.
    pub fn spawn_kernel_log(&mut self) {
        if let Some(log) = self.kernel_log.take() {
            log.spawn();
        }
    }
}

fn link_pin(pin_dir: &Path, program: &str) -> PathBuf {
    pin_dir.join(format!("link_{program}"))
}

/// Where the programs attach: the pods' cgroup, and the network namespace the proxy
/// address lives in.
struct Targets<'a> {
    cgroup: &'a File,
    cgroup_id: u64,
    netns: &'a File,
    netns_id: u64,
}

impl Targets<'_> {
    fn ids(&self) -> (u64, u64) {
        (self.cgroup_id, self.netns_id)
    }
}

/// The configuration entry the programs read; `ids` are the attach cgroup's and network
/// namespace's.
fn kernel_config(redirect: &Redirect, ids: (u64, u64), object_hash: u64) -> RedirectConfig {
    let (cgroup_id, netns_id) = ids;
    let mut config = RedirectConfig {
        abi_version: ABI_VERSION,
        metadata_ip4: ipv4_to_word(*redirect.metadata4.ip()),
        metadata_ip6: ipv6_to_words(redirect.metadata6),
        metadata_port: redirect.metadata4.port().to_be(),
        cgroup_id,
        netns_id,
        object_hash,
        ..RedirectConfig::default()
    };
    if let Some(proxy) = redirect.proxy4 {
        config.flags |= FLAG_PROXY4;
        config.proxy_ip4 = ipv4_to_word(*proxy.ip());
        config.proxy_port4 = proxy.port().to_be();
    }
    if let Some(proxy) = redirect.proxy6 {
        config.flags |= FLAG_PROXY6;
        config.proxy_ip6 = ipv6_to_words(*proxy.ip());
        config.proxy_port6 = proxy.port().to_be();
    }
    config
}

/// Re-uses pinned programs: checks they are ours to use here, then updates the redirect
/// configuration in place (a restarted agent may have a new proxy address).
fn reuse(options: &Options, targets: &Targets<'_>) -> Result<(Outcome, Option<KernelLog>), Error> {
    let cgroup_id = targets.cgroup_id;
    let mut config = ConfigMap::open(&options.pin_dir)?;
    let current = config.get()?;
    if current.abi_version != ABI_VERSION {
        return Err(Error::AbiMismatch {
            found: current.abi_version,
            expected: ABI_VERSION,
        });
    }
    if current.cgroup_id != cgroup_id {
        return Err(Error::CgroupMismatch {
            pinned: current.cgroup_id,
            requested: cgroup_id,
            path: options.cgroup_root.clone(),
        });
    }
    if current.netns_id != targets.netns_id {
        return Err(Error::NetnsMismatch {
            pinned: current.netns_id,
            current: targets.netns_id,
        });
    }
    config.set(&kernel_config(
        &options.redirect,
        targets.ids(),
        current.object_hash,
    ))?;
    let kernel_log = status::program_id_of_link(&link_pin(&options.pin_dir, PROGRAMS[0]))
        .and_then(KernelLog::from_program_id);
    Ok((Outcome::Reused, kernel_log))
}

/// Loads this build's programs and attaches them, replacing any pinned links only after
/// the new ones are attached.
fn load_and_attach(options: &Options, targets: &Targets<'_>) -> Result<Option<KernelLog>, Error> {
    let pin_dir = &options.pin_dir;
    let config_pin = pin_dir.join(MAP_CONFIG);
    let compatible_maps = !config_pin.exists()
        || ConfigMap::open(pin_dir)
            .and_then(|map| map.get())
            .is_ok_and(|config| config.abi_version == ABI_VERSION);
    if !compatible_maps {
        // Maps of another layout cannot be shared with this build's programs. Unpinning
        // them leaves them alive for the old programs until their links are replaced.
        tracing::warn!("pinned maps are of another ABI version; replacing them");
        for name in MAPS {
            let _ = fs::remove_file(pin_dir.join(name));
        }
    }

    let object = object::object()?;
    let map_pins: Vec<(&'static str, PathBuf)> = MAPS
        .iter()
        .map(|name| (*name, pin_dir.join(name)))
        .collect();
    let log_level: u8 = if options.kernel_log {
        aya_log::Level::Debug as u8
    } else {
        0
    };
    let mut loader = EbpfLoader::new();
    for (name, path) in &map_pins {
        loader.map_pin_path(name, path.as_path());
    }
    loader.override_global("AYA_LOG_LEVEL", &log_level, false);
    let mut ebpf = loader.load(object).map_err(|source| Error::Load {
        source: Box::new(source),
    })?;

    // Configure before attaching, so the first connect the programs see is redirected.
    ConfigMap::open(pin_dir)?.set(&kernel_config(
        &options.redirect,
        targets.ids(),
        object_hash(),
    ))?;
    let kernel_log = KernelLog::from_ebpf(&mut ebpf);

    let mut fresh = Vec::new();
    for name in PROGRAMS {
        let link = attach_program(&mut ebpf, name, targets)?;
        let staging = pin_dir.join(format!("link_{name}_new"));
        let _ = fs::remove_file(&staging);
        link.pin(&staging).map_err(|source| Error::Pin {
            path: staging.clone(),
            source: Box::new(source),
        })?;
        fresh.push((name, staging));
    }
    // The new programs are attached; now the old links can go.
    for (name, staging) in fresh {
        let pin = link_pin(pin_dir, name);
        match fs::remove_file(&pin) {
            Ok(()) => tracing::info!(program = name, "replaced the previously pinned program"),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(Error::io(format!("removing {}", pin.display()))(error)),
        }
        fs::rename(&staging, &pin).map_err(Error::io(format!("pinning {}", pin.display())))?;
    }
    Ok(kernel_log)
}

/// Loads one program and attaches it to the cgroup (or, for sk_lookup, the network
/// namespace) with a BPF link (kernel 5.7+; sk_lookup 5.9+). Cgroup links always coexist
/// with other links on the same cgroup (the kernel rejects attach flags on them, hence
/// `Single`, which passes none): other tools' programs stay, and a reload runs old and
/// new side by side until the old links are removed. sk_lookup links coexist likewise:
/// the kernel runs every program attached to the namespace, in order.
fn attach_program(
    ebpf: &mut aya::Ebpf,
    name: &'static str,
    targets: &Targets<'_>,
) -> Result<FdLink, Error> {
    let cgroup = targets.cgroup;
    let program_error = |source| Error::Program {
        program: name,
        source: Box::new(source),
    };
    let link_error = |source| Error::Attach {
        program: name,
        source: Box::new(source),
    };
    match ebpf.program_mut(name) {
        Some(Program::CgroupSockAddr(program)) => {
            program.load().map_err(program_error)?;
            let id = program
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(program_error)?;
            let link = program.take_link(id).map_err(program_error)?;
            FdLink::try_from(link).map_err(link_error)
        }
        Some(Program::CgroupSkb(program)) => {
            program.load().map_err(program_error)?;
            let id = program
                .attach(
                    cgroup,
                    CgroupSkbAttachType::Egress,
                    CgroupAttachMode::Single,
                )
                .map_err(program_error)?;
            let link = program.take_link(id).map_err(program_error)?;
            FdLink::try_from(link).map_err(link_error)
        }
        Some(Program::SkLookup(program)) => {
            program.load().map_err(program_error)?;
            let id = program
                .attach(targets.netns.as_fd())
                .map_err(program_error)?;
            let link = program.take_link(id).map_err(program_error)?;
            Ok(FdLink::from(link))
        }
        Some(Program::SockOps(program)) => {
            program.load().map_err(program_error)?;
            let id = program
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(program_error)?;
            let link = program.take_link(id).map_err(program_error)?;
            FdLink::try_from(link).map_err(link_error)
        }
        _ => Err(Error::Load {
            source: Box::new(aya::EbpfError::ProgramError(
                aya::programs::ProgramError::UnexpectedProgramType,
            )),
        }),
    }
}

/// Mounts bpffs on the parent of `pin_dir` unless a bpffs is already there.
fn ensure_bpffs(pin_dir: &Path) -> Result<(), Error> {
    let root = pin_dir.parent().unwrap_or(Path::new("/sys/fs/bpf"));
    let bpffs_error = |source: std::io::Error| Error::Bpffs {
        path: root.to_path_buf(),
        source,
    };
    // `__fsword_t` is not i64 on every architecture.
    #[allow(clippy::unnecessary_cast)]
    let is_bpffs = |path: &Path| {
        nix::sys::statfs::statfs(path)
            .is_ok_and(|stat| stat.filesystem_type().0 as i64 == BPF_FS_MAGIC)
    };
    if is_bpffs(root) {
        return Ok(());
    }
    fs::create_dir_all(root).map_err(bpffs_error)?;
    nix::mount::mount(
        Some("bpf"),
        root,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|errno| bpffs_error(std::io::Error::from(errno)))?;
    tracing::info!(path = %root.display(), "mounted bpffs");
    Ok(())
}

/// Removes every link and map interceptor pinned under `pin_dir`: the programs detach and
/// unload once nothing else holds them. Every removal is attempted even if one fails; the
/// first failure is returned after. Returns the pins removed (none: nothing was there).
pub fn detach(pin_dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut removed = Vec::new();
    let mut first_error = None;
    let names = PROGRAMS
        .iter()
        .flat_map(|name| [format!("link_{name}"), format!("link_{name}_new")])
        .chain(MAPS.iter().map(|name| (*name).to_owned()));
    for name in names {
        let path = pin_dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                first_error.get_or_insert_with(|| {
                    Error::io(format!("removing {}", path.display()))(error)
                });
            }
        }
    }
    if let Some(error) = first_error {
        return Err(error);
    }
    match fs::remove_dir(pin_dir) {
        Ok(()) => Ok(removed),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(removed),
        Err(error) => Err(Error::io(format!(
            "removing {} (does it hold pins that are not interceptor's?)",
            pin_dir.display()
        ))(error)),
    }
}

#[cfg(test)]
mod tests;
