//! Object stores: which store serves a table URL — local files through the sandbox, S3, GCS,
//! Azure and HTTP(S) built from the standard environment and per-table options — the options a
//! job's tasks carry to the executors, and keeping the secrets among them out of every text a
//! user or a log sees.
//!
//! Layers: [`options`] (what a store is configured with) → [`build`] (a store from a URL and
//! options) → [`checked`] (a store whose every request passes a path check) → [`guard`] (a
//! remote store confined to the sandbox's URL roots) → [`registry`]
//! (DataFusion's registry: one shared cache of built stores, one scope per session or task);
//! [`redact`] stands beside them and only reads [`options`].

pub mod build;
pub mod checked;
pub mod guard;
pub mod options;
pub mod plan;
pub mod redact;
pub mod registry;

pub use options::{StoreOptions, store_key};
pub use registry::{StoreCache, StoreScope};

use std::time::Duration;

use datafusion::execution::cache::cache_manager::CacheManagerConfig;

/// How long a table's file listing is reused before the store is listed again.
pub const LISTING_TTL: Duration = Duration::from_secs(30);

/// File caches of a Volley runtime: Parquet footers (DataFusion's metadata cache) and file
/// listings, the latter for [`LISTING_TTL`] so that files added under a table are seen.
pub fn cache_config() -> CacheManagerConfig {
    CacheManagerConfig::default().with_list_files_cache_ttl(Some(LISTING_TTL))
}

/// Forget `runtime`'s file listings: the next plan lists its tables' stores again.
pub fn forget_listings(runtime: &datafusion::execution::runtime_env::RuntimeEnv) {
    if let Some(listings) = runtime.cache_manager.get_list_files_cache() {
        listings.clear();
    }
}
