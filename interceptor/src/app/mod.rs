//! The agent as a library: [`AgentConfig`] (validated from flags and environment by
//! [`crate::config`]) -> [`App::build`] -> [`App::run`].
//!
//! Order matters for a fail-closed start and a takeover without a failed request: the
//! proxy's listeners are bound first, then the programs are attached (or re-used), then
//! the mode's identity source starts (the pod and namespace watches, or the bindings
//! file). Only once that source is ready does [`App::run`] put the listeners in the
//! kernel's proxy map: from then on the kernel hands connections to the proxy address to
//! them and to nothing else. Before, it hands them to the predecessor's socket if one is
//! still there (an upgrade with a surge: the swap is one map update), or refuses them.
//! `/readyz` turns ready after the swap, so Kubernetes stops the predecessor only then. The two modes differ only in what they plug in: their
//! [`imds::Backend`] and their tasks; serving, the admin server, the readiness latch,
//! the drain and the ownership of tasks are this module's, once.
//!
//! With `--observe` ([`crate::observe`]) the same agent answers pods as the node would
//! and records what enforcement would do; the mode shows in a warning at start, on
//! `/readyz`, on `/mode` (what `interceptor status` reads), in `interceptor_mode`, and
//! the record on `/observe` (what `interceptor report` prints).
//!
//! On shutdown ([`App::run`]'s signal: SIGTERM or SIGINT in the binary) the agent turns
//! not ready, hands over (accepts what the kernel gave it before a successor's swap, then
//! closes its listeners: [`imds::server`]), lets requests in flight finish, and answers
//! each with `Connection: close`, for at most the handover's bound plus
//! `--request-timeout` plus a second; then it stops its tasks and returns. The programs stay
//! attached through their pins, so pods never reach the real metadata service between an
//! agent's exit and its successor's start; `interceptor detach` is the explicit way to
//! remove them.

mod admin;
mod discovery;
mod kube;
mod prefetch;
mod readiness;
mod standalone;

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use tokio::{
    net::{TcpListener, TcpSocket},
    task::JoinSet,
};

use self::{admin::Admin, readiness::Readiness};
pub use crate::config::AgentConfig;
use crate::{
    cgroupfs,
    config::Mode,
    credentials::{CredentialCache, Credentials, CredentialsError, RoleRequest, Settings},
    drain::Drain,
    ebpf::{self, Datapath},
    identity::index::{CgroupIndex, Limits},
    imds::{self, CredentialsFailure, ServerConfig, upstream::Upstream},
    metrics::Metrics,
    observe::ObserveStore,
};

/// Time the drain gives beyond `--request-timeout`: a request in flight has that long to
/// be answered (then 503), this is for writing the answer.
const DRAIN_MARGIN: Duration = Duration::from_secs(1);

/// What both modes share: the cgroup index, the kernel side, the credentials cache and
/// the metrics.
pub(crate) struct Shared {
    index: Arc<CgroupIndex>,
    datapath: Arc<Datapath>,
    credentials: Arc<CredentialCache>,
    metrics: Arc<Metrics>,
    pin_dir: PathBuf,
}

impl Shared {
    /// A grant's credentials, timed by outcome (`credentials_duration_seconds`: from
    /// memory or from STS).
    async fn credentials(
        &self,
        request: &RoleRequest,
    ) -> Result<Arc<Credentials>, CredentialsError> {
        let started = std::time::Instant::now();
        let result = self.credentials.get(request).await;
        let outcome = result
            .as_ref()
            .map_or_else(|error| error.metric_label(), |_| "ok");
        self.metrics
            .credentials_seconds
            .with_label_values(&[outcome])
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// The values both modes show at scrape: cgroups, cached keys, kernel map entries and
    /// capacities, the first cached expiry, and the cache's and the programs' totals.
    fn refresh(&self, metrics: &Metrics) {
        let tracked = &metrics.tracked;
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
        for (kind, capacity) in ebpf::maps::capacities() {
            metrics
                .capacity
                .with_label_values(&[kind])
                .set(i64::from(capacity));
        }
        let earliest = self
            .credentials
            .expiries()
            .into_iter()
            .filter_map(|(_, expiry)| expiry)
            .min()
            .and_then(|expiry| expiry.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |since| since.as_secs() as i64);
        metrics.credentials_earliest_expiry.set(earliest);
        for (event, total) in self.credentials.stats().counters() {
            metrics.advance(&metrics.credentials_events, event, total);
        }
        for (event, total) in self.datapath.counters() {
            metrics.advance(&metrics.kernel_events, event, total);
        }
    }

    /// Cached credentials' expiries (never the secrets), for `/debug/store`.
    fn debug_credentials(&self) -> Vec<serde_json::Value> {
        self.credentials
            .expiries()
            .into_iter()
            .map(|(key, expiry)| {
                serde_json::json!({
                    "role": &*key.request.role_arn,
                    "session": &*key.request.session_name,
                    "external_id": key.request.external_id.is_some(),
                    "expires": expiry.map(imds::ec2::timestamp),
                })
            })
            .collect()
    }
}

/// How a refusal by STS is answered: as EC2 answers an instance profile whose role
/// cannot be assumed.
fn refused(error: &CredentialsError) -> CredentialsFailure {
    match error {
        CredentialsError::Refused { code, message, .. } => CredentialsFailure::Refused {
            code: "AssumeRoleUnauthorizedAccess".into(),
            message: format!("{code}: {message}"),
        },
        CredentialsError::Unavailable { .. } => CredentialsFailure::Unavailable,
    }
}

/// What the mode plugs in.
enum Identity {
    Kube(kube::Kube),
    Standalone(Arc<standalone::StandaloneBackend>),
}

struct Listeners {
    ipv4: TcpListener,
    ipv6: Option<TcpListener>,
    admin: TcpListener,
}

/// The wired agent, ready to serve.
pub struct App {
    listeners: Listeners,
    server: ServerConfig,
    debug: bool,
    shared: Arc<Shared>,
    upstream: Arc<Upstream>,
    identity: Identity,
    /// Observe mode's record (`None`: enforcing).
    observe: Option<Arc<ObserveStore>>,
    /// `/readyz`: released once the kernel steers to this agent.
    readiness: Readiness,
    ready: readiness::Latch,
    /// The identity source's latches (stores synced, bindings read).
    sources: Readiness,
    /// `--ready-file`: exists while ready.
    ready_file: Option<PathBuf>,
    /// The IMDSv2 token key, pinned (a successor accepts the tokens pods hold).
    token_key: [u8; imds::token::KEY_LEN],
    /// Every task the agent runs besides the servers' connections; aborted at the end.
    tasks: JoinSet<()>,
    drain: Drain,
}

/// Asked of `listen(2)` for the proxy: the kernel caps it at the node's
/// `net.core.somaxconn` (4096 by default). The standard library's 128 is a burst of 128
/// connects (a node's pods starting together, SDKs opening several connections each)
/// before the kernel drops SYNs and the SDKs wait out a retransmission.
const PROXY_BACKLOG: u32 = 65_535;

impl App {
    /// Binds, attaches and starts the identity source: everything but serving.
    pub async fn build(config: AgentConfig) -> Result<Self> {
        let (readiness, ready) = Readiness::new();
        // Left by an earlier run of this container (an emptyDir outlives it): not ready
        // until this run has taken over.
        if let Some(file) = &config.ready_file {
            remove_ready_file(file)?;
        }
        let (sources, sources_pending) = Readiness::new();
        let redirect = &config.datapath.redirect;
        let proxy = redirect.proxy4.context("no IPv4 proxy address")?;
        let ipv4 = bind_proxy(proxy.into())?;
        let ipv6 = match redirect.proxy6 {
            Some(proxy6) => Some(bind_proxy(proxy6.into())?),
            None => None,
        };
        let admin = admin::bind(config.admin.addr)?;
        let listeners = Listeners { ipv4, ipv6, admin };

        let cgroup_root = match (&config.datapath.cgroup_root, &config.mode) {
            (Some(path), _) => path.clone(),
            // Standalone: every cgroup of the host, so any service can be bound.
            (None, Mode::Standalone { .. }) => cgroupfs::cgroup2_mount()?,
            (None, Mode::Kubernetes(_)) => cgroupfs::default_cgroup_root()?,
        };
        let kernel_log = tracing::enabled!(target: "interceptor::kernel", tracing::Level::DEBUG);
        let mut datapath = Datapath::open(&ebpf::Options {
            pin_dir: config.datapath.pin_dir.clone(),
            cgroup_root: cgroup_root.clone(),
            redirect: redirect.clone(),
            reload: config.datapath.reload,
            kernel_log,
        })
        .with_context(|| format!("attaching to {}", cgroup_root.display()))?;
        if kernel_log {
            datapath.spawn_kernel_log();
        }
        tracing::info!(outcome = ?datapath.outcome(), cgroup = %cgroup_root.display(), %proxy, "programs attached");
        let token_key = datapath
            .token_key(imds::token::TokenMinter::random_key())
            .context("reading the pinned IMDSv2 token key")?;
        // Exemptions pinned under an earlier configuration go; this one's are made below
        // (the agent's own pod) and by OptOuts (node-identity pods), before readiness.
        let stale = datapath.forget_exemptions()?;
        if !stale.is_empty() {
            tracing::info!(cgroups = ?stale, "removed exemptions the current configuration does not make");
        }
        let datapath = Arc::new(datapath);

        let index = Arc::new(CgroupIndex::new(
            cgroupfs::cgroup2_mount()?,
            cgroup_root,
            Limits::default(),
        ));
        // In a pod, the agent's own cgroups are below the attach point: exempt them
        // before it makes any metadata request of its own (discovery, its own AWS
        // credentials). Its cgroup namespace hides its path, so they are found by its pod
        // UID (downward API).
        if let Some(uid) = &config.pod_uid {
            index.walk(true);
            let own = index.cgroups_of_pod(uid);
            for id in &own {
                datapath.exempt().insert(*id)?;
            }
            tracing::info!(pod_uid = %uid, cgroups = own.len(), "the agent's own pod is exempt");
        }

        let upstream = Arc::new(Upstream::new(config.upstream));
        let mut policy = config.policy.clone();
        discovery::apply(config.discover, &upstream, &mut policy).await?;

        let sts = crate::credentials::sts_client(&config.sts).await;
        // Session length, refresh point and serve floor derived together
        // (docs/credentials.md).
        let credentials = CredentialCache::new(sts, Settings::for_session(config.session_ttl));
        let metrics = Arc::new(Metrics::new());
        let observe = config.observe.then(|| {
            let node = match &config.mode {
                Mode::Kubernetes(kube) => kube.node.clone(),
                Mode::Standalone { .. } => std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map_or_else(|_| "localhost".to_owned(), |name| name.trim().to_owned()),
            };
            Arc::new(ObserveStore::new(node))
        });
        // Both series, so that an alert on `mode="observe"` has a series to select.
        metrics
            .mode
            .with_label_values(&["observe"])
            .set(i64::from(observe.is_some()));
        metrics
            .mode
            .with_label_values(&["enforce"])
            .set(i64::from(observe.is_none()));
        if observe.is_some() {
            tracing::warn!(
                "OBSERVE MODE: NOTHING IS ENFORCED. Every pod is answered as the node would \
                 be, the node's own credentials included; `interceptor report` shows what \
                 each container asked for and what it would get under enforcement. Restart \
                 without --observe to enforce."
            );
        }
        let shared = Arc::new(Shared {
            index,
            datapath,
            credentials,
            metrics,
            pin_dir: config.datapath.pin_dir.clone(),
        });

        let mut tasks = JoinSet::new();
        let identity = match &config.mode {
            Mode::Kubernetes(kube) => Identity::Kube(
                kube::start(
                    kube,
                    config.observe,
                    policy,
                    &shared,
                    &mut tasks,
                    sources_pending.clone(),
                    readiness.clone(),
                )
                .await?,
            ),
            Mode::Standalone { bindings } => {
                Identity::Standalone(standalone::start(bindings, policy, &shared, &mut tasks)?)
            }
        };
        Ok(Self {
            listeners,
            server: config.server,
            debug: config.admin.debug,
            shared,
            upstream,
            identity,
            observe,
            readiness,
            ready,
            sources,
            token_key,
            ready_file: config.ready_file.clone(),
            tasks,
            drain: Drain::new(),
        })
    }

    /// Serves until `shutdown` resolves, then drains (see the module docs).
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let mut shutdown = std::pin::pin!(shutdown);
        let Listeners { ipv4, ipv6, admin } = self.listeners;
        let state: Arc<dyn admin::State> = match &self.identity {
            Identity::Kube(kube) => kube.state.clone(),
            Identity::Standalone(_) => self.shared.clone(),
        };
        let admin_server = Arc::new(Admin::new(
            self.readiness.clone(),
            self.shared.metrics.clone(),
            self.debug,
            state,
            self.observe.clone(),
        ));
        self.tasks.spawn(admin_server.serve(admin));

        // Take over only with an identity source that can answer: until then a
        // predecessor keeps serving, or the kernel refuses.
        tokio::select! {
            () = self.sources.released() => {}
            () = shutdown.as_mut() => {
                tracing::info!("stopped before serving; the programs stay attached");
                self.tasks.shutdown().await;
                return Ok(());
            }
        }
        for listener in std::iter::once(&ipv4).chain(ipv6.as_ref()) {
            let addr = self
                .shared
                .datapath
                .steer_to(listener)
                .context("putting the proxy's listener in the kernel's proxy map")?;
            tracing::info!(%addr, "the kernel steers connections to the proxy address to this agent");
        }
        let tokens = || imds::token::TokenMinter::with_key(&self.token_key);
        match &self.identity {
            Identity::Kube(kube) => serve(
                kube.backend.clone(),
                self.observe.clone(),
                &self.shared,
                &self.upstream,
                &self.server,
                &self.drain,
                tokens(),
                ipv4,
                ipv6,
            ),
            Identity::Standalone(backend) => serve(
                backend.clone(),
                self.observe.clone(),
                &self.shared,
                &self.upstream,
                &self.server,
                &self.drain,
                tokens(),
                ipv4,
                ipv6,
            ),
        }
        drop(self.ready);
        if let Some(file) = &self.ready_file {
            std::fs::write(file, "ready\n")
                .with_context(|| format!("writing the ready file {}", file.display()))?;
        }

        shutdown.await;
        self.readiness.drain();
        if let Some(file) = &self.ready_file {
            remove_ready_file(file)?;
        }
        let bound = imds::server::HANDOVER_MAX + self.server.request_timeout + DRAIN_MARGIN;
        tracing::info!(
            connections = self.drain.open(),
            ?bound,
            "draining: handing over, then answering the requests in flight"
        );
        let left = self.drain.wait(bound).await;
        if left > 0 {
            tracing::warn!(
                connections = left,
                "drain bound reached; closing what is left"
            );
        }
        self.tasks.shutdown().await;
        tracing::info!("stopped; the programs stay attached (interceptor detach removes them)");
        Ok(())
    }
}

fn remove_ready_file(file: &std::path::Path) -> Result<()> {
    match std::fs::remove_file(file) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            Err(error).with_context(|| format!("removing the ready file {}", file.display()))
        }
        _ => Ok(()),
    }
}

/// Binds a proxy listener, with SO_REUSEPORT so that a successor agent can bind the same
/// address while this one still listens (an upgrade's takeover). Membership of the
/// reuseport group grants nothing: the kernel hands connections to the proxy address only
/// to the socket in its proxy map (`imds_steer`, docs/ebpf.md), never to another member.
///
/// Someone else holding the address without SO_REUSEPORT (a squatter that bound it while
/// the agent was down) makes this fail, and the agent exits: it never serves through, or
/// beside, a socket it does not own. Pods' connections stay refused by the kernel
/// meanwhile (the proxy map holds no socket), never delivered to the squatter.
fn bind_proxy(addr: SocketAddr) -> Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .with_context(|| format!("creating the metadata proxy socket for {addr}"))?;
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    match socket.bind(addr) {
        Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => {
            return Err(error).with_context(|| {
                format!(
                    "another process holds the metadata proxy address {addr} (find it with \
                     `ss -ltnp 'sport = :{}'`); pods' metadata connections stay refused by the \
                     kernel, never delivered to it, until this agent can listen there",
                    addr.port()
                )
            });
        }
        other => other.with_context(|| format!("binding the metadata proxy on {addr}"))?,
    }
    socket
        .listen(PROXY_BACKLOG)
        .with_context(|| format!("listening on {addr}"))
}

/// Starts the metadata server on the proxy listeners; the drain tracks the accept loops.
#[allow(clippy::too_many_arguments)]
fn serve<B: imds::Backend>(
    backend: Arc<B>,
    observe: Option<Arc<ObserveStore>>,
    shared: &Shared,
    upstream: &Arc<Upstream>,
    config: &ServerConfig,
    drain: &Drain,
    tokens: imds::token::TokenMinter,
    ipv4: TcpListener,
    ipv6: Option<TcpListener>,
) {
    let server = Arc::new(imds::Server::new(
        backend,
        observe,
        shared.datapath.attribution(),
        upstream.clone(),
        config.clone(),
        shared.metrics.clone(),
        drain.clone(),
        tokens,
    ));
    if let Some(ipv6) = ipv6 {
        drain.track(Arc::clone(&server).serve(ipv6));
    }
    drain.track(server.serve(ipv4));
}

/// Resolves on SIGTERM (what Kubernetes sends) or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}
