//! The world a test process lives in: a network namespace of its own, which is the
//! simulated node's, holding the metadata address and a fake of the node's metadata
//! service there.
//!
//! Before `main` (and so before any thread exists: a thread keeps the namespace of the
//! thread that created it), every process linking this crate as root moves itself into a
//! fresh network namespace, brings up `lo` and puts 169.254.169.254/32 and
//! fd00:ec2::254/128 on `lo` (the kernel here has no dummy interfaces). Everything the test starts (moto, etcd and
//! kube-apiserver, the agent, the fakes) lives there, and that namespace has no link to
//! the machine's network: nothing a test does can reach the machine's own metadata address
//! or anything outside. Pods route to the node (their default route is the bridge's
//! address), as on a real node, so a connection the agent's redirect misses reaches
//! [`node_imds`]: a faithful IMDSv2 fake holding the node's credentials that records
//! every connection with its peer. [`crate::Node`] fails its test on drop if one of its
//! pods reached it, so no end-to-end test can count a missed redirect as an ordinary
//! failure.
//!
//! Consequences: `/sys/class/net` still shows the namespace /sys was mounted in (the
//! machine's), so the harness asks `ip` about links; child processes inherit the
//! namespace. Without root, `unshare` is refused and nothing changes: privileged tests
//! then skip (or fail under CI, see [`crate::require_root`]).

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    process::Command,
    sync::OnceLock,
};

use crate::fake_imds::FakeImds;

/// The metadata addresses, held by the node (the test process's namespace).
pub const METADATA_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
pub const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// What entering the namespace did: `Err(reason)` if this process still shares the
/// machine's.
static ENTERED: OnceLock<Result<(), String>> = OnceLock::new();

// Runs before main, while the process has one thread (what the `ctor` crate does, without
// a dependency for five lines). It must not panic: nothing could catch it there.
#[used]
#[unsafe(link_section = ".init_array")]
static ENTER: extern "C" fn() = enter_at_start;

extern "C" fn enter_at_start() {
    let _ = ENTERED.set(enter());
}

/// Names the namespace a test process entered (its inode), for the processes it starts
/// from its own executable (the bench's floor server): they stay in it instead of
/// entering one more.
const WORLD_NETNS: &str = "INTERCEPTOR_TEST_WORLD_NETNS";

fn netns_inode() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/net")
        .ok()
        .map(|meta| meta.ino())
}

fn enter() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("not root: the process stays in the machine's network namespace".into());
    }
    // Started by a test process from its namespace: already in the world.
    if let (Some(world), Some(own)) = (std::env::var_os(WORLD_NETNS), netns_inode())
        && world.to_str().and_then(|world| world.parse().ok()) == Some(own)
    {
        return Ok(());
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|error| format!("unshare(CLONE_NEWNET): {error}"))?;
    if let Some(inode) = netns_inode() {
        // SAFETY: this runs before main, while the process has a single thread.
        unsafe { std::env::set_var(WORLD_NETNS, inode.to_string()) };
    }
    let v4 = format!("{METADATA_V4}/32");
    let v6 = format!("{METADATA_V6}/128");
    for args in [
        &["link", "set", "lo", "up"][..],
        &["addr", "add", &v4, "dev", "lo"],
        &["-6", "addr", "add", &v6, "dev", "lo", "nodad"],
    ] {
        let out = Command::new("ip")
            .args(args)
            .output()
            .map_err(|error| format!("running ip: {error}"))?;
        if !out.status.success() {
            return Err(format!(
                "`ip {}`: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(())
}

/// `Ok` once this process is in its own network namespace, the node's.
pub fn entered() -> Result<(), String> {
    ENTERED
        .get()
        .cloned()
        .unwrap_or_else(|| Err("the constructor did not run".into()))
}

/// Panics unless the process is in its own network namespace: nothing privileged may run
/// in the machine's.
pub fn assert_entered() {
    if let Err(reason) = entered() {
        panic!("the test process is not in a network namespace of its own: {reason}");
    }
}

/// The node's own metadata service on 169.254.169.254:80 and [fd00:ec2::254]:80, started
/// on first use on a thread (and runtime) of its own, so it outlives every test.
pub fn node_imds() -> &'static FakeImds {
    static IMDS: OnceLock<FakeImds> = OnceLock::new();
    IMDS.get_or_init(|| {
        assert_entered();
        let (send, receive) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("node-imds".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the node's metadata service");
                runtime.block_on(async move {
                    let on = [
                        SocketAddr::from((METADATA_V4, 80)),
                        SocketAddr::from((METADATA_V6, 80)),
                    ];
                    let _ = send.send(FakeImds::start_on(&on, 1).await);
                    std::future::pending::<()>().await
                });
            })
            .expect("start the node's metadata service");
        receive.recv().expect("the node's metadata service started")
    })
}
