//! `CACHE TABLE name [OPTIONS ('ttl' '10m')] [AS query]` and `UNCACHE TABLE [IF EXISTS]
//! name` (Spark's syntax). The table's rows are computed once by a job whose result stays on
//! the executors (pinned: in their memory up to `--shuffle-memory`, in their work dirs beyond),
//! and the session's table `name` becomes a [`CachedTable`] reading those partitions. A lost
//! executor's partitions are recomputed by the job's lineage; while they are, or once a source
//! file changed or the TTL passed, queries read the source instead.

use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::catalog::TableProvider;
use datafusion::common::TableReference;
use datafusion::datasource::provider_as_source;
use datafusion::execution::SessionState;
use datafusion::logical_expr::{LogicalPlan, LogicalPlanBuilder};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{SqlOption, Statement as SqlStatement};
use volley_core::config::config_to_pairs;
use volley_core::duration::parse_duration;
use volley_core::sandbox::Sandbox;
use volley_core::shuffle::ipc_bytes;
use volley_core::{Result, VolleyError};

use crate::job::JobState;
use crate::result_cache::file_versions;
use crate::service::SchedulerService;
use crate::service::cached_table::CachedTable;

/// Cached partitions stay in executor memory up to this many bytes per task (then files).
const CACHED_TASK_MEMORY_BYTES: u64 = 64 * 1024 * 1024;

/// A planned `CACHE TABLE` or `UNCACHE TABLE`.
pub(super) enum CacheStatement {
    /// Materialize `plan` as table `name`.
    Cache(Box<CacheTable>),
    /// Drop the cached table `name` (the source table it stood for comes back).
    Uncache(TableReference, bool),
}

/// A `CACHE TABLE` to run.
pub(super) struct CacheTable {
    name: TableReference,
    /// The rows to cache, as the source computes them.
    source: LogicalPlan,
    /// `CACHE TABLE t` (no query): the table it replaces, back after `UNCACHE`.
    replaced: Option<Arc<dyn TableProvider>>,
    ttl: Option<Duration>,
    physical: Arc<dyn ExecutionPlan>,
    settings: Arc<Vec<(String, String)>>,
}

/// True when `sql` may be a `CACHE` or `UNCACHE` statement (a cheap look at its first word).
fn looks_like_cache(sql: &str) -> bool {
    let first = sql.split_whitespace().next().unwrap_or("");
    first.eq_ignore_ascii_case("cache") || first.eq_ignore_ascii_case("uncache")
}

/// Plan `sql` when it is a `CACHE TABLE` or `UNCACHE TABLE` statement (None: another one).
pub(super) async fn plan_cache_statement(
    ctx: &SessionContext,
    state: &SessionState,
    sql: &str,
    sandbox: &Sandbox,
) -> Result<Option<CacheStatement>> {
    if !looks_like_cache(sql) {
        return Ok(None);
    }
    let dialect = state.config().options().sql_parser.dialect;
    let sql = spark_options(sql);
    let DFStatement::Statement(statement) = state.sql_to_statement(&sql, &dialect)? else {
        return Ok(None);
    };
    match *statement {
        SqlStatement::UNCache {
            table_name,
            if_exists,
        } => Ok(Some(CacheStatement::Uncache(
            TableReference::from(table_name.to_string().as_str()),
            if_exists,
        ))),
        SqlStatement::Cache {
            table_flag,
            table_name,
            options,
            query,
            ..
        } => {
            if let Some(flag) = table_flag {
                return Err(VolleyError::NotAllowed(format!(
                    "CACHE {flag} TABLE is not supported: write CACHE TABLE"
                )));
            }
            let name = TableReference::from(table_name.to_string().as_str());
            let ttl = cache_ttl(&options)?;
            let (source, replaced) = match query {
                Some(query) => {
                    let statement = DFStatement::Statement(Box::new(SqlStatement::Query(query)));
                    (state.statement_to_plan(statement).await?, None)
                }
                None => {
                    let provider = ctx.table_provider(name.clone()).await?;
                    if provider.downcast_ref::<CachedTable>().is_some() {
                        return Err(VolleyError::NotAllowed(format!(
                            "table {name} is cached already (UNCACHE TABLE {name} first)"
                        )));
                    }
                    let scan = LogicalPlanBuilder::scan(
                        name.clone(),
                        provider_as_source(Arc::clone(&provider)),
                        None,
                    )?
                    .build()?;
                    (scan, Some(provider))
                }
            };
            sandbox.check_logical(&source)?;
            let physical = state.create_physical_plan(&source).await?;
            let mut settings = config_to_pairs(state.config());
            settings.retain(|(k, _)| k != "volley.shuffle_memory_task_bytes");
            settings.push((
                "volley.shuffle_memory_task_bytes".to_string(),
                CACHED_TASK_MEMORY_BYTES.to_string(),
            ));
            Ok(Some(CacheStatement::Cache(Box::new(CacheTable {
                name,
                source,
                replaced,
                ttl,
                physical,
                settings: Arc::new(settings),
            }))))
        }
        _ => Ok(None),
    }
}

/// `sql` with Spark's `OPTIONS ('k' 'v', ...)` written as the parser reads them,
/// `OPTIONS ('k' = 'v', ...)`: an `=` between two quoted strings inside the parentheses after
/// the first `OPTIONS`.
fn spark_options(sql: &str) -> String {
    let Some(start) = sql.to_ascii_lowercase().find("options") else {
        return sql.to_string();
    };
    let (head, tail) = sql.split_at(start);
    let mut out = String::with_capacity(sql.len() + 8);
    out.push_str(head);
    let (mut depth, mut quoted, mut after_string) = (0, false, false);
    for c in tail.chars() {
        if quoted {
            out.push(c);
            if c == '\'' {
                quoted = false;
                after_string = true;
            }
            continue;
        }
        match c {
            '\'' if depth == 1 && after_string => {
                out.push_str("= ");
                out.push(c);
                quoted = true;
                after_string = false;
                continue;
            }
            '\'' => quoted = true,
            '(' => depth += 1,
            ')' => depth -= 1,
            c if c.is_whitespace() => {}
            _ => after_string = false,
        }
        out.push(c);
    }
    out
}

/// The `ttl` of `OPTIONS ('ttl' '10m')`; other options are refused.
fn cache_ttl(options: &[SqlOption]) -> Result<Option<Duration>> {
    let mut ttl = None;
    for option in options {
        let SqlOption::KeyValue { key, value } = option else {
            return Err(VolleyError::NotAllowed(format!(
                "CACHE TABLE option {option} is not supported (only 'ttl')"
            )));
        };
        if !key.value.eq_ignore_ascii_case("ttl") {
            return Err(VolleyError::NotAllowed(format!(
                "CACHE TABLE option {:?} is not supported (only 'ttl')",
                key.value
            )));
        }
        let text = value.to_string();
        let text = text.trim_matches('\'');
        ttl = Some(
            parse_duration(text)
                .map_err(|e| VolleyError::NotAllowed(format!("CACHE TABLE ttl: {e}")))?,
        );
    }
    Ok(ttl)
}

impl SchedulerService {
    /// Run a `CACHE TABLE` or `UNCACHE TABLE` as job `job_id` of session `ctx`.
    pub(super) async fn submit_cache_statement(
        &self,
        job_id: String,
        sql: &str,
        ctx: &SessionContext,
        statement: CacheStatement,
    ) -> Result<String> {
        let empty = Arc::new(datafusion::arrow::datatypes::Schema::empty());
        match statement {
            CacheStatement::Uncache(name, if_exists) => {
                let provider = ctx.table_provider(name.clone()).await.ok();
                let cached = provider
                    .as_ref()
                    .and_then(|p| p.downcast_ref::<CachedTable>());
                match cached {
                    Some(cached) => {
                        let job = cached.job_id().to_string();
                        let replaced = cached.replaced();
                        ctx.deregister_table(name.clone())?;
                        if let Some(source) = replaced {
                            ctx.register_table(name, source)?;
                        }
                        super::cached::catalog_changed(ctx);
                        self.state.lock().unpin(&job);
                        self.release(&job).await;
                    }
                    None if if_exists => {}
                    None => {
                        return Err(VolleyError::NotAllowed(format!(
                            "UNCACHE TABLE {name}: it is not a cached table"
                        )));
                    }
                }
                let bytes = ipc_bytes(&empty, &[])?;
                self.state
                    .lock()
                    .add_inline_job(job_id.clone(), sql.to_string(), empty, bytes);
                Ok(job_id)
            }
            CacheStatement::Cache(cache) => {
                let inner = super::new_id();
                let physical = Arc::clone(&cache.physical);
                let settings = Arc::clone(&cache.settings);
                self.submit_physical(inner.clone(), sql, ctx, physical, settings)
                    .await?;
                let mut state = self.state.lock();
                state.pin(&inner);
                state.add_waiting_job(job_id.clone(), sql.to_string(), empty);
                drop(state);
                let (service, outer, ctx) = (self.clone(), job_id.clone(), ctx.clone());
                tokio::spawn(async move {
                    service
                        .finish_cache_table(&outer, &inner, *cache, ctx)
                        .await
                });
                Ok(job_id)
            }
        }
    }

    /// Once the materializing job `inner` ended: register the cached table (success) or
    /// release its output (failure), and answer the waiting job `outer`.
    async fn finish_cache_table(
        &self,
        outer: &str,
        inner: &str,
        cache: CacheTable,
        ctx: SessionContext,
    ) {
        if !self.wait_inner(outer, inner).await {
            self.state.lock().unpin(inner);
            self.release(inner).await;
            return;
        }
        let ended = self.state.lock().job(inner).map(|j| {
            let stage = j.final_stage;
            (j.state.clone(), stage, j.stages.is_empty())
        });
        let result = match ended {
            Some((JobState::Succeeded, _, true)) => Err(
                "CACHE TABLE keeps rows on the executors: this query runs on the scheduler (it reads no table of files)"
                    .to_string(),
            ),
            Some((JobState::Succeeded, stage_id, false)) => {
                let table = CachedTable {
                    name: cache.name.to_string(),
                    schema: cache.physical.schema(),
                    job_id: inner.to_string(),
                    stage_id,
                    source: cache.source,
                    replaced: cache.replaced,
                    inputs: file_versions(&cache.physical),
                    expires: cache.ttl.map(|ttl| Instant::now() + ttl),
                    cluster: Arc::clone(&self.state),
                };
                let registered = ctx
                    .deregister_table(cache.name.clone())
                    .and_then(|_| ctx.register_table(cache.name.clone(), Arc::new(table)));
                super::cached::catalog_changed(&ctx);
                let empty = Arc::new(datafusion::arrow::datatypes::Schema::empty());
                registered
                    .map_err(|e| e.to_string())
                    .and_then(|_| ipc_bytes(&empty, &[]).map_err(|e| e.to_string()))
            }
            Some((JobState::Failed(message), _, _)) => Err(message),
            Some((other, _, _)) => Err(format!("the caching query was {}", other.as_str())),
            None => Err("the caching query's job is gone".to_string()),
        };
        if result.is_err() {
            self.state.lock().unpin(inner);
            self.release(inner).await;
        }
        self.state.lock().finish_waiting_job(outer, result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spark_options_get_their_equals_signs() {
        assert_eq!(
            spark_options("CACHE TABLE t OPTIONS ('ttl' '10m') AS SELECT 'a' 'b'"),
            "CACHE TABLE t OPTIONS ('ttl' = '10m') AS SELECT 'a' 'b'"
        );
        assert_eq!(
            spark_options("CACHE TABLE t OPTIONS ('ttl' = '1h')"),
            "CACHE TABLE t OPTIONS ('ttl' = '1h')"
        );
        assert_eq!(spark_options("CACHE TABLE t"), "CACHE TABLE t");
    }
}
