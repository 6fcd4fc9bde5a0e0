//! The eBPF object this binary was built with (see `build.rs`).

use super::Error;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/interceptor-ebpf.o"));

/// The embedded object, or [`Error::ObjectMissing`] for a build made before
/// `cargo xtask build-ebpf`.
pub(super) fn object() -> Result<&'static [u8], Error> {
    if OBJECT.is_empty() {
        return Err(Error::ObjectMissing);
    }
    Ok(OBJECT)
}

/// A stable fingerprint of the embedded object (FNV-1a), recorded in the kernel's config
/// map so that `status` and a restarted agent can tell whose programs are attached.
pub fn object_hash() -> u64 {
    OBJECT.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
