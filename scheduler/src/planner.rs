//! Cuts an optimized DataFusion physical plan into a DAG of stages at its exchanges.
//!
//! * hash (or round-robin) `RepartitionExec` becomes a shuffle: the producing stage ends in a
//!   hashing `ShuffleWriterExec`, the consumer starts with a hash-mode `ShuffleReaderExec`;
//! * `CoalescePartitionsExec` and `SortPreservingMergeExec` over several partitions stay in the
//!   consumer stage, reading every map task's single file (passthrough mode);
//! * the build side of a `CollectLeft` hash join is such a passthrough read by every join task:
//!   a broadcast stage;
//! * the root ends in a result stage whose files the client fetches directly.

use std::fmt::Write as _;
use std::sync::Arc;

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::error::{DataFusionError, Result};
use datafusion::physical_expr::LexOrdering;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::joins::{HashJoinExec, NestedLoopJoinExec, PartitionMode};
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::sorts::sort_preserving_merge::SortPreservingMergeExec;
use datafusion::physical_plan::{
    ExecutionPlan, ExecutionPlanProperties, Partitioning, replace_children_if_necessary,
};
use volley_core::plan::{ShuffleReaderExec, ShuffleWriterExec};

use crate::adaptive::{ShuffledJoin, filterable_joins, shuffled_join};
use crate::rules::emits_build_rows_at_end;

/// What a stage's output is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageKind {
    /// Hash-partitioned shuffle consumed partition by partition.
    Shuffle,
    /// One file per task, merged or coalesced by a single consumer task.
    Merge,
    /// One file per task, read in full by every task of the consumer (join build side).
    Broadcast,
    /// The job's result, fetched by the client.
    Result,
}

impl StageKind {
    /// Lower-case name used in EXPLAIN and state records.
    pub fn as_str(self) -> &'static str {
        match self {
            StageKind::Shuffle => "shuffle",
            StageKind::Merge => "merge",
            StageKind::Broadcast => "broadcast",
            StageKind::Result => "result",
        }
    }
}

/// One stage of a job: a plan ending in a [`ShuffleWriterExec`], run as one task per partition.
#[derive(Debug, Clone)]
pub struct StagePlan {
    /// Stage id, unique within the job; inputs always have smaller ids.
    pub stage_id: u32,
    /// The stage's plan; its readers have no locations yet.
    pub plan: Arc<ShuffleWriterExec>,
    /// Stages whose output this stage reads.
    pub inputs: Vec<u32>,
    /// Number of tasks.
    pub partitions: usize,
    /// What the output is for.
    pub kind: StageKind,
    /// Adaptive execution may turn this stage's partitioned join into a broadcast join, or
    /// filter its probe stage by the build side's keys, once the build side's real size is
    /// known (see [`crate::adaptive`]).
    pub adaptive_joins: Vec<ShuffledJoin>,
}

/// Mark the stages whose partitioned join may become a broadcast join (or, for left
/// outer/semi/anti/mark joins, have its probe stage filtered by the build side's keys) at run
/// time: both sides are shuffle stages and the probe side feeds nothing else.
pub fn mark_broadcast_candidates(stages: &mut [StagePlan]) {
    let candidates: Vec<(usize, ShuffledJoin)> = stages
        .iter()
        .enumerate()
        .flat_map(|(index, stage)| {
            let plan = Arc::clone(&stage.plan) as Arc<dyn ExecutionPlan>;
            // A broadcast switch moves the probe stage into this one; the filters only
            // change probe stages, so several may apply to one stage.
            let joins = match shuffled_join(&plan) {
                Some(join) => vec![join],
                None => filterable_joins(&plan),
            };
            joins.into_iter().map(move |join| (index, join))
        })
        .filter(|(_, join)| {
            let shuffle = |id: u32| {
                stages
                    .iter()
                    .any(|s| s.stage_id == id && s.kind == StageKind::Shuffle)
            };
            let probe_consumers = stages
                .iter()
                .filter(|s| s.inputs.contains(&join.probe))
                .count();
            // A filtered probe stage must be a plain scan stage: its tasks then read nothing
            // that adaptive regrouping could narrow, and the build side is read whole.
            let plain_probe = !join.probe_filter
                || stages
                    .iter()
                    .any(|s| s.stage_id == join.probe && s.inputs.is_empty());
            // Keys of a whole table (no filter, no join below them) would keep nearly every
            // row: TPC-H q13's orders filtered by all customers kept 1,483,918 of 1,483,918.
            let selective_keys = !join.probe_filter
                || stages
                    .iter()
                    .find(|s| s.stage_id == join.build)
                    .is_some_and(|s| {
                        restricts_rows(&(Arc::clone(&s.plan) as Arc<dyn ExecutionPlan>))
                    });
            shuffle(join.build)
                && shuffle(join.probe)
                && probe_consumers == 1
                && plain_probe
                && selective_keys
        })
        .collect();
    // The probe stage's output changes (moved, or filtered), so the join stage must read it in
    // this one join only, and a probe stage is filtered for one join at most.
    let candidates: Vec<(usize, ShuffledJoin)> = candidates
        .iter()
        .filter(|(index, join)| {
            let plan = Arc::clone(&stages[*index].plan) as Arc<dyn ExecutionPlan>;
            readers_of(&plan, join.probe) == 1
                && candidates
                    .iter()
                    .filter(|(_, j)| j.probe == join.probe)
                    .count()
                    == 1
        })
        .copied()
        .collect();
    for (index, join) in candidates {
        stages[index].adaptive_joins.push(join);
    }
}

/// True when some operator of `plan` drops rows of its input by their values (a filter or a
/// hash join), so its keys may be a small part of their table's.
fn restricts_rows(plan: &Arc<dyn ExecutionPlan>) -> bool {
    let mut found = false;
    let _ = plan.apply(|node| {
        found = node.is::<FilterExec>() || node.is::<HashJoinExec>();
        Ok(if found {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    });
    found
}

/// Shuffle readers of `stage` in `plan`.
fn readers_of(plan: &Arc<dyn ExecutionPlan>, stage: u32) -> usize {
    let mut count = 0;
    let _ = plan.apply(|node| {
        if node
            .downcast_ref::<ShuffleReaderExec>()
            .is_some_and(|r| r.stage_id() == stage)
        {
            count += 1;
        }
        Ok(TreeNodeRecursion::Continue)
    });
    count
}

/// Split `plan` into stages; the last one is the result stage.
pub fn plan_stages(job_id: &str, plan: Arc<dyn ExecutionPlan>) -> Result<Vec<StagePlan>> {
    let mut cutter = Cutter {
        job_id: job_id.to_string(),
        stages: Vec::new(),
    };
    let root = cutter.cut(plan)?;
    cutter.add_stage(root, None, StageKind::Result);
    Ok(cutter.stages)
}

struct Cutter {
    job_id: String,
    stages: Vec<StagePlan>,
}

impl Cutter {
    fn next_id(&self) -> u32 {
        u32::try_from(self.stages.len() + 1).unwrap_or(u32::MAX)
    }

    fn add_stage(
        &mut self,
        input: Arc<dyn ExecutionPlan>,
        partitioning: Option<Partitioning>,
        kind: StageKind,
    ) -> u32 {
        let stage_id = self.next_id();
        let mut inputs = Vec::new();
        collect_reader_stages(&input, &mut inputs);
        let partitions = input.output_partitioning().partition_count();
        let plan = Arc::new(ShuffleWriterExec::new(
            self.job_id.clone(),
            stage_id,
            input,
            partitioning,
        ));
        self.stages.push(StagePlan {
            stage_id,
            plan,
            inputs,
            partitions,
            kind,
            adaptive_joins: Vec::new(),
        });
        stage_id
    }

    fn mark(&mut self, stage_id: u32, kind: StageKind) {
        if let Some(stage) = self.stages.iter_mut().find(|s| s.stage_id == stage_id) {
            stage.kind = kind;
        }
    }

    fn cut(&mut self, plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
        let children = plan
            .children()
            .into_iter()
            .map(|child| self.cut(Arc::clone(child)))
            .collect::<Result<Vec<_>>>()?;
        let plan = if children.is_empty() {
            plan
        } else {
            replace_children_if_necessary(plan, children)?
        };

        if let Some(repartition) = plan.downcast_ref::<RepartitionExec>() {
            let partitioning = repartition.partitioning().clone();
            if matches!(
                partitioning,
                Partitioning::Hash(..) | Partitioning::RoundRobinBatch(_)
            ) {
                let input = Arc::clone(repartition.input());
                let ordering = repartition
                    .preserve_order()
                    .then(|| input.output_ordering().cloned())
                    .flatten();
                let schema = plan.schema();
                let reader_partitioning = match &partitioning {
                    Partitioning::Hash(..) => partitioning.clone(),
                    other => Partitioning::UnknownPartitioning(other.partition_count()),
                };
                let stage_id = self.add_stage(input, Some(partitioning), StageKind::Shuffle);
                let reader: Arc<dyn ExecutionPlan> = Arc::new(ShuffleReaderExec::new(
                    stage_id,
                    schema,
                    reader_partitioning,
                    true,
                ));
                return Ok(resort(reader, ordering));
            }
            return Ok(plan);
        }

        let merges = plan.is::<CoalescePartitionsExec>() || plan.is::<SortPreservingMergeExec>();
        if merges {
            if let Some(input) = plan.children().first().map(|c| Arc::clone(*c)) {
                let count = input.output_partitioning().partition_count();
                // Already cut (re-walks of a cut subtree leave it alone).
                let cut_before = input.is::<ShuffleReaderExec>();
                if count > 1 && !cut_before {
                    let schema = input.schema();
                    let stage_id = self.add_stage(input, None, StageKind::Merge);
                    let reader: Arc<dyn ExecutionPlan> = Arc::new(ShuffleReaderExec::new(
                        stage_id,
                        schema,
                        Partitioning::UnknownPartitioning(count),
                        false,
                    ));
                    return replace_children_if_necessary(plan, vec![reader]);
                }
            }
            return Ok(plan);
        }

        if let Some(fixed) = single_probe_partition(&plan)? {
            return self.cut(fixed);
        }

        if let Some(join) = plan.downcast_ref::<HashJoinExec>()
            && *join.partition_mode() == PartitionMode::CollectLeft
            && let Some(stage_id) = first_reader_stage(join.left())
        {
            self.mark(stage_id, StageKind::Broadcast);
        }
        Ok(plan)
    }
}

/// Joins that emit build-side rows after the last probe partition (null-aware anti hash joins,
/// outer/semi/anti nested-loop joins) are only correct when one task sees every probe row: give
/// them a single probe partition. Returns the rewritten join, or None when nothing is needed.
fn single_probe_partition(plan: &Arc<dyn ExecutionPlan>) -> Result<Option<Arc<dyn ExecutionPlan>>> {
    let (join_type, right) = if let Some(join) = plan.downcast_ref::<HashJoinExec>() {
        if *join.partition_mode() != PartitionMode::CollectLeft {
            return Ok(None);
        }
        (*join.join_type(), Arc::clone(join.right()))
    } else if let Some(join) = plan.downcast_ref::<NestedLoopJoinExec>() {
        (*join.join_type(), Arc::clone(join.right()))
    } else {
        return Ok(None);
    };
    if !emits_build_rows_at_end(join_type) || right.output_partitioning().partition_count() <= 1 {
        return Ok(None);
    }
    if matches!(plan.output_partitioning(), Partitioning::Hash(..)) {
        return Err(DataFusionError::NotImplemented(format!(
            "Volley cannot distribute a {join_type} {} whose output must stay hash-partitioned",
            plan.name()
        )));
    }
    let left = plan
        .children()
        .first()
        .map(|c| Arc::clone(*c))
        .ok_or_else(|| DataFusionError::Internal("join without children".to_string()))?;
    let coalesced: Arc<dyn ExecutionPlan> = Arc::new(CoalescePartitionsExec::new(right));
    Ok(Some(replace_children_if_necessary(
        Arc::clone(plan),
        vec![left, coalesced],
    )?))
}

/// A sort-preserving repartition kept each partition sorted; re-sort what the reader returns.
fn resort(reader: Arc<dyn ExecutionPlan>, ordering: Option<LexOrdering>) -> Arc<dyn ExecutionPlan> {
    match ordering {
        Some(ordering) => {
            Arc::new(SortExec::new(ordering, reader).with_preserve_partitioning(true))
        }
        None => reader,
    }
}

fn first_reader_stage(plan: &Arc<dyn ExecutionPlan>) -> Option<u32> {
    if let Some(reader) = plan.downcast_ref::<ShuffleReaderExec>() {
        return Some(reader.stage_id());
    }
    match plan.children().as_slice() {
        [only] => first_reader_stage(only),
        _ => None,
    }
}

fn collect_reader_stages(plan: &Arc<dyn ExecutionPlan>, out: &mut Vec<u32>) {
    if let Some(reader) = plan.downcast_ref::<ShuffleReaderExec>() {
        if !out.contains(&reader.stage_id()) {
            out.push(reader.stage_id());
        }
        return;
    }
    for child in plan.children() {
        collect_reader_stages(child, out);
    }
}

/// One line per stage: id, kind, task count, inputs and operators (pre-order).
pub fn explain_stages(stages: &[StagePlan]) -> Vec<String> {
    stages
        .iter()
        .map(|stage| {
            let inputs: Vec<String> = stage.inputs.iter().map(|i| i.to_string()).collect();
            let mut ops = String::new();
            let writer: Arc<dyn ExecutionPlan> = Arc::clone(&stage.plan) as Arc<dyn ExecutionPlan>;
            operators(&writer, &mut ops);
            let notes: Vec<String> = stage
                .adaptive_joins
                .iter()
                .map(|join| crate::adaptive::candidate(*join).to_string())
                .collect();
            let adaptive = if notes.is_empty() {
                String::new()
            } else {
                format!(" adaptive=[{}]", notes.join("; "))
            };
            format!(
                "Stage {}: kind={} partitions={} inputs=[{}]{adaptive} operators: {}",
                stage.stage_id,
                stage.kind.as_str(),
                stage.partitions,
                inputs.join(" "),
                ops
            )
        })
        .collect()
}

fn operators(plan: &Arc<dyn ExecutionPlan>, out: &mut String) {
    let _ = write!(out, "{}", plan.name());
    if let Some(reader) = plan.downcast_ref::<ShuffleReaderExec>() {
        let _ = write!(out, "[stage {}]", reader.stage_id());
    }
    if let Some(writer) = plan.downcast_ref::<ShuffleWriterExec>() {
        match writer.shuffle_partitioning() {
            Some(Partitioning::Hash(_, n)) => {
                let _ = write!(out, "[hash {n}]");
            }
            Some(p) => {
                let _ = write!(out, "[{} buckets]", p.partition_count());
            }
            None => {}
        }
    }
    let children = plan.children();
    match children.len() {
        0 => {}
        1 => {
            out.push_str(" <- ");
            operators(children[0], out);
        }
        _ => {
            out.push_str(" <- (");
            for (i, child) in children.iter().enumerate() {
                if i > 0 {
                    out.push_str("; ");
                }
                operators(child, out);
            }
            out.push(')');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::{CsvReadOptions, SessionContext};
    use volley_core::codec::VolleyCodec;
    use volley_core::config::volley_session_config;

    async fn stages_of(sql: &str) -> Vec<StagePlan> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.csv");
        std::fs::write(&path, "a,b\n1,x\n2,y\n3,x\n").unwrap();
        let ctx = SessionContext::new_with_state(crate::rules::volley_session_state(
            volley_session_config(4),
        ));
        ctx.register_csv("t", path.to_str().unwrap(), CsvReadOptions::new())
            .await
            .unwrap();
        ctx.register_csv("u", path.to_str().unwrap(), CsvReadOptions::new())
            .await
            .unwrap();
        let plan = ctx
            .sql(sql)
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap();
        plan_stages("job", plan).unwrap()
    }

    fn kinds(stages: &[StagePlan]) -> Vec<&'static str> {
        stages.iter().map(|s| s.kind.as_str()).collect()
    }

    #[tokio::test]
    async fn group_by_order_by_cuts_shuffle_merge_result() {
        let stages = stages_of("SELECT b, count(*) FROM t GROUP BY b ORDER BY b").await;
        assert_eq!(kinds(&stages), vec!["shuffle", "merge", "result"]);
        assert_eq!(stages[0].inputs, Vec::<u32>::new());
        assert_eq!(stages[1].inputs, vec![1]);
        assert_eq!(stages[1].partitions, 4);
        assert_eq!(stages[2].inputs, vec![2]);
        assert_eq!(stages[2].partitions, 1);
        let lines = explain_stages(&stages);
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].starts_with("Stage 1: kind=shuffle"),
            "{}",
            lines[0]
        );
        assert!(
            lines[2].contains("SortPreservingMergeExec <- ShuffleReaderExec[stage 2]"),
            "{}",
            lines[2]
        );
        for stage in &stages {
            assert!(
                VolleyCodec::encode_plan(Arc::clone(&stage.plan) as Arc<dyn ExecutionPlan>).is_ok()
            );
        }
    }

    #[tokio::test]
    async fn partitioned_join_shuffles_both_sides() {
        let stages = stages_of(
            "SELECT /* big enough to avoid collect-left */ t.a, u.b FROM t JOIN u ON t.b = u.b ORDER BY 1, 2",
        )
        .await;
        let kinds = kinds(&stages);
        assert_eq!(kinds.last(), Some(&"result"));
        assert!(
            kinds.contains(&"shuffle") || kinds.contains(&"broadcast"),
            "{kinds:?}"
        );
        // Every stage's inputs are earlier stages.
        for stage in &stages {
            assert!(stage.inputs.iter().all(|i| *i < stage.stage_id));
        }
    }
}
