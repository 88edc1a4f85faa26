//! Cuts an optimized DataFusion physical plan into a DAG of stages at its exchanges.
//!
//! * hash (or round-robin) `RepartitionExec` becomes a shuffle: the producing stage ends in a
//!   hashing `ShuffleWriterExec`, the consumer starts with a hash-mode `ShuffleReaderExec`;
//! * `CoalescePartitionsExec` and `SortPreservingMergeExec` over several partitions stay in the
//!   consumer stage, reading every map task's single file (passthrough mode);
//! * the build side of a `CollectLeft` hash join is such a passthrough read by every join task:
//!   a broadcast stage (unless it only scans a few small files: see [`inline_build_side`]);
//! * the root ends in a result stage whose files the client fetches directly;
//! * a stage identical to one cut before is not cut again: its readers read that one
//!   ([`crate::graph::reuse`]).

use std::sync::Arc;

use datafusion::error::{DataFusionError, Result};
use datafusion::physical_expr::LexOrdering;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::joins::{HashJoinExec, NestedLoopJoinExec, PartitionMode};
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::sorts::sort_preserving_merge::SortPreservingMergeExec;
use datafusion::physical_plan::{
    ExecutionPlan, ExecutionPlanProperties, Partitioning, replace_children_if_necessary,
};
use volley_core::plan::{CommitFilesExec, ShuffleReaderExec, ShuffleWriterExec};
use volley_core::rules::emits_build_rows_at_end;

use crate::graph::inline::inline_build_side;
use crate::graph::reuse::Reuse;
use crate::graph::writes::split_writes;
use crate::graph::{StageKind, StagePlan};

/// Split `plan` into stages; the last one is the result stage.
pub fn plan_stages(job_id: &str, plan: Arc<dyn ExecutionPlan>) -> Result<Vec<StagePlan>> {
    plan_stages_inlining(job_id, plan, 0, true)
}

/// [`plan_stages`], keeping small scanned build sides in their joins' stages (see
/// [`inline_build_side`]; `inline_bytes` is its budget), and reusing identical stages when
/// `reuse` (see [`crate::graph::reuse`]).
pub fn plan_stages_inlining(
    job_id: &str,
    plan: Arc<dyn ExecutionPlan>,
    inline_bytes: u64,
    reuse: bool,
) -> Result<Vec<StagePlan>> {
    let mut cutter = Cutter {
        job_id: job_id.to_string(),
        stages: Vec::new(),
        inline_bytes,
        reuse: Reuse::new(reuse),
    };
    let root = cutter.cut(split_writes(job_id, plan)?)?;
    cutter.add_stage(root, None, StageKind::Result);
    Ok(cutter.stages)
}

struct Cutter {
    job_id: String,
    stages: Vec<StagePlan>,
    inline_bytes: u64,
    reuse: Reuse,
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
        if let Some(existing) =
            self.reuse
                .existing_or_record(stage_id, &input, partitioning.as_ref(), kind)
        {
            return existing;
        }
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
        let inline_build = plan
            .downcast_ref::<HashJoinExec>()
            .is_some_and(|join| inline_build_side(join, self.inline_bytes));
        let children = plan
            .children()
            .into_iter()
            .enumerate()
            .map(|(i, child)| match i {
                0 if inline_build => Ok(Arc::clone(child)),
                _ => self.cut(Arc::clone(child)),
            })
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
        // A commit always reads the writing tasks' rows from a stage of their own: its retry
        // must not write again.
        let commits = plan.is::<CommitFilesExec>();
        if merges || commits {
            if let Some(input) = plan.children().first().map(|c| Arc::clone(*c)) {
                let count = input.output_partitioning().partition_count();
                // Already cut (re-walks of a cut subtree leave it alone).
                let cut_before = input.is::<ShuffleReaderExec>();
                if (count > 1 || commits) && !cut_before {
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
        {
            // A build side that ends in a limit over several partitions keeps the first rows
            // to arrive: applied in every join task, each could keep other rows. It is applied
            // once, in a one-task broadcast stage of its own.
            let limited = join
                .left()
                .downcast_ref::<CoalescePartitionsExec>()
                .is_some_and(|c| c.fetch().is_some() && c.input().is::<ShuffleReaderExec>());
            if limited {
                let left = Arc::clone(join.left());
                let schema = left.schema();
                let stage_id = self.add_stage(left, None, StageKind::Broadcast);
                let reader: Arc<dyn ExecutionPlan> = Arc::new(ShuffleReaderExec::new(
                    stage_id,
                    schema,
                    Partitioning::UnknownPartitioning(1),
                    false,
                ));
                let right = Arc::clone(join.right());
                return replace_children_if_necessary(plan, vec![reader, right]);
            }
            if let Some(stage_id) = first_reader_stage(join.left()) {
                self.mark(stage_id, StageKind::Broadcast);
            }
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use datafusion::prelude::{CsvReadOptions, SessionConfig, SessionContext};
    use volley_core::codec::VolleyCodec;
    use volley_core::config::volley_session_config;

    /// The physical plan of `sql` over two CSV tables `t` and `u` (a, b) in a Volley session
    /// with `config` (shared with the adaptive layer's tests).
    pub(crate) async fn plan_sql(sql: &str, config: SessionConfig) -> Arc<dyn ExecutionPlan> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.csv");
        std::fs::write(&path, "a,b\n1,x\n2,y\n3,x\n").unwrap();
        let ctx = SessionContext::new_with_state(volley_core::rules::volley_session_state(config));
        for table in ["t", "u"] {
            ctx.register_csv(table, path.to_str().unwrap(), CsvReadOptions::new())
                .await
                .unwrap();
        }
        ctx.sql(sql)
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap()
    }

    async fn stages_of(sql: &str) -> Vec<StagePlan> {
        plan_stages("job", plan_sql(sql, volley_session_config(4)).await).unwrap()
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
        let lines = crate::explain::explain_stages(&stages);
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
