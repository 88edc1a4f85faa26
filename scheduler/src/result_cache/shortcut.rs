//! The statement shortcut: a stored answer found again without planning the statement.
//!
//! Planning (optimizing, listing, physical planning) is most of what a hit costs. A session
//! that asks the same statement text again with the same settings, the same principal and an
//! unchanged catalog ([`CatalogEpoch`]) gets the plan it got before; what can still differ is
//! the files under its tables. So a cacheable query records, before it is planned, a listing of
//! every table root it reads ([`InputRoots`], which also fills the session's listing cache the
//! planner then uses), and a stored answer is remembered under the statement's
//! [`statement_key`] with those roots. Asked again, the roots are listed once more: equal
//! listings serve the answer; any difference (a file added, removed, rewritten) or any doubt
//! (a listing error) sends the statement down the full path, which plans and checks it as if
//! the shortcut did not exist.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::Session;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::listing::{ListingTable, ListingTableUrl};
use datafusion::datasource::source_as_provider;
use datafusion::execution::SessionState;
use datafusion::logical_expr::LogicalPlan;
use futures::TryStreamExt;
use volley_core::Result;

use super::key::sha256;

/// Epochs are unique across sessions: two sessions never share one, so a shortcut recorded in
/// one session is never taken in another (whose tables of the same names may be other files).
static NEXT_EPOCH: AtomicU64 = AtomicU64::new(1);

/// A session's catalog epoch (a session config extension): it moves on whenever a statement
/// may have changed the session's tables, views or settings.
#[derive(Debug)]
pub struct CatalogEpoch(AtomicU64);

impl Default for CatalogEpoch {
    fn default() -> Self {
        Self(AtomicU64::new(NEXT_EPOCH.fetch_add(1, Ordering::Relaxed)))
    }
}

impl CatalogEpoch {
    /// The current epoch.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// The catalog may have changed: shortcuts recorded until now are not taken any more.
    pub fn bump(&self) {
        self.0.store(
            NEXT_EPOCH.fetch_add(1, Ordering::Relaxed),
            Ordering::Release,
        );
    }
}

/// The key a statement's shortcut is remembered under: its principal, catalog epoch, text
/// and every setting of the session.
pub fn statement_key(
    principal: &str,
    epoch: u64,
    sql: &str,
    settings: &[(String, String)],
) -> String {
    let mut text = String::from("volley statement shortcut v1\n");
    let _ = writeln!(text, "principal {principal}\nepoch {epoch}");
    let mut sorted: Vec<&(String, String)> = settings.iter().collect();
    sorted.sort();
    for (k, v) in sorted {
        let _ = writeln!(text, "set {k}={v}");
    }
    let _ = write!(text, "sql {sql}");
    sha256(&text)
}

/// The roots of the tables a query reads and a hash of what was listed under them.
#[derive(Debug)]
pub struct InputRoots {
    roots: Vec<(ListingTableUrl, String)>,
    /// Hash of every listed object (location, size, last modified, e-tag, version).
    listed: String,
}

impl InputRoots {
    /// List the roots of every table of files `logical` reads (views and subqueries followed).
    /// None when a root cannot be listed: no shortcut then.
    pub async fn list(state: &SessionState, logical: &LogicalPlan) -> Option<Self> {
        let roots = table_roots(logical);
        match list_roots(state, &roots).await {
            Ok(listed) => Some(Self { roots, listed }),
            Err(e) => {
                tracing::debug!(error = %e, "table roots not listed: no statement shortcut");
                None
            }
        }
    }

    /// True when listing the same roots again in `state` finds exactly what was listed.
    pub async fn unchanged(&self, state: &SessionState) -> bool {
        list_roots(state, &self.roots)
            .await
            .is_ok_and(|listed| listed == self.listed)
    }
}

/// A stored answer's shortcut.
#[derive(Debug, Clone)]
pub struct Shortcut {
    /// The full key of the stored answer.
    pub key: String,
    /// The input files' hash the answer was stored with.
    pub inputs_hash: String,
    /// The roots listed before the statement was planned.
    pub roots: Arc<InputRoots>,
    /// The answer's schema.
    pub schema: SchemaRef,
}

/// Root URL and file extension of every table of files `logical` reads.
fn table_roots(logical: &LogicalPlan) -> Vec<(ListingTableUrl, String)> {
    let mut roots = Vec::new();
    let _ = logical.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && let Ok(provider) = source_as_provider(&scan.source)
        {
            if let Some(table) = provider.downcast_ref::<ListingTable>() {
                let extension = table.options().file_extension.clone();
                for path in table.table_paths() {
                    roots.push((path.clone(), extension.clone()));
                }
            } else if let Some(view) = provider.get_logical_plan() {
                roots.extend(table_roots(view.as_ref()));
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    roots.sort_by(|a, b| (a.0.as_str(), &a.1).cmp(&(b.0.as_str(), &b.1)));
    roots.dedup_by(|a, b| a.0.as_str() == b.0.as_str() && a.1 == b.1);
    roots
}

/// A hash of every object listed under `roots` now, through `state`'s stores and listing
/// cache (the caller empties the cache first).
async fn list_roots(state: &SessionState, roots: &[(ListingTableUrl, String)]) -> Result<String> {
    let mut text = String::new();
    for (root, extension) in roots {
        let store = state.runtime_env().object_store(root.object_store())?;
        let mut listed: Vec<_> = root
            .list_all_files(state as &dyn Session, store.as_ref(), extension)
            .await?
            .try_collect()
            .await?;
        listed.sort_by(|a, b| a.location.cmp(&b.location));
        let _ = writeln!(text, "root {} {extension}", root.as_str());
        for meta in listed {
            let _ = writeln!(
                text,
                "{} {} {:?} {:?} {:?}",
                meta.location, meta.size, meta.last_modified, meta.e_tag, meta.version
            );
        }
    }
    Ok(sha256(&text))
}
