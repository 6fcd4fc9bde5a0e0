//! The admin server on `--metrics-port`: `/healthz`, `/readyz`, `/metrics`, and with
//! `--debug` `/debug/store`. Separate from the credential port, so that what can scrape
//! metrics cannot assume roles.
//!
//! Served with bounds, since anything on the node network can reach it: a client gets
//! [`HEADER_READ_TIMEOUT`] to send each request head, at most [`MAX_CONNECTIONS`] are
//! served at once (more wait in the kernel's accept queue), every connection lives at
//! most [`CONNECTION_MAX_AGE`], and the accept loop outlives accept errors (EMFILE,
//! ECONNABORTED), pausing briefly after one instead of ending and taking the kubelet's
//! probes with it.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};

use super::readiness::Readiness;
use crate::metrics::Metrics;

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
}

/// One answer: status, body, content type.
type Answer = (StatusCode, String, &'static str);

impl Admin {
    pub(super) fn new(
        readiness: Readiness,
        metrics: Arc<Metrics>,
        debug: bool,
        state: Arc<dyn State>,
    ) -> Self {
        Self {
            readiness,
            metrics,
            debug,
            state,
        }
    }

    fn answer(&self, path: &str) -> Answer {
        let ready = self.readiness.is_ready();
        match path {
            "/healthz" => (StatusCode::OK, "ok\n".to_owned(), "text/plain"),
            "/readyz" if ready => (StatusCode::OK, "ready\n".to_owned(), "text/plain"),
            "/readyz" => (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready\n".to_owned(),
                "text/plain",
            ),
            "/metrics" => {
                self.state.refresh(&self.metrics);
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
        let (readiness, latch) = Readiness::new();
        let fake = Arc::new(Fake::default());
        let admin = Admin::new(readiness, Arc::new(Metrics::new()), debug, fake.clone());
        (admin, fake, latch)
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
