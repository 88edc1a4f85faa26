//! The file sandbox at the IO layer: an object store for `file://` that refuses every path
//! outside the allowed roots, symlinks followed.
//!
//! [`crate::sandbox::Sandbox`] checks the locations a statement names before it is planned, with
//! clear errors. This store is the second, deeper check: every read, listing and write of a
//! local file that DataFusion does — on the scheduler (DDL, `CREATE TABLE AS`, plans that run
//! there) and on executors (scans and sinks of tasks) — goes through it, so a file reached by
//! any route (a symlink inside a root, a table registered some other way, a hand-built task) is
//! refused when it is touched.

use std::fmt;
use std::ops::Range;

use bytes::Bytes;
use datafusion::object_store::local::LocalFileSystem;
use datafusion::object_store::path::Path;
use datafusion::object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
};
use futures::stream::{BoxStream, StreamExt};

use crate::sandbox::Sandbox;

/// Local files, confined to a sandbox's roots.
#[derive(Debug)]
pub struct SandboxedStore {
    inner: LocalFileSystem,
    sandbox: Sandbox,
}

impl fmt::Display for SandboxedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sandboxed({})", self.inner)
    }
}

impl SandboxedStore {
    /// Local files under `sandbox`'s roots.
    pub fn new(sandbox: Sandbox) -> Self {
        Self {
            inner: LocalFileSystem::new(),
            sandbox,
        }
    }

    fn check(&self, location: &Path) -> Result<()> {
        let path = self.inner.path_to_filesystem(location)?;
        self.sandbox.check_fs_path(&path).map_err(|e| {
            datafusion::object_store::Error::PermissionDenied {
                path: path.display().to_string(),
                source: Box::new(e),
            }
        })
    }

    fn check_prefix(&self, prefix: Option<&Path>) -> Result<()> {
        match prefix {
            Some(prefix) => self.check(prefix),
            None => self.check(&Path::default()),
        }
    }
}

#[async_trait::async_trait]
impl ObjectStore for SandboxedStore {
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
        let sandbox = self.sandbox.clone();
        let checked = locations
            .map(move |location| {
                let location = location?;
                let store = SandboxedStore::new(sandbox.clone());
                store.check(&location).map(|()| location)
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
    use datafusion::object_store::ObjectStoreExt;

    #[tokio::test]
    async fn reads_lists_and_writes_stay_inside_the_roots() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("t.csv"), "a\n1\n").unwrap();
        let outside = dir.path().join("secret.txt");
        std::fs::write(&outside, "secret").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(&outside, root.join("link.csv")).unwrap();
        let sandbox = Sandbox::new(&[root.display().to_string()], true).unwrap();
        let store = SandboxedStore::new(sandbox);
        let path = |p: &std::path::Path| Path::from_filesystem_path(p).unwrap();

        let inside = store.get(&path(&root.join("t.csv"))).await.unwrap();
        assert_eq!(inside.bytes().await.unwrap().as_ref(), b"a\n1\n");
        let err = store.get(&path(&outside)).await.unwrap_err().to_string();
        assert!(err.contains("outside the file sandbox"), "{err}");
        #[cfg(unix)]
        {
            // A symlink inside a root is judged by where it points.
            let link = Path::parse(path(&root).to_string() + "/link.csv").unwrap();
            let err = store.get(&link).await.unwrap_err().to_string();
            assert!(err.contains("outside the file sandbox"), "{err}");
        }
        let listed: Vec<_> = store.list(Some(&path(&root))).collect().await;
        assert!(listed.iter().all(|r| r.is_ok()) && !listed.is_empty());
        let denied: Vec<_> = store.list(Some(&path(dir.path()))).collect().await;
        assert!(denied.iter().all(|r| r.is_err()));
        let target = Path::parse(path(dir.path()).to_string() + "/out.csv").unwrap();
        assert!(store.put(&target, "x".into()).await.is_err());
        assert!(!dir.path().join("out.csv").exists());
        let target = Path::parse(path(&root).to_string() + "/out.csv").unwrap();
        store.put(&target, "x".into()).await.unwrap();
        assert!(root.join("out.csv").exists());
    }
}
