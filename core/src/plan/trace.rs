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
    // A limit keeps the first rows: dropping rows below it changes which.
    if plan.fetch().is_some() {
        return None;
    }
    if let Some(found) = leaf(plan, index) {
        return Some(found);
    }
    if let Some(projection) = plan.downcast_ref::<ProjectionExec>() {
        let expr = &projection.expr().get(index)?.expr;
        let column = expr.downcast_ref::<Column>()?;
        return trace_column(projection.input(), column.index(), leaf);
    }
    if let Some(filter) = plan.downcast_ref::<FilterExec>() {
        let index = match filter.projection() {
            Some(projection) => *projection.get(index)?,
            None => index,
        };
        return trace_column(filter.input(), index, leaf);
    }
    if let Some(join) = plan.downcast_ref::<HashJoinExec>() {
        if join.null_aware {
            return None;
        }
        let index = match &join.projection {
            Some(projection) => *projection.get(index)?,
            None => index,
        };
        let left_width = join.left().schema().fields().len();
        // Into a side whose every output row carries the columns of exactly one of its rows
        // (an inner side, or a preserved one): dropping that row drops just those rows.
        let left = index < left_width;
        return match join.join_type() {
            JoinType::Inner | JoinType::Left | JoinType::LeftMark if left => {
                trace_column(join.left(), index, leaf)
            }
            JoinType::Inner | JoinType::Right if !left => {
                trace_column(join.right(), index - left_width, leaf)
            }
            JoinType::LeftSemi | JoinType::LeftAnti => trace_column(join.left(), index, leaf),
            JoinType::RightSemi | JoinType::RightAnti => trace_column(join.right(), index, leaf),
            _ => None,
        };
    }
    let same_rows = plan.is::<RepartitionExec>()
        || plan.is::<CoalescePartitionsExec>()
        || plan.is::<SortExec>()
        || plan.is::<CooperativeExec>()
        || plan.name() == "CoalesceBatchesExec";
    match plan.children().as_slice() {
        [child] if same_rows && child.schema() == plan.schema() => trace_column(child, index, leaf),
        _ => None,
    }
}
