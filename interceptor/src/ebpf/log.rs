//! Forwards what the kernel programs log with aya-log into tracing, at debug level under
//! the `interceptor::kernel` target.

use std::os::fd::{AsFd, AsRawFd};

use aya_log::EbpfLogger;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        tracing::debug!(target: "interceptor::kernel", level = %record.level(), "{}", record.args());
    }

    fn flush(&self) {}
}

pub(super) struct KernelLog(EbpfLogger<ToTracing>);

impl KernelLog {
    pub(super) fn from_ebpf(ebpf: &mut aya::Ebpf) -> Option<Self> {
        EbpfLogger::init_with_logger(ebpf, ToTracing).ok().map(Self)
    }

    /// For re-used programs: find the ring buffer through the program's map ids.
    pub(super) fn from_program_id(program_id: u32) -> Option<Self> {
        EbpfLogger::init_from_id_with_logger(program_id, ToTracing)
            .ok()
            .map(Self)
    }

    /// Drains the ring buffer whenever it becomes readable, on a thread of its own (the
    /// wait is a plain `poll(2)`; the records are rare and small).
    pub(super) fn spawn(mut self) {
        let spawned = std::thread::Builder::new()
            .name("kernel-log".into())
            .spawn(move || {
                loop {
                    let mut fds = [PollFd::new(self.0.as_fd(), PollFlags::POLLIN)];
                    match poll(&mut fds, PollTimeout::from(1000u16)) {
                        Ok(_) | Err(nix::errno::Errno::EINTR) => self.0.flush(),
                        Err(error) => {
                            tracing::warn!(%error, "kernel log stopped");
                            return;
                        }
                    }
                }
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "kernel log not started");
        }
    }
}

impl AsRawFd for KernelLog {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}
