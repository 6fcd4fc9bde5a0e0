//! Where `cargo xtask setup` installed the test peers (see xtask/src/setup.rs): a Python
//! virtualenv and an npm directory, each named after the hash of the file listing them.

use std::path::{Path, PathBuf};

fn installed(env: &str, kind: &str, spec: &str, marker: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join(spec);
    let bytes = std::fs::read(&spec).unwrap_or_else(|error| panic!("{}: {error}", spec.display()));
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    let path = home.join(format!(".local/share/interceptor/{kind}-{hash:016x}"));
    assert!(
        path.join(marker).exists(),
        "no test peers at {}: run `cargo xtask setup`",
        path.display()
    );
    path
}

/// The virtualenv with moto, boto3, the AWS CLI and kubernetes-validate.
pub fn venv() -> PathBuf {
    installed(
        "INTERCEPTOR_PY_VENV",
        "venv",
        "peers/requirements.txt",
        "bin/moto_server",
    )
}

/// The npm directory with the AWS SDK for JavaScript v3.
pub fn js_peers() -> PathBuf {
    installed(
        "INTERCEPTOR_JS_PEERS",
        "js",
        "peers/js/package.json",
        "node_modules/@aws-sdk/client-sts",
    )
}
