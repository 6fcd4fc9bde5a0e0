//! Standalone mode, without Kubernetes: callers are the host's services, known by their
//! cgroup path, bound to roles by a YAML file (docs/standalone.md) that is reloaded when
//! it changes. It plugs into the app its backend and the file's reloader.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, PoisonError, RwLock},
    time::Duration,
};

use anyhow::Result;
use tokio::task::JoinSet;

use super::{Shared, admin};
use crate::{
    audit::ChosenBy,
    bindings::{self, Bindings},
    credentials::{Credentials, CredentialsError, RoleRequest},
    ebpf::Attributed,
    imds::{self, Authorization, CredentialsFailure, server::Unserved},
    metrics::Metrics,
    observe::Who,
    policy::PolicyConfig,
};

/// How often the bindings file's modification time is checked.
const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// Standalone mode's view of callers: a cgroup and the binding its path matches.
pub(super) struct StandaloneBackend {
    shared: Arc<Shared>,
    bindings: bindings::Shared,
}

pub(super) struct ServiceCaller {
    path: String,
    /// What its IMDSv2 tokens are bound to: its cgroup.
    token_binding: String,
}

/// A binding's role for one request (the binding's name is the session name).
pub(super) struct BindingGrant {
    request: RoleRequest,
}

impl imds::Grant for BindingGrant {
    fn arn(&self) -> &str {
        &self.request.role_arn
    }

    fn chosen_by(&self) -> ChosenBy {
        ChosenBy::ContainerMap
    }
}

/// A service as observe mode's report names it: no namespace or pod, its cgroup path.
fn service(container: String) -> Who {
    Who {
        namespace: String::new(),
        pod: String::new(),
        container,
    }
}

impl imds::Backend for StandaloneBackend {
    type Caller = ServiceCaller;
    type Grant = BindingGrant;

    async fn caller(&self, record: Attributed) -> Result<ServiceCaller, Unserved> {
        match self.shared.index.resolve(record.cgroup_id, record.pid) {
            Some(resolved) => Ok(ServiceCaller {
                path: resolved.path.clone(),
                token_binding: format!("cgroup-{}", resolved.cgroup_id),
            }),
            None => {
                self.shared
                    .metrics
                    .caller_refusals
                    .with_label_values(&["unknown_cgroup"])
                    .inc();
                Err(Unserved {
                    reason: "unknown_cgroup",
                    who: service(format!("cgroup id {}", record.cgroup_id)),
                })
            }
        }
    }

    fn binding<'a>(&self, caller: &'a ServiceCaller) -> &'a str {
        &caller.token_binding
    }

    fn who(&self, caller: &ServiceCaller) -> Who {
        service(caller.path.clone())
    }

    fn authorize(&self, caller: &ServiceCaller) -> Authorization<BindingGrant> {
        let bindings = self
            .bindings
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let authorizations = &self.shared.metrics.authorizations;
        match bindings.matching(&caller.path) {
            Some(binding) => {
                authorizations.with_label_values(&["role"]).inc();
                Authorization::Role(BindingGrant {
                    request: RoleRequest {
                        role_arn: binding.role.to_string().into(),
                        external_id: binding.external_id.as_deref().map(Into::into),
                        session_name: binding.name.as_str().into(),
                        ..RoleRequest::default()
                    },
                })
            }
            None => {
                authorizations.with_label_values(&["no_role"]).inc();
                Authorization::NoRole
            }
        }
    }

    async fn credentials(
        &self,
        grant: &BindingGrant,
    ) -> Result<Arc<Credentials>, CredentialsFailure> {
        let name = &*grant.request.session_name;
        match self.shared.credentials(&grant.request).await {
            Ok(credentials) => Ok(credentials),
            Err(error @ CredentialsError::Refused { .. }) => {
                tracing::warn!(binding = name, %error, "STS refused the binding's role");
                Err(super::refused(&error))
            }
            Err(error) => {
                tracing::warn!(binding = name, %error, "no credentials to serve");
                Err(CredentialsFailure::Unavailable)
            }
        }
    }
}

/// Loads the bindings and starts their reloader (owned by `tasks`).
pub(super) fn start(
    path: &Path,
    policy: PolicyConfig,
    shared: &Arc<Shared>,
    tasks: &mut JoinSet<()>,
) -> Result<Arc<StandaloneBackend>> {
    let bindings = Bindings::load(path, &policy)?;
    tracing::info!(bindings = bindings.len(), file = %path.display(), "standalone mode");
    let current: bindings::Shared = Arc::new(RwLock::new(Arc::new(bindings)));
    tasks.spawn(reload(path.to_owned(), policy, current.clone()));
    Ok(Arc::new(StandaloneBackend {
        shared: shared.clone(),
        bindings: current,
    }))
}

/// Re-reads the bindings file when it changes; a broken file is reported and the
/// previous bindings stay in force.
async fn reload(path: PathBuf, policy: PolicyConfig, current: bindings::Shared) {
    let modified = |path: &Path| {
        std::fs::metadata(path)
            .and_then(|meta| meta.modified())
            .ok()
    };
    let mut seen = modified(&path);
    let mut tick = tokio::time::interval(RELOAD_INTERVAL);
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
                *current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(bindings);
            }
            Err(error) => {
                tracing::error!(%error, "bindings file not reloaded; the previous bindings stay")
            }
        }
    }
}

/// What the admin endpoints show in standalone mode: no pods.
impl admin::State for Shared {
    fn refresh(&self, metrics: &Metrics) {
        Shared::refresh(self, metrics);
    }

    fn debug_store(&self) -> serde_json::Value {
        serde_json::json!({ "pods": [], "credentials": self.debug_credentials() })
    }
}
