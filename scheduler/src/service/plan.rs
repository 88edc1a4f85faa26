//! Planning one statement: parse, check against the sandbox, and plan — EXPLAIN answered at
//! once, DDL and SET run on the scheduler, queries the result cache may answer planned on fresh
//! listings of their tables (listed first, for the statement shortcut).

use std::sync::Arc;

use datafusion::arrow::array::{RecordBatch, StringArray};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::datasource::listing::ListingTableUrl;
use datafusion::logical_expr::{CreateMemoryTable, DdlStatement, LogicalPlan};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;
use volley_core::config::{VolleyOptions, config_to_pairs};
use volley_core::sandbox::Sandbox;
use volley_core::shuffle::ipc_bytes;
use volley_core::stores::{StoreOptions, StoreScope};
use volley_core::{Result, VolleyError};

use crate::explain::{explain_stages, plan_schema};
use crate::graph::cut::plan_stages_inlining;
use crate::graph::group::group_broadcast_stages;
use crate::graph::scan_balance::balance_parquet_scans;
use crate::graph::{StagePlan, add_key_filters, mark_broadcast_candidates};
use crate::result_cache::{CacheUse, InputRoots};
use crate::service::cache_table::{CacheStatement, plan_cache_statement};

/// What planning a statement produced.
pub(super) enum Planned {
    /// Answered while planning (EXPLAIN): the result as IPC bytes.
    Inline(SchemaRef, Vec<u8>),
    /// Runs on the scheduler (DDL, SET, DESCRIBE); true when it changes the session (DDL,
    /// SET), not when it answers a question (DESCRIBE).
    Collect(datafusion::dataframe::DataFrame, bool),
    /// CREATE TABLE AS: this plan of its query runs on the cluster, then the table is kept.
    CreateTable(
        Box<CreateMemoryTable>,
        Arc<dyn ExecutionPlan>,
        Arc<Vec<(String, String)>>,
    ),
    /// EXPLAIN ANALYZE of this plan.
    Analyze(Arc<dyn ExecutionPlan>, Arc<Vec<(String, String)>>, CacheUse),
    /// `CACHE TABLE` / `UNCACHE TABLE`.
    Cache(CacheStatement),
    /// A plan for the executors, with the session settings its tasks run with, whether the
    /// result cache may answer it, and (when it may) its table roots as listed before planning.
    Physical(
        Arc<dyn ExecutionPlan>,
        Arc<Vec<(String, String)>>,
        CacheUse,
        Option<Arc<InputRoots>>,
    ),
}

/// `CREATE EXTERNAL TABLE ... OPTIONS ('aws.region' ...)`: the store options configure the
/// session's store for the table's location; the rest (format options) stay for DataFusion.
fn take_store_options(ctx: &SessionContext, logical: LogicalPlan) -> Result<LogicalPlan> {
    let LogicalPlan::Ddl(DdlStatement::CreateExternalTable(mut create)) = logical else {
        return Ok(logical);
    };
    let store = StoreOptions::take_from(&mut create.options);
    if !store.is_empty() {
        let scope = session_stores(ctx)
            .ok_or_else(|| VolleyError::Internal("session without a store scope".into()))?;
        for location in &create.locations {
            let url = ListingTableUrl::parse(location)?;
            scope.configure(url.get_url(), store.clone())?;
        }
    }
    Ok(LogicalPlan::Ddl(DdlStatement::CreateExternalTable(create)))
}

/// Parse, check and plan one statement (on a deep-stack thread; see [`on_deep_stack`]).
pub(super) async fn plan_statement(
    ctx: &SessionContext,
    sql: &str,
    sandbox: &Sandbox,
    job_id: &str,
    per_task: usize,
) -> Result<Planned> {
    let state = ctx.state();
    if let Some(statement) = plan_cache_statement(ctx, &state, sql, sandbox).await? {
        return Ok(Planned::Cache(statement));
    }
    let logical = state.create_logical_plan(sql).await?;
    sandbox.check_logical(&logical)?;
    let logical = take_store_options(ctx, logical)?;
    if let LogicalPlan::Explain(explain) = &logical
        && !explain.verbose
    {
        let physical = state.create_physical_plan(&explain.plan).await?;
        let physical = balance_parquet_scans(physical, &state).await?;
        let options = VolleyOptions::from_pairs(&config_to_pairs(state.config()));
        let mut stages = plan_stages_inlining(
            job_id,
            physical,
            options.inline_build_bytes,
            options.reuse_stages,
        )?;
        finish_stages(&mut stages, &options, per_task)?;
        let lines = explain_stages(&stages);
        let schema = plan_schema();
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(StringArray::from(lines))],
        )?;
        let bytes = ipc_bytes(&schema, &[batch])?;
        return Ok(Planned::Inline(schema, bytes));
    }
    if let LogicalPlan::Analyze(analyze) = &logical {
        let cache = fresh_listings(&state, CacheUse::of(&analyze.input));
        let physical = state.create_physical_plan(&analyze.input).await?;
        let settings = Arc::new(config_to_pairs(state.config()));
        return Ok(Planned::Analyze(physical, settings, cache));
    }
    if let LogicalPlan::Ddl(DdlStatement::CreateMemoryTable(create)) = &logical
        && super::tables::runs_on_cluster(ctx, create)?
    {
        let physical = state.create_physical_plan(&create.input).await?;
        let settings = Arc::new(config_to_pairs(state.config()));
        return Ok(Planned::CreateTable(
            Box::new(create.clone()),
            physical,
            settings,
        ));
    }
    let ddl = matches!(logical, LogicalPlan::Ddl(_) | LogicalPlan::Statement(_));
    let scheduler_side = ddl || matches!(logical, LogicalPlan::DescribeTable(_));
    let cache = fresh_listings(&state, CacheUse::of(&logical));
    // Listed before planning, into the listing cache the planner then reads.
    let roots = match (&cache, scheduler_side) {
        (CacheUse::Allowed, false) if cache_on(&state) => {
            InputRoots::list(&state, &logical).await.map(Arc::new)
        }
        _ => None,
    };
    let df = ctx.execute_logical_plan(logical).await?;
    if scheduler_side {
        return Ok(Planned::Collect(df, ddl));
    }
    let physical = df.create_physical_plan().await?;
    let settings = Arc::new(config_to_pairs(&state.config().clone()));
    Ok(Planned::Physical(physical, settings, cache, roots))
}

/// A query the result cache may answer is planned on fresh listings of its tables: its plan
/// then names the input files as they are now (their versions are part of the cache's check),
/// not as a listing up to [`volley_core::stores::LISTING_TTL`] old saw them.
fn fresh_listings(state: &datafusion::execution::SessionState, cache: CacheUse) -> CacheUse {
    if cache == CacheUse::Allowed && cache_on(state) {
        volley_core::stores::forget_listings(state.runtime_env());
    }
    cache
}

/// True when the session's `volley.result_cache_ttl` is not 0.
fn cache_on(state: &datafusion::execution::SessionState) -> bool {
    state
        .config()
        .options()
        .extensions
        .get::<VolleyOptions>()
        .is_some_and(|o| !o.result_cache_ttl.0.is_zero())
}

/// Filter scan stages by the build sides of the joins they feed (unless the settings turn that
/// off), mark broadcast-switch candidates when the settings enable adaptive execution, then
/// run stages that build broadcast tables in one task when `per_task` partitions fit in one
/// (see [`group_broadcast_stages`]).
pub(super) fn finish_stages(
    stages: &mut Vec<StagePlan>,
    options: &VolleyOptions,
    per_task: usize,
) -> Result<()> {
    if options.key_filters {
        add_key_filters(stages)?;
    }
    if options.adaptive && options.adaptive_broadcast_bytes > 0 {
        mark_broadcast_candidates(stages);
    }
    if options.group_broadcast_tasks {
        group_broadcast_stages(stages, per_task)?;
    }
    Ok(())
}

/// The object store scope of a session.
pub(super) fn session_stores(ctx: &SessionContext) -> Option<Arc<StoreScope>> {
    ctx.state().config().get_extension::<StoreScope>()
}
