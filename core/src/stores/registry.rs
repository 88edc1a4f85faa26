//! DataFusion's object store registry for Volley: a [`StoreCache`] of built stores shared by a
//! process, and a [`StoreScope`] per session (scheduler) or per task (executor) that knows the
//! per-table options of that session or task.
//!
//! Local files are served through [`sandboxed_store`]; a remote store is built on first use from
//! the environment and the scope's options for it, then confined to the sandbox's URL roots by
//! a [`guarded`] store. A scope never sees another scope's options: one session's credentials
//! are not usable from another.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::error::{DataFusionError, Result};
use datafusion::execution::object_store::ObjectStoreRegistry;
use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use parking_lot::{Mutex, RwLock};
use url::Url;

use super::build::build_store;
use super::guard::guarded;
use super::options::{StoreOptions, store_key};
use crate::sandbox::Sandbox;
use crate::sandbox_store::sandboxed_store;

/// Built stores kept per process; beyond this many, the cache starts over.
const MAX_CACHED_STORES: usize = 256;

/// The stores a process has built, by store and options.
#[derive(Debug)]
pub struct StoreCache {
    sandbox: Sandbox,
    local: Arc<dyn ObjectStore>,
    built: Mutex<HashMap<(String, StoreOptions), Arc<dyn ObjectStore>>>,
}

impl StoreCache {
    /// Stores confined to `sandbox`.
    pub fn new(sandbox: Sandbox) -> Arc<Self> {
        let local: Arc<dyn ObjectStore> = if sandbox.roots().is_some() {
            Arc::new(sandboxed_store(sandbox.clone()))
        } else {
            Arc::new(LocalFileSystem::new())
        };
        Arc::new(Self {
            sandbox,
            local,
            built: Mutex::new(HashMap::new()),
        })
    }

    /// The store for `url` configured with `options`.
    pub fn get(&self, url: &Url, options: &StoreOptions) -> Result<Arc<dyn ObjectStore>> {
        if url.scheme() == "file" {
            return Ok(Arc::clone(&self.local));
        }
        let key = store_key(url);
        let prefixes = match self.sandbox.url_prefixes(&key) {
            Some(prefixes) if prefixes.is_empty() => {
                return Err(DataFusionError::External(Box::new(
                    self.sandbox.url_denied(url.as_str()),
                )));
            }
            other => other,
        };
        let cache_key = (key.clone(), options.clone());
        if let Some(store) = self.built.lock().get(&cache_key) {
            return Ok(Arc::clone(store));
        }
        let mut store = build_store(url, options)?;
        if let Some(prefixes) = prefixes {
            store = Arc::new(guarded(store, key, prefixes));
        }
        let mut built = self.built.lock();
        if built.len() >= MAX_CACHED_STORES {
            built.clear();
        }
        built.insert(cache_key, Arc::clone(&store));
        Ok(store)
    }
}

/// The registry of one session or task: per-store options over a shared [`StoreCache`].
#[derive(Debug)]
pub struct StoreScope {
    cache: Arc<StoreCache>,
    options: RwLock<HashMap<String, StoreOptions>>,
    registered: RwLock<HashMap<String, Arc<dyn ObjectStore>>>,
}

impl StoreScope {
    /// A scope with no options of its own (environment only).
    pub fn new(cache: Arc<StoreCache>) -> Self {
        Self::with_options(cache, Vec::new())
    }

    /// A scope knowing `options` per store key (`s3://bucket`).
    pub fn with_options(cache: Arc<StoreCache>, options: Vec<(String, StoreOptions)>) -> Self {
        Self {
            cache,
            options: RwLock::new(options.into_iter().collect()),
            registered: RwLock::new(HashMap::new()),
        }
    }

    /// Use `options` for the store of `url` from now on (a table created with them); the
    /// store is built on its first use.
    pub fn configure(&self, url: &Url, options: StoreOptions) -> Result<()> {
        // Build now: a bad option fails the statement that gave it.
        self.cache.get(url, &options)?;
        self.options.write().insert(store_key(url), options);
        Ok(())
    }

    /// The options this scope has for each of `keys` (those it has any for).
    pub fn options_for<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a str>,
    ) -> Vec<(String, StoreOptions)> {
        let options = self.options.read();
        let mut found: Vec<(String, StoreOptions)> = keys
            .into_iter()
            .filter_map(|k| options.get(k).map(|o| (k.to_string(), o.clone())))
            .collect();
        found.sort();
        found.dedup();
        found
    }

    /// Every secret value this scope knows, to redact from texts.
    pub fn secrets(&self) -> Vec<String> {
        self.options
            .read()
            .values()
            .flat_map(|o| o.secret_values().map(str::to_string).collect::<Vec<_>>())
            .collect()
    }
}

impl ObjectStoreRegistry for StoreScope {
    fn register_store(
        &self,
        url: &Url,
        store: Arc<dyn ObjectStore>,
    ) -> Option<Arc<dyn ObjectStore>> {
        self.registered.write().insert(store_key(url), store)
    }

    fn deregister_store(&self, url: &Url) -> Result<Arc<dyn ObjectStore>> {
        self.registered
            .write()
            .remove(&store_key(url))
            .ok_or_else(|| DataFusionError::Execution(format!("no store registered for {url}")))
    }

    fn get_store(&self, url: &Url) -> Result<Arc<dyn ObjectStore>> {
        let key = store_key(url);
        if let Some(store) = self.registered.read().get(&key) {
            return Ok(Arc::clone(store));
        }
        let options = self.options.read().get(&key).cloned().unwrap_or_default();
        self.cache.get(url, &options)
    }
}
