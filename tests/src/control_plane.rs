//! A real Kubernetes control plane for the end-to-end tests: etcd and kube-apiserver,
//! built from their Go modules (`tests/k8s`, by `cargo xtask setup`) and started on
//! loopback as a cluster starts them.
//!
//! - etcd listens on free 127.0.0.1 ports with a data directory of its own.
//! - kube-apiserver serves HTTPS on a free 127.0.0.1 port with a certificate it generates
//!   itself (`--cert-dir`), authorizes with `Node,RBAC`, signs ServiceAccount tokens with
//!   a key generated for this run, and admits with the plugins of a managed cluster (see
//!   [`ADMISSION_PLUGINS`]).
//! - The harness is an administrator through a static token in `system:masters`; it
//!   applies deploy/ (rendered by `kubectl kustomize`) as a user would, and the agent gets
//!   a token for its ServiceAccount through the TokenRequest API (`kubectl create token`),
//!   so it has exactly the permissions the manifests give it.
//!
//! Nothing stands in for the server. What stands in for the missing rest of the cluster:
//! the harness writes pod status in the kubelet's place ([`Scope::set_running`]) and
//! creates each namespace's `default` ServiceAccount in the ServiceAccount controller's
//! place; pods are deleted as the kubelet confirms a deletion (grace period 0).
//!
//! One control plane serves a whole test binary ([`ControlPlane::shared`]); each test takes
//! a [`Scope`] with a node name and namespaces of its own. Tests that stop the API server
//! start a private one ([`ControlPlane::start`]). The processes are started by a thread
//! that lives as long as the test binary, with `PR_SET_PDEATHSIG`, so they die with it
//! even if it is killed; a private plane is stopped and removed on drop, the shared one
//! at exit.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Mutex, OnceLock, PoisonError,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, ServiceAccount},
    events::v1::Event,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::{Value, json};

use crate::{
    agent::free_port,
    cmd,
    objects::{new_namespace, new_node, new_pod},
};

/// The admission plugins enabled besides kube-apiserver's defaults (NamespaceLifecycle,
/// LimitRanger, ServiceAccount, TaintNodesByCondition, PodSecurity, Priority,
/// DefaultTolerationSeconds, DefaultStorageClass, StorageObjectInUseProtection,
/// PersistentVolumeClaimResize, RuntimeClass, the certificate plugins, DefaultIngressClass,
/// the admission-policy and webhook plugins, ResourceQuota): what EKS and GKE add. None is
/// disabled. Two of the defaults rely on controllers that do not run here, and the
/// harness does their part instead of switching them off: ServiceAccount refuses pods
/// whose ServiceAccount does not exist (the ServiceAccount controller creates `default`
/// in each namespace: [`Scope::add_namespace`] does), and NamespaceLifecycle keeps a
/// deleted namespace `Terminating` until the namespace controller empties it (tests
/// delete pods, not namespaces).
pub const ADMISSION_PLUGINS: &str = "NodeRestriction,ExtendedResourceToleration";

/// The deploy/ overlay the harness applies (the generic one: no cloud specifics).
const OVERLAY: &str = "generic";
/// Where deploy/ puts the agent and its ServiceAccount.
pub const AGENT_NAMESPACE: &str = "interceptor-system";
pub const AGENT_SERVICE_ACCOUNT: &str = "interceptor";

/// The directory with `kube-apiserver` and `etcd`, from `INTERCEPTOR_K8S_BIN` (set by
/// `cargo xtask test`).
pub fn bin_dir() -> Result<PathBuf, String> {
    let dir = std::env::var_os("INTERCEPTOR_K8S_BIN")
        .map(PathBuf::from)
        .ok_or(
            "INTERCEPTOR_K8S_BIN is not set: run the tests through `cargo xtask test` \
         (its setup builds kube-apiserver and etcd from tests/k8s)",
        )?;
    for binary in ["kube-apiserver", "etcd"] {
        if !dir.join(binary).is_file() {
            return Err(format!(
                "no {binary} in {} (INTERCEPTOR_K8S_BIN): run `cargo xtask setup`",
                dir.display()
            ));
        }
    }
    Ok(dir)
}

/// etcd and kube-apiserver, running.
#[derive(Debug)]
pub struct ControlPlane {
    dir: PathBuf,
    bin: PathBuf,
    etcd: Mutex<Option<Child>>,
    etcd_port: u16,
    apiserver: Mutex<Option<Child>>,
    port: u16,
    admin_kubeconfig: PathBuf,
    agent_token: String,
}

static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
static NEXT: AtomicU32 = AtomicU32::new(0);

impl ControlPlane {
    /// The test binary's control plane, started on first use with deploy/ applied.
    /// `None` (with a message) outside CI when it cannot start; under `CI=true` that
    /// fails the test with the reason instead.
    pub fn shared(test: &str) -> Option<&'static ControlPlane> {
        let plane = SHARED.get_or_init(|| {
            let started = Self::start();
            if started.is_ok() {
                // SAFETY: registers a plain `extern "C" fn` with no captured state.
                unsafe { libc::atexit(stop_shared) };
            }
            started
        });
        match plane {
            Ok(plane) => Some(plane),
            Err(reason) => {
                not_started(test, reason);
                None
            }
        }
    }

    /// [`Self::start`] for a test: `None` (with a message) outside CI when it cannot
    /// start; under `CI=true` that fails the test with the reason instead.
    pub fn private(test: &str) -> Option<ControlPlane> {
        match Self::start() {
            Ok(plane) => Some(plane),
            Err(reason) => {
                not_started(test, &reason);
                None
            }
        }
    }

    /// A private control plane (for tests that stop and start the API server), with
    /// deploy/ applied; stopped and removed on drop.
    pub fn start() -> Result<ControlPlane, String> {
        let bin = bin_dir()?;
        let dir = std::env::temp_dir().join(format!(
            "interceptor-k8s-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("certs")).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut plane = ControlPlane {
            admin_kubeconfig: dir.join("admin.kubeconfig"),
            dir,
            bin,
            etcd: Mutex::new(None),
            etcd_port: free_port(),
            apiserver: Mutex::new(None),
            port: free_port(),
            agent_token: String::new(),
        };
        plane.prepare()?;
        plane.start_etcd()?;
        plane.start_apiserver()?;
        plane.apply_deploy()?;
        plane.agent_token = plane.kubectl(&[
            "create",
            "token",
            AGENT_SERVICE_ACCOUNT,
            "-n",
            AGENT_NAMESPACE,
            "--duration=24h",
        ])?;
        plane.agent_token = plane.agent_token.trim().to_owned();
        Ok(plane)
    }

    /// The ServiceAccount signing key and the administrator's static token.
    fn prepare(&self) -> Result<(), String> {
        let key = self.dir.join("sa.key");
        let out = cmd::output(
            "openssl",
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                &key.display().to_string(),
            ],
        );
        if !out.status.success() {
            return Err(format!(
                "openssl genpkey: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let admin_token = format!("admin-{:016x}", random_u64());
        write(
            &self.dir.join("tokens.csv"),
            &format!("{admin_token},interceptor-test-admin,test-admin,\"system:masters\"\n"),
        )?;
        write(&self.dir.join(AUDIT_POLICY), &audit_policy())?;
        write(
            &self.admin_kubeconfig,
            &self.kubeconfig_yaml("interceptor-test-admin", &admin_token),
        )
    }

    /// A kubeconfig for this API server authenticating with `token`.
    fn kubeconfig_yaml(&self, user: &str, token: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    \
             certificate-authority: {}\nusers:\n- name: {user}\n  user:\n    token: {token}\n\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: {user}\n\
             current-context: test\n",
            self.url(),
            self.ca().display(),
        )
    }

    fn start_etcd(&self) -> Result<(), String> {
        let peer = free_port();
        let client_url = format!("http://127.0.0.1:{}", self.etcd_port);
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut command = Command::new(self.bin.join("etcd"));
        command.args([
            "--name=test",
            &format!("--data-dir={}", self.dir.join("etcd").display()),
            &format!("--listen-client-urls={client_url}"),
            &format!("--advertise-client-urls={client_url}"),
            &format!("--listen-peer-urls={peer_url}"),
            &format!("--initial-advertise-peer-urls={peer_url}"),
            &format!("--initial-cluster=test={peer_url}"),
            "--log-level=warn",
            // A test's data need not survive a power cut.
            "--unsafe-no-fsync",
        ]);
        let child = self.spawn_logged(command, "etcd")?;
        *lock(&self.etcd) = Some(child);
        self.wait("etcd", "etcd.log", || {
            self.etcd_post("/health", None)
                .is_ok_and(|health| health["health"] == "true")
        })
    }

    /// Starts kube-apiserver (again, after [`Self::stop`]) on the same port and waits
    /// until `/readyz` says ok.
    pub fn start_apiserver(&self) -> Result<(), String> {
        let dir = |name: &str| self.dir.join(name).display().to_string();
        let mut command = Command::new(self.bin.join("kube-apiserver"));
        command.args([
            &format!("--etcd-servers=http://127.0.0.1:{}", self.etcd_port),
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            // The `kubernetes` Service's endpoints may not be loopback, and nothing in
            // these tests dials the Service: no endpoint reconciler.
            "--endpoint-reconciler-type=none",
            &format!("--secure-port={}", self.port),
            &format!("--cert-dir={}", dir("certs")),
            "--authorization-mode=Node,RBAC",
            &format!("--token-auth-file={}", dir("tokens.csv")),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            &format!("--service-account-key-file={}", dir("sa.key")),
            &format!("--service-account-signing-key-file={}", dir("sa.key")),
            "--service-cluster-ip-range=10.96.0.0/16",
            &format!("--enable-admission-plugins={ADMISSION_PLUGINS}"),
            "--profiling=false",
            // What the agent asks the server, as the server saw it: [`Self::agent_requests`].
            &format!("--audit-policy-file={}", dir(AUDIT_POLICY)),
            &format!("--audit-log-path={}", dir(AUDIT_LOG)),
            "--v=1",
        ]);
        let child = self.spawn_logged(command, "kube-apiserver")?;
        *lock(&self.apiserver) = Some(child);
        self.wait("kube-apiserver", "kube-apiserver.log", || {
            self.ca().is_file()
                && self
                    .kubectl(&["get", "--raw", "/readyz"])
                    .is_ok_and(|ready| ready.trim() == "ok")
        })
    }

    /// Kills kube-apiserver (an outage); etcd and the data stay.
    pub fn stop_apiserver(&self) {
        if let Some(mut child) = lock(&self.apiserver).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn apiserver_running(&self) -> bool {
        lock(&self.apiserver).is_some()
    }

    /// Compacts etcd up to its current revision: a watch from an older resourceVersion
    /// that reaches etcd gets 410 Gone. Returns the revision.
    pub fn compact(&self) -> Result<i64, String> {
        let range = self.etcd_post("/v3/kv/range", Some(json!({ "key": "AA==" })))?;
        let revision: i64 = range["header"]["revision"]
            .as_str()
            .and_then(|text| text.parse().ok())
            .ok_or_else(|| format!("no revision in {range}"))?;
        self.etcd_post(
            "/v3/kv/compaction",
            Some(json!({ "revision": revision.to_string(), "physical": true })),
        )?;
        Ok(revision)
    }

    /// A request to etcd's JSON gateway (`curl`, plain HTTP on loopback).
    fn etcd_post(&self, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("http://127.0.0.1:{}{path}", self.etcd_port);
        let mut args = vec!["-sS", "--max-time", "5", url.as_str()];
        let body = body.map(|body| body.to_string());
        if let Some(body) = &body {
            args.extend(["-X", "POST", "-d", body.as_str()]);
        }
        let out = cmd::output("curl", &args);
        if !out.status.success() {
            return Err(format!("{path}: {}", String::from_utf8_lossy(&out.stderr)));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("{path}: {e}"))
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The serving certificate kube-apiserver generated, with its CA: what clients trust.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("certs/apiserver.crt")
    }

    /// The administrator's kubeconfig (`system:masters`).
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// A kubeconfig with the agent's ServiceAccount token (from the TokenRequest API):
    /// exactly deploy/'s permissions.
    pub fn write_agent_kubeconfig(&self, path: impl AsRef<Path>) -> io::Result<()> {
        fs::write(
            path,
            self.kubeconfig_yaml("interceptor-agent", &self.agent_token),
        )
    }

    /// An administrator's client.
    pub async fn client(&self) -> Client {
        client_from(&self.admin_kubeconfig).await
    }

    /// A client with the agent's ServiceAccount token.
    pub async fn agent_client(&self) -> Client {
        self.client_with_token(&self.agent_token).await
    }

    /// A client authenticating with a bearer `token`.
    pub async fn client_with_token(&self, token: &str) -> Client {
        let path = self.dir.join(format!(
            "client-{}.kubeconfig",
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        write(&path, &self.kubeconfig_yaml("client", token)).unwrap();
        client_from(&path).await
    }

    /// `kubectl` as the administrator; its stdout, or what went wrong.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("kubectl")
            .arg(format!("--kubeconfig={}", self.admin_kubeconfig.display()))
            .arg("--request-timeout=10s")
            .args(args)
            .output()
            .map_err(|e| format!("kubectl: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// deploy/ rendered with kustomize and applied, as a user installs the agent.
    fn apply_deploy(&self) -> Result<(), String> {
        let rendered = Command::new("kubectl")
            .arg("kustomize")
            .arg(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../deploy/overlays")
                    .join(OVERLAY),
            )
            .output()
            .map_err(|e| format!("kubectl kustomize: {e}"))?;
        if !rendered.status.success() {
            return Err(format!(
                "kubectl kustomize: {}",
                String::from_utf8_lossy(&rendered.stderr)
            ));
        }
        let file = self.dir.join("deploy.yaml");
        fs::write(&file, &rendered.stdout).map_err(|e| format!("{}: {e}", file.display()))?;
        self.kubectl(&["apply", "-f", &file.display().to_string()])
            .map(drop)
    }

    fn spawn_logged(&self, mut command: Command, name: &str) -> Result<Child, String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))
            .map_err(|e| format!("{name} log: {e}"))?;
        let err = log.try_clone().map_err(|e| format!("{name} log: {e}"))?;
        command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .current_dir(&self.dir);
        spawn_tied(command).map_err(|e| format!("starting {name}: {e}"))
    }

    /// Polls `ready` for up to a minute (kube-apiserver bootstraps its RBAC roles and
    /// priority classes before `/readyz` says ok); on time-out, the process's log tail.
    fn wait(&self, name: &str, log: &str, mut ready: impl FnMut() -> bool) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            if ready() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let text = fs::read_to_string(self.dir.join(log)).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        Err(format!(
            "{name} not ready after 90 s; its log ends:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ))
    }

    fn shutdown(&self) {
        self.stop_apiserver();
        if let Some(mut child) = lock(&self.etcd).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }

    /// A test's view: its own node name (pods are placed there) and namespaces.
    pub fn scope(&self, test: &str) -> Scope<'_> {
        Scope {
            plane: self,
            node: format!("{test}-{}", NEXT.fetch_add(1, Ordering::Relaxed)),
        }
    }

    /// The sum of one of kube-apiserver's own metric families (its `/metrics`, read as
    /// the administrator) over the series that carry every one of `labels`: e.g.
    /// `apiserver_request_total` (completed requests; a watch counts once it ends) or
    /// `apiserver_longrunning_requests` (watches open now) with
    /// `[("resource", "serviceaccounts"), ("verb", "LIST")]`. The server counts every
    /// client of this plane, kube-apiserver's own informers included, so on the shared
    /// plane that is every test of the binary. `scope` is `resource` for a request naming
    /// one object, also when a list or watch names it by `fieldSelector=metadata.name=..`;
    /// `namespace` or `cluster` otherwise.
    pub fn server_metric(&self, family: &str, labels: &[(&str, &str)]) -> Result<f64, String> {
        let text = self.kubectl(&["get", "--raw", "/metrics"])?;
        let prefix = format!("{family}{{");
        let wanted: Vec<String> = labels
            .iter()
            .map(|(name, value)| format!("{name}=\"{value}\""))
            .collect();
        let mut total = 0.0;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(prefix.as_str()) else {
                continue;
            };
            let Some((series, value)) = rest.rsplit_once("} ") else {
                return Err(format!("unreadable series: {line}"));
            };
            let series: Vec<&str> = series.split(',').collect();
            if wanted.iter().all(|label| series.contains(&label.as_str())) {
                total += value
                    .trim()
                    .parse::<f64>()
                    .map_err(|e| format!("{line}: {e}"))?;
            }
        }
        Ok(total)
    }

    /// Replaces the audit policy (by default [`audit_policy`]: every request of the
    /// agent's ServiceAccount) with `policy` (an `audit.k8s.io/v1` Policy, as YAML) and
    /// restarts the API server so that it takes effect: the bench audits only
    /// ServiceAccount requests, with every stage. The log is JSON lines, one event per
    /// stage ([`Self::audit_log`]); its backend blocks each request until its event is
    /// written, so a request that was answered is in the log.
    pub fn enable_audit_log(&self, policy: &str) -> Result<(), String> {
        write(&self.dir.join(AUDIT_POLICY), policy)?;
        self.stop_apiserver();
        self.start_apiserver()
    }

    /// Where the audit log is written.
    pub fn audit_log(&self) -> PathBuf {
        self.dir.join(AUDIT_LOG)
    }

    /// Where kube-apiserver listens (for a forwarder in front of it).
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// A kubeconfig with the agent's ServiceAccount token for a `server` other than this
    /// API server's own address: a forwarder on loopback in front of it (the serving
    /// certificate names 127.0.0.1, whatever the port).
    pub fn write_agent_kubeconfig_via(
        &self,
        path: impl AsRef<Path>,
        server: &str,
    ) -> io::Result<()> {
        let yaml = self
            .kubeconfig_yaml("interceptor-agent", &self.agent_token)
            .replace(
                &format!("server: {}\n", self.url()),
                &format!("server: {server}\n"),
            );
        fs::write(path, yaml)
    }

    /// Every request made with the agent's ServiceAccount token, as the server's audit log
    /// has it (all agents of this plane use that token: tell them apart by what they ask,
    /// e.g. their node's field selector). A watch appears when its response starts and
    /// again when it ends; a refused one only once, with its code.
    pub fn agent_requests(&self) -> Vec<AuditedRequest> {
        let text = fs::read_to_string(self.audit_log()).unwrap_or_default();
        text.lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .map(|event| AuditedRequest {
                stage: event["stage"].as_str().unwrap_or_default().to_owned(),
                verb: event["verb"].as_str().unwrap_or_default().to_owned(),
                uri: event["requestURI"].as_str().unwrap_or_default().to_owned(),
                code: event["responseStatus"]["code"].as_u64().unwrap_or(0) as u16,
            })
            .collect()
    }

    /// The agent's requests about the pods of `node` (its field selector names the node).
    pub fn agent_pod_requests(&self, node: &str) -> Vec<AuditedRequest> {
        let selector = format!("fieldSelector=spec.nodeName%3D{node}&");
        self.agent_requests()
            .into_iter()
            .filter(|request| {
                request.uri.starts_with("/api/v1/pods?")
                    && format!("{}&", request.uri).contains(&selector)
            })
            .collect()
    }

    /// How many LISTs of `node`'s pods the agent made: the first one, then one per relist.
    pub fn agent_pod_lists(&self, node: &str) -> usize {
        self.agent_pod_requests(node)
            .iter()
            .filter(|request| request.verb == "list")
            .count()
    }

    /// Whether the agent relisted `node`'s pods because its watch expired: after the
    /// `lists_before`-th LIST, a watch resumed from before etcd's revision `compacted`,
    /// and a LIST followed it. (The server answers such a watch with 200 and the 410 as an
    /// ERROR event in its stream, so the audit log cannot show the 410 itself.)
    pub fn agent_relisted(
        &self,
        node: &str,
        lists_before: usize,
        compacted: i64,
    ) -> Result<(), String> {
        let requests = self.agent_pod_requests(node);
        let mut lists = requests
            .iter()
            .enumerate()
            .filter(|(_, request)| request.verb == "list")
            .map(|(at, _)| at);
        let after = match lists_before {
            0 => Some(0),
            n => lists.nth(n - 1),
        };
        let later = after.map_or(&[][..], |at| &requests[at..]);
        let stale = later.iter().position(|request| {
            request.verb == "watch"
                && request
                    .resource_version()
                    .is_some_and(|version| version < compacted)
        });
        match stale {
            Some(at) if later[at..].iter().any(|request| request.verb == "list") => Ok(()),
            _ => Err(format!(
                "no watch from before revision {compacted} followed by a LIST after LIST \
                 number {lists_before} in {requests:#?}"
            )),
        }
    }
}

/// The audit policy, in the plane's directory ([`audit_policy`], or what
/// [`ControlPlane::enable_audit_log`] wrote).
const AUDIT_POLICY: &str = "audit-policy.yaml";

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The audit log, in the plane's directory.
const AUDIT_LOG: &str = "audit.log";

/// Audits what the agent's ServiceAccount asks (at `Metadata` level: verb, URI, answer's
/// code), nothing else: the tests count the agent's lists and watches with it.
fn audit_policy() -> String {
    format!(
        "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n\
         - level: Metadata\n  users: [\"system:serviceaccount:{AGENT_NAMESPACE}:{AGENT_SERVICE_ACCOUNT}\"]\n\
         - level: None\n"
    )
}

/// One audited request of the agent.
#[derive(Debug, Clone)]
pub struct AuditedRequest {
    /// `ResponseStarted` (a watch's stream began) or `ResponseComplete`.
    pub stage: String,
    /// `list`, `watch`, `get`, `create`, `patch`...
    pub verb: String,
    /// Path and query, as sent (`/api/v1/pods?fieldSelector=...&watch=true`).
    pub uri: String,
    pub code: u16,
}

impl AuditedRequest {
    /// The `resourceVersion` the request asked from.
    pub fn resource_version(&self) -> Option<i64> {
        self.uri
            .split(['?', '&'])
            .find_map(|pair| pair.strip_prefix("resourceVersion="))
            .and_then(|version| version.parse().ok())
    }
}

/// Under `CI=true`, fails `test` with `reason`; otherwise says it is skipped.
fn not_started(test: &str, reason: &str) {
    let ci = std::env::var("CI").is_ok_and(|value| value == "true" || value == "1");
    assert!(
        !ci,
        "{test}: the Kubernetes control plane did not start: {reason}"
    );
    eprintln!("SKIPPED {test}: the Kubernetes control plane did not start: {reason}");
}

extern "C" fn stop_shared() {
    if let Some(Ok(plane)) = SHARED.get() {
        plane.shutdown();
    }
}

/// A test's part of a control plane: a node name of its own, and helpers that change the
/// cluster as the test's world changes.
pub struct Scope<'a> {
    pub plane: &'a ControlPlane,
    /// This test's node (`--node` of its agent, `spec.nodeName` of its pods).
    pub node: String,
}

impl Scope<'_> {
    /// A namespace name unique to this test: `base` plus the node's suffix.
    pub fn namespace_name(&self, base: &str) -> String {
        format!("{base}-{}", self.node)
    }

    /// Creates `namespace` and its `default` ServiceAccount (the ServiceAccount
    /// controller's part, which the ServiceAccount admission plugin relies on).
    pub async fn add_namespace(&self, namespace: Namespace) -> Namespace {
        let client = self.plane.client().await;
        let name = namespace.metadata.name.clone().expect("a named namespace");
        let created = Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
        let account = ServiceAccount {
            metadata: ObjectMeta {
                name: Some("default".into()),
                ..ObjectMeta::default()
            },
            ..ServiceAccount::default()
        };
        Api::<ServiceAccount>::namespaced(client, &name)
            .create(&PostParams::default(), &account)
            .await
            .unwrap_or_else(|e| panic!("creating {name}/default ServiceAccount: {e}"));
        created
    }

    /// A namespace with `annotations`, created.
    pub async fn namespace(&self, name: &str, annotations: &[(&str, &str)]) -> Namespace {
        let mut namespace = new_namespace(name);
        namespace.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        );
        self.add_namespace(namespace).await
    }

    pub async fn update_namespace(
        &self,
        name: &str,
        change: impl FnOnce(&mut Namespace),
    ) -> Namespace {
        let api = Api::<Namespace>::all(self.plane.client().await);
        let mut namespace = api.get(name).await.unwrap();
        change(&mut namespace);
        api.replace(name, &PostParams::default(), &namespace)
            .await
            .unwrap_or_else(|e| panic!("updating namespace {name}: {e}"))
    }

    /// Sets the annotation `key` of namespace `name` to `value`.
    pub async fn annotate_namespace(&self, name: &str, key: &str, value: &str) -> Namespace {
        self.update_namespace(name, |namespace| {
            namespace
                .metadata
                .annotations
                .get_or_insert_default()
                .insert(key.to_owned(), value.to_owned());
        })
        .await
    }

    /// The Node object of this test's node, with `taints`, as the kubelet registers it.
    pub async fn add_node(&self, taints: &[&str]) -> Node {
        let mut node = new_node(&self.node);
        node.spec.get_or_insert_default().taints = Some(
            taints
                .iter()
                .map(|key| k8s_openapi::api::core::v1::Taint {
                    key: (*key).to_owned(),
                    effect: "NoSchedule".into(),
                    ..Default::default()
                })
                .collect(),
        );
        Api::<Node>::all(self.plane.client().await)
            .create(&PostParams::default(), &node)
            .await
            .unwrap_or_else(|e| panic!("creating node {}: {e}", self.node))
    }

    pub async fn node_object(&self) -> Option<Node> {
        Api::<Node>::all(self.plane.client().await)
            .get_opt(&self.node)
            .await
            .unwrap()
    }

    /// Waits (up to 30 s) until this test's node no longer has the agent's startup
    /// taint; the taints it has then.
    pub async fn wait_startup_taint_removed(&self) -> Vec<String> {
        wait_until(
            "the startup taint's removal",
            Duration::from_secs(30),
            || async {
                let taints: Vec<String> = self
                    .node_object()
                    .await
                    .and_then(|node| node.spec?.taints)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|taint| taint.key)
                    .collect();
                if taints
                    .iter()
                    .any(|key| key == interceptor::k8s::node::STARTUP_TAINT)
                {
                    Err(format!("{taints:?}"))
                } else {
                    Ok(taints)
                }
            },
        )
        .await
    }

    /// Creates a pod on this test's node with an optional role annotation; the server
    /// assigns its UID (the simulated pod is then made with it:
    /// `Node::pod_with_uid`).
    pub async fn add_pod(&self, namespace: &str, name: &str, annotations: &[(&str, &str)]) -> Pod {
        let mut pod = new_pod(namespace, name, &self.node);
        pod.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>(),
        );
        self.create_pod(pod).await
    }

    pub async fn create_pod(&self, pod: Pod) -> Pod {
        let namespace = pod.metadata.namespace.clone().expect("a namespaced pod");
        Api::<Pod>::namespaced(self.plane.client().await, &namespace)
            .create(&PostParams::default(), &pod)
            .await
            .unwrap_or_else(|e| panic!("creating pod {namespace}/{:?}: {e}", pod.metadata.name))
    }

    /// Writes the status the kubelet would once the pod's container runs: phase Running,
    /// the pod's address, and the container's id.
    pub async fn set_running(&self, api: &Pod, pod: &crate::Pod) -> Pod {
        self.set_running_as(api, pod.ip, &pod.container_id).await
    }

    pub async fn update_pod(
        &self,
        namespace: &str,
        name: &str,
        change: impl FnOnce(&mut Pod),
    ) -> Pod {
        let api = Api::<Pod>::namespaced(self.plane.client().await, namespace);
        let mut pod = api.get(name).await.unwrap();
        change(&mut pod);
        api.replace(name, &PostParams::default(), &pod)
            .await
            .unwrap_or_else(|e| panic!("updating pod {namespace}/{name}: {e}"))
    }

    /// Sets the annotation `key` of pod `namespace/name` to `value`.
    pub async fn annotate_pod(&self, namespace: &str, name: &str, key: &str, value: &str) -> Pod {
        self.update_pod(namespace, name, |pod| {
            pod.metadata
                .annotations
                .get_or_insert_default()
                .insert(key.to_owned(), value.to_owned());
        })
        .await
    }

    /// Deletes a pod as the kubelet completes a deletion (grace period 0).
    pub async fn delete_pod(&self, namespace: &str, name: &str) {
        Api::<Pod>::namespaced(self.plane.client().await, namespace)
            .delete(
                name,
                &DeleteParams {
                    grace_period_seconds: Some(0),
                    ..DeleteParams::default()
                },
            )
            .await
            .unwrap_or_else(|e| panic!("deleting pod {namespace}/{name}: {e}"));
    }

    /// The `events.k8s.io/v1` Events in `namespace`, as JSON.
    pub async fn events(&self, namespace: &str) -> Vec<Value> {
        Api::<Event>::namespaced(self.plane.client().await, namespace)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|event| serde_json::to_value(event).unwrap())
            .collect()
    }

    /// Waits until `namespace` holds an Event with `reason` on the object named
    /// `regarding` (a bound for a broken run: 60 s); returns it as JSON.
    pub async fn wait_event(&self, namespace: &str, regarding: &str, reason: &str) -> Value {
        wait_until(
            &format!("the {reason} event on {regarding}"),
            Duration::from_secs(60),
            || async {
                let events = self.events(namespace).await;
                events
                    .iter()
                    .find(|event| {
                        event["reason"] == reason && event["regarding"]["name"] == regarding
                    })
                    .cloned()
                    .ok_or_else(|| format!("{events:?}"))
            },
        )
        .await
    }

    /// A pod on this test's node as a cluster makes one: created through the API with
    /// `annotations` (the server assigns its UID), simulated on `node` under that UID
    /// (cgroups named after it, its own network), then Running with its container's id
    /// in its status, as the kubelet writes it.
    pub async fn running_pod(
        &self,
        node: &crate::Node,
        namespace: &str,
        name: &str,
        annotations: &[(&str, &str)],
    ) -> crate::Pod {
        let (api, pod) = self.created_pod(node, namespace, name, annotations).await;
        self.set_running(&api, &pod).await;
        pod
    }

    /// [`Self::running_pod`] for a pod the test wrote itself (`api`, in its namespace): created
    /// through the API, simulated on `node` under the UID the server gave it, then Running.
    pub async fn run_pod(&self, node: &crate::Node, api: Pod) -> crate::Pod {
        let api = self.create_pod(api).await;
        let pod = node.pod_with_uid(api.metadata.uid.clone().expect("a UID from the server"));
        self.set_running(&api, &pod).await;
        pod
    }

    /// [`Self::set_running`] for a pod the test gave no simulated pod (an idle pod that
    /// only has to exist, as on a busy node): its address and container id as given.
    pub async fn set_running_as(
        &self,
        api: &Pod,
        ip: std::net::Ipv4Addr,
        container_id: &str,
    ) -> Pod {
        let namespace = api.metadata.namespace.as_deref().unwrap();
        let name = api.metadata.name.as_deref().unwrap();
        let status = json!({ "status": {
            "phase": "Running",
            "hostIP": "10.213.0.1",
            "podIP": ip.to_string(),
            "podIPs": [{ "ip": ip.to_string() }],
            "conditions": [{ "type": "Ready", "status": "True" }],
            "containerStatuses": [{
                "name": "main",
                "image": "registry.invalid/app:1",
                "imageID": "",
                "containerID": format!("containerd://{container_id}"),
                "ready": true,
                "started": true,
                "restartCount": 0,
                "state": { "running": {} },
            }],
        }});
        Api::<Pod>::namespaced(self.plane.client().await, namespace)
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap_or_else(|e| panic!("pod status {namespace}/{name}: {e}"))
    }

    /// A pod on this test's node with `annotations`, created through the API, and the
    /// simulated pod on `node` with the UID the server gave it.
    pub async fn simulated_pod(
        &self,
        node: &crate::Node,
        namespace: &str,
        name: &str,
        annotations: &[(&str, &str)],
    ) -> crate::Pod {
        self.created_pod(node, namespace, name, annotations).await.1
    }

    /// The API pod, created, and the simulated pod under the UID the server gave it.
    async fn created_pod(
        &self,
        node: &crate::Node,
        namespace: &str,
        name: &str,
        annotations: &[(&str, &str)],
    ) -> (Pod, crate::Pod) {
        let api = self.add_pod(namespace, name, annotations).await;
        let pod = node.pod_with_uid(api.metadata.uid.clone().expect("a UID from the server"));
        (api, pod)
    }
}

/// Polls an async `probe` every 50 ms until it gives a value; panics with what it last
/// saw after `timeout`.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(seen) if tokio::time::Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last seen: {seen}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn client_from(path: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    fs::File::create(path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    fs::File::open("/dev/urandom")
        .and_then(|mut file| io::Read::read_exact(&mut file, &mut bytes))
        .expect("/dev/urandom");
    u64::from_ne_bytes(bytes)
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `command` from a thread that lives as long as the test binary, with
/// `PR_SET_PDEATHSIG` = SIGKILL: the signal follows the spawning thread, so spawning from
/// a test's own (short-lived) thread would kill the process when that test ends.
pub(crate) fn spawn_tied(command: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("tied-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    // SAFETY: prctl is async-signal-safe; nothing else runs between fork
                    // and exec.
                    unsafe {
                        command.pre_exec(|| {
                            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                                return Err(io::Error::last_os_error());
                            }
                            Ok(())
                        });
                    }
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("the spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    lock(spawner)
        .send((command, reply_tx))
        .map_err(|_| io::Error::other("the spawner thread ended"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("the spawner thread ended"))?
}
