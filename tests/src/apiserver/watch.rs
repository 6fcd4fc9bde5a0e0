//! WATCH: a chunked `application/json` response of newline-delimited watch events.

use std::{
    collections::{HashMap, VecDeque},
    io,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::{Response, body::Frame, header};
use serde_json::{Value, json};
use tokio::{
    sync::watch,
    time::{Instant, Interval, MissedTickBehavior},
};

use super::{
    Shared,
    http::{Body, render},
    selector::Filter,
    store::{ApiError, ChangeType, Store},
};

/// The default `timeoutSeconds` of the apiserver is randomised in [30 min, 60 min).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

/// Answers a watch request: `resourceVersion` is where the stream starts (after it),
/// `timeoutSeconds` when it ends, `allowWatchBookmarks` whether BOOKMARKs are sent,
/// `sendInitialEvents=true` asks for the current state first (streaming list).
pub(crate) fn serve(
    shared: &Arc<Shared>,
    filter: Filter,
    query: &HashMap<String, String>,
    meta_only: bool,
) -> Result<Response<Body>, ApiError> {
    let flag = |name: &str| query.get(name).is_some_and(|v| v == "true" || v == "1");
    let bookmarks = flag("allowWatchBookmarks");
    let send_initial = flag("sendInitialEvents");
    let timeout = match query.get("timeoutSeconds").filter(|v| !v.is_empty()) {
        Some(t) => Duration::from_secs(t.parse().map_err(|_| {
            ApiError::bad_request(format!("invalid value for timeoutSeconds: {t}"))
        })?),
        None => DEFAULT_TIMEOUT,
    };
    let rv = query.get("resourceVersion").map_or("", String::as_str);
    let start = match rv {
        "" | "0" => None,
        rv => Some(
            rv.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv}")))?,
        ),
    };
    if send_initial && !bookmarks {
        return Err(ApiError::new(
            422,
            "Invalid",
            "allowWatchBookmarks: Required value: allowWatchBookmarks must be set to true when \
             sendInitialEvents is set",
        ));
    }
    shared.watches.fetch_add(1, Ordering::Relaxed);

    let period = shared.options.bookmark_interval;
    let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut stream = WatchStream {
        shared: Arc::clone(shared),
        filter,
        cursor: 0,
        pending: VecDeque::new(),
        rv_rx: shared.rv_tx.subscribe(),
        epoch_rx: shared.epoch_tx.subscribe(),
        bookmarks,
        meta_only,
        ticker,
        deadline: Instant::now() + timeout,
        done: false,
        _open: OpenWatch::new(shared),
    };
    {
        let store = shared.lock_store();
        match start {
            Some(start) if start < store.oldest_watchable => {
                shared.expired.fetch_add(1, Ordering::Relaxed);
                stream.push_expired(start, &store);
            }
            Some(start) => {
                stream.cursor = start;
                stream.collect(&store);
            }
            None => {
                // "Get state and start at most recent": the current objects as ADDED events.
                let filter = &stream.filter;
                let current: Vec<Value> = store
                    .iter(filter.kind, filter.namespace.as_deref())
                    .filter(|(_, obj)| filter.matches(obj))
                    .map(|(_, obj)| obj.clone())
                    .collect();
                for obj in current {
                    stream.push_event("ADDED", obj);
                }
                stream.cursor = store.rv;
                if send_initial {
                    stream.push_bookmark(true);
                }
            }
        }
    }

    let body = StreamBody::new(futures::stream::unfold(stream, |mut s| async move {
        s.next_frame().await.map(|frame| (frame, s))
    }));
    Ok(Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed(body))
        .expect("valid watch response"))
}

struct WatchStream {
    shared: Arc<Shared>,
    filter: Filter,
    /// Every change up to this resourceVersion has been considered for the stream.
    cursor: u64,
    pending: VecDeque<Bytes>,
    rv_rx: watch::Receiver<u64>,
    epoch_rx: watch::Receiver<u64>,
    bookmarks: bool,
    /// Objects as `PartialObjectMetadata` (metadata-only watch).
    meta_only: bool,
    ticker: Interval,
    deadline: Instant,
    done: bool,
    _open: OpenWatch,
}

impl WatchStream {
    async fn next_frame(&mut self) -> Option<Result<Frame<Bytes>, io::Error>> {
        loop {
            if let Some(line) = self.pending.pop_front() {
                return Some(Ok(Frame::data(line)));
            }
            if self.done {
                return None;
            }
            tokio::select! {
                biased;
                _ = self.epoch_rx.changed() => {
                    // An error from the body makes hyper cut the connection without the
                    // last chunk: the client sees an unexpected EOF.
                    self.done = true;
                    return Some(Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "watch dropped by FakeApiServer::drop_watches",
                    )));
                }
                () = tokio::time::sleep_until(self.deadline) => {
                    // Like the apiserver, say how far the stream got before closing it.
                    self.collect_now();
                    if self.bookmarks && !self.done {
                        self.push_bookmark(false);
                    }
                    self.done = true;
                }
                changed = self.rv_rx.changed() => {
                    if changed.is_err() {
                        self.done = true;
                    } else {
                        self.collect_now();
                    }
                }
                _ = self.ticker.tick() => {
                    self.collect_now();
                    if self.bookmarks && !self.done {
                        self.push_bookmark(false);
                    }
                }
            }
        }
    }

    fn collect_now(&mut self) {
        let shared = Arc::clone(&self.shared);
        let store = shared.lock_store();
        self.collect(&store);
    }

    /// Queues the events after `cursor` that the filter selects.
    fn collect(&mut self, store: &Store) {
        if self.cursor < store.dropped_through {
            // Fell behind the retained history: the apiserver ends such a watch with 410.
            self.shared.expired.fetch_add(1, Ordering::Relaxed);
            self.push_expired(self.cursor, store);
            return;
        }
        let mut events = Vec::new();
        for change in store.changes_after(self.cursor) {
            if change.kind != self.filter.kind {
                continue;
            }
            let now = self.filter.matches(&change.object);
            let before = change.prev.as_ref().is_some_and(|p| self.filter.matches(p));
            let event = match (change.type_, before, now) {
                (ChangeType::Added, _, true) => ("ADDED", change.object.clone()),
                (ChangeType::Deleted, _, true) => ("DELETED", change.object.clone()),
                (ChangeType::Modified, true, true) => ("MODIFIED", change.object.clone()),
                (ChangeType::Modified, false, true) => ("ADDED", change.object.clone()),
                (ChangeType::Modified, true, false) => {
                    // Moved out of the selection: DELETED with the previous state at the new rv.
                    let mut prev = change.prev.clone().unwrap_or_default();
                    prev["metadata"]["resourceVersion"] = json!(change.rv.to_string());
                    ("DELETED", prev)
                }
                _ => continue,
            };
            events.push(event);
        }
        for (type_, object) in events {
            self.push_event(type_, object);
        }
        self.cursor = self.cursor.max(store.rv);
    }

    fn push_event(&mut self, type_: &str, object: Value) {
        let object = if self.meta_only {
            render(&object, true)
        } else {
            object
        };
        self.push_line(&json!({ "type": type_, "object": object }));
    }

    fn push_bookmark(&mut self, initial_events_end: bool) {
        let mut metadata = json!({
            "resourceVersion": self.cursor.to_string(),
            "creationTimestamp": null,
        });
        if initial_events_end {
            metadata["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
        }
        let object = json!({
            "kind": self.filter.kind.kind(),
            "apiVersion": self.filter.kind.api_version(),
            "metadata": metadata,
        });
        self.push_event("BOOKMARK", object);
    }

    /// A 200 stream whose only event is an ERROR with a 410 Expired `Status`.
    fn push_expired(&mut self, requested: u64, store: &Store) {
        let status = ApiError::expired(format!(
            "too old resource version: {requested} ({})",
            store.oldest_watchable
        ))
        .to_status();
        self.push_line(&json!({ "type": "ERROR", "object": status }));
        self.done = true;
    }

    fn push_line(&mut self, value: &Value) {
        let mut line = serde_json::to_vec(value).expect("JSON values serialize");
        line.push(b'\n');
        self.pending.push_back(Bytes::from(line));
    }
}

/// Counts a watch as open while its stream exists.
struct OpenWatch(Arc<Shared>);

impl OpenWatch {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.open_watches.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(shared))
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, Ordering::Relaxed);
    }
}
