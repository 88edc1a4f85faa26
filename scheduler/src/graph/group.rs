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
//!
//! A grouped stage reads a broadcast stage that only scans files (and that nothing else
//! reads) through the scan itself: its one task reads the whole output once either way, and
//! the stage would only add a barrier and a file written and read back.

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::Result;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
use datafusion::physical_plan::{ExecutionPlan, ExecutionPlanProperties};
use volley_core::plan::ShuffleReaderExec;

use crate::graph::inline::scanned_bytes;
use crate::graph::joins::readers_of;
use crate::graph::{StageKind, StagePlan};

/// Run every qualifying stage of at most `per_task` partitions as one task (see the module
/// doc); returns the ids of the stages changed.
pub fn group_broadcast_stages(stages: &mut Vec<StagePlan>, per_task: usize) -> Result<Vec<u32>> {
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
        if input.output_ordering().is_some()
            || !builds_broadcast_table(input)
            || reads_hash_partitions(input)
        {
            continue;
        }
        let coalesced = Arc::new(CoalescePartitionsExec::new(Arc::clone(input)));
        stage.plan = Arc::new(stage.plan.with_input(coalesced));
        stage.partitions = 1;
        grouped.push(stage.stage_id);
    }
    let mut gone = Vec::new();
    for id in &grouped {
        let Some(at) = stages.iter().position(|s| s.stage_id == *id) else {
            continue;
        };
        let mut stage = stages.remove(at);
        let inlined = inline_broadcast_inputs(&mut stage, stages);
        stages.insert(at, stage);
        gone.extend(inlined?);
    }
    stages.retain(|s| !gone.contains(&s.stage_id));
    Ok(grouped)
}

/// Stage `stage` (grouped: one task) reads each broadcast stage that only scans files and has
/// no other reader through the scan itself: its one task would read that stage's whole output
/// once anyway, so the stage costs a barrier and a file written and read back, where the scan
/// in the task (its partitions still read at once) costs nothing more. Returns the ids of the
/// stages no longer needed.
fn inline_broadcast_inputs(stage: &mut StagePlan, others: &[StagePlan]) -> Result<Vec<u32>> {
    let mut inlined = Vec::new();
    for &input in &stage.inputs {
        let Some(producer) = others.iter().find(|s| s.stage_id == input) else {
            continue;
        };
        let scan = producer.plan.input();
        let sole_reader = !others
            .iter()
            .any(|s| s.stage_id != input && s.inputs.contains(&input));
        if producer.kind != StageKind::Broadcast
            || !producer.inputs.is_empty()
            || !sole_reader
            || scanned_bytes(scan).is_none()
        {
            continue;
        }
        let partitions = scan.output_partitioning().partition_count();
        let replaced = Arc::clone(stage.plan.input()).transform_up(|node| {
            let reads = node.downcast_ref::<ShuffleReaderExec>().is_some_and(|r| {
                r.stage_id() == input
                    && !r.hash_partitioned()
                    && r.partitioning().partition_count() == partitions
            });
            Ok(match reads {
                true => Transformed::yes(Arc::clone(scan)),
                false => Transformed::no(node),
            })
        })?;
        if replaced.transformed && readers_of(&replaced.data, input) == 0 {
            stage.plan = Arc::new(stage.plan.with_input(replaced.data));
            inlined.push(input);
        }
    }
    stage.inputs.retain(|i| !inlined.contains(i));
    Ok(inlined)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::cut::plan_stages;
    use datafusion::prelude::{ParquetReadOptions, SessionContext};
    use volley_core::config::volley_session_config;

    /// The stages of a join of `t` with a small `u` (two Parquet files each: two partitions),
    /// whose build side is a broadcast stage.
    async fn join_stages() -> Vec<StagePlan> {
        let dir = tempfile::tempdir().unwrap();
        let writer = SessionContext::new();
        let files = [
            ("t/1.parquet", "(1, 'x'), (2, 'y')"),
            ("t/2.parquet", "(3, 'x'), (4, 'z')"),
            ("u/1.parquet", "(1, 'p')"),
            ("u/2.parquet", "(3, 'q')"),
        ];
        for (file, rows) in files {
            let path = dir.path().join(file);
            let sql = format!(
                "COPY (SELECT column1 AS a, column2 AS b FROM (VALUES {rows})) TO '{}' \
                 STORED AS PARQUET",
                path.display()
            );
            writer.sql(&sql).await.unwrap().collect().await.unwrap();
        }
        let state = volley_core::rules::volley_session_state(volley_session_config(2));
        let ctx = SessionContext::new_with_state(state);
        for table in ["t", "u"] {
            let path = dir.path().join(table);
            let options = ParquetReadOptions::default();
            ctx.register_parquet(table, path.to_str().unwrap(), options)
                .await
                .unwrap();
        }
        let sql = "SELECT count(*), sum(t.a) FROM t JOIN u ON t.a = u.a";
        let physical = ctx.sql(sql).await.unwrap().create_physical_plan().await;
        plan_stages("job", physical.unwrap()).unwrap()
    }

    #[tokio::test]
    async fn a_broadcast_join_stage_runs_in_one_task_and_scans_its_build_side_itself() {
        let mut stages = join_stages().await;
        let kinds: Vec<&str> = stages.iter().map(|s| s.kind.as_str()).collect();
        assert_eq!(kinds, ["broadcast", "merge", "result"]);
        assert_eq!(stages[1].partitions, 2);
        // One core per slot: nothing changes.
        assert_eq!(
            group_broadcast_stages(&mut stages, 1).unwrap(),
            Vec::<u32>::new()
        );
        assert_eq!(stages.len(), 3);

        let grouped = group_broadcast_stages(&mut stages, 2).unwrap();
        assert_eq!(grouped, [2]);
        let ids: Vec<u32> = stages.iter().map(|s| s.stage_id).collect();
        assert_eq!(
            ids,
            [2, 3],
            "the broadcast stage is scanned by its one reader"
        );
        let join = &stages[0];
        assert_eq!((join.partitions, join.inputs.clone()), (1, Vec::new()));
        assert!(join.plan.input().is::<CoalescePartitionsExec>());
        let plan = Arc::clone(join.plan.input());
        assert!(!plan.exists(|n| Ok(n.is::<ShuffleReaderExec>())).unwrap());
        assert!(builds_broadcast_table(&plan));
        assert_eq!(stages[1].inputs, [2]);
    }
}
