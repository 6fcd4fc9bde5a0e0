//! The simulated node behaves as a node's network does, so that a test failure is the
//! agent's and not the harness's.

use std::{
    net::TcpListener,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use interceptor_tests::{Node, Pod, require_root};

/// Whether `pod` opens a TCP connection to `address:port` within a second.
fn reaches(pod: &Pod, address: &str, port: u16) -> bool {
    let script = format!("exec 3<>/dev/tcp/{address}/{port}");
    let mut command: Command = pod.command("timeout", &["1", "bash", "-c", &script]);
    command.status().expect("run bash in the pod").success()
}

/// A pod going away must not cut the others off the node: on a bridge whose address
/// followed its lowest port, the remaining pods kept a stale ARP entry for the node and
/// timed out for up to a minute (seen as a stalled agent in the hostile token test).
#[test]
fn pods_keep_reaching_the_node_when_another_pod_goes() {
    if !require_root("pods_keep_reaching_the_node_when_another_pod_goes") {
        return;
    }
    let node = Node::new();
    let before = node.mac();
    let listener = TcpListener::bind((node.address, 0)).expect("listen on the node address");
    let port = listener.local_addr().unwrap().port();
    let done = Arc::new(AtomicBool::new(false));
    let accepting = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                drop(stream);
            }
        })
    };
    let address = node.address.to_string();
    let mut pods: Vec<Pod> = (0..4).map(|_| node.pod()).collect();
    for pod in &pods {
        assert!(reaches(pod, &address, port), "pod {} before", pod.ip);
    }

    // The pod whose veth has the lowest address: the one a bridge would have taken its
    // own address from.
    let lowest = (0..pods.len())
        .min_by_key(|at| pods[*at].node_side_mac())
        .unwrap();
    drop(pods.remove(lowest));

    let cut_off: Vec<String> = pods
        .iter()
        .filter(|pod| !reaches(pod, &address, port))
        .map(|pod| pod.ip.to_string())
        .collect();
    done.store(true, Ordering::Relaxed);
    // Wakes the accept loop so it sees `done`.
    let _ =
        std::net::TcpStream::connect_timeout(&(node.address, port).into(), Duration::from_secs(1));
    accepting.join().unwrap();
    assert!(
        cut_off.is_empty(),
        "pods cut off the node after another pod went: {cut_off:?}"
    );
    assert_eq!(node.mac(), before, "the node's link-layer address changed");
}
