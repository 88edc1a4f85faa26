//! The file sandbox at the IO layer: an object store for `file://` that refuses every path
//! outside the allowed roots, symlinks followed.
//!
//! [`crate::sandbox::Sandbox`] checks the locations a statement names before it is planned, with
//! clear errors. This store is the second, deeper check: every read, listing and write of a
//! local file that DataFusion does — on the scheduler (DDL, `CREATE TABLE AS`, plans that run
//! there) and on executors (scans and sinks of tasks) — goes through it, so a file reached by
//! any route (a symlink inside a root, a table registered some other way, a hand-built task) is
//! refused when it is touched.

use std::sync::Arc;

use datafusion::object_store::local::LocalFileSystem;
use datafusion::object_store::path::Path;
use datafusion::object_store::{Error, Result};

use crate::sandbox::Sandbox;
use crate::stores::checked::{CheckedStore, PathCheck};

/// A sandbox's roots as a check of local store paths (symlinks followed).
#[derive(Debug)]
struct Roots {
    files: LocalFileSystem,
    sandbox: Sandbox,
}

impl PathCheck for Roots {
    fn check(&self, location: &Path) -> Result<()> {
        let path = self.files.path_to_filesystem(location)?;
        self.sandbox
            .check_fs_path(&path)
            .map_err(|e| Error::PermissionDenied {
                path: path.display().to_string(),
                source: Box::new(e),
            })
    }
}

/// Local files, confined to `sandbox`'s roots.
pub fn sandboxed_store(sandbox: Sandbox) -> CheckedStore {
    let check = Arc::new(Roots {
        files: LocalFileSystem::new(),
        sandbox,
    });
    CheckedStore::new(Arc::new(LocalFileSystem::new()), "Sandboxed", check)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::object_store::{ObjectStore, ObjectStoreExt};
    use futures::StreamExt;

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
        let store = sandboxed_store(sandbox);
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
        let names: Vec<String> = listed
            .iter()
            .map(|r| r.as_ref().unwrap().location.filename().unwrap().to_string())
            .collect();
        // Listings leave out what they may not show: the link's name and size do not get out.
        assert_eq!(names, vec!["t.csv".to_string()]);
        let by_folder = store.list_with_delimiter(Some(&path(&root))).await.unwrap();
        assert_eq!(by_folder.objects.len(), 1);
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
