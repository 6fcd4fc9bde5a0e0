use super::*;

const UID: &str = "0a1b2c3d-4e5f-6789-abcd-ef0123456789";
const UID_: &str = "0a1b2c3d_4e5f_6789_abcd_ef0123456789";
const STATIC: &str = "6f1e2d3c4b5a69788796a5b4c3d2e1f0";
const ID: &str = "3f9d2b7c1e5a4d6f8b0c2e4a6d8f0b1c3e5a7d9f1b3c5e7a9d1f3b5c7e9a1d3f";

const BE: &str = "/kubepods.slice/kubepods-besteffort.slice";
const BU: &str = "/kubepods.slice/kubepods-burstable.slice";

/// A path and what it must resolve to: pod UID, QoS class, container (runtime, id).
type Case = (
    String,
    &'static str,
    QosClass,
    Option<(Runtime, &'static str)>,
);

fn ok(path: &str) -> CgroupIdentity {
    parse_cgroup_path(path).unwrap_or_else(|error| panic!("{path}: {error}"))
}

fn positive_cases() -> Vec<Case> {
    use QosClass::{BestEffort, Burstable, Guaranteed};
    use Runtime::{Containerd, CriO, CriOConmon, Docker, Unnamed};
    let be_pod = format!("{BE}/kubepods-besteffort-pod{UID_}.slice");
    let bu_pod = format!("{BU}/kubepods-burstable-pod{UID_}.slice");
    let g_pod = format!("/kubepods.slice/kubepods-pod{UID_}.slice");
    vec![
        // systemd driver, every QoS, every runtime
        (
            format!("{be_pod}/cri-containerd-{ID}.scope"),
            UID,
            BestEffort,
            Some((Containerd, ID)),
        ),
        (
            format!("{bu_pod}/cri-containerd-{ID}.scope"),
            UID,
            Burstable,
            Some((Containerd, ID)),
        ),
        (
            format!("{g_pod}/cri-containerd-{ID}.scope"),
            UID,
            Guaranteed,
            Some((Containerd, ID)),
        ),
        (
            format!("{bu_pod}/crio-{ID}.scope"),
            UID,
            Burstable,
            Some((CriO, ID)),
        ),
        (
            format!("{bu_pod}/crio-conmon-{ID}.scope"),
            UID,
            Burstable,
            Some((CriOConmon, ID)),
        ),
        (
            format!("{g_pod}/crio-{ID}.scope"),
            UID,
            Guaranteed,
            Some((CriO, ID)),
        ),
        (
            format!("{g_pod}/docker-{ID}.scope"),
            UID,
            Guaranteed,
            Some((Docker, ID)),
        ),
        (
            format!("{be_pod}/docker-{ID}.scope"),
            UID,
            BestEffort,
            Some((Docker, ID)),
        ),
        // a nested leaf under the container scope belongs to that container
        (
            format!("{be_pod}/crio-{ID}.scope/container"),
            UID,
            BestEffort,
            Some((CriO, ID)),
        ),
        (
            format!("{g_pod}/cri-containerd-{ID}.scope/container"),
            UID,
            Guaranteed,
            Some((Containerd, ID)),
        ),
        (
            format!("{bu_pod}/cri-containerd-{ID}.scope/init.scope"),
            UID,
            Burstable,
            Some((Containerd, ID)),
        ),
        // pod slices themselves
        (be_pod.clone(), UID, BestEffort, None),
        (bu_pod.clone(), UID, Burstable, None),
        (g_pod.clone(), UID, Guaranteed, None),
        (format!("{g_pod}/"), UID, Guaranteed, None),
        // kubelet nested under a parent slice or prefix, mount point in front, no slash
        (
            format!("/system.slice/kubelet.slice{g_pod}/cri-containerd-{ID}.scope"),
            UID,
            Guaranteed,
            Some((Containerd, ID)),
        ),
        (
            format!(
                "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope"
            ),
            UID,
            BestEffort,
            Some((Containerd, ID)),
        ),
        (
            format!("/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_}.slice"),
            UID,
            Guaranteed,
            None,
        ),
        (
            format!("/sys/fs/cgroup{g_pod}/cri-containerd-{ID}.scope"),
            UID,
            Guaranteed,
            Some((Containerd, ID)),
        ),
        (
            format!("/kind/node1{bu_pod}/cri-containerd-{ID}.scope"),
            UID,
            Burstable,
            Some((Containerd, ID)),
        ),
        (
            format!("kubepods.slice/kubepods-pod{UID_}.slice//docker-{ID}.scope"),
            UID,
            Guaranteed,
            Some((Docker, ID)),
        ),
        // cgroupfs driver
        (
            format!("/kubepods/besteffort/pod{UID}/{ID}"),
            UID,
            BestEffort,
            Some((Unnamed, ID)),
        ),
        (
            format!("/kubepods/burstable/pod{UID}/{ID}"),
            UID,
            Burstable,
            Some((Unnamed, ID)),
        ),
        (
            format!("/kubepods/pod{UID}/{ID}"),
            UID,
            Guaranteed,
            Some((Unnamed, ID)),
        ),
        (
            format!("/kubepods/pod{UID}/crio-{ID}"),
            UID,
            Guaranteed,
            Some((CriO, ID)),
        ),
        (
            format!("/kubepods/burstable/pod{UID}/crio-conmon-{ID}"),
            UID,
            Burstable,
            Some((CriOConmon, ID)),
        ),
        (
            format!("/kubepods/besteffort/pod{UID}/docker-{ID}"),
            UID,
            BestEffort,
            Some((Docker, ID)),
        ),
        (
            format!("/kubepods/burstable/pod{UID}"),
            UID,
            Burstable,
            None,
        ),
        (format!("/kubepods/pod{UID}"), UID, Guaranteed, None),
        (
            format!("/kind/node1/kubepods/besteffort/pod{UID}/{ID}"),
            UID,
            BestEffort,
            Some((Unnamed, ID)),
        ),
        (
            format!("/kubelet/kubepods/pod{UID}/{ID}/container"),
            UID,
            Guaranteed,
            Some((Unnamed, ID)),
        ),
        // short (12) and long (128) container ids
        (
            format!("/kubepods/pod{UID}/{}", &ID[..12]),
            UID,
            Guaranteed,
            Some((Unnamed, &ID[..12])),
        ),
        // static pods: the kubelet's 32-hex config hash is the UID
        (
            format!("{BU}/kubepods-burstable-pod{STATIC}.slice"),
            STATIC,
            Burstable,
            None,
        ),
        (
            format!("/kubepods/pod{STATIC}/{ID}"),
            STATIC,
            Guaranteed,
            Some((Unnamed, ID)),
        ),
    ]
}

#[test]
fn real_world_layouts_resolve() {
    let cases = positive_cases();
    assert!(cases.len() >= 30, "{} cases", cases.len());
    for (path, uid, qos, container) in cases {
        let identity = ok(&path);
        let got = (
            identity.pod_uid.as_str(),
            identity.qos,
            identity.container.map(|c| (c.runtime, c.id)),
        );
        let want = (
            uid,
            qos,
            container.map(|(runtime, id)| (runtime, id.to_owned())),
        );
        assert_eq!(got, want, "{path}");
    }
    let long_id = ID.repeat(2);
    let identity = ok(&format!("/kubepods/pod{UID}/{long_id}"));
    assert_eq!(identity.container.map(|c| c.id), Some(long_id));
}

#[test]
fn paths_that_must_not_resolve() {
    let g_pod = format!("/kubepods.slice/kubepods-pod{UID_}.slice");
    let cases: Vec<(String, &str)> = vec![
        // outside kubepods
        ("/system.slice/sshd.service".into(), "not_kubepods"),
        ("/".into(), "not_kubepods"),
        (
            "/user.slice/user-0.slice/session-1.scope".into(),
            "not_kubepods",
        ),
        (
            format!("/notkubepods.slice/kubepods-pod{UID_}.slice"),
            "not_kubepods",
        ),
        (format!("/kubepods-x/pod{UID}/{ID}"), "not_kubepods"),
        // kubepods and QoS cgroups themselves
        ("/kubepods.slice".into(), "not_a_pod"),
        (BU.into(), "not_a_pod"),
        (BE.into(), "not_a_pod"),
        ("/kubepods".into(), "not_a_pod"),
        ("/kubepods/besteffort".into(), "not_a_pod"),
        // unknown QoS, mismatched QoS, missing QoS parent
        (
            format!("/kubepods.slice/kubepods-gold.slice/kubepods-gold-pod{UID_}.slice"),
            "bad_pod_component",
        ),
        (
            format!("{BU}/kubepods-besteffort-pod{UID_}.slice"),
            "qos_mismatch",
        ),
        (
            format!("{BE}/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"),
            "qos_mismatch",
        ),
        (
            format!("{BU}/kubepods-pod{UID_}.slice"),
            "bad_pod_component",
        ),
        (
            format!("/kubepods.slice/kubepods-besteffort-pod{UID_}.slice"),
            "bad_pod_component",
        ),
        (
            format!("/kubepods.slice/kubelet-kubepods-pod{UID_}.slice"),
            "bad_pod_component",
        ),
        (format!("/kubepods/gold/pod{UID}/{ID}"), "bad_pod_component"),
        (format!("/kubepods/Burstable/pod{UID}"), "bad_pod_component"),
        // malformed UIDs: length, case, separators, non-hex
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
            "/kubepods.slice/kubepods-pod0a1b2c3d_4e5f-6789_abcd_ef0123456789.slice".into(),
            "bad_pod_uid",
        ),
        ("/kubepods.slice/kubepods-pod.slice".into(), "bad_pod_uid"),
        (
            "/kubepods/podzzzzzzzz-4e5f-6789-abcd-ef0123456789/x".into(),
            "bad_pod_uid",
        ),
        (format!("/kubepods/pod{UID_}/{ID}"), "bad_pod_uid"),
        (format!("/kubepods/pod{UID}0/{ID}"), "bad_pod_uid"),
        (format!("/kubepods/pod{}", &STATIC[1..]), "bad_pod_uid"),
        // garbage containers
        (format!("{g_pod}/cri-containerd-{ID}"), "bad_container"),
        (format!("{g_pod}/runc-{ID}.scope"), "bad_container"),
        (format!("{g_pod}/cri-containerd-xyz.scope"), "bad_container"),
        (format!("{g_pod}/cri-containerd-abc.scope"), "bad_container"),
        (
            format!("{g_pod}/cri-containerd-{}.scope", ID.to_uppercase()),
            "bad_container",
        ),
        (
            format!("{g_pod}/cri-containerd-{}.scope", &ID[..11]),
            "bad_container",
        ),
        (
            format!("{g_pod}/cri-containerd-{}0.scope", ID.repeat(2)),
            "bad_container",
        ),
        (format!("{g_pod}/{ID}"), "bad_container"),
        (format!("/kubepods/pod{UID}/{ID}.scope"), "bad_container"),
        (
            format!("{g_pod}/cri-containerd-{ID}.scope/a b"),
            "bad_container",
        ),
        (
            format!("{g_pod}/cri-containerd-{ID}.scope/{}", "x".repeat(65)),
            "bad_container",
        ),
        (format!("{g_pod}/cri-containerd-{ID}.scope/a/b"), "too_deep"),
        // traversal, empty, huge, NUL
        (
            format!("/kubepods.slice/../kubepods-pod{UID_}.slice"),
            "traversal",
        ),
        (format!("/kubepods/pod{UID}/./{ID}"), "traversal"),
        (format!("{g_pod}/cri-containerd-{ID}.scope/.."), "traversal"),
        ("".into(), "empty"),
        (format!("/kubepods/{}", "a".repeat(MAX_PATH)), "too_long"),
        ("/kubepods\0/pod".into(), "nul"),
    ];
    assert!(cases.len() >= 30, "{} cases", cases.len());
    for (path, label) in cases {
        match parse_cgroup_path(&path) {
            Ok(identity) => panic!("{path:?} resolved to {identity:?}"),
            Err(error) => assert_eq!(error.metric_label(), label, "{path:?}: {error}"),
        }
    }
}

#[test]
fn errors_keep_the_evidence_bounded() {
    let cases: Vec<(String, &str)> = vec![
        (
            "/system.slice/sshd.service".into(),
            "/system.slice/sshd.service",
        ),
        ("/kubepods.slice".into(), "/kubepods.slice"),
        (
            format!("{BU}/kubepods-besteffort-pod{UID_}.slice"),
            "kubepods-besteffort-pod",
        ),
        ("/kubepods/podnot-a-uid".into(), "not-a-uid"),
        (format!("/kubepods/pod{UID}/runc-1"), "runc-1"),
        ("/kubepods/../x".into(), "/kubepods/../x"),
    ];
    for (path, evidence) in cases {
        let message = parse_cgroup_path(&path)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(message.contains(evidence), "{path}: {message}");
    }
    let huge = format!("/kubepods/pod{}", "a".repeat(MAX_PATH - 20));
    let error = parse_cgroup_path(&huge).unwrap_err();
    assert!(error.to_string().len() < EVIDENCE_CHARS + 64, "{error}");
    assert_eq!(
        parse_cgroup_path(&"/".repeat(MAX_PATH + 1)),
        Err(IdentityError::TooLong { len: MAX_PATH + 1 })
    );
}

#[test]
fn conmon_is_not_the_workload() {
    let cases = [
        (
            format!("{BU}/kubepods-burstable-pod{UID_}.slice/crio-conmon-{ID}.scope"),
            false,
        ),
        (
            format!("{BU}/kubepods-burstable-pod{UID_}.slice/crio-{ID}.scope"),
            true,
        ),
        (format!("/kubepods/pod{UID}/{ID}"), true),
    ];
    for (path, workload) in cases {
        let container = ok(&path).container.unwrap_or_else(|| panic!("{path}"));
        assert_eq!(container.is_workload(), workload, "{path}");
    }
}

#[test]
fn pod_slice_names_round_trip() {
    for uid in [UID, STATIC] {
        let uid = PodUid::parse(uid).unwrap();
        for qos in [
            QosClass::Guaranteed,
            QosClass::Burstable,
            QosClass::BestEffort,
        ] {
            let slice = pod_slice_name(&uid, qos);
            let path = match qos.name() {
                Some(name) => {
                    format!("/kubepods.slice/kubepods-{name}.slice/{slice}/docker-{ID}.scope")
                }
                None => format!("/kubepods.slice/{slice}/docker-{ID}.scope"),
            };
            let identity = ok(&path);
            assert_eq!((&identity.pod_uid, identity.qos), (&uid, qos), "{path}");
        }
    }
    let uid = PodUid::parse(UID).unwrap();
    let names = [
        (
            QosClass::BestEffort,
            format!("kubepods-besteffort-pod{UID_}.slice"),
        ),
        (
            QosClass::Burstable,
            format!("kubepods-burstable-pod{UID_}.slice"),
        ),
        (QosClass::Guaranteed, format!("kubepods-pod{UID_}.slice")),
    ];
    for (qos, name) in names {
        assert_eq!(pod_slice_name(&uid, qos), name);
    }
}

#[test]
fn pod_uids() {
    let good = [UID, STATIC, "00000000-0000-0000-0000-000000000000"];
    for uid in good {
        assert_eq!(
            PodUid::parse(uid).map(|u| u.to_string()).as_deref(),
            Ok(uid)
        );
    }
    let bad = [
        "".to_owned(),
        "x".to_owned(),
        UID.to_uppercase(),
        UID[1..].to_owned(),
        format!("{UID}0"),
        UID_.to_owned(),
        "0a1b2c3d-4e5f-6789-abcd-ef012345678g".to_owned(),
        "0a1b2c3d4-e5f-6789-abcd-ef0123456789".to_owned(),
        "0a1b2c3d-4e5f-6789-abcd-ef0123456789-".to_owned(),
        STATIC.to_uppercase(),
        "é".repeat(18),
    ];
    for uid in bad {
        assert!(PodUid::parse(&uid).is_err(), "{uid}");
    }
}
