//! The allow-listed passthrough to the real metadata service, speaking IMDSv2 itself: the
//! agent fetches (and re-fetches) its own session token, so pods' allowed requests work
//! on nodes that require IMDSv2.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, sync::Mutex};

use super::ec2::{self, Body, TOKEN_HEADER, TTL_HEADER};

/// Bodies larger than this from upstream are not relayed (user-data is at most 16 KiB;
/// nothing legitimate comes close).
const MAX_BODY: usize = 1 << 20;
const TOKEN_TTL: Duration = Duration::from_secs(21_600);
const TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to the metadata service at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the metadata service: {0}")]
    Http(#[from] hyper::Error),
    #[error("the metadata service did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the metadata service's answer is larger than {MAX_BODY} bytes")]
    TooLarge,
    #[error("building the upstream request: {0}")]
    Request(#[from] http::Error),
}

impl UpstreamError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "connect",
            Self::Http(_) => "http",
            Self::Timeout(_) => "timeout",
            Self::TooLarge => "too_large",
            Self::Request(_) => "request",
        }
    }
}

pub struct Upstream {
    addr: SocketAddr,
    token: Mutex<Option<(String, Instant)>>,
}

impl Upstream {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            token: Mutex::new(None),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    async fn send(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), UpstreamError> {
        let exchange = async {
            let stream =
                TcpStream::connect(self.addr)
                    .await
                    .map_err(|source| UpstreamError::Connect {
                        addr: self.addr,
                        source,
                    })?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            let response = sender.send_request(request).await?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|_| UpstreamError::TooLarge)?
                .to_bytes();
            Ok((parts.status, parts.headers, body))
        };
        tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| UpstreamError::Timeout(TIMEOUT))?
    }

    /// The agent's own IMDSv2 token, fetched on first use and before it expires. `None`
    /// if the service does not do IMDSv2 (then requests go without).
    async fn session_token(&self, refresh: bool) -> Result<Option<String>, UpstreamError> {
        let mut cached = self.token.lock().await;
        if !refresh
            && let Some((token, expires)) = cached.as_ref()
            && expires.saturating_duration_since(Instant::now()) > Duration::from_secs(60)
        {
            return Ok(Some(token.clone()));
        }
        let request = Request::builder()
            .method(Method::PUT)
            .uri("/latest/api/token")
            .header(http::header::HOST, self.addr.to_string())
            .header(TTL_HEADER, TOKEN_TTL.as_secs())
            .body(Full::new(Bytes::new()))?;
        let (status, _, body) = self.send(request).await?;
        if !status.is_success() {
            *cached = None;
            return Ok(None);
        }
        let token = String::from_utf8_lossy(&body).trim().to_owned();
        *cached = Some((token.clone(), Instant::now() + TOKEN_TTL));
        Ok(Some(token))
    }

    /// Forwards a GET/HEAD for `path` and relays the answer.
    pub async fn forward(
        &self,
        method: &Method,
        path: &str,
    ) -> Result<Response<Body>, UpstreamError> {
        let mut refresh = false;
        loop {
            let token = self.session_token(refresh).await?;
            let mut request = Request::builder()
                .method(method.clone())
                .uri(path)
                .header(http::header::HOST, self.addr.to_string());
            if let Some(token) = &token {
                request = request.header(TOKEN_HEADER, token);
            }
            let (status, headers, body) = self.send(request.body(Full::new(Bytes::new()))?).await?;
            if status == StatusCode::UNAUTHORIZED && token.is_some() && !refresh {
                refresh = true;
                continue;
            }
            let mut response = ec2::text(body);
            *response.status_mut() = status;
            if let Some(content_type) = headers.get(http::header::CONTENT_TYPE) {
                response
                    .headers_mut()
                    .insert(http::header::CONTENT_TYPE, content_type.clone());
            }
            return Ok(response);
        }
    }
}
