//! Small build sides stay in the join's stage: a `CollectLeft` join whose build side only scans
//! files (no exchange below it) and whose files are small reads them in every join task
//! instead of from a broadcast stage of its own.
//!
//! Not for build sides with a limit or a volatile function (`random()`): each task would see
//! other rows or values, where a broadcast stage writes one build side for all.
//!
//! A broadcast stage costs a stage barrier, a task launch per partition, a file written and
//! read back per consumer task: for a filtered date dimension (TPC-DS SF1 `date_dim`, 2.5 MB)
//! that is several milliseconds on the critical path of a query DataFusion answers in 20, and
//! chains of them (a filtered dimension feeding a semi join feeding a join) add up. Reading the
//! files again in each join task costs their decode once per task instead, so the rule is
//! bounded by the bytes scanned times the join's task count (`volley.inline_build_bytes`).

use std::sync::Arc;

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::physical_expr_common::physical_expr::is_volatile;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::sorts::sort_preserving_merge::SortPreservingMergeExec;
use datafusion::physical_plan::{ExecutionPlan, ExecutionPlanProperties};
use volley_core::plan::{CommitFilesExec, ShuffleReaderExec, TaskWriteExec};

/// True when `join`'s build side should run in the join's tasks (see the module docs):
/// `budget` bounds its files' bytes times the join's probe partitions, its tasks (0 turns this off).
pub fn inline_build_side(join: &HashJoinExec, budget: u64) -> bool {
    if budget == 0 || *join.partition_mode() != PartitionMode::CollectLeft {
        return false;
    }
    let Some(coalesce) = join.left().downcast_ref::<CoalescePartitionsExec>() else {
        return false;
    };
    // A limit keeps whichever rows arrive first, and a volatile function gives other values
    // each time: every task must see the one build side a broadcast stage would have written.
    if coalesce.fetch().is_some() {
        return false;
    }
    let Some(bytes) = scanned_bytes(coalesce.input()) else {
        return false;
    };
    let tasks = join.right().output_partitioning().partition_count().max(1) as u64;
    bytes.saturating_mul(tasks) <= budget
}

/// Bytes a file scan reads: its files whole, or the ranges of them it reads.
pub(crate) fn file_bytes(files: &FileScanConfig) -> u64 {
    files
        .file_groups
        .iter()
        .flat_map(|g| g.iter())
        .map(|file| match &file.range {
            Some(range) => u64::try_from(range.end - range.start).unwrap_or(u64::MAX),
            None => file.object_meta.size,
        })
        .fold(0, u64::saturating_add)
}

/// Bytes of the files `plan` scans, if it only scans files and has no exchange.
pub(crate) fn scanned_bytes(plan: &Arc<dyn ExecutionPlan>) -> Option<u64> {
    let mut bytes = 0u64;
    let mut plain = true;
    let _ = plan.apply(|node| {
        let exchange = node.is::<RepartitionExec>()
            || node.is::<CoalescePartitionsExec>()
            || node.is::<SortPreservingMergeExec>();
        let volley = node.is::<ShuffleReaderExec>()
            || node.is::<CommitFilesExec>()
            || node.is::<TaskWriteExec>();
        let mut volatile = false;
        let _ = node.apply_expressions(&mut |expr| {
            volatile |= is_volatile(expr);
            Ok(TreeNodeRecursion::Continue)
        });
        if exchange || volley || volatile || node.fetch().is_some() {
            plain = false;
            return Ok(TreeNodeRecursion::Stop);
        }
        if let Some(scan) = node.downcast_ref::<DataSourceExec>() {
            let Some(files) = scan.data_source().downcast_ref::<FileScanConfig>() else {
                plain = false;
                return Ok(TreeNodeRecursion::Stop);
            };
            bytes = bytes.saturating_add(file_bytes(files));
        } else if node.children().is_empty()
            && !matches!(node.name(), "EmptyExec" | "PlaceholderRowExec")
        {
            // Other leaves (in-memory data, system tables) do not travel as plans anyway.
            plain = false;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    plain.then_some(bytes)
}
