//! The in-memory object store: objects as JSON, one global resourceVersion (an integer that
//! every write bumps, like etcd's revision) and a bounded history of changes for watches.

use std::{
    collections::{BTreeMap, VecDeque},
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{Map, Value, json};

/// The resources the fake serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Kind {
    Pod,
    Namespace,
    Node,
    ServiceAccount,
    /// `v1` `Event` (`/api/v1/namespaces/{ns}/events`).
    CoreEvent,
    /// `events.k8s.io/v1` `Event` (what `kube::runtime::events::Recorder` writes).
    Event,
}

impl Kind {
    pub(crate) fn kind(self) -> &'static str {
        match self {
            Self::Pod => "Pod",
            Self::Namespace => "Namespace",
            Self::Node => "Node",
            Self::ServiceAccount => "ServiceAccount",
            Self::CoreEvent | Self::Event => "Event",
        }
    }

    pub(crate) fn api_version(self) -> &'static str {
        match self {
            Self::Event => "events.k8s.io/v1",
            _ => "v1",
        }
    }

    /// The resource name, as in the URL and in `Status.details.kind`.
    pub(crate) fn plural(self) -> &'static str {
        match self {
            Self::Pod => "pods",
            Self::Namespace => "namespaces",
            Self::Node => "nodes",
            Self::ServiceAccount => "serviceaccounts",
            Self::CoreEvent | Self::Event => "events",
        }
    }

    /// API group, "" for the core group.
    pub(crate) fn group(self) -> &'static str {
        match self {
            Self::Event => "events.k8s.io",
            _ => "",
        }
    }

    pub(crate) fn namespaced(self) -> bool {
        matches!(
            self,
            Self::Pod | Self::ServiceAccount | Self::CoreEvent | Self::Event
        )
    }

    /// The kind served at `/{api prefix}/{plural}` for API group `group` ("" = core).
    pub(crate) fn lookup(group: &str, plural: &str) -> Option<Self> {
        match (group, plural) {
            ("", "pods") => Some(Self::Pod),
            ("", "namespaces") => Some(Self::Namespace),
            ("", "nodes") => Some(Self::Node),
            ("", "serviceaccounts") => Some(Self::ServiceAccount),
            ("", "events") => Some(Self::CoreEvent),
            ("events.k8s.io", "events") => Some(Self::Event),
            _ => None,
        }
    }

    /// Field selector keys the real apiserver accepts for this kind (`None`: any field path).
    pub(crate) fn field_labels(self) -> Option<&'static [&'static str]> {
        match self {
            Self::Pod => Some(&[
                "metadata.name",
                "metadata.namespace",
                "spec.nodeName",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "spec.hostNetwork",
                "status.phase",
                "status.podIP",
                "status.nominatedNodeName",
            ]),
            Self::Namespace => Some(&["metadata.name", "status.phase"]),
            Self::Node => Some(&["metadata.name", "spec.unschedulable"]),
            Self::ServiceAccount => Some(&["metadata.name", "metadata.namespace"]),
            Self::CoreEvent | Self::Event => None,
        }
    }
}

/// `type` of a watch event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One write, as kept in the history that watches replay.
#[derive(Clone, Debug)]
pub(crate) struct Change {
    pub(crate) rv: u64,
    pub(crate) kind: Kind,
    pub(crate) type_: ChangeType,
    /// The object after the write (for a delete: the last state, with the delete's rv).
    pub(crate) object: Value,
    /// The object before a modification, so a selector watch can turn a change that moves
    /// the object out of (into) its selection into DELETED (ADDED), as the apiserver does.
    pub(crate) prev: Option<Value>,
}

/// An API error, rendered as a `Status` object.
#[derive(Clone, Debug)]
pub(crate) struct ApiError {
    pub(crate) code: u16,
    pub(crate) reason: &'static str,
    pub(crate) message: String,
    pub(crate) details: Option<Value>,
}

impl ApiError {
    pub(crate) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    pub(crate) fn not_found(kind: Kind, name: &str) -> Self {
        let mut details = json!({ "name": name, "kind": kind.plural() });
        if !kind.group().is_empty() {
            details["group"] = json!(kind.group());
        }
        Self {
            code: 404,
            reason: "NotFound",
            message: format!("{} \"{name}\" not found", resource_name(kind)),
            details: Some(details),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub(crate) fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub(crate) fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

/// `pods` or `events.events.k8s.io`, as apiserver messages name a resource.
fn resource_name(kind: Kind) -> String {
    if kind.group().is_empty() {
        kind.plural().to_owned()
    } else {
        format!("{}.{}", kind.plural(), kind.group())
    }
}

/// (kind, namespace or "" for cluster-scoped kinds, name). The map's order is the list order.
pub(crate) type Key = (Kind, String, String);

pub(crate) struct Store {
    /// The current (last issued) resourceVersion.
    pub(crate) rv: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Change>,
    history_limit: usize,
    /// A watch may start at resourceVersion X only if X >= this; older gets 410 Expired.
    pub(crate) oldest_watchable: u64,
    /// The highest resourceVersion of a change no longer in the history: an open watch whose
    /// position is below it has missed events and is ended with 410 Expired.
    pub(crate) dropped_through: u64,
    seq: u64,
}

impl Store {
    pub(crate) fn new(history_limit: usize) -> Self {
        Self {
            rv: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            oldest_watchable: 0,
            dropped_through: 0,
            seq: 0,
        }
    }

    pub(crate) fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(&(kind, namespace.to_owned(), name.to_owned()))
    }

    /// Objects of `kind` in list order (namespace, then name), optionally only in `namespace`.
    pub(crate) fn iter(
        &self,
        kind: Kind,
        namespace: Option<&str>,
    ) -> impl Iterator<Item = (&Key, &Value)> {
        self.objects
            .range((kind, String::new(), String::new())..)
            .take_while(move |(key, _)| key.0 == kind)
            .filter(move |(key, _)| namespace.is_none_or(|ns| key.1 == ns))
    }

    /// The recorded changes after resourceVersion `after`, oldest first.
    pub(crate) fn changes_after(&self, after: u64) -> impl Iterator<Item = &Change> {
        let start = self.history.partition_point(|c| c.rv <= after);
        self.history.range(start..)
    }

    /// Creates an object (POST semantics).
    pub(crate) fn create(
        &mut self,
        kind: Kind,
        namespace: &str,
        mut obj: Value,
    ) -> Result<Value, ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        let meta = metadata_mut(&mut obj);
        let name = match meta.get("name").and_then(Value::as_str) {
            Some(name) if !name.is_empty() => name.to_owned(),
            _ => match meta.get("generateName").and_then(Value::as_str) {
                Some(prefix) if !prefix.is_empty() => {
                    self.seq += 1;
                    format!("{prefix}{}", short_suffix(self.seq))
                }
                _ => {
                    return Err(ApiError::new(
                        422,
                        "Invalid",
                        format!(
                            "{} \"\" is invalid: metadata.name: Required value: name or \
                             generateName is required",
                            kind.kind()
                        ),
                    ));
                }
            },
        };
        let namespace = if kind.namespaced() { namespace } else { "" };
        let key = (kind, namespace.to_owned(), name.clone());
        if self.objects.contains_key(&key) {
            let mut err = ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", resource_name(kind)),
            );
            err.details = Some(json!({ "name": name, "kind": kind.plural() }));
            return Err(err);
        }
        meta.insert("name".into(), json!(name));
        if kind.namespaced() {
            meta.insert("namespace".into(), json!(namespace));
        } else {
            meta.remove("namespace");
        }
        if meta
            .get("uid")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            self.seq += 1;
            meta.insert("uid".into(), json!(fake_uid(self.seq)));
        }
        if !meta.get("creationTimestamp").is_some_and(Value::is_string) {
            meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
        }
        apply_defaults(kind, &name, &mut obj);
        let rv = self.bump();
        set_type_and_rv(kind, &mut obj, rv);
        self.objects.insert(key, obj.clone());
        self.record(Change {
            rv,
            kind,
            type_: ChangeType::Added,
            object: obj.clone(),
            prev: None,
        });
        Ok(obj)
    }

    /// Replaces an object (PUT semantics). If `obj` carries a `metadata.resourceVersion`, it
    /// must be the current one (optimistic concurrency), else 409 Conflict. A write that
    /// changes nothing is a no-op: no new resourceVersion, no watch event (as the apiserver).
    pub(crate) fn replace(
        &mut self,
        kind: Kind,
        namespace: &str,
        name: &str,
        mut obj: Value,
    ) -> Result<Value, ApiError> {
        let namespace = if kind.namespaced() { namespace } else { "" };
        let key = (kind, namespace.to_owned(), name.to_owned());
        let Some(old) = self.objects.get(&key).cloned() else {
            return Err(ApiError::not_found(kind, name));
        };
        if !obj.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        let old_rv = old["metadata"]["resourceVersion"].clone();
        let meta = metadata_mut(&mut obj);
        match meta.get("name").and_then(Value::as_str) {
            Some(n) if n != name => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )));
            }
            _ => {}
        }
        if let Some(rv) = meta.get("resourceVersion").and_then(Value::as_str)
            && !rv.is_empty()
            && Some(rv) != old_rv.as_str()
        {
            let mut err = ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been \
                     modified; please apply your changes to the latest version and try again",
                    resource_name(kind)
                ),
            );
            err.details = Some(json!({ "name": name, "kind": kind.plural() }));
            return Err(err);
        }
        // Immutable metadata comes from the stored object.
        for field in ["name", "namespace", "uid", "creationTimestamp"] {
            match old["metadata"].get(field) {
                Some(v) => meta.insert(field.into(), v.clone()),
                None => meta.remove(field),
            };
        }
        apply_defaults(kind, name, &mut obj);
        set_type_and_rv(kind, &mut obj, 0);
        obj["metadata"]["resourceVersion"] = old_rv;
        if obj == old {
            return Ok(old);
        }
        let rv = self.bump();
        set_type_and_rv(kind, &mut obj, rv);
        self.objects.insert(key, obj.clone());
        self.record(Change {
            rv,
            kind,
            type_: ChangeType::Modified,
            object: obj.clone(),
            prev: Some(old),
        });
        Ok(obj)
    }

    /// Deletes an object at once (no graceful deletion, no finalizers).
    pub(crate) fn delete(
        &mut self,
        kind: Kind,
        namespace: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let namespace = if kind.namespaced() { namespace } else { "" };
        let Some(mut obj) = self
            .objects
            .remove(&(kind, namespace.to_owned(), name.to_owned()))
        else {
            return Err(ApiError::not_found(kind, name));
        };
        let rv = self.bump();
        set_type_and_rv(kind, &mut obj, rv);
        self.record(Change {
            rv,
            kind,
            type_: ChangeType::Deleted,
            object: obj.clone(),
            prev: None,
        });
        Ok(obj)
    }

    /// Drops the whole history and starts a new window at a fresh resourceVersion: every
    /// resourceVersion issued before this call is now too old to watch from.
    pub(crate) fn compact(&mut self) {
        if let Some(last) = self.history.back() {
            self.dropped_through = self.dropped_through.max(last.rv);
        }
        self.history.clear();
        self.oldest_watchable = self.bump();
    }

    fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(&mut self, change: Change) {
        self.history.push_back(change);
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.dropped_through = self.dropped_through.max(dropped.rv);
                self.oldest_watchable = self.oldest_watchable.max(dropped.rv);
            }
        }
    }
}

fn metadata_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    obj["metadata"]
        .as_object_mut()
        .expect("metadata was just made an object")
}

fn set_type_and_rv(kind: Kind, obj: &mut Value, rv: u64) {
    obj["kind"] = json!(kind.kind());
    obj["apiVersion"] = json!(kind.api_version());
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
}

/// What the apiserver's defaulting and admission add on create and update.
fn apply_defaults(kind: Kind, name: &str, obj: &mut Value) {
    match kind {
        Kind::Namespace => {
            if !obj["metadata"]["labels"].is_object() {
                obj["metadata"]["labels"] = json!({});
            }
            obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
            if obj["spec"].is_null() {
                obj["spec"] = json!({ "finalizers": ["kubernetes"] });
            }
            if obj["status"]["phase"].is_null() {
                obj["status"] = json!({ "phase": "Active" });
            }
        }
        Kind::Pod => {
            if obj["status"]["phase"].is_null() {
                if !obj["status"].is_object() {
                    obj["status"] = json!({});
                }
                obj["status"]["phase"] = json!("Pending");
            }
        }
        Kind::Node | Kind::ServiceAccount | Kind::CoreEvent | Kind::Event => {}
    }
}

fn fake_uid(seq: u64) -> String {
    format!("00000000-0000-4000-8000-{seq:012x}")
}

/// Five characters of [a-z0-9], as `generateName` appends.
fn short_suffix(seq: u64) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut n = seq.wrapping_mul(2_654_435_761);
    (0..5)
        .map(|_| {
            let c = ALPHABET[(n % ALPHABET.len() as u64) as usize] as char;
            n /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

pub(crate) fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let secs = i64::try_from(secs).unwrap_or(0);
    k8s_openapi::jiff::Timestamp::from_second(secs)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}
