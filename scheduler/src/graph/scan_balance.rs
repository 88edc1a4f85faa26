//! Parquet scans split by row groups, so every task of a scan stage gets the same share.
//!
//! DataFusion splits a scan's files into `target_partitions` groups by *byte ranges*, and a
//! row group is read by the range holding its first page. With large row groups this is
//! lopsided: four 52 MB lineitem files of two row groups each (1M + 0.5M rows) split into two
//! halves give the first group 4M rows and the second 2M, because the first row group of the
//! third file starts inside the first half's last few bytes. In one process DataFusion's file
//! work stealing hides this; a Volley task runs its partition alone, so the stage took as long
//! as its biggest task (125 ms vs 75 ms for TPC-H q6 at SF1).
//!
//! This pass reads each file's footer (through the session's metadata cache, which planning
//! filled already), lays the row groups of all files out in order, and cuts that sequence into
//! the same number of groups with equal compressed bytes, each group a run of whole row groups
//! (file ranges from one row group's first page to the next one's). Scans whose groups carry
//! meaning (declared orderings, partitioning by file group, order-preserving scans) are left as
//! they are, and so is any scan whose footers cannot be read (the task will report that error).

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::parquet::metadata::DFParquetMetadata;
use datafusion::datasource::physical_plan::{
    FileGroup, FileScanConfig, FileScanConfigBuilder, ParquetSource,
};
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::Result;
use datafusion::execution::SessionState;
use datafusion::execution::cache::cache_manager::FileMetadataCache;
use datafusion::object_store::{ObjectMeta, ObjectStore};
use datafusion::parquet::file::metadata::ParquetMetaData;
use datafusion::physical_plan::ExecutionPlan;
use futures::{FutureExt, StreamExt, stream};

/// Footer reads in flight at once.
const FOOTER_READS: usize = 32;
/// Scans with more files than this per group keep DataFusion's groups.
const MAX_FILES_PER_GROUP: usize = 32;

/// One row group of one file: the byte range that selects it and its compressed size.
#[derive(Debug, Clone, PartialEq)]
struct Unit {
    file: usize,
    start: i64,
    end: i64,
    bytes: u64,
}

/// Rebalance the Parquet scans of `plan` (see the module docs). Never fails the query: a scan
/// that cannot be rebalanced keeps DataFusion's groups.
pub async fn balance_parquet_scans(
    plan: Arc<dyn ExecutionPlan>,
    state: &SessionState,
) -> Result<Arc<dyn ExecutionPlan>> {
    let runtime = state.runtime_env();
    // Every file of a balanceable scan, once, with the store it is read from.
    let mut wanted = HashMap::new();
    plan.apply(|node| {
        if let Some(scan) = balanceable(node)
            && let Ok(store) = runtime.object_store(&scan.object_store_url)
        {
            for file in scan.file_groups.iter().flat_map(FileGroup::iter) {
                wanted
                    .entry(file.object_meta.location.to_string())
                    .or_insert_with(|| (Arc::clone(&store), file.object_meta.clone()));
            }
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    if wanted.is_empty() {
        return Ok(plan);
    }
    let cache = runtime.cache_manager.get_file_metadata_cache();
    let wanted: Vec<_> = wanted.into_values().collect();
    // Planning read these footers already (statistics), so they are normally cache hits; a
    // bounded number of reads at a time when they are not (thousands of files on S3).
    let reads: Vec<_> = wanted
        .into_iter()
        .map(|(store, meta)| fetch_footer(store, meta, Arc::clone(&cache)).boxed())
        .collect();
    let fetched: Vec<_> = stream::iter(reads)
        .buffer_unordered(FOOTER_READS)
        .collect()
        .await;
    let mut footers = HashMap::new();
    for (meta, result) in fetched {
        match result {
            Ok(footer) => {
                footers.insert(meta.location.to_string(), footer);
            }
            Err(e) => {
                tracing::debug!(file = %meta.location, error = %e, "no footer; scan not rebalanced")
            }
        }
    }
    let rewritten = plan.transform_up(|node| {
        let Some(scan) = balanceable(&node) else {
            return Ok(Transformed::no(node));
        };
        let Some(groups) = balanced_groups(scan, &footers) else {
            return Ok(Transformed::no(node));
        };
        let config = FileScanConfigBuilder::from(scan.clone())
            .with_file_groups(groups)
            .build();
        Ok(Transformed::yes(
            DataSourceExec::from_data_source(config) as Arc<dyn ExecutionPlan>
        ))
    })?;
    Ok(rewritten.data)
}

/// One file's footer, through the metadata cache.
async fn fetch_footer(
    store: Arc<dyn ObjectStore>,
    meta: ObjectMeta,
    cache: Arc<FileMetadataCache>,
) -> (ObjectMeta, Result<Arc<ParquetMetaData>>) {
    let footer = DFParquetMetadata::new(store.as_ref(), &meta)
        .with_file_metadata_cache(Some(cache))
        .fetch_metadata()
        .await;
    (meta, footer)
}

/// The scan of `node` if it is a Parquet scan whose file groups may be redrawn.
fn balanceable(node: &Arc<dyn ExecutionPlan>) -> Option<&FileScanConfig> {
    let scan = node
        .downcast_ref::<DataSourceExec>()?
        .data_source()
        .downcast_ref::<FileScanConfig>()?;
    let parquet = scan.file_source().downcast_ref::<ParquetSource>().is_some();
    // With many files per group, a row group more or less moves a group's share by a few
    // percent at most; those scans are left be rather than read thousands of footers (pieces
    // of split files count too: DataFusion splits at most one file per group boundary).
    let groups = scan.file_groups.len();
    let pieces: usize = scan.file_groups.iter().map(FileGroup::len).sum();
    (parquet
        && groups > 1
        && pieces <= (MAX_FILES_PER_GROUP + 1) * groups
        && !scan.preserve_order
        && scan.output_ordering.is_empty()
        && scan.output_partitioning.is_none())
    .then_some(scan)
}

/// New groups for `scan`, or `None` when its files are not plain whole files split by
/// DataFusion, a footer is missing, or there are fewer row groups than groups.
fn balanced_groups(
    scan: &FileScanConfig,
    footers: &HashMap<String, Arc<ParquetMetaData>>,
) -> Option<Vec<FileGroup>> {
    // Files in order of first appearance, each with the ranges the groups hold of it.
    let mut files: Vec<(PartitionedFile, Vec<(i64, i64)>)> = Vec::new();
    let mut index_of: HashMap<&str, usize> = HashMap::new();
    for file in scan.file_groups.iter().flat_map(FileGroup::iter) {
        let size = i64::try_from(file.object_meta.size).ok()?;
        let range = file.range.as_ref().map_or((0, size), |r| (r.start, r.end));
        match index_of.get(file.object_meta.location.as_ref()) {
            Some(&i) => files[i].1.push(range),
            None => {
                index_of.insert(file.object_meta.location.as_ref(), files.len());
                files.push((file.clone(), vec![range]));
            }
        }
    }
    let mut units = Vec::new();
    for (index, (file, ranges)) in files.iter_mut().enumerate() {
        let size = i64::try_from(file.object_meta.size).ok()?;
        if !covers_whole_file(ranges, size) {
            return None;
        }
        let footer = footers.get(&file.object_meta.location.to_string())?;
        units.extend(row_group_units(index, footer, size));
    }
    let group_count = scan.file_groups.len();
    if units.len() < group_count {
        return None;
    }
    let groups = pack(&units, group_count)
        .into_iter()
        .map(|group| {
            let mut out: Vec<(usize, PartitionedFile)> = Vec::new();
            for unit in group {
                // Adjacent row groups of one file become one range.
                if let Some((file, last)) = out.last_mut()
                    && *file == unit.file
                    && let Some(range) = last.range.as_mut()
                    && range.end == unit.start
                {
                    range.end = unit.end;
                    continue;
                }
                let mut piece = files[unit.file].0.clone();
                piece.statistics = None;
                out.push((unit.file, piece.with_range(unit.start, unit.end)));
            }
            FileGroup::new(
                out.into_iter()
                    .map(|(index, mut piece)| {
                        // A file read whole keeps its statistics and needs no range.
                        let whole = &files[index].0;
                        if piece.range.as_ref().is_some_and(|r| {
                            r.start == 0
                                && u64::try_from(r.end).ok() == Some(whole.object_meta.size)
                        }) {
                            piece.range = None;
                            piece.statistics = whole.statistics.clone();
                        }
                        piece
                    })
                    .collect(),
            )
        })
        .collect();
    Some(groups)
}

/// True when `ranges` tile `[0, size)` without gaps or overlaps.
fn covers_whole_file(ranges: &mut [(i64, i64)], size: i64) -> bool {
    ranges.sort_unstable();
    let mut at = 0;
    for &(start, end) in ranges.iter() {
        if start != at || end < start {
            return false;
        }
        at = end;
    }
    at == size
}

/// The row groups of one file as ranges tiling `[0, size)`; a file whose row-group offsets
/// do not increase (or that has none) is one unit.
fn row_group_units(file: usize, footer: &ParquetMetaData, size: i64) -> Vec<Unit> {
    let groups = footer.row_groups();
    let starts: Vec<i64> = groups
        .iter()
        .filter(|rg| rg.num_columns() > 0)
        .map(|rg| {
            let column = rg.column(0);
            column
                .dictionary_page_offset()
                .unwrap_or_else(|| column.data_page_offset())
        })
        .collect();
    let increasing = starts.len() == groups.len()
        && starts.windows(2).all(|w| w[0] < w[1])
        && starts.last().is_some_and(|&last| last < size);
    if !increasing {
        let bytes = groups
            .iter()
            .map(|rg| u64::try_from(rg.compressed_size()).unwrap_or(0))
            .sum();
        return vec![Unit {
            file,
            start: 0,
            end: size,
            bytes,
        }];
    }
    groups
        .iter()
        .enumerate()
        .map(|(i, rg)| Unit {
            file,
            start: if i == 0 { 0 } else { starts[i] },
            end: starts.get(i + 1).copied().unwrap_or(size),
            bytes: u64::try_from(rg.compressed_size()).unwrap_or(0),
        })
        .collect()
}

/// Cut `units` (in order) into `count` non-empty runs of about equal bytes.
/// Needs `units.len() >= count`.
fn pack(units: &[Unit], count: usize) -> Vec<Vec<Unit>> {
    let mut groups: Vec<Vec<Unit>> = Vec::with_capacity(count);
    let mut remaining: u64 = units.iter().map(|u| u.bytes).sum();
    let mut next = 0;
    for g in 0..count {
        let groups_left = (count - g) as u64;
        let target = remaining.div_ceil(groups_left.max(1));
        let mut group = Vec::new();
        let mut bytes = 0u64;
        while next < units.len() {
            let unit = &units[next];
            // Leave at least one unit for each later group; the last group takes the rest.
            let must_leave = count - g - 1;
            if units.len() - next <= must_leave {
                break;
            }
            let last_group = g + 1 == count;
            // Take a unit while the group stays closer to its target with it than without.
            if !group.is_empty() && !last_group && bytes + unit.bytes / 2 > target {
                break;
            }
            bytes += unit.bytes;
            group.push(unit.clone());
            next += 1;
        }
        remaining = remaining.saturating_sub(bytes);
        groups.push(group);
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::parquet::arrow::ArrowWriter;
    use datafusion::parquet::file::properties::WriterProperties;
    use datafusion::physical_plan::{collect, execute_stream};
    use datafusion::prelude::{ParquetReadOptions, SessionContext};
    use futures::TryStreamExt;
    use volley_core::config::volley_session_config;

    /// Rows each partition of the plan's only scan reads, by running the scan.
    async fn rows_per_partition(plan: &Arc<dyn ExecutionPlan>, ctx: &SessionContext) -> Vec<usize> {
        let mut scan = None;
        plan.apply(|node| {
            if node.downcast_ref::<DataSourceExec>().is_some() {
                scan = Some(Arc::clone(node));
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .unwrap();
        let scan = scan.unwrap();
        let mut rows = Vec::new();
        for partition in 0..scan.properties().partitioning.partition_count() {
            let batches: Vec<RecordBatch> = scan
                .execute(partition, ctx.task_ctx())
                .unwrap()
                .try_collect()
                .await
                .unwrap();
            rows.push(batches.iter().map(|b| b.num_rows()).sum());
        }
        rows
    }

    #[tokio::test]
    async fn row_groups_are_spread_evenly_and_every_row_is_read_once() {
        // Three files of a 1000-row and a 500-row group; too small for DataFusion to split, so
        // it groups whole files: 3000 rows in one partition, 1500 in the other.
        let dir = tempfile::tempdir().unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        for file in 0..3i64 {
            let props = WriterProperties::builder()
                .set_max_row_group_row_count(Some(1000))
                .build();
            let out =
                std::fs::File::create(dir.path().join(format!("part-{file}.parquet"))).unwrap();
            let mut writer = ArrowWriter::try_new(out, Arc::clone(&schema), Some(props)).unwrap();
            let values: Vec<i64> = (0..1500)
                .map(|i| (file * 1500 + i) * 7919 % 100_003)
                .collect();
            let batch = RecordBatch::try_new(
                Arc::clone(&schema),
                vec![Arc::new(Int64Array::from(values))],
            )
            .unwrap();
            writer.write(&batch).unwrap();
            writer.close().unwrap();
        }
        let ctx = SessionContext::new_with_state(volley_core::rules::volley_session_state(
            volley_session_config(2),
        ));
        ctx.register_parquet("t", dir.path().to_str().unwrap(), ParquetReadOptions::new())
            .await
            .unwrap();
        let sql = "SELECT count(*), sum(x), min(x), max(x) FROM t WHERE x >= 0";
        let plan = ctx
            .sql(sql)
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap();
        let mut before = rows_per_partition(&plan, &ctx).await;
        before.sort_unstable();
        assert_eq!(before, vec![1500, 3000]);

        let balanced = balance_parquet_scans(Arc::clone(&plan), &ctx.state())
            .await
            .unwrap();
        let mut after = rows_per_partition(&balanced, &ctx).await;
        after.sort_unstable();
        assert_eq!(after, vec![2000, 2500]);

        let expected = collect(plan, ctx.task_ctx()).await.unwrap();
        let actual: Vec<RecordBatch> = execute_stream(balanced, ctx.task_ctx())
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(expected, actual);
    }

    fn units(sizes: &[u64]) -> Vec<Unit> {
        let mut at = 0;
        sizes
            .iter()
            .map(|&bytes| {
                let unit = Unit {
                    file: 0,
                    start: at,
                    end: at + bytes as i64,
                    bytes,
                };
                at += bytes as i64;
                unit
            })
            .collect()
    }

    fn sizes(groups: &[Vec<Unit>]) -> Vec<u64> {
        groups
            .iter()
            .map(|g| g.iter().map(|u| u.bytes).sum())
            .collect()
    }

    #[test]
    fn lineitem_like_row_groups_split_evenly() {
        // Four files of a 1M-row and a 0.5M-row group: DataFusion's byte split gave 4:2.
        let layout = units(&[35, 17, 35, 17, 35, 17, 35, 17]);
        assert_eq!(sizes(&pack(&layout, 2)), vec![104, 104]);
        // Runs of whole row groups: 87 is the smallest possible biggest group.
        assert_eq!(sizes(&pack(&layout, 3)), vec![87, 69, 52]);
    }

    #[test]
    fn every_group_gets_a_unit_and_all_units_are_used() {
        let layout = units(&[100, 1, 1, 1]);
        let groups = pack(&layout, 3);
        assert!(groups.iter().all(|g| !g.is_empty()));
        assert_eq!(sizes(&groups).iter().sum::<u64>(), 103);
        assert_eq!(sizes(&pack(&units(&[5, 5, 5]), 3)), vec![5, 5, 5]);
    }

    #[test]
    fn ranges_must_tile_the_file() {
        assert!(covers_whole_file(&mut [(10, 20), (0, 10)], 20));
        assert!(!covers_whole_file(&mut [(0, 10)], 20));
        assert!(!covers_whole_file(&mut [(0, 12), (10, 20)], 20));
    }
}
