//! L5: read-only views of the scheduler's state for the status pages and the JSON API. These
//! types are the API's contract; they are built from, but independent of, the internal state.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::physical_plan::{ExecutionPlan, displayable};
use serde::{Deserialize, Serialize};

use crate::cluster::ClusterState;
use crate::cluster::executors::ExecutorInfo;
use crate::fmt::{epoch_ms, ms};
use crate::graph::StageKind;
use crate::job::stage::StageState;
use crate::job::{Job, JobState, TaskState};

/// A job in the jobs list (also what the state store keeps of a finished job).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobSummary {
    /// Job id.
    pub id: String,
    /// SQL text (or the DataFrame plan's description).
    pub sql: String,
    /// queued, running, succeeded, failed, cancelled, or cached (answered from the result
    /// cache: no task ran).
    pub state: String,
    /// Error text of a failed job.
    pub error: Option<String>,
    /// Submission time, milliseconds since the Unix epoch.
    pub submitted_at_ms: u64,
    /// Run time so far (running) or in all (ended).
    pub duration_ms: u64,
    /// Stages done.
    pub stages_done: usize,
    /// Stages in all.
    pub stages_total: usize,
    /// Tasks done.
    pub tasks_done: usize,
    /// Tasks in all.
    pub tasks_total: usize,
    /// Rows of the result (once done).
    pub rows_out: u64,
    /// A statement that changes the session (DDL, SET): hidden from the list by default.
    #[serde(default)]
    pub ddl: bool,
    /// Age of the stored answer a cached job was given, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_age_ms: Option<u64>,
}

/// One operator of a stage plan with its metrics summed over the stage's tasks.
#[derive(Debug, Clone, Serialize)]
pub struct OperatorView {
    /// Depth in the plan tree (0 = root).
    pub depth: usize,
    /// DataFusion's one-line description.
    pub operator: String,
    /// Metric name -> value (times in nanoseconds).
    pub metrics: BTreeMap<String, u64>,
}

/// A stage of a job.
#[derive(Debug, Clone, Serialize)]
pub struct StageSummary {
    /// Stage id.
    pub id: u32,
    /// shuffle, merge, broadcast or result.
    pub kind: String,
    /// pending, running, succeeded or failed.
    pub state: String,
    /// Input stages.
    pub inputs: Vec<u32>,
    /// Tasks (= partitions).
    pub partitions: usize,
    /// Tasks done.
    pub tasks_done: usize,
    /// Rows read: input stages' output, or rows scanned by a leaf stage.
    pub rows_in: u64,
    /// Bytes read from input stages.
    pub bytes_in: u64,
    /// Rows written.
    pub rows_out: u64,
    /// Bytes written (Arrow IPC, compressed).
    pub bytes_out: u64,
    /// Shuffle bytes written for the next stage (0 for the result stage).
    pub shuffle_bytes: u64,
    /// Bytes spilled to disk by its operators.
    pub spilled_bytes: u64,
    /// Time from first launch to last task done (or now).
    pub duration_ms: u64,
    /// Times it ran (more than 1 after lost shuffle output).
    pub attempts: u32,
    /// It completed before a scheduler restart and was taken over, not run again.
    pub resumed: bool,
    /// The stage plan with per-operator metrics once tasks finished.
    pub plan: Vec<OperatorView>,
    /// Adaptive execution decisions (broadcast switch, coalescing, skew split), in order.
    pub adaptive: Vec<String>,
}

/// A job with its stages.
#[derive(Debug, Clone, Serialize)]
pub struct JobDetail {
    /// The job.
    #[serde(flatten)]
    pub job: JobSummary,
    /// Its stages in id order.
    pub stages: Vec<StageSummary>,
}

/// One task of a stage.
#[derive(Debug, Clone, Serialize)]
pub struct TaskView {
    /// Partition.
    pub partition: usize,
    /// Current (or last) attempt.
    pub attempt: u32,
    /// Executor of that attempt.
    pub executor: Option<String>,
    /// pending, running, succeeded or failed.
    pub state: String,
    /// Start of that attempt, milliseconds since the Unix epoch.
    pub started_at_ms: Option<u64>,
    /// Duration of the successful attempt, or of the running one so far.
    pub duration_ms: Option<u64>,
    /// Rows written.
    pub rows: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Bytes spilled.
    pub spilled_bytes: u64,
    /// Last error, if an attempt failed.
    pub error: Option<String>,
}

/// Task duration statistics of a stage.
#[derive(Debug, Clone, Serialize)]
pub struct DurationSummary {
    /// Shortest finished task.
    pub min_ms: u64,
    /// Median finished task.
    pub median_ms: u64,
    /// Longest finished task.
    pub max_ms: u64,
}

/// A stage with its tasks.
#[derive(Debug, Clone, Serialize)]
pub struct StageDetail {
    /// Job id.
    pub job_id: String,
    /// The stage.
    #[serde(flatten)]
    pub stage: StageSummary,
    /// Its tasks by partition.
    pub tasks: Vec<TaskView>,
    /// Durations of finished tasks.
    pub durations: Option<DurationSummary>,
    /// The slowest task took over 3x the median.
    pub skewed: bool,
}

/// An executor.
#[derive(Debug, Clone, Serialize)]
pub struct ExecutorView {
    /// Id.
    pub id: String,
    /// host:port of its gRPC and Flight server.
    pub address: String,
    /// Task slots.
    pub slots: u32,
    /// Tasks running on it.
    pub running_tasks: u32,
    /// Tasks completed.
    pub completed_tasks: u64,
    /// Tasks failed.
    pub failed_tasks: u64,
    /// Time since its last heartbeat.
    pub last_heartbeat_age_ms: u64,
    /// Shuffle bytes it holds for unreleased jobs (cached tables included).
    pub shuffle_bytes_held: u64,
    /// Bytes of cached tables' partitions it holds (`CACHE TABLE`).
    pub cached_bytes: u64,
    /// alive, draining, circuit open or lost.
    pub state: String,
}

/// Summary of one job.
pub fn job_summary(job: &Job) -> JobSummary {
    let (stages_done, stages_total, tasks_done, tasks_total) = job.progress();
    let end = job.finished.unwrap_or_else(Instant::now);
    JobSummary {
        id: job.id.clone(),
        sql: job.sql.clone(),
        state: match (&job.state, job.cached) {
            (JobState::Succeeded, Some(_)) => "cached".to_string(),
            (state, _) => state.as_str().to_string(),
        },
        error: match &job.state {
            JobState::Failed(message) => Some(message.clone()),
            _ => None,
        },
        submitted_at_ms: epoch_ms(job.submitted_at),
        duration_ms: ms(end.saturating_duration_since(job.submitted)),
        stages_done,
        stages_total,
        tasks_done,
        tasks_total,
        rows_out: match (&job.state, job.cached) {
            (JobState::Succeeded, Some(hit)) => hit.rows,
            (JobState::Succeeded, None) => job.rows_out(),
            _ => 0,
        },
        ddl: job.ddl,
        cached_age_ms: job.cached.map(|hit| ms(hit.age)),
    }
}

/// All jobs, newest first: those in `state`, then the finished ones of `history` (oldest
/// first, from the state store) it no longer holds; DDL and SET only with `ddl`.
pub fn jobs(state: &ClusterState, history: &[JobSummary], ddl: bool) -> Vec<JobSummary> {
    let live: Vec<JobSummary> = state
        .job_order()
        .iter()
        .rev()
        .filter_map(|id| state.job(id))
        .map(job_summary)
        .collect();
    let older = history
        .iter()
        .rev()
        .filter(|h| state.job(&h.id).is_none())
        .cloned();
    let mut all: Vec<JobSummary> = live.into_iter().chain(older).collect();
    all.retain(|j| ddl || !j.ddl);
    all
}

fn plan_view(
    plan: &Arc<dyn ExecutionPlan>,
    metrics: &[BTreeMap<String, u64>],
) -> Vec<OperatorView> {
    fn walk(
        node: &Arc<dyn ExecutionPlan>,
        depth: usize,
        metrics: &[BTreeMap<String, u64>],
        out: &mut Vec<OperatorView>,
    ) {
        let index = out.len();
        out.push(OperatorView {
            depth,
            operator: displayable(node.as_ref())
                .one_line()
                .to_string()
                .trim()
                .to_string(),
            metrics: metrics.get(index).cloned().unwrap_or_default(),
        });
        for child in node.children() {
            walk(child, depth + 1, metrics, out);
        }
    }
    let mut out = Vec::new();
    walk(plan, 0, metrics, &mut out);
    out
}

/// Rows scanned by the stage's leaf operators (file scans), from their metrics.
fn leaf_rows(plan: &Arc<dyn ExecutionPlan>, metrics: &[BTreeMap<String, u64>]) -> u64 {
    let mut index = 0;
    let mut rows = 0;
    let _ = plan.apply(|node| {
        if node.children().is_empty() {
            rows += metrics
                .get(index)
                .and_then(|m| m.get("output_rows"))
                .copied()
                .unwrap_or(0);
        }
        index += 1;
        Ok(TreeNodeRecursion::Continue)
    });
    rows
}

/// Summary of one stage of `job`.
pub fn stage_summary(job: &Job, stage: &StageState) -> StageSummary {
    let (rows_out, bytes_out) = stage.output_size();
    let (mut rows_in, bytes_in) = stage
        .plan
        .inputs
        .iter()
        .filter_map(|id| job.stages.get(id))
        .map(StageState::output_size)
        .fold((0, 0), |(r, b), (r2, b2)| (r + r2, b + b2));
    let plan = Arc::clone(&stage.plan.plan) as Arc<dyn ExecutionPlan>;
    if stage.plan.inputs.is_empty() {
        rows_in = leaf_rows(&plan, &stage.operator_metrics);
    }
    let tasks_done = stage.done_count();
    let state = stage.status(matches!(job.state, JobState::Failed(_)));
    let duration = match (stage.started(), stage.finished()) {
        (Some(start), Some(end)) => end.saturating_duration_since(start),
        (Some(start), None) if !job.state.is_final() => start.elapsed(),
        (Some(start), None) => job
            .finished
            .map_or(Duration::ZERO, |end| end.saturating_duration_since(start)),
        _ => Duration::ZERO,
    };
    StageSummary {
        id: stage.plan.stage_id,
        kind: stage.plan.kind.as_str().to_string(),
        state: state.as_str().to_string(),
        inputs: stage.plan.inputs.clone(),
        partitions: stage.tasks.len(),
        tasks_done,
        rows_in,
        bytes_in,
        rows_out,
        bytes_out,
        shuffle_bytes: if stage.plan.kind == StageKind::Result {
            0
        } else {
            bytes_out
        },
        spilled_bytes: stage.tasks.iter().map(|t| t.spilled_bytes).sum(),
        duration_ms: ms(duration),
        attempts: stage.attempts,
        resumed: stage.resumed,
        plan: plan_view(&plan, &stage.operator_metrics),
        adaptive: stage.adaptive.iter().map(|d| d.to_string()).collect(),
    }
}

/// A job and its stages.
pub fn job_detail(state: &ClusterState, job_id: &str) -> Option<JobDetail> {
    let job = state.job(job_id)?;
    Some(JobDetail {
        job: job_summary(job),
        stages: job
            .stages
            .values()
            .map(|stage| stage_summary(job, stage))
            .collect(),
    })
}

/// A stage and its tasks.
pub fn stage_detail(state: &ClusterState, job_id: &str, stage_id: u32) -> Option<StageDetail> {
    let job = state.job(job_id)?;
    let stage = job.stages.get(&stage_id)?;
    let tasks: Vec<TaskView> = stage
        .tasks
        .iter()
        .enumerate()
        .map(|(partition, t)| {
            let (state, duration, rows, bytes) = match &t.state {
                TaskState::Pending if t.last_error.is_some() && job.state.is_final() => {
                    ("failed", None, 0, 0)
                }
                TaskState::Pending => ("pending", None, 0, 0),
                TaskState::Running { started, .. } => {
                    ("running", Some(ms(started.elapsed())), 0, 0)
                }
                TaskState::Succeeded {
                    outputs, elapsed, ..
                } => (
                    "succeeded",
                    Some(ms(*elapsed)),
                    outputs.iter().map(|l| l.num_rows).sum(),
                    outputs.iter().map(|l| l.num_bytes).sum(),
                ),
            };
            TaskView {
                partition,
                attempt: t.attempt,
                executor: t.last_executor.clone(),
                state: state.to_string(),
                started_at_ms: t.started_at.map(epoch_ms),
                duration_ms: duration,
                rows,
                bytes,
                spilled_bytes: t.spilled_bytes,
                error: t.last_error.clone(),
            }
        })
        .collect();
    let mut finished: Vec<u64> = tasks
        .iter()
        .filter(|t| t.state == "succeeded")
        .filter_map(|t| t.duration_ms)
        .collect();
    finished.sort_unstable();
    let durations = (!finished.is_empty()).then(|| DurationSummary {
        min_ms: finished[0],
        median_ms: finished[finished.len() / 2],
        max_ms: finished[finished.len() - 1],
    });
    let skewed = durations
        .as_ref()
        .is_some_and(|d| finished.len() > 1 && d.max_ms > 3 * d.median_ms.max(1));
    Some(StageDetail {
        job_id: job_id.to_string(),
        stage: stage_summary(job, stage),
        tasks,
        durations,
        skewed,
    })
}

fn executor_view(state: &ClusterState, e: &ExecutorInfo) -> ExecutorView {
    let on_e = |tasks: &[crate::job::TaskInfo]| -> u64 {
        tasks
            .iter()
            .filter_map(|t| match &t.state {
                TaskState::Succeeded {
                    executor_id,
                    outputs,
                    ..
                } if *executor_id == e.id => Some(outputs.iter().map(|l| l.num_bytes).sum::<u64>()),
                _ => None,
            })
            .sum()
    };
    let unreleased = || state.jobs().values().filter(|j| !j.released);
    let held: u64 = unreleased()
        .flat_map(|j| j.stages.values())
        .map(|s| on_e(&s.tasks))
        .sum();
    let cached: u64 = unreleased()
        .filter(|j| j.pinned && j.state == JobState::Succeeded)
        .filter_map(|j| j.stages.get(&j.final_stage))
        .map(|s| on_e(&s.tasks))
        .sum();
    ExecutorView {
        id: e.id.clone(),
        address: format!("{}:{}", e.host, e.port),
        slots: e.slots,
        running_tasks: e.slots.saturating_sub(e.free_slots),
        completed_tasks: e.completed_tasks,
        failed_tasks: e.failed_tasks,
        last_heartbeat_age_ms: ms(e.last_seen.elapsed()),
        shuffle_bytes_held: held,
        cached_bytes: cached,
        state: e.status().to_string(),
    }
}

/// All executors the scheduler knows.
pub fn executors(state: &ClusterState) -> Vec<ExecutorView> {
    state
        .executors()
        .values()
        .map(|e| executor_view(state, e))
        .collect()
}
