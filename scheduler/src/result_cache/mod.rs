//! L5: the result cache — answers of finished queries kept on the scheduler and served again
//! to the same caller for the same plan while its input files are unchanged and the entry is
//! younger than the asking session's `volley.result_cache_ttl`.
//!
//! Entries are Arrow IPC streams: in memory up to [`MEMORY_ENTRY_BYTES`], in files of the
//! cache's folder above; all of them together stay under the configured bytes, the least
//! recently used going first. A query being computed is *in flight*: an identical one asks to
//! wait for it ([`Lookup::InFlight`]) instead of computing it a second time. An entry whose
//! input file is listed with another size, date, e-tag or version than when it was stored is
//! evicted as soon as any query lists that file. [`key`] says what makes two queries the same.

pub mod key;
pub mod shortcut;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use tokio::sync::watch;
use volley_core::{Result, VolleyError};

pub use key::{CacheUse, FileVersion, QueryKey, file_versions, query_key, uncacheable};
pub use shortcut::{CatalogEpoch, InputRoots, Shortcut, statement_key};

/// Entries up to this many bytes stay in memory; larger ones go to a file.
pub const MEMORY_ENTRY_BYTES: usize = 1024 * 1024;

/// Most entries kept (eviction scans them: a bound keeps it cheap).
pub const MAX_ENTRIES: usize = 10_000;

/// What one input file's record costs beyond its location's bytes (counted in the cache's
/// size, so that small answers over many files cannot hold unbounded memory).
const INPUT_RECORD_BYTES: u64 = 96;

/// Counters the cache moves (Prometheus).
#[derive(Clone)]
pub struct CacheCounters {
    /// Lookups answered from the cache (also a waiter served by the query it waited for).
    pub hits: IntCounter,
    /// Of the hits, those served by a statement shortcut (not planned).
    pub unplanned_hits: IntCounter,
    /// Lookups of cacheable queries that found nothing usable.
    pub misses: IntCounter,
    /// Entries dropped: expired, inputs changed, room for newer ones.
    pub evictions: IntCounter,
}

/// Where an entry's bytes are.
#[derive(Debug, Clone)]
pub enum CachedData {
    /// In memory.
    Memory(Arc<Vec<u8>>),
    /// In a file of the cache's folder.
    File(PathBuf),
}

impl CachedData {
    /// The Arrow IPC stream (a file is read; call it outside locks).
    pub fn read(&self) -> Result<Vec<u8>> {
        match self {
            CachedData::Memory(bytes) => Ok(bytes.as_ref().clone()),
            CachedData::File(path) => std::fs::read(path).map_err(|e| {
                VolleyError::Internal(format!(
                    "cannot read result cache file {}: {e}",
                    path.display()
                ))
            }),
        }
    }
}

/// A stored answer being served.
#[derive(Debug, Clone)]
pub struct CachedResult {
    /// Its bytes.
    pub data: CachedData,
    /// Rows.
    pub rows: u64,
    /// How long ago it was stored.
    pub age: Duration,
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    /// A stored answer.
    Hit(CachedResult),
    /// An identical query is running: the receiver changes when it ended (stored or not).
    InFlight {
        /// The job computing it.
        job_id: String,
        /// Changes (or closes) when that job's answer was stored or given up.
        done: watch::Receiver<bool>,
    },
    /// Nothing usable; why.
    Miss(&'static str),
}

struct Entry {
    data: CachedData,
    bytes: u64,
    rows: u64,
    stored: Instant,
    /// The storing session's TTL: the entry is dropped once older.
    ttl: Duration,
    inputs_hash: String,
    inputs: Vec<FileVersion>,
    used: u64,
}

struct InFlight {
    job_id: String,
    inputs_hash: String,
    done: watch::Sender<bool>,
}

/// The scheduler's result cache (see the module doc).
pub struct ResultCache {
    capacity: u64,
    folder: Option<PathBuf>,
    /// A folder made for this process when none was configured (removed on drop).
    temporary: Option<tempfile::TempDir>,
    entries: HashMap<String, Entry>,
    /// Input file location -> keys of the entries that read it.
    by_file: HashMap<String, HashSet<String>>,
    in_flight: HashMap<String, InFlight>,
    /// Statement key -> the stored answer it found (see [`shortcut`]).
    shortcuts: HashMap<String, Shortcut>,
    bytes: u64,
    clock: u64,
    counters: CacheCounters,
}

impl ResultCache {
    /// A cache of at most `capacity` bytes (0: off) keeping large entries under `folder`
    /// (None: a temporary folder made when the first one is stored).
    pub fn new(capacity: u64, folder: Option<PathBuf>, counters: CacheCounters) -> Self {
        Self {
            capacity,
            folder,
            temporary: None,
            entries: HashMap::new(),
            by_file: HashMap::new(),
            in_flight: HashMap::new(),
            shortcuts: HashMap::new(),
            bytes: 0,
            clock: 0,
            counters,
        }
    }

    /// False when the cache was configured with no room.
    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    /// Bytes of the stored answers.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Stored answers.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Look `query` up for a session whose TTL is `ttl`: entries whose input files changed
    /// go first; then a stored answer, or the job computing it, or a miss.
    pub fn lookup(&mut self, query: &QueryKey, ttl: Duration) -> Lookup {
        self.evict_changed(&query.inputs);
        let result = match self.find(&query.key, &query.inputs_hash, ttl) {
            Err(why) => Lookup::Miss(why),
            Ok(Some(hit)) => Lookup::Hit(hit),
            Ok(None) => match self.in_flight.get(&query.key) {
                Some(f) if f.inputs_hash == query.inputs_hash => Lookup::InFlight {
                    job_id: f.job_id.clone(),
                    done: f.done.subscribe(),
                },
                _ => Lookup::Miss("not stored"),
            },
        };
        match &result {
            Lookup::Hit(_) => self.counters.hits.inc(),
            Lookup::Miss(_) => self.counters.misses.inc(),
            Lookup::InFlight { .. } => {}
        }
        result
    }

    /// The stored answer of `key` over inputs `inputs_hash`, if younger than `ttl` (None:
    /// nothing stored; an error: the stored one expired or read other inputs, and is evicted).
    fn find(
        &mut self,
        key: &str,
        inputs_hash: &str,
        ttl: Duration,
    ) -> Result<Option<CachedResult>, &'static str> {
        let now = Instant::now();
        let found = self.entries.get(key).map(|e| {
            let age = now.saturating_duration_since(e.stored);
            (age, age > ttl || age > e.ttl, e.inputs_hash == inputs_hash)
        });
        match found {
            None => Ok(None),
            Some((_, true, _)) => {
                self.evict(key);
                Err("the stored answer expired")
            }
            Some((_, _, false)) => {
                self.evict(key);
                Err("an input file changed")
            }
            Some((age, false, true)) => {
                self.clock += 1;
                let clock = self.clock;
                Ok(self.entries.get_mut(key).map(|entry| {
                    entry.used = clock;
                    CachedResult {
                        data: entry.data.clone(),
                        rows: entry.rows,
                        age,
                    }
                }))
            }
        }
    }

    /// The shortcut remembered under statement key `statement`, if its answer is still
    /// stored (see [`shortcut`]).
    pub fn shortcut(&mut self, statement: &str) -> Option<Shortcut> {
        let found = self.shortcuts.get(statement)?;
        if self.entries.contains_key(&found.key) {
            return Some(found.clone());
        }
        self.shortcuts.remove(statement);
        None
    }

    /// Serve the answer `shortcut` leads to, its roots having been listed unchanged; None
    /// (and the shortcut forgotten) when it is gone or expired for `ttl`.
    pub fn serve_shortcut(
        &mut self,
        statement: &str,
        shortcut: &Shortcut,
        ttl: Duration,
    ) -> Option<CachedResult> {
        let hit = self
            .find(&shortcut.key, &shortcut.inputs_hash, ttl)
            .ok()
            .flatten();
        match &hit {
            Some(_) => {
                self.counters.hits.inc();
                self.counters.unplanned_hits.inc();
            }
            None => {
                self.shortcuts.remove(statement);
            }
        }
        hit
    }

    /// Remember `shortcut` under statement key `statement`; its answer is stored.
    pub fn remember_shortcut(&mut self, statement: String, shortcut: Shortcut) {
        if self.shortcuts.len() >= MAX_ENTRIES {
            let entries = &self.entries;
            self.shortcuts.retain(|_, s| entries.contains_key(&s.key));
            if self.shortcuts.len() >= MAX_ENTRIES {
                self.shortcuts.clear();
            }
        }
        self.shortcuts.insert(statement, shortcut);
    }

    /// Forget the shortcut under statement key `statement` (its roots changed).
    pub fn forget_shortcut(&mut self, statement: &str) {
        self.shortcuts.remove(statement);
    }

    /// The age and rows of the answer a lookup of `query` would serve, without counting or
    /// evicting anything (EXPLAIN ANALYZE).
    pub fn peek(&self, query: &QueryKey, ttl: Duration) -> Option<(Duration, u64)> {
        let entry = self.entries.get(&query.key)?;
        let age = entry.stored.elapsed();
        (age <= ttl && age <= entry.ttl && entry.inputs_hash == query.inputs_hash)
            .then_some((age, entry.rows))
    }

    /// Job `job_id` computes `query` now: identical queries wait for it.
    pub fn begin(&mut self, query: &QueryKey, job_id: &str) {
        let (done, _) = watch::channel(false);
        self.in_flight.insert(
            query.key.clone(),
            InFlight {
                job_id: job_id.to_string(),
                inputs_hash: query.inputs_hash.clone(),
                done,
            },
        );
    }

    /// Job `job_id` no longer computes `query` (its answer was stored, or not): its waiters
    /// look again.
    pub fn end(&mut self, query: &QueryKey, job_id: &str) {
        if self
            .in_flight
            .get(&query.key)
            .is_some_and(|f| f.job_id == job_id)
            && let Some(flight) = self.in_flight.remove(&query.key)
        {
            flight.done.send_replace(true);
        }
    }

    /// Store the answer `ipc` (`rows` rows) of `query` for `ttl`; the least recently used
    /// entries make room. An answer larger than the whole cache is not stored.
    pub fn store(
        &mut self,
        query: &QueryKey,
        ipc: Vec<u8>,
        rows: u64,
        ttl: Duration,
    ) -> Result<()> {
        let inputs: u64 = query
            .inputs
            .iter()
            .map(|i| i.location.len() as u64 + INPUT_RECORD_BYTES)
            .sum();
        let bytes = ipc.len() as u64 + inputs;
        if bytes > self.capacity || ttl.is_zero() {
            return Ok(());
        }
        self.evict(&query.key);
        while self.bytes + bytes > self.capacity || self.entries.len() >= MAX_ENTRIES {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.evict(&oldest);
        }
        let data = if ipc.len() <= MEMORY_ENTRY_BYTES {
            CachedData::Memory(Arc::new(ipc))
        } else {
            // A new name each time: a hit reading an evicted entry's file never sees another
            // answer being written under its name.
            let path = self
                .folder()?
                .join(format!("{}-{}.arrow", query.key, self.clock));
            std::fs::write(&path, &ipc).map_err(|e| {
                VolleyError::Internal(format!(
                    "cannot write result cache file {}: {e}",
                    path.display()
                ))
            })?;
            CachedData::File(path)
        };
        self.clock += 1;
        for input in &query.inputs {
            self.by_file
                .entry(input.location.clone())
                .or_default()
                .insert(query.key.clone());
        }
        self.bytes += bytes;
        self.entries.insert(
            query.key.clone(),
            Entry {
                data,
                bytes,
                rows,
                stored: Instant::now(),
                ttl,
                inputs_hash: query.inputs_hash.clone(),
                inputs: query.inputs.clone(),
                used: self.clock,
            },
        );
        Ok(())
    }

    /// Drop the entry of `query` (its answer could not be read).
    pub fn forget(&mut self, query: &QueryKey) {
        self.evict(&query.key);
    }

    /// Drop the entries older than their TTL.
    pub fn expire(&mut self) {
        let now = Instant::now();
        let expired: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| now.saturating_duration_since(e.stored) > e.ttl)
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            self.evict(&key);
        }
    }

    /// Evict the entries that read one of `listed` when it had another version.
    fn evict_changed(&mut self, listed: &[FileVersion]) {
        let mut stale = Vec::new();
        for file in listed {
            let Some(keys) = self.by_file.get(&file.location) else {
                continue;
            };
            for key in keys {
                let changed = self.entries.get(key).is_some_and(|e| {
                    e.inputs
                        .iter()
                        .any(|i| i.location == file.location && i != file)
                });
                if changed {
                    stale.push(key.clone());
                }
            }
        }
        for key in stale {
            self.evict(&key);
        }
    }

    fn evict(&mut self, key: &str) {
        let Some(entry) = self.entries.remove(key) else {
            return;
        };
        self.counters.evictions.inc();
        self.bytes = self.bytes.saturating_sub(entry.bytes);
        for input in &entry.inputs {
            if let Some(keys) = self.by_file.get_mut(&input.location) {
                keys.remove(key);
                if keys.is_empty() {
                    self.by_file.remove(&input.location);
                }
            }
        }
        if let CachedData::File(path) = &entry.data
            && let Err(e) = std::fs::remove_file(path)
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove a result cache file");
        }
    }

    fn folder(&mut self) -> Result<PathBuf> {
        if let Some(folder) = &self.folder {
            std::fs::create_dir_all(folder).map_err(|e| {
                VolleyError::Config(format!(
                    "cannot create the result cache folder {}: {e}",
                    folder.display()
                ))
            })?;
            return Ok(folder.clone());
        }
        if self.temporary.is_none() {
            let dir = tempfile::Builder::new()
                .prefix("volley-result-cache-")
                .tempdir()
                .map_err(|e| {
                    VolleyError::Internal(format!("cannot create a result cache folder: {e}"))
                })?;
            self.temporary = Some(dir);
        }
        self.temporary
            .as_ref()
            .map(|d| d.path().to_path_buf())
            .ok_or_else(|| VolleyError::Internal("no result cache folder".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters() -> CacheCounters {
        CacheCounters {
            hits: IntCounter::new("h", "h").expect("counter"),
            unplanned_hits: IntCounter::new("u", "u").expect("counter"),
            misses: IntCounter::new("m", "m").expect("counter"),
            evictions: IntCounter::new("e", "e").expect("counter"),
        }
    }

    fn query(key: &str, size: u64) -> QueryKey {
        let inputs = vec![FileVersion {
            location: "file:///t/a.parquet".into(),
            size,
            modified_ns: 1,
            e_tag: None,
            version: None,
        }];
        QueryKey {
            key: key.into(),
            inputs_hash: format!("h{size}"),
            inputs,
        }
    }

    const TTL: Duration = Duration::from_secs(60);

    #[test]
    fn hits_until_an_input_changes_then_evicts() {
        let c = counters();
        let mut cache = ResultCache::new(1 << 20, None, c.clone());
        let q = query("k", 10);
        assert!(matches!(cache.lookup(&q, TTL), Lookup::Miss(_)));
        cache.store(&q, vec![1, 2, 3], 3, TTL).expect("store");
        match cache.lookup(&q, TTL) {
            Lookup::Hit(hit) => {
                assert_eq!(hit.rows, 3);
                assert_eq!(hit.data.read().expect("read"), vec![1, 2, 3]);
            }
            other => panic!("expected a hit, got {other:?}"),
        }
        // Another query listing the same file with another size evicts the entry.
        let other = query("other", 11);
        assert!(matches!(cache.lookup(&other, TTL), Lookup::Miss(_)));
        assert!(cache.is_empty());
        assert_eq!((c.hits.get(), c.misses.get(), c.evictions.get()), (1, 2, 1));
    }

    #[test]
    fn a_shorter_session_ttl_and_zero_ttl_miss() {
        let mut cache = ResultCache::new(1 << 20, None, counters());
        let q = query("k", 10);
        cache.store(&q, vec![0; 8], 1, TTL).expect("store");
        std::thread::sleep(Duration::from_millis(20));
        assert!(matches!(
            cache.lookup(&q, Duration::from_millis(5)),
            Lookup::Miss("the stored answer expired")
        ));
        cache
            .store(&q, vec![0; 8], 1, Duration::ZERO)
            .expect("store");
        assert!(cache.is_empty(), "a TTL of 0 stores nothing");
    }

    #[test]
    fn least_recently_used_entries_make_room_and_large_ones_go_to_files() {
        let room = 3 * MEMORY_ENTRY_BYTES as u64 + 256;
        let mut cache = ResultCache::new(room, None, counters());
        let (a, b, c) = (query("a", 1), query("b", 1), query("c", 1));
        cache
            .store(&a, vec![1; MEMORY_ENTRY_BYTES], 1, TTL)
            .expect("a");
        cache
            .store(&b, vec![2; MEMORY_ENTRY_BYTES + 1], 1, TTL)
            .expect("b");
        assert!(matches!(cache.lookup(&a, TTL), Lookup::Hit(_)));
        cache
            .store(&c, vec![3; MEMORY_ENTRY_BYTES], 1, TTL)
            .expect("c");
        assert!(
            matches!(cache.lookup(&b, TTL), Lookup::Miss(_)),
            "b was least recent"
        );
        assert!(matches!(cache.lookup(&a, TTL), Lookup::Hit(_)));
        assert!(cache.bytes() <= room);
        let big = query("big", 1);
        cache
            .store(&big, vec![4; 2 * MEMORY_ENTRY_BYTES], 1, TTL)
            .expect("big");
        match cache.lookup(&big, TTL) {
            Lookup::Hit(CachedResult {
                data: CachedData::File(path),
                ..
            }) => {
                assert!(path.exists());
                assert_eq!(
                    std::fs::read(&path).expect("file").len(),
                    2 * MEMORY_ENTRY_BYTES
                );
            }
            other => panic!("expected a file entry, got {other:?}"),
        }
    }

    #[test]
    fn identical_queries_wait_for_the_one_in_flight() {
        let mut cache = ResultCache::new(1 << 20, None, counters());
        let q = query("k", 1);
        cache.begin(&q, "job1");
        let Lookup::InFlight { job_id, done } = cache.lookup(&q, TTL) else {
            panic!("expected in flight");
        };
        assert_eq!(job_id, "job1");
        cache.store(&q, vec![9], 1, TTL).expect("store");
        cache.end(&q, "job1");
        assert!(*done.borrow());
        assert!(matches!(cache.lookup(&q, TTL), Lookup::Hit(_)));
        // Another input version is not the same computation.
        cache.begin(&query("k2", 1), "job2");
        assert!(matches!(
            cache.lookup(&query("k2", 2), TTL),
            Lookup::Miss(_)
        ));
    }
}
