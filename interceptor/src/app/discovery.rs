//! `--auto-discover-base-arn` / `--auto-discover-default-role`: the node's instance profile,
//! read from the upstream metadata service at start (as kube2iam does).

use anyhow::{Context, Result};
use http_body_util::BodyExt;

use crate::{
    config::Discover,
    imds::upstream::Upstream,
    policy::{BaseArn, PolicyConfig},
};

/// Fills in what `discover` asks for from the node's instance profile.
pub(super) async fn apply(
    discover: Discover,
    upstream: &Upstream,
    policy: &mut PolicyConfig,
) -> Result<()> {
    if !discover.base_arn && !discover.default_role {
        return Ok(());
    }
    let (base, role) = instance_profile(upstream)
        .await
        .context("auto-discovering the node's role")?;
    tracing::info!(base = ?base, role, "discovered from the node's instance profile");
    if discover.base_arn {
        policy.base_role_arn = Some(base);
    }
    if discover.default_role {
        policy.default_role = Some(role);
    }
    Ok(())
}

async fn get(upstream: &Upstream, path: &str) -> Result<bytes::Bytes> {
    let response = upstream
        .forward(&http::Method::GET, path)
        .await
        .with_context(|| format!("reading {path} from the metadata service"))?;
    Ok(response.into_body().collect().await?.to_bytes())
}

async fn instance_profile(upstream: &Upstream) -> Result<(BaseArn, String)> {
    let info = get(upstream, "/latest/meta-data/iam/info").await?;
    let roles = get(upstream, "/latest/meta-data/iam/security-credentials/").await?;
    parse(&info, &roles)
}

/// The base ARN and role name from `iam/info` and the `security-credentials/` listing.
fn parse(info: &[u8], roles: &[u8]) -> Result<(BaseArn, String)> {
    let info: serde_json::Value = serde_json::from_slice(info).context("iam/info is not JSON")?;
    let profile = info["InstanceProfileArn"]
        .as_str()
        .context("iam/info has no InstanceProfileArn")?;
    // arn:aws:iam::123456789012:instance-profile/name -> arn:aws:iam::123456789012:role/
    let prefix = profile
        .split_once(":instance-profile/")
        .map(|(prefix, _)| prefix)
        .context("InstanceProfileArn is not an instance profile ARN")?;
    let base = BaseArn::parse(&format!("{prefix}:role/"))?;
    let role = String::from_utf8_lossy(roles)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    anyhow::ensure!(!role.is_empty(), "the node has no instance profile role");
    Ok((base, role))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_arn_and_role_from_the_instance_profile() {
        let info = br#"{"Code":"Success","InstanceProfileArn":"arn:aws:iam::123456789012:instance-profile/nodes","InstanceProfileId":"AIPAX"}"#;
        let (base, role) = parse(info, b"node-role\n").unwrap();
        assert_eq!(role, "node-role");
        let mut policy = PolicyConfig {
            base_role_arn: Some(base),
            ..PolicyConfig::default()
        };
        policy.default_role = Some(role);
        assert_eq!(
            crate::policy::resolve_role("app", &policy)
                .unwrap()
                .to_string(),
            "arn:aws:iam::123456789012:role/app"
        );
    }

    #[test]
    fn what_is_not_an_instance_profile_is_refused_with_the_reason() {
        let error = |info: &[u8], roles: &[u8]| format!("{:#}", parse(info, roles).unwrap_err());
        assert!(error(b"<html>", b"r").contains("not JSON"));
        assert!(error(b"{}", b"r").contains("no InstanceProfileArn"));
        assert!(
            error(br#"{"InstanceProfileArn":"arn:aws:iam::1:role/x"}"#, b"r")
                .contains("not an instance profile")
        );
        let info = br#"{"InstanceProfileArn":"arn:aws:iam::123456789012:instance-profile/n"}"#;
        assert!(error(info, b"\n").contains("no instance profile role"));
    }
}
