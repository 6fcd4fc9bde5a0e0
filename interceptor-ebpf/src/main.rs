//! interceptor's kernel programs.
//!
//! * `imds_connect4` / `imds_connect6` (`cgroup/connect4`, `cgroup/connect6`) run in the
//!   context of the task calling `connect()`. A TCP connect to the metadata address is
//!   rewritten to the agent's proxy and the caller's cgroup id and pid are recorded under
//!   the socket's cookie. The rewrite happens before the route lookup, so the original
//!   destination needs no route.
//! * `imds_sockops` (`sockops`, `BPF_SOCK_OPS_TCP_CONNECT_CB`) runs once the source port is
//!   chosen and before the SYN leaves: it moves the record to a key made of the
//!   connection's addresses, which is what the proxy can see after `accept()`.
//! * `imds_egress` (`cgroup_skb/egress`) is the backstop for what no connect hook sees:
//!   an IP packet to a metadata address (IPv4 or IPv6, any protocol) leaving a socket of a
//!   cgroup that is not exempt is dropped. Redirected connections never carry a metadata
//!   destination (connect rewrote it), so what is dropped is what the redirect did not
//!   produce: raw sockets (CAP_NET_RAW is in the default container capability set),
//!   UDP, hand-made SYNs.
//! * `imds_steer` (`sk_lookup`, attached to the agent's network namespace) decides which
//!   socket receives a TCP connection to the proxy address: only the agent's own listener,
//!   held in the `imds_proxy` SOCKMAP. With no socket there (agent down: the kernel removes
//!   a closed socket from the map by itself) the connection is refused, even if another
//!   process listens on that address, so a squatter on the proxy port never receives a
//!   pod's request.
//!
//! Every entry point is a thin wrapper; the raw context reads live in `ctx` below.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{
            BPF_SK_LOOKUP_F_NO_REUSEPORT, BPF_SK_LOOKUP_F_REPLACE, BPF_SOCK_OPS_TCP_CONNECT_CB,
            bpf_sock_addr, sk_action,
        },
        helpers::{
            bpf_get_current_pid_tgid,
            generated::{bpf_get_current_cgroup_id, bpf_skb_cgroup_id},
        },
        macros::{cgroup_skb, cgroup_sock_addr, map, sk_lookup, sock_ops},
        maps::{Array, HashMap, LruHashMap, PerCpuArray, SockMap},
        programs::{SkBuffContext, SkLookupContext, SockAddrContext, SockOpsContext},
    };
    use aya_log_ebpf::debug;
    use interceptor_ebpf::{
        AF_INET, AF_INET6, CONNS_MAX_ENTRIES, ConnKey, ConnRecord, EXEMPT_MAX_ENTRIES, FLAG_PROXY4,
        FLAG_PROXY6, PENDING_MAX_ENTRIES, PROXY_SLOT_IPV4, PROXY_SLOT_IPV6, PROXY_SLOTS,
        RedirectConfig, TOKEN_KEY_LEN, stat,
    };

    const SOCK_STREAM: u32 = 1;
    /// `connect()` proceeds (possibly to a rewritten address).
    const ALLOW: i32 = 1;
    /// `connect()` fails with EPERM.
    const REFUSE: i32 = 0;
    /// `::ffff:0:0/96` third word, network byte order.
    const V4_MAPPED_WORD2: u32 = 0x0000_ffffu32.to_be();

    #[map(name = "imds_config")]
    static CONFIG: Array<RedirectConfig> = Array::with_max_entries(1, 0);

    #[map(name = "imds_exempt")]
    static EXEMPT: HashMap<u64, u8> = HashMap::with_max_entries(EXEMPT_MAX_ENTRIES, 0);

    #[map(name = "imds_pending")]
    static PENDING: LruHashMap<u64, ConnRecord> =
        LruHashMap::with_max_entries(PENDING_MAX_ENTRIES, 0);

    #[map(name = "imds_conns")]
    static CONNS: LruHashMap<ConnKey, ConnRecord> =
        LruHashMap::with_max_entries(CONNS_MAX_ENTRIES, 0);

    #[map(name = "imds_stats")]
    static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

    #[map(name = "imds_proxy")]
    static PROXY: SockMap = SockMap::with_max_entries(PROXY_SLOTS, 0);

    /// Userspace's only: the IMDSv2 token key, pinned to outlive the agent (one entry,
    /// key 0).
    #[map(name = "imds_token_key")]
    static TOKEN_KEY: HashMap<u32, [u8; TOKEN_KEY_LEN]> = HashMap::with_max_entries(1, 0);

    #[cgroup_sock_addr(connect4)]
    pub fn imds_connect4(ctx: SockAddrContext) -> i32 {
        try_connect4(&ctx)
    }

    #[cgroup_sock_addr(connect6)]
    pub fn imds_connect6(ctx: SockAddrContext) -> i32 {
        try_connect6(&ctx)
    }

    #[sock_ops]
    pub fn imds_sockops(ctx: SockOpsContext) -> u32 {
        try_sockops(&ctx);
        // The return value of a sock_ops program is ignored for TCP_CONNECT_CB.
        1
    }

    #[cgroup_skb(egress)]
    pub fn imds_egress(ctx: SkBuffContext) -> i32 {
        try_egress(&ctx)
    }

    #[sk_lookup]
    pub fn imds_steer(ctx: SkLookupContext) -> u32 {
        try_steer(&ctx)
    }

    const IPPROTO_TCP: u32 = 6;

    /// Steers a TCP connection to the proxy address to the agent's own socket, or refuses
    /// it. Everything else (other addresses and ports, UDP) is left to the kernel's usual
    /// lookup and to other programs.
    fn try_steer(ctx: &SkLookupContext) -> u32 {
        let lookup = ctx::sk_lookup(ctx);
        if lookup.protocol != IPPROTO_TCP {
            return sk_action::SK_PASS;
        }
        let Some(config) = CONFIG.get(0) else {
            return sk_action::SK_PASS;
        };
        // local_port is host byte order here; the configured ports are network order.
        let port = lookup.local_port;
        let slot = if lookup.family == AF_INET {
            if config.flags & FLAG_PROXY4 == 0
                || port != u32::from(u16::from_be(config.proxy_port4))
                || lookup.local_ip4 != config.proxy_ip4
            {
                return sk_action::SK_PASS;
            }
            PROXY_SLOT_IPV4
        } else if lookup.family == AF_INET6 {
            if config.flags & FLAG_PROXY6 == 0
                || port != u32::from(u16::from_be(config.proxy_port6))
                || ctx::local_ip6(ctx) != config.proxy_ip6
            {
                return sk_action::SK_PASS;
            }
            PROXY_SLOT_IPV6
        } else {
            return sk_action::SK_PASS;
        };
        // REPLACE: whatever an earlier program chose for this address, the agent's socket
        // wins (a reload runs two of these side by side, both choosing it).
        // NO_REUSEPORT: exactly this socket, not a member of its SO_REUSEPORT group that
        // someone else bound beside it.
        let flags = u64::from(BPF_SK_LOOKUP_F_REPLACE | BPF_SK_LOOKUP_F_NO_REUSEPORT);
        if PROXY.redirect_sk_lookup(ctx, slot, flags).is_ok() {
            count(stat::STEERED);
            return sk_action::SK_PASS;
        }
        // No agent socket (or one the kernel refused to assign): refuse, whoever else
        // listens on the address.
        count(stat::PROXY_DOWN);
        sk_action::SK_DROP
    }

    /// `cgroup_skb` verdicts.
    const PASS: i32 = 1;
    const DROP: i32 = 0;
    /// `ETH_P_IP` / `ETH_P_IPV6` as `__sk_buff::protocol` holds them (network byte order).
    const ETH_P_IP_BE: u32 = (0x0800u16).to_be() as u32;
    const ETH_P_IPV6_BE: u32 = (0x86DDu16).to_be() as u32;
    /// Offsets of the destination address in the IPv4 and IPv6 headers (the data of a
    /// cgroup_skb program starts at the network header).
    const IP4_DADDR: usize = 16;
    const IP6_DADDR: usize = 24;

    fn try_egress(ctx: &SkBuffContext) -> i32 {
        let Some(config) = CONFIG.get(0) else {
            return PASS;
        };
        let protocol = ctx.skb.protocol();
        let to_metadata = if protocol == ETH_P_IP_BE {
            ctx.load::<u32>(IP4_DADDR)
                .is_ok_and(|daddr| daddr == config.metadata_ip4)
        } else if protocol == ETH_P_IPV6_BE {
            ctx.load::<[u32; 4]>(IP6_DADDR)
                .is_ok_and(|daddr| daddr == config.metadata_ip6)
        } else {
            false
        };
        if !to_metadata {
            return PASS;
        }
        // SAFETY: a helper taking the program's own context, valid in cgroup_skb programs.
        let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
        if EXEMPT.get_ptr(cgroup_id).is_some() {
            return PASS;
        }
        count(stat::BACKSTOP_DROPPED);
        DROP
    }

    fn try_connect4(ctx: &SockAddrContext) -> i32 {
        let addr = ctx::sock_addr(ctx);
        if addr.type_ != SOCK_STREAM {
            return ALLOW;
        }
        let Some(config) = CONFIG.get(0) else {
            return ALLOW;
        };
        // The common case (any other destination) costs two compares.
        if addr.user_ip4 != config.metadata_ip4 || port_of(addr) != config.metadata_port {
            return ALLOW;
        }
        if config.flags & FLAG_PROXY4 == 0 {
            count(stat::REFUSED);
            debug!(ctx, "imds connect4 refused: no proxy address configured");
            return REFUSE;
        }
        redirect(
            ctx,
            AF_INET,
            [config.metadata_ip4, 0, 0, 0],
            config.metadata_port,
            || ctx::set_ip4(ctx, config.proxy_ip4, config.proxy_port4),
        )
    }

    fn try_connect6(ctx: &SockAddrContext) -> i32 {
        let addr = ctx::sock_addr(ctx);
        if addr.type_ != SOCK_STREAM {
            return ALLOW;
        }
        let Some(config) = CONFIG.get(0) else {
            return ALLOW;
        };
        let port = port_of(addr);
        if port != config.metadata_port {
            return ALLOW;
        }
        let ip6 = ctx::user_ip6(ctx);
        // A dual-stack socket reaches the IPv4 metadata address as ::ffff:169.254.169.254,
        // through this hook and not connect4: redirect it to the IPv4 proxy, mapped.
        if ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED_WORD2 && ip6[3] == config.metadata_ip4
        {
            if config.flags & FLAG_PROXY4 == 0 {
                count(stat::REFUSED);
                return REFUSE;
            }
            let mapped = [0, 0, V4_MAPPED_WORD2, config.proxy_ip4];
            return redirect(ctx, AF_INET6, ip6, port, || {
                ctx::set_ip6(ctx, mapped, config.proxy_port4)
            });
        }
        if ip6 != config.metadata_ip6 {
            return ALLOW;
        }
        if config.flags & FLAG_PROXY6 == 0 {
            // No IPv6 proxy: refusing is the only answer that cannot leak the node's role.
            count(stat::REFUSED);
            debug!(
                ctx,
                "imds connect6 refused: no IPv6 proxy address configured"
            );
            return REFUSE;
        }
        redirect(ctx, AF_INET6, ip6, port, || {
            ctx::set_ip6(ctx, config.proxy_ip6, config.proxy_port6)
        })
    }

    /// Records who is connecting, then rewrites the destination. Exempt cgroups are left
    /// alone; a record that cannot be stored refuses the connect rather than sending the
    /// proxy a connection it could not attribute.
    fn redirect(
        ctx: &SockAddrContext,
        family: u32,
        orig_addr: [u32; 4],
        orig_port: u16,
        rewrite: impl FnOnce(),
    ) -> i32 {
        // SAFETY: a helper without arguments, valid in cgroup_sock_addr programs.
        let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
        if EXEMPT.get_ptr(cgroup_id).is_some() {
            count(stat::EXEMPT);
            return ALLOW;
        }
        let record = ConnRecord {
            cgroup_id,
            pid: (bpf_get_current_pid_tgid() >> 32) as u32,
            family,
            orig_addr,
            orig_port,
            _pad0: [0; 2],
            cookie: ctx::cookie(ctx) as u32,
        };
        if PENDING.insert(ctx::cookie(ctx), record, 0).is_err() {
            count(stat::REFUSED);
            return REFUSE;
        }
        rewrite();
        count(stat::REDIRECTED);
        debug!(
            ctx,
            "imds connect redirected to the proxy: cgroup {}", cgroup_id
        );
        ALLOW
    }

    fn try_sockops(ctx: &SockOpsContext) {
        if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
            return;
        }
        let Some(key) = conn_key(ctx) else {
            return;
        };
        // Only connections towards the proxy can have a record; skip the others cheaply.
        let Some(config) = CONFIG.get(0) else {
            return;
        };
        let to_proxy = if key.family == AF_INET {
            config.flags & FLAG_PROXY4 != 0
                && key.proxy_addr[0] == config.proxy_ip4
                && key.proxy_port == u16::from_be(config.proxy_port4)
        } else {
            config.flags & FLAG_PROXY6 != 0
                && key.proxy_addr == config.proxy_ip6
                && key.proxy_port == u16::from_be(config.proxy_port6)
        };
        if !to_proxy {
            return;
        }
        let cookie = ctx::cookie(ctx);
        let Some(record) = PENDING.get_ptr(cookie) else {
            // During an upgrade's overlap the other build's program ran first and moved
            // this very connection's record: it stays.
            // SAFETY: the pointer comes from a successful lookup; only a field is read.
            if let Some(existing) = CONNS.get_ptr(key)
                && unsafe { (*existing).cookie } == cookie as u32
            {
                return;
            }
            // A connection made straight to the proxy (not redirected) carries no record.
            // An older record under the same addresses (a redirected connect the proxy
            // never accepted, e.g. while the agent was down) must not be inherited: a
            // process sharing the address (hostNetwork pods) could otherwise reuse the port
            // and be served as the earlier caller.
            let _ = CONNS.remove(key);
            count(stat::UNRECORDED);
            return;
        };
        // SAFETY: the pointer comes from a successful lookup in this map; the entry is
        // copied out before it is removed.
        let record = unsafe { *record };
        let _ = PENDING.remove(cookie);
        // The key holds addresses only, not the network namespace: two pods with the same
        // address in different namespaces (or one that reuses a port before the proxy
        // accepted the earlier connection) can collide. Overwriting would hand the proxy
        // the second caller's record for the first connection; deleting both refuses the
        // connections instead (the proxy answers 403 to a connection without a record).
        // SAFETY: as above; the entry is only compared, inside this program.
        if let Some(existing) = CONNS.get_ptr(key)
            && unsafe { *existing } != record
        {
            let _ = CONNS.remove(key);
            count(stat::COLLIDED);
            return;
        }
        if CONNS.insert(key, record, 0).is_ok() {
            count(stat::RECORDED);
        }
    }

    /// The connection's addresses as the proxy will see them after `accept()`.
    fn conn_key(ctx: &SockOpsContext) -> Option<ConnKey> {
        let family = ctx.family();
        let client_port = ctx.local_port() as u16;
        // On little-endian hosts the kernel hands sock_ops' remote_port over as the
        // network-order port shifted into the upper 16 bits (a long-standing quirk of
        // this context field; bpf_sock's remote_port differs).
        let proxy_port = u16::from_be((ctx.remote_port() >> 16) as u16);
        if family == AF_INET {
            return Some(ConnKey {
                family: AF_INET,
                client_port,
                proxy_port,
                client_addr: [ctx.local_ip4(), 0, 0, 0],
                proxy_addr: [ctx.remote_ip4(), 0, 0, 0],
            });
        }
        if family != AF_INET6 {
            return None;
        }
        let (local, remote) = (ctx.local_ip6(), ctx.remote_ip6());
        let mapped = remote[0] == 0 && remote[1] == 0 && remote[2] == V4_MAPPED_WORD2;
        Some(if mapped {
            ConnKey {
                family: AF_INET,
                client_port,
                proxy_port,
                client_addr: [local[3], 0, 0, 0],
                proxy_addr: [remote[3], 0, 0, 0],
            }
        } else {
            ConnKey {
                family: AF_INET6,
                client_port,
                proxy_port,
                client_addr: local,
                proxy_addr: remote,
            }
        })
    }

    fn port_of(addr: &bpf_sock_addr) -> u16 {
        // user_port holds the port in network byte order in its low 16 bits.
        addr.user_port as u16
    }

    fn count(index: u32) {
        if let Some(counter) = STATS.get_ptr_mut(index) {
            // SAFETY: per-CPU slot of this CPU; programs do not migrate while running.
            unsafe { *counter += 1 };
        }
    }

    /// Raw context access, in one place.
    mod ctx {
        use core::ptr::{read_volatile, write_volatile};

        use aya_ebpf::{
            EbpfContext,
            bindings::{bpf_sk_lookup, bpf_sock_addr},
            helpers::generated::bpf_get_socket_cookie,
            programs::{SkLookupContext, SockAddrContext},
        };

        pub fn sock_addr(ctx: &SockAddrContext) -> &bpf_sock_addr {
            // SAFETY: the kernel passes a valid `bpf_sock_addr` for the program's lifetime.
            unsafe { &*ctx.sock_addr }
        }

        pub fn sk_lookup(ctx: &SkLookupContext) -> &bpf_sk_lookup {
            // SAFETY: the kernel passes a valid `bpf_sk_lookup` for the program's lifetime.
            unsafe { &*ctx.lookup }
        }

        pub fn local_ip6(ctx: &SkLookupContext) -> [u32; 4] {
            let lookup = ctx.lookup;
            // SAFETY: valid context pointer (above); in-bounds u32 fields.
            unsafe {
                [
                    read_volatile(&raw const (*lookup).local_ip6[0]),
                    read_volatile(&raw const (*lookup).local_ip6[1]),
                    read_volatile(&raw const (*lookup).local_ip6[2]),
                    read_volatile(&raw const (*lookup).local_ip6[3]),
                ]
            }
        }

        // The verifier allows only direct, naturally sized accesses to the context, so
        // the address words are read and written one at a time, volatile so that the
        // compiler cannot merge them into wider accesses.

        pub fn user_ip6(ctx: &SockAddrContext) -> [u32; 4] {
            let addr = ctx.sock_addr;
            // SAFETY: valid context pointer (above); in-bounds u32 fields.
            unsafe {
                [
                    read_volatile(&raw const (*addr).user_ip6[0]),
                    read_volatile(&raw const (*addr).user_ip6[1]),
                    read_volatile(&raw const (*addr).user_ip6[2]),
                    read_volatile(&raw const (*addr).user_ip6[3]),
                ]
            }
        }

        /// Rewrites the destination; `port` in network byte order.
        pub fn set_ip4(ctx: &SockAddrContext, ip: u32, port: u16) {
            let addr = ctx.sock_addr;
            // SAFETY: valid context pointer; user_ip4/user_port are writable in connect4
            // and connect6 (for the mapped case the kernel reads user_ip6 instead).
            unsafe {
                write_volatile(&raw mut (*addr).user_ip4, ip);
                write_volatile(&raw mut (*addr).user_port, u32::from(port));
            }
        }

        /// Rewrites the destination; `port` in network byte order.
        pub fn set_ip6(ctx: &SockAddrContext, ip: [u32; 4], port: u16) {
            let addr = ctx.sock_addr;
            // SAFETY: valid context pointer; user_ip6/user_port are writable in connect6.
            unsafe {
                write_volatile(&raw mut (*addr).user_ip6[0], ip[0]);
                write_volatile(&raw mut (*addr).user_ip6[1], ip[1]);
                write_volatile(&raw mut (*addr).user_ip6[2], ip[2]);
                write_volatile(&raw mut (*addr).user_ip6[3], ip[3]);
                write_volatile(&raw mut (*addr).user_port, u32::from(port));
            }
        }

        pub fn cookie(ctx: &impl EbpfContext) -> u64 {
            // SAFETY: bpf_get_socket_cookie accepts sock_addr and sock_ops contexts.
            unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
        }
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
