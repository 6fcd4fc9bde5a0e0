use super::*;

const UID: &str = "0a1b2c3d-4e5f-6789-abcd-ef0123456789";
const UID_: &str = "0a1b2c3d_4e5f_6789_abcd_ef0123456789";
const ID: &str = "3f9d2b7c1e5a4d6f8b0c2e4a6d8f0b1c3e5a7d9f1b3c5e7a9d1f3b5c7e9a1d3f";

/// A path, the QoS class and the container (runtime, id) it must resolve to.
type Case = (String, QosClass, Option<(Runtime, &'static str)>);

fn ok(path: &str) -> CgroupIdentity {
    parse_cgroup_path(path).unwrap_or_else(|error| panic!("{path}: {error}"))
}

#[test]
fn real_world_layouts_resolve() {
    let cases: Vec<Case> = vec![
        // systemd driver, containerd
        (
            format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope"),
            QosClass::BestEffort,
            Some((Runtime::Containerd, ID)),
        ),
        (
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"),
            QosClass::Burstable,
            Some((Runtime::Containerd, ID)),
        ),
        // Guaranteed pods sit directly under kubepods.slice
        (
            format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope"),
            QosClass::Guaranteed,
            Some((Runtime::Containerd, ID)),
        ),
        // CRI-O, its conmon, Docker
        (
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{ID}.scope"),
            QosClass::Burstable,
            Some((Runtime::CriO, ID)),
        ),
        (
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{ID}.scope"),
            QosClass::Burstable,
            Some((Runtime::CriOConmon, ID)),
        ),
        (
            format!("/kubepods.slice/kubepods-pod{UID_}.slice/docker-{ID}.scope"),
            QosClass::Guaranteed,
            Some((Runtime::Docker, ID)),
        ),
        // CRI-O nests the workload one level deeper on some setups
        (
            format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{ID}.scope/container"),
            QosClass::BestEffort,
            Some((Runtime::CriO, ID)),
        ),
        // the pod slice itself
        (
            format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"),
            QosClass::BestEffort,
            None,
        ),
        // kubelet nested under a parent slice / prefix
        (
            format!("/system.slice/kubelet.slice/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope"),
            QosClass::Guaranteed,
            Some((Runtime::Containerd, ID)),
        ),
        (
            format!("/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope"),
            QosClass::BestEffort,
            Some((Runtime::Containerd, ID)),
        ),
        // absolute, with the mount point in front
        (
            format!("/sys/fs/cgroup/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope"),
            QosClass::Guaranteed,
            Some((Runtime::Containerd, ID)),
        ),
        // cgroupfs driver
        (format!("/kubepods/besteffort/pod{UID}/{ID}"), QosClass::BestEffort, Some((Runtime::Unnamed, ID))),
        (format!("/kubepods/burstable/pod{UID}/{ID}"), QosClass::Burstable, Some((Runtime::Unnamed, ID))),
        (format!("/kubepods/pod{UID}/{ID}"), QosClass::Guaranteed, Some((Runtime::Unnamed, ID))),
        (format!("/kubepods/pod{UID}/crio-{ID}"), QosClass::Guaranteed, Some((Runtime::CriO, ID))),
        (format!("/kubepods/burstable/pod{UID}"), QosClass::Burstable, None),
        // kind / nested nodes
        (format!("/kind/node1/kubepods/besteffort/pod{UID}/{ID}"), QosClass::BestEffort, Some((Runtime::Unnamed, ID))),
        // static pod: the kubelet's 32-hex config hash is the UID
        (
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6f1e2d3c4b5a69788796a5b4c3d2e1f0.slice".to_owned(),
            QosClass::Burstable,
            None,
        ),
    ];
    for (path, qos, container) in cases {
        let identity = ok(&path);
        assert_eq!(identity.qos, qos, "{path}");
        assert_eq!(
            identity.container.map(|c| (c.runtime, c.id)),
            container.map(|(runtime, id)| (runtime, id.to_owned())),
            "{path}"
        );
        if !path.contains("6f1e2d3c") {
            assert_eq!(identity.pod_uid.as_str(), UID, "{path}");
        }
    }
}

#[test]
fn paths_that_must_not_resolve() {
    let cases: Vec<(String, &str)> = vec![
        ("/system.slice/sshd.service".into(), "not_kubepods"),
        ("/".into(), "not_kubepods"),
        (
            "/user.slice/user-0.slice/session-1.scope".into(),
            "not_kubepods",
        ),
        ("/kubepods.slice".into(), "not_a_pod"),
        (
            "/kubepods.slice/kubepods-burstable.slice".into(),
            "not_a_pod",
        ),
        ("/kubepods".into(), "not_a_pod"),
        ("/kubepods/besteffort".into(), "not_a_pod"),
        // look-alikes
        (
            "/notkubepods.slice/kubepods-pod{UID_}.slice".into(),
            "not_kubepods",
        ),
        (
            format!("/kubepods.slice/kubepods-gold.slice/kubepods-gold-pod{UID_}.slice"),
            "bad_pod_component",
        ),
        (
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-besteffort-pod{UID_}.slice"),
            "qos_mismatch",
        ),
        (format!("/kubepods/gold/pod{UID}/{ID}"), "bad_pod_component"),
        // malformed UIDs
        (
            "/kubepods.slice/kubepods-pod0a1b2c3d_4e5f.slice".into(),
            "bad_pod_uid",
        ),
        (
            format!("/kubepods.slice/kubepods-pod{}.slice", UID_.to_uppercase()),
            "bad_pod_uid",
        ),
        (
            format!("/kubepods.slice/kubepods-pod{UID}.slice"),
            "bad_pod_uid",
        ),
        (
            "/kubepods/podzzzzzzzz-4e5f-6789-abcd-ef0123456789/x".into(),
            "bad_pod_uid",
        ),
        (format!("/kubepods/pod{UID_}/{ID}"), "bad_pod_uid"),
        // containers
        (
            format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}"),
            "bad_container",
        ),
        (
            format!("/kubepods.slice/kubepods-pod{UID_}.slice/runc-{ID}.scope"),
            "bad_container",
        ),
        (
            format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-xyz.scope"),
            "bad_container",
        ),
        (
            format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-abc.scope"),
            "bad_container",
        ),
        (
            format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope/a/b"),
            "too_deep",
        ),
        (
            format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope/a b"),
            "too_deep",
        ),
        // traversal, empty, huge, NUL
        (
            format!("/kubepods.slice/../kubepods-pod{UID_}.slice"),
            "malformed",
        ),
        (format!("/kubepods/pod{UID}/./{ID}"), "malformed"),
        ("".into(), "malformed"),
        (format!("/kubepods/{}", "a".repeat(MAX_PATH)), "malformed"),
        ("/kubepods\0/pod".into(), "malformed"),
    ];
    for (path, label) in cases {
        match parse_cgroup_path(&path) {
            Ok(identity) => panic!("{path:?} resolved to {identity:?}"),
            Err(error) => assert_eq!(error.metric_label(), label, "{path:?}: {error}"),
        }
    }
}

#[test]
fn pod_slice_names_round_trip() {
    let uid = PodUid::parse(UID).unwrap();
    for qos in [
        QosClass::Guaranteed,
        QosClass::Burstable,
        QosClass::BestEffort,
    ] {
        let slice = pod_slice_name(&uid, qos);
        let path = match qos.name() {
            Some(name) => format!("/kubepods.slice/kubepods-{name}.slice/{slice}"),
            None => format!("/kubepods.slice/{slice}"),
        };
        let identity = ok(&path);
        assert_eq!(
            (identity.pod_uid, identity.qos),
            (uid.clone(), qos),
            "{path}"
        );
    }
    assert_eq!(
        pod_slice_name(&uid, QosClass::BestEffort),
        format!("kubepods-besteffort-pod{UID_}.slice")
    );
}

#[test]
fn pod_uids() {
    assert!(PodUid::parse(UID).is_ok());
    assert!(PodUid::parse("6f1e2d3c4b5a69788796a5b4c3d2e1f0").is_ok());
    for bad in [
        "",
        "x",
        &UID.to_uppercase(),
        &UID[1..],
        &format!("{UID}0"),
        "0a1b2c3d-4e5f-6789-abcd-ef012345678g",
    ] {
        assert!(PodUid::parse(bad).is_err(), "{bad}");
    }
}
