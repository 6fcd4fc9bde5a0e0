//! A bpffs pin directory owned by a test: everything interceptor pins there is detached
//! and removed on drop (panics included).

use std::{net::SocketAddrV4, path::PathBuf};

use interceptor::ebpf::{METADATA_IPV4, METADATA_IPV6, Options, Redirect};

use crate::Node;

pub struct Pins(pub PathBuf);

impl Pins {
    /// `/sys/fs/bpf/interceptor-test-<pid>-<name>`.
    pub fn new(name: &str) -> Self {
        Self(PathBuf::from(format!(
            "/sys/fs/bpf/interceptor-test-{}-{name}",
            std::process::id()
        )))
    }

    /// How a test attaches the programs pinned here to `node`'s pod tree: IPv4 metadata
    /// connects redirected to `proxy`, no reload, no kernel log.
    pub fn options(&self, node: &Node, proxy: SocketAddrV4) -> Options {
        Options {
            pin_dir: self.0.clone(),
            cgroup_root: node.kubepods.clone(),
            redirect: redirect_to(proxy),
            reload: false,
            kernel_log: false,
        }
    }
}

/// Metadata connects (IPv4 port 80) redirected to `proxy`; IPv6 ones to no proxy.
pub fn redirect_to(proxy: SocketAddrV4) -> Redirect {
    Redirect {
        metadata4: SocketAddrV4::new(METADATA_IPV4, 80),
        metadata6: METADATA_IPV6,
        proxy4: Some(proxy),
        proxy6: None,
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = interceptor::ebpf::detach(&self.0);
    }
}
