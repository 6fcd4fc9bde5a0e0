//! Privileged tests run as root. Outside CI a test without root says so and returns;
//! under `CI=true` it fails with the reason, so CI can never pass by skipping.

/// `true` if the test may go on. Call first in every privileged test:
/// `if !require_root("what it needs") { return; }`
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        // Never run privileged in the machine's network namespace.
        crate::world::assert_entered();
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|value| value == "true" || value == "1");
    assert!(
        !ci,
        "{test} needs root (it loads eBPF programs and creates netns and cgroups); CI=true, so not skipping"
    );
    eprintln!("SKIPPED {test}: needs root");
    false
}
