//! Removes what earlier test runs left behind when they were killed before their guards
//! ran (a SIGKILL, a CI timeout): bpffs pins (whose links keep programs attached), the
//! simulated nodes' cgroups and the pods' named network namespaces.
//!
//! Only the tests' own names are touched, and only those of test processes that are gone:
//! pins are `/sys/fs/bpf/interceptor-test-<pid>-<name>`, cgroups
//! `<cgroup2>/interceptor-test-ic<pid % 100000>x<n>`, network namespaces
//! `icp<pid % 100000>x<n>` (tests/src/pins.rs, tests/src/node.rs). A test process is a
//! live process whose executable is under this run's target directory or any `target/`
//! directory; leftovers of any pid
//! (or pid residue) that one of those still has are kept, so a run beside another run on
//! the same machine does not pull the floor from under it.

use std::{
    collections::HashSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

const PIN_ROOT: &str = "/sys/fs/bpf";
const NETNS_DIR: &str = "/run/netns";

/// Sweeps every leftover of test processes that are gone; says what it removed.
pub fn sweep() {
    let live = LiveTests::scan();
    let mut removed = Vec::new();
    for (dir, name) in entries(Path::new(PIN_ROOT)) {
        if let Some(pid) = pin_pid(&name)
            && !live.pids.contains(&pid)
            && fs::remove_dir_all(&dir).is_ok()
        {
            removed.push(dir);
        }
    }
    if let Some(mount) = cgroup2_mount() {
        for (dir, name) in entries(&mount) {
            if let Some(residue) = name
                .strip_prefix("interceptor-test-ic")
                .and_then(residue_of)
                && !live.residues.contains(&residue)
                && remove_cgroup_tree(&dir)
            {
                removed.push(dir);
            }
        }
    }
    for (path, name) in entries(Path::new(NETNS_DIR)) {
        if let Some(residue) = name.strip_prefix("icp").and_then(residue_of)
            && !live.residues.contains(&residue)
            && Command::new("ip")
                .args(["netns", "del", &name])
                .status()
                .is_ok_and(|status| status.success())
        {
            removed.push(path);
        }
    }
    if !removed.is_empty() {
        eprintln!(
            "removed {} leftovers of earlier test runs: {}",
            removed.len(),
            removed
                .iter()
                .map(|path| path.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

/// The pids, and their residues modulo 100000, of the test processes alive now.
struct LiveTests {
    pids: HashSet<u32>,
    residues: HashSet<u32>,
}

impl LiveTests {
    fn scan() -> Self {
        // This run's own target directory may be anywhere (`CARGO_TARGET_DIR`); other
        // checkouts' runs are recognised by the default layout.
        let own = crate::run::target_dir();
        let pids: HashSet<u32> = entries(Path::new("/proc"))
            .filter_map(|(dir, name)| {
                let pid = name.parse::<u32>().ok()?;
                let exe = fs::read_link(dir.join("exe")).ok()?;
                let test = exe.starts_with(&own) || {
                    let exe = exe.to_string_lossy();
                    exe.contains("/target/debug/") || exe.contains("/target/release/")
                };
                test.then_some(pid)
            })
            .collect();
        let residues = pids.iter().map(|pid| pid % 100_000).collect();
        Self { pids, residues }
    }
}

fn entries(dir: &Path) -> impl Iterator<Item = (PathBuf, String)> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|entry| {
            (
                entry.path(),
                entry.file_name().to_string_lossy().into_owned(),
            )
        })
}

/// `interceptor-test-<pid>-<name>` -> pid.
fn pin_pid(name: &str) -> Option<u32> {
    name.strip_prefix("interceptor-test-")?
        .split_once('-')?
        .0
        .parse()
        .ok()
}

/// `<residue>x<n>` -> residue.
fn residue_of(rest: &str) -> Option<u32> {
    let (residue, n) = rest.split_once('x')?;
    n.parse::<u32>().ok()?;
    residue.parse().ok()
}

fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mount_point = left.split_whitespace().nth(4)?;
        (right.split_whitespace().next() == Some("cgroup2")).then(|| PathBuf::from(mount_point))
    })
}

/// Removes a cgroup and everything below it, ending the processes in it first (they are
/// the tests' own: pods' commands, agents, moto). True when it is gone.
fn remove_cgroup_tree(path: &Path) -> bool {
    for (child, _) in entries(path) {
        if child.is_dir() {
            remove_cgroup_tree(&child);
        }
    }
    let _ = fs::write(path.join("cgroup.kill"), "1");
    for _ in 0..100 {
        if fs::remove_dir(path).is_ok() || !path.exists() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_the_tests_leftovers_are_read_and_others_are_not() {
        assert_eq!(pin_pid("interceptor-test-13519-hostile-flood"), Some(13519));
        assert_eq!(pin_pid("interceptor"), None);
        assert_eq!(pin_pid("interceptor-test-x-1"), None);
        assert_eq!(residue_of("13519x24"), Some(13519));
        assert_eq!(residue_of("13519"), None);
        assert_eq!(residue_of("ab x1"), None);
    }
}
