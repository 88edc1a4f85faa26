//! Following a column down a plan to the leaf that produces it, through operators that only
//! drop, reorder or regroup rows and through inner and semi joins: the question both kinds of
//! join key filter ask (the scheduler's key filters across a shuffle, the executor's runtime
//! filters on a scan in the task). A row of that leaf whose key no join above matches can be
//! dropped at the leaf without changing the result.

use std::sync::Arc;

use datafusion::logical_expr::JoinType;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::coop::CooperativeExec;
use datafusion::physical_plan::expressions::Column;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::joins::HashJoinExec;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::union::UnionExec;

/// Recognises the node a traced column comes from: what it says about column `index` of it.
pub type Leaf<'a, T> = &'a dyn Fn(&Arc<dyn ExecutionPlan>, usize) -> Option<T>;

/// What `leaf` says about column `index` of the first node on the path it recognises (or
/// `None` when the path ends elsewhere: an aggregate, a limit, an outer join, a computed
/// column, a union).
pub fn trace_column<T>(
    plan: &Arc<dyn ExecutionPlan>,
    index: usize,
    leaf: Leaf<'_, T>,
) -> Option<T> {
    let mut found = Vec::new();
    if trace(plan, index, leaf, false, &mut found) {
        found.pop()
    } else {
        None
    }
}

/// [`trace_column`] that also follows a union into each of its inputs (a row of a union is a
/// row of one input, with the column at the same place): what `leaf` says at the end of every
/// path, or `None` when one of them ends elsewhere.
pub fn trace_column_through_unions<T>(
    plan: &Arc<dyn ExecutionPlan>,
    index: usize,
    leaf: Leaf<'_, T>,
) -> Option<Vec<T>> {
    let mut found = Vec::new();
    trace(plan, index, leaf, true, &mut found).then_some(found)
}

/// Follow column `index` of `plan` down to the leaves `leaf` recognises, pushing what it says
/// into `found`; false when a path ends elsewhere.
fn trace<T>(
    plan: &Arc<dyn ExecutionPlan>,
    index: usize,
    leaf: Leaf<'_, T>,
    unions: bool,
    found: &mut Vec<T>,
) -> bool {
    // A limit keeps the first rows: dropping rows below it changes which.
    if plan.fetch().is_some() {
        return false;
    }
    if let Some(at_leaf) = leaf(plan, index) {
        found.push(at_leaf);
        return true;
    }
    if let Some(projection) = plan.downcast_ref::<ProjectionExec>() {
        let Some(column) = projection
            .expr()
            .get(index)
            .and_then(|e| e.expr.downcast_ref::<Column>())
        else {
            return false;
        };
        return trace(projection.input(), column.index(), leaf, unions, found);
    }
    if let Some(filter) = plan.downcast_ref::<FilterExec>() {
        let index = match filter.projection() {
            Some(projection) => match projection.get(index) {
                Some(index) => *index,
                None => return false,
            },
            None => index,
        };
        return trace(filter.input(), index, leaf, unions, found);
    }
    if let Some(join) = plan.downcast_ref::<HashJoinExec>() {
        return match join_side(join, index) {
            Some((side, index)) => trace(side, index, leaf, unions, found),
            None => false,
        };
    }
    if unions && plan.is::<UnionExec>() {
        return plan
            .children()
            .into_iter()
            .all(|child| trace(child, index, leaf, unions, found));
    }
    let same_rows = plan.is::<RepartitionExec>()
        || plan.is::<CoalescePartitionsExec>()
        || plan.is::<SortExec>()
        || plan.is::<CooperativeExec>()
        || plan.name() == "CoalesceBatchesExec";
    match plan.children().as_slice() {
        [child] if same_rows && child.schema() == plan.schema() => {
            trace(child, index, leaf, unions, found)
        }
        _ => false,
    }
}

/// The side of `join` column `index` of its output comes from, and its index there, when
/// every output row carries the columns of exactly one row of that side (an inner side, or a
/// preserved one): dropping that row drops just those rows.
fn join_side(join: &HashJoinExec, index: usize) -> Option<(&Arc<dyn ExecutionPlan>, usize)> {
    if join.null_aware {
        return None;
    }
    let index = match &join.projection {
        Some(projection) => *projection.get(index)?,
        None => index,
    };
    let left_width = join.left().schema().fields().len();
    let left = index < left_width;
    match join.join_type() {
        JoinType::Inner | JoinType::Left | JoinType::LeftMark if left => Some((join.left(), index)),
        JoinType::Inner | JoinType::Right if !left => Some((join.right(), index - left_width)),
        JoinType::LeftSemi | JoinType::LeftAnti => Some((join.left(), index)),
        JoinType::RightSemi | JoinType::RightAnti => Some((join.right(), index)),
        _ => None,
    }
}
