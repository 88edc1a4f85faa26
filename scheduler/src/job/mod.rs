//! L2: the job/stage/task state machine. Transitions only: no IO, no placement policy, no
//! adaptive decisions (those arrive as [`edit::StageEdit`]s). Attempt limits come in as the
//! [`crate::config::SchedulerPolicy`].
//!
//! ```text
//! Job:    Queued ──admit──▶ Running ──result stage done──▶ Succeeded
//!           │                  ├── task/stage attempts spent, stall, no executors ──▶ Failed
//!           └──────────────────┴── cancel, release ──▶ Cancelled
//!
//! Stage:  Waiting ──inputs done──▶ Ready ──first launch──▶ Running ──last task──▶ Succeeded
//!            └──broadcast switch──▶ Skipped                   ▲                      │
//!                                                             └──── output lost ─────┘
//!
//! Task:   Pending ──launch──▶ Running ──success──▶ Succeeded
//!            ▲                   │                     │
//!            └──── requeue ──────┴─────────────────────┘
//! ```
//! [`stage`] and [`task`] hold the stage and task lifecycles; [`report`] applies status
//! reports; [`recovery`] handles lost executors and lost shuffle output; [`resolve`] points a
//! stage's readers at its producers' files; [`edit`] applies adaptive edits; [`journal`] holds
//! the transitions a restarted scheduler replays.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use volley_core::stores::StoreOptions;

use datafusion::arrow::datatypes::SchemaRef;
use tokio::sync::watch;
use volley_core::shuffle::PartitionLocation;

use crate::graph::StagePlan;
use crate::job::stage::StageState;

pub mod edit;
pub mod journal;
pub mod recovery;
pub mod report;
pub mod resolve;
pub mod stage;
pub mod task;

pub use edit::{Decision, StageEdit, TaskRead};
pub use stage::{StagePhase, StageStatus};
pub use task::{
    MAX_TASK_CRASHES, Requeue, TaskInfo, TaskLaunch, TaskOutcome, TaskOutput, TaskState,
};

/// Longest statement text a job record keeps (history of 1,000 jobs of megabyte statements
/// would otherwise hold gigabytes and make `/api/jobs` answers huge).
pub const MAX_KEPT_SQL: usize = 4096;

/// `sql` cut to [`MAX_KEPT_SQL`] bytes at a character boundary, marked when cut.
fn kept_sql(sql: String) -> String {
    let sql = volley_core::stores::redact::redact_sql(&sql);
    volley_core::error::cut_text(sql, MAX_KEPT_SQL, |cut| format!("... ({cut} more bytes)"))
}

/// Lifecycle of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Waiting for a free job slot (`max_concurrent_jobs`).
    Queued,
    /// Stages are running.
    Running,
    /// The result is ready.
    Succeeded,
    /// It failed with this message.
    Failed(String),
    /// Cancelled by a user.
    Cancelled,
}

impl JobState {
    /// True when the job will not change any more.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed(_) | JobState::Cancelled
        )
    }

    /// Lower-case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed(_) => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// A submitted query.
#[derive(Debug)]
pub struct Job {
    /// Job id.
    pub id: String,
    /// The SQL text.
    pub sql: String,
    /// Session settings shipped with each task.
    pub settings: Arc<Vec<(String, String)>>,
    /// Options of the object stores its plan touches, shipped with each task (never shown).
    pub stores: Arc<Vec<(String, StoreOptions)>>,
    /// A table write's temporary prefix (URL): deleted when the job fails or is cancelled.
    pub temporary: Option<String>,
    /// Stages by id.
    pub stages: BTreeMap<u32, StageState>,
    /// Id of the result stage.
    pub final_stage: u32,
    /// Result schema.
    pub schema: SchemaRef,
    /// Current state.
    pub state: JobState,
    /// The whole result as an Arrow IPC stream: computed on the scheduler (DDL, EXPLAIN,
    /// answers of the result cache), or small enough to come back with the report of a
    /// one-task result stage (`volley.inline_result_bytes`; its files are kept too).
    pub inline_result: Option<Vec<u8>>,
    /// Submission time.
    pub submitted: Instant,
    /// When it reached a final state.
    pub finished: Option<Instant>,
    /// True once the client fetched the result and its files were removed.
    pub released: bool,
    /// Bumped on every change, for waiters.
    pub version: watch::Sender<u64>,
    /// Wall-clock submission time.
    pub submitted_at: SystemTime,
    /// Tracing span of the whole job; closed when it ends.
    pub span: tracing::Span,
    /// Its result comes from another job (EXPLAIN ANALYZE): it has no stages of its own and
    /// does not count against `max_concurrent_jobs`.
    pub waiting: bool,
    /// A statement answered on the scheduler that changes the session (DDL, SET): hidden from
    /// the jobs list unless asked for.
    pub ddl: bool,
    /// Its summary went to the state store's history.
    pub recorded: bool,
    /// Tasks done when progress was last seen, and when.
    pub progress_mark: (usize, Instant),
    /// The session that submitted it: with client credentials only that session may see,
    /// cancel or fetch it (None: submitted in-process, cluster credentials only).
    pub owner: Option<String>,
    /// First attempt number of tasks created from now on (raised when a job is resumed, see
    /// [`journal::RESUME_ATTEMPT_STRIDE`]).
    pub attempt_floor: u32,
    /// Answered from the result cache (no task ran).
    pub cached: Option<CacheHit>,
    /// Its result is a cached table's partitions (`CACHE TABLE`): never released while
    /// pinned, and recomputed (by lineage) where an executor holding them is lost.
    pub pinned: bool,
    /// A cached job's answer was dropped when its client released it.
    pub answer_dropped: bool,
    /// Partitions one task of a stage building broadcast tables could run when the job was
    /// planned (see `graph::group`): a resumed job is planned with it again.
    pub per_task: usize,
}

/// What a job answered from the result cache was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheHit {
    /// How long before the job the answer was stored.
    pub age: Duration,
    /// Rows of the answer.
    pub rows: u64,
}

impl Job {
    /// True when `session` (a non-empty session id) submitted this job.
    pub fn owned_by(&self, session: &str) -> bool {
        !session.is_empty() && self.owner.as_deref() == Some(session)
    }

    /// A job planned into `stages`, queued or running.
    pub fn new(
        id: String,
        sql: String,
        settings: Arc<Vec<(String, String)>>,
        stages: Vec<StagePlan>,
        schema: SchemaRef,
        span: tracing::Span,
        queued: bool,
    ) -> Self {
        let final_stage = stages.last().map_or(0, |s| s.stage_id);
        let waits: Vec<(u32, u32)> = stages
            .iter()
            .flat_map(|s| s.adaptive_joins.iter().map(|j| (j.probe, j.build)))
            .collect();
        let mut stages: BTreeMap<u32, StageState> = stages
            .into_iter()
            .map(|plan| (plan.stage_id, StageState::new(plan)))
            .collect();
        for (probe, build) in waits {
            if let Some(stage) = stages.get_mut(&probe) {
                stage.wait_for.push(build);
            }
        }
        let mut job = Self::stageless(id, sql, schema);
        job.settings = settings;
        job.stages = stages;
        job.final_stage = final_stage;
        job.span = span;
        if queued {
            job.state = JobState::Queued;
        }
        job.check_done();
        job
    }

    /// A job without stages, running, submitted now.
    pub fn stageless(id: String, sql: String, schema: SchemaRef) -> Self {
        Job {
            id,
            sql: kept_sql(sql),
            settings: Arc::new(Vec::new()),
            stores: Arc::new(Vec::new()),
            temporary: None,
            stages: BTreeMap::new(),
            final_stage: 0,
            schema,
            state: JobState::Running,
            inline_result: None,
            submitted: Instant::now(),
            finished: None,
            released: false,
            version: watch::channel(0).0,
            submitted_at: SystemTime::now(),
            span: tracing::Span::none(),
            waiting: false,
            ddl: false,
            recorded: false,
            progress_mark: (0, Instant::now()),
            owner: None,
            attempt_floor: 0,
            cached: None,
            pinned: false,
            answer_dropped: false,
            per_task: 1,
        }
    }

    /// Wake whoever waits on this job.
    pub fn touch(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// Queued -> Running.
    pub fn admit(&mut self) {
        if self.state == JobState::Queued {
            self.state = JobState::Running;
            self.touch();
            self.check_done();
        }
    }

    /// Running -> Succeeded with a result computed elsewhere (Arrow IPC stream).
    pub fn succeed_with(&mut self, result: Vec<u8>) {
        if !self.state.is_final() {
            self.inline_result = Some(result);
            self.state = JobState::Succeeded;
            self.finished = Some(Instant::now());
            self.end_spans();
            self.touch();
        }
    }

    /// Running -> Succeeded once the result stage is done.
    pub fn check_done(&mut self) {
        if self.state == JobState::Running
            && !self.waiting
            && self
                .stages
                .get(&self.final_stage)
                .is_none_or(StageState::is_complete)
        {
            self.state = JobState::Succeeded;
            self.finished = Some(Instant::now());
            self.end_spans();
            self.touch();
        }
    }

    /// -> Failed, unless it already ended.
    pub fn fail(&mut self, message: String) {
        if !self.state.is_final() {
            tracing::warn!(parent: &self.span, job_id = %self.id, error = %message, "job failed");
            self.state = JobState::Failed(message);
            self.finished = Some(Instant::now());
            self.end_spans();
            self.touch();
        }
    }

    /// -> Cancelled; false when it already ended. Slots held by its running tasks come back
    /// when executors report them (or when its tasks are aborted).
    pub fn cancel(&mut self) -> bool {
        if self.state.is_final() {
            return false;
        }
        self.state = JobState::Cancelled;
        self.finished = Some(Instant::now());
        self.end_spans();
        self.touch();
        true
    }

    /// Close the job's and its stages' spans (they export when closed).
    fn end_spans(&mut self) {
        for stage in self.stages.values_mut() {
            stage.span = None;
        }
        self.span = tracing::Span::none();
    }

    /// Stages done / total and tasks done / total.
    pub fn progress(&self) -> (usize, usize, usize, usize) {
        let stages_done = self.stages.values().filter(|s| s.is_complete()).count();
        let tasks_total = self.stages.values().map(|s| s.tasks.len()).sum();
        let tasks_done = self.stages.values().map(StageState::done_count).sum();
        (stages_done, self.stages.len(), tasks_done, tasks_total)
    }

    /// Files of the result stage in partition order.
    pub fn result_locations(&self) -> Vec<PartitionLocation> {
        self.stages
            .get(&self.final_stage)
            .map(|stage| {
                stage
                    .tasks
                    .iter()
                    .flat_map(|t| t.outputs().iter().cloned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Rows of the result.
    pub fn rows_out(&self) -> u64 {
        self.result_locations().iter().map(|l| l.num_rows).sum()
    }

    /// True when every stage `stage` reads or waits for is complete.
    pub fn stage_ready(&self, stage: &StageState) -> bool {
        stage
            .plan
            .inputs
            .iter()
            .chain(&stage.wait_for)
            .all(|input| self.stages.get(input).is_some_and(StageState::is_complete))
    }

    /// Why this running job counts as stuck: no task finished for `timeout` (None: it moved,
    /// or is not running). Names the tasks it waits for.
    pub fn stalled(&mut self, timeout: Duration) -> Option<String> {
        let (_, _, done, _) = self.progress();
        if self.state != JobState::Running || self.waiting {
            // The clock starts when the job runs (a queued job is not stalled).
            self.progress_mark = (done, Instant::now());
            return None;
        }
        if done != self.progress_mark.0 {
            self.progress_mark = (done, Instant::now());
            return None;
        }
        if self.progress_mark.1.elapsed() < timeout {
            return None;
        }
        let mut running = Vec::new();
        let mut pending = 0;
        for (stage_id, stage) in &self.stages {
            for (partition, task) in stage.tasks.iter().enumerate() {
                match &task.state {
                    TaskState::Running { executor_id, .. } => running.push(format!(
                        "task {partition} of stage {stage_id} running on executor {executor_id}"
                    )),
                    TaskState::Pending => pending += 1,
                    TaskState::Succeeded { .. } => {}
                }
            }
        }
        let more = running.len().saturating_sub(5);
        running.truncate(5);
        if more > 0 {
            running.push(format!("{more} more running"));
        }
        running.push(format!("{pending} not started"));
        Some(format!(
            "job {} made no progress for {} s (--stall-timeout-secs); stuck: {}",
            self.id,
            timeout.as_secs(),
            running.join(", ")
        ))
    }
}
