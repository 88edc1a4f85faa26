//! The result cache at work (see [`crate::result_cache`]). A planned query the cache may
//! answer is looked up: a stored answer becomes a job that ran no task (state `cached`); an
//! identical query already running is waited for, and its answer served; otherwise the query
//! runs, and once it succeeded its answer is read from the executors into the cache. Until
//! then the job's result files stay: a client's release waits for that read.

use std::sync::Arc;
use std::time::Duration;

use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;
use futures::StreamExt;
use tokio::sync::watch;
use volley_core::Result;
use volley_core::config::VolleyOptions;
use volley_core::security::Principal;
use volley_core::shuffle::{ipc_bytes, read_partition_location};

use crate::job::{CacheHit, JobState};
use crate::result_cache::{
    CacheUse, CachedResult, CatalogEpoch, InputRoots, Lookup, QueryKey, Shortcut, query_key,
    statement_key,
};
use crate::service::SchedulerService;

/// A statement the cache may answer without planning it (see
/// [`crate::result_cache::shortcut`]): its statement key and the catalog epoch it was asked in.
pub(super) struct Statement {
    key: String,
    epoch: u64,
    ttl: Duration,
}

impl Statement {
    /// True when session `ctx` is still in the catalog epoch the statement was asked in.
    pub(super) fn epoch_unchanged(&self, ctx: &SessionContext) -> bool {
        epoch_of(ctx) == Some(self.epoch)
    }

    pub(super) fn into_key(self) -> String {
        self.key
    }
}

/// A planned query's shortcut to record once its answer is stored: the statement key, and
/// the roots listed before it was planned.
type ShortcutRecord = (String, Arc<InputRoots>);

/// A query the cache is asked about.
pub(super) struct Probe {
    query: QueryKey,
    shortcut: Option<ShortcutRecord>,
    /// The asking session's `volley.result_cache_ttl`.
    ttl: Duration,
    /// Largest answer stored.
    max_bytes: u64,
}

/// A planned query with what it runs with.
struct Planned {
    sql: String,
    ctx: SessionContext,
    physical: Arc<dyn ExecutionPlan>,
    settings: Arc<Vec<(String, String)>>,
}

/// A statement of session `ctx` may have changed its tables, views or settings: its
/// statement shortcuts are not taken any more.
pub(super) fn catalog_changed(ctx: &SessionContext) {
    if let Some(epoch) = catalog_epoch(ctx) {
        epoch.bump();
    }
}

fn epoch_of(ctx: &SessionContext) -> Option<u64> {
    catalog_epoch(ctx).map(|e| e.get())
}

fn catalog_epoch(ctx: &SessionContext) -> Option<Arc<CatalogEpoch>> {
    ctx.state_ref()
        .read()
        .config()
        .get_extension::<CatalogEpoch>()
}

impl SchedulerService {
    /// The statement `sql` of session `ctx` as the result cache's shortcut knows it, when the
    /// cache may answer `principal` in this session.
    pub(super) fn statement(
        &self,
        ctx: &SessionContext,
        sql: &str,
        principal: Option<&Principal>,
    ) -> Option<Statement> {
        let principal = principal?;
        let epoch = epoch_of(ctx)?;
        if !self.result_cache.lock().enabled() {
            return None;
        }
        let settings = volley_core::config::config_to_pairs(ctx.state_ref().read().config());
        let options = VolleyOptions::from_pairs(&settings);
        let ttl = options.result_cache_ttl.0;
        if ttl.is_zero() || !options.test_hooks_set().is_empty() {
            return None;
        }
        Some(Statement {
            key: statement_key(principal.as_str(), epoch, sql, &settings),
            epoch,
            ttl,
        })
    }

    /// Answer `statement` as job `job_id` from the result cache without planning it, when its
    /// shortcut leads to a stored answer and its table roots list as they did; None otherwise
    /// (the statement then takes the full path).
    pub(super) async fn take_shortcut(
        &self,
        job_id: &str,
        sql: &str,
        ctx: &SessionContext,
        statement: &Statement,
    ) -> Option<String> {
        let shortcut = self.result_cache.lock().shortcut(&statement.key)?;
        let state = ctx.state();
        volley_core::stores::forget_listings(state.runtime_env());
        if !shortcut.roots.unchanged(&state).await {
            self.result_cache.lock().forget_shortcut(&statement.key);
            return None;
        }
        let hit =
            self.result_cache
                .lock()
                .serve_shortcut(&statement.key, &shortcut, statement.ttl)?;
        let (answer, hit) = match answered(hit) {
            Ok(answered) => answered,
            Err(e) => {
                tracing::warn!(job_id, error = %e, "a stored answer cannot be read: the query is planned");
                self.result_cache.lock().forget_shortcut(&statement.key);
                return None;
            }
        };
        self.state.lock().add_cached_job(
            job_id.to_string(),
            sql.to_string(),
            shortcut.schema,
            answer,
            hit,
        );
        tracing::info!(
            job_id,
            age_ms = hit.age.as_millis() as u64,
            "answered from the result cache without planning"
        );
        Some(job_id.to_string())
    }

    /// The cache's probe for a planned query, when the cache may answer it: it is on, the
    /// statement is cacheable, the session's TTL is not 0 and no test hook is set.
    pub(super) fn cache_probe(
        &self,
        physical: &Arc<dyn ExecutionPlan>,
        settings: &[(String, String)],
        cache: &CacheUse,
        principal: Option<&Principal>,
        shortcut: Option<ShortcutRecord>,
    ) -> Option<Probe> {
        let principal = principal?;
        let options = VolleyOptions::from_pairs(settings);
        let ttl = options.result_cache_ttl.0;
        let usable = *cache == CacheUse::Allowed
            && !ttl.is_zero()
            && options.test_hooks_set().is_empty()
            && self.result_cache.lock().enabled();
        usable.then(|| Probe {
            query: query_key(physical, settings, principal.as_str()),
            shortcut,
            ttl,
            // A cached answer travels inline in the job status message.
            max_bytes: options
                .result_cache_max_entry_bytes
                .min(self.config.max_message_size as u64 / 2),
        })
    }

    /// Submit a planned query through the result cache; returns the job id.
    pub(super) async fn submit_cached(
        &self,
        job_id: String,
        sql: &str,
        ctx: &SessionContext,
        physical: Arc<dyn ExecutionPlan>,
        settings: Arc<Vec<(String, String)>>,
        probe: Probe,
    ) -> Result<String> {
        let lookup = self.result_cache.lock().lookup(&probe.query, probe.ttl);
        let planned = Planned {
            sql: sql.to_string(),
            ctx: ctx.clone(),
            physical,
            settings,
        };
        match lookup {
            Lookup::Hit(hit) => {
                let schema = planned.physical.schema();
                let (answer, hit) = match answered(hit) {
                    Ok(answered) => answered,
                    Err(e) => {
                        tracing::warn!(job_id, error = %e, "a stored answer cannot be read: the query runs");
                        self.result_cache.lock().forget(&probe.query);
                        return self.run_and_keep(job_id, planned, probe).await;
                    }
                };
                self.remember_shortcut(&probe, &schema);
                self.state
                    .lock()
                    .add_cached_job(job_id.clone(), planned.sql, schema, answer, hit);
                tracing::info!(
                    job_id,
                    age_ms = hit.age.as_millis() as u64,
                    "answered from the result cache"
                );
                Ok(job_id)
            }
            Lookup::InFlight {
                job_id: leader,
                done,
            } => {
                tracing::info!(job_id, leader, "waiting for an identical query");
                self.state.lock().add_waiting_job(
                    job_id.clone(),
                    planned.sql.clone(),
                    planned.physical.schema(),
                );
                let service = self.clone();
                let id = job_id.clone();
                tokio::spawn(async move { service.follow(id, planned, probe, done).await });
                Ok(job_id)
            }
            Lookup::Miss(_) => self.run_and_keep(job_id, planned, probe).await,
        }
    }

    /// Run the query as job `job_id` and keep its answer when it succeeds.
    async fn run_and_keep(&self, job_id: String, planned: Planned, probe: Probe) -> Result<String> {
        self.result_cache.lock().begin(&probe.query, &job_id);
        self.capturing.lock().insert(job_id.clone(), false);
        let submitted = self
            .submit_physical(
                job_id.clone(),
                &planned.sql,
                &planned.ctx,
                planned.physical,
                planned.settings,
            )
            .await;
        match submitted {
            Ok(id) => {
                let service = self.clone();
                tokio::spawn(async move { service.keep_answer(id, probe).await });
                Ok(job_id)
            }
            Err(e) => {
                self.result_cache.lock().end(&probe.query, &job_id);
                self.capturing.lock().remove(&job_id);
                Err(e)
            }
        }
    }

    /// Job `job_id` waits for the identical query in flight; its answer, or — when that one
    /// stored none (failed, cancelled, too large) — a run of its own.
    async fn follow(
        &self,
        job_id: String,
        planned: Planned,
        probe: Probe,
        mut done: watch::Receiver<bool>,
    ) {
        loop {
            // Wakes up now and then to notice that the waiting job was cancelled.
            let _ = tokio::time::timeout(Duration::from_millis(200), done.changed()).await;
            if self.job_ended(&job_id) {
                return;
            }
            if !*done.borrow() && done.has_changed().is_ok() {
                continue;
            }
            let lookup = self.result_cache.lock().lookup(&probe.query, probe.ttl);
            match lookup {
                Lookup::InFlight { done: next, .. } => {
                    done = next;
                    continue;
                }
                Lookup::Hit(hit) => match answered(hit) {
                    Ok((answer, hit)) => {
                        self.remember_shortcut(&probe, &planned.physical.schema());
                        self.state
                            .lock()
                            .finish_waiting_from_cache(&job_id, answer, hit);
                        return;
                    }
                    Err(e) => {
                        // Like a miss: the unreadable answer goes.
                        tracing::warn!(job_id, error = %e, "a stored answer cannot be read: the query runs");
                        self.result_cache.lock().forget(&probe.query);
                    }
                },
                Lookup::Miss(_) => {}
            }
            // Runs under the waiting job's id, which it replaces.
            if let Err(e) = self.run_and_keep(job_id.clone(), planned, probe).await {
                self.state.lock().fail_job(&job_id, e.to_string());
            }
            return;
        }
    }

    fn job_ended(&self, job_id: &str) -> bool {
        self.state
            .lock()
            .job(job_id)
            .is_none_or(|j| j.state.is_final())
    }

    /// Once job `job_id` ended, store its answer if it succeeded; then its waiters look again
    /// and a release asked for meanwhile happens.
    async fn keep_answer(&self, job_id: String, probe: Probe) {
        if let Err(e) = self.read_answer(&job_id, &probe).await {
            tracing::warn!(job_id, error = %e, "the answer could not be stored in the result cache");
        }
        self.result_cache.lock().end(&probe.query, &job_id);
        let release = self.capturing.lock().remove(&job_id).unwrap_or(false);
        if release {
            self.release(&job_id).await;
        }
    }

    async fn read_answer(&self, job_id: &str, probe: &Probe) -> Result<()> {
        if !self.wait_final(job_id).await {
            return Ok(());
        }
        let (locations, schema, inline) = {
            let state = self.state.lock();
            match state.job(job_id) {
                Some(job) if job.state == JobState::Succeeded => (
                    job.result_locations(),
                    Arc::clone(&job.schema),
                    job.inline_result.clone(),
                ),
                _ => return Ok(()),
            }
        };
        if let Some(answer) = inline {
            // A small answer came back with its task's report: stored as it is.
            let rows = locations.iter().map(|l| l.num_rows).sum();
            return self.store_answer(probe, &schema, answer, rows);
        }
        let file_bytes: u64 = locations.iter().map(|l| l.num_bytes).sum();
        if file_bytes > probe.max_bytes {
            return Ok(());
        }
        let mut batches = Vec::new();
        for location in locations {
            let mut stream =
                read_partition_location(location, None, 0, self.config.security.clone());
            while let Some(batch) = stream.next().await {
                batches.push(batch?);
            }
        }
        let rows = batches.iter().map(|b| b.num_rows() as u64).sum();
        self.store_answer(probe, &schema, ipc_bytes(&schema, &batches)?, rows)
    }

    /// Keep `answer` (an Arrow IPC stream of `rows` rows) as the stored answer of `probe`,
    /// unless too big.
    fn store_answer(
        &self,
        probe: &Probe,
        schema: &datafusion::arrow::datatypes::SchemaRef,
        answer: Vec<u8>,
        rows: u64,
    ) -> Result<()> {
        if answer.len() as u64 > probe.max_bytes {
            return Ok(());
        }
        self.result_cache
            .lock()
            .store(&probe.query, answer, rows, probe.ttl)?;
        self.remember_shortcut(probe, schema);
        Ok(())
    }

    /// The stored answer of `probe` is found again by its statement's shortcut.
    fn remember_shortcut(&self, probe: &Probe, schema: &datafusion::arrow::datatypes::SchemaRef) {
        if let Some((statement, roots)) = &probe.shortcut {
            let shortcut = Shortcut {
                key: probe.query.key.clone(),
                inputs_hash: probe.query.inputs_hash.clone(),
                roots: Arc::clone(roots),
                schema: Arc::clone(schema),
            };
            self.result_cache
                .lock()
                .remember_shortcut(statement.clone(), shortcut);
        }
    }

    /// True when the release of job `job_id` must wait: its answer is being read into the
    /// cache (the reader releases it when done).
    pub(super) fn release_deferred(&self, job_id: &str) -> bool {
        let succeeded = self
            .state
            .lock()
            .job(job_id)
            .is_some_and(|j| j.state == JobState::Succeeded);
        match self.capturing.lock().get_mut(job_id) {
            Some(pending) if succeeded => {
                *pending = true;
                true
            }
            _ => false,
        }
    }

    /// The line EXPLAIN ANALYZE ends with when the result cache is on: whether a plain run
    /// of the analyzed query would be answered from it (EXPLAIN ANALYZE itself always runs the
    /// query, and stores nothing).
    pub(super) fn explain_cache(
        &self,
        probe: Option<&Probe>,
        cache: &CacheUse,
        settings: &[(String, String)],
    ) -> Option<String> {
        let ttl = VolleyOptions::from_pairs(settings).result_cache_ttl.0;
        let cache_on = self.result_cache.lock().enabled();
        if ttl.is_zero() || !cache_on {
            return None;
        }
        Some(match (probe, cache) {
            (_, CacheUse::Never(reason)) => format!("Result cache: not used ({reason})"),
            (None, CacheUse::Allowed) => "Result cache: not used (test hooks are set)".into(),
            (Some(probe), CacheUse::Allowed) => {
                let stored = self.result_cache.lock().peek(&probe.query, probe.ttl);
                match stored {
                    Some((age, rows)) => format!(
                        "Result cache: hit — its answer ({rows} rows, stored {} ago) is served to this query without running it",
                        crate::fmt::duration(crate::fmt::ms(age))
                    ),
                    None => "Result cache: miss — this query runs and its answer is stored".into(),
                }
            }
        })
    }

    /// Drop expired answers and refresh the cache's size gauge.
    pub(super) fn expire_cached(&self) {
        let mut cache = self.result_cache.lock();
        cache.expire();
        self.metrics
            .result_cache_bytes
            .set(i64::try_from(cache.bytes()).unwrap_or(i64::MAX));
    }
}

/// A stored answer's bytes and what its job shows.
fn answered(hit: CachedResult) -> Result<(Vec<u8>, CacheHit)> {
    let answer = hit.data.read()?;
    Ok((
        answer,
        CacheHit {
            age: hit.age,
            rows: hit.rows,
        },
    ))
}
