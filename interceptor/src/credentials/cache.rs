//! The per-key cache with single-flight fetches and refresh ahead of expiry.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use ring::rand::{SecureRandom, SystemRandom};

use super::{
    Credentials, CredentialsError, RoleRequest,
    sts::{StsError, assume_role},
};

/// Timing of sessions and refreshes (see the module docs for the defaults' reasoning).
///
/// The cache takes these literally (tests use 900 s sessions refreshed within seconds),
/// except that a key is never refreshed more often than `min_refresh_interval`, so no
/// combination can make it call STS in a loop. [`Settings::for_session`] derives a
/// consistent set from `--iam-role-session-ttl`.
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
    /// Shortest pause between two successful refreshes of one key.
    pub min_refresh_interval: Duration,
    /// After an STS call for a key failed, requests for that key within this window get
    /// the same answer (cached credentials or the error) without calling STS again: during
    /// an outage or a refusal, pods retrying in a loop do not queue behind STS timeouts
    /// nor multiply the calls.
    pub error_hold: Duration,
    /// The longest a request waits for STS when nothing servable is cached: then it gets
    /// what a failure would give (cached credentials above the stale floor, else
    /// "unavailable", a 503) while the call goes on and stores its answer for the next
    /// request. Below the SDKs' 1 s metadata timeout, so a slow or retried STS call gives
    /// the pod a clear answer instead of a client timeout.
    pub request_wait: Duration,
}

/// The serve floor SDKs need: they refresh 15 minutes before expiry, and the Java SDK v1
/// refreshes on every call below that.
pub const SDK_REFRESH_WINDOW: Duration = Duration::from_secs(15 * 60);
/// STS's bounds for DurationSeconds (the upper one also needs the role's maximum).
pub const MIN_SESSION: Duration = Duration::from_secs(15 * 60);
pub const MAX_SESSION: Duration = Duration::from_secs(12 * 3600);
/// Time kept between the refresh point and the serve floor, for STS's latency and the
/// SDK's retries (10 s per operation) and the background refresher's own retries.
const REFRESH_MARGIN: Duration = Duration::from_secs(10 * 60);

impl Default for Settings {
    fn default() -> Self {
        Self::for_session(Duration::from_secs(3600))
    }
}

impl Settings {
    /// Settings for sessions of `ttl` (clamped to STS's 15 min ..= 12 h).
    ///
    /// Chosen so that a served credential always has at least the serve floor left, and
    /// that floor is the SDKs' 15-minute window whenever the session allows it:
    /// - serve floor: 15 min, or a third of the session when that is shorter (a 15-minute
    ///   session can never satisfy a 15-minute floor; serving it with 5 min left beats
    ///   calling STS on every request);
    /// - refresh lead: half the session, but at least 10 min above the floor (time for
    ///   STS retries), and at most two thirds of the session, so refreshes stay rare.
    ///
    /// At the default 1 h: refresh with 30 min left (the wait shortened by up to 10 %
    /// jitter), serve floor 15 min, so pods normally get 30 to 60 minutes.
    pub fn for_session(ttl: Duration) -> Self {
        let session = ttl.clamp(MIN_SESSION, MAX_SESSION);
        let serve_floor = SDK_REFRESH_WINDOW.min(session / 3);
        let refresh_lead = (session / 2)
            .max(serve_floor + REFRESH_MARGIN)
            .min(session * 2 / 3);
        Self {
            session_duration: session,
            refresh_lead,
            serve_floor,
            stale_floor: Duration::from_secs(2 * 60),
            retry_base: Duration::from_secs(1),
            min_refresh_interval: Duration::from_secs(60),
            error_hold: Duration::from_secs(5),
            request_wait: Duration::from_millis(800),
        }
    }
}

/// How long the refresher sleeps before refreshing credentials with `remaining` lifetime:
/// until `refresh_lead` is left, minus up to 10 % of that wait (`jitter` in 0..=1) so that
/// keys fetched together do not refresh together. Jitter shortens the wait and never the
/// lead, so short sessions are still refreshed in time; `min_refresh_interval` bounds the
/// rate whatever the settings.
pub(crate) fn refresh_wait(remaining: Duration, settings: &Settings, jitter: f64) -> Duration {
    let until = remaining.saturating_sub(settings.refresh_lead);
    let wait = until.saturating_sub(until.mul_f64(0.1 * jitter.clamp(0.0, 1.0)));
    wait.max(settings.min_refresh_interval)
}

/// The pause after the `failures`-th failed background refresh in a row: `retry_base`
/// doubling up to 1 min, plus up to one `retry_base` of jitter (`jitter` in 0..=1).
pub(crate) fn retry_wait(failures: u32, settings: &Settings, jitter: f64) -> Duration {
    let backoff = settings
        .retry_base
        .saturating_mul(2u32.saturating_pow(failures.min(6)));
    backoff.min(Duration::from_secs(60)) + settings.retry_base.mul_f64(jitter.clamp(0.0, 1.0))
}

/// The cache's time: the wall clock that credentials' lifetimes are measured on (STS
/// gives an absolute expiry), a monotonic clock for the error hold, and the background
/// refresher's pauses. The agent uses [`SystemClock`]; tests inject a clock they advance
/// by hand, so that when a refresh happens and how long a failure is held are asserted
/// by value instead of by waiting for real seconds. STS calls themselves (and the SDK's
/// own retries and the `request_wait` bound) always run on real time.
pub trait Clock: Send + Sync + 'static {
    /// The wall-clock time now.
    fn now(&self) -> SystemTime;
    /// Monotonic time since an arbitrary origin of this clock.
    fn monotonic(&self) -> Duration;
    /// Completes once `duration` has passed on this clock.
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// The real clocks: `SystemTime`, `Instant` and tokio's timers.
#[derive(Debug)]
pub struct SystemClock {
    origin: Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn monotonic(&self) -> Duration {
        self.origin.elapsed()
    }

    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(tokio::time::sleep(duration))
    }
}

/// Everything that changes STS's answer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub request: RoleRequest,
    pub duration: Duration,
}

/// Counters for metrics and tests (the agent copies them into its Prometheus registry).
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Requests served from memory.
    pub hits: AtomicU64,
    /// Requests that called STS (once per single-flight group).
    pub misses: AtomicU64,
    pub prefetches: AtomicU64,
    /// Prefetches whose pod was gone when their turn came (no STS call).
    pub prefetches_dropped: AtomicU64,
    /// Background refresh attempts, and the successful ones.
    pub refreshes: AtomicU64,
    pub refreshes_ok: AtomicU64,
    pub sts_calls: AtomicU64,
    pub sts_errors: AtomicU64,
    /// `sts_errors` by cause: throttled, other transient (5xx, timeouts, connection) and
    /// refused (AccessDenied and other client errors).
    pub sts_throttled: AtomicU64,
    pub sts_unavailable: AtomicU64,
    pub sts_refused: AtomicU64,
    /// Sum of the STS calls' durations, in microseconds (count: `sts_calls`).
    pub sts_micros: AtomicU64,
    /// Requests answered with cached credentials below the serve floor while STS failed.
    pub stale_served: AtomicU64,
    /// Requests answered from a recent failure without calling STS (`error_hold`).
    pub held: AtomicU64,
    /// Requests answered before STS did (`request_wait`), the call going on.
    pub waited_out: AtomicU64,
    /// Requests and prefetches that waited for another's STS call for the same key and
    /// took its credentials (single flight): neither a hit nor a call of their own.
    pub coalesced: AtomicU64,
    /// Slots evicted because their pod asked for more than [`SLOTS_PER_POD`].
    pub evicted: AtomicU64,
}

impl CacheStats {
    /// Every counter with a metric-friendly name.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        [
            ("hits", &self.hits),
            ("misses", &self.misses),
            ("prefetches", &self.prefetches),
            ("prefetches_dropped", &self.prefetches_dropped),
            ("refreshes", &self.refreshes),
            ("refreshes_ok", &self.refreshes_ok),
            ("sts_calls", &self.sts_calls),
            ("sts_errors", &self.sts_errors),
            ("sts_throttled", &self.sts_throttled),
            ("sts_unavailable", &self.sts_unavailable),
            ("sts_refused", &self.sts_refused),
            ("sts_micros", &self.sts_micros),
            ("stale_served", &self.stale_served),
            ("held", &self.held),
            ("waited_out", &self.waited_out),
            ("coalesced", &self.coalesced),
            ("evicted", &self.evicted),
        ]
        .into_iter()
        .map(|(name, value)| (name, value.load(Ordering::Relaxed)))
        .collect()
    }
}

fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Default)]
struct Slot {
    /// Order of creation among all slots (a counter): the oldest of a pod's slots is the
    /// one evicted when it asks for one more than [`SLOTS_PER_POD`].
    created: u64,
    current: Mutex<Option<Arc<Credentials>>>,
    /// Held while calling STS for this key: concurrent askers wait here and then find
    /// the fresh credentials, so one STS call serves them all.
    fetching: tokio::sync::Mutex<()>,
    /// A background refresher is running for this slot.
    refreshing: Mutex<bool>,
    /// The last STS failure for this key (with [`Clock::monotonic`] at the time), until
    /// a success.
    failed: Mutex<Option<(Duration, CredentialsError)>>,
    /// Signalled when the key is forgotten: its refresher stops at once rather than
    /// sleeping until the next refresh with the credentials in memory.
    forgotten: tokio::sync::Notify,
}

impl Slot {
    fn current(&self) -> Option<Arc<Credentials>> {
        locked(&self.current).clone()
    }

    fn store(&self, credentials: Arc<Credentials>) {
        *locked(&self.current) = Some(credentials);
        *locked(&self.failed) = None;
    }

    /// The key is no longer wanted: drop the credentials and stop the refresher (a
    /// permit is stored if it is not waiting right now).
    fn discard(&self) {
        *locked(&self.current) = None;
        self.forgotten.notify_one();
    }

    fn record_failure(&self, error: &CredentialsError, at: Duration) {
        *locked(&self.failed) = Some((at, error.clone()));
    }

    /// The failure of an STS call made less than `hold` before `now` (monotonic).
    fn recent_failure(&self, hold: Duration, now: Duration) -> Option<CredentialsError> {
        locked(&self.failed)
            .as_ref()
            .filter(|(at, _)| now.saturating_sub(*at) < hold)
            .map(|(_, error)| error.clone())
    }
}

/// Slots (cached credentials, each with its refresher and STS calls) one pod may hold.
/// A pod's key changes with its role or its `iam.amazonaws.com/external-id` annotation,
/// and the old key stays until the pod is deleted: a pod changing its external id in a
/// loop would otherwise grow the cache and the refreshers without bound. Four covers a
/// role change and an external id change overlapping; a fifth evicts the oldest (its
/// refresher stops). Counted by session name, which names the pod (namespace and name),
/// or a container that has a role of its own.
pub(crate) const SLOTS_PER_POD: usize = 4;

pub struct CredentialCache {
    client: aws_sdk_sts::Client,
    settings: Settings,
    clock: Arc<dyn Clock>,
    slots: Mutex<HashMap<Key, Arc<Slot>>>,
    /// Source of [`Slot::created`].
    next_slot: std::sync::atomic::AtomicU64,
    stats: Arc<CacheStats>,
    /// Prefetches calling STS at once ([`PREFETCH_CONCURRENCY`]).
    prefetching: Arc<tokio::sync::Semaphore>,
}

/// At most this many prefetches call STS at once. An agent starting on a node with 250
/// pods otherwise opened 250 STS connections together: a burst STS may throttle, and
/// buffers the allocator keeps (cargo xtask bench: 33.5 MiB RSS at 250 pods, 27 with it).
/// Requests never wait for this: they call STS themselves (single flight).
pub const PREFETCH_CONCURRENCY: usize = 8;

/// A random fraction in 0..=1 (0 if the system RNG fails: no jitter, still correct).
fn random_fraction() -> f64 {
    let mut bytes = [0u8; 4];
    if SystemRandom::new().fill(&mut bytes).is_err() {
        return 0.0;
    }
    f64::from(u32::from_ne_bytes(bytes)) / f64::from(u32::MAX)
}

impl CredentialCache {
    pub fn new(client: aws_sdk_sts::Client, settings: Settings) -> Arc<Self> {
        Self::with_clock(client, settings, Arc::new(SystemClock::default()))
    }

    /// A cache on `clock` instead of the system's (tests advance time by hand).
    pub fn with_clock(
        client: aws_sdk_sts::Client,
        settings: Settings,
        clock: Arc<dyn Clock>,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            settings,
            clock,
            slots: Mutex::default(),
            next_slot: std::sync::atomic::AtomicU64::new(0),
            stats: Arc::default(),
            prefetching: Arc::new(tokio::sync::Semaphore::new(PREFETCH_CONCURRENCY)),
        })
    }

    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The cache key of `request`: the request and the session duration.
    pub fn key(&self, request: &RoleRequest) -> Key {
        Key {
            request: request.clone(),
            duration: self.settings.session_duration,
        }
    }

    /// The slot of `key`, created if needed; creating one beyond [`SLOTS_PER_POD`] for
    /// the same pod evicts that pod's oldest slot (credentials dropped, refresher stopped).
    fn slot(&self, key: &Key) -> Arc<Slot> {
        let mut slots = locked(&self.slots);
        if let Some(slot) = slots.get(key) {
            return Arc::clone(slot);
        }
        let pod = &key.request.session_name;
        let mut same_pod: Vec<(u64, Key)> = slots
            .iter()
            .filter(|(other, _)| other.request.session_name == *pod)
            .map(|(other, slot)| (slot.created, other.clone()))
            .collect();
        if same_pod.len() >= SLOTS_PER_POD {
            same_pod.sort_unstable_by_key(|(created, _)| *created);
            for (_, oldest) in &same_pod[..=same_pod.len() - SLOTS_PER_POD] {
                if let Some(evicted) = slots.remove(oldest) {
                    evicted.discard();
                    self.stats.evicted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let slot = Arc::new(Slot {
            created: self.next_slot.fetch_add(1, Ordering::Relaxed),
            ..Slot::default()
        });
        slots.insert(key.clone(), Arc::clone(&slot));
        slot
    }

    /// Keys cached now.
    pub fn len(&self) -> usize {
        locked(&self.slots).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Cached credentials' expiry per key (never the secrets), for `/debug/store`.
    pub fn expiries(&self) -> Vec<(Key, Option<SystemTime>)> {
        let slots = locked(&self.slots);
        slots
            .iter()
            .map(|(key, slot)| (key.clone(), slot.current().map(|c| c.expiration)))
            .collect()
    }

    /// Forgets every key `wanted` rejects (no pod on the node needs it any more); their
    /// credentials are dropped and their refreshers stop.
    pub fn retain(&self, wanted: impl Fn(&Key) -> bool) {
        locked(&self.slots).retain(|key, slot| {
            let keep = wanted(key);
            if !keep {
                slot.discard();
            }
            keep
        });
    }

    /// Forgets `request`'s credentials (its pod is gone).
    pub fn forget(&self, request: &RoleRequest) {
        let key = self.key(request);
        if let Some(slot) = locked(&self.slots).remove(&key) {
            slot.discard();
        }
    }

    /// Whether `slot` is still the one cached for `key` (not forgotten, not replaced).
    fn wanted(&self, key: &Key, slot: &Arc<Slot>) -> bool {
        locked(&self.slots)
            .get(key)
            .is_some_and(|cached| Arc::ptr_eq(cached, slot))
    }

    fn fresh(&self, slot: &Slot) -> Option<Arc<Credentials>> {
        slot.current()
            .filter(|current| current.remaining(self.clock.now()) > self.settings.serve_floor)
    }

    /// Credentials for a pod's request: from memory when they have more than the serve
    /// floor left, else from STS (one call however many ask at once), waiting for STS at
    /// most `request_wait`; the call then goes on in the background.
    pub async fn get(
        self: &Arc<Self>,
        request: &RoleRequest,
    ) -> Result<Arc<Credentials>, CredentialsError> {
        let key = self.key(request);
        let slot = self.slot(&key);
        if let Some(current) = self.fresh(&slot) {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(current);
        }
        let (cache, owned) = (Arc::clone(self), Arc::clone(&slot));
        let call = tokio::spawn(async move { cache.get_waiting(&key, &owned).await });
        match tokio::time::timeout(self.settings.request_wait, call).await {
            Ok(Ok(result)) => result,
            Ok(Err(join_error)) => Err(CredentialsError::Unavailable {
                role: request.role_arn.to_string(),
                reason: format!("the STS call ended abnormally: {join_error}"),
            }),
            Err(_) => {
                self.stats.waited_out.fetch_add(1, Ordering::Relaxed);
                let error = CredentialsError::Unavailable {
                    role: request.role_arn.to_string(),
                    reason: format!(
                        "STS has not answered within {:?}; still trying",
                        self.settings.request_wait
                    ),
                };
                self.fallback(&slot, error)
            }
        }
    }

    /// [`get`](Self::get) without the bound on the wait (prefetch, and the call a
    /// request leaves running), for the slot the caller looked up: looking it up again
    /// here would cache the key anew if it was forgotten meanwhile (its pod deleted).
    async fn get_waiting(
        self: &Arc<Self>,
        key: &Key,
        slot: &Arc<Slot>,
    ) -> Result<Arc<Credentials>, CredentialsError> {
        // Both callers found the slot without fresh credentials: if it has them now, they
        // came from another call (before the lock, or while we waited for it).
        if let Some(current) = self.fresh(slot) {
            self.stats.coalesced.fetch_add(1, Ordering::Relaxed);
            return Ok(current);
        }
        let _fetching = slot.fetching.lock().await;
        if let Some(current) = self.fresh(slot) {
            self.stats.coalesced.fetch_add(1, Ordering::Relaxed);
            return Ok(current);
        }
        if let Some(error) = slot.recent_failure(self.settings.error_hold, self.clock.monotonic()) {
            self.stats.held.fetch_add(1, Ordering::Relaxed);
            return self.fallback(slot, error);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        match self.fetch(key).await {
            Ok(fresh) => {
                slot.store(Arc::clone(&fresh));
                self.ensure_refresher(key, slot);
                Ok(fresh)
            }
            Err(error) => {
                slot.record_failure(&error, self.clock.monotonic());
                self.fallback(slot, error)
            }
        }
    }

    /// While STS fails, what is cached keeps flowing until shortly before it expires.
    /// A refusal is never papered over.
    fn fallback(
        &self,
        slot: &Slot,
        error: CredentialsError,
    ) -> Result<Arc<Credentials>, CredentialsError> {
        if let CredentialsError::Unavailable { .. } = error
            && let Some(current) = slot.current()
            && current.remaining(self.clock.now()) > self.settings.stale_floor
        {
            self.stats.stale_served.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%error, "STS unavailable; serving cached credentials");
            return Ok(current);
        }
        Err(error)
    }

    async fn fetch(&self, key: &Key) -> Result<Arc<Credentials>, CredentialsError> {
        self.stats.sts_calls.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = assume_role(&self.client, &key.request, key.duration).await;
        let elapsed = started.elapsed();
        self.stats.sts_micros.fetch_add(
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        tracing::debug!(role = %key.request.role_arn, ?elapsed, ok = result.is_ok(), "AssumeRole");
        result.map(Arc::new).map_err(|error| {
            self.stats.sts_errors.fetch_add(1, Ordering::Relaxed);
            let counter = match &error {
                StsError::Refused { .. } => &self.stats.sts_refused,
                StsError::Transient {
                    throttled: true, ..
                } => &self.stats.sts_throttled,
                StsError::Transient { .. } => &self.stats.sts_unavailable,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let role = key.request.role_arn.to_string();
            match error {
                StsError::Refused { code, message } => CredentialsError::Refused {
                    role,
                    code,
                    message,
                },
                StsError::Transient { reason, .. } => {
                    CredentialsError::Unavailable { role, reason }
                }
            }
        })
    }

    /// Starts fetching in the background (a pod with a role appeared), so its first
    /// request is served from memory. Already cached keys cost nothing.
    pub fn prefetch(self: &Arc<Self>, request: &RoleRequest) {
        let key = self.key(request);
        let slot = self.slot(&key);
        if self.fresh(&slot).is_some() {
            return;
        }
        self.stats.prefetches.fetch_add(1, Ordering::Relaxed);
        let (cache, prefetching) = (Arc::clone(self), Arc::clone(&self.prefetching));
        tokio::spawn(async move {
            // The semaphore is never closed; without a permit the prefetch still runs.
            let _permit = prefetching.acquire_owned().await.ok();
            // Queued behind other prefetches, the pod may have gone meanwhile: nothing to
            // fetch (and no STS call, no refresher) for a key that was forgotten.
            if !cache.wanted(&key, &slot) {
                cache
                    .stats
                    .prefetches_dropped
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            if let Err(error) = cache.get_waiting(&key, &slot).await {
                tracing::warn!(%error, "prefetch failed");
            }
        });
    }

    fn ensure_refresher(self: &Arc<Self>, key: &Key, slot: &Arc<Slot>) {
        {
            let mut running = locked(&slot.refreshing);
            if *running {
                return;
            }
            *running = true;
        }
        let (cache, key, slot) = (Arc::clone(self), key.clone(), Arc::clone(slot));
        tokio::spawn(async move { cache.refresh_loop(key, slot).await });
    }

    /// Refreshes `key` ahead of expiry ([`refresh_wait`]), retrying failures with backoff
    /// ([`retry_wait`]), until the key is no longer wanted or its credentials have expired
    /// and STS keeps failing.
    async fn refresh_loop(self: Arc<Self>, key: Key, slot: Arc<Slot>) {
        let mut failures = 0u32;
        while let Some(current) = slot.current() {
            let wait = if failures == 0 {
                refresh_wait(
                    current.remaining(self.clock.now()),
                    &self.settings,
                    random_fraction(),
                )
            } else {
                retry_wait(failures, &self.settings, random_fraction())
            };
            tokio::select! {
                () = self.clock.sleep(wait) => {}
                () = slot.forgotten.notified() => break,
            }
            if !self.wanted(&key, &slot) {
                break;
            }
            let _fetching = slot.fetching.lock().await;
            self.stats.refreshes.fetch_add(1, Ordering::Relaxed);
            match self.fetch(&key).await {
                Ok(fresh) => {
                    slot.store(fresh);
                    self.stats.refreshes_ok.fetch_add(1, Ordering::Relaxed);
                    failures = 0;
                }
                Err(error) => {
                    slot.record_failure(&error, self.clock.monotonic());
                    failures = failures.saturating_add(1);
                    tracing::warn!(%error, failures, "refresh failed; retrying");
                    if current.remaining(self.clock.now()).is_zero() && failures > 10 {
                        break;
                    }
                }
            }
        }
        *locked(&slot.refreshing) = false;
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    fn cache() -> Arc<CredentialCache> {
        // Never called: slots are created without asking STS.
        let config = aws_sdk_sts::Config::builder()
            .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
            .region(aws_sdk_sts::config::Region::new("us-east-1"))
            .build();
        CredentialCache::new(aws_sdk_sts::Client::from_conf(config), Settings::default())
    }

    fn request(pod: &str, external_id: usize) -> RoleRequest {
        RoleRequest {
            role_arn: "arn:aws:iam::123456789012:role/app".into(),
            external_id: Some(format!("id-{external_id}").into()),
            session_name: pod.into(),
            ..RoleRequest::default()
        }
    }

    #[test]
    fn a_pod_changing_its_external_id_holds_a_bounded_number_of_slots() {
        let cache = cache();
        let other = cache.slot(&cache.key(&request("ns.other", 0)));
        let mut slots = Vec::new();
        for id in 0..10 {
            slots.push(cache.slot(&cache.key(&request("ns.churn", id))));
        }
        assert_eq!(
            cache.len(),
            SLOTS_PER_POD + 1,
            "the churning pod's slots, plus the other pod's"
        );
        assert_eq!(
            cache.stats.evicted.load(Ordering::Relaxed),
            10 - SLOTS_PER_POD as u64
        );
        for (id, slot) in slots.iter().enumerate() {
            let kept = id >= 10 - SLOTS_PER_POD;
            assert_eq!(
                cache.wanted(&cache.key(&request("ns.churn", id)), slot),
                kept,
                "slot {id}: the newest {SLOTS_PER_POD} are kept"
            );
            // An evicted slot's refresher was told to stop (a stored permit).
            assert_eq!(
                slot.forgotten.notified().now_or_never().is_some(),
                !kept,
                "slot {id}"
            );
        }
        assert!(cache.wanted(&cache.key(&request("ns.other", 0)), &other));
    }
}
