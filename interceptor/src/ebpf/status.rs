//! `interceptor status`: what is attached, as the kernel holds it (an operator's view of
//! what bpftool shows, in interceptor's terms).

use std::{
    collections::VecDeque,
    fmt, fs,
    net::{SocketAddrV4, SocketAddrV6},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::programs::links::{FdLink, PinnedLink};
use interceptor_ebpf::{
    ABI_VERSION, CONNS_MAX_ENTRIES, FLAG_PROXY4, FLAG_PROXY6, PENDING_MAX_ENTRIES, PROGRAMS,
    RedirectConfig,
};
use serde::Serialize;

use super::{
    Error, link_pin,
    maps::{self, ConfigMap, ExemptCgroups, Stats, word_to_ipv4, words_to_ipv6},
    object_hash,
};

#[derive(Debug, Serialize)]
pub struct ProgramStatus {
    pub name: &'static str,
    pub link_pin: PathBuf,
    pub attached: bool,
    pub link_id: Option<u32>,
    pub program_id: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct ConfigView {
    pub abi_version: u32,
    pub metadata: String,
    pub metadata6: String,
    pub proxy4: Option<String>,
    pub proxy6: Option<String>,
    pub cgroup_id: u64,
    pub cgroup_path: Option<PathBuf>,
    /// Inode of the network namespace the steering program is attached to
    /// (`readlink /proc/PID/ns/net` shows `net:[ID]`).
    pub netns_id: u64,
    pub object_hash: String,
    pub object_is_this_build: bool,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub pin_dir: PathBuf,
    pub programs: Vec<ProgramStatus>,
    pub config: Option<ConfigView>,
    pub exempt_cgroups: Vec<u64>,
    pub pending_entries: Option<usize>,
    pub pending_capacity: u32,
    pub conn_entries: Option<usize>,
    pub conn_capacity: u32,
    pub counters: Vec<(&'static str, u64)>,
}

impl Status {
    /// Every program attached and configured.
    pub fn attached(&self) -> bool {
        self.config.is_some() && self.programs.iter().all(|program| program.attached)
    }
}

pub(super) fn program_id_of_link(pin: &Path) -> Option<u32> {
    let link = FdLink::from(PinnedLink::from_pin(pin).ok()?);
    link.info().ok().map(|info| info.program_id())
}

/// Reads the state pinned under `pin_dir`; works whether or not an agent is running.
pub fn status(pin_dir: &Path) -> Result<Status, Error> {
    if !pin_dir.is_dir() {
        return Err(Error::NotAttached(pin_dir.to_path_buf()));
    }
    let programs = PROGRAMS
        .iter()
        .map(|name| {
            let pin = link_pin(pin_dir, name);
            let info = PinnedLink::from_pin(&pin)
                .ok()
                .and_then(|link| FdLink::from(link).info().ok());
            ProgramStatus {
                name,
                attached: info.is_some(),
                link_id: info.as_ref().map(|info| info.id()),
                program_id: info.as_ref().map(|info| info.program_id()),
                link_pin: pin,
            }
        })
        .collect();
    let config = ConfigMap::open(pin_dir)
        .and_then(|map| map.get())
        .ok()
        .filter(|config| config.abi_version != 0)
        .map(view);
    let occupancy = maps::occupancy(pin_dir).ok();
    Ok(Status {
        pin_dir: pin_dir.to_path_buf(),
        programs,
        config,
        exempt_cgroups: ExemptCgroups::open(pin_dir)
            .map(|map| map.list())
            .unwrap_or_default(),
        pending_entries: occupancy.map(|(pending, _)| pending),
        pending_capacity: PENDING_MAX_ENTRIES,
        conn_entries: occupancy.map(|(_, conns)| conns),
        conn_capacity: CONNS_MAX_ENTRIES,
        counters: Stats::open(pin_dir)
            .map(|stats| stats.read())
            .unwrap_or_default(),
    })
}

fn view(config: RedirectConfig) -> ConfigView {
    let port = u16::from_be(config.metadata_port);
    ConfigView {
        abi_version: config.abi_version,
        metadata: SocketAddrV4::new(word_to_ipv4(config.metadata_ip4), port).to_string(),
        metadata6: SocketAddrV6::new(words_to_ipv6(config.metadata_ip6), port, 0, 0).to_string(),
        proxy4: (config.flags & FLAG_PROXY4 != 0).then(|| {
            SocketAddrV4::new(
                word_to_ipv4(config.proxy_ip4),
                u16::from_be(config.proxy_port4),
            )
            .to_string()
        }),
        proxy6: (config.flags & FLAG_PROXY6 != 0).then(|| {
            SocketAddrV6::new(
                words_to_ipv6(config.proxy_ip6),
                u16::from_be(config.proxy_port6),
                0,
                0,
            )
            .to_string()
        }),
        cgroup_id: config.cgroup_id,
        cgroup_path: find_cgroup(config.cgroup_id),
        netns_id: config.netns_id,
        object_hash: format!("{:016x}", config.object_hash),
        object_is_this_build: config.object_hash == object_hash(),
    }
}

/// The directory of a cgroup id: a breadth-first walk of the cgroup2 tree, bounded so
/// that a huge tree costs a bounded time.
fn find_cgroup(id: u64) -> Option<PathBuf> {
    const MAX_DIRS: usize = 20_000;
    let mount = crate::cgroupfs::cgroup2_mount().ok()?;
    let mut queue = VecDeque::from([mount]);
    let mut seen = 0;
    while let Some(dir) = queue.pop_front() {
        seen += 1;
        if seen > MAX_DIRS {
            return None;
        }
        if fs::metadata(&dir).is_ok_and(|meta| meta.ino() == id) {
            return Some(dir);
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        queue.extend(
            entries
                .filter_map(Result::ok)
                .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
                .map(|entry| entry.path()),
        );
    }
    None
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "pins: {}", self.pin_dir.display())?;
        writeln!(f, "programs:")?;
        for program in &self.programs {
            match (program.link_id, program.program_id) {
                (Some(link), Some(prog)) => writeln!(
                    f,
                    "  {:<14} attached (link id {link}, prog id {prog})",
                    program.name
                )?,
                _ => writeln!(f, "  {:<14} NOT attached", program.name)?,
            }
        }
        match &self.config {
            Some(config) => {
                let cgroup = config.cgroup_path.as_ref().map_or_else(
                    || "(path not found)".to_owned(),
                    |p| p.display().to_string(),
                );
                writeln!(f, "cgroup:   {cgroup} (id {})", config.cgroup_id)?;
                writeln!(
                    f,
                    "netns:    net:[{}] (steering to the agent's socket)",
                    config.netns_id
                )?;
                writeln!(f, "metadata: {} and {}", config.metadata, config.metadata6)?;
                let refused = "refused (EPERM)".to_owned();
                writeln!(
                    f,
                    "proxy v4: {}",
                    config.proxy4.as_ref().unwrap_or(&refused)
                )?;
                writeln!(
                    f,
                    "proxy v6: {}",
                    config.proxy6.as_ref().unwrap_or(&refused)
                )?;
                let build = if config.object_is_this_build {
                    "this build"
                } else {
                    "another build"
                };
                writeln!(
                    f,
                    "object:   {} ({build}), ABI {} (this build speaks {ABI_VERSION})",
                    config.object_hash, config.abi_version
                )?;
            }
            None => writeln!(f, "config:   none")?,
        }
        writeln!(f, "exempt cgroups: {:?}", self.exempt_cgroups)?;
        let show = |n: Option<usize>| n.map_or_else(|| "?".to_owned(), |n| n.to_string());
        writeln!(
            f,
            "maps:     pending {}/{}, conns {}/{}",
            show(self.pending_entries),
            self.pending_capacity,
            show(self.conn_entries),
            self.conn_capacity
        )?;
        let counters: Vec<String> = self
            .counters
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        write!(f, "counters: {}", counters.join(" "))
    }
}
