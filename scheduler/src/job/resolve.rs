//! Plan resolution: a stage's shuffle readers pointed at the files its producers wrote (as the
//! stage's adaptive regrouping says each task reads them), encoded once for all its tasks (or
//! per task, with only the task's own files, for scans of many files).

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::{DataFusionError, Result};
use datafusion::physical_plan::{ExecutionPlan, Partitioning};
use volley_core::plan::ShuffleReaderExec;
use volley_core::shuffle::PartitionLocation;

use crate::graph::StageKind;
use crate::graph::trim::ResolvedPlan;
use crate::job::Job;
use crate::job::edit::TaskRead;
use crate::job::stage::StageState;

/// True when task read `read` takes `output`, written by map task `map` of stage `stage`.
pub fn reads_output(read: &TaskRead, stage: u32, map: usize, output: &PartitionLocation) -> bool {
    read.partitions
        .contains(&(output.output_partition as usize))
        && match &read.maps {
            Some((probe, maps)) if *probe == stage => maps.contains(&map),
            _ => true,
        }
}

/// `reader` with the locations of its producer's files.
fn resolve_reader(
    reader: &ShuffleReaderExec,
    stages: &BTreeMap<u32, StageState>,
    reads: Option<&Vec<TaskRead>>,
) -> ShuffleReaderExec {
    let producer_tasks = stages
        .get(&reader.stage_id())
        .map(|p| p.tasks.as_slice())
        .unwrap_or(&[]);
    let outputs = producer_tasks
        .iter()
        .enumerate()
        .flat_map(|(map, task)| task.outputs().iter().map(move |o| (map, o)));
    let hash = reader.hash_partitioned();
    let (partitioning, locations) = match reads {
        Some(reads) if hash => {
            let mut locations = vec![Vec::new(); reads.len()];
            for (map, output) in outputs {
                for (slot, read) in locations.iter_mut().zip(reads) {
                    if reads_output(read, reader.stage_id(), map, output) {
                        slot.push(output.clone());
                    }
                }
            }
            let partitioning = match reader.partitioning() {
                Partitioning::Hash(exprs, _) => Partitioning::Hash(exprs.clone(), reads.len()),
                _ => Partitioning::UnknownPartitioning(reads.len()),
            };
            (partitioning, locations)
        }
        _ => {
            // Passthrough readers read one file per map task, however many tasks the producer
            // ended up with.
            let count = if hash {
                reader.partitioning().partition_count()
            } else {
                producer_tasks.len()
            };
            let mut locations = vec![Vec::new(); count];
            for (map, output) in outputs {
                let target = if hash {
                    output.output_partition as usize
                } else {
                    map
                };
                if let Some(slot) = locations.get_mut(target) {
                    slot.push(output.clone());
                }
            }
            let partitioning = if hash {
                reader.partitioning().clone()
            } else {
                Partitioning::UnknownPartitioning(count)
            };
            (partitioning, locations)
        }
    };
    ShuffleReaderExec::with_locations(
        reader.stage_id(),
        reader.schema(),
        partitioning,
        hash,
        locations,
    )
}

impl Job {
    /// The stage's plan with every reader pointed at its producer's files, encoded (and kept
    /// until an input changes).
    pub fn resolved_plan(&mut self, stage_id: u32) -> Result<ResolvedPlan> {
        let stage = self
            .stages
            .get(&stage_id)
            .ok_or_else(|| DataFusionError::Internal(format!("no stage {stage_id}")))?;
        if let Some(plan) = &stage.resolved {
            return Ok(plan.clone());
        }
        let plan = match &stage.template {
            Some(template) => {
                let reads = stage.reads.as_ref();
                let plan = template.resolve(|r| resolve_reader(r, &self.stages, reads))?;
                #[cfg(debug_assertions)]
                if plan.bytes != self.resolve_whole(stage)?.bytes {
                    return Err(DataFusionError::Internal(format!(
                        "stage {stage_id}: its plan encoded from its template differs from the \
                         plan encoded whole"
                    )));
                }
                plan
            }
            None => self.resolve_whole(stage)?,
        };
        if let Some(stage) = self.stages.get_mut(&stage_id) {
            stage.resolved = Some(plan.clone());
        }
        Ok(plan)
    }

    /// `stage`'s plan with every reader pointed at its producer's files, encoded whole.
    fn resolve_whole(&self, stage: &StageState) -> Result<ResolvedPlan> {
        let plan: Arc<dyn ExecutionPlan> = Arc::clone(&stage.plan.plan) as Arc<dyn ExecutionPlan>;
        let reads = stage.reads.as_ref();
        let resolved = plan
            .transform_up(|node| {
                let Some(reader) = node.downcast_ref::<ShuffleReaderExec>() else {
                    return Ok(Transformed::no(node));
                };
                let resolved = resolve_reader(reader, &self.stages, reads);
                Ok(Transformed::yes(
                    Arc::new(resolved) as Arc<dyn ExecutionPlan>
                ))
            })?
            .data;
        ResolvedPlan::new(resolved)
    }

    /// Shuffle bytes partition `partition` of a stage reads from its input stages.
    pub fn input_bytes(&self, stage_id: u32, partition: u32) -> u64 {
        let Some(stage) = self.stages.get(&stage_id) else {
            return 0;
        };
        let read = stage.reads.as_ref().and_then(|r| r.get(partition as usize));
        let mut total = 0;
        for input in stage
            .plan
            .inputs
            .iter()
            .filter_map(|id| self.stages.get(id))
        {
            let per_partition = input.plan.kind == StageKind::Shuffle;
            let input_id = input.plan.stage_id;
            for (map, task) in input.tasks.iter().enumerate() {
                total += task
                    .outputs()
                    .iter()
                    .filter(|l| match read {
                        _ if !per_partition => true,
                        Some(read) => reads_output(read, input_id, map, l),
                        None => l.output_partition == partition,
                    })
                    .map(|l| l.num_bytes)
                    .sum::<u64>();
            }
        }
        total
    }
}
