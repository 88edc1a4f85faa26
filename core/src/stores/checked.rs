//! A store whose every request is checked first: each read, listing, write, copy, rename and
//! delete names a path that must pass a [`PathCheck`] before the inner store is touched, and
//! listings leave out the entries that do not pass. The
//! sandbox's local file store and the guard of remote stores are both this wrapper with their
//! own check.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
};

/// Decides whether a path of a store may be touched.
pub trait PathCheck: fmt::Debug + Send + Sync + 'static {
    /// `Ok` when `location` (a path, or a listing prefix) may be touched.
    fn check(&self, location: &Path) -> Result<()>;
}

/// `inner`, touched only at paths that pass `check`.
#[derive(Debug)]
pub struct CheckedStore {
    inner: Arc<dyn ObjectStore>,
    label: &'static str,
    check: Arc<dyn PathCheck>,
}

impl CheckedStore {
    /// `inner` behind `check`; `label` names the wrapper in its display (`Sandboxed(...)`).
    pub fn new(
        inner: Arc<dyn ObjectStore>,
        label: &'static str,
        check: Arc<dyn PathCheck>,
    ) -> Self {
        Self {
            inner,
            label,
            check,
        }
    }

    fn check(&self, location: &Path) -> Result<()> {
        self.check.check(location)
    }

    fn check_prefix(&self, prefix: Option<&Path>) -> Result<()> {
        self.check(prefix.unwrap_or(&Path::default()))
    }

    /// A listing whose every entry is checked too: an entry the check refuses (reached
    /// through a symlink that leads out of the allowed paths) is left out, so not even its
    /// name and size get out, and a glob or folder beside it still lists the rest.
    fn checked_entries(
        &self,
        entries: BoxStream<'static, Result<ObjectMeta>>,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        let check = Arc::clone(&self.check);
        entries
            .filter_map(move |entry| {
                let kept = match entry {
                    Ok(meta) => match check.check(&meta.location) {
                        Ok(()) => Some(Ok(meta)),
                        Err(e) => {
                            tracing::warn!(error = %e, "listing entry left out");
                            None
                        }
                    },
                    Err(e) => Some(Err(e)),
                };
                futures::future::ready(kept)
            })
            .boxed()
    }
}

impl fmt::Display for CheckedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.label, self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for CheckedStore {
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
        let check = Arc::clone(&self.check);
        let checked = locations
            .map(move |location| {
                let location = location?;
                check.check(&location).map(|()| location)
            })
            .boxed();
        self.inner.delete_stream(checked)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        match self.check_prefix(prefix) {
            Ok(()) => self.checked_entries(self.inner.list(prefix)),
            Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
        }
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        match self.check_prefix(prefix) {
            Ok(()) => self.checked_entries(self.inner.list_with_offset(prefix, offset)),
            Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
        }
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.check_prefix(prefix)?;
        let mut listed = self.inner.list_with_delimiter(prefix).await?;
        listed.common_prefixes.retain(|p| self.check(p).is_ok());
        listed.objects.retain(|o| self.check(&o.location).is_ok());
        Ok(listed)
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
