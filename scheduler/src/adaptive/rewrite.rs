//! Plan rewrites adaptive execution applies: a partitioned join turned into a broadcast join
//! (the probe stage's plan moved in), and a probe stage filtered by the build side's keys.

use std::sync::Arc;

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::JoinType;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::expressions::Column;
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
use datafusion::physical_plan::{ExecutionPlan, replace_children_if_necessary};
use volley_core::plan::ShuffleReaderExec;

use crate::graph::joins::{
    Filterable, ShuffledJoin, filterable, partition_agnostic_child, row_local_child,
};

/// The probe stage's plan (`probe_input`, its writer's input) with only the rows whose join
/// keys are on the build side: a `CollectLeft` right-semi join against the whole build side
/// (the join's build subtree, read whole by every task).
pub fn probe_filter_rewrite(
    join_stage_plan: &Arc<dyn ExecutionPlan>,
    join: ShuffledJoin,
    probe_input: &Arc<dyn ExecutionPlan>,
) -> Result<Arc<dyn ExecutionPlan>> {
    let mut found = None;
    join_stage_plan.apply(|node| {
        if let Some(filter) = filterable(node).into_iter().find(|f| f.stages == join) {
            found = Some(filter);
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    let Filterable {
        keys_source,
        on,
        null_equality,
        ..
    } = found.ok_or_else(|| {
        DataFusionError::Internal(format!(
            "no join of stage {} with stage {}",
            join.build, join.probe
        ))
    })?;
    let build: Arc<dyn ExecutionPlan> = Arc::new(CoalescePartitionsExec::new(keys_source));
    let semi = |input: &Arc<dyn ExecutionPlan>, on| -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(HashJoinExec::try_new(
            Arc::clone(&build),
            Arc::clone(input),
            on,
            None,
            &JoinType::RightSemi,
            None,
            PartitionMode::CollectLeft,
            null_equality,
            false,
        )?))
    };
    // Keys that are group columns of a partial aggregate filter its input instead: the rows
    // of groups without a match are not even aggregated.
    if let Some(partial) = probe_input.downcast_ref::<AggregateExec>()
        && *partial.mode() == AggregateMode::Partial
        && partial.group_expr().is_single()
    {
        let groups = partial.group_expr().expr();
        let below: Option<Vec<_>> = on
            .iter()
            .map(|(key, filtered)| {
                let index = filtered.downcast_ref::<Column>()?.index();
                Some((Arc::clone(key), Arc::clone(&groups.get(index)?.0)))
            })
            .collect();
        if let Some(below) = below {
            let filtered = semi(partial.input(), below)?;
            return replace_children_if_necessary(Arc::clone(probe_input), vec![filtered]);
        }
    }
    semi(probe_input, on)
}

/// The join of `plan` (a stage's writer input) rewritten as a broadcast join: the build side is
/// read whole by every task, the probe side's shuffle reader is replaced by `probe_input`.
pub fn broadcast_rewrite(
    plan: &Arc<dyn ExecutionPlan>,
    probe_stage: u32,
    probe_input: &Arc<dyn ExecutionPlan>,
) -> Result<Arc<dyn ExecutionPlan>> {
    if let Some(join) = plan.downcast_ref::<HashJoinExec>() {
        return match join.partition_mode() {
            PartitionMode::Partitioned => {
                let left: Arc<dyn ExecutionPlan> =
                    Arc::new(CoalescePartitionsExec::new(Arc::clone(join.left())));
                let right = replace_reader(join.right(), probe_stage, probe_input)?;
                join.builder()
                    .with_partition_mode(PartitionMode::CollectLeft)
                    .with_new_children(vec![left, right])?
                    .recompute_properties()
                    .build_exec()
            }
            _ => {
                let right = broadcast_rewrite(join.right(), probe_stage, probe_input)?;
                replace_children_if_necessary(
                    Arc::clone(plan),
                    vec![Arc::clone(join.left()), right],
                )
            }
        };
    }
    let child = partition_agnostic_child(plan)
        .ok_or_else(|| DataFusionError::Internal(format!("cannot rewrite {}", plan.name())))?;
    let child = broadcast_rewrite(child, probe_stage, probe_input)?;
    replace_children_if_necessary(Arc::clone(plan), vec![child])
}

fn replace_reader(
    plan: &Arc<dyn ExecutionPlan>,
    stage: u32,
    replacement: &Arc<dyn ExecutionPlan>,
) -> Result<Arc<dyn ExecutionPlan>> {
    if let Some(reader) = plan.downcast_ref::<ShuffleReaderExec>()
        && reader.stage_id() == stage
    {
        return Ok(Arc::clone(replacement));
    }
    let child = row_local_child(plan)
        .ok_or_else(|| DataFusionError::Internal(format!("no reader of stage {stage}")))?;
    let child = replace_reader(child, stage, replacement)?;
    replace_children_if_necessary(Arc::clone(plan), vec![child])
}
