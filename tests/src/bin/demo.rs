//! `cargo xtask demo`: interceptor's kernel half on a simulated node on this machine.
//!
//! Creates a node (bridge + kubelet-shaped cgroup tree) with three pods, attaches the
//! real programs to the node's `kubepods.slice`, and has every pod dial
//! 169.254.169.254:80 for real. A small accept loop stands where the agent's metadata
//! server goes and reports, for every connection, the cgroup the kernel recorded. Prints
//! a table, the agent's `status` and `bpftool cgroup tree`, then removes everything.

use std::{
    collections::HashMap,
    net::{SocketAddr, SocketAddrV4},
    sync::{Arc, Mutex},
};

use interceptor::ebpf::{self, Attribution, METADATA_IPV4, METADATA_IPV6, Redirect};
use interceptor_tests::{Node, cmd, node::in_cgroup, pins::Pins, probe, require_root};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpListener,
};

type Seen = Arc<Mutex<HashMap<String, Vec<Option<u64>>>>>;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if !require_root("demo") {
        std::process::exit(1);
    }
    const CONNECTS: usize = 50;
    let node = Node::new();
    let pods = [
        ("billing", node.pod()),
        ("frontend", node.pod()),
        ("cni-agent", node.pod()),
    ];
    let pins = Pins::new("demo");

    let listener = TcpListener::bind((node.address, 0)).await.expect("bind");
    let SocketAddr::V4(proxy) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    let options = ebpf::Options {
        pin_dir: pins.0.clone(),
        cgroup_root: node.kubepods.clone(),
        redirect: Redirect {
            metadata4: SocketAddrV4::new(METADATA_IPV4, 80),
            metadata6: METADATA_IPV6,
            proxy4: Some(proxy),
            proxy6: None,
        },
        reload: false,
        kernel_log: false,
    };
    let datapath = ebpf::Datapath::open(&options).expect("attach the programs");
    // The opted-out pod keeps the node's own metadata service (here: no route to it).
    datapath
        .exempt()
        .insert(pods[2].1.container.id())
        .expect("exempt");
    let seen: Seen = Arc::default();
    accept_loop(listener, datapath.attribution(), seen.clone());

    println!(
        "== interceptor status (what the kernel holds)\n{}\n",
        ebpf::status(&pins.0).unwrap()
    );
    let top = node.cgroup_top().display().to_string();
    println!(
        "== bpftool cgroup tree {top}\n{}",
        cmd::run("bpftool", &["cgroup", "tree", &top])
    );

    println!("== every pod dials 169.254.169.254:80 {CONNECTS} times\n");
    println!(
        "{:<10} {:>9} {:>10} {:>8} {:>12} {:>14}  result",
        "pod", "cgroup id", "connected", "refused", "attributed", "misattributed"
    );
    let mut rows = Vec::new();
    for (name, pod) in &pods {
        let command = pod.command(
            probe::binary(),
            &["169.254.169.254:80", &CONNECTS.to_string(), name, "4"],
        );
        let report = tokio::task::spawn_blocking(move || probe::run(command))
            .await
            .unwrap();
        rows.push((*name, pod.container.id(), report));
    }
    let outside = node.outside_cgroup("system.slice/sshd.service");
    let command = in_cgroup(
        &outside,
        Some(&pods[0].1.netns),
        probe::binary(),
        &["169.254.169.254:80", "5", "outside"],
    );
    let outside_report = tokio::task::spawn_blocking(move || probe::run(command))
        .await
        .unwrap();

    let seen = seen.lock().unwrap();
    for (name, cgroup_id, report) in &rows {
        let records = seen.get(*name).cloned().unwrap_or_default();
        let right = records.iter().filter(|id| **id == Some(*cgroup_id)).count();
        let result = if report.connected == 0 {
            format!("not redirected ({})", report.first_error)
        } else {
            "redirected to the proxy, attributed by the kernel".to_owned()
        };
        println!(
            "{name:<10} {cgroup_id:>9} {:>10} {:>8} {right:>12} {:>14}  {result}",
            report.connected,
            report.failed,
            records.len() - right
        );
    }
    println!(
        "{:<10} {:>9} {:>10} {:>8} {:>12} {:>14}  not redirected: outside kubepods ({})",
        "sshd",
        outside.id(),
        outside_report.connected,
        outside_report.failed,
        0,
        0,
        outside_report.first_error
    );
    let counters: Vec<String> = datapath
        .counters()
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    println!("\nkernel counters: {}", counters.join(" "));
    println!("\n(cleaning up: programs, pins, netns, veth, cgroups)");
}

fn accept_loop(listener: TcpListener, attribution: Arc<Attribution>, seen: Seen) {
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            let local = stream.local_addr().unwrap();
            let cgroup = attribution
                .take(peer, local)
                .ok()
                .flatten()
                .map(|a| a.cgroup_id);
            let seen = seen.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut tag = String::new();
                let _ = BufReader::new(read).read_line(&mut tag).await;
                let _ = write.write_all(b"ok\n").await;
                seen.lock()
                    .unwrap()
                    .entry(tag.trim().to_owned())
                    .or_default()
                    .push(cgroup);
            });
        }
    });
}
