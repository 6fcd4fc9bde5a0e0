//! The per-key cache with single-flight fetches and refresh ahead of expiry.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use ring::rand::{SecureRandom, SystemRandom};

use super::{
    Credentials, CredentialsError, RoleRequest,
    sts::{StsError, assume_role},
};

/// Timing of sessions and refreshes (see the module docs for the defaults' reasoning).
#[derive(Debug, Clone)]
pub struct Settings {
    /// DurationSeconds of each AssumeRole (STS: 900 s to the role's maximum).
    pub session_duration: Duration,
    /// Refresh in the background once less than this is left.
    pub refresh_lead: Duration,
    /// Never serve a credential with less than this left while STS answers.
    pub serve_floor: Duration,
    /// While STS fails, serve cached credentials until this is left.
    pub stale_floor: Duration,
    /// Pause between failed background refreshes (doubles, with jitter, up to 1 min).
    pub retry_base: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            session_duration: Duration::from_secs(3600),
            refresh_lead: Duration::from_secs(30 * 60),
            serve_floor: Duration::from_secs(15 * 60),
            stale_floor: Duration::from_secs(2 * 60),
            retry_base: Duration::from_secs(1),
        }
    }
}

/// Everything that changes STS's answer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub request: RoleRequest,
    pub duration: Duration,
}

/// Counters for metrics and tests.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub prefetches: AtomicU64,
    pub refreshes: AtomicU64,
    pub sts_calls: AtomicU64,
    pub sts_errors: AtomicU64,
    pub stale_served: AtomicU64,
}

#[derive(Default)]
struct Slot {
    current: Mutex<Option<Arc<Credentials>>>,
    /// Held while calling STS for this key: concurrent askers wait here and then find
    /// the fresh credentials, so one STS call serves them all.
    fetching: tokio::sync::Mutex<()>,
    /// A background refresher is running for this slot.
    refreshing: Mutex<bool>,
}

impl Slot {
    fn current(&self) -> Option<Arc<Credentials>> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn store(&self, credentials: Arc<Credentials>) {
        *self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(credentials);
    }
}

pub struct CredentialCache {
    client: aws_sdk_sts::Client,
    settings: Settings,
    slots: Mutex<HashMap<Key, Arc<Slot>>>,
    stats: Arc<CacheStats>,
}

fn jitter(max: Duration) -> Duration {
    let mut bytes = [0u8; 4];
    let _ = SystemRandom::new().fill(&mut bytes);
    let fraction = f64::from(u32::from_ne_bytes(bytes)) / f64::from(u32::MAX);
    max.mul_f64(fraction)
}

impl CredentialCache {
    pub fn new(client: aws_sdk_sts::Client, settings: Settings) -> Arc<Self> {
        Arc::new(Self {
            client,
            settings,
            slots: Mutex::default(),
            stats: Arc::default(),
        })
    }

    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn key(&self, request: &RoleRequest) -> Key {
        Key {
            request: request.clone(),
            duration: self.settings.session_duration,
        }
    }

    fn slot(&self, key: &Key) -> Arc<Slot> {
        let mut slots = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(slots.entry(key.clone()).or_default())
    }

    /// Keys cached now.
    pub fn len(&self) -> usize {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Cached credentials' expiry per key (never the secrets), for `/debug/store`.
    pub fn expiries(&self) -> Vec<(Key, Option<SystemTime>)> {
        let slots = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        slots
            .iter()
            .map(|(key, slot)| (key.clone(), slot.current().map(|c| c.expiration)))
            .collect()
    }

    /// Forgets every key `wanted` rejects (no pod on the node needs it any more); their
    /// refreshers stop at their next wake-up.
    pub fn retain(&self, wanted: impl Fn(&Key) -> bool) {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|key, _| wanted(key));
    }

    fn wanted(&self, key: &Key) -> bool {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(key)
    }

    /// Credentials for `request`: from memory when they have comfortable lifetime left,
    /// else from STS (one call however many ask at once).
    pub async fn get(
        self: &Arc<Self>,
        request: &RoleRequest,
    ) -> Result<Arc<Credentials>, CredentialsError> {
        let key = self.key(request);
        let slot = self.slot(&key);
        if let Some(current) = slot.current()
            && current.remaining(SystemTime::now()) > self.settings.serve_floor
        {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(current);
        }
        let _fetching = slot.fetching.lock().await;
        if let Some(current) = slot.current()
            && current.remaining(SystemTime::now()) > self.settings.serve_floor
        {
            // Fetched by whoever held the lock before us.
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(current);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        match self.fetch(&key).await {
            Ok(fresh) => {
                slot.store(Arc::clone(&fresh));
                self.ensure_refresher(&key, &slot);
                Ok(fresh)
            }
            Err(error) => self.fallback(&slot, error),
        }
    }

    /// While STS fails, what is cached keeps flowing until shortly before it expires.
    fn fallback(
        &self,
        slot: &Slot,
        error: CredentialsError,
    ) -> Result<Arc<Credentials>, CredentialsError> {
        if let CredentialsError::Unavailable { .. } = error
            && let Some(current) = slot.current()
            && current.remaining(SystemTime::now()) > self.settings.stale_floor
        {
            self.stats.stale_served.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%error, "STS unavailable; serving cached credentials");
            return Ok(current);
        }
        Err(error)
    }

    async fn fetch(&self, key: &Key) -> Result<Arc<Credentials>, CredentialsError> {
        self.stats.sts_calls.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let result = assume_role(&self.client, &key.request, key.duration).await;
        tracing::debug!(role = %key.request.role_arn, elapsed = ?started.elapsed(), ok = result.is_ok(), "AssumeRole");
        result.map(Arc::new).map_err(|error| {
            self.stats.sts_errors.fetch_add(1, Ordering::Relaxed);
            let role = key.request.role_arn.clone();
            match error {
                StsError::Refused { code, message } => CredentialsError::Refused {
                    role,
                    code,
                    message,
                },
                StsError::Transient { reason } => CredentialsError::Unavailable { role, reason },
            }
        })
    }

    /// Starts fetching in the background (a pod with a role appeared), so its first
    /// request is served from memory.
    pub fn prefetch(self: &Arc<Self>, request: RoleRequest) {
        self.stats.prefetches.fetch_add(1, Ordering::Relaxed);
        let cache = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(error) = cache.get(&request).await {
                tracing::warn!(%error, "prefetch failed");
            }
        });
    }

    fn ensure_refresher(self: &Arc<Self>, key: &Key, slot: &Arc<Slot>) {
        {
            let mut running = slot
                .refreshing
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if *running {
                return;
            }
            *running = true;
        }
        let (cache, key, slot) = (Arc::clone(self), key.clone(), Arc::clone(slot));
        tokio::spawn(async move { cache.refresh_loop(key, slot).await });
    }

    /// Refreshes `key` whenever less than `refresh_lead` (plus jitter) is left, until the
    /// key is no longer wanted.
    async fn refresh_loop(self: Arc<Self>, key: Key, slot: Arc<Slot>) {
        let mut failures = 0u32;
        while let Some(current) = slot.current() {
            let wait = if failures == 0 {
                // Until `refresh_lead` is left, minus up to 10 % of that wait so that
                // keys fetched together do not refresh together.
                let until = current
                    .remaining(SystemTime::now())
                    .saturating_sub(self.settings.refresh_lead);
                until.saturating_sub(jitter(until / 10))
            } else {
                let backoff = self.settings.retry_base * 2u32.saturating_pow(failures.min(6));
                backoff.min(Duration::from_secs(60)) + jitter(self.settings.retry_base)
            };
            tokio::time::sleep(wait).await;
            if !self.wanted(&key) {
                break;
            }
            let _fetching = slot.fetching.lock().await;
            self.stats.refreshes.fetch_add(1, Ordering::Relaxed);
            match self.fetch(&key).await {
                Ok(fresh) => {
                    slot.store(fresh);
                    failures = 0;
                }
                Err(error) => {
                    failures += 1;
                    tracing::warn!(%error, failures, "refresh failed; retrying");
                    if current.remaining(SystemTime::now()).is_zero() && failures > 10 {
                        break;
                    }
                }
            }
        }
        *slot
            .refreshing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = false;
    }
}
