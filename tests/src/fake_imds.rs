//! A faithful fake of the EC2 instance metadata service holding the *node's* credentials,
//! as configured with `HttpTokens=required`:
//!
//! - `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds` (1..=21600) mints
//!   a session token valid for that many seconds and echoes the TTL header; without the
//!   header, or with one out of range, 400; with `X-Forwarded-For` (a request relayed by a
//!   proxy), 403, as EC2 refuses it.
//! - Every other request needs a live token in `X-aws-ec2-metadata-token`: without one, or
//!   with an unknown or expired one, 401. Only GET and HEAD are served (405 otherwise).
//! - Every answer leaves with the IP TTL / hop limit set to the instance's
//!   `HttpPutResponseHopLimit` (1 unless told otherwise). EC2 only limits the token's
//!   answer; limiting the whole connection is stricter and changes nothing for a client,
//!   which needs the token first anyway.
//!
//! It is used twice: as the agent's upstream (`--metadata-addr`, on loopback), so the
//! agent's own IMDSv2 handling is exercised, and as the simulated node's metadata service
//! at 169.254.169.254 ([`crate::world`]), where any connection is a redirect the agent
//! missed. It records every connection and request with its peer, so tests can say which
//! pod leaked.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// The node's access key id: must never reach a pod.
pub const NODE_ACCESS_KEY: &str = "ASIANODEROLELEAK0001";
pub const NODE_ROLE: &str = "node-instance-role";
/// The body of the node's signed instance identity (`pkcs7`, `signature`, `rsa2048`):
/// must never reach a pod either (it logs in as the node, e.g. to Vault's EC2 auth).
pub const NODE_SIGNATURE: &str = "NODE-SIGNED-IDENTITY-LEAK";
pub const NODE_PROFILE_ARN: &str = "arn:aws:iam::123456789012:instance-profile/node-instance-role";

const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
const MAX_TTL: u64 = 21_600;

/// What reached the service: a connection (`request: None`, recorded at accept, so a
/// client that never sends a valid request is seen too) or one request on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub peer: SocketAddr,
    /// `METHOD path`, with ` token=<yes|no>` appended for requests.
    pub request: Option<String>,
}

#[derive(Default)]
struct State {
    seen: Mutex<Vec<Seen>>,
    tokens: Mutex<HashMap<String, Instant>>,
    minted: AtomicU64,
    unauthorized: AtomicU64,
}

#[derive(Clone)]
pub struct FakeImds {
    addrs: Vec<SocketAddr>,
    hop_limit: u32,
    state: Arc<State>,
}

impl FakeImds {
    /// Listens on an ephemeral port of `host` (loopback, or an address of the test's own
    /// node) on the current tokio runtime.
    pub async fn start(host: IpAddr) -> Self {
        Self::start_on(&[SocketAddr::new(host, 0)], 1).await
    }

    /// Listens on every address of `on`, answering with hop limit `hop_limit`.
    pub async fn start_on(on: &[SocketAddr], hop_limit: u32) -> Self {
        let mut listeners = Vec::new();
        for addr in on {
            let listener = TcpListener::bind(addr).await.unwrap_or_else(|error| {
                panic!("bind the fake metadata service on {addr}: {error}")
            });
            listeners.push(listener);
        }
        let imds = Self {
            addrs: listeners
                .iter()
                .map(|listener| listener.local_addr().expect("local address"))
                .collect(),
            hop_limit,
            state: Arc::default(),
        };
        for listener in listeners {
            let imds = imds.clone();
            tokio::spawn(async move {
                while let Ok((stream, peer)) = listener.accept().await {
                    imds.record(peer, None);
                    tokio::spawn(imds.clone().serve(stream, peer));
                }
            });
        }
        imds
    }

    async fn serve(self, stream: TcpStream, peer: SocketAddr) {
        set_hop_limit(&stream, peer, self.hop_limit);
        let service = service_fn(move |request: Request<Incoming>| {
            let imds = self.clone();
            async move { Ok::<_, std::convert::Infallible>(imds.answer(peer, &request)) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .await;
    }

    fn record(&self, peer: SocketAddr, request: Option<String>) {
        self.state.seen.lock().unwrap().push(Seen { peer, request });
    }

    fn answer(&self, peer: SocketAddr, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        let path = request.uri().path().to_owned();
        let token = header(request, TOKEN_HEADER);
        self.record(
            peer,
            Some(format!(
                "{} {path} token={}",
                request.method(),
                if token.is_some() { "yes" } else { "no" }
            )),
        );
        if path == "/latest/api/token" {
            return self.mint(request);
        }
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return respond(StatusCode::METHOD_NOT_ALLOWED, "");
        }
        let live = token.is_some_and(|token| {
            self.state
                .tokens
                .lock()
                .unwrap()
                .get(&token)
                .is_some_and(|expires| Instant::now() < *expires)
        });
        if !live {
            self.state.unauthorized.fetch_add(1, Ordering::Relaxed);
            return respond(StatusCode::UNAUTHORIZED, "");
        }
        let (status, body) = metadata(&path);
        respond(status, &body)
    }

    fn mint(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        if request.method() != Method::PUT {
            return respond(StatusCode::METHOD_NOT_ALLOWED, "");
        }
        if request.headers().contains_key("x-forwarded-for") {
            return respond(StatusCode::FORBIDDEN, "");
        }
        let Some(ttl) = header(request, TTL_HEADER)
            .and_then(|ttl| ttl.parse::<u64>().ok())
            .filter(|ttl| (1..=MAX_TTL).contains(ttl))
        else {
            return respond(StatusCode::BAD_REQUEST, "");
        };
        let n = self.state.minted.fetch_add(1, Ordering::Relaxed);
        let token = format!("node-imds-token-{}-{n}", std::process::id());
        self.state
            .tokens
            .lock()
            .unwrap()
            .insert(token.clone(), Instant::now() + Duration::from_secs(ttl));
        let mut response = respond(StatusCode::OK, &token);
        response
            .headers_mut()
            .insert(TTL_HEADER, ttl.to_string().parse().expect("a header value"));
        response
    }

    /// The first address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// Every request received, as `METHOD path` (connections without a request left out).
    pub fn requests(&self) -> Vec<String> {
        self.seen()
            .into_iter()
            .filter_map(|seen| seen.request)
            .map(|request| {
                request
                    .rsplit_once(" token=")
                    .map_or(request.clone(), |(request, _)| request.to_owned())
            })
            .collect()
    }

    /// Every connection and request received, with its peer.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Invalidates every token minted so far (as an instance's stop and start does): the
    /// next request with one gets 401.
    pub fn revoke_tokens(&self) {
        self.state.tokens.lock().unwrap().clear();
    }

    /// (tokens minted, requests refused with 401).
    pub fn token_counts(&self) -> (u64, u64) {
        (
            self.state.minted.load(Ordering::Relaxed),
            self.state.unauthorized.load(Ordering::Relaxed),
        )
    }
}

fn header(request: &Request<Incoming>, name: &str) -> Option<String> {
    request
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

fn respond(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response
}

/// The node's metadata, as EC2 serves it to a holder of a token.
fn metadata(path: &str) -> (StatusCode, String) {
    let found = |body: String| (StatusCode::OK, body);
    match path {
        "/latest/meta-data/iam/info" => found(format!(
            "{{\"Code\":\"Success\",\"LastUpdated\":\"2026-01-01T00:00:00Z\",\"InstanceProfileArn\":\"{NODE_PROFILE_ARN}\",\"InstanceProfileId\":\"AIPANODE\"}}"
        )),
        "/latest/meta-data/iam/security-credentials/" => found(NODE_ROLE.into()),
        p if p == format!("/latest/meta-data/iam/security-credentials/{NODE_ROLE}") => {
            found(format!(
                "{{\"Code\":\"Success\",\"Type\":\"AWS-HMAC\",\"AccessKeyId\":\"{NODE_ACCESS_KEY}\",\"SecretAccessKey\":\"node\",\"Token\":\"node\",\"Expiration\":\"2099-01-01T00:00:00Z\"}}"
            ))
        }
        // The node's identity credentials (EC2's own, for the instance itself) and the
        // signed identity forms: what a pod must never be forwarded, whatever the
        // agent's allow-list says.
        "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance" => {
            found(format!(
                "{{\"Code\":\"Success\",\"Type\":\"AWS-HMAC\",\"AccessKeyId\":\"{NODE_ACCESS_KEY}\",\"SecretAccessKey\":\"node\",\"Token\":\"node\",\"Expiration\":\"2099-01-01T00:00:00Z\"}}"
            ))
        }
        "/latest/meta-data/identity-credentials/ec2/info" => found(format!(
            "{{\"Code\":\"Success\",\"AccountId\":\"123456789012\",\"InstanceProfileArn\":\"{NODE_PROFILE_ARN}\"}}"
        )),
        "/latest/dynamic/instance-identity/pkcs7"
        | "/latest/dynamic/instance-identity/signature"
        | "/latest/dynamic/instance-identity/rsa2048" => found(NODE_SIGNATURE.into()),
        "/latest/meta-data/placement/availability-zone" => found("us-east-1a".into()),
        "/latest/dynamic/instance-identity/document" => {
            found("{\"accountId\":\"123456789012\",\"region\":\"us-east-1\"}".into())
        }
        _ => (StatusCode::NOT_FOUND, String::new()),
    }
}

/// Sets the connection's IP TTL (IPv4) or unicast hop limit (IPv6).
fn set_hop_limit(stream: &TcpStream, peer: SocketAddr, hops: u32) {
    let socket = socket2::SockRef::from(stream);
    match peer {
        SocketAddr::V4(_) => socket.set_ttl_v4(hops),
        SocketAddr::V6(_) => socket.set_unicast_hops_v6(hops),
    }
    .expect("set the answer's hop limit");
}
