//! The credentials cache against moto's real STS server (through a counting, fault
//! injecting forwarder): identity and session as STS reports them, prefetch, single
//! flight, refresh, outages and refusals.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime},
};

use interceptor::credentials::{
    CredentialCache, Credentials, CredentialsError, RoleRequest, Settings, StsConfig, session_name,
    sts_client,
};
use interceptor_tests::{
    moto::MotoServer,
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
    let client = sts_client(&StsConfig {
        endpoint: Some(proxy.endpoint()),
        region: Some("us-east-1".into()),
        agent_credentials: Some(agent_credentials()),
        ..StsConfig::default()
    })
    .await;
    CredentialCache::new(client, settings)
}

fn request(role: &str, pod: &str) -> RoleRequest {
    RoleRequest {
        role_arn: format!("arn:aws:iam::123456789012:role/{role}"),
        external_id: None,
        session_name: session_name("team-a", pod),
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
    let moto = MotoServer::start();
    let proxy = StsProxy::start(moto.addr()).await;
    let cache = cache(&proxy, Settings::default()).await;
    cache.prefetch(request("role-a", "new-pod"));
    interceptor_tests::apiserver::wait_for("the prefetch", Duration::from_secs(10), || match proxy
        .count("AssumeRole")
    {
        1 if cache.expiries().iter().all(|(_, expiry)| expiry.is_some()) => Ok(()),
        n => Err(format!("{n} calls")),
    })
    .await;
    cache.get(&request("role-a", "new-pod")).await.unwrap();
    assert_eq!(cache.stats().hits.load(Ordering::Relaxed), 1);
    assert_eq!(proxy.count("AssumeRole"), 1);
}

#[tokio::test]
async fn concurrent_requests_make_one_call_per_key() {
    let moto = MotoServer::start();
    let proxy = StsProxy::start(moto.addr()).await;
    proxy.set_delay(Duration::from_millis(200));
    let cache = cache(&proxy, Settings::default()).await;
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
    // An external id is part of the key: another pod's external id never shares.
    let mut with_id = request("role-0", "shared");
    with_id.external_id = Some("tenant-42".into());
    let a = cache.get(&with_id).await.unwrap();
    let b = cache.get(&request("role-0", "shared")).await.unwrap();
    assert_ne!(a.access_key_id, b.access_key_id);
    assert_eq!(proxy.count("AssumeRole"), 4);
}

#[tokio::test]
async fn credentials_are_refreshed_before_they_expire() {
    let moto = MotoServer::start();
    let proxy = StsProxy::start(moto.addr()).await;
    // 15-minute sessions (STS's minimum) refreshed once less than 14:58 is left: within
    // about two seconds.
    let cache = cache(
        &proxy,
        Settings {
            session_duration: Duration::from_secs(900),
            refresh_lead: Duration::from_secs(898),
            serve_floor: Duration::from_secs(60),
            ..Settings::default()
        },
    )
    .await;
    let first = cache.get(&request("role-a", "web")).await.unwrap();
    interceptor_tests::apiserver::wait_for("a background refresh", Duration::from_secs(15), || {
        match cache.stats().refreshes.load(Ordering::Relaxed) {
            0 => Err("no refresh yet".into()),
            _ => Ok(()),
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = cache.get(&request("role-a", "web")).await.unwrap();
    assert_ne!(
        first.access_key_id, second.access_key_id,
        "refreshed credentials are served"
    );
    assert!(proxy.count("AssumeRole") >= 2);
    // A key nobody needs any more is forgotten and its refresher stops.
    cache.retain(|_| false);
    assert!(cache.is_empty());
}

#[tokio::test]
async fn outages_serve_cached_credentials_and_refusals_say_why() {
    let moto = MotoServer::start();
    let proxy = StsProxy::start(moto.addr()).await;
    // Every request wants fresher credentials than it has (serve floor above the session
    // length), so each one calls STS: outages are visible.
    let cache = cache(
        &proxy,
        Settings {
            session_duration: Duration::from_secs(900),
            refresh_lead: Duration::from_secs(60),
            serve_floor: Duration::from_secs(899),
            stale_floor: Duration::from_secs(60),
            ..Settings::default()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let cached = cache.get(&request("role-a", "web")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;

    proxy.set_fault(Fault::Unavailable);
    let during = cache
        .get(&request("role-a", "web"))
        .await
        .expect("served from cache during the outage");
    assert_eq!(during.access_key_id, cached.access_key_id);
    assert!(cache.stats().stale_served.load(Ordering::Relaxed) >= 1);
    // Nothing cached for this key: the outage is reported, not papered over.
    match cache.get(&request("role-new", "web")).await {
        Err(CredentialsError::Unavailable { .. }) => {}
        other => panic!("expected Unavailable, got {other:?}"),
    }

    proxy.set_fault(Fault::Throttle);
    let calls = proxy.count("AssumeRole");
    assert!(matches!(
        cache.get(&request("role-new", "web")).await,
        Err(CredentialsError::Unavailable { .. })
    ));
    let attempts = proxy.count("AssumeRole") - calls;
    assert!(
        (1..=5).contains(&attempts),
        "throttling is retried a bounded number of times: {attempts}"
    );

    proxy.set_fault(Fault::Deny);
    match cache.get(&request("role-forbidden", "web")).await {
        Err(CredentialsError::Refused { code, message, .. }) => {
            assert_eq!(code, "AccessDenied");
            assert!(message.contains("not authorized"), "{message}");
        }
        other => panic!("expected Refused, got {other:?}"),
    }

    proxy.set_fault(Fault::None);
    cache
        .get(&request("role-new", "web"))
        .await
        .expect("recovered");
}

#[tokio::test]
async fn an_intermediate_role_is_assumed_first_and_once() {
    let moto = MotoServer::start();
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
