//! The admin server on `--metrics-port`: `/healthz`, `/readyz`, `/metrics`, `/mode`
//! (`enforce` or `observe`), in observe mode `/observe` (the report), and with `--debug`
//! `/debug/store`. Separate from the credential port, so that what can scrape metrics
//! cannot assume roles. The report holds pod names and metadata paths, never
//! credentials: it is no more sensitive than `/debug/store`.
//!
//! Served with bounds, since anything on the node network can reach it: a client gets
//! [`HEADER_READ_TIMEOUT`] to send each request head, at most [`MAX_CONNECTIONS`] are
//! served at once (more wait in the kernel's accept queue), every connection lives at
//! most [`CONNECTION_MAX_AGE`], and the accept loop outlives accept errors (EMFILE,
//! ECONNABORTED), pausing briefly after one instead of ending and taking the kubelet's
//! probes with it.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};

use super::readiness::Readiness;
use crate::{
    metrics::Metrics,
    observe::{ObserveStore, client},
};

/// Time to send a request head (the first, and each next one on a keep-alive connection).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Admin connections served at once.
const MAX_CONNECTIONS: usize = 64;
/// A connection's lifetime, whatever it does.
const CONNECTION_MAX_AGE: Duration = Duration::from_secs(60);
/// Pause after an accept error, so that a persistent one (EMFILE) does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// What the admin endpoints show of the rest of the agent.
pub(super) trait State: Send + Sync + 'static {
    /// Copies values owned elsewhere (store sizes, cache and kernel totals) into the
    /// metrics, just before they are scraped.
    fn refresh(&self, metrics: &Metrics);
    /// `/debug/store`: pods, cgroups, decisions and credential expiries (no secrets).
    fn debug_store(&self) -> serde_json::Value;
}

pub(super) struct Admin {
    readiness: Readiness,
    metrics: Arc<Metrics>,
    debug: bool,
    state: Arc<dyn State>,
    /// Observe mode's record (`None`: enforcing).
    observe: Option<Arc<ObserveStore>>,
}

/// What `/readyz` says when ready in observe mode: a probe's body is what an operator
/// reads when checking an agent, so it says that nothing is enforced.
pub(super) const READY_OBSERVING: &str =
    "ready (OBSERVE MODE: pods get the node's credentials; nothing is enforced)\n";

/// One answer: status, body, content type.
type Answer = (StatusCode, String, &'static str);

impl Admin {
    pub(super) fn new(
        readiness: Readiness,
        metrics: Arc<Metrics>,
        debug: bool,
        state: Arc<dyn State>,
        observe: Option<Arc<ObserveStore>>,
    ) -> Self {
        Self {
            readiness,
            metrics,
            debug,
            state,
            observe,
        }
    }

    /// Copies observe mode's container counts into their gauge (every combination, so
    /// one that dropped to zero shows zero).
    fn refresh_observed(&self, store: &ObserveStore) {
        let counts = store.counts();
        for would_get in ["role", "none", "refused"] {
            for used in [false, true] {
                let count = counts.get(&(would_get, used)).copied().unwrap_or(0);
                self.metrics
                    .observed_containers
                    .with_label_values(&[would_get, if used { "true" } else { "false" }])
                    .set(count as i64);
            }
        }
    }

    fn answer(&self, path: &str) -> Answer {
        let ready = self.readiness.is_ready();
        match path {
            "/healthz" => (StatusCode::OK, "ok\n".to_owned(), "text/plain"),
            "/readyz" if ready && self.observe.is_some() => {
                (StatusCode::OK, READY_OBSERVING.to_owned(), "text/plain")
            }
            "/readyz" if ready => (StatusCode::OK, "ready\n".to_owned(), "text/plain"),
            client::MODE_PATH => {
                let mode = if self.observe.is_some() {
                    client::OBSERVE
                } else {
                    client::ENFORCE
                };
                (StatusCode::OK, format!("{mode}\n"), "text/plain")
            }
            client::PATH => match &self.observe {
                Some(store) => match serde_json::to_string(&store.report()) {
                    Ok(report) => (StatusCode::OK, report, "application/json"),
                    Err(error) => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("{error}\n"),
                        "text/plain",
                    ),
                },
                None => (
                    StatusCode::NOT_FOUND,
                    "not in observe mode\n".to_owned(),
                    "text/plain",
                ),
            },
            "/readyz" => (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready\n".to_owned(),
                "text/plain",
            ),
            "/metrics" => {
                self.state.refresh(&self.metrics);
                if let Some(store) = &self.observe {
                    self.refresh_observed(store);
                }
                self.metrics.ready.set(i64::from(ready));
                (
                    StatusCode::OK,
                    self.metrics.encode(),
                    "text/plain; version=0.0.4",
                )
            }
            "/debug/store" if self.debug => {
                let mut store = self.state.debug_store();
                store["ready"] = ready.into();
                (StatusCode::OK, store.to_string(), "application/json")
            }
            _ => (
                StatusCode::NOT_FOUND,
                "not found\n".to_owned(),
                "text/plain",
            ),
        }
    }

    fn respond(&self, path: &str) -> Response<Full<Bytes>> {
        let (status, body, content_type) = self.answer(path);
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(content_type),
        );
        response
    }

    /// Serves until the task is aborted (the app keeps it up through the drain, so
    /// `/readyz` says "not ready" while the agent drains).
    pub(super) async fn serve(self: Arc<Self>, listener: TcpListener) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "admin port: accept failed; continuing");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            };
            let admin = Arc::clone(&self);
            tokio::spawn(async move {
                let _slot = slot;
                let service = service_fn(move |request: http::Request<_>| {
                    let response = admin.respond(request.uri().path());
                    async move { Ok::<_, Infallible>(response) }
                });
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT);
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                let _ = tokio::time::timeout(CONNECTION_MAX_AGE, connection).await;
            });
        }
    }
}

/// Binds the admin port so that a successor agent can bind it too while this one runs
/// (an upgrade with a surge; the pods use the host's network, so both want the same
/// port), and so that the newest of them answers: the kubelet's probes of the new pod
/// must reach the new agent, never the old one. SO_REUSEPORT lets both bind; a classic
/// BPF program on the group picks its second member when there is one (the socket bound
/// last), and the kernel's usual choice when there is one member (an index past the end
/// falls back to it). When the old agent exits, the new one is the only member.
pub(super) fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context;
    use nix::sys::socket::{setsockopt, sockopt::AttachReusePortCbpf};
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .with_context(|| format!("creating the admin socket for {addr}"))?;
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket
        .bind(addr)
        .with_context(|| format!("binding the metrics port {}", addr.port()))?;
    let listener = socket
        .listen(1024)
        .with_context(|| format!("listening on {addr}"))?;
    // `return 1`: the group's second socket. Attached after listen(), when the socket is
    // in the group (attached before, it would stay with a group of its own).
    let mut newest = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 1,
    }];
    let program = libc::sock_fprog {
        len: 1,
        filter: newest.as_mut_ptr(),
    };
    setsockopt(&listener, AttachReusePortCbpf, &program).with_context(|| {
        format!(
            "choosing the newest agent on the metrics port {}",
            addr.port()
        )
    })?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[derive(Default)]
    struct Fake {
        refreshed: AtomicUsize,
    }

    impl State for Fake {
        fn refresh(&self, metrics: &Metrics) {
            self.refreshed.fetch_add(1, Ordering::SeqCst);
            metrics.tracked.with_label_values(&["pods"]).set(3);
        }

        fn debug_store(&self) -> serde_json::Value {
            serde_json::json!({ "pods": [] })
        }
    }

    fn make(debug: bool) -> (Admin, Arc<Fake>, super::super::readiness::Latch) {
        make_with(debug, None)
    }

    fn make_with(
        debug: bool,
        observe: Option<Arc<ObserveStore>>,
    ) -> (Admin, Arc<Fake>, super::super::readiness::Latch) {
        let (readiness, latch) = Readiness::new();
        let fake = Arc::new(Fake::default());
        let admin = Admin::new(
            readiness,
            Arc::new(Metrics::new()),
            debug,
            fake.clone(),
            observe,
        );
        (admin, fake, latch)
    }

    #[test]
    fn observe_mode_shows_on_readyz_mode_and_metrics_and_serves_the_report() {
        let (enforcing, _, latch) = make(false);
        drop(latch);
        assert_eq!(enforcing.answer("/mode").1, "enforce\n");
        assert_eq!(enforcing.answer("/observe").0, StatusCode::NOT_FOUND);
        let store = Arc::new(ObserveStore::new("node-a"));
        store.record(
            crate::observe::Who {
                namespace: "team".into(),
                pod: "app".into(),
                container: "containerd://abc".into(),
            },
            &http::Method::GET,
            "/latest/meta-data/iam/security-credentials/node-role",
            crate::observe::WouldGet::None,
        );
        let (admin, _, latch) = make_with(false, Some(store));
        assert_eq!(admin.answer("/readyz").0, StatusCode::SERVICE_UNAVAILABLE);
        drop(latch);
        assert_eq!(
            admin.answer("/readyz"),
            (StatusCode::OK, READY_OBSERVING.into(), "text/plain")
        );
        assert_eq!(admin.answer("/mode").1, "observe\n");
        let (status, body, content_type) = admin.answer("/observe");
        assert_eq!((status, content_type), (StatusCode::OK, "application/json"));
        let report: crate::observe::Report = serde_json::from_str(&body).unwrap();
        assert_eq!(report.rows.len(), 1);
        let metrics = admin.answer("/metrics").1;
        assert!(
            metrics.contains(
                "interceptor_observed_containers{used_node_role=\"true\",would_get=\"none\"} 1"
            ),
            "{metrics}"
        );
        assert!(
            metrics.contains(
                "interceptor_observed_containers{used_node_role=\"false\",would_get=\"none\"} 0"
            ),
            "{metrics}"
        );
    }

    #[test]
    fn readyz_follows_the_latch_and_the_drain() {
        let (admin, _, latch) = make(false);
        assert_eq!(admin.answer("/healthz").0, StatusCode::OK);
        assert_eq!(admin.answer("/readyz").0, StatusCode::SERVICE_UNAVAILABLE);
        drop(latch);
        assert_eq!(
            admin.answer("/readyz"),
            (StatusCode::OK, "ready\n".into(), "text/plain")
        );
        admin.readiness.drain();
        assert_eq!(admin.answer("/readyz").0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            admin.answer("/healthz").0,
            StatusCode::OK,
            "alive while draining"
        );
    }

    #[test]
    fn metrics_are_refreshed_at_scrape_and_show_readiness() {
        let (admin, fake, latch) = make(false);
        let (status, body, content_type) = admin.answer("/metrics");
        assert_eq!(
            (status, content_type),
            (StatusCode::OK, "text/plain; version=0.0.4")
        );
        assert_eq!(fake.refreshed.load(Ordering::SeqCst), 1);
        // Whole lines: `x 3` must not pass for `x 30`.
        let has = |body: &str, line: &str| body.lines().any(|seen| seen == line);
        assert!(has(&body, "interceptor_tracked{kind=\"pods\"} 3"), "{body}");
        assert!(has(&body, "interceptor_ready 0"), "{body}");
        drop(latch);
        assert!(has(&admin.answer("/metrics").1, "interceptor_ready 1"));
    }

    #[test]
    fn debug_store_only_with_debug_and_unknown_paths_are_404() {
        let (admin, _, _latch) = make(false);
        assert_eq!(admin.answer("/debug/store").0, StatusCode::NOT_FOUND);
        assert_eq!(admin.answer("/latest/meta-data/").0, StatusCode::NOT_FOUND);
        let (admin, _, latch) = make(true);
        drop(latch);
        let (status, body, content_type) = admin.answer("/debug/store");
        assert_eq!((status, content_type), (StatusCode::OK, "application/json"));
        let store: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(store["ready"], true);
        assert_eq!(store["pods"], serde_json::json!([]));
    }
}
