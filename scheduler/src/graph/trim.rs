//! A task's own copy of its stage plan: scans on the path of the task's partition keep only
//! that partition's files. A task runs one partition of its stage, but the stage plan lists the
//! files of every partition, so with one task per file (1,000 tiny files, 1,000 tasks) each
//! task decoded a plan of 1,000 file groups (~3 ms) and the stage did quadratic work.

use std::sync::Arc;

use datafusion::datasource::physical_plan::{FileGroup, FileScanConfig};
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::Result;
use datafusion::physical_plan::aggregates::AggregateExec;
use datafusion::physical_plan::coop::CooperativeExec;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::{
    ExecutionPlan, ExecutionPlanProperties, replace_children_if_necessary,
};
use volley_core::codec::VolleyCodec;
use volley_core::plan::{ShuffleReaderExec, ShuffleWriterExec};

/// A stage's plan with its readers resolved, encoded for all its tasks; a plan whose scans
/// list many files also kept as the entries of its hollow copy, to give each task a plan with
/// only its own files.
#[derive(Debug, Clone)]
pub struct ResolvedPlan {
    /// The whole stage plan, encoded.
    pub bytes: Arc<Vec<u8>>,
    per_task: Option<Arc<PerTask>>,
}

/// A trimmed scan and its hollow copy.
type ScanPair = (Arc<dyn ExecutionPlan>, Arc<dyn ExecutionPlan>);

/// What a task's own plan is made of: the flat entries of the stage's hollow plan (see
/// [`hollow`]) and, for each trimmed scan, its entry there with the scan and its hollow copy.
/// A task's plan is those entries with each trimmed scan's entry encoded again holding the
/// task's files: one leaf encoded per task, not the whole plan.
#[derive(Debug)]
struct PerTask {
    entries: Vec<Vec<u8>>,
    scans: Vec<(usize, ScanPair)>,
}

impl ResolvedPlan {
    /// Encode `plan` (and prepare per-task plans when its scans list many files: see
    /// [`worth_trimming`]).
    pub fn new(plan: Arc<dyn ExecutionPlan>) -> Result<Self> {
        let bytes = VolleyCodec::encode_plan(Arc::clone(&plan))?;
        Self::encoded(&plan, bytes)
    }

    /// [`Self::new`] for a plan already encoded as `bytes`.
    pub fn encoded(plan: &Arc<dyn ExecutionPlan>, bytes: Vec<u8>) -> Result<Self> {
        let per_task = match worth_trimming(plan) {
            true => Some(Arc::new(PerTask::new(plan)?)),
            false => None,
        };
        Ok(Self {
            bytes: Arc::new(bytes),
            per_task,
        })
    }

    /// The encoded plan task `partition` runs (the whole stage plan if a copy of its own fails
    /// to build, which it should not: the whole plan encoded).
    pub fn for_partition(&self, partition: usize) -> Arc<Vec<u8>> {
        let Some(per_task) = &self.per_task else {
            return Arc::clone(&self.bytes);
        };
        match per_task.encode(partition) {
            Ok(bytes) => Arc::new(bytes),
            Err(e) => {
                tracing::warn!(partition, error = %e, "cannot trim a task's plan; sending the stage's");
                Arc::clone(&self.bytes)
            }
        }
    }
}

impl PerTask {
    fn new(plan: &Arc<dyn ExecutionPlan>) -> Result<Self> {
        let mut pairs = Vec::new();
        let empty = hollow_collecting(plan, &mut pairs)?;
        let order = volley_core::flat::post_order(&empty);
        let scans = pairs
            .into_iter()
            .filter_map(|(scan, hollow)| {
                let entry = order.iter().position(|node| Arc::ptr_eq(node, &hollow))?;
                Some((entry, (scan, hollow)))
            })
            .collect();
        Ok(Self {
            entries: VolleyCodec::encode_entries(empty)?,
            scans,
        })
    }

    fn encode(&self, partition: usize) -> Result<Vec<u8>> {
        let mut entries = self.entries.clone();
        for (entry, (scan, hollow)) in &self.scans {
            let own = fill_scan(scan, hollow, partition);
            let mut leaf = VolleyCodec::encode_entries(own)?;
            match (entries.get_mut(*entry), leaf.pop()) {
                (Some(slot), Some(bytes)) if leaf.is_empty() => *slot = bytes,
                _ => {
                    return Err(datafusion::error::DataFusionError::Internal(
                        "a trimmed scan is not one entry of its plan".to_string(),
                    ));
                }
            }
        }
        Ok(volley_core::flat::assemble(entries))
    }
}

/// What a stage keeps of its plan's encoding at submit.
#[derive(Debug)]
pub enum Encoded {
    /// The plan of a stage reading no other stage, ready to launch.
    Plan(ResolvedPlan),
    /// The plan of a stage with readers, which its launch resolves.
    Template(Arc<Template>),
}

/// A stage plan encoded before its readers know their producers' files (when the job was
/// submitted): resolving it at launch encodes only the readers again, one entry each, and the
/// stage's other operators keep their bytes (the flat format names children by index).
#[derive(Debug)]
pub struct Template {
    entries: Vec<Vec<u8>>,
    /// Each reader's entry and the reader.
    readers: Vec<(usize, ShuffleReaderExec)>,
}

impl Template {
    /// The template of `plan`, encoded as `entries`; None for plans whose scans get a plan
    /// per task (those are encoded whole).
    pub fn new(plan: &Arc<dyn ExecutionPlan>, entries: Vec<Vec<u8>>) -> Option<Self> {
        if worth_trimming(plan) {
            return None;
        }
        let order = volley_core::flat::post_order(plan);
        if order.len() != entries.len() {
            return None;
        }
        let readers = order
            .into_iter()
            .enumerate()
            .filter_map(|(at, node)| Some((at, node.downcast_ref::<ShuffleReaderExec>()?.clone())))
            .collect();
        Some(Self { entries, readers })
    }

    /// The plan with each reader replaced by `resolve` of it, encoded.
    pub fn resolve(
        &self,
        mut resolve: impl FnMut(&ShuffleReaderExec) -> ShuffleReaderExec,
    ) -> Result<ResolvedPlan> {
        let mut entries = self.entries.clone();
        for (at, reader) in &self.readers {
            let mut leaf = VolleyCodec::encode_entries(Arc::new(resolve(reader)))?;
            match (entries.get_mut(*at), leaf.pop()) {
                (Some(slot), Some(bytes)) if leaf.is_empty() => *slot = bytes,
                _ => {
                    return Err(datafusion::error::DataFusionError::Internal(
                        "a shuffle reader is not one entry of its stage's plan".to_string(),
                    ));
                }
            }
        }
        Ok(ResolvedPlan {
            bytes: Arc::new(volley_core::flat::assemble(entries)),
            per_task: None,
        })
    }
}

/// Scans with fewer file groups are not worth a plan per task.
pub const MIN_GROUPS: usize = 16;

/// True when some scan on a partition's path has at least [`MIN_GROUPS`] file groups.
pub fn worth_trimming(plan: &Arc<dyn ExecutionPlan>) -> bool {
    if let Some(scan) = file_scan(plan) {
        return scan.file_groups.len() >= MIN_GROUPS;
    }
    followed(plan)
        .into_iter()
        .any(|child| worth_trimming(plan.children()[child]))
}

/// `plan` with every trimmed scan's file groups emptied (same count), built once per stage
/// so each task's copy clones empty groups, not the whole file list; each trimmed scan is
/// listed with its hollow copy.
fn hollow_collecting(
    plan: &Arc<dyn ExecutionPlan>,
    scans: &mut Vec<ScanPair>,
) -> Result<Arc<dyn ExecutionPlan>> {
    if let Some(scan) = file_scan(plan) {
        if scan.file_groups.len() < MIN_GROUPS {
            return Ok(Arc::clone(plan));
        }
        let mut empty = scan.clone();
        empty.file_groups = vec![FileGroup::new(Vec::new()); scan.file_groups.len()];
        let exec = rebuilt(empty, plan);
        scans.push((Arc::clone(plan), Arc::clone(&exec)));
        return Ok(exec);
    }
    let follow = followed(plan);
    if follow.is_empty() {
        return Ok(Arc::clone(plan));
    }
    let children = plan
        .children()
        .into_iter()
        .enumerate()
        .map(|(i, child)| match follow.contains(&i) {
            true => hollow_collecting(child, scans),
            false => Ok(Arc::clone(child)),
        })
        .collect::<Result<Vec<_>>>()?;
    replace_children_if_necessary(Arc::clone(plan), children)
}

/// The hollow copy of scan `plan` with partition `partition`'s file group put back (the scan
/// itself when it is not trimmed or has no such group).
fn fill_scan(
    plan: &Arc<dyn ExecutionPlan>,
    hollow: &Arc<dyn ExecutionPlan>,
    partition: usize,
) -> Arc<dyn ExecutionPlan> {
    let (Some(scan), Some(empty)) = (file_scan(plan), file_scan(hollow)) else {
        return Arc::clone(plan);
    };
    if scan.file_groups.len() < MIN_GROUPS || partition >= scan.file_groups.len() {
        return Arc::clone(plan);
    }
    let mut own = empty.clone();
    if let (Some(slot), Some(group)) = (
        own.file_groups.get_mut(partition),
        scan.file_groups.get(partition),
    ) {
        *slot = group.clone();
    }
    rebuilt(own, plan)
}

/// A scan reading `config`, partitioned like `like`.
fn rebuilt(config: FileScanConfig, like: &Arc<dyn ExecutionPlan>) -> Arc<dyn ExecutionPlan> {
    Arc::new(
        Arc::unwrap_or_clone(DataSourceExec::from_data_source(config))
            .with_partitioning(like.output_partitioning().clone()),
    )
}

fn file_scan(plan: &Arc<dyn ExecutionPlan>) -> Option<&FileScanConfig> {
    plan.downcast_ref::<DataSourceExec>()?
        .data_source()
        .downcast_ref::<FileScanConfig>()
}

/// The children whose partition `i` is all that partition `i` of `plan` reads.
fn followed(plan: &Arc<dyn ExecutionPlan>) -> Vec<usize> {
    let candidates: Vec<usize> = if let Some(join) = plan.downcast_ref::<HashJoinExec>() {
        match join.partition_mode() {
            PartitionMode::CollectLeft => vec![1],
            PartitionMode::Partitioned => vec![0, 1],
            PartitionMode::Auto => Vec::new(),
        }
    } else if let Some(sort) = plan.downcast_ref::<SortExec>() {
        match sort.preserve_partitioning() {
            true => vec![0],
            false => Vec::new(),
        }
    } else if plan.is::<ShuffleWriterExec>()
        || plan.is::<ProjectionExec>()
        || plan.is::<FilterExec>()
        || plan.is::<CooperativeExec>()
        || plan.is::<AggregateExec>()
        || plan.name() == "CoalesceBatchesExec"
    {
        vec![0]
    } else {
        Vec::new()
    };
    let partitions = plan.output_partitioning().partition_count();
    let children = plan.children();
    candidates
        .into_iter()
        .filter(|&i| {
            children
                .get(i)
                .is_some_and(|c| c.output_partitioning().partition_count() == partitions)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    use datafusion::physical_plan::collect;
    use datafusion::prelude::{CsvReadOptions, SessionContext};
    use futures::TryStreamExt;

    /// The plan task `partition` of `plan` receives, decoded (as an executor does).
    fn to_partition(
        ctx: &SessionContext,
        plan: &Arc<dyn ExecutionPlan>,
        partition: usize,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let bytes = PerTask::new(plan)?.encode(partition)?;
        VolleyCodec::decode_plan(&bytes, &ctx.task_ctx())
    }

    /// Non-empty file groups of each file scan in `plan`, in pre-order.
    fn groups_read(plan: &Arc<dyn ExecutionPlan>) -> Vec<usize> {
        let mut out = Vec::new();
        let _ = plan.apply(|node| {
            if let Some(scan) = file_scan(node) {
                out.push(scan.file_groups.iter().filter(|g| !g.is_empty()).count());
            }
            Ok(TreeNodeRecursion::Continue)
        });
        out
    }

    #[tokio::test]
    async fn a_task_plan_keeps_its_own_files_and_whole_build_sides() {
        let dir = tempfile::tempdir().unwrap();
        for table in ["t", "u"] {
            std::fs::create_dir(dir.path().join(table)).unwrap();
            for file in 0..20 {
                let rows: String = (0..5)
                    .map(|i| format!("{},{}\n", file * 5 + i, i))
                    .collect();
                std::fs::write(
                    dir.path().join(table).join(format!("{file:02}.csv")),
                    format!("a,b\n{rows}"),
                )
                .unwrap();
            }
        }
        // Volley's settings: no file work stealing (a partition reads its own group only).
        let ctx = SessionContext::new_with_config(volley_core::config::volley_session_config(20));
        for table in ["t", "u"] {
            let path = format!("{}/", dir.path().join(table).display());
            ctx.register_csv(table, &path, CsvReadOptions::new())
                .await
                .unwrap();
        }
        let scan = ctx
            .sql("SELECT a, b FROM t WHERE b > 1")
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap();
        assert!(worth_trimming(&scan));
        let own = to_partition(&ctx, &scan, 3).unwrap();
        assert_eq!(groups_read(&scan), vec![20]);
        assert_eq!(groups_read(&own), vec![1]);
        assert_eq!(
            own.output_partitioning().partition_count(),
            scan.output_partitioning().partition_count()
        );
        let task = ctx.task_ctx();
        let rows = |plan: &Arc<dyn ExecutionPlan>| {
            let stream = plan.execute(3, Arc::clone(&task)).unwrap();
            async move { stream.try_collect::<Vec<_>>().await.unwrap() }
        };
        let (full, trimmed) = (rows(&scan).await, rows(&own).await);
        assert_eq!(full, trimmed);
        // What a task is sent: the hollow plan's entries with its own scan's swapped in.
        let sent = ResolvedPlan::new(Arc::clone(&scan))
            .unwrap()
            .for_partition(3);
        let sent = VolleyCodec::decode_plan(&sent, &ctx.task_ctx()).unwrap();
        assert_eq!(groups_read(&sent), vec![1]);
        assert_eq!(rows(&sent).await, trimmed);
        assert_eq!(trimmed.iter().map(|b| b.num_rows()).sum::<usize>(), 3);

        // The build side of a broadcast join is read whole by every task: not trimmed.
        ctx.sql("SET datafusion.optimizer.repartition_joins = false")
            .await
            .unwrap();
        let join = ctx
            .sql("SELECT t.a, u.b FROM t JOIN u ON t.a = u.a WHERE u.b = 2")
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap();
        let own = to_partition(&ctx, &join, 3).unwrap();
        let mut read = groups_read(&own);
        read.sort_unstable();
        assert_eq!(read, vec![1, 20], "probe scan trimmed, build scan whole");
        let all = collect(Arc::clone(&join), ctx.task_ctx()).await.unwrap();
        assert_eq!(all.iter().map(|b| b.num_rows()).sum::<usize>(), 20);
        assert_eq!(rows(&join).await, rows(&own).await);
        let sent = ResolvedPlan::new(Arc::clone(&join))
            .unwrap()
            .for_partition(3);
        let sent = VolleyCodec::decode_plan(&sent, &ctx.task_ctx()).unwrap();
        let mut read = groups_read(&sent);
        read.sort_unstable();
        assert_eq!(
            read,
            vec![1, 20],
            "sent: probe scan trimmed, build scan whole"
        );
        assert_eq!(rows(&sent).await, rows(&own).await);
    }

    /// Readers as a launch may resolve them: regrouped into one task.
    fn regrouped(reader: &ShuffleReaderExec) -> ShuffleReaderExec {
        let partitioning = match reader.partitioning() {
            datafusion::physical_plan::Partitioning::Hash(exprs, _) => {
                datafusion::physical_plan::Partitioning::Hash(exprs.clone(), 1)
            }
            _ => datafusion::physical_plan::Partitioning::UnknownPartitioning(1),
        };
        ShuffleReaderExec::with_locations(
            reader.stage_id(),
            reader.schema(),
            partitioning,
            reader.hash_partitioned(),
            vec![Vec::new()],
        )
    }

    #[tokio::test]
    async fn a_template_resolves_to_the_bytes_of_the_whole_plan_resolved() {
        use datafusion::common::tree_node::Transformed;
        let sql = "SELECT t.b, count(*) FROM t JOIN u ON t.a = u.a GROUP BY t.b ORDER BY 1";
        let config = volley_core::config::volley_session_config(4);
        let physical = crate::graph::cut::tests::plan_sql(sql, config).await;
        let stages = crate::graph::cut::plan_stages("job", physical).unwrap();
        let mut templates = 0;
        for stage in stages.iter().filter(|s| !s.inputs.is_empty()) {
            let plan = Arc::clone(&stage.plan) as Arc<dyn ExecutionPlan>;
            let entries = VolleyCodec::encode_entries(Arc::clone(&plan)).unwrap();
            let template = Template::new(&plan, entries).unwrap();
            let spliced = template.resolve(regrouped).unwrap();
            let whole = plan
                .transform_up(|node| match node.downcast_ref::<ShuffleReaderExec>() {
                    Some(reader) => Ok(Transformed::yes(
                        Arc::new(regrouped(reader)) as Arc<dyn ExecutionPlan>
                    )),
                    None => Ok(Transformed::no(node)),
                })
                .unwrap()
                .data;
            let whole = VolleyCodec::encode_plan(whole).unwrap();
            assert_eq!(*spliced.bytes, whole, "stage {}", stage.stage_id);
            templates += 1;
        }
        assert!(templates >= 2, "{templates} stages with readers");
    }
}
