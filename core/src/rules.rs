//! Physical optimizer rules that make DataFusion's plans safe to run one partition per task
//! (shared by the scheduler, which plans jobs, and the client, which plans DataFrames).

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::config::ConfigOptions;
use datafusion::error::Result;
use datafusion::execution::session_state::{SessionState, SessionStateBuilder};
use datafusion::logical_expr::JoinType;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_optimizer::optimizer::PhysicalOptimizer;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
use datafusion::prelude::SessionConfig;

/// True for join types whose build-side rows are emitted after *all* probe partitions are done.
/// In one process DataFusion shares that bookkeeping between partitions; across tasks it cannot.
pub fn emits_build_rows_at_end(join_type: JoinType) -> bool {
    matches!(
        join_type,
        JoinType::Left
            | JoinType::LeftAnti
            | JoinType::LeftSemi
            | JoinType::LeftMark
            | JoinType::Full
    )
}

/// Turns `CollectLeft` hash joins that emit build-side rows at the end into partitioned joins,
/// so each task owns its share of the build side. Runs right after DataFusion's join selection,
/// before distribution is enforced, so the needed shuffles are planned by DataFusion itself.
#[derive(Debug, Default)]
pub struct DistributedJoinSelection;

impl PhysicalOptimizerRule for DistributedJoinSelection {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            if let Some(join) = node.downcast_ref::<HashJoinExec>()
                && *join.partition_mode() == PartitionMode::CollectLeft
                && emits_build_rows_at_end(*join.join_type())
                && !join.null_aware
            {
                let partitioned = join
                    .builder()
                    .with_partition_mode(PartitionMode::Partitioned)
                    .recompute_properties()
                    .build_exec()?;
                return Ok(Transformed::yes(partitioned));
            }
            Ok(Transformed::no(node))
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "volley_distributed_join_selection"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// DataFusion's session state with Volley's rules, for planning distributed queries.
pub fn volley_session_state(config: SessionConfig) -> SessionState {
    volley_session_state_with(config, None)
}

/// [`volley_session_state`] on a given runtime (memory pool, object stores).
pub fn volley_session_state_with(
    config: SessionConfig,
    runtime: Option<std::sync::Arc<datafusion::execution::runtime_env::RuntimeEnv>>,
) -> SessionState {
    let mut rules = PhysicalOptimizer::new().rules;
    let position = rules
        .iter()
        .position(|r| r.name() == "join_selection")
        .map_or(0, |i| i + 1);
    rules.insert(position, Arc::new(DistributedJoinSelection));
    let builder = SessionStateBuilder::new()
        .with_default_features()
        .with_config(config)
        .with_physical_optimizer_rules(rules);
    let mut state = match runtime {
        Some(runtime) => builder.with_runtime_env(runtime).build(),
        None => builder.build(),
    };
    // Registering over built-ins by name cannot fail; a failure leaves DataFusion's own.
    if let Err(e) = crate::functions::guard_functions(&mut state) {
        tracing::warn!(error = %e, "cannot guard size-choosing functions");
    }
    state
}
