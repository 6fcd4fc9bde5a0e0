//! cgroup id -> cgroup path -> pod identity, cached.
//!
//! A request must cost a map lookup, not a walk of the cgroup tree. The kernel's record
//! carries the cgroup id and the pid of the caller, so a miss is resolved first through
//! `/proc/<pid>/cgroup` (one read and one stat, checked against the id, so a recycled pid
//! cannot point elsewhere), and only if the process is already gone by a walk of the
//! pods' cgroup tree, which also refreshes the whole cache and forgets cgroups that no
//! longer exist. Entries are bounded; a deleted pod's entries are dropped on its delete
//! event.

use std::{
    collections::{HashMap, VecDeque},
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use super::{CgroupIdentity, parse_cgroup_path};

/// A cgroup the index has resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub cgroup_id: u64,
    /// Path relative to the cgroup2 mount, starting with `/`.
    pub path: String,
    /// `None`: the cgroup is not a pod's (the kubepods or QoS slice itself, a system
    /// service, ...), with the parser's reason.
    pub identity: Result<CgroupIdentity, String>,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_entries: usize,
    /// A tree walk visits at most this many directories.
    pub max_walk: usize,
    /// Walks triggered by misses are at least this far apart.
    pub min_walk_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_entries: 65_536,
            max_walk: 200_000,
            min_walk_interval: Duration::from_millis(50),
        }
    }
}

pub struct CgroupIndex {
    mount: PathBuf,
    root: PathBuf,
    proc_root: PathBuf,
    limits: Limits,
    entries: RwLock<HashMap<u64, Arc<Resolved>>>,
    last_walk: Mutex<Option<Instant>>,
}

impl CgroupIndex {
    /// `mount`: the cgroup2 mount; `root`: the tree to index (the programs' attach
    /// point, e.g. `<mount>/kubepods.slice`).
    pub fn new(mount: PathBuf, root: PathBuf, limits: Limits) -> Self {
        Self {
            mount,
            root,
            proc_root: PathBuf::from("/proc"),
            limits,
            entries: RwLock::default(),
            last_walk: Mutex::new(None),
        }
    }

    /// For tests: read `<proc_root>/<pid>/cgroup` instead of `/proc`.
    #[cfg(test)]
    pub fn with_proc_root(mut self, proc_root: PathBuf) -> Self {
        self.proc_root = proc_root;
        self
    }

    pub(crate) fn len(&self) -> usize {
        self.read().len()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<u64, Arc<Resolved>>> {
        self.entries
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<u64, Arc<Resolved>>> {
        self.entries
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The cgroup with id `cgroup_id`, in which process `pid` was when it connected.
    /// `None`: no such cgroup under the indexed tree (it is gone already).
    pub fn resolve(&self, cgroup_id: u64, pid: u32) -> Option<Arc<Resolved>> {
        if let Some(hit) = self.read().get(&cgroup_id) {
            return Some(Arc::clone(hit));
        }
        if let Some(path) = self.path_of_pid(pid, cgroup_id) {
            return Some(self.insert(cgroup_id, path));
        }
        self.walk(false);
        self.read().get(&cgroup_id).cloned()
    }

    /// The cgroup path of `pid`, if it is (still) the cgroup with `cgroup_id`.
    fn path_of_pid(&self, pid: u32, cgroup_id: u64) -> Option<String> {
        let text = fs::read_to_string(self.proc_root.join(pid.to_string()).join("cgroup")).ok()?;
        let relative = crate::cgroupfs::unified_path_in(&text)?.to_owned();
        let dir = self.mount.join(relative.trim_start_matches('/'));
        let inode = fs::metadata(&dir).ok()?.ino();
        (inode == cgroup_id && dir.starts_with(&self.root)).then_some(relative)
    }

    fn insert(&self, cgroup_id: u64, path: String) -> Arc<Resolved> {
        let resolved = Arc::new(Resolved {
            cgroup_id,
            identity: parse_cgroup_path(&path).map_err(|error| error.to_string()),
            path,
        });
        let mut entries = self.write();
        if entries.len() >= self.limits.max_entries {
            // Rare (a node has far fewer live cgroups): start over rather than track age.
            entries.clear();
        }
        entries.insert(cgroup_id, Arc::clone(&resolved));
        resolved
    }

    /// Rebuilds the index from the tree. `force`: ignore the minimum interval (pod
    /// events).
    pub fn walk(&self, force: bool) {
        {
            let mut last = self
                .last_walk
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !force && last.is_some_and(|at| at.elapsed() < self.limits.min_walk_interval) {
                return;
            }
            *last = Some(Instant::now());
        }
        let mut found = HashMap::new();
        let mut queue = VecDeque::from([self.root.clone()]);
        let mut visited = 0;
        while let Some(dir) = queue.pop_front() {
            visited += 1;
            if visited > self.limits.max_walk || found.len() >= self.limits.max_entries {
                tracing::warn!(root = %self.root.display(), "cgroup tree larger than the walk limit");
                break;
            }
            let Ok(meta) = fs::metadata(&dir) else {
                continue;
            };
            if let Some(path) = relative(&self.mount, &dir) {
                let previous = self.read().get(&meta.ino()).cloned();
                let entry = match previous {
                    Some(entry) if entry.path == path => entry,
                    _ => Arc::new(Resolved {
                        cgroup_id: meta.ino(),
                        identity: parse_cgroup_path(&path).map_err(|error| error.to_string()),
                        path,
                    }),
                };
                found.insert(meta.ino(), entry);
            }
            let Ok(children) = fs::read_dir(&dir) else {
                continue;
            };
            queue.extend(
                children
                    .filter_map(Result::ok)
                    .filter(|child| child.file_type().is_ok_and(|kind| kind.is_dir()))
                    .map(|child| child.path()),
            );
        }
        *self.write() = found;
    }

    /// Drops every entry of the pod with `uid` (its cgroups are gone or going).
    pub fn forget_pod(&self, uid: &str) {
        self.write().retain(|_, entry| {
            !entry
                .identity
                .as_ref()
                .is_ok_and(|identity| identity.pod_uid.as_str() == uid)
        });
    }

    /// The ids of every indexed cgroup of the pod with `uid` (for the kernel's exempt map).
    pub fn cgroups_of_pod(&self, uid: &str) -> Vec<u64> {
        self.read()
            .values()
            .filter(|entry| {
                entry
                    .identity
                    .as_ref()
                    .is_ok_and(|identity| identity.pod_uid.as_str() == uid)
            })
            .map(|entry| entry.cgroup_id)
            .collect()
    }
}

fn relative(mount: &Path, dir: &Path) -> Option<String> {
    let rest = dir.strip_prefix(mount).ok()?;
    Some(format!("/{}", rest.display()))
}

#[cfg(test)]
mod tests;
