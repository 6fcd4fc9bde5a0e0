//! Prometheus metrics, all prefixed `interceptor_`. Each concern's counters live here as
//! fields of one struct registered on one registry (no global state), handed to whoever
//! records them; values owned elsewhere (store sizes, cache counters, kernel counters)
//! are read at scrape time.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub(crate) struct Metrics {
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
    /// Requests authorized, by outcome (role, no_role, a denial's reason, ...): one per
    /// request that asks for a role, not per decision (decisions are reused while the pod
    /// and its namespace do not change).
    pub authorizations: IntCounterVec,
    /// Time to obtain a grant's credentials, from memory or from STS, by outcome.
    pub credentials_seconds: HistogramVec,
    /// Point-in-time values refreshed at scrape: pods, cgroups, cache keys, map entries.
    pub tracked: IntGaugeVec,
    /// The most `tracked` can hold, for the kinds that have a bound (the kernel maps).
    pub capacity: IntGaugeVec,
    /// When the first of the cached credentials expires (Unix seconds; 0 with none
    /// cached). Refresh ahead keeps it well in the future; close to now means refreshes
    /// are failing.
    pub credentials_earliest_expiry: IntGauge,
    /// The credentials cache's totals (hits, STS calls, ...), advanced at scrape.
    pub credentials_events: IntCounterVec,
    /// The kernel programs' totals (redirected, refused, ...), advanced at scrape.
    pub kernel_events: IntCounterVec,
    pub ready: IntGauge,
    /// 1 for the mode the agent runs in (`enforce` or `observe`), 0 for the other, so
    /// that observe mode is seen on every dashboard and can be alerted on.
    pub mode: IntGaugeVec,
    /// Observe mode: requests answered as the node would, by what enforcement would give
    /// the caller (`role`, `none`, `refused`).
    pub observed_requests: IntCounterVec,
    /// Observe mode: requests for the node's credentials
    /// (`iam/security-credentials/NAME`) forwarded to the metadata service.
    pub observed_node_role_requests: IntCounter,
    /// Observe mode: containers recorded, by what enforcement would give them and whether
    /// they used the node's role (refreshed at scrape).
    pub observed_containers: IntGaugeVec,
}

impl Metrics {
    pub(crate) fn new() -> Self {
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
        let authorizations = IntCounterVec::new(
            Opts::new(
                "authorizations_total",
                "Requests for a role, by outcome (role, no_role, a denial's reason)",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let credentials_seconds = HistogramVec::new(
            HistogramOpts::new(
                "credentials_duration_seconds",
                "Time to obtain a caller's credentials (from memory or STS), by outcome",
            )
            .buckets(vec![
                0.00001, 0.0001, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["outcome"],
        )
        .expect("valid metric");
        let tracked = IntGaugeVec::new(
            Opts::new(
                "tracked",
                "Objects tracked now (pods, namespaces, ServiceAccounts, cgroups, credentials, kernel map entries)",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let capacity = IntGaugeVec::new(
            Opts::new(
                "capacity",
                "The most that can be tracked, by the kind of interceptor_tracked (kernel maps)",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let credentials_earliest_expiry = IntGauge::new(
            "credentials_earliest_expiry_timestamp_seconds",
            "Expiry of the cached credentials that expire first (Unix time; 0 with none cached)",
        )
        .expect("valid metric");
        let credentials_events = IntCounterVec::new(
            Opts::new(
                "credentials_events_total",
                "Credentials cache events (hits, misses, prefetches, sts_calls, ...)",
            ),
            &["event"],
        )
        .expect("valid metric");
        let kernel_events = IntCounterVec::new(
            Opts::new(
                "kernel_events_total",
                "Kernel program events (redirected, exempt, refused, recorded, unrecorded)",
            ),
            &["event"],
        )
        .expect("valid metric");
        let build_info =
            IntGaugeVec::new(Opts::new("build_info", "Build information"), &["version"])
                .expect("valid metric");
        let ready =
            IntGauge::new("ready", "1 when attached, synced and listening").expect("valid metric");
        let mode = IntGaugeVec::new(
            Opts::new(
                "mode",
                "1 for the mode the agent runs in: enforce, or observe (pods get the node's credentials)",
            ),
            &["mode"],
        )
        .expect("valid metric");
        let observed_requests = IntCounterVec::new(
            Opts::new(
                "observed_requests_total",
                "Observe mode: requests answered as the node would, by what enforcement would give (role, none, refused)",
            ),
            &["would_get"],
        )
        .expect("valid metric");
        let observed_node_role_requests = IntCounter::new(
            "observed_node_role_requests_total",
            "Observe mode: requests for the node's credentials forwarded to the metadata service",
        )
        .expect("valid metric");
        let observed_containers = IntGaugeVec::new(
            Opts::new(
                "observed_containers",
                "Observe mode: containers recorded, by what enforcement would give and whether they used the node's role",
            ),
            &["would_get", "used_node_role"],
        )
        .expect("valid metric");
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_seconds.clone()),
            Box::new(attribution_misses.clone()),
            Box::new(caller_refusals.clone()),
            Box::new(proxy_connections.clone()),
            Box::new(connection_refusals.clone()),
            Box::new(authorizations.clone()),
            Box::new(credentials_seconds.clone()),
            Box::new(tracked.clone()),
            Box::new(capacity.clone()),
            Box::new(credentials_earliest_expiry.clone()),
            Box::new(credentials_events.clone()),
            Box::new(kernel_events.clone()),
            Box::new(build_info.clone()),
            Box::new(ready.clone()),
            Box::new(mode.clone()),
            Box::new(observed_requests.clone()),
            Box::new(observed_node_role_requests.clone()),
            Box::new(observed_containers.clone()),
        ] {
            registry.register(collector).expect("unique metric names");
        }
        // No namespace of its own: the registry's prefix makes `interceptor_process_*`
        // (with "interceptor" here too the names were `interceptor_interceptor_process_*`).
        let process =
            prometheus::process_collector::ProcessCollector::new(std::process::id() as i32, "");
        let _ = registry.register(Box::new(process));
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Observe mode's series exist at 0 in enforcing mode too: dashboards and alerts
        // see 0, not "no data", and the families are always there (as `mode` is).
        for would_get in ["role", "none", "refused"] {
            observed_requests.with_label_values(&[would_get]);
            for used in ["false", "true"] {
                observed_containers
                    .with_label_values(&[would_get, used])
                    .set(0);
            }
        }
        Self {
            registry,
            requests,
            request_seconds,
            attribution_misses,
            caller_refusals,
            proxy_connections,
            connection_refusals,
            authorizations,
            credentials_seconds,
            tracked,
            capacity,
            credentials_earliest_expiry,
            credentials_events,
            kernel_events,
            ready,
            mode,
            observed_requests,
            observed_node_role_requests,
            observed_containers,
        }
    }

    /// Advances `counter{event}` to `total`, a cumulative count kept elsewhere. A total
    /// below what was exported (its owner restarted counting) is ignored until it
    /// passes it again: counters never go down.
    pub(crate) fn advance(&self, counter: &IntCounterVec, event: &str, total: u64) {
        let counter = counter.with_label_values(&[event]);
        let exported = counter.get();
        if total > exported {
            counter.inc_by(total - exported);
        }
    }

    /// The text exposition of every metric.
    pub(crate) fn encode(&self) -> String {
        let mut buffer = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8(buffer).unwrap_or_default()
    }
}

/// Records a request's latency when dropped (covers every return path).
pub(crate) struct RequestTimer<'a> {
    metrics: &'a Metrics,
    route: &'static str,
    started: std::time::Instant,
}

impl<'a> RequestTimer<'a> {
    pub(crate) fn start(metrics: &'a Metrics, route: &'static str) -> Self {
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
pub(crate) struct OpenGauge(IntGauge);

impl OpenGauge {
    pub(crate) fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_kept_elsewhere_are_exported_as_counters() {
        let metrics = Metrics::new();
        metrics.advance(&metrics.credentials_events, "hits", 5);
        metrics.advance(&metrics.credentials_events, "hits", 7);
        metrics.advance(&metrics.credentials_events, "hits", 3);
        let text = metrics.encode();
        assert!(
            text.contains("# TYPE interceptor_credentials_events_total counter"),
            "{text}"
        );
        // A whole line: `... 7` must not pass for `... 70`.
        assert!(
            text.lines()
                .any(|line| line == "interceptor_credentials_events_total{event=\"hits\"} 7"),
            "{text}"
        );
    }
}
