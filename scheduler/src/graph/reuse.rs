//! Identical stages run once for all their readers (exchange reuse, as Spark's
//! `ReuseExchange`). A common table expression or a repeated subquery is planned once per
//! reference: TPC-DS q44 scans `store_sales` four times for two distinct aggregates, q14
//! computes `cross_items` once per sales channel, TPC-H q15 the `revenue` view twice. On one
//! node DataFusion runs each copy; cut into stages, a copy whose stage would be identical to
//! one cut before reads that stage instead, so its work (and its shuffle) happens once.
//!
//! Two stages are identical when their plans encode to the same bytes (what executors run),
//! with the same output partitioning and kind; a cheap shape (operator names, schema) picks
//! the candidates, so plans are encoded only when they might match. Never reused: stages with
//! a volatile function (`random()` must give each reference its own values) and stages that
//! write table files or commit them. Readers of a shared stage are counted by the layers that
//! rewrite a stage for its one consumer (key filters, broadcast switches, fusion, inlining,
//! skew splits): they leave shared stages alone.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::physical_expr_common::physical_expr::is_volatile;
use datafusion::physical_plan::{ExecutionPlan, Partitioning};
use volley_core::codec::VolleyCodec;
use volley_core::plan::{CommitFilesExec, TaskWriteExec};

use crate::graph::StageKind;

/// What must match before two stage plans are compared byte by byte.
#[derive(Debug, PartialEq)]
struct Shape {
    kind: StageKind,
    schema: SchemaRef,
    /// Hash of the operator names, in tree order.
    operators: u64,
}

/// A stage cut before, which later identical ones read instead.
struct Seen {
    stage_id: u32,
    shape: Shape,
    input: Arc<dyn ExecutionPlan>,
    partitioning: Option<Partitioning>,
    /// Its encoding, once a candidate needed it (None inside: it cannot be encoded).
    encoded: Option<Option<Vec<u8>>>,
}

/// The stages of one cut that later stages may reuse.
pub(crate) struct Reuse {
    on: bool,
    seen: Vec<Seen>,
}

impl Reuse {
    /// Reuse stages when `on`.
    pub(crate) fn new(on: bool) -> Self {
        Self {
            on,
            seen: Vec::new(),
        }
    }

    /// The stage already cut that runs exactly `input` into `partitioning` as a `kind` stage;
    /// when there is none, stage `new_id` (about to be cut from it) is remembered for later
    /// identical ones.
    pub(crate) fn existing_or_record(
        &mut self,
        new_id: u32,
        input: &Arc<dyn ExecutionPlan>,
        partitioning: Option<&Partitioning>,
        kind: StageKind,
    ) -> Option<u32> {
        if !self.on || kind == StageKind::Result || !reusable(input) {
            return None;
        }
        let shape = Shape::of(input, kind);
        let mut mine: Option<Option<Vec<u8>>> = None;
        for seen in &mut self.seen {
            if seen.shape != shape || seen.partitioning.as_ref() != partitioning {
                continue;
            }
            let theirs = seen
                .encoded
                .get_or_insert_with(|| encode(&seen.input))
                .as_ref();
            let mine = mine.get_or_insert_with(|| encode(input)).as_ref();
            if theirs.is_some() && theirs == mine {
                return Some(seen.stage_id);
            }
        }
        self.seen.push(Seen {
            stage_id: new_id,
            shape,
            input: Arc::clone(input),
            partitioning: partitioning.cloned(),
            encoded: mine,
        });
        None
    }
}

impl Shape {
    fn of(input: &Arc<dyn ExecutionPlan>, kind: StageKind) -> Self {
        let mut operators = DefaultHasher::new();
        let _ = input.apply(|node| {
            node.name().hash(&mut operators);
            Ok(TreeNodeRecursion::Continue)
        });
        Shape {
            kind,
            schema: input.schema(),
            operators: operators.finish(),
        }
    }
}

fn encode(input: &Arc<dyn ExecutionPlan>) -> Option<Vec<u8>> {
    VolleyCodec::encode_plan(Arc::clone(input)).ok()
}

/// True when running `input` once for several readers gives each what its own run would:
/// no volatile function, no table write.
fn reusable(input: &Arc<dyn ExecutionPlan>) -> bool {
    let mut reusable = true;
    let _ = input.apply(|node| {
        if node.is::<TaskWriteExec>() || node.is::<CommitFilesExec>() {
            reusable = false;
            return Ok(TreeNodeRecursion::Stop);
        }
        let _ = node.apply_expressions(&mut |expr| {
            reusable &= !is_volatile(expr);
            Ok(TreeNodeRecursion::Continue)
        });
        Ok(match reusable {
            true => TreeNodeRecursion::Continue,
            false => TreeNodeRecursion::Stop,
        })
    });
    reusable
}

#[cfg(test)]
mod tests {
    use datafusion::physical_plan::ExecutionPlan;
    use volley_core::config::volley_session_config;

    use crate::graph::cut::plan_stages_inlining;
    use crate::graph::cut::tests::plan_sql;
    use crate::graph::joins::readers_of;

    /// A CTE read twice: its scan-and-aggregate stage and the merge after it run once, read by
    /// both sides of the join.
    const TWICE: &str = "WITH c AS (SELECT b, count(*) AS n FROM t GROUP BY b) \
         SELECT c1.b, c1.n, c2.n FROM c c1 JOIN c c2 ON c1.b = c2.b ORDER BY 1";

    async fn stage_count(sql: &str, reuse: bool) -> (usize, usize) {
        let plan = plan_sql(sql, volley_session_config(4)).await;
        let stages = plan_stages_inlining("job", plan, 0, reuse).unwrap();
        let most_readers = stages
            .iter()
            .map(|producer| {
                stages
                    .iter()
                    .map(|s| {
                        readers_of(
                            &(std::sync::Arc::clone(&s.plan) as std::sync::Arc<dyn ExecutionPlan>),
                            producer.stage_id,
                        )
                    })
                    .sum::<usize>()
            })
            .max()
            .unwrap_or(0);
        for stage in &stages {
            assert!(stage.inputs.iter().all(|i| *i < stage.stage_id));
        }
        (stages.len(), most_readers)
    }

    #[tokio::test]
    async fn a_common_table_expression_read_twice_is_one_stage_with_two_readers() {
        let (without, readers) = stage_count(TWICE, false).await;
        assert_eq!(readers, 1);
        let (with, readers) = stage_count(TWICE, true).await;
        assert!(
            with < without,
            "{with} stages with reuse, {without} without"
        );
        assert_eq!(readers, 2);
    }

    #[tokio::test]
    async fn stages_with_a_volatile_function_are_not_reused() {
        let sql = "WITH c AS (SELECT b, sum(a * random()) AS n FROM t GROUP BY b) \
             SELECT c1.b, c1.n, c2.n FROM c c1 JOIN c c2 ON c1.b = c2.b";
        assert_eq!(stage_count(sql, true).await, stage_count(sql, false).await);
    }
}
