//! Adaptive execution: stages are re-planned from the real row and byte counts of the stages
//! they read, once those are done and before their own first task starts.
//!
//! * **Broadcast switch.** A stage whose partitioned hash join reads both sides straight from
//!   shuffle stages is a candidate: its probe-side stage waits for the build-side stage. When the
//!   build side turns out small (`volley.adaptive_broadcast_bytes`), the join becomes a
//!   `CollectLeft` (broadcast) join that reads the whole build side in every task, the probe-side
//!   stage's plan moves into the join stage and that stage never runs: the probe side (usually
//!   the fact table) is not shuffled at all.
//! * **Semi-join reduction.** In outer, semi, anti and mark joins that stay partitioned, one side
//!   matters only through its key matches (the probe side of left joins, the build side of
//!   right ones). When that side is a plain scan stage, it waits for the stage holding the other
//!   side's keys (found below row-local operators and semi/anti joins); if that one turns out
//!   small, the scan stage first keeps only rows whose join keys are there (a `CollectLeft`
//!   right-semi join against all of it), so rows that could never match are not shuffled
//!   (TPC-H q4 at SF1: 3.8M lineitem rows -> 145K; q21: 3.8M + 6M -> 250K + 357K).
//! * **Coalescing.** A stage that reads only hash-partitioned shuffle output runs one task per
//!   run of adjacent small partitions instead of one per partition.
//! * **Skew split.** In such a join stage, a partition whose probe side is far above the median
//!   is split into several tasks, each reading a range of the probe side's map outputs joined
//!   with the whole build-side partition.
//!
//! Every decision is written on the stage (`adaptive` notes): job state, JSON API, status page
//! and `EXPLAIN ANALYZE` show them.

use std::ops::Range;
use std::sync::Arc;

use datafusion::common::NullEquality;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::JoinType;
use datafusion::physical_expr::PhysicalExprRef;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::expressions::Column;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::sorts::sort_preserving_merge::SortPreservingMergeExec;
use datafusion::physical_plan::{
    ExecutionPlan, ExecutionPlanProperties, replace_children_if_necessary,
};
use volley_core::config::VolleyOptions;
use volley_core::plan::{ShuffleReaderExec, ShuffleWriterExec};

use crate::planner::StageKind;
use crate::state::{Job, StageState, TaskState};
use crate::web::bytes;

/// Coalesced partitions never target less than this many bytes per task.
pub const MIN_PARTITION_BYTES: u64 = 1024 * 1024;

/// A partitioned hash join whose two sides are read straight from shuffle stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShuffledJoin {
    /// Stage producing the build (left) side; for a semi-join reduction, the stage holding
    /// the keys to keep.
    pub build: u32,
    /// Stage producing the probe (right) side; for a semi-join reduction, the stage filtered.
    pub probe: u32,
    /// What happens when the build side is small: false, the join becomes a broadcast join;
    /// true (joins that emit build rows at the end, which cannot be broadcast), the probe stage
    /// drops rows whose keys are not on the build side before it shuffles them.
    pub probe_filter: bool,
}

/// One adaptive decision about a stage: what was decided, and the sizes it was decided on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The decision (deterministic for given data; shown by EXPLAIN ANALYZE).
    pub what: String,
    /// Sizes behind it (rows, bytes), empty when none.
    pub sizes: String,
}

impl Decision {
    fn new(what: impl Into<String>, sizes: impl Into<String>) -> Self {
        Decision {
            what: what.into(),
            sizes: sizes.into(),
        }
    }
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.sizes.is_empty() {
            write!(f, "{}", self.what)
        } else {
            write!(f, "{} ({})", self.what, self.sizes)
        }
    }
}

/// The note a broadcast-switch candidate starts with.
pub fn candidate(join: ShuffledJoin) -> Decision {
    let what = if join.probe_filter {
        format!(
            "filter stage {} by the join keys of stage {} if it is small; stage {} waits for it",
            join.probe, join.build, join.probe
        )
    } else {
        format!(
            "broadcast join if stage {} is small; stage {} waits for it",
            join.build, join.probe
        )
    };
    Decision::new(what, "")
}

/// What one task of an adaptively planned stage reads from its hash-partitioned inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRead {
    /// Shuffle partitions (buckets) read from every hash-partitioned input.
    pub partitions: Range<usize>,
    /// Skew split: from this input stage, only the outputs of these map tasks.
    pub maps: Option<(u32, Range<usize>)>,
}

/// Join types whose output for a probe row depends only on that row and the build side, so the
/// probe side may be read in pieces (and the build side by every task).
fn probe_rows_independent(join_type: JoinType) -> bool {
    matches!(
        join_type,
        JoinType::Inner | JoinType::Right | JoinType::RightSemi | JoinType::RightAnti
    )
}

/// The only child of an operator that keeps rows in their partition, one by one.
fn row_local_child(plan: &Arc<dyn ExecutionPlan>) -> Option<&Arc<dyn ExecutionPlan>> {
    if plan.is::<ProjectionExec>() || plan.is::<FilterExec>() {
        return plan.children().first().copied();
    }
    None
}

/// The only child of an operator that works on any partitioning of its input: row-local
/// operators, partial aggregation and per-partition sorts (merged by a later stage).
fn partition_agnostic_child(plan: &Arc<dyn ExecutionPlan>) -> Option<&Arc<dyn ExecutionPlan>> {
    if let Some(child) = row_local_child(plan) {
        return Some(child);
    }
    if let Some(aggregate) = plan.downcast_ref::<AggregateExec>()
        && *aggregate.mode() == AggregateMode::Partial
    {
        return plan.children().first().copied();
    }
    if let Some(sort) = plan.downcast_ref::<SortExec>()
        && sort.preserve_partitioning()
    {
        return plan.children().first().copied();
    }
    None
}

fn hash_reader_below(plan: &Arc<dyn ExecutionPlan>) -> Option<u32> {
    if let Some(reader) = plan.downcast_ref::<ShuffleReaderExec>() {
        return reader.hash_partitioned().then_some(reader.stage_id());
    }
    hash_reader_below(row_local_child(plan)?)
}

/// The stage's partitioned hash join, when both its sides come straight from shuffle stages,
/// its probe rows can be processed in any grouping (inner, right, right semi/anti) and nothing
/// between it and the stage's output needs the join's hash partitioning.
pub fn shuffled_join(stage_plan: &Arc<dyn ExecutionPlan>) -> Option<ShuffledJoin> {
    let join = find_join(stage_plan, &|join| {
        *join.partition_mode() == PartitionMode::Partitioned
            && !join.null_aware
            && probe_rows_independent(*join.join_type())
    })?;
    let build = hash_reader_below(join.left())?;
    let probe = hash_reader_below(join.right())?;
    (build != probe).then_some(ShuffledJoin {
        build,
        probe,
        probe_filter: false,
    })
}

/// The partitioned outer/semi/anti/mark hash joins anywhere in the stage one of whose sides
/// only matters through its key matches (the probe side of left joins, the build side of right
/// ones), when that side *is* a shuffle reader (so the join keys apply to its stage's output as
/// it is) and the other side's keys come from a shuffle stage through row-local operators (and
/// semi/anti joins). Where a join sits does not matter: dropping rows of the first side whose
/// keys have no match on the other leaves the join's output unchanged.
pub fn filterable_joins(stage_plan: &Arc<dyn ExecutionPlan>) -> Vec<ShuffledJoin> {
    let mut found = Vec::new();
    let _ = stage_plan.apply(|node| {
        if let Some(filter) = filterable(node) {
            found.push(filter.stages);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

/// A join whose rows from one stage may be filtered by the keys of another.
struct Filterable {
    stages: ShuffledJoin,
    /// Subtree producing the keys to keep (over the keys stage's reader).
    keys_source: Arc<dyn ExecutionPlan>,
    /// Join keys as (keys side, filtered side).
    on: Vec<(PhysicalExprRef, PhysicalExprRef)>,
    null_equality: NullEquality,
}

fn filterable(node: &Arc<dyn ExecutionPlan>) -> Option<Filterable> {
    let join = node.downcast_ref::<HashJoinExec>()?;
    if *join.partition_mode() != PartitionMode::Partitioned || join.null_aware {
        return None;
    }
    // (keys side is the left one) for each side that only matters through its key matches.
    let orientations: &[bool] = match join.join_type() {
        JoinType::Left | JoinType::LeftSemi | JoinType::LeftAnti | JoinType::LeftMark => &[true],
        JoinType::Right | JoinType::RightSemi | JoinType::RightAnti | JoinType::RightMark => {
            &[false]
        }
        JoinType::Inner => &[true, false],
        _ => return None,
    };
    orientations.iter().find_map(|&keys_left| {
        let (keys_side, filtered_side) = if keys_left {
            (join.left(), join.right())
        } else {
            (join.right(), join.left())
        };
        let keys_source = build_keys_source(keys_side);
        let build = hash_reader_below(keys_source)?;
        let (keys, filtered): (Vec<_>, Vec<_>) = join
            .on()
            .iter()
            .map(|(l, r)| {
                if keys_left {
                    (Arc::clone(l), Arc::clone(r))
                } else {
                    (Arc::clone(r), Arc::clone(l))
                }
            })
            .unzip();
        let (probe, mapped) = filtered_source(filtered_side, &filtered)?;
        let on = keys.into_iter().zip(mapped.unwrap_or(filtered)).collect();
        (build != probe).then(|| Filterable {
            stages: ShuffledJoin {
                build,
                probe,
                probe_filter: true,
            },
            keys_source: Arc::clone(keys_source),
            on,
            null_equality: join.null_equality(),
        })
    })
}

/// The hash-shuffle stage a join side reads: straight (`None`: the join keys apply to the
/// stage's output as they are), or through a partitioned final aggregate whose group columns
/// the keys are (below projections of plain columns): then the keys as columns of the stage's
/// output, which is the partial aggregate's (a row whose group has no match is one whose
/// group disappears in the join).
fn filtered_source(
    side: &Arc<dyn ExecutionPlan>,
    keys: &[PhysicalExprRef],
) -> Option<(u32, Option<Vec<PhysicalExprRef>>)> {
    if let Some(reader) = side.downcast_ref::<ShuffleReaderExec>() {
        return reader
            .hash_partitioned()
            .then_some((reader.stage_id(), None));
    }
    let column = |expr: &PhysicalExprRef| expr.downcast_ref::<Column>().map(Column::index);
    let mut columns: Vec<usize> = keys.iter().map(column).collect::<Option<_>>()?;
    let mut node = side;
    while let Some(projection) = node.downcast_ref::<ProjectionExec>() {
        columns = columns
            .iter()
            .map(|&c| column(&projection.expr().get(c)?.expr))
            .collect::<Option<_>>()?;
        node = projection.input();
    }
    let aggregate = node.downcast_ref::<AggregateExec>()?;
    if *aggregate.mode() != AggregateMode::FinalPartitioned || !aggregate.group_expr().is_single() {
        return None;
    }
    let groups = aggregate.group_expr().expr();
    let reader = aggregate
        .input()
        .downcast_ref::<ShuffleReaderExec>()
        .filter(|reader| reader.hash_partitioned())?;
    let schema = reader.schema();
    let exprs = columns
        .iter()
        .map(|&c| {
            let index = column(&groups.get(c)?.0)?;
            let field = schema.fields().get(index)?;
            Some(Arc::new(Column::new(field.name(), index)) as PhysicalExprRef)
        })
        .collect::<Option<_>>()?;
    Some((reader.stage_id(), Some(exprs)))
}

/// Below semi/anti joins without projection (their output is a subset of one input's rows,
/// same columns): the keys of a join above them are among the keys of that input, so rows on
/// the join's other side may be filtered by it.
fn build_keys_source(plan: &Arc<dyn ExecutionPlan>) -> &Arc<dyn ExecutionPlan> {
    if let Some(join) = plan.downcast_ref::<HashJoinExec>()
        && join.projection.is_none()
    {
        match join.join_type() {
            JoinType::LeftSemi | JoinType::LeftAnti => return build_keys_source(join.left()),
            JoinType::RightSemi | JoinType::RightAnti => return build_keys_source(join.right()),
            _ => {}
        }
    }
    plan
}

/// The first hash join `wanted` accepts on the stage's spine: below its writer, through
/// partition-agnostic operators and the probe sides of broadcast joins.
fn find_join<'a>(
    stage_plan: &'a Arc<dyn ExecutionPlan>,
    wanted: &dyn Fn(&HashJoinExec) -> bool,
) -> Option<&'a HashJoinExec> {
    let mut node = match stage_plan.downcast_ref::<ShuffleWriterExec>() {
        Some(writer) => writer.input(),
        None => stage_plan,
    };
    loop {
        if let Some(join) = node.downcast_ref::<HashJoinExec>() {
            if wanted(join) {
                return Some(join);
            }
            if *join.partition_mode() != PartitionMode::CollectLeft {
                return None;
            }
            node = join.right();
            continue;
        }
        node = partition_agnostic_child(node)?;
    }
}

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
        if let Some(filter) = filterable(node)
            && filter.stages == join
        {
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

/// True when every partitioned leaf of the stage is a hash-mode shuffle reader and every
/// operator on the way keeps the stage's partition count (so tasks may read any run of
/// adjacent buckets). Subtrees under a partition merge are read whole by every task.
fn coalescible(plan: &Arc<dyn ExecutionPlan>, partitions: usize, readers: &mut usize) -> bool {
    if plan.is::<CoalescePartitionsExec>() || plan.is::<SortPreservingMergeExec>() {
        return true;
    }
    if plan.output_partitioning().partition_count() != partitions || plan.is::<RepartitionExec>() {
        return false;
    }
    if let Some(reader) = plan.downcast_ref::<ShuffleReaderExec>() {
        *readers += 1;
        return reader.hash_partitioned();
    }
    let children = plan.children();
    !children.is_empty()
        && children
            .into_iter()
            .all(|child| coalescible(child, partitions, readers))
}

/// Runs of adjacent partitions of at most `target` bytes each (a partition above it alone).
pub fn coalesce(sizes: &[u64], target: u64) -> Vec<Range<usize>> {
    let mut groups = Vec::new();
    let mut start = 0;
    let mut bytes = 0u64;
    for (index, size) in sizes.iter().enumerate() {
        if index > start && bytes.saturating_add(*size) > target {
            groups.push(start..index);
            start = index;
            bytes = 0;
        }
        bytes = bytes.saturating_add(*size);
    }
    if start < sizes.len() {
        groups.push(start..sizes.len());
    }
    groups
}

/// Split map tasks `0..sizes.len()` into at most `pieces` adjacent ranges of similar bytes.
pub fn split_maps(sizes: &[u64], pieces: usize) -> Vec<Range<usize>> {
    let total: u64 = sizes.iter().sum();
    let pieces = pieces.clamp(1, sizes.len().max(1));
    let per_piece = total.div_ceil(pieces as u64).max(1);
    let mut ranges = Vec::new();
    let mut start = 0;
    let mut bytes = 0u64;
    for (index, size) in sizes.iter().enumerate() {
        bytes += size;
        if bytes >= per_piece && ranges.len() + 1 < pieces {
            ranges.push(start..index + 1);
            start = index + 1;
            bytes = 0;
        }
    }
    if start < sizes.len() {
        ranges.push(start..sizes.len());
    }
    ranges
}

/// Bytes per output bucket (`buckets` of them) of a finished stage, per map task.
fn bucket_bytes(stage: &StageState, buckets: usize) -> Vec<Vec<u64>> {
    let mut out = vec![vec![0u64; stage.tasks.len()]; buckets];
    for (map, task) in stage.tasks.iter().enumerate() {
        if let TaskState::Succeeded { outputs, .. } = &task.state {
            for location in outputs {
                if let Some(slot) = out
                    .get_mut(location.output_partition as usize)
                    .and_then(|per_map| per_map.get_mut(map))
                {
                    *slot += location.num_bytes;
                }
            }
        }
    }
    out
}

/// Called when stage `done` has just completed: decide the broadcast switch of the join stages
/// whose build side it is.
pub fn on_stage_complete(job: &mut Job, done: u32) -> Result<()> {
    let options = VolleyOptions::from_pairs(&job.settings);
    let candidates: Vec<(u32, ShuffledJoin)> = job
        .stages
        .values()
        .flat_map(|s| s.join_switch.iter().map(|j| (s.plan.stage_id, *j)))
        .filter(|(_, j)| j.build == done)
        .collect();
    for (join_stage, join) in candidates {
        let Some(build) = job.stages.get(&join.build) else {
            continue;
        };
        let (rows, size) = build.output_size();
        let probe_started = job
            .stages
            .get(&join.probe)
            .is_none_or(|p| p.started.is_some());
        let small = size <= options.adaptive_broadcast_bytes;
        if let Some(stage) = job.stages.get_mut(&join_stage) {
            stage.join_switch.retain(|j| *j != join);
        }
        if join.probe_filter {
            filter_probe_stage(job, join_stage, join, small, probe_started)?;
            continue;
        }
        if !small || probe_started {
            if let Some(probe) = job.stages.get_mut(&join.probe) {
                probe.wait_for.retain(|s| *s != join.build);
            }
            if let Some(stage) = job.stages.get_mut(&join_stage) {
                let what = if small {
                    "kept partitioned join: probe side already started".to_string()
                } else {
                    format!(
                        "kept partitioned join: build side (stage {}) too big",
                        join.build
                    )
                };
                stage
                    .adaptive
                    .push(Decision::new(what, format!("{rows} rows, {}", bytes(size))));
            }
            continue;
        }
        let Some(probe) = job.stages.get(&join.probe) else {
            continue;
        };
        let probe_input = Arc::clone(probe.plan.plan.input());
        let probe_inputs = probe.plan.inputs.clone();
        let Some(stage) = job.stages.get_mut(&join_stage) else {
            continue;
        };
        let input = broadcast_rewrite(stage.plan.plan.input(), join.probe, &probe_input)?;
        let partitions = input.output_partitioning().partition_count();
        stage.plan.plan = Arc::new(stage.plan.plan.with_input(input));
        stage.plan.inputs.retain(|s| *s != join.probe);
        for input in probe_inputs {
            if !stage.plan.inputs.contains(&input) {
                stage.plan.inputs.push(input);
            }
        }
        stage.plan.partitions = partitions;
        stage.tasks = vec![crate::state::TaskInfo::pending(); partitions];
        stage.resolved = None;
        stage.adaptive.push(Decision::new(
            format!(
                "switched to broadcast join: build side (stage {}) is small; stage {} skipped, its \
                 input read directly",
                join.build, join.probe
            ),
            format!("{rows} rows, {}", bytes(size)),
        ));
        // The probe stage's own pending switch now concerns the join stage, which runs its
        // plan (the walk to a partitioned join passes through broadcast joins' probe sides).
        let inherited = job
            .stages
            .get_mut(&join.probe)
            .map(|p| std::mem::take(&mut p.join_switch))
            .unwrap_or_default();
        if let Some(stage) = job.stages.get_mut(&join_stage) {
            stage.join_switch.extend(inherited);
        }
        if let Some(probe) = job.stages.get_mut(&join.probe) {
            probe.tasks.clear();
            probe.skipped = true;
            probe.wait_for.clear();
            probe.adaptive.push(Decision::new(
                format!("skipped: stage {join_stage} reads this input directly (broadcast join)"),
                "",
            ));
        }
    }
    Ok(())
}

/// The keys stage of a semi-join reduction in `join_stage` is done: if it is `small` and the
/// filtered stage has not `started`, that stage keeps only rows whose keys are there (it now
/// reads the keys stage whole); it no longer waits either way.
fn filter_probe_stage(
    job: &mut Job,
    join_stage: u32,
    join: ShuffledJoin,
    small: bool,
    started: bool,
) -> Result<()> {
    let (rows, size) = job
        .stages
        .get(&join.build)
        .map_or((0, 0), StageState::output_size);
    let sizes = format!("{rows} rows, {}", bytes(size));
    let rewritten = match (
        small && !started,
        job.stages.get(&join_stage),
        job.stages.get(&join.probe),
    ) {
        (true, Some(stage), Some(probe)) => {
            let plan = Arc::clone(&stage.plan.plan) as Arc<dyn ExecutionPlan>;
            Some(probe_filter_rewrite(&plan, join, probe.plan.plan.input())?)
        }
        _ => None,
    };
    let what = if rewritten.is_some() {
        format!(
            "filtered stage {} by the join keys of stage {}: build side is small",
            join.probe, join.build
        )
    } else if started {
        format!("kept stage {} unfiltered: it already started", join.probe)
    } else {
        format!(
            "kept stage {} unfiltered: build side (stage {}) too big",
            join.probe, join.build
        )
    };
    if let Some(stage) = job.stages.get_mut(&join_stage) {
        stage.adaptive.push(Decision::new(what, sizes.clone()));
    }
    let Some(probe) = job.stages.get_mut(&join.probe) else {
        return Ok(());
    };
    probe.wait_for.retain(|s| *s != join.build);
    if let Some(input) = rewritten {
        probe.plan.plan = Arc::new(probe.plan.plan.with_input(input));
        if !probe.plan.inputs.contains(&join.build) {
            probe.plan.inputs.push(join.build);
        }
        probe.resolved = None;
        probe.adaptive.push(Decision::new(
            format!(
                "keeps only rows whose join keys are in stage {} (semi-join reduction before the \
                 shuffle)",
                join.build
            ),
            sizes,
        ));
    }
    Ok(())
}

/// Tasks of a stage regrouped from its inputs' real sizes: small partitions coalesced, skewed
/// ones split. None when nothing changes.
fn regroup(
    job: &Job,
    stage_id: u32,
    slots: usize,
    options: &VolleyOptions,
) -> Option<(Vec<TaskRead>, Vec<Decision>)> {
    let stage = job.stages.get(&stage_id)?;
    let plan = Arc::clone(&stage.plan.plan) as Arc<dyn ExecutionPlan>;
    let partitions = stage.tasks.len();
    let mut readers = 0;
    let eligible = options.adaptive
        && partitions > 1
        && coalescible(stage.plan.plan.input(), partitions, &mut readers)
        && readers > 0;
    if !eligible {
        return None;
    }
    // Bytes per bucket over the hash-shuffled inputs (a broadcast or merge input is one file per
    // map task, read whole by every task, not a bucket), and per map task of a join's probe side.
    let mut sizes = vec![0u64; partitions];
    for input in &stage.plan.inputs {
        if let Some(input) = job
            .stages
            .get(input)
            .filter(|s| s.plan.kind == StageKind::Shuffle)
        {
            for (bucket, per_map) in bucket_bytes(input, partitions).iter().enumerate() {
                sizes[bucket] += per_map.iter().sum::<u64>();
            }
        }
    }
    let join = shuffled_join(&plan);
    let probe_maps: Option<(u32, Vec<Vec<u64>>)> = join.and_then(|j| {
        job.stages
            .get(&j.probe)
            .map(|p| (j.probe, bucket_bytes(p, partitions)))
    });
    let total: u64 = sizes.iter().sum();
    let advisory = options.adaptive_partition_bytes.max(1);
    let target = advisory
        .min(total.div_ceil(slots.max(1) as u64))
        .max(MIN_PARTITION_BYTES);

    // Skewed probe partitions: (bucket, map ranges, probe bytes, median probe bytes).
    let mut skewed: Vec<(usize, Vec<Range<usize>>, u64, u64)> = Vec::new();
    let mut probe_stage = 0;
    if let Some((probe, per_bucket)) = &probe_maps {
        probe_stage = *probe;
        let probe_sizes: Vec<u64> = per_bucket.iter().map(|m| m.iter().sum()).collect();
        let mut sorted = probe_sizes.clone();
        sorted.sort_unstable();
        let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
        for (bucket, (size, maps)) in probe_sizes.iter().zip(per_bucket).enumerate() {
            if *size >= options.adaptive_skew_min_bytes
                && *size > median.max(1).saturating_mul(options.adaptive_skew_factor)
                && maps.len() > 1
            {
                let pieces = usize::try_from(size.div_ceil(advisory)).unwrap_or(usize::MAX);
                let ranges = split_maps(maps, pieces.max(2));
                if ranges.len() > 1 {
                    skewed.push((bucket, ranges, *size, median));
                }
            }
        }
    }

    let mut reads = Vec::new();
    let mut notes = Vec::new();
    let mut start = 0;
    let mut plain_groups = 0;
    let mut flush = |from: usize, to: usize, reads: &mut Vec<TaskRead>| {
        for group in coalesce(&sizes[from..to], target) {
            plain_groups += 1;
            reads.push(TaskRead {
                partitions: group.start + from..group.end + from,
                maps: None,
            });
        }
    };
    for (bucket, ranges, size, median) in &skewed {
        flush(start, *bucket, &mut reads);
        notes.push(Decision::new(
            format!(
                "split skewed partition {bucket} into {} tasks by probe-side map output",
                ranges.len()
            ),
            format!("{} of probe side, median {}", bytes(*size), bytes(*median)),
        ));
        for range in ranges {
            reads.push(TaskRead {
                partitions: *bucket..*bucket + 1,
                maps: Some((probe_stage, range.clone())),
            });
        }
        start = bucket + 1;
    }
    flush(start, partitions, &mut reads);
    let coalesced = plain_groups < partitions - skewed.len();
    if coalesced {
        notes.insert(
            0,
            Decision::new(
                format!(
                    "coalesced {} shuffle partitions into {plain_groups} tasks",
                    partitions - skewed.len()
                ),
                format!("{} in all, target {} per task", bytes(total), bytes(target)),
            ),
        );
    }
    (!notes.is_empty()).then_some((reads, notes))
}

/// Called once before the first task of a ready stage launches: coalesce small partitions and
/// split skewed ones from its inputs' real sizes.
pub fn before_launch(job: &mut Job, stage_id: u32, slots: usize) {
    let options = VolleyOptions::from_pairs(&job.settings);
    if !options.adaptive {
        return;
    }
    let Some((reads, notes)) = regroup(job, stage_id, slots, &options) else {
        return;
    };
    if let Some(stage) = job.stages.get_mut(&stage_id) {
        stage.tasks = vec![crate::state::TaskInfo::pending(); reads.len()];
        stage.reads = Some(reads);
        stage.resolved = None;
        stage.adaptive.extend(notes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesce_groups_adjacent_small_partitions() {
        assert_eq!(coalesce(&[1, 1, 1, 1], 2), vec![0..2, 2..4]);
        assert_eq!(coalesce(&[5, 1, 1, 5], 3), vec![0..1, 1..3, 3..4]);
        assert_eq!(coalesce(&[0, 0, 0], 10), vec![0..3]);
        assert_eq!(coalesce(&[], 10), Vec::<Range<usize>>::new());
    }

    #[test]
    fn split_maps_balances_bytes() {
        assert_eq!(split_maps(&[10, 10, 10, 10], 2), vec![0..2, 2..4]);
        assert_eq!(split_maps(&[30, 1, 1, 1], 2), vec![0..1, 1..4]);
        assert_eq!(split_maps(&[5], 4), vec![0..1]);
    }
}
