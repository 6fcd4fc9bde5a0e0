//! interceptor: per-pod AWS credentials on Kubernetes nodes, from the kernel.
//!
//! Data flows one way: kernel record ([`ebpf`]) -> identity -> pod -> policy ->
//! credentials -> response. Only [`ebpf`] talks to the kernel through aya. [`app`] wires
//! the modules into the agent that `interceptor run` starts.
#![forbid(unsafe_code)]
#![warn(unreachable_pub)]

pub mod app;
pub mod audit;
pub mod bindings;
pub mod cgroupfs;
pub mod config;
pub mod credentials;
pub(crate) mod drain;
pub mod ebpf;
pub mod identity;
pub mod imds;
pub mod k8s;
pub(crate) mod metrics;
pub mod observe;
pub mod optout;
pub mod policy;
pub mod resolve;
