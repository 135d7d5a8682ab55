//! whoami: the AWS SDK for Rust's default credential chain, then STS GetCallerIdentity, as a
//! service in a pod would do it. podiam's SDK matrix runs it inside pods.
//!
//! Usage: whoami [seconds]. With seconds > 0 it calls GetCallerIdentity once a second for that
//! long, so the SDK's credential cache has to refresh through the metadata service. Each call
//! prints one JSON line; any failed call makes the exit code 1.

use std::time::{Duration, Instant, UNIX_EPOCH};

use aws_credential_types::provider::ProvideCredentials;
use serde_json::{json, Value};

#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let config = aws_config::load_from_env().await;
    let client = aws_sdk_sts::Client::new(&config);
    let provider = config.credentials_provider();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut failed = false;
    loop {
        let line = once(&client, provider.as_ref()).await;
        failed |= line.get("error").is_some();
        println!("{line}");
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    std::process::exit(if failed { 1 } else { 0 });
}

async fn once(
    client: &aws_sdk_sts::Client,
    provider: Option<&aws_credential_types::provider::SharedCredentialsProvider>,
) -> Value {
    let Some(provider) = provider else {
        return json!({"error": "no credentials provider"});
    };
    // The shared cache the client signs with, not a second lookup.
    let creds = match provider.provide_credentials().await {
        Ok(creds) => creds,
        Err(error) => return json!({"error": format!("{error:?}")}),
    };
    let key = creds.access_key_id().to_string();
    let mut line = json!({
        "access_key_id": key,
        "access_key_id_prefix": key.chars().take(4).collect::<String>(),
    });
    if let Some(expiry) = creds.expiry() {
        let secs = expiry.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        line["expiration_epoch"] = json!(secs);
    }
    match client.get_caller_identity().send().await {
        Ok(out) => line["arn"] = json!(out.arn().unwrap_or_default()),
        Err(error) => line["error"] = json!(format!("{error:?}")),
    }
    line
}
