//! Submitting statements: planned on a deep-stack thread ([`super::plan`]);
//! answer DDL, EXPLAIN and plans that cannot travel on the scheduler; cut the rest into stages
//! and hand them to the cluster as a job; EXPLAIN ANALYZE waits for the job it analyzes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{RecordBatch, StringArray};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;
use tonic::Status;
use volley_core::codec::VolleyCodec;
use volley_core::config::{VolleyOptions, config_to_pairs, volley_session_config};
use volley_core::protobuf as pb;
use volley_core::rules::volley_session_state_with;
use volley_core::shuffle::ipc_bytes;
use volley_core::stack::on_deep_stack;
use volley_core::stores::StoreScope;
use volley_core::stores::plan::plan_stores;
use volley_core::{Result, VolleyError};

use crate::explain::{analyze_lines, plan_schema};
use crate::graph::cut::plan_stages_inlining;
use crate::graph::scan_balance::balance_parquet_scans;
use crate::graph::trim::{Encoded, ResolvedPlan, Template};
use crate::job::JobState;
use crate::result_cache::CatalogEpoch;
use crate::service::plan::{Planned, finish_stages, plan_statement, session_stores};
use crate::service::{SchedulerService, new_id};
use volley_core::security::Principal;

impl SchedulerService {
    pub(crate) fn new_session(&self, settings: &[pb::KeyValue]) -> Result<SessionContext> {
        let target = self
            .config
            .target_partitions
            .unwrap_or_else(|| self.state.lock().total_slots().max(2));
        let mut config = volley_session_config(target);
        if self.config.result_cache_bytes == 0 {
            // No result cache: queries are planned on DataFusion's cached listings.
            config.options_mut().set("volley.result_cache_ttl", "0")?;
        }
        for kv in settings {
            volley_core::sandbox::check_setting(&kv.key)?;
            config.options_mut().set(&kv.key, &kv.value)?;
        }
        // The session's own object store scope: per-table options stay in this session.
        let scope = Arc::new(StoreScope::new(Arc::clone(&self.stores)));
        // Listings, statistics and footers are cached per session: they are keyed by path,
        // not by the credentials that read them.
        let runtime = RuntimeEnvBuilder::from_runtime_env(&self.runtime)
            .with_cache_manager(volley_core::stores::cache_config())
            .with_object_store_registry(Arc::clone(&scope) as _)
            .build_arc()?;
        let config = config
            .with_extension(scope)
            .with_extension(Arc::new(CatalogEpoch::default()));
        let ctx = SessionContext::new_with_state(volley_session_state_with(config, Some(runtime)));
        for (name, table) in self.tables.lock().iter() {
            ctx.register_table(name.as_str(), Arc::clone(table))?;
        }
        Ok(ctx)
    }

    /// Run the `--table` statements; their tables are then part of every new session.
    pub async fn register_tables(&self, statements: &[String]) -> Result<()> {
        let ctx = self.new_session(&[])?;
        for sql in statements {
            let per_task = self.state.lock().partitions_per_task();
            let planned = plan_statement(&ctx, sql, &self.sandbox, "tables", per_task).await;
            let planned = planned.and_then(|p| match p {
                Planned::CreateTable(..) => Err(VolleyError::Config(
                    "a table of every session is declared with CREATE EXTERNAL TABLE".into(),
                )),
                other => Ok(other),
            });
            planned.map_err(|e| {
                VolleyError::Config(format!(
                    "--table ({}): {e}",
                    volley_core::stores::redact::redact_sql(sql)
                ))
            })?;
        }
        let state = ctx.state();
        let options = state.config().options();
        let schema = ctx
            .catalog(&options.catalog.default_catalog)
            .and_then(|c| c.schema(&options.catalog.default_schema))
            .ok_or_else(|| VolleyError::Internal("no default schema".into()))?;
        let mut tables = Vec::new();
        for name in schema.table_names() {
            if let Some(table) = schema.table(&name).await? {
                tables.push((name, table));
            }
        }
        *self.tables.lock() = tables;
        Ok(())
    }

    /// Plan and submit `sql`; an error about it shows none of the session's or the
    /// statement's store secrets.
    pub async fn submit_redacted(
        &self,
        ctx: &SessionContext,
        sql: &str,
        principal: &Principal,
    ) -> Result<String, Status> {
        self.submit_as(ctx, sql, new_id(), Some(principal))
            .await
            .map_err(|e| self.redacted(ctx, sql, e))
    }

    /// Plan query `sql` with `params` bound to its placeholders (`$1`, `$2`, ...) and submit
    /// it (the result cache is not asked); an error shows no secrets, like
    /// [`Self::submit_redacted`]'s.
    pub async fn submit_bound(
        &self,
        ctx: &SessionContext,
        sql: &str,
        params: datafusion::common::ParamValues,
    ) -> Result<String, Status> {
        let planned = {
            let (ctx, sql, sandbox) = (ctx.clone(), sql.to_string(), self.sandbox.clone());
            on_deep_stack("planner", move || async move {
                let state = ctx.state();
                let logical = state.create_logical_plan(&sql).await?;
                sandbox.check_logical(&logical)?;
                if matches!(logical, LogicalPlan::Ddl(_) | LogicalPlan::Statement(_)) {
                    return Err(VolleyError::NotAllowed(
                        "only queries and DML take bound parameters".into(),
                    ));
                }
                let logical = logical.with_param_values(params)?;
                let physical = ctx
                    .execute_logical_plan(logical)
                    .await?
                    .create_physical_plan()
                    .await?;
                Ok::<_, VolleyError>((physical, Arc::new(config_to_pairs(state.config()))))
            })
            .await
        };
        let submitted = match planned {
            Ok((physical, settings)) => {
                self.submit_physical(new_id(), sql, ctx, physical, settings)
                    .await
            }
            Err(e) => Err(e),
        };
        submitted.map_err(|e| self.redacted(ctx, sql, e))
    }

    /// The result schema of statement `sql` and the types of its placeholders (`$1`, `$2`,
    /// ...; `Null` when the statement does not tell), planned on a deep-stack thread without
    /// running anything (a prepared statement's schemas).
    pub async fn describe_statement(
        &self,
        ctx: &SessionContext,
        sql: &str,
    ) -> Result<
        (
            datafusion::arrow::datatypes::Schema,
            Vec<datafusion::arrow::datatypes::Field>,
        ),
        Status,
    > {
        let described = {
            let (ctx, sql) = (ctx.clone(), sql.to_string());
            on_deep_stack("planner", move || async move {
                let logical = ctx.state().create_logical_plan(&sql).await?;
                let mut params: Vec<(usize, datafusion::arrow::datatypes::Field)> = logical
                    .get_parameter_types()?
                    .into_iter()
                    .map(|(name, kind)| {
                        let position = name.trim_start_matches('$').parse().unwrap_or(usize::MAX);
                        let kind = kind.unwrap_or(datafusion::arrow::datatypes::DataType::Null);
                        (
                            position,
                            datafusion::arrow::datatypes::Field::new(name, kind, true),
                        )
                    })
                    .collect();
                params.sort_by_key(|(position, _)| *position);
                let params = params.into_iter().map(|(_, f)| f).collect();
                Ok::<_, VolleyError>((logical.schema().as_arrow().clone(), params))
            })
            .await
        };
        described.map_err(|e| self.redacted(ctx, sql, e))
    }

    /// `e` as a status without the secrets of `ctx`'s session or of the statement `sql`.
    pub(super) fn redacted(&self, ctx: &SessionContext, sql: &str, e: VolleyError) -> Status {
        let mut secrets = volley_core::stores::redact::redact_sql_collect(sql).1;
        if let Some(scope) = session_stores(ctx) {
            secrets.extend(scope.secrets());
        }
        let status = Status::from(e);
        Status::new(
            status.code(),
            volley_core::stores::redact::redact_values(status.message(), &secrets),
        )
    }

    pub(crate) fn session(&self, id: &str) -> Result<SessionContext, Status> {
        self.sessions
            .lock()
            .get_mut(id)
            .map(|(ctx, used)| {
                *used = Instant::now();
                ctx.clone()
            })
            .ok_or_else(|| Status::not_found(format!("unknown session {id}: create one first")))
    }

    /// Plan `sql` in session `ctx` and submit it; returns the job id. Planning runs on a
    /// deep-stack thread: a deeply nested statement cannot overflow a worker's stack.
    pub async fn submit(&self, ctx: &SessionContext, sql: &str) -> Result<String> {
        self.submit_as(ctx, sql, new_id(), Some(&Principal::in_process()))
            .await
    }

    /// [`Self::submit`] under a given job id (a job resumed after a restart keeps its id) for
    /// `principal` (None: the result cache is not asked).
    pub(super) async fn submit_as(
        &self,
        ctx: &SessionContext,
        sql: &str,
        job_id: String,
        principal: Option<&Principal>,
    ) -> Result<String> {
        let statement = self.statement(ctx, sql, principal);
        if let Some(statement) = &statement
            && let Some(id) = self.take_shortcut(&job_id, sql, ctx, statement).await
        {
            return Ok(id);
        }
        let planned = {
            let (ctx, sql, sandbox) = (ctx.clone(), sql.to_string(), self.sandbox.clone());
            let id = job_id.clone();
            let per_task = self.state.lock().partitions_per_task();
            on_deep_stack("planner", move || async move {
                plan_statement(&ctx, &sql, &sandbox, &id, per_task).await
            })
            .await
        };
        // A statement that failed may have changed the catalog before it failed (`CREATE OR
        // REPLACE` drops the old table first): the session's shortcuts go.
        let planned = planned.inspect_err(|_| super::cached::catalog_changed(ctx))?;
        match planned {
            Planned::Inline(schema, bytes) => {
                self.state
                    .lock()
                    .add_inline_job(job_id.clone(), sql.to_string(), schema, bytes);
                Ok(job_id)
            }
            Planned::Collect(df, ddl) => {
                let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
                let batches = df.collect().await;
                if ddl {
                    super::cached::catalog_changed(ctx);
                }
                let batches = batches?;
                let bytes = ipc_bytes(&schema, &batches)?;
                let mut state = self.state.lock();
                state.add_inline_job(job_id.clone(), sql.to_string(), schema, bytes);
                if ddl {
                    state.mark_ddl(&job_id);
                }
                Ok(job_id)
            }
            Planned::Analyze(physical, settings, cache) => {
                let probe = self.cache_probe(&physical, &settings, &cache, principal, None);
                let note = self.explain_cache(probe.as_ref(), &cache, &settings);
                let inner = self
                    .submit_physical(new_id(), sql, ctx, physical, settings)
                    .await?;
                let schema = plan_schema();
                self.state.lock().add_waiting_job(
                    job_id.clone(),
                    sql.to_string(),
                    Arc::clone(&schema),
                );
                let service = self.clone();
                let outer = job_id.clone();
                tokio::spawn(
                    async move { service.finish_analyze(&outer, &inner, schema, note).await },
                );
                Ok(job_id)
            }
            Planned::CreateTable(create, physical, settings) => {
                super::cached::catalog_changed(ctx);
                let inner = self
                    .submit_physical(new_id(), sql, ctx, physical, settings)
                    .await?;
                self.state.lock().add_waiting_job(
                    job_id.clone(),
                    sql.to_string(),
                    Arc::new(datafusion::arrow::datatypes::Schema::empty()),
                );
                let (service, outer, ctx) = (self.clone(), job_id.clone(), ctx.clone());
                tokio::spawn(async move {
                    service
                        .finish_create_table(&outer, &inner, *create, ctx)
                        .await
                });
                Ok(job_id)
            }
            Planned::Cache(statement) => {
                super::cached::catalog_changed(ctx);
                self.submit_cache_statement(job_id, sql, ctx, statement)
                    .await
            }
            Planned::Physical(physical, settings, cache, roots) => {
                // Planned in the catalog the statement key names: its shortcut may be kept.
                let shortcut = statement
                    .filter(|s| s.epoch_unchanged(ctx))
                    .zip(roots)
                    .map(|(s, roots)| (s.into_key(), roots));
                match self.cache_probe(&physical, &settings, &cache, principal, shortcut) {
                    Some(probe) => {
                        self.submit_cached(job_id, sql, ctx, physical, settings, probe)
                            .await
                    }
                    None => {
                        self.submit_physical(job_id, sql, ctx, physical, settings)
                            .await
                    }
                }
            }
        }
    }

    /// Cut an optimized physical plan into stages and run it; returns the job id.
    pub async fn submit_physical(
        &self,
        job_id: String,
        sql: &str,
        ctx: &SessionContext,
        physical: Arc<dyn ExecutionPlan>,
        settings: Arc<Vec<(String, String)>>,
    ) -> Result<String> {
        self.sandbox.check_physical(&physical)?;
        self.check_test_hooks(&settings)?;
        let physical = balance_parquet_scans(physical, &ctx.state()).await?;
        let settings = self.resolve_settings(settings);
        let stores = Arc::new(match session_stores(ctx) {
            Some(scope) => scope.options_for(plan_stores(&physical).iter().map(String::as_str)),
            None => Vec::new(),
        });
        let schema = physical.schema();
        let options = VolleyOptions::from_pairs(&settings);
        let mut stages = plan_stages_inlining(
            &job_id,
            Arc::clone(&physical),
            options.inline_build_bytes,
            options.reuse_stages,
        )?;
        let temporary = stages
            .last()
            .and_then(|s| temporary_of(&(Arc::clone(&s.plan) as Arc<dyn ExecutionPlan>)));
        // Task lists are allocated per partition: bound them before anything is allocated.
        for stage in &stages {
            volley_core::ids::check_partitions(
                &format!("stage {}", stage.stage_id),
                stage.partitions,
            )?;
        }
        let per_task = {
            let state = self.state.lock();
            state
                .resumed_per_task(&job_id)
                .unwrap_or_else(|| state.partitions_per_task())
        };
        finish_stages(&mut stages, &options, per_task)?;
        let mut distributable = true;
        // Every stage is encoded now to know it can travel, and keeps its bytes: a stage
        // reading no other stage as they are (it launches right away), the others as the
        // template their launch encodes only their readers into.
        let mut encoded = Vec::new();
        for stage in &stages {
            let plan = Arc::clone(&stage.plan) as Arc<dyn ExecutionPlan>;
            match VolleyCodec::encode_entries(Arc::clone(&plan)) {
                Ok(entries) => {
                    let kept = match stage.inputs.is_empty() {
                        true => ResolvedPlan::encoded(&plan, volley_core::flat::assemble(entries))
                            .ok()
                            .map(Encoded::Plan),
                        false => {
                            Template::new(&plan, entries).map(|t| Encoded::Template(Arc::new(t)))
                        }
                    };
                    if let Some(kept) = kept {
                        encoded.push((stage.stage_id, Arc::clone(&stage.plan), kept));
                    }
                }
                // Executors could not decode it: a clear error now, not failing tasks.
                Err(e) if volley_core::flat::is_too_deep(&e) => {
                    return Err(VolleyError::NotAllowed(format!(
                        "stage {}: {}",
                        stage.stage_id,
                        e.find_root()
                    )));
                }
                Err(_) => distributable = false,
            }
        }
        if !distributable {
            // System tables and in-memory sources cannot travel; they are small, run them here.
            tracing::info!(
                job_id,
                "plan cannot be sent to executors; running it on the scheduler"
            );
            let batches = datafusion::physical_plan::collect(physical, ctx.task_ctx()).await?;
            let bytes = ipc_bytes(&schema, &batches)?;
            self.state
                .lock()
                .add_inline_job(job_id.clone(), sql.to_string(), schema, bytes);
            return Ok(job_id);
        }
        let short: String = volley_core::stores::redact::redact_sql(sql)
            .chars()
            .take(200)
            .collect();
        let span = tracing::info_span!(parent: None, "job", job_id = %job_id, stages = stages.len(), sql = %short);
        tracing::info!(parent: &span, job_id, stages = stages.len(), "job submitted");
        let mut state = self.state.lock();
        state.add_job(
            job_id.clone(),
            sql.to_string(),
            settings,
            stages,
            schema,
            span,
            per_task,
        );
        state.set_job_stores(&job_id, stores, temporary);
        state.set_encoded_plans(&job_id, encoded);
        drop(state);
        self.schedule();
        Ok(job_id)
    }

    /// Refuse a job that sets test hooks unless this cluster was started to honour them.
    fn check_test_hooks(&self, settings: &[(String, String)]) -> Result<()> {
        if self.config.enable_test_hooks {
            return Ok(());
        }
        let options = VolleyOptions::from_pairs(settings);
        match options.test_hooks_set().first() {
            Some(hook) => Err(VolleyError::NotAllowed(format!(
                "{hook} is a test hook: it works only on a cluster started with --enable-test-hooks"
            ))),
            None => Ok(()),
        }
    }

    /// Settings a job's tasks run with: `volley.shuffle_compression = auto` becomes `none` when
    /// every live executor is on a loopback address (shuffle bytes never cross a network and
    /// compressing them only costs CPU), `lz4` otherwise.
    fn resolve_settings(&self, settings: Arc<Vec<(String, String)>>) -> Arc<Vec<(String, String)>> {
        const KEY: &str = "volley.shuffle_compression";
        let auto = settings
            .iter()
            .find(|(k, _)| k == KEY)
            .is_none_or(|(_, v)| v.eq_ignore_ascii_case("auto"));
        if !auto {
            return settings;
        }
        let local = self
            .state
            .lock()
            .alive_executors()
            .all(|e| volley_core::security::is_loopback_host(&e.host));
        let value = if local { "none" } else { "lz4" };
        let mut resolved: Vec<(String, String)> =
            settings.iter().filter(|(k, _)| k != KEY).cloned().collect();
        resolved.push((KEY.to_string(), value.to_string()));
        Arc::new(resolved)
    }

    /// Wait until the job `inner` that the waiting job `outer` stands for has ended; false
    /// when `outer` ended first (cancelled): then `inner` is cancelled too.
    pub(super) async fn wait_inner(&self, outer: &str, inner: &str) -> bool {
        let Some(mut rx) = self.state.lock().job(inner).map(|j| j.version.subscribe()) else {
            return false;
        };
        loop {
            let (inner_final, outer_final) = {
                let state = self.state.lock();
                let done = |id: &str| state.job(id).is_none_or(|j| j.state.is_final());
                (done(inner), done(outer))
            };
            if outer_final && !inner_final {
                self.cancel(inner).await;
                return false;
            }
            if inner_final {
                return true;
            }
            // Also wakes up now and then to notice a cancelled outer job.
            let _ = tokio::time::timeout(Duration::from_millis(200), rx.changed()).await;
        }
    }

    /// EXPLAIN ANALYZE: wait for the job running the query, then answer with its stages as
    /// they ran (tasks, rows, adaptive decisions) and what the result cache would do (`note`),
    /// and drop its result.
    async fn finish_analyze(
        &self,
        outer: &str,
        inner: &str,
        schema: SchemaRef,
        note: Option<String>,
    ) {
        if !self.wait_inner(outer, inner).await {
            return;
        }
        let result = {
            let state = self.state.lock();
            match state.job(inner) {
                Some(job) if job.state == JobState::Succeeded => {
                    let mut lines = analyze_lines(job);
                    lines.extend(note);
                    RecordBatch::try_new(
                        Arc::clone(&schema),
                        vec![Arc::new(StringArray::from(lines))],
                    )
                    .map_err(|e| e.to_string())
                    .and_then(|batch| ipc_bytes(&schema, &[batch]).map_err(|e| e.to_string()))
                }
                Some(job) => Err(match &job.state {
                    JobState::Failed(message) => message.clone(),
                    other => format!("the analyzed query was {}", other.as_str()),
                }),
                None => Err("the analyzed query's job is gone".to_string()),
            }
        };
        self.release(inner).await;
        self.state.lock().finish_waiting_job(outer, result);
    }
}

/// The temporary prefix of the table write a result stage commits, if it commits one.
fn temporary_of(plan: &Arc<dyn ExecutionPlan>) -> Option<String> {
    let mut found = None;
    let _ = plan.apply(|node| {
        if let Some(commit) = node.downcast_ref::<volley_core::plan::CommitFilesExec>() {
            found = commit.temporary_url().ok();
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}
