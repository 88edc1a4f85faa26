//! Building the store of a remote URL: its family's standard environment (`AWS_*`, `GOOGLE_*`,
//! `AZURE_*`, as the `object_store` builders' `from_env` read them) overlaid with the table's
//! options, with bounded retries.
//!
//! Table options come from SQL users, the environment from the operator, so a table may set
//! only a short list of keys per family (credentials of its own, region, endpoint and a few
//! switches): no credential providers, token files, proxies or TLS switches. A table that
//! routes its store elsewhere (its own endpoint, account or base URL) gets nothing from the
//! environment, and without credentials of its own its requests go unsigned: the cluster's
//! keys, role tokens and instance credentials are never sent to a server a SQL user chose.
//! Endpoints pointing at link-local addresses (cloud metadata services) are refused.

use std::net::IpAddr;
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

/// What a table may set for one store family.
struct Family {
    /// Environment variables of the family (`AWS_`).
    env_prefix: &'static str,
    /// Option prefixes in `OPTIONS` (`aws.`).
    table_prefixes: &'static [&'static str],
    /// Keys a table may set (after its prefix).
    allowed: &'static [&'static str],
    /// Keys that send requests somewhere else than the environment's store.
    routing: &'static [&'static str],
    /// Keys that are credentials of the table's own.
    credentials: &'static [&'static str],
}

const AWS: Family = Family {
    env_prefix: "AWS_",
    table_prefixes: &["aws."],
    allowed: &[
        "access_key_id",
        "secret_access_key",
        "session_token",
        "token",
        "region",
        "endpoint",
        "allow_http",
        "virtual_hosted_style_request",
        "skip_signature",
        "unsigned_payload",
        "checksum_algorithm",
    ],
    routing: &["endpoint", "virtual_hosted_style_request"],
    credentials: &[
        "access_key_id",
        "secret_access_key",
        "session_token",
        "token",
    ],
};

const GCP: Family = Family {
    env_prefix: "GOOGLE_",
    table_prefixes: &["gcp.", "google."],
    allowed: &["service_account_key", "base_url", "skip_signature"],
    routing: &["base_url"],
    credentials: &["service_account_key"],
};

const AZURE: Family = Family {
    env_prefix: "AZURE_",
    table_prefixes: &["azure."],
    allowed: &[
        "account_name",
        "account_key",
        "access_key",
        "sas_key",
        "sas_token",
        "endpoint",
        "use_emulator",
        "allow_http",
        "skip_signature",
    ],
    routing: &["endpoint", "account_name", "use_emulator"],
    credentials: &["account_key", "access_key", "sas_key", "sas_token"],
};

const HTTP_ALLOWED: [&str; 4] = ["timeout", "connect_timeout", "user_agent", "allow_http"];

/// Environment variables of a family, as lowercase config names (`AWS_REGION` → `aws_region`).
fn environment(prefix: &str) -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect()
}

fn refused(url: &Url, key: &str, why: &str) -> DataFusionError {
    DataFusionError::Configuration(format!(
        "store option {key:?} for {}: {why}",
        super::store_key(url)
    ))
}

/// An endpoint a table may name: a plain http(s) URL, not a link-local (metadata) address.
fn check_endpoint(url: &Url, key: &str, value: &str) -> Result<()> {
    let endpoint = Url::parse(value).map_err(|e| refused(url, key, &e.to_string()))?;
    let plain = matches!(endpoint.scheme(), "http" | "https")
        && endpoint.username().is_empty()
        && endpoint.password().is_none()
        && endpoint.query().is_none()
        && endpoint.fragment().is_none()
        && !value.contains(['#', '?', '@']);
    if !plain {
        return Err(refused(
            url,
            key,
            "an endpoint is a plain http(s)://host[:port] URL",
        ));
    }
    let host = endpoint.host_str().unwrap_or_default();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let link_local = match bare.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => ip.is_link_local() || ip.is_unspecified(),
        Ok(IpAddr::V6(ip)) => (ip.segments()[0] & 0xffc0) == 0xfe80 || ip.is_unspecified(),
        Err(_) => host.eq_ignore_ascii_case("metadata.google.internal"),
    };
    if link_local {
        return Err(refused(
            url,
            key,
            "link-local and metadata addresses are refused",
        ));
    }
    Ok(())
}

/// Settings for a family: the environment, then the table's options (which win). A table
/// that routes elsewhere gets no environment at all, and unsigned requests unless it brings
/// credentials. Each setting says whether the table gave it (an unknown key there is an
/// error; in the environment it is ignored, as the builders' `from_env` ignore it).
fn settings(
    url: &Url,
    options: &StoreOptions,
    env: Vec<(String, String)>,
    family: &Family,
) -> Result<Vec<(String, String, bool)>> {
    let mut table = Vec::new();
    for prefix in family.table_prefixes {
        for (key, value) in options.family(prefix) {
            let shown = format!("{prefix}{key}");
            if !family.allowed.contains(&key) {
                return Err(refused(
                    url,
                    &shown,
                    "not allowed in table OPTIONS (the operator sets it in the environment of the scheduler and executors)",
                ));
            }
            if key == "endpoint" || key == "base_url" {
                check_endpoint(url, &shown, value)?;
            }
            if key == "region" && !value.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                return Err(refused(url, &shown, "a region is letters, digits and '-'"));
            }
            table.push((key.to_string(), value.to_string()));
        }
    }
    let routes = table
        .iter()
        .any(|(k, _)| family.routing.contains(&k.as_str()));
    let own_credentials = table
        .iter()
        .any(|(k, _)| family.credentials.contains(&k.as_str()));
    let mut all: Vec<(String, String, bool)> = if routes {
        Vec::new()
    } else {
        env.into_iter().map(|(k, v)| (k, v, false)).collect()
    };
    if routes && !own_credentials {
        all.push(("skip_signature".to_string(), "true".to_string(), true));
    }
    all.extend(table.into_iter().map(|(k, v)| (k, v, true)));
    Ok(all)
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
            Err(e) if from_table => return Err(refused(url, &key, &e.to_string())),
            Err(_) => {}
        }
    }
    Ok(out)
}

/// The parsed settings of `family` for `url`.
fn family_settings<K>(
    url: &Url,
    options: &StoreOptions,
    family: &Family,
) -> Result<Vec<(K, String)>>
where
    K: std::str::FromStr,
    K::Err: std::fmt::Display,
{
    let env = environment(family.env_prefix);
    parsed(url, settings(url, options, env, family)?)
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
            for (key, value) in family_settings::<AmazonS3ConfigKey>(url, options, &AWS)? {
                builder = builder.with_config(key, value);
            }
            let store = builder.with_retry(retry_config()).build();
            Ok(Arc::new(store.map_err(|e| built(url, e))?))
        }
        "gs" => {
            let mut builder = GoogleCloudStorageBuilder::new().with_url(url.as_str());
            for (key, value) in family_settings::<GoogleConfigKey>(url, options, &GCP)? {
                builder = builder.with_config(key, value);
            }
            let store = builder.with_retry(retry_config()).build();
            Ok(Arc::new(store.map_err(|e| built(url, e))?))
        }
        "az" | "adl" | "azure" | "abfs" | "abfss" => {
            let mut builder = MicrosoftAzureBuilder::new().with_url(url.as_str());
            for (key, value) in family_settings::<AzureConfigKey>(url, options, &AZURE)? {
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
                if !HTTP_ALLOWED.contains(&key) {
                    let shown = format!("http.{key}");
                    return Err(refused(url, &shown, "not allowed in table OPTIONS"));
                }
                let parsed: ClientConfigKey = key
                    .parse()
                    .map_err(|e: object_store::Error| refused(url, key, &e.to_string()))?;
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

    fn env() -> Vec<(String, String)> {
        vec![
            ("aws_secret_access_key".to_string(), "from-env".to_string()),
            ("aws_region".to_string(), "eu-west-1".to_string()),
        ]
    }

    fn keys(settings: &[(String, String, bool)]) -> Vec<&str> {
        settings.iter().map(|(k, _, _)| k.as_str()).collect()
    }

    #[test]
    fn a_table_routing_elsewhere_gets_nothing_from_the_environment() {
        let url = Url::parse("s3://b/").unwrap();
        // Its own endpoint and no keys: no environment, unsigned requests.
        let own = StoreOptions::from_pairs([("aws.endpoint", "http://elsewhere.example:9000")]);
        let kept = settings(&url, &own, env(), &AWS).unwrap();
        assert_eq!(keys(&kept), vec!["skip_signature", "endpoint"]);
        // Its own endpoint and keys: only the table's settings.
        let keyed = StoreOptions::from_pairs([
            ("aws.endpoint", "http://127.0.0.1:9000"),
            ("aws.access_key_id", "AKID"),
            ("aws.secret_access_key", "s"),
        ]);
        let kept = settings(&url, &keyed, env(), &AWS).unwrap();
        assert_eq!(
            keys(&kept),
            vec!["access_key_id", "endpoint", "secret_access_key"]
        );
        // Only a region: the environment's store and credentials, the table's region.
        let plain = StoreOptions::from_pairs([("aws.region", "us-east-1")]);
        let kept = settings(&url, &plain, env(), &AWS).unwrap();
        assert_eq!(kept.len(), 3);
        assert_eq!(
            kept[2],
            ("region".to_string(), "us-east-1".to_string(), true)
        );
    }

    #[test]
    fn dangerous_table_options_are_refused() {
        let url = Url::parse("s3://b/").unwrap();
        for (key, value) in [
            ("aws.container_credentials_full_uri", "http://evil.example/"),
            ("aws.web_identity_token_file", "/etc/shadow"),
            ("aws.proxy_url", "http://evil.example"),
            ("aws.allow_invalid_certificates", "true"),
            ("aws.endpoint_url_sts", "http://evil.example"),
            ("aws.endpoint", "http://169.254.169.254"),
            ("aws.endpoint", "https://s3.amazonaws.com/other-bucket/key#"),
            ("aws.endpoint", "http://user@host.example"),
            ("aws.region", "x.evil.example#"),
            ("aws.no_such", "1"),
        ] {
            let options = StoreOptions::from_pairs([(key, value)]);
            let err = build_store(&url, &options).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains("s3://b"), "{key}: {err}");
        }
        let azure = Url::parse("az://container/").unwrap();
        let options = StoreOptions::from_pairs([("azure.authority_host", "https://evil.example")]);
        assert!(build_store(&azure, &options).is_err());
        let gcs = Url::parse("gs://bucket/").unwrap();
        let options = StoreOptions::from_pairs([("gcp.service_account_path", "/etc/shadow")]);
        assert!(build_store(&gcs, &options).is_err());
        let err = build_store(&Url::parse("ftp://h/").unwrap(), &StoreOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("ftp://"), "{err}");
    }
}
