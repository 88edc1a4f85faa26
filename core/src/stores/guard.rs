//! A remote store confined to the sandbox's URL roots: every read, listing and write of a path
//! outside the allowed prefixes of that bucket is refused when it is touched, however the plan
//! reached it (the sandbox's plan check is the first, friendlier line).

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, Error, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
};

/// `inner`, but only below `prefixes` (object paths; an empty one allows the whole store).
#[derive(Debug)]
pub struct GuardedStore {
    inner: Arc<dyn ObjectStore>,
    store: String,
    prefixes: Arc<Vec<String>>,
}

impl fmt::Display for GuardedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Guarded({})", self.inner)
    }
}

/// True when object path `path` is `prefix` or below it (whole segments).
pub fn below(path: &str, prefix: &str) -> bool {
    let (path, prefix) = (path.trim_matches('/'), prefix.trim_matches('/'));
    prefix.is_empty()
        || path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

impl GuardedStore {
    /// Confine `inner` (the store `store`, e.g. `s3://bucket`) to `prefixes`.
    pub fn new(inner: Arc<dyn ObjectStore>, store: String, prefixes: Vec<String>) -> Self {
        Self {
            inner,
            store,
            prefixes: Arc::new(prefixes),
        }
    }

    fn check(&self, location: &Path) -> Result<()> {
        check(&self.store, &self.prefixes, location)
    }

    fn check_prefix(&self, prefix: Option<&Path>) -> Result<()> {
        self.check(prefix.unwrap_or(&Path::default()))
    }
}

fn check(store: &str, prefixes: &[String], location: &Path) -> Result<()> {
    if prefixes.iter().any(|p| below(location.as_ref(), p)) {
        return Ok(());
    }
    let allowed: Vec<String> = prefixes.iter().map(|p| format!("{store}/{p}")).collect();
    Err(Error::PermissionDenied {
        path: format!("{store}/{location}"),
        source: format!(
            "{store}/{location} is outside the sandbox (allowed here: {}; see --allowed-path)",
            allowed.join(", ")
        )
        .into(),
    })
}

#[async_trait::async_trait]
impl ObjectStore for GuardedStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.check(location)?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.check(location)?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.check(location)?;
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.check(location)?;
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let (store, prefixes) = (self.store.clone(), Arc::clone(&self.prefixes));
        let checked = locations
            .map(move |location| {
                let location = location?;
                check(&store, &prefixes, &location).map(|()| location)
            })
            .boxed();
        self.inner.delete_stream(checked)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        match self.check_prefix(prefix) {
            Ok(()) => self.inner.list(prefix),
            Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
        }
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        match self.check_prefix(prefix) {
            Ok(()) => self.inner.list_with_offset(prefix, offset),
            Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
        }
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.check_prefix(prefix)?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.check(from)?;
        self.check(to)?;
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.check(from)?;
        self.check(to)?;
        self.inner.rename_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let store = GuardedStore::new(inner, "s3://b".into(), vec!["data".into()]);
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
