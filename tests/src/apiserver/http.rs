//! Request routing and the non-watch verbs: LIST, GET, POST, PUT, PATCH, DELETE.

use std::{
    collections::HashMap,
    convert::Infallible,
    io,
    sync::{Arc, atomic::Ordering},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{Method, Request, Response, body::Incoming, header};
use serde_json::{Value, json};

use super::{
    Shared,
    selector::{FieldSelector, Filter, LabelSelector},
    store::{ApiError, Kind},
    watch,
};

pub(crate) type Body = BoxBody<Bytes, io::Error>;

/// What a URL path names.
#[derive(Debug)]
enum Target {
    /// `/api/v1/pods`, `/api/v1/namespaces/{ns}/pods`, `/api/v1/namespaces`, ...
    Collection {
        kind: Kind,
        namespace: Option<String>,
    },
    /// `/api/v1/namespaces/{ns}/pods/{name}`, `/api/v1/nodes/{name}[/status]`, ...
    Item {
        kind: Kind,
        namespace: String,
        name: String,
    },
}

fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", "events.k8s.io", "v1", rest @ ..] => ("events.k8s.io", rest),
        _ => return None,
    };
    let namespaced = |plural: &str| Kind::lookup(group, plural).filter(|k| k.namespaced());
    let cluster = |plural: &str| Kind::lookup(group, plural).filter(|k| !k.namespaced());
    let item = |kind, namespace: &str, name: &str| Target::Item {
        kind,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    };
    // The only subresource is `status`, served as the object itself.
    match rest {
        ["namespaces", ns, plural] if namespaced(plural).is_some() => Some(Target::Collection {
            kind: namespaced(plural)?,
            namespace: Some((*ns).to_owned()),
        }),
        ["namespaces", ns, plural, name] | ["namespaces", ns, plural, name, "status"] => {
            Some(item(namespaced(plural)?, ns, name))
        }
        [plural] => Some(Target::Collection {
            kind: Kind::lookup(group, plural)?,
            namespace: None,
        }),
        [plural, name] | [plural, name, "status"] => Some(item(cluster(plural)?, "", name)),
        _ => None,
    }
}

pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    shared.log_request(&req);
    let response = match route(&shared, req).await {
        Ok(response) => response,
        Err(err) => json_response(err.code, &err.to_status()),
    };
    Ok(response)
}

async fn route(shared: &Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let query: HashMap<String, String> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let path = req.uri().path().to_owned();
    match path.as_str() {
        "/version" => {
            return Ok(json_response(
                200,
                &json!({
                    "major": "1",
                    "minor": "34",
                    "gitVersion": "v1.34.0-fake",
                    "platform": "linux/amd64",
                }),
            ));
        }
        "/healthz" | "/livez" | "/readyz" => {
            return Ok(text_response(200, "ok"));
        }
        _ => {}
    }
    let Some(target) = parse_path(&path) else {
        let mut err = ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
        err.details = Some(json!({}));
        return Err(err);
    };
    let watching = query.get("watch").is_some_and(|v| v == "true" || v == "1");
    let method = req.method().clone();
    // `kube`'s metadata-only API (`Api<PartialObjectMeta<K>>`, `metadata_watcher`) asks for
    // `application/json;as=PartialObjectMetadata[List];g=meta.k8s.io;v=v1`.
    let meta_only = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("as=PartialObjectMetadata"));
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_owned();
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))?
        .to_bytes();

    match (method, target) {
        (Method::GET, Target::Collection { kind, namespace }) => {
            let filter = filter(kind, namespace, None, &query)?;
            if watching {
                watch::serve(shared, filter, &query, meta_only)
            } else {
                list(shared, filter, &query, meta_only)
            }
        }
        (
            Method::GET,
            Target::Item {
                kind,
                namespace,
                name,
            },
        ) if watching => {
            // The deprecated watch on an item path: a watch filtered to that name.
            let namespace = kind.namespaced().then_some(namespace);
            let filter = filter(kind, namespace, Some(name), &query)?;
            watch::serve(shared, filter, &query, meta_only)
        }
        (
            Method::GET,
            Target::Item {
                kind,
                namespace,
                name,
            },
        ) => {
            let store = shared.lock_store();
            let obj = store
                .get(kind, &namespace, &name)
                .ok_or_else(|| ApiError::not_found(kind, &name))?;
            Ok(json_response(200, &render(obj, meta_only)))
        }
        (
            Method::POST,
            Target::Collection {
                kind,
                namespace: Some(namespace),
            },
        ) if kind.namespaced() => {
            let obj = parse_body(&body)?;
            check_namespace(&obj, &namespace)?;
            let created = shared.mutate(|s| s.create(kind, &namespace, obj))?;
            Ok(json_response(201, &render(&created, meta_only)))
        }
        (
            Method::POST,
            Target::Collection {
                kind,
                namespace: None,
            },
        ) if !kind.namespaced() => {
            let obj = parse_body(&body)?;
            let created = shared.mutate(|s| s.create(kind, "", obj))?;
            Ok(json_response(201, &render(&created, meta_only)))
        }
        (
            Method::PUT,
            Target::Item {
                kind,
                namespace,
                name,
            },
        ) => {
            let obj = parse_body(&body)?;
            check_namespace(&obj, &namespace)?;
            let replaced = shared.mutate(|s| s.replace(kind, &namespace, &name, obj))?;
            Ok(json_response(200, &render(&replaced, meta_only)))
        }
        (
            Method::PATCH,
            Target::Item {
                kind,
                namespace,
                name,
            },
        ) => {
            let patched = patch(shared, kind, &namespace, &name, &content_type, &body)?;
            Ok(json_response(200, &render(&patched, meta_only)))
        }
        (
            Method::DELETE,
            Target::Item {
                kind,
                namespace,
                name,
            },
        ) => {
            let deleted = shared.mutate(|s| s.delete(kind, &namespace, &name))?;
            Ok(json_response(200, &render(&deleted, meta_only)))
        }
        (method, _) => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource: {method}"),
        )),
    }
}

fn filter(
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
    query: &HashMap<String, String>,
) -> Result<Filter, ApiError> {
    let param = |name: &str| query.get(name).map_or("", String::as_str);
    Ok(Filter {
        kind,
        namespace,
        name,
        fields: FieldSelector::parse(kind, param("fieldSelector"))?,
        labels: LabelSelector::parse(param("labelSelector"))?,
    })
}

/// LIST: the objects the filter selects, in (namespace, name) order, `limit` at a time; the
/// `continue` token carries the list's resourceVersion and the last key returned.
fn list(
    shared: &Shared,
    filter: Filter,
    query: &HashMap<String, String>,
    meta_only: bool,
) -> Result<Response<Body>, ApiError> {
    shared.lists.fetch_add(1, Ordering::Relaxed);
    let limit = match query.get("limit").filter(|v| !v.is_empty()) {
        Some(l) => l
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request(format!("invalid value for limit: {l}")))?,
        None => 0,
    };
    let store = shared.lock_store();
    let (list_rv, after) = match query.get("continue").filter(|v| !v.is_empty()) {
        Some(token) => {
            let (rv, namespace, name) = parse_continue(token)?;
            if rv < store.oldest_watchable {
                return Err(ApiError::expired(
                    "The provided continue parameter is too old to display a consistent list \
                     result. You can start a new list without the continue parameter, or use \
                     the continue token in this response to retrieve the remainder of the \
                     results. Continuing with the provided token results in an inconsistent \
                     list - objects that were created, modified, or deleted between the time \
                     the first chunk was returned and now may show up in the list.",
                ));
            }
            (rv, Some((namespace, name)))
        }
        None => (store.rv, None),
    };
    let selected = store
        .iter(filter.kind, filter.namespace.as_deref())
        .filter(|((_, ns, name), _)| {
            after
                .as_ref()
                .is_none_or(|(a_ns, a_name)| (ns, name) > (a_ns, a_name))
        })
        .filter(|(_, obj)| filter.matches(obj));
    let mut items = Vec::new();
    let mut last_key = None;
    let mut remaining = 0_usize;
    for ((_, ns, name), obj) in selected {
        if limit > 0 && items.len() == limit {
            remaining += 1;
            continue;
        }
        // Items of a list carry no kind/apiVersion: the list's kind says it.
        let mut item = render(obj, meta_only);
        if let Some(map) = item.as_object_mut() {
            map.remove("kind");
            map.remove("apiVersion");
        }
        items.push(item);
        last_key = Some((ns, name));
    }
    let mut metadata = json!({ "resourceVersion": list_rv.to_string() });
    if remaining > 0
        && let Some((ns, name)) = last_key
    {
        metadata["continue"] = json!(format!("{list_rv}/{ns}/{name}"));
        metadata["remainingItemCount"] = json!(remaining);
    }
    let list = if meta_only {
        json!({
            "kind": "PartialObjectMetadataList",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": metadata,
            "items": items,
        })
    } else {
        json!({
            "kind": format!("{}List", filter.kind.kind()),
            "apiVersion": filter.kind.api_version(),
            "metadata": metadata,
            "items": items,
        })
    };
    Ok(json_response(200, &list))
}

fn parse_continue(token: &str) -> Result<(u64, String, String), ApiError> {
    let bad = || ApiError::bad_request(format!("continue key is not valid: {token}"));
    let mut parts = token.splitn(3, '/');
    let rv = parts
        .next()
        .and_then(|rv| rv.parse().ok())
        .ok_or_else(bad)?;
    let namespace = parts.next().ok_or_else(bad)?.to_owned();
    let name = parts.next().ok_or_else(bad)?.to_owned();
    Ok((rv, namespace, name))
}

/// PATCH: JSON patch (RFC 6902) or JSON merge patch (RFC 7386); a strategic merge patch and
/// a server-side apply (sent as JSON by kube) are applied as merge patches.
fn patch(
    shared: &Shared,
    kind: Kind,
    namespace: &str,
    name: &str,
    content_type: &str,
    body: &[u8],
) -> Result<Value, ApiError> {
    let media_type = content_type.split(';').next().unwrap_or("").trim();
    let patch = parse_body(body)?;
    let apply = media_type == "application/apply-patch+yaml";
    shared.mutate(|store| {
        let current = match store.get(kind, namespace, name) {
            Some(obj) => obj.clone(),
            None if apply => {
                let mut obj = patch.clone();
                obj["metadata"]["name"] = json!(name);
                return store.create(kind, namespace, obj);
            }
            None => return Err(ApiError::not_found(kind, name)),
        };
        let mut obj = current;
        match media_type {
            "application/json-patch+json" => {
                let ops: json_patch::Patch = serde_json::from_value(patch)
                    .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
                json_patch::patch(&mut obj, &ops)
                    .map_err(|e| ApiError::new(422, "Invalid", format!("{e}")))?;
            }
            "application/merge-patch+json"
            | "application/strategic-merge-patch+json"
            | "application/apply-patch+yaml" => {
                json_patch::merge(&mut obj, &patch);
            }
            other => {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {other})"),
                ));
            }
        }
        // A patch that sets metadata.resourceVersion is a precondition on it: `replace`
        // answers 409 Conflict unless it is the current one.
        store.replace(kind, namespace, name, obj)
    })
}

/// The object as the client asked for it: whole, or only its metadata.
pub(crate) fn render(obj: &Value, meta_only: bool) -> Value {
    if meta_only {
        json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": obj["metadata"],
        })
    } else {
        obj.clone()
    }
}

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))
}

fn check_namespace(obj: &Value, namespace: &str) -> Result<(), ApiError> {
    match obj["metadata"]["namespace"].as_str() {
        Some(ns) if !ns.is_empty() && ns != namespace => Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the \
             request",
        )),
        _ => Ok(()),
    }
}

pub(crate) fn json_response(code: u16, value: &Value) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("JSON values serialize");
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(body))
        .expect("valid response")
}

fn text_response(code: u16, text: &'static str) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(full(text))
        .expect("valid response")
}

fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}
