//! IMDSv2 session tokens, minted by the agent and bound to the caller.
//!
//! A token is `base64url(version | expiry | binding | HMAC-SHA256)`: stateless (nothing to
//! store or bound per pod), unforgeable without the agent's key (random per process), and
//! bound to one caller (the pod UID, or the cgroup id outside Kubernetes) and one expiry.
//! A token taken from one pod is refused in another; a restarted agent refuses old tokens
//! with 401, on which every SDK fetches a new one.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::{
    digest,
    hmac::{self, Key},
    rand::{SecureRandom, SystemRandom},
};

const VERSION: u8 = 1;
const BINDING_LEN: usize = 16;
const MAC_LEN: usize = 32;
/// Length of the HMAC key.
pub const KEY_LEN: usize = 32;
const RAW_LEN: usize = 1 + 8 + BINDING_LEN + MAC_LEN;
/// Longer presented tokens are refused before any decoding.
const MAX_TOKEN_LEN: usize = 128;

/// EC2's limits on `X-aws-ec2-metadata-token-ttl-seconds`.
pub const MIN_TTL: u64 = 1;
pub const MAX_TTL: u64 = 21_600;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed or forged token")]
    Invalid,
    #[error("expired token")]
    Expired,
    #[error("token minted for another caller")]
    OtherCaller,
}

impl TokenError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::Expired => "expired",
            Self::OtherCaller => "other_caller",
        }
    }
}

pub struct TokenMinter {
    key: Key,
}

fn binding_digest(binding: &str) -> [u8; BINDING_LEN] {
    let digest = digest::digest(&digest::SHA256, binding.as_bytes());
    let mut out = [0; BINDING_LEN];
    out.copy_from_slice(&digest.as_ref()[..BINDING_LEN]);
    out
}

fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

impl TokenMinter {
    /// A minter with a fresh random key.
    pub fn new() -> Self {
        Self::with_key(&Self::random_key())
    }

    /// A minter with `key`: the agent's comes from a pinned map, so that a successor
    /// agent verifies the tokens its predecessor minted.
    pub fn with_key(key: &[u8; KEY_LEN]) -> Self {
        Self {
            key: Key::new(hmac::HMAC_SHA256, key),
        }
    }

    /// A key from the operating system's random source.
    pub fn random_key() -> [u8; KEY_LEN] {
        let mut key = [0u8; KEY_LEN];
        SystemRandom::new()
            .fill(&mut key)
            .expect("the operating system's random source failed");
        key
    }

    /// A token for `binding`, valid for `ttl` from `now`.
    pub fn mint(&self, binding: &str, ttl: Duration, now: SystemTime) -> String {
        let mut raw = Vec::with_capacity(RAW_LEN);
        raw.push(VERSION);
        raw.extend_from_slice(&(unix_seconds(now) + ttl.as_secs()).to_be_bytes());
        raw.extend_from_slice(&binding_digest(binding));
        let tag = hmac::sign(&self.key, &raw);
        raw.extend_from_slice(tag.as_ref());
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// Checks a presented token against the caller it is presented by.
    pub fn verify(&self, token: &str, binding: &str, now: SystemTime) -> Result<(), TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Invalid);
        }
        let raw = URL_SAFE_NO_PAD
            .decode(token.trim())
            .map_err(|_| TokenError::Invalid)?;
        if raw.len() != RAW_LEN || raw[0] != VERSION {
            return Err(TokenError::Invalid);
        }
        let (signed, tag) = raw.split_at(RAW_LEN - MAC_LEN);
        hmac::verify(&self.key, signed, tag).map_err(|_| TokenError::Invalid)?;
        let mut expiry = [0u8; 8];
        expiry.copy_from_slice(&signed[1..9]);
        if u64::from_be_bytes(expiry) <= unix_seconds(now) {
            return Err(TokenError::Expired);
        }
        if signed[9..] != binding_digest(binding) {
            return Err(TokenError::OtherCaller);
        }
        Ok(())
    }
}

impl Default for TokenMinter {
    fn default() -> Self {
        Self::new()
    }
}

/// Parses `X-aws-ec2-metadata-token-ttl-seconds` as EC2 does: an integer in 1..=21600.
pub fn parse_ttl(value: Option<&[u8]>) -> Option<Duration> {
    let text = std::str::from_utf8(value?).ok()?.trim();
    let seconds: u64 = text.parse().ok()?;
    (MIN_TTL..=MAX_TTL)
        .contains(&seconds)
        .then(|| Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_accepted_from_its_caller_until_it_expires() {
        let minter = TokenMinter::new();
        let now = SystemTime::now();
        let token = minter.mint("pod-a", Duration::from_secs(60), now);
        assert_eq!(minter.verify(&token, "pod-a", now), Ok(()));
        assert_eq!(
            minter.verify(&token, "pod-a", now + Duration::from_secs(59)),
            Ok(())
        );
        assert_eq!(
            minter.verify(&token, "pod-a", now + Duration::from_secs(60)),
            Err(TokenError::Expired)
        );
        assert_eq!(
            minter.verify(&token, "pod-b", now),
            Err(TokenError::OtherCaller)
        );
    }

    #[test]
    fn forged_modified_and_foreign_tokens_are_invalid() {
        let minter = TokenMinter::new();
        let now = SystemTime::now();
        let token = minter.mint("pod-a", Duration::from_secs(60), now);
        let other_agent = TokenMinter::new().mint("pod-a", Duration::from_secs(60), now);
        assert_eq!(
            minter.verify(&other_agent, "pod-a", now),
            Err(TokenError::Invalid)
        );
        let mut raw = URL_SAFE_NO_PAD.decode(&token).unwrap();
        raw[3] ^= 1; // push the expiry out
        let tampered = URL_SAFE_NO_PAD.encode(&raw);
        assert_eq!(
            minter.verify(&tampered, "pod-a", now),
            Err(TokenError::Invalid)
        );
        for garbage in ["", "x", "!!!!", &"A".repeat(500), &token[..token.len() - 2]] {
            assert_eq!(
                minter.verify(garbage, "pod-a", now),
                Err(TokenError::Invalid),
                "{garbage}"
            );
        }
    }

    #[test]
    fn ttl_header_as_ec2_parses_it() {
        assert_eq!(parse_ttl(Some(b"21600")), Some(Duration::from_secs(21_600)));
        assert_eq!(parse_ttl(Some(b"1")), Some(Duration::from_secs(1)));
        for bad in [
            &b"0"[..],
            b"21601",
            b"-5",
            b"abc",
            b"",
            b"1.5",
            b"99999999999999999999",
        ] {
            assert_eq!(parse_ttl(Some(bad)), None, "{bad:?}");
        }
        assert_eq!(parse_ttl(None), None);
    }
}
