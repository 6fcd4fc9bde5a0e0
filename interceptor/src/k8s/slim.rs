//! Decoding only what the agent reads from the API server.
//!
//! kube's types decode every field of an object. The agent keeps a few strings per pod
//! and per namespace, while what the API server sends is mostly other things: about 2 KB
//! of JSON per pod before its status, and `managedFields` on every object, decoded as
//! free-form JSON values. The watches' first lists hold a whole node's pods, or every
//! namespace of the cluster, at once; the memory the allocator takes for them stays with
//! the process. These types name the fields the agent reads, and the decoder skips the
//! rest without allocating. docs/performance.md (scenario 6) has the measurement.

use std::{borrow::Cow, collections::BTreeMap, marker::PhantomData};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::Resource;
use serde::{Deserialize, Deserializer};

/// The metadata fields the agent and the watches read.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Fields {
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
    #[serde(default)]
    resource_version: Option<String>,
}

/// Decodes an object's `metadata`: uid, name, namespace, annotations and resourceVersion
/// (which the watch resumes from); every other field is left at its default.
pub(super) fn metadata<'de, D: Deserializer<'de>>(decoder: D) -> Result<ObjectMeta, D::Error> {
    let Fields {
        uid,
        name,
        namespace,
        annotations,
        resource_version,
    } = Fields::deserialize(decoder)?;
    Ok(ObjectMeta {
        uid,
        name,
        namespace,
        annotations,
        resource_version,
        ..ObjectMeta::default()
    })
}

/// An object of kind `K` as a metadata-only request returns it (like kube's
/// `PartialObjectMeta`), with only the fields [`metadata`] decodes.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Metadata<K> {
    #[serde(deserialize_with = "metadata")]
    pub metadata: ObjectMeta,
    #[serde(skip)]
    kind: PhantomData<K>,
}

impl<K: Resource<DynamicType = ()>> Resource for Metadata<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        K::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        K::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        K::version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        K::plural(dt)
    }

    /// The API server is asked for `PartialObjectMetadata` (kube sets the `Accept` header).
    fn metadata_api() -> bool {
        true
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Namespace;

    use super::*;

    #[test]
    fn metadata_keeps_what_the_agent_reads_and_skips_the_rest() {
        let json = serde_json::json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {
                "name": "team-a",
                "uid": "u-1",
                "resourceVersion": "12",
                "labels": {"kubernetes.io/metadata.name": "team-a"},
                "annotations": {"iam.amazonaws.com/permitted": ".*"},
                "managedFields": [{"manager": "kubectl", "fieldsType": "FieldsV1",
                                   "fieldsV1": {"f:metadata": {"f:labels": {}}}}]
            }
        });
        let decoded: Metadata<Namespace> = serde_json::from_value(json).unwrap();
        assert_eq!(
            decoded.metadata,
            ObjectMeta {
                name: Some("team-a".into()),
                uid: Some("u-1".into()),
                resource_version: Some("12".into()),
                annotations: Some(BTreeMap::from([(
                    "iam.amazonaws.com/permitted".into(),
                    ".*".into()
                )])),
                ..ObjectMeta::default()
            }
        );
        assert!(Metadata::<Namespace>::metadata_api());
        assert_eq!(
            Metadata::<Namespace>::url_path(&(), None),
            "/api/v1/namespaces"
        );
    }
}
