//! A remote store confined to the sandbox's URL roots: every read, listing and write of a path
//! outside the allowed prefixes of that bucket is refused when it is touched, however the plan
//! reached it (the sandbox's plan check is the first, friendlier line).

use std::sync::Arc;

use object_store::path::Path;
use object_store::{Error, ObjectStore, Result};

use super::checked::{CheckedStore, PathCheck};

/// True when object path `path` is `prefix` or below it (whole segments).
pub fn below(path: &str, prefix: &str) -> bool {
    let (path, prefix) = (path.trim_matches('/'), prefix.trim_matches('/'));
    prefix.is_empty()
        || path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The allowed object path prefixes of one store (an empty prefix allows the whole store).
#[derive(Debug)]
struct Prefixes {
    store: String,
    prefixes: Vec<String>,
}

impl PathCheck for Prefixes {
    fn check(&self, location: &Path) -> Result<()> {
        let store = &self.store;
        if self.prefixes.iter().any(|p| below(location.as_ref(), p)) {
            return Ok(());
        }
        let allowed: Vec<String> = self
            .prefixes
            .iter()
            .map(|p| format!("{store}/{p}"))
            .collect();
        Err(Error::PermissionDenied {
            path: format!("{store}/{location}"),
            source: format!(
                "{store}/{location} is outside the sandbox (allowed here: {}; see --allowed-path)",
                allowed.join(", ")
            )
            .into(),
        })
    }
}

/// `inner` (the store `store`, e.g. `s3://bucket`), touched only below `prefixes`.
pub fn guarded(inner: Arc<dyn ObjectStore>, store: String, prefixes: Vec<String>) -> CheckedStore {
    CheckedStore::new(inner, "Guarded", Arc::new(Prefixes { store, prefixes }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use object_store::ObjectStoreExt;
    use object_store::memory::InMemory;

    #[tokio::test]
    async fn only_paths_below_the_prefixes_are_touched() {
        let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        inner
            .put(&Path::from("data/t/a.csv"), "a\n1\n".into())
            .await
            .unwrap();
        inner
            .put(&Path::from("secret/k"), "k".into())
            .await
            .unwrap();
        let store = guarded(inner, "s3://b".into(), vec!["data".into()]);
        assert!(store.get(&Path::from("data/t/a.csv")).await.is_ok());
        let err = store
            .get(&Path::from("secret/k"))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("s3://b/secret/k is outside the sandbox"),
            "{err}"
        );
        assert!(store.get(&Path::from("database/x")).await.is_err());
        let listed: Vec<_> = store.list(None).collect().await;
        assert!(listed.iter().all(|r| r.is_err()));
        assert!(store.put(&Path::from("other/x"), "x".into()).await.is_err());
        assert!(below("data/t", "data") && below("data", "") && !below("datab", "data"));
    }
}
