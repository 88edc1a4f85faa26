//! Stages that build broadcast hash tables run their partitions together, in one task.
//!
//! A `CollectLeft` hash join builds its table once per operator and shares it between the
//! partitions it runs; cut into one task per partition, every task builds its own copy (TPC-DS
//! q17 SF1: two 211 ms tasks each hashing the same 1.44M broadcast rows, where single-node
//! DataFusion builds them once). When an executor gives each task slot several cores, a stage
//! whose partitions fit in one slot's cores runs as one task over all its partitions (a
//! `CoalescePartitionsExec` under the writer): the table is built once and the probe side still
//! uses every core of the slot, as Spark's executors share a broadcast relation between tasks.
//!
//! Only stages whose inputs are all read in full qualify: a stage reading hash partitions is
//! one task per partition by design (adaptive execution regroups and splits those), and a stage
//! adaptive execution may filter at run time keeps its shape. Stages whose output order matters
//! to their reader keep one task per partition too (a coalesce would interleave them).

use std::sync::Arc;

use datafusion::common::tree_node::TreeNode;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
use datafusion::physical_plan::{ExecutionPlan, ExecutionPlanProperties};
use volley_core::plan::ShuffleReaderExec;

use crate::graph::{StageKind, StagePlan};

/// Run every qualifying stage of at most `per_task` partitions as one task (see the module
/// doc); returns the ids of the stages changed.
pub fn group_broadcast_stages(stages: &mut [StagePlan], per_task: usize) -> Vec<u32> {
    let filtered: Vec<u32> = stages
        .iter()
        .flat_map(|s| s.adaptive_joins.iter().map(|j| j.probe))
        .collect();
    let mut grouped = Vec::new();
    for stage in stages.iter_mut() {
        if stage.partitions < 2
            || stage.partitions > per_task
            || stage.kind == StageKind::Result
            || !stage.adaptive_joins.is_empty()
            || filtered.contains(&stage.stage_id)
        {
            continue;
        }
        let input = stage.plan.input();
        if input.output_ordering().is_some() || !builds_broadcast_table(input) {
            continue;
        }
        if reads_hash_partitions(input) {
            continue;
        }
        let coalesced = Arc::new(CoalescePartitionsExec::new(Arc::clone(input)));
        stage.plan = Arc::new(stage.plan.with_input(coalesced));
        stage.partitions = 1;
        grouped.push(stage.stage_id);
    }
    grouped
}

/// Does `plan` hold a `CollectLeft` hash join (a table built once for all its partitions)?
fn builds_broadcast_table(plan: &Arc<dyn ExecutionPlan>) -> bool {
    plan.exists(|node| {
        Ok(node
            .downcast_ref::<HashJoinExec>()
            .is_some_and(|join| *join.partition_mode() == PartitionMode::CollectLeft))
    })
    .unwrap_or(false)
}

/// Does `plan` read some stage partition by partition (hash mode)?
fn reads_hash_partitions(plan: &Arc<dyn ExecutionPlan>) -> bool {
    plan.exists(|node| {
        Ok(node
            .downcast_ref::<ShuffleReaderExec>()
            .is_some_and(ShuffleReaderExec::hash_partitioned))
    })
    .unwrap_or(true)
}
