//! Types and names shared by interceptor's kernel programs and its userspace agent.
//!
//! This is the one place where the two sides agree on a layout. Every struct is
//! `#[repr(C)]`, `Copy`, has no `Option`/enum fields and spells out its padding, so the
//! verifier, the compiler for `bpfel-unknown-none` and the host compiler all see the same
//! bytes. The `user` feature adds `aya::Pod` impls for userspace; the kernel build does not
//! enable it.
//!
//! Byte order is part of each field's contract and is written next to it: addresses are
//! kept in network byte order exactly as the kernel hands them over; ports are network byte
//! order in [`RedirectConfig`] (compared against `bpf_sock_addr::user_port`) and host byte
//! order in [`ConnKey`] (what `bpf_sock_ops::local_port` gives and what userspace reads
//! from a socket address).
#![no_std]

/// `bpftool prog show` names (the kernel keeps 15 characters).
pub const PROG_CONNECT4: &str = "imds_connect4";
pub const PROG_CONNECT6: &str = "imds_connect6";
pub const PROG_SOCKOPS: &str = "imds_sockops";
pub const PROG_EGRESS: &str = "imds_egress";
pub const PROG_STEER: &str = "imds_steer";
/// Every program, in the order the loader attaches them: the raw-packet backstop and the
/// steering to the agent's own socket first, so that both are in place before the connect
/// hooks send anything to the proxy address. `PROG_STEER` attaches to the network
/// namespace, the others to the pods' cgroup.
pub const PROGRAMS: [&str; 5] = [
    PROG_EGRESS,
    PROG_STEER,
    PROG_SOCKOPS,
    PROG_CONNECT4,
    PROG_CONNECT6,
];

/// `bpftool map show` names. The kernel crate repeats these as literals in `#[map(name = ..)]`
/// (the attribute takes no constants); a userspace test parses the built object and fails if
/// the two drift.
pub const MAP_CONFIG: &str = "imds_config";
pub const MAP_EXEMPT: &str = "imds_exempt";
pub const MAP_PENDING: &str = "imds_pending";
pub const MAP_CONNS: &str = "imds_conns";
pub const MAP_STATS: &str = "imds_stats";
pub const MAP_PROXY: &str = "imds_proxy";
pub const MAP_TOKEN_KEY: &str = "imds_token_key";
/// aya-log's ring buffer; its name is fixed by aya-log.
pub const MAP_LOGS: &str = "AYA_LOGS";
/// Every map the loader pins.
pub const MAPS: [&str; 8] = [
    MAP_CONFIG,
    MAP_EXEMPT,
    MAP_PENDING,
    MAP_CONNS,
    MAP_STATS,
    MAP_PROXY,
    MAP_TOKEN_KEY,
    MAP_LOGS,
];

/// Slots of [`MAP_PROXY`] (a SOCKMAP): the agent's own listening sockets, the only ones
/// connections to the proxy address reach.
pub const PROXY_SLOT_IPV4: u32 = 0;
pub const PROXY_SLOT_IPV6: u32 = 1;
pub const PROXY_SLOTS: u32 = 2;

/// Length of the key in [`MAP_TOKEN_KEY`]: the HMAC key the agent signs IMDSv2 session
/// tokens with. No program reads it; it is pinned so that it outlives an agent, and a
/// successor (an upgrade's takeover, a restart) accepts the tokens pods already hold.
pub const TOKEN_KEY_LEN: usize = 32;

/// Capacity of [`MAP_EXEMPT`]: cgroups allowed to reach the real metadata service.
pub const EXEMPT_MAX_ENTRIES: u32 = 4096;
/// Capacity of [`MAP_PENDING`] (LRU): connects seen by connect4/6 whose SYN is not out yet.
pub const PENDING_MAX_ENTRIES: u32 = 8192;
/// Capacity of [`MAP_CONNS`] (LRU): redirected connections the proxy has not accepted yet.
pub const CONNS_MAX_ENTRIES: u32 = 16384;

/// Bumped whenever a shared layout or a map's meaning changes. Pinned state of another
/// version is never reused silently.
pub const ABI_VERSION: u32 = 3;

pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

/// [`RedirectConfig::flags`]: an IPv4 proxy address is configured.
pub const FLAG_PROXY4: u32 = 1;
/// [`RedirectConfig::flags`]: an IPv6 proxy address is configured.
pub const FLAG_PROXY6: u32 = 1 << 1;

/// The single entry of [`MAP_CONFIG`] (an array of one). Written by the agent, read by
/// every program on every connect. A zeroed entry (no `FLAG_PROXY4`) makes connect4 refuse
/// metadata connections instead of letting them through: the programs fail closed until
/// the agent has configured them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RedirectConfig {
    pub abi_version: u32,
    pub flags: u32,
    /// Metadata service IPv4 address, network byte order.
    pub metadata_ip4: u32,
    /// Proxy IPv4 address, network byte order.
    pub proxy_ip4: u32,
    /// Metadata service IPv6 address, network byte order words.
    pub metadata_ip6: [u32; 4],
    /// Proxy IPv6 address, network byte order words.
    pub proxy_ip6: [u32; 4],
    /// Metadata service port, network byte order.
    pub metadata_port: u16,
    /// Proxy IPv4 port, network byte order.
    pub proxy_port4: u16,
    /// Proxy IPv6 port, network byte order.
    pub proxy_port6: u16,
    pub _pad0: u16,
    /// Inode (= cgroup id) of the cgroup the programs were attached to, for `status`.
    pub cgroup_id: u64,
    /// Hash of the eBPF object that was loaded, so an agent can tell whether the pinned
    /// programs are its own build.
    pub object_hash: u64,
    /// Inode of the network namespace the steering program is attached to (as
    /// `/proc/PID/ns/net` shows it), for `status` and to re-use it only there.
    pub netns_id: u64,
}

/// Key of [`MAP_CONNS`]: the redirected connection as the proxy sees it after `accept()`.
/// IPv4 addresses sit in word 0, the other words zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConnKey {
    /// [`AF_INET`] or [`AF_INET6`]; an IPv4-mapped IPv6 connection is keyed as IPv4,
    /// because that is how the proxy's IPv4 listener sees it.
    pub family: u32,
    /// Client (pod) port, host byte order.
    pub client_port: u16,
    /// Proxy port, host byte order.
    pub proxy_port: u16,
    /// Client address, network byte order words.
    pub client_addr: [u32; 4],
    /// Proxy address, network byte order words.
    pub proxy_addr: [u32; 4],
}

/// What the kernel recorded about a redirected connect, in the caller's own context.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConnRecord {
    /// `bpf_get_current_cgroup_id()` of the connecting task (cgroup v2 inode number).
    pub cgroup_id: u64,
    /// Thread-group id (process id) of the connecting task, in the initial pid namespace.
    pub pid: u32,
    /// Address family of the original destination.
    pub family: u32,
    /// Original destination address, network byte order words.
    pub orig_addr: [u32; 4],
    /// Original destination port, network byte order.
    pub orig_port: u16,
    pub _pad0: [u8; 2],
    /// The connecting socket's cookie, low 32 bits (was padding, zero, before): when an
    /// upgrade runs two builds' programs side by side, the second sock_ops program
    /// finds the record the first one moved and must tell "this connection, already
    /// recorded" from a stale record under the same addresses.
    pub cookie: u32,
}

/// Indices into [`MAP_STATS`] (a per-CPU array of `u64` counters).
pub mod stat {
    /// Metadata connects rewritten to the proxy.
    pub const REDIRECTED: u32 = 0;
    /// Metadata connects from exempt cgroups, left alone.
    pub const EXEMPT: u32 = 1;
    /// Metadata connects refused (returned 0: EPERM) because no proxy address is configured
    /// for that family or the record could not be stored.
    pub const REFUSED: u32 = 2;
    /// Redirected connections re-keyed by sock_ops for the proxy.
    pub const RECORDED: u32 = 3;
    /// sock_ops saw a connection to the proxy with no pending record (not ours, or evicted).
    pub const UNRECORDED: u32 = 4;
    /// Packets to a metadata address dropped by the egress backstop: sent by a
    /// non-exempt cgroup without a redirected connect (raw sockets, for example).
    pub const BACKSTOP_DROPPED: u32 = 5;
    /// sock_ops found a different record under a connection's key (same addresses, e.g.
    /// from another network namespace) and deleted it rather than substitute one caller
    /// for another.
    pub const COLLIDED: u32 = 6;
    /// Connections to the proxy address handed to the agent's own listening socket.
    pub const STEERED: u32 = 7;
    /// Connections to the proxy address refused because the agent's socket is not there
    /// (agent down, or not yet listening), whoever else listens on that address.
    pub const PROXY_DOWN: u32 = 8;
    pub const COUNT: u32 = 9;
    pub const NAMES: [&str; COUNT as usize] = [
        "redirected",
        "exempt",
        "refused",
        "recorded",
        "unrecorded",
        "backstop_dropped",
        "collided",
        "steered",
        "proxy_down",
    ];
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers and integer arrays,
    // with every padding byte written out as a field, so any bit pattern is valid and no
    // byte is uninitialised.
    unsafe impl aya::Pod for super::RedirectConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnRecord {}
}

const _: () = {
    assert!(core::mem::size_of::<RedirectConfig>() == 80);
    assert!(core::mem::size_of::<ConnKey>() == 40);
    assert!(core::mem::size_of::<ConnRecord>() == 40);
};
