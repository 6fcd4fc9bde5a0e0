//! The STS client: the agent's own credentials from the standard chain (environment,
//! profile, web identity / IRSA, the metadata service), optionally through an
//! intermediate role (kiam's `--assume-role-arn`), and the endpoint the flags ask for.

use std::time::{Duration, SystemTime};

use aws_config::{BehaviorVersion, Region, timeout::TimeoutConfig};
use aws_sdk_sts::{Client, error::ProvideErrorMetadata};
use aws_smithy_http_client::tls;

use super::{Credentials, RoleRequest};

/// Where and as whom STS is called.
#[derive(Debug, Clone, Default)]
pub struct StsConfig {
    /// `--sts-endpoint`: used as is (tests point it at a local STS).
    pub endpoint: Option<String>,
    /// `AWS_REGION` (or `--region`): signing region, and with `regional` the endpoint's.
    pub region: Option<String>,
    /// `--use-regional-sts-endpoint`: call `sts.<region>.amazonaws.com`, not the global
    /// endpoint. (kube2iam's flag of that name has no effect; this one does.)
    pub regional: bool,
    /// `--assume-role-arn`: assume this role first and the pods' roles with its
    /// credentials, so nodes need permission for one role only.
    pub intermediate_role: Option<String>,
    /// Explicit credentials for the agent itself instead of the default chain (tests, and
    /// hosts where the chain is not wanted).
    pub agent_credentials: Option<aws_credential_types::Credentials>,
}

/// STS's answer, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StsError {
    /// A client error (AccessDenied, MalformedPolicyDocument, ...): do not retry.
    Refused { code: String, message: String },
    /// Throttling, 5xx, timeouts, connection failures (after the SDK's own retries).
    Transient { reason: String, throttled: bool },
}

/// Builds the STS client. The HTTP stack is rustls with ring (no C crypto build).
pub async fn sts_client(config: &StsConfig) -> Client {
    let https = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let region = Region::new(config.region.clone().unwrap_or_else(|| "us-east-1".into()));
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(2))
        .operation_attempt_timeout(Duration::from_secs(3))
        .operation_timeout(Duration::from_secs(10))
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(https)
        .region(region.clone())
        .timeout_config(timeouts);
    if let Some(endpoint) = &endpoint_url(config) {
        loader = loader.endpoint_url(endpoint);
    }
    if let Some(credentials) = &config.agent_credentials {
        loader = loader.credentials_provider(credentials.clone());
    }
    let base = loader.load().await;
    let Some(intermediate) = &config.intermediate_role else {
        return Client::new(&base);
    };
    // The intermediate session is shared by every pod, so it carries nothing of any pod:
    // no SourceIdentity (AWS keeps one for the rest of a chain and does not let it change,
    // so every other pod's own would be refused) and no session tags (transitive ones
    // would follow into every pod's session). Each pod's SourceIdentity and tags go on
    // its own, chained, AssumeRole (docs/identity.md).
    let provider = aws_config::sts::AssumeRoleProvider::builder(intermediate)
        .session_name("interceptor")
        .configure(&base)
        .build()
        .await;
    let with_intermediate = base
        .into_builder()
        .credentials_provider(
            aws_credential_types::provider::SharedCredentialsProvider::new(provider),
        )
        .build();
    Client::new(&with_intermediate)
}

/// The endpoint the flags ask for: `--sts-endpoint` as is; with
/// `--use-regional-sts-endpoint`, the region's own (`sts.<region>.amazonaws.com`, or the
/// partition's form for China); otherwise the global endpoint, explicitly, since SDK
/// defaults have moved to regional ones.
pub fn endpoint_url(config: &StsConfig) -> Option<String> {
    match (&config.endpoint, config.regional, config.region.as_deref()) {
        (Some(endpoint), _, _) => Some(endpoint.clone()),
        (None, true, Some(region)) if region.starts_with("cn-") => {
            Some(format!("https://sts.{region}.amazonaws.com.cn"))
        }
        (None, true, Some(region)) => Some(format!("https://sts.{region}.amazonaws.com")),
        (None, _, _) => Some("https://sts.amazonaws.com".to_owned()),
    }
}

/// One AssumeRole call.
pub(super) async fn assume_role(
    client: &Client,
    request: &RoleRequest,
    duration: Duration,
) -> Result<Credentials, StsError> {
    let mut call = client
        .assume_role()
        .role_arn(&*request.role_arn)
        .role_session_name(&*request.session_name)
        .duration_seconds(i32::try_from(duration.as_secs()).unwrap_or(3600));
    if let Some(external_id) = &request.external_id {
        call = call.external_id(&**external_id);
    }
    for (key, value) in request.tags.iter() {
        let tag = aws_sdk_sts::types::Tag::builder()
            .key(key)
            .value(value)
            .build()
            .map_err(|error| StsError::Refused {
                code: "InvalidTag".into(),
                message: error.to_string(),
            })?;
        call = call.tags(tag).transitive_tag_keys(key);
    }
    if let Some(source_identity) = &request.source_identity {
        call = call.source_identity(&**source_identity);
    }
    let output = call.send().await.map_err(|error| {
        let raw = error.raw_response();
        let status = raw.map(|raw| raw.status().as_u16());
        let body = raw
            .and_then(|raw| raw.body().bytes())
            .map(|bytes| String::from_utf8_lossy(bytes).into_owned())
            .unwrap_or_default();
        // Some STS implementations answer errors in shapes the SDK does not parse; the
        // code and message are then read from the XML body directly.
        let code = error
            .code()
            .map(str::to_owned)
            .or_else(|| xml_field(&body, "Code"))
            .unwrap_or_default();
        let message = error
            .message()
            .map(str::to_owned)
            .or_else(|| xml_field(&body, "Message"))
            .unwrap_or_default();
        let throttled = matches!(
            code.as_str(),
            "Throttling" | "ThrottlingException" | "RequestLimitExceeded"
        );
        let transient = throttled
            || code == "IDPCommunicationError"
            || status.is_none_or(|status| status >= 500);
        if transient {
            let reason = if code.is_empty() {
                format!(
                    "{}",
                    aws_smithy_types::error::display::DisplayErrorContext(&error)
                )
            } else {
                format!("{code}: {message}")
            };
            StsError::Transient { reason, throttled }
        } else if code.is_empty() {
            StsError::Refused {
                code: format!("HTTP {}", status.unwrap_or_default()),
                message: body.chars().take(300).collect(),
            }
        } else {
            StsError::Refused { code, message }
        }
    })?;
    let credentials = output.credentials.ok_or_else(|| StsError::Transient {
        reason: "STS answered without credentials".into(),
        throttled: false,
    })?;
    let expiration =
        SystemTime::try_from(credentials.expiration).unwrap_or_else(|_| SystemTime::now());
    Ok(Credentials {
        access_key_id: credentials.access_key_id,
        secret_access_key: credentials.secret_access_key,
        session_token: credentials.session_token,
        expiration,
        issued: SystemTime::now(),
        assumed_role_arn: output
            .assumed_role_user
            .map(|user| user.arn)
            .unwrap_or_default(),
        rendered: Default::default(),
    })
}

/// The text of the first `<name>...</name>` element in `xml`, if any.
fn xml_field(xml: &str, name: &str) -> Option<String> {
    let start = xml.find(&format!("<{name}>"))? + name.len() + 2;
    let end = start + xml[start..].find(&format!("</{name}>"))?;
    Some(xml[start..end].trim().to_owned()).filter(|text| !text.is_empty())
}

#[cfg(test)]
mod tests {
    use super::{StsConfig, endpoint_url};

    #[test]
    fn endpoints_as_the_flags_ask() {
        let config = |endpoint: Option<&str>, regional, region: Option<&str>| StsConfig {
            endpoint: endpoint.map(str::to_owned),
            regional,
            region: region.map(str::to_owned),
            ..StsConfig::default()
        };
        let url = |c: StsConfig| endpoint_url(&c).unwrap();
        assert_eq!(
            url(config(None, false, Some("eu-west-1"))),
            "https://sts.amazonaws.com"
        );
        assert_eq!(
            url(config(None, true, Some("eu-west-1"))),
            "https://sts.eu-west-1.amazonaws.com"
        );
        assert_eq!(
            url(config(None, true, Some("cn-north-1"))),
            "https://sts.cn-north-1.amazonaws.com.cn"
        );
        assert_eq!(
            url(config(
                Some("http://127.0.0.1:5000"),
                true,
                Some("eu-west-1")
            )),
            "http://127.0.0.1:5000"
        );
        // Regional without a region: the global endpoint (config validation warns).
        assert_eq!(url(config(None, true, None)), "https://sts.amazonaws.com");
    }

    #[test]
    fn error_fields_are_read_from_any_xml_shape() {
        let body =
            "<Error><Code>AccessDenied</Code><Message>User is not authorized</Message></Error>";
        assert_eq!(
            super::xml_field(body, "Code").as_deref(),
            Some("AccessDenied")
        );
        assert_eq!(
            super::xml_field(body, "Message").as_deref(),
            Some("User is not authorized")
        );
        assert_eq!(super::xml_field(body, "RequestId"), None);
        assert_eq!(super::xml_field("<Code></Code>", "Code"), None);
        assert_eq!(super::xml_field("<Code>unterminated", "Code"), None);
    }
}
