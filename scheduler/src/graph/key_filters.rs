//! Key filters below shuffles: a scan stage shuffled into a stage whose inner joins above it
//! keep only rows matching a selective build side (a filtered dimension, broadcast or scanned in
//! the stage) first drops the rows those joins would drop, before it shuffles them.
//!
//! This is the distributed counterpart of DataFusion's dynamic join filters, which cannot cross
//! a shuffle: on one node, the filtered dimensions of TPC-DS q72 (date year, marital status,
//! buying potential) prune `catalog_sales` before its join with `inventory`; cut into stages,
//! every `catalog_sales` row met ~650 `inventory` rows first (SF1: 63 s against 5.6 s). Each
//! filter is a `CollectLeft` right-semi join of the scan stage's output against a copy of the
//! build side; its output has the scan stage's schema, so nothing above it changes, and the
//! joins above still apply (the filter only removes rows they would remove).

use std::sync::Arc;

use datafusion::common::NullEquality;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::error::Result;
use datafusion::logical_expr::JoinType;
use datafusion::physical_expr::PhysicalExprRef;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::expressions::Column;
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
use datafusion::physical_plan::{ExecutionPlan, ExecutionPlanProperties};
use volley_core::plan::ShuffleReaderExec;
use volley_core::plan::trace::trace_column;

use crate::graph::joins::{readers_of, restricts_rows};
use crate::graph::{StageKind, StagePlan};

/// At most this many filters per scan stage (each one reads its build side in every task).
const MAX_FILTERS: usize = 8;

/// One build side whose keys filter a scan stage.
struct KeyFilter {
    /// Stage filtered (a plain scan stage read by the join stage only).
    stage: u32,
    /// The join's build side, copied into the filtered stage.
    build: Arc<dyn ExecutionPlan>,
    /// (build key, column of the filtered stage's output).
    on: Vec<(PhysicalExprRef, PhysicalExprRef)>,
    null_equality: NullEquality,
}

/// Add the key filters of every stage's joins to the scan stages they read.
pub fn add_key_filters(stages: &mut [StagePlan]) -> Result<()> {
    let mut found = Vec::new();
    for stage in stages.iter() {
        let plan = Arc::clone(&stage.plan) as Arc<dyn ExecutionPlan>;
        let _ = plan.apply(|node| {
            if let Some(join) = node.downcast_ref::<HashJoinExec>() {
                found.extend(key_filter(join, stage.stage_id, stages));
            }
            Ok(TreeNodeRecursion::Continue)
        });
    }
    for target in stages.iter_mut() {
        let filters: Vec<&KeyFilter> = found
            .iter()
            .filter(|f| f.stage == target.stage_id)
            .take(MAX_FILTERS)
            .collect();
        if filters.is_empty() {
            continue;
        }
        let mut input = Arc::clone(target.plan.input());
        let partitions = input.output_partitioning().partition_count();
        for filter in filters {
            let build = if filter.build.output_partitioning().partition_count() == 1 {
                Arc::clone(&filter.build)
            } else {
                Arc::new(CoalescePartitionsExec::new(Arc::clone(&filter.build)))
            };
            input = Arc::new(HashJoinExec::try_new(
                build,
                input,
                filter.on.clone(),
                None,
                &JoinType::RightSemi,
                None,
                PartitionMode::CollectLeft,
                filter.null_equality,
                false,
            )?);
            for stage in reader_stages(&filter.build) {
                if !target.inputs.contains(&stage) {
                    target.inputs.push(stage);
                }
            }
        }
        debug_assert_eq!(input.output_partitioning().partition_count(), partitions);
        target.plan = Arc::new(target.plan.with_input(input));
    }
    Ok(())
}

/// The filter `join` (in stage `stage_id`) puts on a scan stage its probe side reads, if its
/// build side is selective and copyable and some of its probe keys are columns of that stage.
fn key_filter(join: &HashJoinExec, stage_id: u32, stages: &[StagePlan]) -> Option<KeyFilter> {
    if *join.partition_mode() != PartitionMode::CollectLeft
        || join.null_aware
        || join.fetch().is_some()
        || !matches!(join.join_type(), JoinType::Inner | JoinType::RightSemi)
    {
        return None;
    }
    let build = join.left();
    if !copyable_and_selective(build, stages) {
        return None;
    }
    let mut target = None;
    let mut on = Vec::new();
    for (key, probe) in join.on() {
        let Some(column) = probe.downcast_ref::<Column>() else {
            continue;
        };
        let Some((stage, index)) = trace(join.right(), column.index()) else {
            continue;
        };
        if *target.get_or_insert(stage) != stage {
            continue;
        }
        let reader_schema = stages
            .iter()
            .find(|s| s.stage_id == stage)?
            .plan
            .input()
            .schema();
        let field = reader_schema.fields().get(index)?;
        on.push((
            Arc::clone(key),
            Arc::new(Column::new(field.name(), index)) as PhysicalExprRef,
        ));
    }
    let stage = target?;
    let filtered = stages.iter().find(|s| s.stage_id == stage)?;
    let consumers = stages.iter().filter(|s| s.inputs.contains(&stage)).count();
    let joining = stages.iter().find(|s| s.stage_id == stage_id)?;
    let plain_scan = filtered.kind == StageKind::Shuffle && filtered.inputs.is_empty();
    // Inputs always have smaller ids than their consumers.
    let ordered = reader_stages(build).iter().all(|&b| b < stage);
    (plain_scan
        && ordered
        && consumers == 1
        && readers_of(
            &(Arc::clone(&joining.plan) as Arc<dyn ExecutionPlan>),
            stage,
        ) == 1)
        .then(|| KeyFilter {
            stage,
            build: Arc::clone(build),
            on,
            null_equality: join.null_equality(),
        })
}

/// True when `build` reads only broadcast stages (or scans in the stage) and drops rows by
/// their values somewhere (a filter or join, here or in a stage it reads): the keys of a whole table
/// would keep nearly every row.
fn copyable_and_selective(build: &Arc<dyn ExecutionPlan>, stages: &[StagePlan]) -> bool {
    let mut copyable = true;
    let mut selective = false;
    let _ = build.apply(|node| {
        if let Some(reader) = node.downcast_ref::<ShuffleReaderExec>() {
            match stages.iter().find(|s| s.stage_id == reader.stage_id()) {
                Some(stage) if stage.kind == StageKind::Broadcast => {
                    selective |=
                        restricts_rows(&(Arc::clone(&stage.plan) as Arc<dyn ExecutionPlan>));
                }
                _ => copyable = false,
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    copyable && (selective || restricts_rows(build))
}

/// The shuffle stage and column of its output that column `index` of `plan` is (see
/// [`trace_column`]).
fn trace(plan: &Arc<dyn ExecutionPlan>, index: usize) -> Option<(u32, usize)> {
    trace_column(plan, index, &|node, index| {
        node.downcast_ref::<ShuffleReaderExec>()
            .filter(|reader| reader.hash_partitioned())
            .map(|reader| (reader.stage_id(), index))
    })
}

fn reader_stages(plan: &Arc<dyn ExecutionPlan>) -> Vec<u32> {
    let mut stages = Vec::new();
    let _ = plan.apply(|node| {
        if let Some(reader) = node.downcast_ref::<ShuffleReaderExec>()
            && !stages.contains(&reader.stage_id())
        {
            stages.push(reader.stage_id());
        }
        Ok(TreeNodeRecursion::Continue)
    });
    stages
}
