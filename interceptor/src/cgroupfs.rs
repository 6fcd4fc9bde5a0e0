//! Where cgroup v2 lives on this machine, and which cgroup a process is in.
//!
//! The cgroup2 mount differs between hosts (`/sys/fs/cgroup` on unified hosts,
//! `/sys/fs/cgroup/unified` on hybrid ones), so it is always read from
//! `/proc/self/mountinfo`, never assumed. A cgroup's id, as `bpf_get_current_cgroup_id()`
//! returns it, is the inode number of its directory.

use std::{
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no cgroup2 filesystem is mounted (looked in /proc/self/mountinfo); interceptor needs cgroup v2"
    )]
    NoCgroup2,
    #[error(
        "no kubelet pods cgroup (kubepods.slice or kubepods) under {mount}; pass --cgroup-root"
    )]
    NoKubepods { mount: PathBuf },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a cgroup v2 path in /proc/self/cgroup")]
    NoUnifiedEntry { path: PathBuf },
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::NoCgroup2 => "no_cgroup2",
            Self::NoKubepods { .. } => "no_kubepods",
            Self::Read { .. } => "read",
            Self::NoUnifiedEntry { .. } => "no_unified_entry",
        }
    }
}

/// The mount point of the cgroup2 filesystem, from mountinfo text.
pub fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <options> [optional...] - <fstype> ..."
        let (before, after) = line.split_once(" - ")?;
        let fstype = after.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount_point = before.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(index) = rest.find('\\') {
        out.push_str(&rest[..index]);
        let code = rest.get(index + 1..index + 4);
        match code.and_then(|digits| u8::from_str_radix(digits, 8).ok()) {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[index + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[index + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The cgroup2 mount point of this machine.
pub fn cgroup2_mount() -> Result<PathBuf, Error> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.into(),
        source,
    })?;
    cgroup2_mount_in(&text).ok_or(Error::NoCgroup2)
}

/// The kubelet's pods cgroup: `kubepods.slice` (systemd driver) or `kubepods` (cgroupfs
/// driver) directly under the cgroup2 mount.
pub fn default_cgroup_root() -> Result<PathBuf, Error> {
    let mount = cgroup2_mount()?;
    ["kubepods.slice", "kubepods"]
        .iter()
        .map(|name| mount.join(name))
        .find(|path| path.is_dir())
        .ok_or(Error::NoKubepods { mount })
}

/// The cgroup id of a cgroup directory: its inode number.
pub fn cgroup_id(dir: &Path) -> Result<u64, Error> {
    fs::metadata(dir)
        .map(|meta| meta.ino())
        .map_err(|source| Error::Read {
            path: dir.into(),
            source,
        })
}

/// The cgroup v2 path (relative to the mount, starting with `/`) in `/proc/<pid>/cgroup`
/// text: the `0::` line.
pub fn unified_path_in(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::trim)
}

/// The directory of the cgroup this process is in, or `None` when it cannot be told.
///
/// `/proc/self/cgroup` names the cgroup relative to the reader's cgroup namespace: inside
/// a container with a private one (every containerd or CRI-O container on cgroup v2) it
/// reads `0::/`, which joined to the host's cgroup2 mount would name the host's root. So
/// the path it gives is only taken when that directory's `cgroup.procs` lists this
/// process; otherwise the tree under the mount is searched for the one directory that
/// does (`cgroup.procs` shows pids in the reader's pid namespace, so this holds in a pid
/// namespace too). Not found (a mount that hides our cgroup): `None`, and the caller
/// exempts nothing rather than something else.
pub fn own_cgroup_dir() -> Result<Option<PathBuf>, Error> {
    let path = Path::new("/proc/self/cgroup");
    let text = fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.into(),
        source,
    })?;
    let relative = unified_path_in(&text).ok_or(Error::NoUnifiedEntry { path: path.into() })?;
    let mount = cgroup2_mount()?;
    let pid = std::process::id();
    let named = mount.join(relative.trim_start_matches('/'));
    if holds(&named, pid) {
        return Ok(Some(named));
    }
    Ok(find_holding(&mount, pid))
}

/// Whether `dir/cgroup.procs` lists `pid`.
fn holds(dir: &Path, pid: u32) -> bool {
    fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|procs| {
        procs
            .lines()
            .any(|line| line.trim().parse::<u32>() == Ok(pid))
    })
}

/// The directory under `top` (itself included) whose `cgroup.procs` lists `pid`.
fn find_holding(top: &Path, pid: u32) -> Option<PathBuf> {
    let mut stack = vec![top.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if holds(&dir, pid) {
            return Some(dir);
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        stack.extend(
            entries
                .filter_map(Result::ok)
                .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
                .map(|entry| entry.path()),
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_mount_on_hybrid_and_unified_hosts() {
        let hybrid = "25 30 0:22 / /sys rw,nosuid - sysfs sysfs rw\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                      42 31 0:39 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu";
        assert_eq!(
            cgroup2_mount_in(hybrid),
            Some("/sys/fs/cgroup/unified".into())
        );
        let unified =
            "30 1 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate";
        assert_eq!(cgroup2_mount_in(unified), Some("/sys/fs/cgroup".into()));
        let escaped = "30 1 0:26 / /mnt/my\\040cgroups rw - cgroup2 none rw";
        assert_eq!(cgroup2_mount_in(escaped), Some("/mnt/my cgroups".into()));
        assert_eq!(
            cgroup2_mount_in("42 31 0:39 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw"),
            None
        );
        assert_eq!(cgroup2_mount_in("garbage\n\n- -"), None);
    }

    #[test]
    fn reads_the_unified_line_of_proc_cgroup() {
        let text = "12:cpu,cpuacct:/user.slice\n0::/kubepods.slice/x.scope\n";
        assert_eq!(unified_path_in(text), Some("/kubepods.slice/x.scope"));
        assert_eq!(unified_path_in("1:name=systemd:/\n"), None);
    }
}
