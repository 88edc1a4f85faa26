//! Starting a stage that waits for a semi-join reduction's keys while task slots sit idle.
//!
//! A semi-join reduction makes the stage it filters wait until the keys stage is done: less is
//! shuffled, but the two stages run one after the other. When the keys stage runs as fewer tasks
//! than the cluster has slots (a one-task grouped scan, TPC-DS q32's date and item filters over
//! `catalog_sales`), the other slots would sit idle through that wait while the filtered
//! stage's scan could run. When the filtered stage also aggregates before its shuffle (its
//! writer's input is a partial aggregate: at most one row per group and task leaves it, so the
//! filter would save little shuffle; q32 at SF1 shuffles 8,914 rows unfiltered) of rows its own
//! filters or joins already cut down (q32: a 90-day `date_dim` join), and the keys
//! stage scans at least as many file bytes as it does (waiting would cost about as long as
//! the filtered stage itself runs), it starts at once, unfiltered (its plan is the one
//! planned; the join still drops the rows the filter would have), and the reduction, decided
//! when the keys are done, finds it started and keeps it so
//! ([`crate::job::Decision::KeptUnfiltered`]). The others keep waiting: unfiltered, TPC-DS q37
//! and q82 (no aggregate) shuffled 1.4M and 2.9M rows where the keys keep a handful and ran
//! twice as long, and TPC-H q17 (a whole table aggregated) aggregated all 6M `lineitem` rows
//! instead of those of 204 parts (0.185 -> 0.28 s). `volley.adaptive_idle_start = false` keeps
//! every such stage waiting.

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use volley_core::config::VolleyOptions;

use crate::graph::inline::file_bytes;
use crate::graph::joins::restricts_rows;
use crate::job::stage::StageState;
use crate::job::{Decision, Job, StageEdit};

/// True when stage `probe` waits for `build` only as the filtered side of a semi-join
/// reduction (not as the probe side of a broadcast switch, whose wait saves the whole stage).
fn reduction_wait(job: &Job, probe: u32, build: u32) -> bool {
    let mut joins = job
        .stages
        .values()
        .flat_map(|s| s.join_switch.iter())
        .filter(|j| j.probe == probe && j.build == build)
        .peekable();
    joins.peek().is_some() && joins.all(|j| j.probe_filter)
}

/// True when the stage's output is a partial aggregate (one row per group and task) of rows
/// its own filters or joins already cut down (not of a whole table).
fn aggregates_before_shuffle(stage: &StageState) -> bool {
    let input = stage.plan.plan.input();
    input
        .downcast_ref::<AggregateExec>()
        .is_some_and(|a| *a.mode() == AggregateMode::Partial)
        && restricts_rows(input)
}

/// File bytes the stage's scans read (whole files, or the ranges of them the scans read).
fn scanned_bytes(stage: &StageState) -> u64 {
    let mut bytes = 0u64;
    let plan = std::sync::Arc::clone(&stage.plan.plan) as std::sync::Arc<dyn ExecutionPlan>;
    let _ = plan.apply(|node| {
        if let Some(files) = node
            .downcast_ref::<DataSourceExec>()
            .and_then(|scan| scan.data_source().downcast_ref::<FileScanConfig>())
        {
            bytes = bytes.saturating_add(file_bytes(files));
        }
        Ok(TreeNodeRecursion::Continue)
    });
    bytes
}

/// True when `stage` could launch now but for its waits, each one on a semi-join reduction's
/// keys stage that is running and scans at least as much as it does, and its output is
/// aggregated.
fn waits_only_for_running_keys(job: &Job, stage: &StageState) -> bool {
    let id = stage.plan.stage_id;
    stage.phase == crate::job::StagePhase::Waiting
        && !stage.wait_for.is_empty()
        && aggregates_before_shuffle(stage)
        && stage
            .plan
            .inputs
            .iter()
            .all(|input| job.stages.get(input).is_some_and(StageState::is_complete))
        && stage.wait_for.iter().all(|build| {
            reduction_wait(job, id, *build)
                && job.stages.get(build).is_some_and(|b| {
                    b.started().is_some()
                        && !b.is_complete()
                        && scanned_bytes(b) >= scanned_bytes(stage)
                })
        })
}

/// Edits starting, unfiltered, up to `slots` stages of `job` that only wait for a running keys
/// stage, and how many stages they start (called when `slots` task slots are free after every
/// ready task was placed: each stage started gets at least one of them, so none is left
/// without its wait and without a slot).
pub fn start_waiting_probes(job: &Job, slots: usize) -> (Vec<StageEdit>, usize) {
    let candidates: Vec<&StageState> = job
        .stages
        .values()
        .filter(|s| waits_only_for_running_keys(job, s))
        .take(slots)
        .collect();
    if candidates.is_empty() || !VolleyOptions::from_pairs(&job.settings).adaptive_idle_start {
        return (Vec::new(), 0);
    }
    let started = candidates.len();
    let mut edits = Vec::new();
    for stage in candidates {
        let id = stage.plan.stage_id;
        for build in &stage.wait_for {
            edits.push(StageEdit::StopWaiting {
                stage: id,
                on: *build,
            });
            edits.push(StageEdit::Note(id, Decision::StartedIdle { build: *build }));
        }
    }
    (edits, started)
}
