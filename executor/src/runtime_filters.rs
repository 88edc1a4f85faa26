//! Runtime join filters inside a task: a scan on the probe side of a `CollectLeft` hash join
//! (each scan of a union there) learns the range of the join keys on the build side once that
//! side is read, and skips the row groups and pages (by their statistics) that hold no key in
//! it.
//!
//! DataFusion does this on one node with its dynamic join filters, but its build side waits
//! until every probe partition has reported, and a task runs one partition of its stage: the
//! others never report. So the scheduler plans with them off, and the executor adds its own per
//! task after decoding the plan: the build input of each such join is wrapped in a
//! [`BuildBoundsExec`] that tracks each key's minimum and maximum as the join reads it and then
//! completes a [`DynamicFilterPhysicalExpr`] that the scans' predicates hold. The join reads its
//! whole build side before it polls its probe side, so the scans open their files with the
//! filter complete. The filter only prunes (the join still matches every row), so a filter
//! that arrives late, or prunes nothing, changes no result.
//!
//! A scan that feeds the build side of another join below the filtering one also drops each
//! row outside the range (a `FilterExec` on the filter above it): that build side is small, and
//! it shrinks before its own join multiplies it. TPC-DS q6's `d_month_seq = (scalar subquery)`
//! is a join above `store_sales ⋈ date_dim`: filtering `date_dim` to the month's 31 rows leaves
//! 29K joined rows instead of 2.7M, and the lower join's own filter then has the month's keys.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DataFusionError, NullEquality, Result, ScalarValue};
use datafusion::config::ConfigOptions;
use datafusion::datasource::source::DataSourceExec;
use datafusion::execution::{RecordBatchStream, SendableRecordBatchStream, TaskContext};
use datafusion::functions_aggregate::min_max::{MaxAccumulator, MinAccumulator};
use datafusion::logical_expr::{Accumulator, JoinType, Operator};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::expressions::{BinaryExpr, Column, DynamicFilterPhysicalExpr, lit};
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
use datafusion::physical_plan::{
    ChildrenPropertiesMode, DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties,
    PlanProperties, ReplaceChildrenOptions, replace_children_if_necessary,
};
use futures::{Stream, StreamExt};
use std::collections::HashMap;
use volley_core::plan::trace::trace_column_through_unions;

type PlanRef = Arc<dyn ExecutionPlan>;
type ExprRef = Arc<dyn PhysicalExpr>;

/// Identity of a plan node in the decoded plan (its allocation).
fn node_id(plan: &PlanRef) -> usize {
    Arc::as_ptr(plan).cast::<()>() as usize
}

/// `plan` with runtime filters from its `CollectLeft` joins on the scans below them.
pub fn add_runtime_filters(plan: PlanRef, config: &ConfigOptions) -> Result<PlanRef> {
    let mut pending = HashMap::new();
    rewrite(plan, &mut pending, config)
}

/// A filter waiting for its scan: the filter, and whether the scan also drops each row
/// outside it (the scan feeds a build side below the filtering join).
struct PendingFilter {
    filter: ExprRef,
    rows: bool,
}

/// Filters waiting for the scan (by [`node_id`]) they are pushed into.
type Pending = HashMap<usize, Vec<PendingFilter>>;

fn rewrite(plan: PlanRef, pending: &mut Pending, config: &ConfigOptions) -> Result<PlanRef> {
    if let Some(filters) = pending.remove(&node_id(&plan))
        && let Some(scan) = plan.downcast_ref::<DataSourceExec>()
    {
        let row_filter = filters
            .iter()
            .filter(|f| f.rows)
            .map(|f| Arc::clone(&f.filter))
            .reduce(|a, b| Arc::new(BinaryExpr::new(a, Operator::And, b)));
        let filters = filters.into_iter().map(|f| f.filter).collect();
        // A scan that cannot take the filter is read whole: the filter only saves work.
        let scan = match scan.data_source().try_pushdown_filters(filters, config) {
            Ok(pushed) => match pushed.updated_node {
                Some(source) => Arc::new(
                    scan.clone()
                        .with_data_source(source)
                        .with_partitioning(plan.output_partitioning().clone()),
                ),
                None => plan,
            },
            Err(e) => {
                tracing::debug!(error = %e, "runtime filter not pushed into a scan");
                plan
            }
        };
        return Ok(match row_filter {
            Some(predicate) => Arc::new(FilterExec::try_new(predicate, scan)?),
            None => scan,
        });
    }
    let targets = plan
        .downcast_ref::<HashJoinExec>()
        .map(|join| join_targets(join, pending))
        .unwrap_or_default();
    let mut children = plan
        .children()
        .into_iter()
        .map(|child| rewrite(Arc::clone(child), pending, config))
        .collect::<Result<Vec<_>>>()?;
    if !targets.is_empty()
        && let Some(build) = children.first_mut()
    {
        *build = Arc::new(BuildBoundsExec::new(Arc::clone(build), targets));
    }
    replace_children_if_necessary(plan, children)
}

/// The filters `join` puts on the scans its probe keys come from (registered in `pending`).
fn join_targets(join: &HashJoinExec, pending: &mut Pending) -> Vec<Target> {
    let filters_probe = matches!(
        join.join_type(),
        JoinType::Inner | JoinType::LeftSemi | JoinType::RightSemi | JoinType::Left
    );
    if *join.partition_mode() != PartitionMode::CollectLeft
        || !filters_probe
        || join.null_aware
        || join.null_equality() != NullEquality::NullEqualsNothing
        || join.left().output_partitioning().partition_count() != 1
    {
        return Vec::new();
    }
    let build_schema = join.left().schema();
    // Keys by the scan they filter: (build key, scan column).
    let mut by_scan: Vec<(usize, Vec<(ExprRef, ExprRef)>)> = Vec::new();
    for (build_key, probe_key) in join.on() {
        let Some(column) = probe_key.downcast_ref::<Column>() else {
            continue;
        };
        // The scans (several below a union), and the name and type of their column the key is.
        let Some(scans) =
            trace_column_through_unions(join.right(), column.index(), &|node, index| {
                if !node.is::<DataSourceExec>() {
                    return None;
                }
                let field = node.schema().fields().get(index).cloned()?;
                Some((node_id(node), index, field))
            })
        else {
            continue;
        };
        let Ok(key_type) = build_key.data_type(&build_schema) else {
            continue;
        };
        if !has_ordered_statistics(&key_type) {
            continue;
        }
        for (scan, index, field) in scans {
            if *field.data_type() != key_type {
                continue;
            }
            let probe = Arc::new(Column::new(field.name(), index)) as ExprRef;
            match by_scan.iter_mut().find(|(id, _)| *id == scan) {
                Some((_, keys)) => keys.push((Arc::clone(build_key), probe)),
                None => by_scan.push((scan, vec![(Arc::clone(build_key), probe)])),
            }
        }
    }
    by_scan
        .into_iter()
        .filter_map(|(scan, keys)| {
            let filter = Arc::new(DynamicFilterPhysicalExpr::new(
                keys.iter().map(|(_, probe)| Arc::clone(probe)).collect(),
                lit(true),
            ));
            let keys = keys
                .into_iter()
                .map(|(build, probe)| KeyBounds::new(build, probe, &build_schema))
                .collect::<Result<Vec<_>>>()
                .ok()?;
            pending.entry(scan).or_default().push(PendingFilter {
                filter: Arc::clone(&filter) as ExprRef,
                rows: feeds_build_side(join.right(), scan, false).unwrap_or(false),
            });
            Some(Target { filter, keys })
        })
        .collect()
}

/// True for the row filter [`add_runtime_filters`] puts above a scan (not a node of the
/// scheduler's stage plan): a `FilterExec` whose predicate is runtime filters only (the
/// scheduler plans with DataFusion's own dynamic filters off, so no planned filter is one).
pub fn is_runtime_row_filter(node: &PlanRef) -> bool {
    fn only_dynamic(expr: &ExprRef) -> bool {
        if expr.downcast_ref::<DynamicFilterPhysicalExpr>().is_some() {
            return true;
        }
        expr.downcast_ref::<BinaryExpr>().is_some_and(|b| {
            *b.op() == Operator::And && only_dynamic(b.left()) && only_dynamic(b.right())
        })
    }
    node.downcast_ref::<FilterExec>()
        .is_some_and(|f| f.projection().is_none() && only_dynamic(f.predicate()))
}

/// Whether the path from `plan` down to node `target` enters the build (left) side of a hash
/// join (`None`: `target` is not below `plan`).
fn feeds_build_side(plan: &PlanRef, target: usize, entered: bool) -> Option<bool> {
    if node_id(plan) == target {
        return Some(entered);
    }
    let join = plan.is::<HashJoinExec>();
    plan.children()
        .into_iter()
        .enumerate()
        .find_map(|(i, child)| feeds_build_side(child, target, entered || (join && i == 0)))
}

/// Types whose min/max statistics order like their values (floats do not: NaN).
fn has_ordered_statistics(data_type: &DataType) -> bool {
    data_type.is_integer()
        || matches!(
            data_type,
            DataType::Decimal32(..)
                | DataType::Decimal64(..)
                | DataType::Decimal128(..)
                | DataType::Decimal256(..)
                | DataType::Date32
                | DataType::Date64
                | DataType::Timestamp(..)
                | DataType::Utf8
                | DataType::LargeUtf8
                | DataType::Utf8View
        )
}

/// One scan's filter from one join: the keys it bounds.
struct Target {
    filter: Arc<DynamicFilterPhysicalExpr>,
    keys: Vec<KeyBounds>,
}

/// Minimum and maximum of one build key so far.
struct KeyBounds {
    build: ExprRef,
    probe: ExprRef,
    min: MinAccumulator,
    max: MaxAccumulator,
}

impl fmt::Debug for KeyBounds {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{} -> {}", self.build, self.probe)
    }
}

impl KeyBounds {
    fn new(build: ExprRef, probe: ExprRef, schema: &SchemaRef) -> Result<Self> {
        let data_type = build.data_type(schema)?;
        Ok(Self {
            build,
            probe,
            min: MinAccumulator::try_new(&data_type)?,
            max: MaxAccumulator::try_new(&data_type)?,
        })
    }

    fn observe(&mut self, batch: &RecordBatch) -> Result<()> {
        let values = self.build.evaluate(batch)?.into_array(batch.num_rows())?;
        self.min.update_batch(std::slice::from_ref(&values))?;
        self.max.update_batch(&[values])
    }

    /// `probe BETWEEN min AND max`, or `false` when the build side had no key (no probe row
    /// can match).
    fn predicate(&mut self) -> Result<ExprRef> {
        let (min, max) = (self.min.evaluate()?, self.max.evaluate()?);
        if min.is_null() || max.is_null() {
            return Ok(lit(ScalarValue::Boolean(Some(false))));
        }
        let at_least = BinaryExpr::new(Arc::clone(&self.probe), Operator::GtEq, lit(min));
        let at_most = BinaryExpr::new(Arc::clone(&self.probe), Operator::LtEq, lit(max));
        Ok(Arc::new(BinaryExpr::new(
            Arc::new(at_least),
            Operator::And,
            Arc::new(at_most),
        )))
    }
}

impl Target {
    fn complete(&mut self) -> Result<()> {
        let mut predicate: Option<ExprRef> = None;
        for key in &mut self.keys {
            let next = key.predicate()?;
            predicate = Some(match predicate {
                Some(p) => Arc::new(BinaryExpr::new(p, Operator::And, next)),
                None => next,
            });
        }
        if let Some(predicate) = predicate {
            self.filter.update(predicate)?;
        }
        self.filter.mark_complete();
        Ok(())
    }
}

/// The build input of a join, passed through while its keys' bounds are tracked; at its end
/// the scans' filters are completed. Not part of the stage plan the scheduler knows (the
/// executor's operator metrics skip it).
#[derive(Debug)]
pub struct BuildBoundsExec {
    input: PlanRef,
    /// Taken by the one stream of the (single-partition) build side.
    targets: parking_lot::Mutex<Vec<Target>>,
    properties: Arc<PlanProperties>,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.debug_list().entries(&self.keys).finish()
    }
}

impl BuildBoundsExec {
    fn new(input: PlanRef, targets: Vec<Target>) -> Self {
        let properties = Arc::clone(input.properties());
        Self {
            input,
            targets: parking_lot::Mutex::new(targets),
            properties,
        }
    }
}

impl DisplayAs for BuildBoundsExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "BuildBoundsExec: {:?}", self.targets.lock())
    }
}

impl ExecutionPlan for BuildBoundsExec {
    fn name(&self) -> &str {
        "BuildBoundsExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&PlanRef> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&ExprRef) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        // Copied out first: `f` may display this node, which takes the lock.
        let keys: Vec<ExprRef> = self
            .targets
            .lock()
            .iter()
            .flat_map(|t| t.keys.iter().map(|k| Arc::clone(&k.build)))
            .collect();
        for key in &keys {
            if f(key)? == TreeNodeRecursion::Stop {
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        children: Vec<PlanRef>,
        _options: ReplaceChildrenOptions,
    ) -> Result<PlanRef> {
        let [input]: [PlanRef; 1] = children.try_into().map_err(|_| {
            DataFusionError::Internal("BuildBoundsExec takes exactly one child".to_string())
        })?;
        let targets = std::mem::take(&mut *self.targets.lock());
        Ok(Arc::new(Self::new(input, targets)))
    }

    fn with_new_children(self: Arc<Self>, children: Vec<PlanRef>) -> Result<PlanRef> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        Ok(Box::pin(BoundsStream {
            input,
            targets: std::mem::take(&mut *self.targets.lock()),
        }))
    }
}

struct BoundsStream {
    input: SendableRecordBatchStream,
    targets: Vec<Target>,
}

impl BoundsStream {
    fn observe(&mut self, batch: &RecordBatch) -> Result<()> {
        for target in &mut self.targets {
            for key in &mut target.keys {
                key.observe(batch)?;
            }
        }
        Ok(())
    }

    fn complete(&mut self) -> Result<()> {
        for mut target in std::mem::take(&mut self.targets) {
            target.complete()?;
        }
        Ok(())
    }
}

impl Stream for BoundsStream {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let polled = futures::ready!(self.input.poll_next_unpin(cx));
        Poll::Ready(match polled {
            Some(Ok(batch)) => Some(self.observe(&batch).map(|()| batch)),
            Some(Err(e)) => Some(Err(e)),
            None => self.complete().err().map(Err),
        })
    }
}

impl RecordBatchStream for BoundsStream {
    fn schema(&self) -> SchemaRef {
        self.input.schema()
    }
}
