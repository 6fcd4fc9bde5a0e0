//! The HTTP side: accept, attribute once per connection from the kernel's record, answer
//! each request as EC2 would for that caller.
//!
//! What a caller is and what it may have is asked of a [`Backend`] (the resolver and the
//! credentials cache in the agent), per request, so that an annotation or namespace change
//! takes effect on the next request of an open keep-alive connection.
//!
//! In observe mode (`run --observe`, [`crate::observe`]) the same decision is made per
//! request and recorded, but every request a recorded connection sends is answered as the
//! node would answer it: forwarded to the real metadata service, credential paths
//! included; no credentials are fetched. IMDSv2 tokens are still the agent's own, bound
//! to the caller, so a pod's token handling is the same in both modes. A connection the
//! kernel did not record is refused (403) in both.
//!
//! Draining (SIGTERM) is built for an upgrade's takeover, where the successor's socket
//! already receives every new connection (the kernel's proxy map, docs/ebpf.md): the
//! accept loop goes on while connections still arrive, since those the kernel handed to
//! this agent before the swap wait in its listener's queue and closing it would reset
//! them; it closes the listener after [`HANDOVER_QUIET`] without one, or after
//! [`HANDOVER_MAX`] (with no successor, pods keep arriving). Every answer given while
//! draining carries `Connection: close`, so a client's next request opens a new
//! connection, which reaches the successor; idle connections end at the header read
//! timeout, as always.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    task::Poll,
    time::{Duration, SystemTime},
};

use http::{Method, Request, Response, StatusCode};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    time::{Instant, error::Elapsed},
};

use super::{
    ec2::{self, Body, CredentialsDocument, TOKEN_HEADER, TTL_HEADER},
    route::{AllowList, Route, classify},
    token::{TokenMinter, parse_ttl},
    upstream::Upstream,
};
use crate::{
    audit::ChosenBy,
    credentials::Credentials,
    drain::Drain,
    ebpf::{Attributed, Attribution},
    metrics::{Metrics, OpenGauge, RequestTimer},
    observe::{ObserveStore, Who, WouldGet},
};

/// What a caller may have for one request, decided once per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authorization<G> {
    /// A role: what the request may list, describe and fetch credentials for.
    Role(G),
    /// No annotation and no default: 404, like an instance without a profile.
    NoRole,
    /// Refused by policy (reason logged and posted as an Event by the backend): 404.
    /// The reason is the refusal's metric label.
    Denied(&'static str),
}

impl<G: Grant> Authorization<G> {
    /// What observe mode records: the very decision enforcement would act on.
    fn would_get(&self) -> WouldGet {
        match self {
            Self::Role(grant) => WouldGet::Role {
                arn: grant.arn().to_owned(),
                chosen_by: grant.chosen_by(),
            },
            Self::NoRole => WouldGet::None,
            Self::Denied(reason) => WouldGet::Refused {
                reason: (*reason).to_owned(),
            },
        }
    }
}

/// A role granted to a caller for one request, carrying what fetching its credentials
/// needs, so that the credentials are those of the very decision that was checked.
pub trait Grant: Send + Sync {
    /// The role's ARN.
    fn arn(&self) -> &str;
    /// How the role was chosen (audit record, observe mode's report).
    fn chosen_by(&self) -> ChosenBy;
    /// What IMDS lists (the last component of the ARN).
    fn role_name(&self) -> &str {
        let arn = self.arn();
        arn.rsplit('/').next().unwrap_or(arn)
    }
}

/// Why credentials could not be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialsFailure {
    /// STS refused (AccessDenied and other client errors): answered as EC2 answers an
    /// instance profile whose role cannot be assumed.
    Refused { code: String, message: String },
    /// STS unreachable or throttling and nothing cached: 503, the SDK retries.
    Unavailable,
}

/// A connection the kernel recorded but the backend does not serve: refused (403), or in
/// observe mode answered as the node would and recorded as refused for `reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unserved {
    /// The refusal's metric label.
    pub reason: &'static str,
    /// Who it is, as far as the backend could tell.
    pub who: Who,
}

/// What the server needs to know about callers.
pub trait Backend: Send + Sync + 'static {
    type Caller: Send + Sync + 'static;
    type Grant: Grant;
    /// The caller behind a kernel record; an error refuses the connection (403; observe
    /// mode answers it as the node would, and records the refusal).
    fn caller(
        &self,
        record: Attributed,
    ) -> impl Future<Output = Result<Self::Caller, Unserved>> + Send;
    /// What IMDSv2 tokens are bound to (stable for the caller's lifetime).
    fn binding<'a>(&self, caller: &'a Self::Caller) -> &'a str;
    /// Who the caller is, for observe mode's record (namespace, pod, container).
    fn who(&self, caller: &Self::Caller) -> Who;
    /// What the caller may have now: asked once per request, so that an annotation or
    /// namespace change takes effect on the next request of an open connection.
    fn authorize(&self, caller: &Self::Caller) -> Authorization<Self::Grant>;
    /// The credentials of a grant.
    fn credentials(
        &self,
        grant: &Self::Grant,
    ) -> impl Future<Output = Result<Arc<Credentials>, CredentialsFailure>> + Send;
}

/// Limits and switches of the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Refuse tokenless requests (EC2's `HttpTokens=required`).
    pub imdsv2_required: bool,
    /// Paths forwarded to the real metadata service (default: none).
    pub allow_route: AllowList,
    /// Time a client has to send a request head: the first one, and each next one on a
    /// keep-alive connection (so it is also how long an idle connection is kept).
    pub header_read_timeout: Duration,
    /// Time to answer one request once its head is read; then 503.
    pub request_timeout: Duration,
    /// Age at which a connection is closed (after the request in flight, if any, or
    /// at once when the client does not take its answers).
    pub connection_max_age: Duration,
    /// Largest request head accepted (hyper's read buffer; at least 8 KiB).
    pub max_header_bytes: usize,
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Connections served at once per caller cgroup (and for all unattributed ones
    /// together); more are closed at once, so one pod cannot take every slot.
    pub max_connections_per_cgroup: usize,
    /// Connections served at once per pod (all its containers together); more are
    /// closed at once, so a pod with many containers cannot take the whole pool.
    pub max_connections_per_pod: usize,
}

/// Open connections per key: per caller cgroup (`None`: connections the kernel did not
/// record), and per pod (the caller's binding, its pod UID).
struct OpenPer<K>(Mutex<HashMap<K, usize>>);

impl<K> Default for OpenPer<K> {
    fn default() -> Self {
        Self(Mutex::default())
    }
}

type OpenPerCgroup = OpenPer<Option<u64>>;
type OpenPerPod = OpenPer<String>;

impl<K: std::hash::Hash + Eq + Clone> OpenPer<K> {
    /// A slot for one more connection of `key`, unless it already holds `limit`.
    fn claim(self: &Arc<Self>, key: K, limit: usize) -> Option<Slot<K>> {
        let mut open = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(key.clone()).or_default();
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(Slot {
            open: Arc::clone(self),
            key,
        })
    }
}

/// One connection's place in an [`OpenPer`], given back when dropped.
struct Slot<K: std::hash::Hash + Eq> {
    open: Arc<OpenPer<K>>,
    key: K,
}

impl<K: std::hash::Hash + Eq> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut open = self.open.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// Who is on a connection.
enum Peer<C> {
    /// A caller the backend knows.
    Caller(C),
    /// Recorded by the kernel, refused by the backend (observe mode answers it).
    Unserved(Unserved),
    /// Not recorded by the kernel (dialled directly): refused in every mode.
    Unrecorded,
}

/// While draining, the listener closes once no connection arrived for this long: the
/// successor has taken over, or no pod is asking.
pub(crate) const HANDOVER_QUIET: Duration = Duration::from_millis(250);
/// While draining, the listener closes after this long at the latest (connections keep
/// arriving when there is no successor: a plain stop).
pub(crate) const HANDOVER_MAX: Duration = Duration::from_secs(2);

pub struct Server<B: Backend> {
    backend: Arc<B>,
    /// Observe mode's record; `None` when enforcing.
    observe: Option<Arc<ObserveStore>>,
    attribution: Arc<Attribution>,
    upstream: Arc<Upstream>,
    tokens: Arc<TokenMinter>,
    config: ServerConfig,
    metrics: Arc<Metrics>,
    open_per_cgroup: Arc<OpenPerCgroup>,
    drain: Drain,
    open_per_pod: Arc<OpenPerPod>,
}

impl<B: Backend> Server<B> {
    /// A server for `backend`; with `observe`, in observe mode (see the module docs).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        backend: Arc<B>,
        observe: Option<Arc<ObserveStore>>,
        attribution: Arc<Attribution>,
        upstream: Arc<Upstream>,
        config: ServerConfig,
        metrics: Arc<Metrics>,
        drain: Drain,
        tokens: TokenMinter,
    ) -> Self {
        Self {
            backend,
            observe,
            attribution,
            upstream,
            tokens: Arc::new(tokens),
            config,
            metrics,
            open_per_cgroup: Arc::default(),
            drain,
            open_per_pod: Arc::default(),
        }
    }

    /// Serves `listener`; once the drain starts, until connections stop arriving (see the
    /// module docs), then the listener closes.
    pub(crate) async fn serve(self: Arc<Self>, listener: TcpListener) {
        let slots = Arc::new(Semaphore::new(self.config.max_connections));
        let mut draining = std::pin::pin!(self.drain.signaled());
        let mut handing_over = false;
        let mut handover_end = Instant::now();
        let quiet = tokio::time::sleep(HANDOVER_MAX);
        let mut quiet = std::pin::pin!(quiet);
        loop {
            let accepted = tokio::select! {
                () = draining.as_mut(), if !handing_over => {
                    handing_over = true;
                    handover_end = Instant::now() + HANDOVER_MAX;
                    quiet.as_mut().reset(Instant::now() + HANDOVER_QUIET);
                    continue;
                }
                () = quiet.as_mut(), if handing_over => return,
                accepted = async {
                    let permit = Arc::clone(&slots).acquire_owned().await;
                    (permit, listener.accept().await)
                } => accepted,
            };
            if handing_over {
                quiet
                    .as_mut()
                    .reset((Instant::now() + HANDOVER_QUIET).min(handover_end));
            }
            let (Ok(permit), accepted) = accepted else {
                return;
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let server = Arc::clone(&self);
            self.drain.track(async move {
                server.connection(stream, peer).await;
                drop(permit);
            });
        }
    }

    async fn connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let _open = OpenGauge::new(&self.metrics.proxy_connections);
        let Ok(local) = stream.local_addr() else {
            return;
        };
        let ServerConfig {
            header_read_timeout,
            request_timeout,
            connection_max_age,
            max_header_bytes,
            max_connections_per_cgroup,
            max_connections_per_pod,
            ..
        } = self.config;
        let record = match self.attribution.take(peer, local) {
            Ok(Some(record)) => Some(record),
            Ok(None) => {
                self.metrics.attribution_misses.inc();
                tracing::debug!(%peer, "connection without a kernel record: refused");
                None
            }
            Err(error) => {
                tracing::warn!(%peer, %error, "reading the kernel's record failed: refused");
                None
            }
        };
        let cgroup = record.as_ref().map(|record| record.cgroup_id);
        let Some(_slot) = self
            .open_per_cgroup
            .claim(cgroup, max_connections_per_cgroup)
        else {
            self.metrics
                .connection_refusals
                .with_label_values(&["cgroup_limit"])
                .inc();
            tracing::debug!(%peer, ?cgroup, "too many connections from this cgroup: closed");
            return;
        };
        let who = Arc::new(match record {
            Some(record) => match self.backend.caller(record).await {
                Ok(caller) => Peer::Caller(caller),
                Err(unserved) => Peer::Unserved(unserved),
            },
            None => Peer::Unrecorded,
        });
        let _pod_slot = match &*who {
            Peer::Caller(caller) => {
                let pod = self.backend.binding(caller).to_owned();
                let Some(slot) = self.open_per_pod.claim(pod, max_connections_per_pod) else {
                    self.metrics
                        .connection_refusals
                        .with_label_values(&["pod_limit"])
                        .inc();
                    tracing::debug!(%peer, "too many connections from this pod: closed");
                    return;
                };
                Some(slot)
            }
            Peer::Unserved(_) | Peer::Unrecorded => None,
        };
        let service = service_fn(move |request: Request<Incoming>| {
            let server = Arc::clone(&self);
            let who = Arc::clone(&who);
            async move {
                let mut response = server.handle(&who, request).await;
                if server.drain.is_draining() {
                    // The client's next request goes to a new connection: the successor's.
                    response.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .max_buf_size(max_header_bytes.max(8192));
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let mut connection = std::pin::pin!(connection);
        // Draining ends a connection with its next answer (`Connection: close`), or at the
        // header read timeout when idle; the app's drain bound covers both.
        if tokio::time::timeout(connection_max_age, connection.as_mut())
            .await
            .is_ok()
        {
            return;
        }
        // Old enough: the request in flight gets its time, then the connection closes (an
        // idle one at once); a client that does not take its answers is dropped.
        connection.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(request_timeout, connection).await;
    }

    async fn handle(&self, peer: &Peer<B::Caller>, request: Request<Incoming>) -> Response<Body> {
        let route = classify(request.method(), request.uri().path());
        let class = route.class();
        let _timer = RequestTimer::start(&self.metrics, class);
        let answer = async {
            match (peer, &self.observe) {
                (Peer::Caller(caller), None) => Some(self.respond(caller, route, &request).await),
                (Peer::Caller(caller), Some(store)) => {
                    let would_get = self.backend.authorize(caller).would_get();
                    let (who, binding) = (self.backend.who(caller), self.backend.binding(caller));
                    Some(
                        self.observe(store, who, binding, would_get, route, &request)
                            .await,
                    )
                }
                (Peer::Unserved(unserved), Some(store)) => {
                    let would_get = WouldGet::Refused {
                        reason: unserved.reason.to_owned(),
                    };
                    // Bound to what identifies it: the cgroup it was recorded in.
                    let binding = format!("unserved {}", unserved.who.container);
                    let who = unserved.who.clone();
                    Some(
                        self.observe(store, who, &binding, would_get, route, &request)
                            .await,
                    )
                }
                (Peer::Unserved(_) | Peer::Unrecorded, _) => None,
            }
        };
        let timeout = self.config.request_timeout;
        let response = match within(timeout, answer).await {
            Ok(Some(response)) => response,
            Ok(None) => ec2::error(StatusCode::FORBIDDEN),
            Err(_) => {
                tracing::warn!(?timeout, class, "request not answered in time: 503");
                ec2::error(StatusCode::SERVICE_UNAVAILABLE)
            }
        };
        self.metrics
            .requests
            .with_label_values(&[class, response.status().as_str()])
            .inc();
        response
    }

    async fn respond(
        &self,
        caller: &B::Caller,
        route: Route<'_>,
        request: &Request<Incoming>,
    ) -> Response<Body> {
        let now = SystemTime::now();
        if let Some(answered) = self.tokens(&route, request, self.backend.binding(caller), now) {
            return answered;
        }
        match route {
            Route::Token => unreachable!("answered above"),
            Route::CredentialsList => match self.backend.authorize(caller) {
                Authorization::Role(grant) => ec2::text(grant.role_name().to_owned()),
                Authorization::NoRole | Authorization::Denied(_) => {
                    ec2::error(StatusCode::NOT_FOUND)
                }
            },
            Route::Credentials(asked) => match self.backend.authorize(caller) {
                Authorization::Role(grant) if grant.role_name() == asked => {
                    match self.backend.credentials(&grant).await {
                        Ok(served) => ec2::text(served.rendered(|served| {
                            ec2::credentials(&CredentialsDocument {
                                access_key_id: &served.access_key_id,
                                secret_access_key: &served.secret_access_key,
                                token: &served.session_token,
                                expiration: served.expiration,
                                last_updated: served.last_updated(),
                            })
                        })),
                        Err(CredentialsFailure::Refused { code, message }) => {
                            ec2::credentials_failure(&code, &message, now)
                        }
                        Err(CredentialsFailure::Unavailable) => {
                            ec2::error(StatusCode::SERVICE_UNAVAILABLE)
                        }
                    }
                }
                _ => ec2::error(StatusCode::NOT_FOUND),
            },
            Route::Info => match self.backend.authorize(caller) {
                Authorization::Role(grant) => {
                    let (profile_arn, profile_id) = instance_profile_of(grant.arn());
                    ec2::info(&profile_arn, &profile_id, now)
                }
                Authorization::NoRole | Authorization::Denied(_) => {
                    ec2::error(StatusCode::NOT_FOUND)
                }
            },
            Route::Passthrough(path) => {
                if !self.config.allow_route.allows(path) {
                    return ec2::error(StatusCode::NOT_FOUND);
                }
                self.forward(request, path).await
            }
            Route::Malformed | Route::Denied => ec2::error(StatusCode::NOT_FOUND),
            Route::MethodNotAllowed => ec2::error(StatusCode::METHOD_NOT_ALLOWED),
        }
    }

    /// IMDSv2 as EC2 does it, with tokens bound to `binding`: a token request is answered
    /// here, as is a request whose token is refused (or missing, with
    /// `--imdsv2-required`); `None` lets the request through.
    fn tokens(
        &self,
        route: &Route<'_>,
        request: &Request<Incoming>,
        binding: &str,
        now: SystemTime,
    ) -> Option<Response<Body>> {
        let headers = request.headers();
        if *route == Route::Token {
            // EC2 refuses token requests that went through a proxy.
            if headers.contains_key("x-forwarded-for") {
                return Some(ec2::error(StatusCode::FORBIDDEN));
            }
            let Some(ttl) = parse_ttl(headers.get(TTL_HEADER).map(|value| value.as_bytes())) else {
                return Some(ec2::error(StatusCode::BAD_REQUEST));
            };
            return Some(ec2::token(
                self.tokens.mint(binding, ttl, now),
                ttl.as_secs(),
            ));
        }
        match headers.get(TOKEN_HEADER) {
            Some(token) => {
                let token = token.to_str().unwrap_or("");
                if let Err(error) = self.tokens.verify(token, binding, now) {
                    tracing::debug!(%error, "IMDSv2 token refused");
                    return Some(ec2::error(StatusCode::UNAUTHORIZED));
                }
                None
            }
            None if self.config.imdsv2_required => Some(ec2::error(StatusCode::UNAUTHORIZED)),
            None => None,
        }
    }

    /// `path` as the real metadata service answers it (GET, or HEAD for a HEAD).
    async fn forward(&self, request: &Request<Incoming>, path: &str) -> Response<Body> {
        let method = if request.method() == Method::HEAD {
            Method::HEAD
        } else {
            Method::GET
        };
        match self.upstream.forward(&method, path).await {
            Ok(response) => response,
            Err(error) => {
                tracing::warn!(%error, path, "forwarding to the metadata service failed");
                ec2::error(StatusCode::BAD_GATEWAY)
            }
        }
    }

    /// Observe mode: records who asked what and what enforcement would give, then
    /// answers as the node would (see the module docs). Only paths that are not well
    /// formed (404) and methods EC2 refuses (405) are answered here, as under
    /// enforcement: the first could be read differently by the agent and the service.
    async fn observe(
        &self,
        store: &ObserveStore,
        who: Who,
        binding: &str,
        would_get: WouldGet,
        route: Route<'_>,
        request: &Request<Incoming>,
    ) -> Response<Body> {
        let path = request.uri().path();
        self.metrics
            .observed_requests
            .with_label_values(&[would_get.label()])
            .inc();
        store.record(who, request.method(), path, would_get);
        if let Some(answered) = self.tokens(&route, request, binding, SystemTime::now()) {
            return answered;
        }
        match route {
            Route::Token => unreachable!("answered above"),
            Route::Malformed => ec2::error(StatusCode::NOT_FOUND),
            Route::MethodNotAllowed => ec2::error(StatusCode::METHOD_NOT_ALLOWED),
            Route::Credentials(_) => {
                self.metrics.observed_node_role_requests.inc();
                self.forward(request, path).await
            }
            Route::CredentialsList | Route::Info | Route::Passthrough(_) | Route::Denied => {
                self.forward(request, path).await
            }
        }
    }
}

/// The instance profile that `iam/info` reports for a role: same account and partition,
/// named after the role, with a stable id derived from the ARN (pods have no real
/// instance profile; SDKs read only `Code`).
fn instance_profile_of(role_arn: &str) -> (String, String) {
    let mut parts = role_arn.splitn(6, ':');
    let (partition, account) = (parts.nth(1).unwrap_or("aws"), parts.nth(1).unwrap_or(""));
    let name = role_arn.rsplit('/').next().unwrap_or(role_arn);
    let digest = ring::digest::digest(&ring::digest::SHA256, role_arn.as_bytes());
    let id: String = digest.as_ref()[..10]
        .iter()
        .map(|byte| char::from(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"[usize::from(byte % 32)]))
        .collect();
    (
        format!("arn:{partition}:iam::{account}:instance-profile/{name}"),
        format!("AIPA{id}"),
    )
}

/// `tokio::time::timeout`, armed only when `future` is not ready at its first poll. A warm
/// answer (decided and served from memory) then costs no timer: registering one per
/// request can wake the runtime's timer driver, a context switch per request in the
/// bench's profile (docs/performance.md). The bound counts from that first poll.
async fn within<F: Future>(limit: Duration, future: F) -> Result<F::Output, Elapsed> {
    let mut future = std::pin::pin!(future);
    let first = std::future::poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx))).await;
    match first {
        Poll::Ready(output) => Ok(output),
        Poll::Pending => tokio::time::timeout(limit, future).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_per_cgroup_are_bounded_and_given_back() {
        let open = Arc::new(OpenPerCgroup::default());
        let held: Vec<Slot<Option<u64>>> =
            (0..3).map(|_| open.claim(Some(7), 3).unwrap()).collect();
        assert!(
            open.claim(Some(7), 3).is_none(),
            "a fourth slot for cgroup 7"
        );
        // Other cgroups, and connections without a kernel record, count apart.
        let other = open
            .claim(Some(8), 3)
            .expect("cgroup 8 is not starved by 7");
        let unattributed = open.claim(None, 3).expect("unattributed connections");
        drop(held);
        assert!(open.claim(Some(7), 3).is_some(), "slots are given back");
        drop((other, unattributed));
        assert!(
            open.0.lock().unwrap().is_empty(),
            "no entry is kept for cgroups without connections"
        );
    }

    #[test]
    fn a_pod_s_containers_share_one_bound() {
        // Two containers of one pod, each within its cgroup limit, together reach the
        // pod's limit; another pod is not affected.
        let (cgroups, pods) = (
            Arc::new(OpenPerCgroup::default()),
            Arc::new(OpenPerPod::default()),
        );
        let mut held = Vec::new();
        for cgroup in [1, 2] {
            for _ in 0..2 {
                held.push((
                    cgroups.claim(Some(cgroup), 3).unwrap(),
                    pods.claim("pod-a".to_owned(), 4)
                        .expect("within the pod's bound"),
                ));
            }
        }
        assert!(
            cgroups.claim(Some(3), 3).is_some(),
            "a third container is within its cgroup bound"
        );
        assert!(
            pods.claim("pod-a".to_owned(), 4).is_none(),
            "but not within its pod's"
        );
        assert!(pods.claim("pod-b".to_owned(), 4).is_some());
        drop(held);
        assert!(
            pods.claim("pod-a".to_owned(), 4).is_some(),
            "slots are given back"
        );
    }
}
