//! The metadata server pods talk to: EC2's credential API answered per pod, IMDSv2 tokens
//! bound to the pod, and an allow-listed passthrough to the real metadata service.

pub mod ec2;
pub mod route;
pub mod server;
pub mod token;
pub mod upstream;

pub use server::{Authorization, Backend, CredentialsFailure, Grant, Server, ServerConfig};
