//! A pod as the agent reads it from the API server: only the fields [`super::PodInfo`]
//! keeps, and the resourceVersion the watch needs (why: [`crate::k8s::slim`]).

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::{NamespaceResourceScope, Resource};
use serde::Deserialize;

use crate::k8s::slim::metadata;

/// A pod, as much of it as the agent reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PodView {
    /// Only uid, name, namespace, annotations and resourceVersion are decoded.
    #[serde(deserialize_with = "metadata")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<Spec>,
    #[serde(default)]
    pub status: Option<Status>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    #[serde(default)]
    pub host_network: Option<bool>,
    #[serde(default)]
    pub service_account_name: Option<String>,
    #[serde(default)]
    pub containers: Option<Vec<Named>>,
    #[serde(default)]
    pub init_containers: Option<Vec<Named>>,
    #[serde(default)]
    pub ephemeral_containers: Option<Vec<Named>>,
}

/// A container of the spec: its name alone.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Named {
    pub name: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    #[serde(default)]
    pub container_statuses: Option<Vec<ContainerStatus>>,
    #[serde(default)]
    pub init_container_statuses: Option<Vec<ContainerStatus>>,
    #[serde(default)]
    pub ephemeral_container_statuses: Option<Vec<ContainerStatus>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStatus {
    pub name: String,
    #[serde(default, rename = "containerID")]
    pub container_id: Option<String>,
}

impl Resource for PodView {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}
