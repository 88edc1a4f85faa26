//! Fusing a one-task stage into the stage that reads it. A stage about to launch that runs as
//! one task, whose only consumer would be ready as soon as it is done and can run as one task
//! too, and whose inputs together with the consumer's other inputs hold at most
//! `volley.adaptive_fuse_bytes` of shuffle output, does not run on its own: its plan replaces
//! the consumer's reader of it and the consumer runs both in one task. Small queries save a
//! task launch, an output write and read, a status report and a stage transition per fused
//! stage (a final aggregate, the sort after it and the result stage become one task).

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::Result;
use datafusion::physical_plan::ExecutionPlan;
use volley_core::config::VolleyOptions;
use volley_core::plan::{CommitFilesExec, ShuffleReaderExec, TaskWriteExec};

use crate::adaptive::regroup::coalescible;
use crate::graph::StageKind;
use crate::graph::joins::readers_of;
use crate::job::stage::{StagePhase, StageState};
use crate::job::{Decision, Job, StageEdit, TaskRead};

/// Every bucket of every hash-partitioned input, read by the fused stage's one task.
const ALL_BUCKETS: std::ops::Range<usize> = 0..u32::MAX as usize;

/// True when `read` is one task reading every bucket of a stage of `partitions` partitions.
fn reads_everything(read: &TaskRead, partitions: usize) -> bool {
    read.maps.is_none() && read.partitions.start == 0 && read.partitions.end >= partitions
}

/// True when the stage runs as one task reading all its input (`reads`: its regrouping, as
/// about to be applied, or None to take the stage's own).
fn one_task(stage: &StageState, reads: Option<&[TaskRead]>) -> bool {
    match reads.or(stage.reads.as_deref()) {
        Some([read]) => reads_everything(read, stage.plan.partitions),
        Some(_) => false,
        None => stage.plan.partitions == 1 && stage.tasks.len() == 1,
    }
}

/// True when the plan writes table files or commits them (a commit reads the writing tasks'
/// rows from a stage of their own, so that its retry does not write again).
fn writes(plan: &Arc<dyn ExecutionPlan>) -> bool {
    plan.exists(|node| Ok(node.is::<TaskWriteExec>() || node.is::<CommitFilesExec>()))
        .unwrap_or(false)
}

/// True when some adaptive decision still waits on stage `stage_id` (as a build or probe side,
/// or a stage waiting for it).
fn awaited(job: &Job, stage_id: u32) -> bool {
    job.stages.values().any(|s| {
        s.wait_for.contains(&stage_id)
            || s.join_switch
                .iter()
                .any(|j| j.build == stage_id || j.probe == stage_id)
    })
}

/// The only stage reading `stage_id`'s output, when it can take over its plan: not started,
/// no pending adaptive decision, every other input done, able to run as one task.
fn fusable_consumer(job: &Job, stage_id: u32) -> Option<&StageState> {
    let mut consumers = job
        .stages
        .values()
        .filter(|s| s.phase != StagePhase::Skipped && s.plan.inputs.contains(&stage_id));
    let consumer = consumers.next()?;
    if consumers.next().is_some()
        || consumer.phase != StagePhase::Waiting
        || !consumer.join_switch.is_empty()
        || consumer.reads.is_some()
    {
        return None;
    }
    let plan = Arc::clone(&consumer.plan.plan) as Arc<dyn ExecutionPlan>;
    let others_done = consumer
        .plan
        .inputs
        .iter()
        .chain(&consumer.wait_for)
        .filter(|input| **input != stage_id)
        .all(|input| job.stages.get(input).is_some_and(StageState::is_complete));
    let mut readers = 0;
    let single = consumer.plan.partitions == 1
        || (coalescible(
            consumer.plan.plan.input(),
            consumer.tasks.len(),
            &mut readers,
        ) && readers > 0);
    (others_done && single && readers_of(&plan, stage_id) == 1 && !writes(&plan))
        .then_some(consumer)
}

/// Edits fusing stage `stage_id` (about to launch; `reads`: its regrouping) into its consumer,
/// or none when it runs on its own.
pub fn into_consumer(
    job: &Job,
    stage_id: u32,
    reads: Option<&[TaskRead]>,
    options: &VolleyOptions,
) -> Result<Vec<StageEdit>> {
    let Some(stage) = job.stages.get(&stage_id) else {
        return Ok(Vec::new());
    };
    let body = Arc::clone(stage.plan.plan.input());
    let fusable = options.adaptive_fuse_bytes > 0
        && stage.plan.kind != StageKind::Result
        && stage.phase == StagePhase::Waiting
        && !stage.plan.inputs.is_empty()
        && stage.join_switch.is_empty()
        && !options.hooks_stage(stage_id)
        && one_task(stage, reads)
        && !awaited(job, stage_id)
        && !writes(&body);
    let Some(consumer) = fusable.then(|| fusable_consumer(job, stage_id)).flatten() else {
        return Ok(Vec::new());
    };
    let mut inputs = stage.plan.inputs.clone();
    for input in &consumer.plan.inputs {
        if *input != stage_id && !inputs.contains(input) {
            inputs.push(*input);
        }
    }
    let bytes: u64 = inputs
        .iter()
        .filter_map(|i| job.stages.get(i))
        .map(|s| s.output_size().1)
        .sum();
    if bytes > options.adaptive_fuse_bytes {
        return Ok(Vec::new());
    }
    let by = consumer.plan.stage_id;
    let input = Arc::clone(consumer.plan.plan.input())
        .transform_up(|node| {
            Ok(match node.downcast_ref::<ShuffleReaderExec>() {
                Some(reader) if reader.stage_id() == stage_id => {
                    Transformed::yes(Arc::clone(&body))
                }
                _ => Transformed::no(node),
            })
        })?
        .data;
    Ok(vec![
        StageEdit::Replan {
            stage: by,
            input,
            drop_input: Some(stage_id),
            add_inputs: stage.plan.inputs.clone(),
            partitions: Some(1),
        },
        StageEdit::Regroup(
            by,
            vec![TaskRead {
                partitions: ALL_BUCKETS,
                maps: None,
            }],
        ),
        StageEdit::Skip(stage_id),
        StageEdit::Note(stage_id, Decision::FusedInto { by }),
        StageEdit::Note(
            by,
            Decision::Fused {
                stage: stage_id,
                bytes,
            },
        ),
    ])
}
