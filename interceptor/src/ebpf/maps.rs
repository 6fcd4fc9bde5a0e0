//! Typed handles on the kernel maps, opened from their bpffs pins.
//!
//! Handles are opened from the pins rather than taken from a loaded `aya::Ebpf`, so the
//! same code serves an agent that loaded the programs and one that re-uses programs a
//! previous agent left attached.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
    path::Path,
    sync::Mutex,
};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, SockMap};
use interceptor_ebpf::{
    AF_INET, AF_INET6, CONNS_MAX_ENTRIES, ConnKey, ConnRecord, EXEMPT_MAX_ENTRIES, MAP_CONFIG,
    MAP_CONNS, MAP_EXEMPT, MAP_PENDING, MAP_PROXY, MAP_STATS, MAP_TOKEN_KEY, PENDING_MAX_ENTRIES,
    PROXY_SLOT_IPV4, PROXY_SLOT_IPV6, RedirectConfig, TOKEN_KEY_LEN, stat,
};

use super::Error;

fn open(dir: &Path, name: &'static str) -> Result<Map, Error> {
    let map = |source| Error::Map {
        map: name,
        source: Box::new(source),
    };
    let data = MapData::from_pin(dir.join(name)).map_err(map)?;
    Map::from_map_data(data).map_err(map)
}

fn typed<T: TryFrom<Map, Error = aya::maps::MapError>>(
    dir: &Path,
    name: &'static str,
) -> Result<T, Error> {
    T::try_from(open(dir, name)?).map_err(|source| Error::Map {
        map: name,
        source: Box::new(source),
    })
}

fn map_error(map: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |source| Error::Map {
        map,
        source: Box::new(source),
    }
}

/// The redirect configuration the programs read on every connect.
pub struct ConfigMap(Array<MapData, RedirectConfig>);

impl ConfigMap {
    pub fn open(dir: &Path) -> Result<Self, Error> {
        typed(dir, MAP_CONFIG).map(Self)
    }

    pub fn get(&self) -> Result<RedirectConfig, Error> {
        self.0.get(&0, 0).map_err(map_error(MAP_CONFIG))
    }

    /// Replaces the whole entry; the kernel copies it under the element lock, so programs
    /// see either the old or the new configuration, never a mix.
    pub fn set(&mut self, config: &RedirectConfig) -> Result<(), Error> {
        self.0.set(0, config, 0).map_err(map_error(MAP_CONFIG))
    }
}

/// Cgroups whose connects are never redirected.
pub struct ExemptCgroups(Mutex<HashMap<MapData, u64, u8>>);

impl ExemptCgroups {
    pub fn open(dir: &Path) -> Result<Self, Error> {
        typed(dir, MAP_EXEMPT).map(|map| Self(Mutex::new(map)))
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<MapData, u64, u8>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn insert(&self, cgroup_id: u64) -> Result<(), Error> {
        self.map()
            .insert(cgroup_id, 1, 0)
            .map_err(map_error(MAP_EXEMPT))
    }

    pub fn remove(&self, cgroup_id: u64) -> Result<(), Error> {
        match self.map().remove(&cgroup_id) {
            Err(error) if is_not_found(&error) => Ok(()),
            Ok(()) => Ok(()),
            Err(source) => Err(map_error(MAP_EXEMPT)(source)),
        }
    }

    pub fn list(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.map().keys().filter_map(Result::ok).collect();
        ids.sort_unstable();
        ids
    }
}

/// The proxy's listening sockets, as the steering program (`imds_steer`) finds them: a
/// TCP connection to the proxy address reaches the socket in its family's slot, and is
/// refused when the slot is empty. The kernel empties a slot itself when its socket
/// closes (the agent exits or crashes), so a process that binds the proxy address while
/// the agent is down receives nothing.
pub struct ProxySockets(Mutex<SockMap<MapData>>);

impl ProxySockets {
    pub fn open(dir: &Path) -> Result<Self, Error> {
        typed(dir, MAP_PROXY).map(|map| Self(Mutex::new(map)))
    }

    /// Makes `listener` (a listening TCP socket) the one connections to the proxy
    /// address of its family reach, replacing the socket there in one step: connections
    /// already accepted stay where they are, new ones come here. Returns the address it
    /// is bound to.
    pub fn insert(&self, listener: impl AsFd) -> Result<SocketAddr, Error> {
        let socket = socket2::SockRef::from(&listener);
        let local = socket
            .local_addr()
            .ok()
            .and_then(|addr| addr.as_socket())
            .ok_or_else(|| {
                Error::io("reading the proxy listener's address")(std::io::Error::from(
                    std::io::ErrorKind::InvalidInput,
                ))
            })?;
        let slot = match local {
            SocketAddr::V4(_) => PROXY_SLOT_IPV4,
            SocketAddr::V6(_) => PROXY_SLOT_IPV6,
        };
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .set(slot, &listener.as_fd(), 0)
            .map_err(map_error(MAP_PROXY))?;
        Ok(local)
    }
}

/// The IMDSv2 token key, pinned so that it outlives an agent: a successor (an upgrade's
/// takeover, a restart) verifies the tokens pods already hold instead of answering them
/// 401. No program reads it; the pin is root's (mode 0600), as the other maps.
pub struct TokenKeyMap(HashMap<MapData, u32, [u8; TOKEN_KEY_LEN]>);

impl TokenKeyMap {
    pub fn open(dir: &Path) -> Result<Self, Error> {
        typed(dir, MAP_TOKEN_KEY).map(Self)
    }

    /// The pinned key; `fresh` is stored first when there is none. Two agents starting at
    /// once agree: the insert only succeeds where no key exists (`BPF_NOEXIST`), and both
    /// then read the one that won.
    pub fn get_or_insert(
        &mut self,
        fresh: [u8; TOKEN_KEY_LEN],
    ) -> Result<[u8; TOKEN_KEY_LEN], Error> {
        const BPF_NOEXIST: u64 = 1;
        match self.0.insert(0, fresh, BPF_NOEXIST) {
            Ok(()) => {}
            Err(aya::maps::MapError::SyscallError(error))
                if error.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(source) => return Err(map_error(MAP_TOKEN_KEY)(source)),
        }
        self.0.get(&0, 0).map_err(map_error(MAP_TOKEN_KEY))
    }
}

/// Who made a redirected connection, as the kernel recorded it in the caller's context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attributed {
    pub cgroup_id: u64,
    pub pid: u32,
    /// Where the caller meant to connect (the metadata address).
    pub original_destination: SocketAddr,
}

impl From<ConnRecord> for Attributed {
    fn from(record: ConnRecord) -> Self {
        let port = u16::from_be(record.orig_port);
        let ip = if record.family == AF_INET6 {
            IpAddr::V6(words_to_ipv6(record.orig_addr))
        } else {
            IpAddr::V4(word_to_ipv4(record.orig_addr[0]))
        };
        Self {
            cgroup_id: record.cgroup_id,
            pid: record.pid,
            original_destination: SocketAddr::new(ip, port),
        }
    }
}

/// A missing key: aya reports it as `KeyNotFound` for lookups and as ENOENT from the
/// syscall for deletes.
fn is_not_found(error: &aya::maps::MapError) -> bool {
    match error {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(aya::sys::SyscallError { io_error, .. }) => {
            io_error.raw_os_error() == Some(libc::ENOENT)
        }
        _ => false,
    }
}

/// The kernel's records of redirected connections, keyed by the connection's addresses.
pub struct Attribution(Mutex<HashMap<MapData, ConnKey, ConnRecord>>);

impl Attribution {
    pub fn open(dir: &Path) -> Result<Self, Error> {
        typed(dir, MAP_CONNS).map(|map| Self(Mutex::new(map)))
    }

    /// The record for an accepted connection (`peer` = the pod's end, `local` = ours),
    /// removed so that it is consumed exactly once. `None`: the kernel recorded nothing,
    /// so the connection did not come through the redirect and must not be served.
    pub fn take(&self, peer: SocketAddr, local: SocketAddr) -> Result<Option<Attributed>, Error> {
        let Some(key) = conn_key(peer, local) else {
            return Ok(None);
        };
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let record = match map.get(&key, 0) {
            Ok(record) => record,
            Err(aya::maps::MapError::KeyNotFound) => return Ok(None),
            Err(source) => return Err(map_error(MAP_CONNS)(source)),
        };
        match map.remove(&key) {
            Ok(()) => {}
            // Gone already: evicted, or (never) consumed twice; the record read stands.
            Err(error) if is_not_found(&error) => {}
            Err(source) => return Err(map_error(MAP_CONNS)(source)),
        }
        Ok(Some(record.into()))
    }
}

/// The map key for a connection as the proxy sees it. IPv4-mapped IPv6 addresses (a
/// dual-stack listener) are keyed as IPv4, as the kernel side does.
pub fn conn_key(peer: SocketAddr, local: SocketAddr) -> Option<ConnKey> {
    let canonical = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match (canonical(peer.ip()), canonical(local.ip())) {
        (IpAddr::V4(client), IpAddr::V4(proxy)) => Some(ConnKey {
            family: AF_INET,
            client_port: peer.port(),
            proxy_port: local.port(),
            client_addr: [ipv4_to_word(client), 0, 0, 0],
            proxy_addr: [ipv4_to_word(proxy), 0, 0, 0],
        }),
        (IpAddr::V6(client), IpAddr::V6(proxy)) => Some(ConnKey {
            family: AF_INET6,
            client_port: peer.port(),
            proxy_port: local.port(),
            client_addr: ipv6_to_words(client),
            proxy_addr: ipv6_to_words(proxy),
        }),
        _ => None,
    }
}

/// An IPv4 address as the kernel stores it in a `u32`: network byte order in memory.
pub fn ipv4_to_word(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub fn word_to_ipv4(word: u32) -> Ipv4Addr {
    Ipv4Addr::from(word.to_ne_bytes())
}

pub fn ipv6_to_words(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

pub fn words_to_ipv6(words: [u32; 4]) -> Ipv6Addr {
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    Ipv6Addr::from(octets)
}

/// Per-CPU event counters kept by the programs, summed.
pub struct Stats(PerCpuArray<MapData, u64>);

impl Stats {
    pub fn open(dir: &Path) -> Result<Self, Error> {
        typed(dir, MAP_STATS).map(Self)
    }

    /// `(name, total)` for every counter.
    pub fn read(&self) -> Vec<(&'static str, u64)> {
        (0..stat::COUNT)
            .map(|index| {
                let total = self
                    .0
                    .get(&index, 0)
                    .map(|values| values.iter().sum())
                    .unwrap_or(0);
                (stat::NAMES[index as usize], total)
            })
            .collect()
    }
}

/// The kernel maps' capacities, named as the `interceptor_tracked` kinds that count their
/// entries (so that `interceptor_tracked / interceptor_capacity` is how full each is).
pub fn capacities() -> [(&'static str, u32); 3] {
    [
        ("kernel_pending", PENDING_MAX_ENTRIES),
        ("kernel_conns", CONNS_MAX_ENTRIES),
        ("kernel_exempt", EXEMPT_MAX_ENTRIES),
    ]
}

/// Entries currently in the two attribution maps: `(pending, conns)`.
pub fn occupancy(dir: &Path) -> Result<(usize, usize), Error> {
    let pending: HashMap<MapData, u64, ConnRecord> = typed(dir, MAP_PENDING)?;
    let conns: HashMap<MapData, ConnKey, ConnRecord> = typed(dir, MAP_CONNS)?;
    Ok((pending.keys().count(), conns.keys().count()))
}
