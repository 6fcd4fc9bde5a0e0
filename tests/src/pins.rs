//! A bpffs pin directory owned by a test: everything interceptor pins there is detached
//! and removed on drop (panics included).

use std::path::PathBuf;

pub struct Pins(pub PathBuf);

impl Pins {
    /// `/sys/fs/bpf/interceptor-test-<pid>-<name>`.
    pub fn new(name: &str) -> Self {
        Self(PathBuf::from(format!(
            "/sys/fs/bpf/interceptor-test-{}-{name}",
            std::process::id()
        )))
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = interceptor::ebpf::detach(&self.0);
    }
}
