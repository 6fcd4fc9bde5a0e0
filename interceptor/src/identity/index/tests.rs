use std::{fs, os::unix::fs::MetadataExt};

use super::*;

const UID_A: &str = "0a1b2c3d-4e5f-6789-abcd-ef0123456789";
const UID_B: &str = "1a1b2c3d-4e5f-6789-abcd-ef0123456789";
const ID: &str = "3f9d2b7c1e5a4d6f8b0c2e4a6d8f0b1c3e5a7d9f1b3c5e7a9d1f3b5c7e9a1d3f";

/// A kubelet-shaped directory tree on the ordinary filesystem: the index only needs
/// inodes and names, so no cgroupfs (and no root) is needed here.
struct Tree {
    mount: PathBuf,
}

impl Tree {
    fn new(name: &str) -> Self {
        let mount =
            std::env::temp_dir().join(format!("interceptor-index-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&mount);
        fs::create_dir_all(mount.join("kubepods.slice/kubepods-besteffort.slice")).unwrap();
        Self { mount }
    }

    fn container(&self, uid: &str) -> (u64, PathBuf) {
        let dir = self.mount.join(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{ID}.scope",
            uid.replace('-', "_")
        ));
        fs::create_dir_all(&dir).unwrap();
        (fs::metadata(&dir).unwrap().ino(), dir)
    }

    fn index(&self) -> CgroupIndex {
        CgroupIndex::new(
            self.mount.clone(),
            self.mount.join("kubepods.slice"),
            Limits {
                min_walk_interval: Duration::ZERO,
                ..Limits::default()
            },
        )
        .with_proc_root(self.mount.join("no-proc"))
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.mount);
    }
}

#[test]
fn a_miss_walks_the_tree_once_and_then_hits() {
    let tree = Tree::new("walk");
    let (id_a, _) = tree.container(UID_A);
    let index = tree.index();
    let resolved = index.resolve(id_a, 1).expect("found by walking");
    let identity = resolved.identity.as_ref().unwrap();
    assert_eq!(identity.pod_uid.as_str(), UID_A);
    assert!(resolved.path.ends_with(".scope"));
    // kubepods.slice, the QoS slice, the pod slice and the container are indexed.
    assert_eq!(index.len(), 4);
    assert!(index.resolve(id_a, 1).is_some());
    assert_eq!(
        index.resolve(u64::MAX, 1),
        None,
        "unknown ids resolve to nothing"
    );
}

#[test]
fn deleted_cgroups_and_pods_are_forgotten() {
    let tree = Tree::new("forget");
    let (id_a, dir_a) = tree.container(UID_A);
    let (id_b, _) = tree.container(UID_B);
    let index = tree.index();
    assert!(index.resolve(id_a, 1).is_some());
    assert_eq!(
        index.cgroups_of_pod(UID_B).len(),
        2,
        "pod slice and container"
    );
    index.forget_pod(UID_A);
    assert!(index.cgroups_of_pod(UID_A).is_empty());
    fs::remove_dir(&dir_a).unwrap();
    index.walk(true);
    assert!(
        index.read().get(&id_a).is_none(),
        "a removed cgroup is not kept"
    );
    assert!(index.resolve(id_b, 1).is_some());
}

#[test]
fn entries_are_bounded() {
    let tree = Tree::new("bounded");
    for i in 0..20 {
        tree.container(&format!("{i:08x}-4e5f-6789-abcd-ef0123456789"));
    }
    let index = CgroupIndex::new(
        tree.mount.clone(),
        tree.mount.join("kubepods.slice"),
        Limits {
            max_entries: 10,
            min_walk_interval: Duration::ZERO,
            ..Limits::default()
        },
    );
    index.walk(true);
    assert_eq!(index.len(), 10, "filled up to the limit and no further");
}

#[test]
fn the_callers_pid_resolves_without_a_walk() {
    let tree = Tree::new("pid");
    let (id_a, _) = tree.container(UID_A);
    let proc_dir = tree.mount.join("proc/4242");
    fs::create_dir_all(&proc_dir).unwrap();
    let relative = format!(
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{ID}.scope",
        UID_A.replace('-', "_")
    );
    fs::write(proc_dir.join("cgroup"), format!("0::{relative}\n")).unwrap();
    let index = CgroupIndex::new(
        tree.mount.clone(),
        tree.mount.join("kubepods.slice"),
        Limits {
            // A walk would be refused: only the pid path can answer.
            min_walk_interval: Duration::from_secs(3600),
            ..Limits::default()
        },
    )
    .with_proc_root(tree.mount.join("proc"));
    *index.last_walk.lock().unwrap() = Some(Instant::now());
    let resolved = index.resolve(id_a, 4242).expect("resolved through /proc");
    assert_eq!(resolved.path, relative);
    // A pid whose cgroup is not the recorded one is not trusted.
    assert_eq!(index.resolve(id_a + 1_000_000, 4242), None);
}
