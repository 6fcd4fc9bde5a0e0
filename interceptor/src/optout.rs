//! Keeps the kernel's exempt map in step with the pods that keep the node's identity
//! (see [`crate::resolve::NODE_IDENTITY`]): their cgroups are added when the pod (or a
//! new container of it) appears and removed when the pod goes or loses the opt-out.
//!
//! Sync runs on every pod change and on a short interval (a restarted container gets a
//! new cgroup without a pod event the agent can rely on). Until its cgroup is in the map,
//! an opted-out container is intercepted like any other and refused (fail closed).

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use crate::{ebpf::ExemptCgroups, k8s::PodStore, resolve::Resolver};

pub struct OptOuts {
    resolver: Arc<Resolver>,
    pods: Arc<PodStore>,
    exempt: Arc<ExemptCgroups>,
    /// What we put in the map, per pod UID.
    exempted: HashMap<String, BTreeSet<u64>>,
}

impl OptOuts {
    pub fn new(resolver: Arc<Resolver>, pods: Arc<PodStore>, exempt: Arc<ExemptCgroups>) -> Self {
        Self {
            resolver,
            pods,
            exempt,
            exempted: HashMap::new(),
        }
    }

    /// One reconciliation pass.
    pub fn sync(&mut self) {
        let opted: Vec<String> = self
            .pods
            .pods()
            .into_iter()
            .filter(|pod| self.resolver.keeps_node_identity(pod))
            .map(|pod| pod.uid.clone())
            .collect();
        if !opted.is_empty() {
            self.resolver.index().walk(true);
        }
        let mut wanted: HashMap<String, BTreeSet<u64>> = HashMap::new();
        for uid in opted {
            let ids: BTreeSet<u64> = self
                .resolver
                .index()
                .cgroups_of_pod(&uid)
                .into_iter()
                .collect();
            wanted.insert(uid, ids);
        }
        for (uid, ids) in &self.exempted {
            let keep = wanted.get(uid);
            for id in ids {
                if !keep.is_some_and(|keep| keep.contains(id))
                    && let Err(error) = self.exempt.remove(*id)
                {
                    tracing::warn!(%error, uid, cgroup_id = id, "could not remove an exempt cgroup");
                }
            }
        }
        for (uid, ids) in &wanted {
            let had = self.exempted.get(uid);
            for id in ids {
                if had.is_some_and(|had| had.contains(id)) {
                    continue;
                }
                match self.exempt.insert(*id) {
                    Ok(()) => tracing::info!(
                        uid,
                        cgroup_id = id,
                        "cgroup keeps the node identity (exempt)"
                    ),
                    Err(error) => {
                        tracing::warn!(%error, uid, cgroup_id = id, "could not exempt a cgroup")
                    }
                }
            }
        }
        self.exempted = wanted;
    }

    /// Reconciles on every pod change and every `interval`, until the task is dropped.
    pub async fn run(mut self, interval: Duration) {
        let mut changes = self.pods.subscribe();
        let mut tick = tokio::time::interval(interval);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                change = changes.recv() => {
                    if matches!(change, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                        return;
                    }
                }
            }
            self.sync();
        }
    }
}
