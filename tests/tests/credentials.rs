//! The credentials cache against moto's real STS server (through a counting, fault
//! injecting forwarder): identity and session as STS reports them, prefetch, single
//! flight, refresh, outages, throttling and refusals (injected, and by moto checking the
//! agent's IAM policy).

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime},
};

use interceptor::credentials::{
    Clock, CredentialCache, Credentials, CredentialsError, RoleRequest, Settings, StsConfig,
    session_name, sts_client,
};
use interceptor_tests::{
    clock::ManualClock,
    moto::MotoServer,
    objects::wait_for,
    sts_proxy::{Fault, StsProxy},
};

fn agent_credentials() -> aws_credential_types::Credentials {
    aws_credential_types::Credentials::new(
        "AKIANODEEXAMPLE00001",
        "node-secret",
        None,
        None,
        "test",
    )
}

async fn cache(proxy: &StsProxy, settings: Settings) -> Arc<CredentialCache> {
    CredentialCache::new(client(proxy).await, settings)
}

/// A cache whose lifetimes, holds and refresh pauses run on `clock` (STS calls and the
/// SDK's retries stay on real time).
async fn cache_on(
    proxy: &StsProxy,
    settings: Settings,
    clock: &Arc<ManualClock>,
) -> Arc<CredentialCache> {
    CredentialCache::with_clock(client(proxy).await, settings, Arc::clone(clock) as _)
}

async fn client(proxy: &StsProxy) -> aws_sdk_sts::Client {
    sts_client(&StsConfig {
        endpoint: Some(proxy.endpoint()),
        region: Some("us-east-1".into()),
        agent_credentials: Some(agent_credentials()),
        ..StsConfig::default()
    })
    .await
}

/// The one pause the refresher is in, once it is in it (after `refreshes` refreshes).
async fn refresher_pause(clock: &ManualClock, cache: &CredentialCache, refreshes: u64) -> Duration {
    wait_for(
        &format!("the refresher to pause after {refreshes} refreshes"),
        Duration::from_secs(30),
        || match (counter(cache, "refreshes"), clock.sleeping().as_slice()) {
            (done, [pause]) if done == refreshes => Ok(*pause),
            (done, pauses) => Err(format!("{done} refreshes, pauses {pauses:?}")),
        },
    )
    .await
}

fn request(role: &str, pod: &str) -> RoleRequest {
    RoleRequest {
        role_arn: format!("arn:aws:iam::123456789012:role/{role}").into(),
        external_id: None,
        session_name: session_name("team-a", pod, None).into(),
        ..RoleRequest::default()
    }
}

/// GetCallerIdentity with the credentials themselves: who STS thinks they are.
async fn caller_arn(endpoint: &str, credentials: &Credentials) -> String {
    let client = sts_client(&StsConfig {
        endpoint: Some(endpoint.to_owned()),
        region: Some("us-east-1".into()),
        agent_credentials: Some(aws_credential_types::Credentials::new(
            credentials.access_key_id.clone(),
            credentials.secret_access_key.clone(),
            Some(credentials.session_token.clone()),
            None,
            "pod",
        )),
        ..StsConfig::default()
    })
    .await;
    let identity = client
        .get_caller_identity()
        .send()
        .await
        .expect("GetCallerIdentity");
    identity.arn.unwrap_or_default()
}

#[tokio::test]
async fn assumed_role_and_session_are_what_sts_reports() {
    let moto = MotoServer::start();
    moto.reset();
    let proxy = StsProxy::start(moto.addr()).await;
    let cache = cache(&proxy, Settings::default()).await;
    let credentials = cache
        .get(&request("role-a", "web-1"))
        .await
        .expect("credentials");
    assert!(credentials.remaining(SystemTime::now()) > Duration::from_secs(50 * 60));
    assert_eq!(
        caller_arn(&moto.endpoint(), &credentials).await,
        "arn:aws:sts::123456789012:assumed-role/role-a/team-a.web-1"
    );
    assert_eq!(
        credentials.assumed_role_arn,
        "arn:aws:sts::123456789012:assumed-role/role-a/team-a.web-1"
    );
    assert!(
        !format!("{credentials:?}").contains(&credentials.secret_access_key),
        "Debug leaks the secret"
    );
}

#[tokio::test]
async fn prefetch_makes_the_first_request_a_hit() {
    let moto = MotoServer::shared();
    let proxy = StsProxy::start(moto.addr()).await;
    let cache = cache(&proxy, Settings::default()).await;
    cache.prefetch(&request("role-a", "new-pod"));
    wait_for("the prefetch", Duration::from_secs(10), || {
        match proxy.count("AssumeRole") {
            1 if cache.expiries().iter().all(|(_, expiry)| expiry.is_some()) => Ok(()),
            n => Err(format!("{n} calls")),
        }
    })
    .await;
    cache.get(&request("role-a", "new-pod")).await.unwrap();
    assert_eq!(cache.stats().hits.load(Ordering::Relaxed), 1);
    assert_eq!(
        cache.stats().misses.load(Ordering::Relaxed),
        1,
        "the prefetch's"
    );
    assert_eq!(proxy.count("AssumeRole"), 1);
    // Prefetching what is cached costs nothing: it returns without starting a prefetch
    // (which would count one before it is spawned).
    cache.prefetch(&request("role-a", "new-pod"));
    assert_eq!(cache.stats().prefetches.load(Ordering::Relaxed), 1);
    assert_eq!(proxy.count("AssumeRole"), 1);
}

/// Prefetches beyond the concurrency limit queue; a pod deleted while its prefetch is
/// queued must not have its key cached again (nor a refresher calling STS for it until
/// the agent restarts). Found by the churn test: keys of deleted pods reappeared.
#[tokio::test]
async fn queued_prefetches_of_deleted_pods_cache_nothing() {
    let moto = MotoServer::shared();
    let proxy = StsProxy::start(moto.addr()).await;
    proxy.set_delay(Duration::from_millis(300));
    let cache = cache(&proxy, Settings::default()).await;
    let queued = 3 * interceptor::credentials::PREFETCH_CONCURRENCY;
    let pods: Vec<String> = (0..queued).map(|i| format!("gone-{i}")).collect();
    for pod in &pods {
        cache.prefetch(&request("role-a", pod));
    }
    // Every pod is deleted while the first prefetches are waiting for STS.
    let limit = interceptor::credentials::PREFETCH_CONCURRENCY as u64;
    wait_for(
        "the first prefetches",
        Duration::from_secs(5),
        || match proxy.count("AssumeRole") {
            n if n == limit => Ok(()),
            n => Err(format!("{n} calls")),
        },
    )
    .await;
    let deleted = |key: &interceptor::credentials::Key| !key.request.session_name.contains("gone-");
    cache.retain(deleted);
    assert_eq!(cache.len(), 0, "forgotten at once");
    // The queued prefetches get their turn only as the first ones finish (the limit's
    // permits), and each finds its pod gone.
    let queued_behind = (queued - interceptor::credentials::PREFETCH_CONCURRENCY) as u64;
    wait_for(
        "the queued prefetches to find their pods gone",
        Duration::from_secs(10),
        || match counter(&cache, "prefetches_dropped") {
            n if n == queued_behind => Ok(()),
            n => Err(format!("{n} dropped")),
        },
    )
    .await;
    assert_eq!(
        cache.len(),
        0,
        "no prefetch cached a deleted pod's key again"
    );
    assert_eq!(
        proxy.count("AssumeRole"),
        limit,
        "only the prefetches already under way when the pods went called STS"
    );
}

#[tokio::test]
async fn concurrent_requests_make_one_call_per_key() {
    let moto = MotoServer::shared();
    let proxy = StsProxy::start(moto.addr()).await;
    proxy.set_delay(Duration::from_millis(200));
    // What is counted is calls, not time: a request waits for the one call in flight as
    // long as it takes (a loaded machine's moto can take longer than the agent's 800 ms).
    let settings = Settings {
        request_wait: Duration::from_secs(30),
        ..Settings::default()
    };
    let cache = cache(&proxy, settings).await;
    let mut tasks = Vec::new();
    for task in 0..30 {
        let cache = cache.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..5 {
                let key = request(&format!("role-{}", task % 3), "shared");
                cache.get(&key).await.expect("credentials");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(
        proxy.count("AssumeRole"),
        3,
        "30 tasks x 5 requests for 3 keys"
    );
    // Each key's first call is a miss; the requests that waited for it are counted as
    // such, not as hits (the 200 ms call is long enough for the first round to wait).
    let (misses, coalesced) = (counter(&cache, "misses"), counter(&cache, "coalesced"));
    assert_eq!(misses, 3);
    assert!(coalesced > 0, "no request waited for a call in flight");
    assert_eq!(counter(&cache, "hits") + coalesced, 147);
    // An external id is part of the key: another pod's external id never shares.
    let mut with_id = request("role-0", "shared");
    with_id.external_id = Some("tenant-42".into());
    let a = cache.get(&with_id).await.unwrap();
    let b = cache.get(&request("role-0", "shared")).await.unwrap();
    assert_ne!(a.access_key_id, b.access_key_id);
    assert_eq!(proxy.count("AssumeRole"), 4);
}

/// STS slower than `request_wait`: the request is answered "unavailable, still trying"
/// rather than held past the SDKs' timeout, the one call goes on, and the next request is
/// a hit without another call.
#[tokio::test]
async fn a_slow_sts_call_outlives_the_request_that_started_it() {
    let moto = MotoServer::shared();
    let proxy = StsProxy::start(moto.addr()).await;
    proxy.set_delay(Duration::from_secs(2));
    let cache = cache(
        &proxy,
        Settings {
            request_wait: Duration::from_millis(300),
            ..Settings::default()
        },
    )
    .await;
    match cache.get(&request("role-a", "web")).await {
        Err(error @ CredentialsError::Unavailable { .. }) => {
            let text = error.to_string();
            assert!(
                text.contains("role-a") && text.contains("still trying"),
                "{text}"
            );
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(counter(&cache, "waited_out"), 1);
    // The call started by the first request completes in the background and stores its
    // answer: the next request is a hit.
    wait_for(
        "the call to complete",
        Duration::from_secs(15),
        || match cache.expiries().as_slice() {
            [(_, Some(_))] => Ok(()),
            seen => Err(format!("{seen:?}")),
        },
    )
    .await;
    cache
        .get(&request("role-a", "web"))
        .await
        .expect("served from memory");
    assert_eq!(counter(&cache, "hits"), 1);
    assert_eq!(counter(&cache, "misses"), 1);
    assert_eq!(
        proxy.count("AssumeRole"),
        1,
        "one call served both requests"
    );
}

fn counter(cache: &CredentialCache, name: &str) -> u64 {
    cache
        .stats()
        .counters()
        .into_iter()
        .find(|(counter, _)| *counter == name)
        .map(|(_, value)| value)
        .unwrap_or_else(|| panic!("no counter {name}"))
}

#[tokio::test]
async fn credentials_are_refreshed_before_they_expire() {
    let moto = MotoServer::shared();
    let proxy = StsProxy::start(moto.addr()).await;
    // The agent's own settings for 15-minute sessions (STS's minimum).
    let settings = Settings::for_session(Duration::from_secs(900));
    let clock = ManualClock::new();
    let cache = cache_on(&proxy, settings.clone(), &clock).await;
    let first = cache.get(&request("role-a", "web")).await.unwrap();
    // The refresher waits until the refresh lead is left, shortened by at most 10 %
    // jitter, and not a moment less than the minimum refresh interval.
    let pause = refresher_pause(&clock, &cache, 0).await;
    let until = first.remaining(clock.now()) - settings.refresh_lead;
    assert!(
        pause <= until && pause >= until.mul_f64(0.9) && pause >= settings.min_refresh_interval,
        "paused {pause:?}; {until:?} until the refresh lead"
    );
    // Until then requests are served from memory.
    clock.advance(pause - Duration::from_secs(1));
    let served = cache.get(&request("role-a", "web")).await.unwrap();
    assert_eq!(served.access_key_id, first.access_key_id);
    assert_eq!(proxy.count("AssumeRole"), 1);
    assert_eq!(counter(&cache, "refreshes"), 0);

    clock.advance(Duration::from_secs(1));
    let next = refresher_pause(&clock, &cache, 1).await;
    assert_eq!(counter(&cache, "refreshes_ok"), 1);
    let second = cache.get(&request("role-a", "web")).await.unwrap();
    assert_ne!(
        first.access_key_id, second.access_key_id,
        "refreshed credentials are served"
    );
    assert!(second.expiration > first.expiration);
    assert!(
        first.remaining(clock.now()) > settings.serve_floor,
        "refreshed before the old credentials fell below the serve floor"
    );
    assert_eq!(
        counter(&cache, "misses"),
        1,
        "the refresh, not the request, called STS"
    );
    assert_eq!(proxy.count("AssumeRole"), 2);
    assert!(next >= settings.min_refresh_interval, "{next:?}");

    // A key nobody needs any more is forgotten and its refresher stops: no pause is left
    // to wake it, so however far time moves no more calls are made.
    cache.forget(&request("role-a", "web"));
    assert!(cache.is_empty());
    wait_for(
        "the refresher to stop",
        Duration::from_secs(10),
        || match clock.sleeping().as_slice() {
            [] => Ok(()),
            pauses => Err(format!("{pauses:?}")),
        },
    )
    .await;
    clock.advance(Duration::from_secs(3600));
    tokio::task::yield_now().await;
    assert_eq!(proxy.count("AssumeRole"), 2);
    assert_eq!(counter(&cache, "refreshes"), 1);
}

#[tokio::test]
async fn outages_serve_cached_credentials_and_report_the_rest() {
    let moto = MotoServer::shared();
    let proxy = StsProxy::start(moto.addr()).await;
    // Every request wants fresher credentials than it has (serve floor just below the
    // session length, once the clock has moved), so each one calls STS: outages are
    // visible. The refresher waits 14 minutes, which this clock never reaches.
    let clock = ManualClock::new();
    let cache = cache_on(
        &proxy,
        Settings {
            session_duration: Duration::from_secs(900),
            refresh_lead: Duration::from_secs(60),
            serve_floor: Duration::from_secs(890),
            stale_floor: Duration::from_secs(60),
            error_hold: Duration::from_secs(2),
            // Each call's own retries are under test: requests wait for them.
            request_wait: Duration::from_secs(30),
            ..Settings::default()
        },
        &clock,
    )
    .await;
    let cached = cache.get(&request("role-a", "web")).await.unwrap();
    clock.advance(Duration::from_secs(20));

    proxy.set_fault(Fault::Unavailable);
    let during = cache
        .get(&request("role-a", "web"))
        .await
        .expect("served from cache during the outage");
    assert_eq!(during.access_key_id, cached.access_key_id);
    assert_eq!(counter(&cache, "stale_served"), 1);
    assert!(counter(&cache, "sts_unavailable") >= 1);
    // Within the error hold, more requests are answered from the held failure without
    // calling STS (so without waiting for its retries), up to its last moment.
    let calls = proxy.count("AssumeRole");
    for _ in 0..20 {
        let again = cache.get(&request("role-a", "web")).await.unwrap();
        assert_eq!(again.access_key_id, cached.access_key_id);
    }
    clock.advance(Duration::from_millis(1999));
    let again = cache.get(&request("role-a", "web")).await.unwrap();
    assert_eq!(again.access_key_id, cached.access_key_id);
    assert_eq!(proxy.count("AssumeRole"), calls);
    assert_eq!(counter(&cache, "held"), 21);
    // Nothing cached for this key: the outage is reported, not papered over.
    match cache.get(&request("role-new", "web")).await {
        Err(error @ CredentialsError::Unavailable { .. }) => {
            assert_eq!(error.metric_label(), "unavailable");
            assert!(error.to_string().contains("role-new"), "{error}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }

    proxy.set_fault(Fault::None);
    // Once the hold is over, the next request calls STS again.
    clock.advance(Duration::from_secs(2));
    let after = cache
        .get(&request("role-a", "web"))
        .await
        .expect("recovered");
    assert_ne!(after.access_key_id, cached.access_key_id);
    cache
        .get(&request("role-new", "web"))
        .await
        .expect("recovered");
}

#[tokio::test]
async fn throttling_backs_off_and_recovers_with_bounded_calls() {
    let moto = MotoServer::shared();
    let proxy = StsProxy::start(moto.addr()).await;
    let clock = ManualClock::new();
    let cache = cache_on(
        &proxy,
        // The agent's settings for 15-minute sessions (a refresh with 10 minutes left, at
        // most one a minute), with failed refreshes retried after 300 ms doubling.
        Settings {
            retry_base: Duration::from_millis(300),
            error_hold: Duration::ZERO,
            // Each call's own retries are under test: requests wait for them.
            request_wait: Duration::from_secs(30),
            ..Settings::for_session(Duration::from_secs(900))
        },
        &clock,
    )
    .await;
    // Two throttled answers, then STS recovers: the SDK's retries (backoff with jitter)
    // get credentials on the third attempt.
    proxy.set_fault(Fault::ThrottleNext(2));
    let first = cache
        .get(&request("role-a", "web"))
        .await
        .expect("credentials after throttling");
    assert_eq!(proxy.count("AssumeRole"), 3);
    let times = proxy.assume_times();
    assert!(times.windows(2).all(|pair| pair[1] > pair[0]));
    assert_eq!(counter(&cache, "sts_errors"), 0, "retried inside the call");

    // Throttled for good: a request gives up after a bounded number of attempts.
    proxy.set_fault(Fault::Throttle);
    // Counted for role-b only: role-a's background refresher may call meanwhile.
    let for_b = |proxy: &StsProxy| {
        proxy
            .assumed_roles()
            .iter()
            .filter(|arn| arn.ends_with("/role-b"))
            .count()
    };
    let calls = for_b(&proxy);
    match cache.get(&request("role-b", "web")).await {
        Err(CredentialsError::Unavailable { reason, .. }) => {
            assert!(reason.contains("Throttling"), "{reason}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let attempts = for_b(&proxy) - calls;
    assert!(
        (1..=3).contains(&attempts),
        "throttling is retried a bounded number of times: {attempts}"
    );
    assert!(counter(&cache, "sts_throttled") >= 1);

    // Meanwhile role-a's background refresher fails and backs off: after the n-th
    // failure in a row it pauses 300 ms doubled n times plus up to 300 ms of jitter, and
    // calls STS only when that pause is over (one refresh of up to 3 attempts each time).
    let first_pause = refresher_pause(&clock, &cache, 0).await;
    clock.advance(first_pause);
    for failures in 1..=4u32 {
        let pause = refresher_pause(&clock, &cache, u64::from(failures)).await;
        let backoff = Duration::from_millis(300) * 2u32.pow(failures);
        assert!(
            pause >= backoff && pause <= backoff + Duration::from_millis(300),
            "pause after {failures} failures: {pause:?}"
        );
        assert_eq!(counter(&cache, "refreshes_ok"), 0);
        // Just short of the pause's end nothing happens; at its end, one more refresh.
        clock.advance(pause - Duration::from_millis(1));
        tokio::task::yield_now().await;
        assert_eq!(counter(&cache, "refreshes"), u64::from(failures));
        clock.advance(Duration::from_millis(1));
    }
    let last = refresher_pause(&clock, &cache, 5).await;
    // Still served from memory: the credentials have most of their life left.
    let served = cache.get(&request("role-a", "web")).await.unwrap();
    assert_eq!(served.access_key_id, first.access_key_id);

    proxy.set_fault(Fault::None);
    clock.advance(last);
    // Recovered, the refresher pauses again, never below the minimum interval.
    let after = refresher_pause(&clock, &cache, 6).await;
    assert_eq!(counter(&cache, "refreshes_ok"), 1);
    assert!(after >= Duration::from_secs(60), "{after:?}");
    let refreshed = cache.get(&request("role-a", "web")).await.unwrap();
    assert_ne!(refreshed.access_key_id, first.access_key_id);
}

#[tokio::test]
async fn refusals_say_why_and_are_not_retried_in_a_loop() {
    let moto = MotoServer::shared();
    let proxy = StsProxy::start(moto.addr()).await;
    let cache = cache(&proxy, Settings::default()).await;
    proxy.set_fault(Fault::Deny);
    match cache.get(&request("role-forbidden", "web")).await {
        Err(error @ CredentialsError::Refused { .. }) => {
            assert_eq!(error.metric_label(), "refused");
            let CredentialsError::Refused {
                code,
                message,
                role,
            } = error
            else {
                unreachable!()
            };
            assert_eq!(code, "AccessDenied");
            assert!(message.contains("not authorized"), "{message}");
            assert!(role.ends_with("role/role-forbidden"), "{role}");
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    assert_eq!(
        proxy.count("AssumeRole"),
        1,
        "client errors are not retried"
    );
    // A pod retrying at once gets the same answer without another call.
    assert!(matches!(
        cache.get(&request("role-forbidden", "web")).await,
        Err(CredentialsError::Refused { .. })
    ));
    assert_eq!(proxy.count("AssumeRole"), 1);
    assert_eq!(counter(&cache, "sts_refused"), 1);
}

/// moto checking the agent's own IAM policy: the agent may assume role-a only.
#[tokio::test]
async fn moto_checking_policies_refuses_a_role_the_agent_may_not_assume() {
    let moto = MotoServer::start_checking_policies(3);
    let (id, secret) = moto.node_user("123456789012", &["role-a"]);
    let client = sts_client(&StsConfig {
        endpoint: Some(moto.endpoint()),
        region: Some("us-east-1".into()),
        agent_credentials: Some(aws_credential_types::Credentials::new(
            id, secret, None, None, "node",
        )),
        ..StsConfig::default()
    })
    .await;
    let cache = CredentialCache::new(client, Settings::default());
    let allowed = cache
        .get(&request("role-a", "allowed"))
        .await
        .expect("the agent may assume role-a");
    assert_eq!(
        allowed.assumed_role_arn,
        "arn:aws:sts::123456789012:assumed-role/role-a/team-a.allowed"
    );
    match cache.get(&request("role-secret", "refused")).await {
        Err(CredentialsError::Refused {
            code,
            message,
            role,
        }) => {
            // STS's own words (moto's omit the resource; the role is in `role`).
            assert_eq!(code, "AccessDenied", "{message}");
            assert!(
                message.contains("user/node is not authorized to perform: sts:AssumeRole"),
                "{message}"
            );
            assert!(role.ends_with(":role/role-secret"), "{role}");
        }
        other => panic!("expected AccessDenied, got {other:?}"),
    }
}

#[tokio::test]
async fn an_intermediate_role_is_assumed_first_and_once() {
    let moto = MotoServer::shared();
    let proxy = StsProxy::start(moto.addr()).await;
    let client = sts_client(&StsConfig {
        endpoint: Some(proxy.endpoint()),
        region: Some("us-east-1".into()),
        agent_credentials: Some(agent_credentials()),
        intermediate_role: Some("arn:aws:iam::123456789012:role/interceptor-node".into()),
        ..StsConfig::default()
    })
    .await;
    let cache = CredentialCache::new(client, Settings::default());
    for pod in ["a", "b", "c"] {
        let credentials = cache
            .get(&request(&format!("role-{pod}"), pod))
            .await
            .expect("credentials");
        assert_eq!(
            caller_arn(&moto.endpoint(), &credentials).await,
            format!("arn:aws:sts::123456789012:assumed-role/role-{pod}/team-a.{pod}")
        );
    }
    // kiam's model: the node's credentials assume one intermediate role, whose credentials
    // (cached by the SDK) assume the pods' roles.
    let assumed = proxy.assumed_roles();
    assert_eq!(
        assumed.first().map(String::as_str),
        Some("arn:aws:iam::123456789012:role/interceptor-node")
    );
    assert_eq!(
        assumed
            .iter()
            .filter(|arn| arn.ends_with("/interceptor-node"))
            .count(),
        1,
        "{assumed:?}"
    );
    assert_eq!(assumed.len(), 4, "{assumed:?}");
}
