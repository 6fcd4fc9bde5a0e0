use std::{io, path::PathBuf};

/// What went wrong talking to the kernel, with the kernel's own evidence (errno, verifier
/// log) kept as the source and a hint at what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "this binary was built without its eBPF object: run `cargo xtask build-ebpf`, then rebuild"
    )]
    ObjectMissing,
    #[error("bpffs at {path}: {source}{}", hint(source))]
    Bpffs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {path}: {source}{}", hint(source))]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("loading the eBPF object: {source}")]
    Load {
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("program {program}: {source}{}", program_hint(source))]
    Program {
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<aya::pin::PinError>,
    },
    #[error("link of program {program}: {source}")]
    Attach {
        program: &'static str,
        #[source]
        source: Box<aya::programs::links::LinkError>,
    },
    #[error("pinned link {path}: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: Box<aya::programs::links::LinkError>,
    },
    #[error(
        "the pinned programs speak ABI version {found}, this agent speaks {expected}: \
         restart with --reload to replace them"
    )]
    AbiMismatch { found: u32, expected: u32 },
    #[error(
        "the pinned programs are attached to cgroup id {pinned}, not to {path} (id {requested}): \
         restart with --reload to move them, or run `interceptor detach` first"
    )]
    CgroupMismatch {
        pinned: u64,
        requested: u64,
        path: PathBuf,
    },
    #[error(
        "the pinned steering program is attached to network namespace {pinned}, this process \
         runs in {current}: restart with --reload to move it (the agent must run in the \
         node's network namespace: hostNetwork), or run `interceptor detach` first"
    )]
    NetnsMismatch { pinned: u64, current: u64 },
    #[error("nothing of interceptor is pinned under {0}")]
    NotAttached(PathBuf),
    #[error("{context}: {source}{}", hint(source))]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::ObjectMissing => "object_missing",
            Self::Bpffs { .. } => "bpffs",
            Self::Cgroup { .. } => "cgroup",
            Self::Load { .. } => "load",
            Self::Program { .. } => "program",
            Self::Map { .. } => "map",
            Self::Pin { .. } => "pin",
            Self::Link { .. } => "link",
            Self::Attach { .. } => "attach",
            Self::AbiMismatch { .. } => "abi_mismatch",
            Self::CgroupMismatch { .. } => "cgroup_mismatch",
            Self::NetnsMismatch { .. } => "netns_mismatch",
            Self::NotAttached(_) => "not_attached",
            Self::Io { .. } => "io",
        }
    }

    pub(super) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}

const PERMISSION_HINT: &str = " (the agent needs root or CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_SYS_RESOURCE on kernels that still charge memlock)";

fn hint(error: &io::Error) -> &'static str {
    match error.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => PERMISSION_HINT,
        Some(libc::ENOENT) => " (does the path exist? is cgroup v2 / bpffs mounted there?)",
        Some(libc::EROFS) => " (read-only: mount the host's path read-write into the agent)",
        _ => "",
    }
}

fn program_hint(error: &aya::programs::ProgramError) -> &'static str {
    use aya::{programs::ProgramError, sys::SyscallError};
    match error {
        ProgramError::LoadError { io_error, .. }
        | ProgramError::SyscallError(SyscallError { io_error, .. }) => hint(io_error),
        _ => "",
    }
}
