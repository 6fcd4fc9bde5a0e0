//! A stand-in for the node's real metadata service, the agent's upstream: it hands out
//! recognisable *node* credentials, so any leak of them to a pod is detected, and counts
//! every request it gets.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// The node's access key id: must never reach a pod.
pub const NODE_ACCESS_KEY: &str = "ASIANODEROLELEAK0001";
pub const NODE_ROLE: &str = "node-instance-role";
pub const NODE_PROFILE_ARN: &str = "arn:aws:iam::123456789012:instance-profile/node-instance-role";

#[derive(Clone)]
pub struct FakeImds {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
}

fn answer(path: &str) -> (u16, String) {
    match path {
        "/latest/api/token" => (200, "upstream-token".into()),
        "/latest/meta-data/iam/info" => (
            200,
            format!(
                "{{\"Code\":\"Success\",\"LastUpdated\":\"2026-01-01T00:00:00Z\",\"InstanceProfileArn\":\"{NODE_PROFILE_ARN}\",\"InstanceProfileId\":\"AIPANODE\"}}"
            ),
        ),
        "/latest/meta-data/iam/security-credentials/" => (200, NODE_ROLE.into()),
        p if p == format!("/latest/meta-data/iam/security-credentials/{NODE_ROLE}") => (
            200,
            format!(
                "{{\"Code\":\"Success\",\"Type\":\"AWS-HMAC\",\"AccessKeyId\":\"{NODE_ACCESS_KEY}\",\"SecretAccessKey\":\"node\",\"Token\":\"node\",\"Expiration\":\"2099-01-01T00:00:00Z\"}}"
            ),
        ),
        "/latest/meta-data/placement/availability-zone" => (200, "us-east-1a".into()),
        "/latest/dynamic/instance-identity/document" => {
            (200, "{\"accountId\":\"123456789012\"}".into())
        }
        _ => (404, "not found".into()),
    }
}

impl FakeImds {
    /// Listens on `host` (loopback, or an address of the test's own node).
    pub async fn start(host: std::net::IpAddr) -> Self {
        let listener = TcpListener::bind((host, 0))
            .await
            .expect("bind the fake upstream");
        let imds = Self {
            addr: listener.local_addr().unwrap(),
            requests: Arc::default(),
        };
        let requests = imds.requests.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let requests = requests.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let requests = requests.clone();
                        async move {
                            let path = request.uri().path().to_owned();
                            requests
                                .lock()
                                .unwrap()
                                .push(format!("{} {path}", request.method()));
                            let (status, body) = answer(&path);
                            let mut response = Response::new(Full::new(Bytes::from(body)));
                            *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        imds
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request received, as `METHOD path`.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}
