//! Every kustomize overlay in deploy/ renders (`kubectl kustomize`) and validates offline
//! with `kubernetes-validate --strict` against several Kubernetes versions; the DaemonSet
//! keeps the least-privilege properties the other tests prove.

use std::path::{Path, PathBuf};

use interceptor_tests::{cmd, peers::venv};

const OVERLAYS: [&str; 2] = ["generic", "eks"];
const VERSIONS: [&str; 3] = ["1.30.0", "1.33.0", "1.37.0"];

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn render(overlay: &str) -> String {
    cmd::run(
        "kubectl",
        &[
            "kustomize",
            &deploy()
                .join("overlays")
                .join(overlay)
                .display()
                .to_string(),
        ],
    )
}

#[test]
fn overlays_render_and_validate_strictly() {
    let validate = venv().join("bin/kubernetes-validate");
    for overlay in OVERLAYS {
        let rendered = render(overlay);
        let file = std::env::temp_dir().join(format!(
            "interceptor-deploy-{}-{overlay}.yaml",
            std::process::id()
        ));
        std::fs::write(&file, &rendered).unwrap();
        for version in VERSIONS {
            let out = cmd::output(
                &validate.display().to_string(),
                &[
                    "--strict",
                    "--kubernetes-version",
                    version,
                    &file.display().to_string(),
                ],
            );
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "{overlay} against {version}:\n{text}");
            assert!(
                text.contains("passed for resource daemonset/interceptor"),
                "{overlay} {version}:\n{text}"
            );
        }
        let _ = std::fs::remove_file(&file);
    }
}

#[test]
fn the_daemonset_is_least_privilege_and_wired_like_the_agent_expects() {
    for overlay in OVERLAYS {
        let rendered = render(overlay);
        for needed in [
            "privileged: false",
            "allowPrivilegeEscalation: false",
            "readOnlyRootFilesystem: true",
            "hostNetwork: true",
            "priorityClassName: system-node-critical",
            "path: /readyz",
            "fieldPath: status.hostIP",
            "fieldPath: spec.nodeName",
            "fieldPath: metadata.uid",
            "path: /sys/fs/bpf",
            "path: /sys/fs/cgroup",
        ] {
            assert!(rendered.contains(needed), "{overlay}: no {needed:?}");
        }
        // Exactly the capabilities tests/tests/capabilities.rs proves necessary.
        let add = rendered
            .lines()
            .skip_while(|line| !line.trim_start().starts_with("add:"))
            .take(4)
            .collect::<Vec<_>>()
            .join("\n");
        for cap in ["BPF", "NET_ADMIN", "PERFMON"] {
            assert!(
                add.contains(&format!("- {cap}")),
                "{overlay}: {cap} missing in\n{add}"
            );
        }
        assert!(
            !rendered.contains("SYS_ADMIN") && !rendered.contains("privileged: true"),
            "{overlay}"
        );
    }
}
