//! Kubernetes Events on pods, for refusals an operator can act on ("role X not allowed in
//! namespace Y", "AccessDenied assuming role X").
//!
//! A retrying SDK asks several times a second; the API server must not see that. Events
//! are rate-limited twice: the same (pod, reason) at most once per `per_key_interval`,
//! and at most `burst` events per `window` for the whole agent. Posting never blocks a
//! request: it happens on a spawned task.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client,
    runtime::events::{Event, EventType, Recorder, Reporter},
};

use super::PodInfo;

/// What was done with a request to post an event (for tests and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Posted {
    Sent,
    /// The same event for the same pod was sent recently.
    Duplicate,
    /// The agent-wide budget is spent for now.
    Throttled,
    /// No API client (standalone mode): logged only.
    NoClient,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub per_key_interval: Duration,
    pub burst: u32,
    pub window: Duration,
    /// Keys remembered at most (oldest forgotten first).
    pub max_keys: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            per_key_interval: Duration::from_secs(60),
            burst: 20,
            window: Duration::from_secs(10),
            max_keys: 4096,
        }
    }
}

struct State {
    last: HashMap<(String, &'static str), Instant>,
    window_start: Instant,
    in_window: u32,
}

/// Posts rate-limited Events on pods.
#[derive(Clone)]
pub struct EventSink {
    recorder: Option<Recorder>,
    limits: Limits,
    state: Arc<Mutex<State>>,
}

impl EventSink {
    /// `client: None` (standalone mode) only rate-limits and logs.
    pub fn new(client: Option<Client>, instance: Option<String>, limits: Limits) -> Self {
        let reporter = Reporter {
            controller: "interceptor".into(),
            instance,
        };
        Self {
            recorder: client.map(|client| Recorder::new(client, reporter)),
            limits,
            state: Arc::new(Mutex::new(State {
                last: HashMap::new(),
                window_start: Instant::now(),
                in_window: 0,
            })),
        }
    }

    /// Decides whether this event may go out now, and records that it did.
    fn admit(&self, uid: &str, reason: &'static str, now: Instant) -> Posted {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (uid.to_owned(), reason);
        if state
            .last
            .get(&key)
            .is_some_and(|last| now.duration_since(*last) < self.limits.per_key_interval)
        {
            return Posted::Duplicate;
        }
        if now.duration_since(state.window_start) >= self.limits.window {
            state.window_start = now;
            state.in_window = 0;
        }
        if state.in_window >= self.limits.burst {
            return Posted::Throttled;
        }
        state.in_window += 1;
        if state.last.len() >= self.limits.max_keys {
            let interval = self.limits.per_key_interval;
            state
                .last
                .retain(|_, last| now.duration_since(*last) < interval);
            if state.last.len() >= self.limits.max_keys {
                state.last.clear();
            }
        }
        state.last.insert(key, now);
        if self.recorder.is_some() {
            Posted::Sent
        } else {
            Posted::NoClient
        }
    }

    /// A Warning event on `pod`. `reason` is a short PascalCase word
    /// (`RoleNotAllowed`, `AssumeRoleFailed`, ...); `message` says what to do.
    pub fn warn(&self, pod: &PodInfo, reason: &'static str, message: String) -> Posted {
        let posted = self.admit(&pod.uid, reason, Instant::now());
        if posted != Posted::Sent {
            return posted;
        }
        let Some(recorder) = self.recorder.clone() else {
            return Posted::NoClient;
        };
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod.name.clone()),
            namespace: Some(pod.namespace.clone()),
            uid: Some(pod.uid.clone()),
            ..ObjectReference::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(message),
            action: "ServeCredentials".into(),
            secondary: None,
        };
        let pod_key = pod.key();
        tokio::spawn(async move {
            if let Err(error) = recorder.publish(&event, &reference).await {
                tracing::warn!(pod = %pod_key, %error, "could not post an Event");
            }
        });
        Posted::Sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink(limits: Limits) -> EventSink {
        EventSink::new(None, None, limits)
    }

    #[test]
    fn the_same_event_for_the_same_pod_is_sent_once_per_interval() {
        let sink = sink(Limits::default());
        let now = Instant::now();
        assert_eq!(sink.admit("u1", "RoleNotAllowed", now), Posted::NoClient);
        assert_eq!(
            sink.admit("u1", "RoleNotAllowed", now + Duration::from_secs(1)),
            Posted::Duplicate
        );
        assert_eq!(sink.admit("u1", "AssumeRoleFailed", now), Posted::NoClient);
        assert_eq!(sink.admit("u2", "RoleNotAllowed", now), Posted::NoClient);
        assert_eq!(
            sink.admit("u1", "RoleNotAllowed", now + Duration::from_secs(61)),
            Posted::NoClient
        );
    }

    #[test]
    fn the_agent_wide_budget_caps_a_flood() {
        let sink = sink(Limits {
            burst: 3,
            ..Limits::default()
        });
        let now = Instant::now();
        let posted: Vec<Posted> = (0..10)
            .map(|i| sink.admit(&format!("u{i}"), "X", now))
            .collect();
        assert_eq!(posted.iter().filter(|p| **p == Posted::NoClient).count(), 3);
        assert_eq!(
            posted.iter().filter(|p| **p == Posted::Throttled).count(),
            7
        );
        assert_eq!(
            sink.admit("u9", "X", now + Duration::from_secs(11)),
            Posted::NoClient
        );
    }

    #[test]
    fn remembered_keys_are_bounded() {
        let sink = sink(Limits {
            max_keys: 10,
            burst: 1000,
            ..Limits::default()
        });
        let now = Instant::now();
        for i in 0..100 {
            sink.admit(&format!("u{i}"), "X", now);
        }
        let state = sink.state.lock().unwrap();
        assert!(
            (1..=10).contains(&state.last.len()),
            "{} keys remembered",
            state.last.len()
        );
        assert!(
            state.last.contains_key(&("u99".to_owned(), "X")),
            "the newest key is remembered"
        );
    }
}
