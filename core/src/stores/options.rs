//! What one object store is configured with: the `aws.*`, `gcp.*`, `azure.*` and `http.*`
//! options of `CREATE EXTERNAL TABLE ... OPTIONS (...)`, spelled as datafusion-cli spells them.
//! Their `Debug` form hides secret values.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use url::Url;

/// Option prefixes that configure a store rather than a file format.
const PREFIXES: [&str; 5] = ["aws.", "gcp.", "google.", "azure.", "http."];

/// The store a URL lives in, as a registry key: `scheme://[user@]host[:port]` (`file://` for
/// local files). The user part is kept: in `abfss://container@account.dfs.core.windows.net/`
/// it names the container.
pub fn store_key(url: &Url) -> String {
    format!(
        "{}://{}",
        url.scheme(),
        &url[url::Position::BeforeUsername..url::Position::AfterPort]
    )
}

/// Store options: `aws.region` → `us-east-1`, ... (keys lowercase, with their prefix).
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoreOptions(BTreeMap<String, String>);

impl StoreOptions {
    /// Options from `(key, value)` pairs (keys are lowercased).
    pub fn from_pairs<K: AsRef<str>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self(
            pairs
                .into_iter()
                .map(|(k, v)| (k.as_ref().to_ascii_lowercase(), v.into()))
                .collect(),
        )
    }

    /// Move the store options out of a table's `OPTIONS` map; format options stay.
    pub fn take_from(options: &mut HashMap<String, String>) -> Self {
        let keys: Vec<String> = options
            .keys()
            .filter(|k| is_store_option(k))
            .cloned()
            .collect();
        Self::from_pairs(
            keys.into_iter()
                .filter_map(|k| options.remove(&k).map(|v| (k, v))),
        )
    }

    /// True when no option is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The options as `(key, value)` pairs, sorted by key.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Options of one family (`"aws."`), with the prefix taken off the key.
    pub fn family<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.pairs()
            .filter_map(move |(k, v)| k.strip_prefix(prefix).map(|k| (k, v)))
    }

    /// The values of secret options (credentials, tokens, keys), to be redacted from texts.
    pub fn secret_values(&self) -> impl Iterator<Item = &str> {
        self.pairs()
            .filter(|(k, v)| is_secret_key(k) && !v.is_empty())
            .map(|(_, v)| v)
    }
}

impl fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.pairs()
                    .map(|(k, v)| (k, if is_secret_key(k) { "***" } else { v })),
            )
            .finish()
    }
}

/// The options of store `store` as a task carries them.
pub fn to_proto(store: &str, options: &StoreOptions) -> crate::protobuf::StoreConfig {
    crate::protobuf::StoreConfig {
        store: store.to_string(),
        options: options
            .pairs()
            .map(|(key, value)| crate::protobuf::KeyValue {
                key: key.to_string(),
                value: value.to_string(),
            })
            .collect(),
    }
}

/// The store and options a task carries.
pub fn from_proto(config: &crate::protobuf::StoreConfig) -> (String, StoreOptions) {
    let pairs = config
        .options
        .iter()
        .map(|kv| (kv.key.as_str(), kv.value.clone()));
    (config.store.clone(), StoreOptions::from_pairs(pairs))
}

/// True for a key of `OPTIONS` that configures a store (`aws.region`, `azure.account_key`).
pub fn is_store_option(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    PREFIXES.iter().any(|p| key.starts_with(p))
}

/// True for a store option whose value is a credential: access keys, secrets, tokens,
/// passwords, account and service-account keys.
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    let name = key.rsplit('.').next().unwrap_or(&key);
    name == "key"
        || [
            "_key",
            "_key_id",
            "secret",
            "token",
            "password",
            "_key_base64",
        ]
        .iter()
        .any(|suffix| name.ends_with(suffix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_options_are_split_from_format_options_and_secrets_hidden() {
        let mut options: HashMap<String, String> = [
            ("format.has_header", "true"),
            ("aws.access_key_id", "AKIDEXAMPLE"),
            ("AWS.SECRET_ACCESS_KEY", "s3cr3t"),
            ("aws.region", "us-east-1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let store = StoreOptions::take_from(&mut options);
        assert_eq!(options.len(), 1);
        assert_eq!(store.family("aws.").count(), 3);
        let mut secrets: Vec<_> = store.secret_values().collect();
        secrets.sort();
        assert_eq!(secrets, vec!["AKIDEXAMPLE", "s3cr3t"]);
        let shown = format!("{store:?}");
        assert!(
            !shown.contains("s3cr3t") && shown.contains("us-east-1"),
            "{shown}"
        );
        assert_eq!(
            store_key(&Url::parse("s3://bucket/a/b").unwrap()),
            "s3://bucket"
        );
        assert_eq!(
            store_key(&Url::parse("http://127.0.0.1:9000/x").unwrap()),
            "http://127.0.0.1:9000"
        );
        assert!(is_secret_key("azure.account_key") && is_secret_key("gcp.service_account_key"));
        assert!(!is_secret_key("aws.allow_http") && !is_secret_key("aws.endpoint"));
    }
}
