//! Test harness: a simulated Kubernetes node on the real kernel.
//!
//! A [`node::Node`] is a bridge with the node address the proxy listens on, plus a test
//! cgroup tree laid out as the kubelet lays it out (systemd driver). Each [`node::Pod`] is a
//! network namespace joined to the bridge by a veth pair, with a container cgroup
//! (`kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/
//! cri-containerd-<id>.scope`). Pods get an address on the node's /24 and a default route
//! via the node. The node is the test process's own network namespace ([`world`]), which
//! holds the metadata address and a fake of the node's metadata service: a connect to
//! 169.254.169.254 that is not redirected reaches it, and fails the test.
//!
//! Every resource is owned by a guard whose `Drop` removes it, so a failing (panicking)
//! test cleans up too.

pub mod agent;
pub mod ask;
pub mod clients;
pub mod clock;
pub mod cluster;
pub mod cmd;
pub mod control_plane;
pub mod fake_imds;
pub mod forwarder;
pub mod moto;
pub mod node;
pub mod objects;
pub mod peers;
pub mod pins;
pub mod pod_client;
pub mod privilege;
pub mod probe;
pub mod sts_proxy;
pub mod world;

pub use node::{Node, Pod};
pub use privilege::require_root;
