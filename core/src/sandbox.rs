//! The file sandbox: which paths and object-store URLs queries may read and write, and whether
//! DDL/DML may run.
//!
//! Locations named in SQL (`CREATE EXTERNAL TABLE ... LOCATION`, `COPY ... TO`, `INSERT INTO`
//! a listing table) and every file a physical plan scans or writes must resolve — symlinks
//! followed — inside one of the allowed local roots, or lie below one of the allowed URL roots
//! (`s3://bucket/prefix`, whole path segments). `..` components are refused outright, and so
//! is a URL whose store has no allowed root.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use datafusion::catalog::TableProvider;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::listing::{ListingTable, ListingTableUrl};
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::sink::DataSinkExec;
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::source_as_provider;
use datafusion::logical_expr::{DdlStatement, DmlStatement, LogicalPlan};
use datafusion::physical_plan::ExecutionPlan;

use datafusion::object_store::local::LocalFileSystem;

use crate::plan::write::file_sink_config;
use crate::plan::{CommitFilesExec, ShuffleReaderExec, ShuffleWriterExec, TaskWriteExec};
use crate::stores::guard::below;
use crate::stores::store_key;
use crate::{Result, VolleyError};

/// An allowed object-store root: a store (`s3://bucket`) and an object path prefix in it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct UrlRoot {
    store: String,
    prefix: String,
}

/// True for an allowed root written as a URL of a remote store (`s3://b/p`), not a local path.
pub fn is_url_root(root: &str) -> bool {
    root.split_once("://")
        .is_some_and(|(scheme, _)| scheme != "file" && !scheme.is_empty() && !scheme.contains('/'))
}

/// Allowed roots and the DDL switch.
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// None: no path restriction (in-process clusters of a library user).
    roots: Option<Arc<Vec<PathBuf>>>,
    urls: Arc<Vec<UrlRoot>>,
    allow_ddl: bool,
}

impl Sandbox {
    /// No path restriction; only the DDL switch applies.
    pub fn unrestricted(allow_ddl: bool) -> Self {
        Self {
            roots: None,
            urls: Arc::new(Vec::new()),
            allow_ddl,
        }
    }

    /// Allow `roots`: local folders (each must exist) and URL prefixes of object stores
    /// (`s3://bucket/prefix`); an empty list allows the current working directory.
    pub fn new(roots: &[String], allow_ddl: bool) -> Result<Self> {
        let mut canonical = Vec::new();
        let cwd = std::env::current_dir()?;
        let mut urls = Vec::new();
        for root in roots.iter().filter(|r| is_url_root(r)) {
            urls.push(parse_url_root(root)?);
        }
        let local: Vec<PathBuf> = roots
            .iter()
            .filter(|r| !is_url_root(r))
            .map(PathBuf::from)
            .collect();
        let roots: Vec<PathBuf> = if roots.is_empty() {
            vec![cwd.clone()]
        } else {
            local
        };
        for root in roots {
            let absolute = if root.is_absolute() {
                root.clone()
            } else {
                cwd.join(&root)
            };
            let resolved = absolute.canonicalize().map_err(|e| {
                VolleyError::Config(format!("allowed path {}: {e}", root.display()))
            })?;
            if !canonical.contains(&resolved) {
                canonical.push(resolved);
            }
        }
        Ok(Self {
            roots: Some(Arc::new(canonical)),
            urls: Arc::new(urls),
            allow_ddl,
        })
    }

    /// Object path prefixes allowed in store `store` (`s3://bucket`): None when nothing is
    /// restricted, empty when the store is not allowed at all.
    pub fn url_prefixes(&self, store: &str) -> Option<Vec<String>> {
        self.roots.as_ref()?;
        Some(
            self.urls
                .iter()
                .filter(|r| r.store == store)
                .map(|r| r.prefix.clone())
                .collect(),
        )
    }

    /// The error for a URL outside the allowed roots.
    pub fn url_denied(&self, location: &str) -> VolleyError {
        self.denied(location, "no allowed root contains it")
    }

    /// Check a URL of a remote store (the fixed part before any glob).
    fn check_url(&self, location: &str, store: &str, path: &str) -> Result<()> {
        let allowed = self
            .url_prefixes(store)
            .is_none_or(|prefixes| prefixes.iter().any(|p| below(path, p)));
        if allowed {
            Ok(())
        } else {
            Err(self.url_denied(location))
        }
    }

    /// The canonical allowed roots; None when paths are not restricted.
    pub fn roots(&self) -> Option<&[PathBuf]> {
        self.roots.as_deref().map(Vec::as_slice)
    }

    fn denied(&self, location: &str, why: &str) -> VolleyError {
        let mut roots: Vec<String> = self
            .roots()
            .unwrap_or_default()
            .iter()
            .map(|r| r.display().to_string())
            .collect();
        roots.extend(
            self.urls
                .iter()
                .map(|r| format!("{}/{}", r.store, r.prefix)),
        );
        if roots.is_empty() {
            roots.push("none".to_string());
        }
        VolleyError::NotAllowed(format!(
            "path {location:?} is outside the file sandbox: {why} (allowed roots: {}; see --allowed-path)",
            roots.join(", ")
        ))
    }

    /// Check a location as written by a user: a path or a URL, maybe with a glob. It is
    /// normalised by the parser DataFusion itself uses for table locations
    /// ([`ListingTableUrl::parse`]), so `file:/x`, `file:///x`, relative paths and globs are
    /// judged as what DataFusion will open.
    pub fn check_location(&self, location: &str) -> Result<()> {
        if self.roots.is_none() {
            return Ok(());
        }
        if Path::new(location)
            .components()
            .any(|c| c == Component::ParentDir)
            || location.split(['/', '\\']).any(|part| part == "..")
        {
            return Err(self.denied(location, "`..` is not allowed in paths"));
        }
        let url = ListingTableUrl::parse(location)
            .map_err(|e| self.denied(location, &format!("it is not a valid location ({e})")))?;
        if url.scheme() != "file" {
            return self.check_url(location, &store_key(url.get_url()), url.prefix().as_ref());
        }
        // The fixed part before any glob (DataFusion lists below it).
        let path = url
            .get_url()
            .to_file_path()
            .map_err(|()| self.denied(location, "it is not a local file path"))?;
        self.check_path(location, &path)?;
        self.check_store_path(location, &url)
    }

    /// Check a filesystem path about to be opened, listed or written (symlinks followed).
    pub fn check_fs_path(&self, path: &Path) -> Result<()> {
        if self.roots.is_none() {
            return Ok(());
        }
        self.check_path(&path.display().to_string(), path)
    }

    /// Check a resolved filesystem path, following symlinks of its existing part.
    fn check_path(&self, location: &str, path: &Path) -> Result<()> {
        let absolute = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir()?.join(path)
        };
        // Canonicalize the longest existing prefix; the rest (a file to be written) is appended.
        let mut existing = absolute.clone();
        let mut rest = Vec::new();
        let resolved = loop {
            match existing.canonicalize() {
                Ok(resolved) => break resolved,
                Err(_) => {
                    let Some(name) = existing.file_name().map(|n| n.to_os_string()) else {
                        return Err(self.denied(location, "it does not resolve"));
                    };
                    rest.push(name);
                    if !existing.pop() {
                        return Err(self.denied(location, "it does not resolve"));
                    }
                }
            }
        };
        let mut full = resolved;
        for name in rest.into_iter().rev() {
            full.push(name);
        }
        if self
            .roots()
            .unwrap_or_default()
            .iter()
            .any(|root| full.starts_with(root))
        {
            Ok(())
        } else {
            Err(self.denied(location, &format!("it resolves to {}", full.display())))
        }
    }

    /// Check a logical plan before it runs: DDL switch and every location it names.
    pub fn check_logical(&self, plan: &LogicalPlan) -> Result<()> {
        let mut result = Ok(());
        plan.apply_with_subqueries(|node| {
            result = self.check_logical_node(node);
            Ok(if result.is_ok() {
                TreeNodeRecursion::Continue
            } else {
                TreeNodeRecursion::Stop
            })
        })?;
        result
    }

    fn ddl_denied(&self, what: &str) -> Result<()> {
        if self.allow_ddl {
            Ok(())
        } else {
            Err(VolleyError::NotAllowed(format!(
                "{what} is disabled on this cluster (started with --disable-ddl)"
            )))
        }
    }

    fn check_logical_node(&self, node: &LogicalPlan) -> Result<()> {
        match node {
            LogicalPlan::Ddl(ddl) => {
                self.ddl_denied(&format!("DDL ({})", ddl.name()))?;
                if let DdlStatement::CreateExternalTable(create) = ddl {
                    for location in &create.locations {
                        self.check_location(location)?;
                    }
                }
                Ok(())
            }
            LogicalPlan::Copy(copy) => {
                self.ddl_denied("COPY")?;
                self.check_location(&copy.output_url)
            }
            LogicalPlan::Statement(datafusion::logical_expr::Statement::SetVariable(set)) => {
                check_setting(&set.variable)
            }
            // Tables read anywhere, `CREATE TABLE AS` and views included.
            LogicalPlan::TableScan(scan) => {
                if let Ok(provider) = source_as_provider(&scan.source) {
                    self.check_provider(provider.as_ref())?;
                }
                Ok(())
            }
            LogicalPlan::Dml(DmlStatement { target, op, .. }) => {
                self.ddl_denied(&format!("DML ({op})"))?;
                if let Ok(provider) = source_as_provider(target) {
                    self.check_provider(provider.as_ref())?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Check the location as the local file store will open it: DataFusion keeps a path's
    /// text as written in the store path, and the store decodes `%2E%2E` to `..`.
    fn check_store_path(&self, location: &str, url: &ListingTableUrl) -> Result<()> {
        let opened = LocalFileSystem::new()
            .path_to_filesystem(url.prefix())
            .map_err(|e| self.denied(location, &format!("it is not a local file path ({e})")))?;
        if opened
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        {
            return Err(self.denied(location, "`..` is not allowed in paths"));
        }
        self.check_path(location, &opened)
    }

    /// Check a file of a plan as the local file store will open it (it reads `%2E%2E` in a
    /// store path as `..`).
    fn check_store_file(
        &self,
        store: &str,
        location: &datafusion::object_store::path::Path,
    ) -> Result<()> {
        if self.roots.is_none() {
            return Ok(());
        }
        if !store.starts_with("file://") {
            let store = store.trim_end_matches('/');
            return self.check_url(&format!("{store}/{location}"), store, location.as_ref());
        }
        let shown = format!("/{location}");
        let opened = LocalFileSystem::new()
            .path_to_filesystem(location)
            .map_err(|e| self.denied(&shown, &format!("it is not a local file path ({e})")))?;
        self.check_path(&shown, &opened)
    }

    fn check_provider(&self, provider: &dyn TableProvider) -> Result<()> {
        if let Some(listing) = provider.downcast_ref::<ListingTable>() {
            for url in listing.table_paths() {
                self.check_location(url.as_str())?;
            }
        }
        Ok(())
    }

    /// Check every file a physical plan reads or writes.
    pub fn check_physical(&self, plan: &Arc<dyn ExecutionPlan>) -> Result<()> {
        let mut result = Ok(());
        plan.apply(|node| {
            result = self.check_physical_node(node.as_ref());
            Ok(if result.is_ok() {
                TreeNodeRecursion::Continue
            } else {
                TreeNodeRecursion::Stop
            })
        })?;
        result
    }

    fn check_physical_node(&self, node: &dyn ExecutionPlan) -> Result<()> {
        // Shuffle nodes name files and stages of the cluster itself; only the scheduler's
        // stage cutting places them, never a submitted plan.
        if node.downcast_ref::<ShuffleReaderExec>().is_some()
            || node.downcast_ref::<ShuffleWriterExec>().is_some()
            || node.downcast_ref::<TaskWriteExec>().is_some()
            || node.downcast_ref::<CommitFilesExec>().is_some()
        {
            return Err(VolleyError::NotAllowed(format!(
                "a submitted plan may not contain {} (the scheduler places shuffle and write nodes itself)",
                node.name()
            )));
        }
        if let Some(source) = node.downcast_ref::<DataSourceExec>()
            && let Some(scan) = source.data_source().downcast_ref::<FileScanConfig>()
        {
            self.check_store(scan.object_store_url.as_str())?;
            for group in &scan.file_groups {
                for file in group.files() {
                    self.check_store_file(
                        scan.object_store_url.as_str(),
                        &file.object_meta.location,
                    )?;
                }
            }
        }
        if let Some(sink) = node.downcast_ref::<DataSinkExec>() {
            let config = file_sink_config(sink.sink());
            self.ddl_denied("writing files")?;
            if let Some(config) = config {
                self.check_store(config.object_store_url.as_str())?;
                // A plan that travelled (DataFrame API) has lost the URL as written; its
                // table paths remain.
                if !config.original_url.is_empty() {
                    self.check_location(&config.original_url)?;
                }
                for url in &config.table_paths {
                    self.check_location(url.as_str())?;
                }
            }
        }
        Ok(())
    }

    fn check_store(&self, url: &str) -> Result<()> {
        if url.starts_with("file://") {
            return Ok(());
        }
        match self.url_prefixes(url.trim_end_matches('/')) {
            Some(prefixes) if prefixes.is_empty() => Err(self.url_denied(url)),
            _ => Ok(()),
        }
    }
}

/// An allowed URL root: `s3://bucket/prefix` → store `s3://bucket`, prefix `prefix`.
fn parse_url_root(root: &str) -> Result<UrlRoot> {
    let bad = |why: &str| VolleyError::Config(format!("allowed path {root}: {why}"));
    // Checked on the text: URL parsing folds `..` away.
    if root.split('/').any(|p| p == ".." || p == ".") {
        return Err(bad("`..` is not allowed in paths"));
    }
    let url = url::Url::parse(root).map_err(|e| bad(&e.to_string()))?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("a URL root names its bucket or host"));
    }
    let prefix = datafusion::object_store::path::Path::from_url_path(url.path())
        .map_err(|e| bad(&e.to_string()))?;
    if prefix.as_ref().split('/').any(|p| p == ".." || p == ".") {
        return Err(bad("`..` is not allowed in paths"));
    }
    Ok(UrlRoot {
        store: store_key(&url),
        prefix: prefix.as_ref().to_string(),
    })
}

/// Refuse session settings of the process-wide runtime (`datafusion.runtime.*`: spill folder,
/// memory pool): a client could create folders anywhere or escape the scheduler's memory limit.
pub fn check_setting(key: &str) -> Result<()> {
    if key
        .trim()
        .to_ascii_lowercase()
        .starts_with("datafusion.runtime.")
    {
        return Err(VolleyError::NotAllowed(format!(
            "{key} is set by the cluster's operator, not per session"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("t.csv"), "a\n1\n").unwrap();
        let sandbox = Sandbox::new(&[root.display().to_string()], true).unwrap();
        let inside = root.join("t.csv").display().to_string();
        assert!(sandbox.check_location(&inside).is_ok());
        assert!(sandbox.check_location(&format!("file://{inside}")).is_ok());
        assert!(
            sandbox
                .check_location(&root.join("new/out.parquet").display().to_string())
                .is_ok()
        );
        assert!(
            sandbox
                .check_location(&root.join("*.csv").display().to_string())
                .is_ok()
        );
        assert!(sandbox.check_location("/etc/passwd").is_err());
        assert!(
            sandbox
                .check_location(&format!("{}/../x", root.display()))
                .is_err()
        );
        assert!(sandbox.check_location("s3://bucket/x").is_err());
        let with_s3 = Sandbox::new(
            &[root.display().to_string(), "s3://bucket/data".to_string()],
            true,
        )
        .unwrap();
        assert!(with_s3.check_location("s3://bucket/data/t/").is_ok());
        assert!(with_s3.check_location("s3://bucket/data").is_ok());
        let err = with_s3
            .check_location("s3://bucket/database/")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("s3://bucket/database/") && err.contains("s3://bucket/data"),
            "{err}"
        );
        assert!(with_s3.check_location("s3://other/data/").is_err());
        assert!(with_s3.check_location("s3://bucket/data/../x").is_err());
        assert_eq!(
            with_s3.url_prefixes("s3://bucket"),
            Some(vec!["data".to_string()])
        );
        assert_eq!(with_s3.url_prefixes("s3://other"), Some(vec![]));
        assert!(Sandbox::new(&["s3://b/../x".to_string()], true).is_err());
        // `file:` without `//` is a URL too (DataFusion opens /etc/passwd), not a relative path.
        let err = sandbox
            .check_location("file:/etc/passwd")
            .unwrap_err()
            .to_string();
        assert!(err.contains("resolves to /etc/passwd"), "{err}");
        assert!(sandbox.check_location("file:///etc/passwd").is_err());
        assert!(
            sandbox
                .check_location("file://otherhost/etc/passwd")
                .is_err()
        );
        assert!(sandbox.check_location("/etc/*.conf").is_err());
        assert!(check_setting("datafusion.runtime.temp_directory").is_err());
        assert!(check_setting("datafusion.execution.batch_size").is_ok());
        assert!(
            sandbox
                .check_location(&format!("file:{}", root.join("t.csv").display()))
                .is_ok()
        );
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink("/etc", root.join("escape")).unwrap();
            let err = sandbox
                .check_location(&root.join("escape/passwd").display().to_string())
                .unwrap_err()
                .to_string();
            assert!(err.contains("resolves to /etc/passwd"), "{err}");
        }
    }
}
