//! The simulated node and its pods (see the crate docs).

use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use crate::{
    cmd,
    fake_imds::Seen,
    world::{self, node_imds},
};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call, short enough for an interface name.
fn unique(prefix: &str) -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// A cgroup directory, removed with everything below it (processes killed first) on drop.
#[derive(Debug)]
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    /// Creates `path` and its missing parents.
    pub fn create(path: PathBuf) -> Self {
        fs::create_dir_all(&path)
            .unwrap_or_else(|error| panic!("creating cgroup {}: {error}", path.display()));
        Self { path }
    }

    /// The cgroup id the kernel reports for tasks in it: the directory's inode.
    pub fn id(&self) -> u64 {
        interceptor::cgroupfs::cgroup_id(&self.path).expect("cgroup id")
    }

    pub fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.path);
    }
}

fn remove_cgroup_tree(path: &Path) {
    if let Ok(entries) = fs::read_dir(path) {
        for entry in entries.filter_map(Result::ok) {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let _ = fs::write(path.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    while fs::remove_dir(path).is_err() && path.exists() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
}

/// A network namespace, deleted on drop (with the veth end inside it).
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: String) -> Self {
        cmd::run("ip", &["netns", "add", &name]);
        Self { name }
    }

    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        cmd::run("ip", &full)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        cmd::quiet("ip", &["netns", "del", &self.name]);
    }
}

/// A network interface in the host namespace, deleted on drop.
#[derive(Debug)]
struct Link(String);

impl Drop for Link {
    fn drop(&mut self) {
        cmd::quiet("ip", &["link", "del", &self.0]);
    }
}

/// A node: a bridge holding the node address, and a kubelet-shaped cgroup tree.
#[derive(Debug)]
pub struct Node {
    /// The node address pods reach the proxy on (the bridge's address).
    pub address: Ipv4Addr,
    /// The node's IPv6 address (a unique-local address on the bridge).
    pub address6: Ipv6Addr,
    subnet: u8,
    next_host: AtomicU32,
    /// Set by a test that asserts an exemption: its pods may reach the node's metadata
    /// service, and the test checks what did itself.
    node_imds_allowed: AtomicBool,
    // Drop order: the bridge, then the whole cgroup tree.
    bridge: Link,
    top: Cgroup,
    /// `kubepods.slice`: where the agent attaches its programs.
    pub kubepods: PathBuf,
}

impl Node {
    pub fn new() -> Self {
        world::assert_entered();
        // Running before the first pod exists, so a miss always finds it listening.
        node_imds();
        let name = unique("ic");
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let subnet = 10 + ((std::process::id() * 31 + n) % 240) as u8;
        let address = Ipv4Addr::new(10, 213, subnet, 1);
        let bridge = Link(format!("{name}b"));
        // A bridge without an address of its own takes the lowest of its ports' and
        // changes it when that port goes: the other pods would then hold a stale ARP entry
        // for the node and lose it for up to a minute (as a CNI bridge whose address is
        // set does not). Locally administered, one per subnet.
        let mac = format!("02:00:0a:d5:{subnet:02x}:01");
        cmd::run(
            "ip",
            &["link", "add", &bridge.0, "address", &mac, "type", "bridge"],
        );
        cmd::run(
            "ip",
            &["addr", "add", &format!("{address}/24"), "dev", &bridge.0],
        );
        let address6 = Ipv6Addr::new(0xfd00, 0x213, u16::from(subnet), 0, 0, 0, 0, 1);
        cmd::run(
            "ip",
            &[
                "-6",
                "addr",
                "add",
                &format!("{address6}/64"),
                "dev",
                &bridge.0,
                "nodad",
            ],
        );
        cmd::run("ip", &["link", "set", &bridge.0, "up"]);
        let mount = interceptor::cgroupfs::cgroup2_mount().expect("cgroup2 mount");
        let top = Cgroup::create(mount.join(format!("interceptor-test-{name}")));
        let kubepods = top.path.join("kubepods.slice");
        fs::create_dir_all(kubepods.join("kubepods-besteffort.slice")).expect("kubepods tree");
        Self {
            address,
            address6,
            subnet,
            next_host: AtomicU32::new(10),
            node_imds_allowed: AtomicBool::new(false),
            bridge,
            top,
            kubepods,
        }
    }

    /// The node's link-layer address (the bridge's), as pods resolve it.
    pub fn mac(&self) -> String {
        link_address(&self.bridge.0)
    }

    /// The test's top cgroup (the "node"), which holds `kubepods.slice` and anything else
    /// the test creates beside it.
    pub fn cgroup_top(&self) -> &Path {
        &self.top.path
    }

    /// A pod: netns + veth on the bridge + a containerd-style container cgroup.
    pub fn pod(&self) -> Pod {
        self.pod_with_uid(uuid_like(&unique("")))
    }

    /// A pod with the given UID: for pods created through a real API server first, which
    /// assigns the UID the kubelet then names the pod's cgroup after.
    pub fn pod_with_uid(&self, uid: String) -> Pod {
        let host = self.next_host.fetch_add(1, Ordering::Relaxed);
        let ip = Ipv4Addr::new(
            10,
            213,
            self.subnet,
            u8::try_from(host).expect("< 250 pods"),
        );
        let PodCgroups {
            uid,
            container_id,
            container,
            pod_slice,
        } = self.pod_cgroups_with_uid(uid);
        let netns = Netns::create(unique("icp"));
        let veth = Link(unique("icv"));
        cmd::run(
            "ip",
            &[
                "link",
                "add",
                &veth.0,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &netns.name,
            ],
        );
        cmd::run(
            "ip",
            &["link", "set", &veth.0, "master", &self.bridge.0, "up"],
        );
        netns.exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        let ip6 = Ipv6Addr::new(
            0xfd00,
            0x213,
            u16::from(self.subnet),
            0,
            0,
            0,
            0,
            host as u16,
        );
        netns.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{ip6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        netns.exec(&["ip", "link", "set", "eth0", "up"]);
        netns.exec(&["ip", "link", "set", "lo", "up"]);
        // As on a real node, the metadata address is routed to the node: a connect the
        // redirect misses reaches the node's own metadata service (see `crate::world`).
        let via = self.address.to_string();
        netns.exec(&["ip", "route", "add", "default", "via", &via]);
        let via6 = self.address6.to_string();
        netns.exec(&["ip", "-6", "route", "add", "default", "via", &via6]);
        Pod {
            ip,
            ip6,
            uid,
            container_id,
            container,
            pod_slice,
            veth,
            netns,
        }
    }

    /// Only the cgroups of a pod (no network): for pods whose processes share another
    /// pod's network namespace, as hostNetwork pods share the node's.
    pub fn pod_cgroups(&self) -> PodCgroups {
        self.pod_cgroups_with_uid(uuid_like(&unique("")))
    }

    /// Only the cgroups of a pod with the given UID: for pods created through a real API
    /// server first (see [`Self::pod_with_uid`]).
    pub fn pod_cgroups_with_uid(&self, uid: String) -> PodCgroups {
        let container_id = format!("{:0>64}", unique("").replace('x', "0"));
        let slice = self
            .kubepods
            .join("kubepods-besteffort.slice")
            .join(format!(
                "kubepods-besteffort-pod{}.slice",
                uid.replace('-', "_")
            ));
        let pod_slice = Cgroup::create(slice.clone());
        let container = Cgroup::create(slice.join(format!("cri-containerd-{container_id}.scope")));
        PodCgroups {
            uid,
            container_id,
            container,
            pod_slice,
        }
    }

    /// Everything that reached the node's own metadata service from this node's pods, or
    /// from the node itself (which parallel tests share, so it counts against each).
    pub fn node_imds_seen(&self) -> Vec<Seen> {
        node_imds()
            .seen()
            .into_iter()
            .filter(|seen| self.owns(seen.peer.ip()) || !from_any_pod(seen.peer.ip()))
            .collect()
    }

    /// For a test that asserts an exemption (a pod or process the agent must leave
    /// alone): its pods may reach the node's metadata service without failing the test on
    /// drop. The test checks [`node_imds_seen`](Self::node_imds_seen) itself.
    pub fn allow_node_imds(&self) {
        self.node_imds_allowed.store(true, Ordering::Relaxed);
    }

    /// Panics, with what was seen, if anything reached the node's metadata service from
    /// this node. [`Drop`] calls it for every test that did not opt out.
    pub fn assert_no_node_imds_reached(&self) {
        let seen = self.node_imds_seen();
        assert!(
            seen.is_empty(),
            "LEAK: the node's own metadata service (169.254.169.254, holding the node's \
             credentials) was reached: {seen:#?}"
        );
    }

    fn owns(&self, ip: std::net::IpAddr) -> bool {
        match ip {
            std::net::IpAddr::V4(ip) => ip.octets()[..3] == [10, 213, self.subnet],
            std::net::IpAddr::V6(ip) => {
                ip.segments()[..4] == [0xfd00, 0x213, u16::from(self.subnet), 0]
            }
        }
    }

    /// A cgroup beside `kubepods.slice` (e.g. `system.slice/foo.service`): outside the
    /// attached tree.
    pub fn outside_cgroup(&self, relative: &str) -> Cgroup {
        Cgroup::create(self.top.path.join(relative))
    }
}

/// Any pod of any node in this process: 10.213.0.0/16 and fd00:213::/32.
fn from_any_pod(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(ip) => ip.octets()[..2] == [10, 213],
        std::net::IpAddr::V6(ip) => ip.segments()[..2] == [0xfd00, 0x213],
    }
}

impl Drop for Node {
    /// Every end-to-end test fails if a pod reached the node's metadata service, unless it
    /// asserts an exemption ([`Node::allow_node_imds`]). Not while already panicking (the
    /// test failed anyway, and a second panic would abort the cleanup).
    fn drop(&mut self) {
        if !self.node_imds_allowed.load(Ordering::Relaxed) && !thread::panicking() {
            self.assert_no_node_imds_reached();
        }
    }
}

impl Default for Node {
    fn default() -> Self {
        Self::new()
    }
}

/// Asks `ip`: /sys/class/net shows the machine's namespace, not the test's.
fn link_address(link: &str) -> String {
    let out = cmd::run("ip", &["-o", "link", "show", "dev", link]);
    out.split_whitespace()
        .skip_while(|word| *word != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no link-layer address for {link} in: {out}"))
        .to_owned()
}

fn uuid_like(seed: &str) -> String {
    let digits: String = seed.chars().filter(char::is_ascii_digit).collect();
    let hex = format!("{digits:0>32}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// A pod's cgroups, as the kubelet lays them out (systemd driver, containerd).
#[derive(Debug)]
pub struct PodCgroups {
    pub uid: String,
    pub container_id: String,
    // Drop order: the container's cgroup, then the pod's.
    pub container: Cgroup,
    pub pod_slice: Cgroup,
}

/// A simulated pod. Dropping it kills its processes and removes its netns and cgroups.
#[derive(Debug)]
pub struct Pod {
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub uid: String,
    pub container_id: String,
    // Drop order: processes and cgroups, then the veth, then the netns.
    pub container: Cgroup,
    pub pod_slice: Cgroup,
    /// The node's end of the pair (on the bridge), removed on drop.
    veth: Link,
    pub netns: Netns,
}

impl Pod {
    /// The link-layer address of the node's end of the pod's veth pair.
    pub fn node_side_mac(&self) -> String {
        link_address(&self.veth.0)
    }

    /// `program args` run inside the pod's container cgroup and network namespace.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        in_cgroup(&self.container, Some(&self.netns), program, args)
    }
}

/// `program args` started inside `cgroup` (and `netns`). The shell moves itself into the
/// cgroup before exec, so the program and its children are there from their first
/// instruction. `nsenter --net` (not `ip netns exec`) keeps the host's /sys mounts.
pub fn in_cgroup(cgroup: &Cgroup, netns: Option<&Netns>, program: &str, args: &[&str]) -> Command {
    let mut command = Command::new("sh");
    let script = match netns {
        Some(netns) => format!(
            "echo $$ > \"$0\" && exec nsenter --net=/run/netns/{} -- \"$@\"",
            netns.name
        ),
        None => "echo $$ > \"$0\" && exec \"$@\"".to_owned(),
    };
    command
        .arg("-c")
        .arg(script)
        .arg(cgroup.procs_file())
        .arg(program)
        .args(args);
    command
}
