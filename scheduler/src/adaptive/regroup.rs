//! Regrouping a ready stage's tasks from its inputs' real sizes: runs of adjacent small
//! shuffle partitions coalesced into one task, a skewed join partition split into several
//! tasks that each read a range of the probe side's map outputs.

use std::ops::Range;
use std::sync::Arc;

use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::sorts::sort_preserving_merge::SortPreservingMergeExec;
use datafusion::physical_plan::{ExecutionPlan, ExecutionPlanProperties};
use volley_core::config::VolleyOptions;
use volley_core::plan::ShuffleReaderExec;

use crate::graph::StageKind;
use crate::graph::joins::{readers_of, shuffled_join};
use crate::job::stage::StageState;
use crate::job::{Decision, Job, TaskRead};

/// Coalesced partitions never target less than this many bytes per task.
pub const MIN_PARTITION_BYTES: u64 = 1024 * 1024;

/// True when every partitioned leaf of the stage is a hash-mode shuffle reader and every
/// operator on the way keeps the stage's partition count (so tasks may read any run of
/// adjacent buckets). Subtrees under a partition merge are read whole by every task.
pub(crate) fn coalescible(
    plan: &Arc<dyn ExecutionPlan>,
    partitions: usize,
    readers: &mut usize,
) -> bool {
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
        for location in task.outputs() {
            if let Some(slot) = out
                .get_mut(location.output_partition as usize)
                .and_then(|per_map| per_map.get_mut(map))
            {
                *slot += location.num_bytes;
            }
        }
    }
    out
}

/// A partition of a join's probe side far above the median, to split by map output.
struct Skewed {
    bucket: usize,
    maps: Vec<Range<usize>>,
    size: u64,
    median: u64,
}

/// Bytes per bucket over a stage's hash-shuffled inputs (a broadcast or merge input is one
/// file per map task, read whole by every task, not a bucket).
fn input_sizes(job: &Job, stage: &StageState, partitions: usize) -> Vec<u64> {
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
    sizes
}

/// The skewed partitions of the probe side of the stage's join (none without such a join).
fn skewed_partitions(
    job: &Job,
    stage: &StageState,
    partitions: usize,
    options: &VolleyOptions,
) -> (u32, Vec<Skewed>) {
    let plan = Arc::clone(&stage.plan.plan) as Arc<dyn ExecutionPlan>;
    // A split task reads a range of the probe stage's map outputs through every reader of that
    // stage: only the join's own reader may read it (a shared stage can be read twice).
    let joined = shuffled_join(&plan).filter(|j| readers_of(&plan, j.probe) == 1);
    let Some((probe, per_bucket)) = joined.and_then(|j| {
        job.stages
            .get(&j.probe)
            .map(|p| (j.probe, bucket_bytes(p, partitions)))
    }) else {
        return (0, Vec::new());
    };
    let advisory = options.adaptive_partition_bytes.max(1);
    let probe_sizes: Vec<u64> = per_bucket.iter().map(|m| m.iter().sum()).collect();
    let mut sorted = probe_sizes.clone();
    sorted.sort_unstable();
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
    let mut skewed = Vec::new();
    for (bucket, (size, maps)) in probe_sizes.iter().zip(&per_bucket).enumerate() {
        if *size >= options.adaptive_skew_min_bytes
            && *size > median.max(1).saturating_mul(options.adaptive_skew_factor)
            && maps.len() > 1
        {
            let pieces = usize::try_from(size.div_ceil(advisory)).unwrap_or(usize::MAX);
            let ranges = split_maps(maps, pieces.max(2));
            if ranges.len() > 1 {
                skewed.push(Skewed {
                    bucket,
                    maps: ranges,
                    size: *size,
                    median,
                });
            }
        }
    }
    (probe, skewed)
}

/// Tasks of a stage regrouped from its inputs' real sizes: small partitions coalesced, skewed
/// ones split. None when nothing changes.
pub(crate) fn regroup(
    job: &Job,
    stage_id: u32,
    slots: usize,
    options: &VolleyOptions,
) -> Option<(Vec<TaskRead>, Vec<Decision>)> {
    let stage = job.stages.get(&stage_id)?;
    let partitions = stage.tasks.len();
    let mut readers = 0;
    let eligible = options.adaptive
        && partitions > 1
        && coalescible(stage.plan.plan.input(), partitions, &mut readers)
        && readers > 0;
    if !eligible {
        return None;
    }
    let sizes = input_sizes(job, stage, partitions);
    let (probe_stage, skewed) = skewed_partitions(job, stage, partitions, options);
    let total: u64 = sizes.iter().sum();
    let target = options
        .adaptive_partition_bytes
        .max(1)
        .min(total.div_ceil(slots.max(1) as u64))
        .max(MIN_PARTITION_BYTES);
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
    for skew in &skewed {
        flush(start, skew.bucket, &mut reads);
        notes.push(Decision::SplitSkew {
            bucket: skew.bucket,
            tasks: skew.maps.len(),
            size: skew.size,
            median: skew.median,
        });
        for range in &skew.maps {
            reads.push(TaskRead {
                partitions: skew.bucket..skew.bucket + 1,
                maps: Some((probe_stage, range.clone())),
            });
        }
        start = skew.bucket + 1;
    }
    flush(start, partitions, &mut reads);
    if plain_groups < partitions - skewed.len() {
        notes.insert(
            0,
            Decision::Coalesced {
                partitions: partitions - skewed.len(),
                tasks: plain_groups,
                total,
                target,
            },
        );
    }
    (!notes.is_empty()).then_some((reads, notes))
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
