//! Building the store of a remote URL: its family's standard environment (`AWS_*`, `GOOGLE_*`,
//! `AZURE_*`, as the `object_store` builders' `from_env` read them) overlaid with the table's
//! options, with bounded retries.
//!
//! A table that points a store at its own endpoint does not inherit the process's credentials
//! from the environment: the cluster's keys are never signed into requests to a server a SQL
//! user chose.

use std::sync::Arc;
use std::time::Duration;

use datafusion::error::{DataFusionError, Result};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::http::HttpBuilder;
use object_store::{BackoffConfig, ClientConfigKey, ObjectStore, RetryConfig};
use url::Url;

use super::options::StoreOptions;

/// Retries of one request before its error reaches the query: a stopped server fails a scan in
/// seconds, not minutes.
fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: 3,
        retry_timeout: Duration::from_secs(30),
    }
}

/// Environment variables of a family, as lowercase config names (`AWS_REGION` → `aws_region`).
fn environment(prefix: &str) -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect()
}

/// Settings for a family: the environment, then the table's options (which win); without the
/// environment's credentials when the options choose the endpoint and bring none of their own.
/// Each comes with whether the table gave it (an unknown key there is an error; in the
/// environment it is ignored, as the builders' `from_env` ignore it).
fn settings(
    options: &StoreOptions,
    env: Vec<(String, String)>,
    env_prefix: &str,
    families: &[&str],
    endpoint_keys: &[&str],
    credential_keys: &[&str],
) -> Vec<(String, String, bool)> {
    let table: Vec<(String, String)> = families
        .iter()
        .flat_map(|f| options.family(f))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let bare = |k: &str| {
        let k = k.to_ascii_lowercase();
        let prefix = env_prefix.to_ascii_lowercase();
        k.strip_prefix(&prefix).map(str::to_string).unwrap_or(k)
    };
    let names = |keys: &[&str], k: &str| keys.contains(&bare(k).as_str());
    let own_endpoint = table.iter().any(|(k, _)| names(endpoint_keys, k));
    let own_credentials = table.iter().any(|(k, _)| names(credential_keys, k));
    let mut all: Vec<(String, String, bool)> = env
        .into_iter()
        .filter(|(k, _)| !(own_endpoint && !own_credentials && names(credential_keys, k)))
        .map(|(k, v)| (k, v, false))
        .collect();
    all.extend(table.into_iter().map(|(k, v)| (k, v, true)));
    all
}

/// The settings whose keys `K` knows; an unknown key the table gave is an error.
fn parsed<K>(url: &Url, settings: Vec<(String, String, bool)>) -> Result<Vec<(K, String)>>
where
    K: std::str::FromStr,
    K::Err: std::fmt::Display,
{
    let mut out = Vec::new();
    for (key, value, from_table) in settings {
        match key.parse::<K>() {
            Ok(parsed) => out.push((parsed, value)),
            Err(e) if from_table => return Err(unknown(url, &key, e)),
            Err(_) => {}
        }
    }
    Ok(out)
}

fn unknown(url: &Url, key: &str, e: impl std::fmt::Display) -> DataFusionError {
    DataFusionError::Configuration(format!(
        "store option {key:?} for {}: {e}",
        super::store_key(url)
    ))
}

fn built(url: &Url, e: object_store::Error) -> DataFusionError {
    DataFusionError::Configuration(format!("object store {}: {e}", super::store_key(url)))
}

/// The store serving `url` (any path in it), configured by `options` over the environment.
pub fn build_store(url: &Url, options: &StoreOptions) -> Result<Arc<dyn ObjectStore>> {
    let base = &url[..url::Position::BeforePath];
    match url.scheme() {
        "s3" | "s3a" => {
            let mut builder = AmazonS3Builder::new().with_url(url.as_str());
            let endpoint = ["endpoint", "endpoint_url", "endpoint_url_s3"];
            let credentials = [
                "access_key_id",
                "secret_access_key",
                "session_token",
                "token",
            ];
            for (key, value) in parsed::<AmazonS3ConfigKey>(
                url,
                settings(
                    options,
                    environment("AWS_"),
                    "AWS_",
                    &["aws."],
                    &endpoint,
                    &credentials,
                ),
            )? {
                builder = builder.with_config(key, value);
            }
            let store = builder.with_retry(retry_config()).build();
            Ok(Arc::new(store.map_err(|e| built(url, e))?))
        }
        "gs" => {
            let mut builder = GoogleCloudStorageBuilder::new().with_url(url.as_str());
            let credentials = [
                "service_account",
                "service_account_key",
                "application_credentials",
            ];
            let families = ["gcp.", "google."];
            for (key, value) in parsed::<GoogleConfigKey>(
                url,
                settings(
                    options,
                    environment("GOOGLE_"),
                    "GOOGLE_",
                    &families,
                    &["base_url"],
                    &credentials,
                ),
            )? {
                builder = builder.with_config(key, value);
            }
            let store = builder.with_retry(retry_config()).build();
            Ok(Arc::new(store.map_err(|e| built(url, e))?))
        }
        "az" | "adl" | "azure" | "abfs" | "abfss" => {
            let mut builder = MicrosoftAzureBuilder::new().with_url(url.as_str());
            let credentials = [
                "storage_account_key",
                "account_key",
                "client_secret",
                "sas_key",
            ];
            let families = ["azure."];
            for (key, value) in parsed::<AzureConfigKey>(
                url,
                settings(
                    options,
                    environment("AZURE_"),
                    "AZURE_",
                    &families,
                    &["endpoint"],
                    &credentials,
                ),
            )? {
                builder = builder.with_config(key, value);
            }
            let store = builder.with_retry(retry_config()).build();
            Ok(Arc::new(store.map_err(|e| built(url, e))?))
        }
        "http" | "https" => {
            let mut builder = HttpBuilder::new().with_url(base);
            if url.scheme() == "http" {
                builder = builder.with_config(ClientConfigKey::AllowHttp, "true");
            }
            for (key, value) in options.family("http.") {
                let parsed: ClientConfigKey = key.parse().map_err(|e| unknown(url, key, e))?;
                builder = builder.with_config(parsed, value);
            }
            let store = builder.with_retry(retry_config()).build();
            Ok(Arc::new(store.map_err(|e| built(url, e))?))
        }
        other => Err(DataFusionError::Configuration(format!(
            "no object store for {other}:// URLs (supported: s3://, gs://, az://, abfss://, http(s)://)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_endpoint_does_not_inherit_environment_credentials() {
        let env = || {
            vec![
                ("aws_secret_access_key".to_string(), "from-env".to_string()),
                ("aws_region".to_string(), "eu-west-1".to_string()),
            ]
        };
        let credentials = ["access_key_id", "secret_access_key"];
        let own = StoreOptions::from_pairs([("aws.endpoint", "http://elsewhere.example")]);
        let kept = settings(&own, env(), "AWS_", &["aws."], &["endpoint"], &credentials);
        let keys: Vec<&str> = kept.iter().map(|(k, _, _)| k.as_str()).collect();
        assert_eq!(keys, vec!["aws_region", "endpoint"]);
        // Without an endpoint of its own, a table uses the environment's credentials.
        let plain = StoreOptions::from_pairs([("aws.region", "us-east-1")]);
        let kept = settings(
            &plain,
            env(),
            "AWS_",
            &["aws."],
            &["endpoint"],
            &credentials,
        );
        assert_eq!(kept.len(), 3);
        assert_eq!(
            kept[2],
            ("region".to_string(), "us-east-1".to_string(), true)
        );
        let bad = StoreOptions::from_pairs([("aws.no_such", "1")]);
        let err = build_store(&Url::parse("s3://b/").unwrap(), &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no_such") && err.contains("s3://b"), "{err}");
        let err = build_store(&Url::parse("ftp://h/").unwrap(), &StoreOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("ftp://"), "{err}");
    }
}
