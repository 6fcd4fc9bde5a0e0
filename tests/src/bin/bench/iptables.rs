//! The iptables baseline: inside a pod's own network namespace (never the host's), a nat
//! OUTPUT DNAT of 169.254.169.254:80 to the proxy, as kube2iam and kiam do it. Removed on
//! drop, panics included.

use std::net::SocketAddrV4;

use interceptor_tests::{Pod, cmd};

/// The rule and the route it needs, in one pod's namespace.
pub struct Dnat<'a> {
    pod: &'a Pod,
    rule: Vec<String>,
}

impl<'a> Dnat<'a> {
    pub fn install(pod: &'a Pod, to: SocketAddrV4) -> Self {
        // Pods have no route to 169.254.0.0/16: without one connect() fails before the
        // nat hook runs. A local route keeps the packet in the pod's namespace should the
        // rule ever be missing; its source is the pod's address, so that the proxy's
        // answers come back to the pod (with 169.254.169.254 as source they would follow
        // the host's routes instead).
        let source = pod.ip.to_string();
        pod.netns.exec(&[
            "ip",
            "route",
            "add",
            "local",
            "169.254.169.254/32",
            "dev",
            "lo",
            "src",
            &source,
        ]);
        let rule: Vec<String> = [
            "OUTPUT",
            "-d",
            "169.254.169.254/32",
            "-p",
            "tcp",
            "--dport",
            "80",
            "-j",
            "DNAT",
            "--to-destination",
            &to.to_string(),
        ]
        .iter()
        .map(|part| (*part).to_owned())
        .collect();
        let guard = Self { pod, rule };
        guard.iptables("-A");
        guard
    }

    fn iptables(&self, action: &str) {
        let mut args = vec!["iptables", "-w", "-t", "nat", action];
        args.extend(self.rule.iter().map(String::as_str));
        self.pod.netns.exec(&args);
    }
}

impl Drop for Dnat<'_> {
    fn drop(&mut self) {
        let netns = &self.pod.netns.name;
        let mut args = vec!["netns", "exec", netns, "iptables", "-w", "-t", "nat", "-D"];
        args.extend(self.rule.iter().map(String::as_str));
        cmd::quiet("ip", &args);
        cmd::quiet(
            "ip",
            &[
                "netns",
                "exec",
                netns,
                "ip",
                "route",
                "del",
                "local",
                "169.254.169.254/32",
                "dev",
                "lo",
            ],
        );
    }
}
