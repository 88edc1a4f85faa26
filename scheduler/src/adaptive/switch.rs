//! Decisions taken when a build side is done: switch a partitioned join to a broadcast join,
//! filter a probe stage by the build side's keys (semi-join reduction), or keep the plan.

use std::sync::Arc;

use datafusion::error::Result;
use datafusion::physical_plan::{ExecutionPlan, ExecutionPlanProperties};
use volley_core::config::VolleyOptions;

use crate::adaptive::rewrite::{broadcast_rewrite, probe_filter_rewrite};
use crate::graph::ShuffledJoin;
use crate::job::edit::Size;
use crate::job::stage::StageState;
use crate::job::{Decision, Job, StageEdit};

/// The pending switches stage `done` was the build side of: (join stage, join).
pub fn switch_candidates(job: &Job, done: u32) -> Vec<(u32, ShuffledJoin)> {
    job.stages
        .values()
        .flat_map(|s| s.join_switch.iter().map(|j| (s.plan.stage_id, *j)))
        .filter(|(_, j)| j.build == done)
        .collect()
}

/// Decide the switch of `join` in stage `join_stage`, whose build side just completed.
pub fn decide_switch(job: &Job, join_stage: u32, join: ShuffledJoin) -> Result<Vec<StageEdit>> {
    let options = VolleyOptions::from_pairs(&job.settings);
    let Some(build) = job.stages.get(&join.build) else {
        return Ok(Vec::new());
    };
    let (rows, bytes) = build.output_size();
    let size = Size { rows, bytes };
    let probe_started = job
        .stages
        .get(&join.probe)
        .is_none_or(|p| p.started().is_some());
    let small = bytes <= options.adaptive_broadcast_bytes;
    let mut edits = vec![StageEdit::Decided(join_stage, join)];
    if join.probe_filter {
        edits.extend(filter_probe(
            job,
            join_stage,
            join,
            small,
            probe_started,
            size,
        )?);
    } else if !small || probe_started {
        let decision = Decision::KeptJoin {
            build: join.build,
            too_big: !small,
            size,
        };
        edits.push(StageEdit::StopWaiting {
            stage: join.probe,
            on: join.build,
        });
        edits.push(StageEdit::Note(join_stage, decision));
    } else if let (Some(stage), Some(probe)) =
        (job.stages.get(&join_stage), job.stages.get(&join.probe))
    {
        edits.extend(switch_to_broadcast(stage, probe, join, size)?);
    }
    Ok(edits)
}

/// The join of `stage` becomes a broadcast join reading `probe`'s input directly; `probe`
/// never runs.
fn switch_to_broadcast(
    stage: &StageState,
    probe: &StageState,
    join: ShuffledJoin,
    size: Size,
) -> Result<Vec<StageEdit>> {
    let join_stage = stage.plan.stage_id;
    let probe_input = Arc::clone(probe.plan.plan.input());
    let input = broadcast_rewrite(stage.plan.plan.input(), join.probe, &probe_input)?;
    let partitions = input.output_partitioning().partition_count();
    Ok(vec![
        StageEdit::Replan {
            stage: join_stage,
            input,
            drop_input: Some(join.probe),
            add_inputs: probe.plan.inputs.clone(),
            partitions: Some(partitions),
        },
        StageEdit::Note(
            join_stage,
            Decision::Broadcast {
                build: join.build,
                probe: join.probe,
                size,
            },
        ),
        // The probe stage's own pending switch now concerns the join stage, which runs its
        // plan (the walk to a partitioned join passes through broadcast joins' probe sides).
        StageEdit::Inherit {
            from: join.probe,
            to: join_stage,
        },
        StageEdit::Skip(join.probe),
        StageEdit::Note(join.probe, Decision::Skipped { by: join_stage }),
    ])
}

/// The keys stage of a semi-join reduction in `join_stage` is done: if it is `small` and the
/// filtered stage has not `started`, that stage keeps only rows whose keys are there (it now
/// reads the keys stage whole); it no longer waits either way.
fn filter_probe(
    job: &Job,
    join_stage: u32,
    join: ShuffledJoin,
    small: bool,
    started: bool,
    size: Size,
) -> Result<Vec<StageEdit>> {
    let rewritten = match (
        small && !started,
        job.stages.get(&join_stage),
        job.stages.get(&join.probe),
    ) {
        (true, Some(stage), Some(probe)) => {
            let plan = Arc::clone(&stage.plan.plan) as Arc<dyn ExecutionPlan>;
            Some(probe_filter_rewrite(&plan, join, probe.plan.plan.input())?)
        }
        _ => None,
    };
    let (probe, build) = (join.probe, join.build);
    let decision = if rewritten.is_some() {
        Decision::Filtered { probe, build, size }
    } else {
        Decision::KeptUnfiltered {
            probe,
            build,
            started,
            size,
        }
    };
    let mut edits = vec![
        StageEdit::Note(join_stage, decision),
        StageEdit::StopWaiting {
            stage: join.probe,
            on: join.build,
        },
    ];
    if let Some(input) = rewritten {
        edits.push(StageEdit::Replan {
            stage: join.probe,
            input,
            drop_input: None,
            add_inputs: vec![join.build],
            partitions: None,
        });
        edits.push(StageEdit::Note(
            join.probe,
            Decision::KeepsKeysOf { build, size },
        ));
    }
    Ok(edits)
}
