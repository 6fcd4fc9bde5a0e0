//! The Kubernetes side: a node-scoped pod watch and a namespace watch feeding in-memory
//! stores, and Events posted on pods.
//!
//! Only pods on this node are watched (`spec.nodeName=<node>`), so the agent's memory and
//! the API server's work scale with the node, not the cluster. Stores keep a reduced form
//! of each object (what decisions need), not the full object. Both watches go through
//! kube-runtime's watcher, which re-lists after a 410 Gone and retries with backoff after
//! dropped connections and API server restarts; the stores keep serving what they had
//! meanwhile.

pub mod events;
pub mod namespaces;
pub mod node;
pub mod pods;
pub mod service_accounts;
mod slim;

use std::path::Path;

pub use events::EventSink;
use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};
pub use namespaces::{NamespaceInfo, NamespaceStore};
pub use pods::{Lookup, PodChange, PodInfo, PodStore};
pub use service_accounts::ServiceAccountStore;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes configuration: not in a cluster (no service account) and no \
         --kubeconfig / KUBECONFIG: {0}"
    )]
    Infer(#[source] kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kubeconfig { .. } => "kubeconfig",
            Self::Infer(_) => "infer",
            Self::Client(_) => "client",
        }
    }
}

/// The API client: an explicit kubeconfig file if given, else the standard inference
/// (in-cluster service account, then `KUBECONFIG` / `~/.kube/config`).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, Error> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig_error = |source| Error::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let kubeconfig = Kubeconfig::read_from(path).map_err(kubeconfig_error)?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(kubeconfig_error)?
        }
        None => Config::infer().await.map_err(Error::Infer)?,
    };
    Client::try_from(config).map_err(Error::Client)
}
