//! Replays the fuzz targets' committed seed corpus and every input a fuzzing run found
//! (`interceptor/fuzz/regressions/<target>/`) through the same property checks the
//! `cargo fuzz` targets run, so that the normal test suite keeps them fixed.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for kind in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(kind).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| check(&data));
            assert!(outcome.is_ok(), "{} fails its property", path.display());
            replayed += 1;
        }
    }
    assert!(replayed >= 5, "{target}: only {replayed} committed inputs");
}

#[test]
fn imds_route() {
    replay("imds_route", checks::imds_route);
}

#[test]
fn imds_token() {
    replay("imds_token", checks::imds_token);
}

#[test]
fn policy() {
    replay("policy", checks::policy);
}

#[test]
fn cgroup_path() {
    replay("cgroup_path", checks::cgroup_path);
}

#[test]
fn bindings() {
    replay("bindings", checks::bindings);
}
