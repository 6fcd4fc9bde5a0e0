//! The floor: a minimal hyper server answering every request with a fixed body of the
//! size of a credentials document, with the same headers. Reached through the same
//! redirect as the agent, it is what the design cannot beat.

use std::net::{Ipv4Addr, SocketAddr};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, task::JoinHandle};

/// The running server; aborted on drop.
pub struct Floor {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Floor {
    pub async fn start(host: Ipv4Addr, body_bytes: usize) -> Self {
        let listener = TcpListener::bind((host, 0)).await.expect("bind the floor");
        let addr = listener.local_addr().expect("floor address");
        let body = Bytes::from(vec![b'x'; body_bytes]);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |_request| {
                        let mut response = Response::new(Full::new(body.clone()));
                        let headers = response.headers_mut();
                        headers.insert("content-type", "text/plain".parse().unwrap());
                        headers.insert("server", "EC2ws".parse().unwrap());
                        async { Ok::<_, std::convert::Infallible>(response) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, task }
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        self.task.abort();
    }
}
