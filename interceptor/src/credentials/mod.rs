//! The credentials a pod is entitled to: STS AssumeRole per (role, external id, session),
//! cached, fetched once however many ask at the same time, prefetched when a pod with a
//! role appears, and refreshed well ahead of expiry.
//!
//! Lifetimes (docs/credentials.md, [`Settings::for_session`]): sessions last
//! `--iam-role-session-ttl` (default 1 h). A credential with less than the serve floor
//! left (15 min: SDKs refresh 15 minutes before expiry, and the Java SDK v1 refreshes on
//! every call below that) is never served while STS answers; a background refresher
//! replaces it once less than the refresh lead is left (30 min at 1 h sessions; the wait is
//! shortened by up to 10 % jitter so keys fetched together spread out), so requests are
//! served from memory with 30 to 60 minutes left. While STS is down, cached credentials
//! are served until the stale floor (2 min) before they expire; refusals (AccessDenied)
//! are returned as [`CredentialsError::Refused`], never papered over.

mod cache;
mod session;
mod sts;

use std::{
    fmt,
    sync::{Arc, OnceLock},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
pub use cache::{
    CacheStats, Clock, CredentialCache, Key, MAX_SESSION, MIN_SESSION, PREFETCH_CONCURRENCY,
    SDK_REFRESH_WINDOW, Settings, SystemClock,
};
pub use session::{SessionTags, session_name, source_identity};
pub use sts::{StsConfig, StsError, endpoint_url, sts_client};

/// What a pod's role is assumed with. The strings are shared (`Arc<str>`, tags behind an
/// `Arc`): a request is built once per decision and cloned per metadata request and cache
/// lookup without allocating.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct RoleRequest {
    pub role_arn: Arc<str>,
    pub external_id: Option<Arc<str>>,
    pub session_name: Arc<str>,
    /// Transitive session tags (`--session-tags`); empty for none.
    pub tags: SessionTags,
    /// `--source-identity`.
    pub source_identity: Option<Arc<str>>,
}

/// Temporary credentials. `Debug` never shows the secret or the token.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// `AccessKeyId`; not secret (it appears in CloudTrail), so `Debug` shows it.
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    pub expiration: SystemTime,
    /// When STS issued them: the metadata API's `LastUpdated`.
    pub issued: SystemTime,
    /// `arn:aws:sts::<account>:assumed-role/<role>/<session>`.
    pub assumed_role_arn: String,
    /// The answer's body, rendered on first serve ([`Credentials::rendered`]).
    pub rendered: Rendered,
}

impl Credentials {
    /// The metadata API's `LastUpdated` (the same as `issued`).
    pub fn last_updated(&self) -> SystemTime {
        self.issued
    }

    /// The document served for these credentials, rendered by `render` the first time
    /// and shared afterwards: every field of the metadata API's document (`LastUpdated`
    /// included) is fixed once STS has answered, so a warm request copies a pointer
    /// instead of formatting and allocating the same bytes again.
    pub fn rendered(&self, render: impl FnOnce(&Self) -> Bytes) -> Bytes {
        self.rendered.0.get_or_init(|| render(self)).clone()
    }

    /// Lifetime left at `now` (zero once expired).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.expiration
            .duration_since(now)
            .unwrap_or(Duration::ZERO)
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("session_token", &"<redacted>")
            .field("expiration", &self.expiration)
            .field("assumed_role_arn", &self.assumed_role_arn)
            .finish()
    }
}

/// A rendering of [`Credentials`], made once. Not part of their value: any two renderings
/// compare equal, and `Debug` never shows one (it holds the secret).
#[derive(Clone, Default)]
pub struct Rendered(OnceLock<Bytes>);

impl PartialEq for Rendered {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Rendered {}

/// Why no credentials can be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    /// STS refused (AccessDenied and other client errors): retrying will not help.
    #[error("STS refused to assume {role}: {code}: {message}")]
    Refused {
        role: String,
        code: String,
        message: String,
    },
    /// STS unreachable, throttling or failing, and nothing usable is cached.
    #[error("STS unavailable while assuming {role}: {reason}")]
    Unavailable { role: String, reason: String },
}

impl CredentialsError {
    /// The permission a role's trust policy lacks, when STS names one that the agent's
    /// own options call for (`--session-tags`, `--source-identity`).
    pub fn missing_permission(&self) -> Option<&'static str> {
        let Self::Refused { message, .. } = self else {
            return None;
        };
        ["sts:TagSession", "sts:SetSourceIdentity"]
            .into_iter()
            .find(|permission| message.contains(permission))
    }

    /// What a pod's Event says: the error, and the trust policy change it needs.
    pub fn event_message(&self) -> String {
        match self.missing_permission() {
            Some(permission) => format!(
                "{self} (the role's trust policy must allow {permission} for the agent's role: \
                 interceptor runs with {})",
                if permission == "sts:TagSession" {
                    "--session-tags"
                } else {
                    "--source-identity"
                }
            ),
            None => self.to_string(),
        }
    }

    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Refused { .. } => "refused",
            Self::Unavailable { .. } => "unavailable",
        }
    }
}

#[cfg(test)]
mod tests;
