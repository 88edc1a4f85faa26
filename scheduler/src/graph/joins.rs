//! Pattern matching on stage plans: the joins adaptive execution may change at run time.
//!
//! * [`shuffled_join`]: a partitioned hash join whose sides are read straight from shuffle
//!   stages and whose probe rows may be processed in any grouping (a broadcast-switch or skew
//!   split candidate);
//! * [`filterable_joins`]: partitioned outer/semi/anti/mark joins one of whose sides matters
//!   only through its key matches (a semi-join reduction candidate).

use std::sync::Arc;

use datafusion::common::NullEquality;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::JoinType;
use datafusion::physical_expr::PhysicalExprRef;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::expressions::Column;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::sorts::sort::SortExec;
use volley_core::plan::{ShuffleReaderExec, ShuffleWriterExec};

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

/// Join types whose output for a probe row depends only on that row and the build side, so the
/// probe side may be read in pieces (and the build side by every task).
fn probe_rows_independent(join_type: JoinType) -> bool {
    matches!(
        join_type,
        JoinType::Inner | JoinType::Right | JoinType::RightSemi | JoinType::RightAnti
    )
}

/// The only child of an operator that keeps rows in their partition, one by one.
pub fn row_local_child(plan: &Arc<dyn ExecutionPlan>) -> Option<&Arc<dyn ExecutionPlan>> {
    if plan.is::<ProjectionExec>() || plan.is::<FilterExec>() {
        return plan.children().first().copied();
    }
    None
}

/// The only child of an operator that works on any partitioning of its input: row-local
/// operators, partial aggregation and per-partition sorts (merged by a later stage).
pub fn partition_agnostic_child(plan: &Arc<dyn ExecutionPlan>) -> Option<&Arc<dyn ExecutionPlan>> {
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
        found.extend(filterable(node).into_iter().map(|f| f.stages));
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

/// A join whose rows from one stage may be filtered by the keys of another.
pub struct Filterable {
    pub stages: ShuffledJoin,
    /// Subtree producing the keys to keep (over the keys stage's reader).
    pub keys_source: Arc<dyn ExecutionPlan>,
    /// Join keys as (keys side, filtered side).
    pub on: Vec<(PhysicalExprRef, PhysicalExprRef)>,
    pub null_equality: NullEquality,
}

/// The ways `node` (a partitioned hash join) may have one side filtered by the other's keys.
/// A semi join gives both ways (its output side may be filtered by the other side's keys too);
/// the candidates module keeps one. Other joins give one at most.
pub fn filterable(node: &Arc<dyn ExecutionPlan>) -> Vec<Filterable> {
    let Some(join) = node.downcast_ref::<HashJoinExec>() else {
        return Vec::new();
    };
    if *join.partition_mode() != PartitionMode::Partitioned || join.null_aware {
        return Vec::new();
    }
    // (keys side is the left one) for each side that only matters through its key matches.
    let (orientations, both): (&[bool], bool) = match join.join_type() {
        JoinType::LeftSemi => (&[true, false], true),
        JoinType::RightSemi => (&[false, true], true),
        JoinType::Left | JoinType::LeftAnti | JoinType::LeftMark => (&[true], false),
        JoinType::Right | JoinType::RightAnti | JoinType::RightMark => (&[false], false),
        JoinType::Inner => (&[true, false], false),
        _ => return Vec::new(),
    };
    let found = orientations.iter().filter_map(|&keys_left| {
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
    });
    match both {
        true => found.collect(),
        false => found.take(1).collect(),
    }
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

/// True when some operator of `plan` drops rows of its input by their values (a filter or a
/// hash join), so its keys may be a small part of their table's.
pub fn restricts_rows(plan: &Arc<dyn ExecutionPlan>) -> bool {
    plan.exists(|node| Ok(node.is::<FilterExec>() || node.is::<HashJoinExec>()))
        .unwrap_or(false)
}

/// Shuffle readers of `stage` in `plan`.
pub fn readers_of(plan: &Arc<dyn ExecutionPlan>, stage: u32) -> usize {
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
