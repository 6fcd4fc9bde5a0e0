//! Prometheus metrics, all prefixed `interceptor_`. Each concern's counters live here as
//! fields of one struct registered on one registry (no global state), handed to whoever
//! records them; values owned elsewhere (store sizes, cache counters, kernel counters)
//! are read at scrape time.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// Requests by route class and status code.
    pub requests: IntCounterVec,
    /// Request latency by route class.
    pub request_seconds: HistogramVec,
    /// Connections refused because the kernel recorded nothing (not via the redirect).
    pub attribution_misses: IntCounter,
    /// Connections attributed to a cgroup but refused (unknown or deleted pod, ...).
    pub caller_refusals: IntCounterVec,
    /// Proxy connections open now (never above `--max-connections`).
    pub proxy_connections: IntGauge,
    /// Proxy connections closed unserved, by reason (`cgroup_limit`).
    pub connection_refusals: IntCounterVec,
    /// Role decisions by outcome (role, no_role, denied reason).
    pub decisions: IntCounterVec,
    /// STS AssumeRole latency.
    pub sts_seconds: HistogramVec,
    /// Point-in-time values refreshed at scrape: pods, cgroups, cache keys, map entries.
    pub tracked: IntGaugeVec,
    /// Counters owned by others, copied at scrape (cache hits, kernel events, ...).
    pub copied: IntGaugeVec,
    pub build_info: IntGaugeVec,
    pub ready: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let registry =
            Registry::new_custom(Some("interceptor".into()), None).expect("valid prefix");
        let requests = IntCounterVec::new(
            Opts::new(
                "requests_total",
                "Metadata requests by route class and status",
            ),
            &["route", "status"],
        )
        .expect("valid metric");
        let request_seconds = HistogramVec::new(
            HistogramOpts::new("request_duration_seconds", "Metadata request latency").buckets(
                vec![
                    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
                ],
            ),
            &["route"],
        )
        .expect("valid metric");
        let attribution_misses = IntCounter::new(
            "attribution_misses_total",
            "Connections without a kernel record (not via the redirect): refused",
        )
        .expect("valid metric");
        let caller_refusals = IntCounterVec::new(
            Opts::new(
                "caller_refusals_total",
                "Attributed connections refused, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let proxy_connections =
            IntGauge::new("proxy_connections", "Metadata proxy connections open now")
                .expect("valid metric");
        let connection_refusals = IntCounterVec::new(
            Opts::new(
                "connection_refusals_total",
                "Metadata proxy connections closed unserved, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let decisions = IntCounterVec::new(
            Opts::new("decisions_total", "Role decisions by outcome"),
            &["outcome"],
        )
        .expect("valid metric");
        let sts_seconds = HistogramVec::new(
            HistogramOpts::new("sts_request_duration_seconds", "STS AssumeRole latency"),
            &["outcome"],
        )
        .expect("valid metric");
        let tracked = IntGaugeVec::new(
            Opts::new(
                "tracked",
                "Objects tracked now (pods, namespaces, cgroups, credentials, kernel map entries)",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let copied = IntGaugeVec::new(
            Opts::new(
                "counter",
                "Totals kept by other components: credentials cache and kernel programs",
            ),
            &["source", "event"],
        )
        .expect("valid metric");
        let build_info =
            IntGaugeVec::new(Opts::new("build_info", "Build information"), &["version"])
                .expect("valid metric");
        let ready =
            IntGauge::new("ready", "1 when attached, synced and listening").expect("valid metric");
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_seconds.clone()),
            Box::new(attribution_misses.clone()),
            Box::new(caller_refusals.clone()),
            Box::new(proxy_connections.clone()),
            Box::new(connection_refusals.clone()),
            Box::new(decisions.clone()),
            Box::new(sts_seconds.clone()),
            Box::new(tracked.clone()),
            Box::new(copied.clone()),
            Box::new(build_info.clone()),
            Box::new(ready.clone()),
        ] {
            registry.register(collector).expect("unique metric names");
        }
        let process = prometheus::process_collector::ProcessCollector::new(
            std::process::id() as i32,
            "interceptor",
        );
        let _ = registry.register(Box::new(process));
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Self {
            registry,
            requests,
            request_seconds,
            attribution_misses,
            caller_refusals,
            proxy_connections,
            connection_refusals,
            decisions,
            sts_seconds,
            tracked,
            copied,
            build_info,
            ready,
        }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut buffer = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8(buffer).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Records a request's latency when dropped (covers every return path).
pub struct RequestTimer<'a> {
    metrics: &'a Metrics,
    route: &'static str,
    started: std::time::Instant,
}

impl<'a> RequestTimer<'a> {
    pub fn start(metrics: &'a Metrics, route: &'static str) -> Self {
        Self {
            metrics,
            route,
            started: std::time::Instant::now(),
        }
    }
}

impl Drop for RequestTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .request_seconds
            .with_label_values(&[self.route])
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// Counts one open connection in a gauge until dropped (covers every return path).
pub struct OpenGauge(IntGauge);

impl OpenGauge {
    pub fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}
