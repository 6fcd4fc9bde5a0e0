//! Run inside a simulated pod: aws-sdk-rust's default credential chain (here: the instance
//! metadata service, IMDSv2 only, which interceptor answers), then STS GetCallerIdentity
//! against the test's STS. Prints the caller ARN or `ERROR: <reason>`.
//!
//! Usage: sdk-rust-whoami STS_ENDPOINT

use aws_config::{BehaviorVersion, Region};
use aws_smithy_http_client::tls;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let Some(endpoint) = std::env::args().nth(1) else {
        eprintln!("usage: sdk-rust-whoami STS_ENDPOINT");
        return std::process::ExitCode::from(2);
    };
    let https = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let config = aws_config::defaults(BehaviorVersion::latest())
        .http_client(https)
        .region(Region::new("us-east-1"))
        .load()
        .await;
    let sts = aws_sdk_sts::Client::from_conf(
        aws_sdk_sts::config::Builder::from(&config)
            .endpoint_url(endpoint)
            .build(),
    );
    match sts.get_caller_identity().send().await {
        Ok(identity) => {
            println!("{}", identity.arn.unwrap_or_default());
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            println!("ERROR: {}", aws_sdk_sts::error::DisplayErrorContext(&error));
            std::process::ExitCode::FAILURE
        }
    }
}
