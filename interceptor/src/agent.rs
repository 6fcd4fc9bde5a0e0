//! `interceptor run`: wires the modules together and runs until SIGTERM/SIGINT.
//!
//! Order matters for fail-closed start: the proxy's listener is bound first (so a
//! redirected connection always has somewhere to go), then the programs are attached (or
//! re-used), then the watches start; readiness (`/readyz`) waits for all three. On
//! shutdown the programs stay attached through their pins, so pods never reach the real
//! metadata service between an agent's exit and its successor's start; `interceptor
//! detach` is the explicit way to remove them.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use interceptor::{
    bindings::{self, Bindings},
    cgroupfs,
    config::{RunArgs, RunConfig},
    credentials::{
        CredentialCache, Credentials, CredentialsError, RoleRequest, Settings, StsConfig,
        session_name, sts_client,
    },
    ebpf::{self, Attributed, Datapath},
    identity::index::{CgroupIndex, Limits},
    imds::{self, CredentialsFailure, RoleAnswer, ServerConfig, upstream::Upstream},
    k8s::{self, EventSink, NamespaceStore, PodChange, PodStore, events},
    metrics::Metrics,
    optout::OptOuts,
    policy::{BaseArn, Decision},
    resolve::{Caller, Resolver, Verdict},
};
use tokio::net::TcpListener;

/// The metadata server's view of the agent.
struct AgentBackend {
    resolver: Arc<Resolver>,
    credentials: Arc<CredentialCache>,
    events: EventSink,
    metrics: Arc<Metrics>,
}

impl AgentBackend {
    fn request(&self, caller: &Caller) -> Option<(Arc<k8s::PodInfo>, RoleRequest)> {
        match self.resolver.decide(caller) {
            Verdict::Decided {
                pod,
                decision:
                    Decision::Role {
                        arn, external_id, ..
                    },
            } => {
                let request = RoleRequest {
                    role_arn: arn.to_string(),
                    external_id,
                    session_name: session_name(&pod.namespace, &pod.name),
                };
                Some((pod, request))
            }
            _ => None,
        }
    }
}

impl imds::Backend for AgentBackend {
    type Caller = Caller;

    async fn caller(&self, record: Attributed) -> Option<Caller> {
        match self.resolver.caller(record).await {
            Ok(caller) => Some(caller),
            Err(refusal) => {
                self.metrics
                    .caller_refusals
                    .with_label_values(&[refusal.metric_label()])
                    .inc();
                tracing::debug!(?refusal, cgroup_id = record.cgroup_id, "connection refused");
                None
            }
        }
    }

    fn binding<'a>(&self, caller: &'a Caller) -> &'a str {
        &caller.uid
    }

    async fn role(&self, caller: &Caller) -> RoleAnswer {
        let verdict = self.resolver.decide(caller);
        let outcome = match &verdict {
            Verdict::Decided {
                decision: Decision::Role { .. },
                ..
            } => "role",
            Verdict::Decided {
                decision: Decision::NoRole,
                ..
            } => "no_role",
            Verdict::Decided {
                decision: Decision::Denied(reason),
                ..
            } => reason.metric_label(),
            Verdict::NodeIdentity { .. } => "node_identity",
            Verdict::Gone => "gone",
        };
        self.metrics.decisions.with_label_values(&[outcome]).inc();
        match verdict {
            Verdict::Decided {
                decision: Decision::Role { arn, .. },
                ..
            } => RoleAnswer::Role {
                name: arn.name().to_owned(),
                arn: arn.to_string(),
            },
            Verdict::Decided {
                decision: Decision::NoRole,
                ..
            } => RoleAnswer::NoRole,
            _ => RoleAnswer::Denied,
        }
    }

    async fn credentials(
        &self,
        caller: &Caller,
        arn: &str,
    ) -> Result<Arc<Credentials>, CredentialsFailure> {
        let Some((pod, request)) = self
            .request(caller)
            .filter(|(_, request)| request.role_arn == arn)
        else {
            return Err(CredentialsFailure::Unavailable);
        };
        let started = std::time::Instant::now();
        let result = self.credentials.get(&request).await;
        let outcome = result
            .as_ref()
            .map_or_else(|error| error.metric_label(), |_| "ok");
        self.metrics
            .sts_seconds
            .with_label_values(&[outcome])
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(credentials) => Ok(credentials),
            Err(error @ CredentialsError::Refused { .. }) => {
                let CredentialsError::Refused { code, message, .. } = &error else {
                    unreachable!()
                };
                if self
                    .events
                    .warn(&pod, "AssumeRoleFailed", error.to_string())
                    == events::Posted::Sent
                {
                    tracing::warn!(pod = %pod.key(), %error, "STS refused the pod's role");
                }
                Err(CredentialsFailure::Refused {
                    code: "AssumeRoleUnauthorizedAccess".into(),
                    message: format!("{code}: {message}"),
                })
            }
            Err(error) => {
                tracing::warn!(pod = %pod.key(), %error, "no credentials to serve");
                Err(CredentialsFailure::Unavailable)
            }
        }
    }
}

/// Reads the node's instance profile from the upstream metadata service, for
/// `--auto-discover-base-arn` / `--auto-discover-default-role` (as kube2iam does).
async fn discover(upstream: &Upstream) -> Result<(BaseArn, String)> {
    let info = upstream
        .forward(&http::Method::GET, "/latest/meta-data/iam/info")
        .await
        .context("reading iam/info from the metadata service")?;
    let body = http_body_util::BodyExt::collect(info.into_body())
        .await?
        .to_bytes();
    let info: serde_json::Value = serde_json::from_slice(&body).context("iam/info is not JSON")?;
    let profile = info["InstanceProfileArn"]
        .as_str()
        .context("iam/info has no InstanceProfileArn")?;
    // arn:aws:iam::123456789012:instance-profile/name -> arn:aws:iam::123456789012:role/
    let prefix = profile
        .split_once(":instance-profile/")
        .map(|(prefix, _)| prefix)
        .context("InstanceProfileArn is not an instance profile ARN")?;
    let base = BaseArn::parse(&format!("{prefix}:role/"))?;
    let roles = upstream
        .forward(
            &http::Method::GET,
            "/latest/meta-data/iam/security-credentials/",
        )
        .await?;
    let body = http_body_util::BodyExt::collect(roles.into_body())
        .await?
        .to_bytes();
    let role = String::from_utf8_lossy(&body)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    anyhow::ensure!(!role.is_empty(), "the node has no instance profile role");
    Ok((base, role))
}

struct Readiness {
    attached: AtomicBool,
    listening: AtomicBool,
    /// The Kubernetes stores (none in standalone mode).
    stores: Option<(Arc<PodStore>, Arc<NamespaceStore>)>,
}

impl Readiness {
    fn ready(&self) -> bool {
        self.attached.load(Ordering::Relaxed)
            && self.listening.load(Ordering::Relaxed)
            && self
                .stores
                .as_ref()
                .is_none_or(|(pods, namespaces)| pods.is_synced() && namespaces.is_synced())
    }
}

/// What the admin endpoints show of the Kubernetes side.
struct KubeView {
    resolver: Arc<Resolver>,
    pods: Arc<PodStore>,
    namespaces: Arc<NamespaceStore>,
}

struct Admin {
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    debug: bool,
    kube: Option<KubeView>,
    credentials: Arc<CredentialCache>,
    index: Arc<CgroupIndex>,
    datapath: Arc<Datapath>,
    pin_dir: std::path::PathBuf,
}

impl Admin {
    fn refresh_gauges(&self) {
        let tracked = &self.metrics.tracked;
        if let Some(kube) = &self.kube {
            tracked
                .with_label_values(&["pods"])
                .set(kube.pods.len() as i64);
            tracked
                .with_label_values(&["namespaces"])
                .set(kube.namespaces.len() as i64);
        }
        tracked
            .with_label_values(&["cgroups"])
            .set(self.index.len() as i64);
        tracked
            .with_label_values(&["credentials"])
            .set(self.credentials.len() as i64);
        if let Ok((pending, conns)) = ebpf::maps::occupancy(&self.pin_dir) {
            tracked
                .with_label_values(&["kernel_pending"])
                .set(pending as i64);
            tracked
                .with_label_values(&["kernel_conns"])
                .set(conns as i64);
        }
        tracked
            .with_label_values(&["kernel_exempt"])
            .set(self.datapath.exempt().list().len() as i64);
        let copied = &self.metrics.copied;
        for (event, value) in self.credentials.stats().counters() {
            copied
                .with_label_values(&["credentials", event])
                .set(value as i64);
        }
        for (event, value) in self.datapath.counters() {
            copied
                .with_label_values(&["kernel", event])
                .set(value as i64);
        }
        self.metrics.ready.set(i64::from(self.readiness.ready()));
    }

    fn debug_store(&self) -> serde_json::Value {
        let pods: Vec<serde_json::Value> = self
            .kube
            .iter()
            .flat_map(|kube| kube.pods.pods().into_iter().map(move |pod| (kube, pod)))
            .map(|(kube, pod)| {
                let cgroups = self.index.cgroups_of_pod(&pod.uid);
                let caller = Caller::for_pod(&pod.uid);
                let decision = match kube.resolver.decide(&caller) {
                    Verdict::Decided {
                        decision: Decision::Role { arn, source, .. },
                        ..
                    } => {
                        format!("role {arn} ({source:?})")
                    }
                    Verdict::Decided {
                        decision: Decision::NoRole,
                        ..
                    } => "no role".into(),
                    Verdict::Decided {
                        decision: Decision::Denied(reason),
                        ..
                    } => format!("denied: {reason}"),
                    Verdict::NodeIdentity { .. } => "node identity (exempt)".into(),
                    Verdict::Gone => "gone".into(),
                };
                serde_json::json!({
                    "pod": pod.key(), "uid": pod.uid, "host_network": pod.host_network,
                    "cgroups": cgroups, "decision": decision,
                })
            })
            .collect();
        let credentials: Vec<serde_json::Value> = self
            .credentials
            .expiries()
            .into_iter()
            .map(|(key, expiry)| {
                serde_json::json!({
                    "role": key.request.role_arn,
                    "session": key.request.session_name,
                    "external_id": key.request.external_id.is_some(),
                    "expires": expiry.map(imds::ec2::timestamp),
                })
            })
            .collect();
        serde_json::json!({ "pods": pods, "credentials": credentials, "ready": self.readiness.ready() })
    }

    fn respond(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        let (status, body, content_type) = match request.uri().path() {
            "/healthz" => (StatusCode::OK, "ok\n".to_owned(), "text/plain"),
            "/readyz" if self.readiness.ready() => {
                (StatusCode::OK, "ready\n".to_owned(), "text/plain")
            }
            "/readyz" => (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready\n".to_owned(),
                "text/plain",
            ),
            "/metrics" => {
                self.refresh_gauges();
                (
                    StatusCode::OK,
                    self.metrics.encode(),
                    "text/plain; version=0.0.4",
                )
            }
            "/debug/store" if self.debug => (
                StatusCode::OK,
                self.debug_store().to_string(),
                "application/json",
            ),
            _ => (
                StatusCode::NOT_FOUND,
                "not found\n".to_owned(),
                "text/plain",
            ),
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(content_type),
        );
        response
    }

    async fn serve(self: Arc<Self>, listener: TcpListener) {
        while let Ok((stream, _)) = listener.accept().await {
            let admin = Arc::clone(&self);
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let admin = Arc::clone(&admin);
                    async move { Ok::<_, std::convert::Infallible>(admin.respond(&request)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }
}

/// Prefetches credentials for pods that appear with a role (unless `prefetch` is off),
/// forgets the credentials and cgroups of pods that go.
async fn follow_pods(
    resolver: Arc<Resolver>,
    pods: Arc<PodStore>,
    namespaces: Arc<NamespaceStore>,
    credentials: Arc<CredentialCache>,
    prefetch: bool,
) {
    let prefetch = |pod: &k8s::PodInfo| {
        if !prefetch {
            return;
        }
        let caller = Caller::for_pod(&pod.uid);
        if let Verdict::Decided {
            decision: Decision::Role {
                arn, external_id, ..
            },
            ..
        } = resolver.decide(&caller)
        {
            credentials.prefetch(&RoleRequest {
                role_arn: arn.to_string(),
                external_id,
                session_name: session_name(&pod.namespace, &pod.name),
            });
        }
    };
    // Keys of pods no longer on the node are forgotten (their refreshers stop).
    let sweep = || {
        let live: BTreeSet<String> = pods
            .pods()
            .iter()
            .map(|pod| session_name(&pod.namespace, &pod.name))
            .collect();
        credentials.retain(|key| live.contains(&key.request.session_name));
    };
    // Subscribe first, then cover what the store already holds: no pod is missed. The
    // decisions need the namespaces' restrictions, so the first pass waits for both
    // stores (changes meanwhile queue in the subscription).
    let mut changes = pods.subscribe();
    pods.wait_synced().await;
    namespaces.wait_synced().await;
    for pod in pods.pods() {
        prefetch(&pod);
    }
    loop {
        match changes.recv().await {
            Ok(PodChange::Applied(pod)) => prefetch(&pod),
            Ok(PodChange::Deleted(pod)) => {
                resolver.forget_pod(&pod.uid);
                sweep();
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                // Changes were missed, deletions among them.
                sweep();
                for pod in pods.pods() {
                    prefetch(&pod);
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(args: &RunArgs, config: RunConfig) -> Result<()> {
    let metrics = Arc::new(Metrics::new());
    let proxy = config.redirect.proxy4.context("no IPv4 proxy address")?;
    let listener = TcpListener::bind(proxy)
        .await
        .with_context(|| format!("binding the metadata proxy on {proxy}"))?;
    let listener6 = match config.redirect.proxy6 {
        Some(proxy6) => Some(
            TcpListener::bind(proxy6)
                .await
                .with_context(|| format!("binding the IPv6 metadata proxy on {proxy6}"))?,
        ),
        None => None,
    };
    let admin_listener = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], args.metrics_port)))
        .await
        .with_context(|| format!("binding the metrics port {}", args.metrics_port))?;

    let cgroup_root = match (&args.attach.cgroup_root, &config.bindings) {
        (Some(path), _) => path.clone(),
        // Standalone: every cgroup of the host, so any service can be bound.
        (None, Some(_)) => cgroupfs::cgroup2_mount()?,
        (None, None) => cgroupfs::default_cgroup_root()?,
    };
    let datapath = Arc::new(
        Datapath::open(&ebpf::Options {
            pin_dir: args.attach.pins.bpf_pin_dir.clone(),
            cgroup_root: cgroup_root.clone(),
            redirect: config.redirect.clone(),
            reload: args.attach.reload,
            kernel_log: tracing::enabled!(target: "interceptor::kernel", tracing::Level::DEBUG),
        })
        .with_context(|| format!("attaching to {}", cgroup_root.display()))?,
    );
    tracing::info!(outcome = ?datapath.outcome(), cgroup = %cgroup_root.display(), %proxy, "programs attached");

    let index = Arc::new(CgroupIndex::new(
        cgroupfs::cgroup2_mount()?,
        cgroup_root,
        Limits::default(),
    ));
    // In a pod, the agent's own cgroups are below the attach point: exempt them before it
    // makes any metadata request of its own (discovery, its own AWS credentials). Its
    // cgroup namespace hides its path, so they are found by its pod UID (downward API).
    if let Some(uid) = &config.pod_uid {
        index.walk(true);
        let own = index.cgroups_of_pod(uid);
        for id in &own {
            datapath.exempt().insert(*id)?;
        }
        tracing::info!(pod_uid = %uid, cgroups = own.len(), "the agent's own pod is exempt");
    }

    let upstream = Arc::new(Upstream::new(args.attach.metadata_addr));
    let mut policy = config.policy.clone();
    if args.auto_discover_base_arn || args.auto_discover_default_role {
        let (base, role) = discover(&upstream)
            .await
            .context("auto-discovering the node's role")?;
        tracing::info!(base = ?base, role, "discovered from the node's instance profile");
        if args.auto_discover_base_arn {
            policy.base_role_arn = Some(base);
        }
        if args.auto_discover_default_role {
            policy.default_role = Some(role);
        }
    }

    let sts = sts_client(&StsConfig {
        endpoint: args.sts_endpoint.clone(),
        region: config.region.clone(),
        regional: args.use_regional_sts_endpoint,
        intermediate_role: args.assume_role_arn.clone(),
        agent_credentials: None,
    })
    .await;
    // Session length, refresh point and serve floor derived together (docs/credentials.md).
    let credentials = CredentialCache::new(sts, Settings::for_session(args.iam_role_session_ttl));
    let limits = config.proxy_limits;
    let server_config = ServerConfig {
        imdsv2_required: args.imdsv2_required,
        allow_route: config.allow_route.clone(),
        header_read_timeout: limits.header_read_timeout,
        request_timeout: limits.request_timeout,
        connection_max_age: limits.connection_max_age,
        max_header_bytes: limits.max_header_bytes,
        max_connections: limits.max_connections,
        max_connections_per_cgroup: limits.max_connections_per_cgroup,
    };
    let listeners = Listeners {
        ipv4: listener,
        ipv6: listener6,
        admin: admin_listener,
    };

    if let Some(path) = &config.bindings {
        let bindings = Bindings::load(path, &policy)?;
        tracing::info!(bindings = bindings.len(), file = %path.display(), "standalone mode");
        let shared: bindings::Shared = Arc::new(std::sync::RwLock::new(Arc::new(bindings)));
        tokio::spawn(reload_bindings(path.clone(), policy, shared.clone()));
        let backend = Arc::new(StandaloneBackend {
            index: index.clone(),
            bindings: shared,
            credentials: credentials.clone(),
            metrics: metrics.clone(),
        });
        serve(
            backend,
            &datapath,
            upstream,
            server_config,
            metrics.clone(),
            listeners.ipv4,
            listeners.ipv6,
        );
        let admin = Arc::new(Admin {
            readiness: Arc::new(Readiness {
                attached: AtomicBool::new(true),
                listening: AtomicBool::new(true),
                stores: None,
            }),
            metrics,
            debug: args.debug,
            kube: None,
            credentials,
            index,
            datapath: datapath.clone(),
            pin_dir: args.attach.pins.bpf_pin_dir.clone(),
        });
        tokio::spawn(admin.serve(listeners.admin));
        shutdown_signal().await;
        tracing::info!(
            "shutting down; the programs stay attached (interceptor detach removes them)"
        );
        return Ok(());
    }

    let client = k8s::client(args.kubeconfig.as_deref()).await?;
    let (pods, namespaces) = (PodStore::new(), NamespaceStore::new());
    tokio::spawn(k8s::pods::watch(
        client.clone(),
        config.node.clone(),
        pods.clone(),
    ));
    tokio::spawn(k8s::namespaces::watch(client.clone(), namespaces.clone()));
    let events = EventSink::new(
        Some(client.clone()),
        Some(config.node.clone()),
        events::Limits::default(),
    );

    let resolver = Arc::new(Resolver::new(
        index.clone(),
        pods.clone(),
        namespaces.clone(),
        policy,
        args.node_identity_namespaces.iter().cloned().collect(),
        args.unknown_pod_wait,
        events.clone(),
    ));
    tokio::spawn(
        OptOuts::new(resolver.clone(), pods.clone(), datapath.exempt()).run(Duration::from_secs(2)),
    );

    tokio::spawn(follow_pods(
        resolver.clone(),
        pods.clone(),
        namespaces.clone(),
        credentials.clone(),
        !args.no_prefetch,
    ));

    let backend = Arc::new(AgentBackend {
        resolver: resolver.clone(),
        credentials: credentials.clone(),
        events,
        metrics: metrics.clone(),
    });
    serve(
        backend,
        &datapath,
        upstream,
        server_config,
        metrics.clone(),
        listeners.ipv4,
        listeners.ipv6,
    );

    let readiness = Arc::new(Readiness {
        attached: AtomicBool::new(true),
        listening: AtomicBool::new(true),
        stores: Some((pods.clone(), namespaces.clone())),
    });
    let admin = Arc::new(Admin {
        readiness: readiness.clone(),
        metrics,
        debug: args.debug,
        kube: Some(KubeView {
            resolver,
            pods: pods.clone(),
            namespaces: namespaces.clone(),
        }),
        credentials,
        index,
        datapath: datapath.clone(),
        pin_dir: args.attach.pins.bpf_pin_dir.clone(),
    });
    tokio::spawn(admin.serve(listeners.admin));
    {
        let (pods, namespaces) = (pods.clone(), namespaces.clone());
        let (client, node, taint) = (
            client.clone(),
            config.node.clone(),
            args.startup_taint.clone(),
        );
        tokio::spawn(async move {
            pods.wait_synced().await;
            namespaces.wait_synced().await;
            tracing::info!("pod and namespace stores synced: ready");
            // Programs attached, stores synced, listener bound: pods may come.
            k8s::node::remove_taint_until_done(client, node, taint).await;
        });
    }

    shutdown_signal().await;
    tracing::info!("shutting down; the programs stay attached (interceptor detach removes them)");
    Ok(())
}

struct Listeners {
    ipv4: TcpListener,
    ipv6: Option<TcpListener>,
    admin: TcpListener,
}

/// Starts the metadata server on the proxy listeners.
fn serve<B: imds::Backend>(
    backend: Arc<B>,
    datapath: &Datapath,
    upstream: Arc<Upstream>,
    config: ServerConfig,
    metrics: Arc<Metrics>,
    ipv4: TcpListener,
    ipv6: Option<TcpListener>,
) {
    let server = Arc::new(imds::Server::new(
        backend,
        datapath.attribution(),
        upstream,
        config,
        metrics,
    ));
    if let Some(ipv6) = ipv6 {
        tokio::spawn(Arc::clone(&server).serve(ipv6));
    }
    tokio::spawn(server.serve(ipv4));
}

/// Standalone mode's view of callers: a cgroup and the binding its path matches.
struct StandaloneBackend {
    index: Arc<CgroupIndex>,
    bindings: bindings::Shared,
    credentials: Arc<CredentialCache>,
    metrics: Arc<Metrics>,
}

struct ServiceCaller {
    path: String,
    /// What its IMDSv2 tokens are bound to: its cgroup.
    token_binding: String,
}

impl StandaloneBackend {
    fn binding(&self, caller: &ServiceCaller) -> Option<bindings::Binding> {
        let bindings = self
            .bindings
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        bindings.matching(&caller.path).cloned()
    }
}

impl imds::Backend for StandaloneBackend {
    type Caller = ServiceCaller;

    async fn caller(&self, record: Attributed) -> Option<ServiceCaller> {
        match self.index.resolve(record.cgroup_id, record.pid) {
            Some(resolved) => Some(ServiceCaller {
                path: resolved.path.clone(),
                token_binding: format!("cgroup-{}", resolved.cgroup_id),
            }),
            None => {
                self.metrics
                    .caller_refusals
                    .with_label_values(&["unknown_cgroup"])
                    .inc();
                None
            }
        }
    }

    fn binding<'a>(&self, caller: &'a ServiceCaller) -> &'a str {
        &caller.token_binding
    }

    async fn role(&self, caller: &ServiceCaller) -> RoleAnswer {
        match self.binding(caller) {
            Some(binding) => {
                self.metrics.decisions.with_label_values(&["role"]).inc();
                RoleAnswer::Role {
                    name: binding.role.name().to_owned(),
                    arn: binding.role.to_string(),
                }
            }
            None => {
                self.metrics.decisions.with_label_values(&["no_role"]).inc();
                RoleAnswer::NoRole
            }
        }
    }

    async fn credentials(
        &self,
        caller: &ServiceCaller,
        arn: &str,
    ) -> Result<Arc<Credentials>, CredentialsFailure> {
        let Some(binding) = self
            .binding(caller)
            .filter(|binding| binding.role.to_string() == arn)
        else {
            return Err(CredentialsFailure::Unavailable);
        };
        let request = RoleRequest {
            role_arn: arn.to_owned(),
            external_id: binding.external_id.clone(),
            session_name: binding.name.clone(),
        };
        match self.credentials.get(&request).await {
            Ok(credentials) => Ok(credentials),
            Err(CredentialsError::Refused { code, message, .. }) => {
                tracing::warn!(
                    binding = binding.name,
                    code,
                    message,
                    "STS refused the binding's role"
                );
                Err(CredentialsFailure::Refused {
                    code: "AssumeRoleUnauthorizedAccess".into(),
                    message: format!("{code}: {message}"),
                })
            }
            Err(error) => {
                tracing::warn!(binding = binding.name, %error, "no credentials to serve");
                Err(CredentialsFailure::Unavailable)
            }
        }
    }
}

/// Re-reads the bindings file when it changes; a broken file is reported and the
/// previous bindings stay in force.
async fn reload_bindings(
    path: std::path::PathBuf,
    policy: interceptor::policy::PolicyConfig,
    shared: bindings::Shared,
) {
    let modified = |path: &std::path::Path| {
        std::fs::metadata(path)
            .and_then(|meta| meta.modified())
            .ok()
    };
    let mut seen = modified(&path);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = modified(&path);
        if now == seen {
            continue;
        }
        seen = now;
        match Bindings::load(&path, &policy) {
            Ok(bindings) => {
                tracing::info!(bindings = bindings.len(), "bindings reloaded");
                *shared
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(bindings);
            }
            Err(error) => {
                tracing::error!(%error, "bindings file not reloaded; the previous bindings stay")
            }
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
