use std::{
    path::PathBuf,
    time::{Duration, SystemTime},
};

use super::*;

const PATH: &str = "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-poduid.slice/cri-containerd-abc.scope";

fn container(cgroup_id: u64, pid: u32) -> Container {
    Container {
        namespace: "team".into(),
        pod: "app".into(),
        pod_uid: "uid".into(),
        container_id: Some("containerd://abc".into()),
        cgroup_id,
        cgroup_path: PATH.into(),
        pid,
    }
}

fn handed(key: &str, expiration: SystemTime) -> Handed<'_> {
    Handed {
        role_arn: "arn:aws:iam::123456789012:role/app",
        access_key_id: key,
        expiration,
        chosen_by: ChosenBy::PodAnnotation,
    }
}

/// `log.handed_out_at` for `container(cgroup_id, pid)`.
fn hand(
    log: &AuditLog,
    cgroup_id: u64,
    pid: u32,
    handed: &Handed<'_>,
    now: SystemTime,
) -> Option<Record> {
    log.handed_out_at(cgroup_id, "uid", handed, || container(cgroup_id, pid), now)
}

/// A procfs stand-in: `pid/cgroup` with `cgroup_line`, `pid/exe` -> `exe`.
struct FakeProc(PathBuf);

impl FakeProc {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("interceptor-audit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn process(&self, pid: u32, cgroup_line: &str, exe: Option<&str>) {
        let dir = self.0.join(pid.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup"), format!("1:cpu:/\n{cgroup_line}\n")).unwrap();
        if let Some(exe) = exe {
            std::os::unix::fs::symlink(exe, dir.join("exe")).unwrap();
        }
    }
}

impl Drop for FakeProc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_key_is_recorded_once_per_container() {
    let proc = FakeProc::new("once");
    proc.process(42, &format!("0::{PATH}"), Some("/usr/bin/python3"));
    let log = AuditLog::with("node-a", proc.0.clone(), 16);
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let expiry = now + Duration::from_secs(3600);
    let first =
        hand(&log, 7, 42, &handed("ASIA1", expiry), now).expect("the first hand-out is recorded");
    assert_eq!(first.node, "node-a");
    assert_eq!(
        (first.namespace.as_str(), first.pod.as_str()),
        ("team", "app")
    );
    assert_eq!(first.container_id.as_deref(), Some("containerd://abc"));
    assert_eq!((first.cgroup_id, first.pid), (7, 42));
    assert_eq!(first.executable.as_deref(), Some("/usr/bin/python3"));
    assert_eq!(first.executable_unavailable, None);
    assert_eq!(first.access_key_id, "ASIA1");
    assert_eq!(first.expiration, crate::imds::ec2::timestamp(expiry));
    assert_eq!(first.time, crate::imds::ec2::timestamp(now));
    assert_eq!(first.chosen_by, ChosenBy::PodAnnotation);
    // The same key to the same container again: nothing.
    assert_eq!(hand(&log, 7, 43, &handed("ASIA1", expiry), now), None);
    // A new key (refreshed credentials), or the same key to another container: recorded.
    assert!(hand(&log, 7, 42, &handed("ASIA2", expiry), now).is_some());
    assert!(hand(&log, 8, 42, &handed("ASIA1", expiry), now).is_some());
    assert_eq!(log.len(), 3);
}

#[test]
fn memory_is_bounded_expired_keys_first_and_a_forgotten_key_is_recorded_again() {
    let proc = FakeProc::new("bounded");
    let log = AuditLog::with("node-a", proc.0.clone(), 2);
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let later = now + Duration::from_secs(3600);
    assert!(
        hand(
            &log,
            1,
            0,
            &handed("EXPIRED", now - Duration::from_secs(1)),
            now
        )
        .is_some()
    );
    assert!(hand(&log, 1, 0, &handed("LIVE", later), now).is_some());
    // Full: the expired one goes, the live one stays remembered.
    assert!(
        hand(
            &log,
            1,
            0,
            &handed("NEW", later + Duration::from_secs(1)),
            now
        )
        .is_some()
    );
    assert_eq!(log.len(), 2);
    assert_eq!(hand(&log, 1, 0, &handed("LIVE", later), now), None);
    // Full of live keys: the one expiring first is dropped, and recorded again if handed.
    assert!(
        hand(
            &log,
            1,
            0,
            &handed("NEWER", later + Duration::from_secs(2)),
            now
        )
        .is_some()
    );
    assert_eq!(log.len(), 2);
    assert!(hand(&log, 1, 0, &handed("LIVE", later), now).is_some());
}

#[test]
fn the_executable_is_named_only_for_a_process_still_in_the_recorded_cgroup() {
    let proc = FakeProc::new("exe");
    // Seen from a cgroup namespace rooted at the pod's slice (a containerised agent).
    proc.process(10, "0::/../cri-containerd-abc.scope", Some("/app/server"));
    proc.process(11, "0::/system.slice/sshd.service", Some("/usr/sbin/sshd"));
    proc.process(12, &format!("0::{PATH}"), None);
    proc.process(13, "0::/", Some("/sbin/init"));
    let exe = |pid| executable(&proc.0, pid, PATH);
    assert_eq!(exe(10), Ok(PathBuf::from("/app/server")));
    assert_eq!(exe(11), Err(ExecutableUnavailable::OtherCgroup));
    assert_eq!(exe(12), Err(ExecutableUnavailable::ProcessGone));
    assert_eq!(exe(13), Err(ExecutableUnavailable::OtherCgroup));
    assert_eq!(exe(14), Err(ExecutableUnavailable::ProcessGone));
    assert_eq!(exe(0), Err(ExecutableUnavailable::NoPid));
    // The real procfs: this process is not in that cgroup.
    assert_eq!(
        executable(Path::new("/proc"), std::process::id(), PATH),
        Err(ExecutableUnavailable::OtherCgroup)
    );
}

#[test]
fn cgroup_lines_match_on_whole_components_only() {
    assert!(in_cgroup("0::/a/b/c\n", "/a/b/c"));
    assert!(in_cgroup("0::/../../b/c\n", "/a/b/c"));
    assert!(!in_cgroup("0::/b/cc\n", "/a/b/c"));
    assert!(!in_cgroup("0::/x/b/c\n", "/a/b/c"));
    assert!(!in_cgroup("0::/\n", "/a/b/c"));
    assert!(!in_cgroup("1:cpu:/a/b/c\n", "/a/b/c"));
    assert!(!in_cgroup("", "/a/b/c"));
}

#[test]
fn the_record_serialises_without_anything_secret() {
    let proc = FakeProc::new("json");
    let log = AuditLog::with("node-a", proc.0.clone(), 4);
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let record = hand(&log, 7, 99, &handed("ASIAKEY", now), now).unwrap();
    let json = serde_json::to_value(&record).unwrap();
    let fields: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for field in fields {
        let lower = field.to_lowercase();
        assert!(
            !lower.contains("secret") && !lower.contains("token"),
            "{field}"
        );
    }
    assert_eq!(json["access_key_id"], "ASIAKEY");
    assert_eq!(json["chosen_by"], "pod_annotation");
    assert_eq!(json["executable"], serde_json::Value::Null);
    assert_eq!(json["executable_unavailable"], "process_gone");
}
