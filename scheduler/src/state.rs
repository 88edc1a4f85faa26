//! Jobs, stages, tasks and executors: the scheduler's in-memory state machine.
//!
//! All methods are synchronous and run under one lock; RPCs happen outside of it, driven by
//! what these methods return.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::Result as DFResult;
use datafusion::physical_plan::{ExecutionPlan, Partitioning};
use tokio::sync::watch;
use volley_core::codec::VolleyCodec;
use volley_core::plan::ShuffleReaderExec;
use volley_core::shuffle::PartitionLocation;

use crate::adaptive::{self, Decision, ShuffledJoin, TaskRead};
use crate::planner::{StageKind, StagePlan};

/// A registered executor as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct ExecutorInfo {
    /// Executor id (new on every registration).
    pub id: String,
    /// Host its gRPC and Flight services listen on.
    pub host: String,
    /// Port of its gRPC + Flight server.
    pub port: u16,
    /// Task slots.
    pub slots: u32,
    /// Slots not taken by tasks this scheduler launched.
    pub free_slots: u32,
    /// Last heartbeat or registration.
    pub last_seen: Instant,
    /// False once declared lost.
    pub alive: bool,
    /// Tasks that finished on it.
    pub completed_tasks: u64,
    /// Tasks that failed on it.
    pub failed_tasks: u64,
    /// Tasks running on it, as its last heartbeat said.
    pub reported_running: u32,
    /// Circuit breaker guarding task placement on this executor.
    pub breaker: Breaker,
    /// Shutting down gracefully: running tasks finish, no new ones come.
    pub draining: bool,
    /// Secret of its registration: only the executor itself knows it.
    pub secret: String,
}

/// A per-executor circuit breaker: after [`Breaker::THRESHOLD`] consecutive failures (failed
/// launches, retryable task failures) no tasks go to the executor for [`Breaker::COOL_DOWN`];
/// then one probe task may go (half-open); its success closes the breaker, its failure
/// opens it again.
#[derive(Debug, Clone, Default)]
pub struct Breaker {
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// While set and in the future, the breaker is open.
    pub open_until: Option<Instant>,
    /// A probe task is out (half-open).
    pub probing: bool,
}

impl Breaker {
    /// Consecutive failures that open the breaker.
    pub const THRESHOLD: u32 = 3;
    /// How long it stays open before a probe.
    pub const COOL_DOWN: Duration = Duration::from_secs(5);

    /// "closed", "open" or "half-open".
    pub fn state(&self) -> &'static str {
        match self.open_until {
            None => "closed",
            Some(until) if Instant::now() < until => "open",
            Some(_) => "half-open",
        }
    }

    /// May a task be placed now?
    pub fn allows(&self) -> bool {
        match self.state() {
            "closed" => true,
            "half-open" => !self.probing,
            _ => false,
        }
    }

    fn placed(&mut self) {
        if self.open_until.is_some() {
            self.probing = true;
        }
    }

    /// Record a success: closes the breaker.
    pub fn success(&mut self) {
        *self = Breaker::default();
    }

    /// Record a failure; returns true when this opened the breaker.
    pub fn failure(&mut self) -> bool {
        self.consecutive_failures += 1;
        self.probing = false;
        if self.consecutive_failures >= Self::THRESHOLD || self.open_until.is_some() {
            self.open_until = Some(Instant::now() + Self::COOL_DOWN);
            return true;
        }
        false
    }
}

/// Lifecycle of one task (one partition of a stage).
#[derive(Debug, Clone)]
pub enum TaskState {
    /// Waiting for a slot.
    Pending,
    /// Launched on an executor.
    Running {
        /// Where.
        executor_id: String,
        /// Since when.
        started: Instant,
    },
    /// Done; its files are listed.
    Succeeded {
        /// Where its output lives.
        executor_id: String,
        /// Files written, one per non-empty bucket.
        outputs: Vec<PartitionLocation>,
        /// Duration of the attempt.
        elapsed: Duration,
    },
}

/// One task.
#[derive(Debug, Clone)]
pub struct TaskInfo {
    /// Current state.
    pub state: TaskState,
    /// Attempt number of the current (or next) attempt, from 0.
    pub attempt: u32,
    /// Failed attempts so far.
    pub failures: u32,
    /// Last error, if any attempt failed.
    pub last_error: Option<String>,
    /// Executor the last attempt failed on: retries go elsewhere when they can.
    pub avoid: Option<String>,
    /// Wall-clock start of the current (or last) attempt.
    pub started_at: Option<SystemTime>,
    /// Executor of the current (or last) attempt.
    pub last_executor: Option<String>,
    /// Spill bytes of the successful attempt.
    pub spilled_bytes: u64,
    /// Executors lost while running an attempt of this task.
    pub crashes: u32,
}

/// Longest statement text a job record keeps (history of 1,000 jobs of megabyte statements
/// would otherwise hold gigabytes and make `/api/jobs` answers huge).
pub const MAX_KEPT_SQL: usize = 4096;

/// `sql` cut to [`MAX_KEPT_SQL`] bytes at a character boundary, marked when cut.
fn kept_sql(sql: String) -> String {
    volley_core::error::cut_text(sql, MAX_KEPT_SQL, |cut| format!("... ({cut} more bytes)"))
}

/// Executors a task may take down with it before its job fails instead of retrying it on the
/// next one (a task that aborts its process, say on a huge allocation, would kill them all).
pub const MAX_TASK_CRASHES: u32 = 2;

impl TaskInfo {
    /// A task not launched yet.
    pub fn pending() -> Self {
        TaskInfo {
            state: TaskState::Pending,
            attempt: 0,
            failures: 0,
            last_error: None,
            avoid: None,
            started_at: None,
            last_executor: None,
            spilled_bytes: 0,
            crashes: 0,
        }
    }
}

/// One stage of a running job.
#[derive(Debug)]
pub struct StageState {
    /// The plan as cut by the planner.
    pub plan: StagePlan,
    /// Per-partition tasks.
    pub tasks: Vec<TaskInfo>,
    /// The stage's plan with resolved shuffle locations, encoded once for all its tasks.
    pub resolved: Option<Arc<Vec<u8>>>,
    /// Times the stage was (re)started.
    pub attempts: u32,
    /// DataFusion metrics per operator (pre-order), summed over successful tasks.
    pub operator_metrics: Vec<BTreeMap<String, u64>>,
    /// When its first task was launched.
    pub started: Option<Instant>,
    /// When its last task finished.
    pub finished: Option<Instant>,
    /// Tracing span while the stage runs (parent of its tasks' spans on the executors).
    pub span: Option<tracing::Span>,
    /// Pending broadcast switch of its join, decided when the build stage is done.
    pub join_switch: Vec<ShuffledJoin>,
    /// Stages it waits for besides its inputs (a probe side waiting for its build side).
    pub wait_for: Vec<u32>,
    /// What each task reads from hash-partitioned inputs, once adaptive execution regrouped
    /// them (None: task `i` reads bucket `i`).
    pub reads: Option<Vec<TaskRead>>,
    /// True once adaptive execution looked at it before its first launch.
    pub adaptive_planned: bool,
    /// Adaptive execution decisions, in order.
    pub adaptive: Vec<Decision>,
    /// Never runs: a consumer reads its input directly.
    pub skipped: bool,
}

impl StageState {
    /// True when every task succeeded.
    pub fn is_complete(&self) -> bool {
        self.tasks
            .iter()
            .all(|t| matches!(t.state, TaskState::Succeeded { .. }))
    }

    /// Rows and bytes its finished tasks wrote.
    pub fn output_size(&self) -> (u64, u64) {
        self.tasks
            .iter()
            .flat_map(|t| match &t.state {
                TaskState::Succeeded { outputs, .. } => outputs.as_slice(),
                _ => &[],
            })
            .fold((0, 0), |(r, b), l| (r + l.num_rows, b + l.num_bytes))
    }

    fn done_count(&self) -> usize {
        self.tasks
            .iter()
            .filter(|t| matches!(t.state, TaskState::Succeeded { .. }))
            .count()
    }
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
    /// Stages by id.
    pub stages: BTreeMap<u32, StageState>,
    /// Id of the result stage.
    pub final_stage: u32,
    /// Result schema.
    pub schema: SchemaRef,
    /// Current state.
    pub state: JobState,
    /// Result computed on the scheduler (DDL, EXPLAIN), as an Arrow IPC stream.
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
    /// Tasks done when progress was last seen, and when.
    pub progress_mark: (usize, Instant),
}

impl Job {
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

    fn touch(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// Stages done / total and tasks done / total.
    pub fn progress(&self) -> (usize, usize, usize, usize) {
        let stages_done = self.stages.values().filter(|s| s.is_complete()).count();
        let tasks_total = self.stages.values().map(|s| s.tasks.len()).sum();
        let tasks_done = self.stages.values().map(|s| s.done_count()).sum();
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
                    .flat_map(|t| match &t.state {
                        TaskState::Succeeded { outputs, .. } => outputs.clone(),
                        _ => Vec::new(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn stage_ready(&self, stage: &StageState) -> bool {
        stage
            .plan
            .inputs
            .iter()
            .chain(&stage.wait_for)
            .all(|input| self.stages.get(input).is_some_and(StageState::is_complete))
    }

    fn fail(&mut self, message: String) {
        if !self.state.is_final() {
            tracing::warn!(parent: &self.span, job_id = %self.id, error = %message, "job failed");
            self.state = JobState::Failed(message);
            self.finished = Some(Instant::now());
            self.end_spans();
            self.touch();
        }
    }

    /// Close the job's and its stages' spans (they export when closed).
    fn end_spans(&mut self) {
        for stage in self.stages.values_mut() {
            stage.span = None;
        }
        self.span = tracing::Span::none();
    }

    /// Rows of the result.
    pub fn rows_out(&self) -> u64 {
        self.result_locations().iter().map(|l| l.num_rows).sum()
    }
}

/// A task to launch on an executor.
#[derive(Debug, Clone)]
pub struct TaskLaunch {
    /// Job.
    pub job_id: String,
    /// Stage.
    pub stage_id: u32,
    /// Partition.
    pub partition: u32,
    /// Attempt.
    pub attempt: u32,
    /// Encoded stage plan.
    pub plan: Arc<Vec<u8>>,
    /// Session settings.
    pub settings: Arc<Vec<(String, String)>>,
    /// Span of its stage: the parent of the task's span on the executor.
    pub span: tracing::Span,
}

/// How a task attempt ended, as reported by its executor.
#[derive(Debug, Clone)]
pub enum TaskOutcome {
    /// It wrote these files.
    Succeeded {
        /// Files written.
        outputs: Vec<(u32, String, u64, u64)>,
        /// Duration.
        elapsed: Duration,
        /// Operator metrics (pre-order): name, value.
        metrics: Vec<Vec<(String, u64)>>,
    },
    /// It failed.
    Failed {
        /// Error text.
        message: String,
        /// Whether a retry may help.
        retryable: bool,
        /// It ran out of memory (no sign of an unhealthy executor).
        out_of_memory: bool,
        /// The shuffle input it could not read: (executor, stage, map partition).
        fetch_failure: Option<(String, u32, u32)>,
    },
}

/// Scheduler policy knobs.
#[derive(Debug, Clone)]
pub struct SchedulerPolicy {
    /// Attempts per task before the job fails.
    pub task_max_attempts: u32,
    /// Attempts per stage (re-runs after lost output) before the job fails.
    pub stage_max_attempts: u32,
    /// Round-robin task placement instead of least-loaded.
    pub round_robin: bool,
    /// Jobs running at once; later ones queue (0 = no limit).
    pub max_concurrent_jobs: usize,
}

impl Default for SchedulerPolicy {
    fn default() -> Self {
        Self {
            task_max_attempts: 4,
            stage_max_attempts: 4,
            round_robin: false,
            max_concurrent_jobs: 0,
        }
    }
}

/// Everything the scheduler tracks.
#[derive(Debug, Default)]
pub struct ClusterState {
    /// Registered executors by id.
    pub executors: BTreeMap<String, ExecutorInfo>,
    /// Jobs by id.
    pub jobs: HashMap<String, Job>,
    /// Job ids in submission order.
    pub job_order: Vec<String>,
    /// Policy.
    pub policy: SchedulerPolicy,
    /// Next executor index for round-robin placement.
    pub rr_cursor: usize,
}

impl ClusterState {
    /// Register (or re-register) an executor.
    pub fn register_executor(
        &mut self,
        id: String,
        host: String,
        port: u16,
        slots: u32,
        secret: String,
    ) {
        let info = ExecutorInfo {
            id: id.clone(),
            host,
            port,
            slots,
            free_slots: slots,
            last_seen: Instant::now(),
            alive: true,
            completed_tasks: 0,
            failed_tasks: 0,
            reported_running: 0,
            breaker: Breaker::default(),
            draining: false,
            secret,
        };
        self.executors.insert(id, info);
    }

    /// True when `secret` is the registration secret of executor `id` (constant time).
    pub fn secret_matches(&self, id: &str, secret: &str) -> bool {
        use subtle::ConstantTimeEq;
        self.executors
            .get(id)
            .is_some_and(|e| bool::from(e.secret.as_bytes().ct_eq(secret.as_bytes())))
    }

    /// Record a heartbeat; false when the executor is unknown and must register again.
    pub fn heartbeat(&mut self, id: &str, running_tasks: u32) -> bool {
        match self.executors.get_mut(id) {
            Some(e) if e.alive => {
                e.last_seen = Instant::now();
                e.reported_running = running_tasks;
                true
            }
            _ => false,
        }
    }

    /// Attempts the scheduler believes run on `executor_id`, launched before `launched_before`,
    /// that the executor's heartbeat does not list: their launch or status report was lost.
    pub fn unknown_attempts(
        &self,
        executor_id: &str,
        listed: &std::collections::HashSet<(String, u32, u32, u32)>,
        launched_before: Instant,
    ) -> Vec<(String, u32, u32, u32)> {
        let mut unknown = Vec::new();
        for job in self.jobs.values().filter(|j| j.state == JobState::Running) {
            for (stage_id, stage) in &job.stages {
                for (partition, task) in stage.tasks.iter().enumerate() {
                    let TaskState::Running {
                        executor_id: on,
                        started,
                    } = &task.state
                    else {
                        continue;
                    };
                    let key = (
                        job.id.clone(),
                        *stage_id,
                        u32::try_from(partition).unwrap_or(u32::MAX),
                        task.attempt,
                    );
                    if on == executor_id && *started < launched_before && !listed.contains(&key) {
                        unknown.push(key);
                    }
                }
            }
        }
        unknown
    }

    /// Stop placing tasks on an executor that is shutting down.
    pub fn drain_executor(&mut self, id: &str) {
        if let Some(e) = self.executors.get_mut(id) {
            e.draining = true;
        }
    }

    /// Total slots of live executors.
    pub fn total_slots(&self) -> usize {
        self.executors
            .values()
            .filter(|e| e.alive && !e.draining)
            .map(|e| e.slots as usize)
            .sum()
    }

    /// Add a job planned into `stages`.
    pub fn add_job(
        &mut self,
        id: String,
        sql: String,
        settings: Arc<Vec<(String, String)>>,
        stages: Vec<StagePlan>,
        schema: SchemaRef,
        span: tracing::Span,
    ) {
        let final_stage = stages.last().map_or(0, |s| s.stage_id);
        let waits: Vec<(u32, u32)> = stages
            .iter()
            .flat_map(|s| s.adaptive_joins.iter().map(|j| (j.probe, j.build)))
            .collect();
        let mut stages: BTreeMap<u32, StageState> = stages
            .into_iter()
            .map(|plan| {
                let tasks = vec![TaskInfo::pending(); plan.partitions];
                let join_switch = plan.adaptive_joins.clone();
                let adaptive = join_switch
                    .iter()
                    .copied()
                    .map(adaptive::candidate)
                    .collect();
                (
                    plan.stage_id,
                    StageState {
                        plan,
                        tasks,
                        resolved: None,
                        attempts: 1,
                        operator_metrics: Vec::new(),
                        started: None,
                        finished: None,
                        span: None,
                        join_switch,
                        wait_for: Vec::new(),
                        reads: None,
                        adaptive_planned: false,
                        adaptive,
                        skipped: false,
                    },
                )
            })
            .collect();
        for (probe, build) in waits {
            if let Some(stage) = stages.get_mut(&probe) {
                stage.wait_for.push(build);
            }
        }
        let limit = self.policy.max_concurrent_jobs;
        let queued = limit > 0 && self.running_jobs() >= limit;
        let mut job = Job {
            id: id.clone(),
            sql: kept_sql(sql),
            settings,
            stages,
            final_stage,
            schema,
            state: if queued {
                JobState::Queued
            } else {
                JobState::Running
            },
            inline_result: None,
            submitted: Instant::now(),
            finished: None,
            released: false,
            version: watch::channel(0).0,
            submitted_at: SystemTime::now(),
            span,
            waiting: false,
            progress_mark: (0, Instant::now()),
        };
        Self::check_job_done(&mut job);
        self.jobs.insert(id.clone(), job);
        self.job_order.push(id);
    }

    /// A job without stages, running, submitted now.
    fn stageless_job(id: String, sql: String, schema: SchemaRef) -> Job {
        Job {
            id,
            sql: kept_sql(sql),
            settings: Arc::new(Vec::new()),
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
            progress_mark: (0, Instant::now()),
        }
    }

    /// Add a job whose result the scheduler computed itself.
    pub fn add_inline_job(&mut self, id: String, sql: String, schema: SchemaRef, result: Vec<u8>) {
        let mut job = Self::stageless_job(id.clone(), sql, schema);
        job.state = JobState::Succeeded;
        job.inline_result = Some(result);
        job.finished = Some(Instant::now());
        self.jobs.insert(id.clone(), job);
        self.job_order.push(id);
    }

    /// Add a running job whose result another job produces (EXPLAIN ANALYZE); finish it with
    /// [`ClusterState::finish_waiting_job`].
    pub fn add_waiting_job(&mut self, id: String, sql: String, schema: SchemaRef) {
        let mut job = Self::stageless_job(id.clone(), sql, schema);
        job.waiting = true;
        self.jobs.insert(id.clone(), job);
        self.job_order.push(id);
    }

    /// Give a waiting job its result (Arrow IPC stream) or its error, unless it already ended
    /// (cancelled).
    pub fn finish_waiting_job(&mut self, id: &str, result: Result<Vec<u8>, String>) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        if job.state.is_final() {
            return;
        }
        match result {
            Ok(bytes) => {
                job.inline_result = Some(bytes);
                job.state = JobState::Succeeded;
                job.finished = Some(Instant::now());
                job.touch();
            }
            Err(message) => job.fail(message),
        }
    }

    fn check_job_done(job: &mut Job) {
        if job.state == JobState::Running
            && job
                .stages
                .get(&job.final_stage)
                .is_none_or(StageState::is_complete)
        {
            job.state = JobState::Succeeded;
            job.finished = Some(Instant::now());
            job.end_spans();
            job.touch();
        }
    }

    /// Shuffle bytes partition `partition` of a stage reads from its input stages.
    pub fn input_bytes(&self, job_id: &str, stage_id: u32, partition: u32) -> u64 {
        let Some(job) = self.jobs.get(job_id) else {
            return 0;
        };
        let Some(stage) = job.stages.get(&stage_id) else {
            return 0;
        };
        stage
            .plan
            .inputs
            .iter()
            .filter_map(|id| job.stages.get(id))
            .flat_map(|input| {
                let per_partition = input.plan.kind == StageKind::Shuffle;
                let read = stage.reads.as_ref().and_then(|r| r.get(partition as usize));
                let input_id = input.plan.stage_id;
                input
                    .tasks
                    .iter()
                    .enumerate()
                    .flat_map(move |(map, t)| match &t.state {
                        TaskState::Succeeded { outputs, .. } => outputs
                            .iter()
                            .filter(|l| match read {
                                _ if !per_partition => true,
                                Some(read) => reads_output(read, input_id, map, l),
                                None => l.output_partition == partition,
                            })
                            .map(|l| l.num_bytes)
                            .collect::<Vec<_>>(),
                        _ => Vec::new(),
                    })
            })
            .sum()
    }

    /// Jobs in the running state.
    pub fn running_jobs(&self) -> usize {
        self.jobs
            .values()
            .filter(|j| j.state == JobState::Running && !j.waiting)
            .count()
    }

    /// Start queued jobs, oldest first, while there is room under `max_concurrent_jobs`.
    fn promote_queued(&mut self) {
        let limit = self.policy.max_concurrent_jobs;
        let mut running = self.running_jobs();
        for job_id in &self.job_order {
            if limit > 0 && running >= limit {
                break;
            }
            if let Some(job) = self.jobs.get_mut(job_id)
                && job.state == JobState::Queued
            {
                job.state = JobState::Running;
                job.touch();
                running += 1;
                Self::check_job_done(job);
            }
        }
    }

    /// Give pending tasks of ready stages to executors with free slots, least loaded first.
    pub fn assign_tasks(&mut self) -> Vec<(ExecutorInfo, Vec<TaskLaunch>)> {
        self.promote_queued();
        let slots = self.total_slots();
        let mut assigned: BTreeMap<String, Vec<TaskLaunch>> = BTreeMap::new();
        let order = self.job_order.clone();
        for job_id in order {
            let Some(job) = self.jobs.get_mut(&job_id) else {
                continue;
            };
            if job.state != JobState::Running {
                continue;
            }
            let stage_ids: Vec<u32> = job.stages.keys().copied().collect();
            for stage_id in stage_ids {
                let ready = job
                    .stages
                    .get(&stage_id)
                    .is_some_and(|s| !s.is_complete() && job.stage_ready(s));
                if !ready {
                    continue;
                }
                if let Some(stage) = job.stages.get_mut(&stage_id)
                    && !stage.adaptive_planned
                {
                    stage.adaptive_planned = true;
                    if stage.started.is_none() {
                        adaptive::before_launch(job, stage_id, slots);
                    }
                }
                let plan = match Self::resolved_plan(job, stage_id) {
                    Ok(plan) => plan,
                    Err(e) => {
                        job.fail(format!("cannot prepare stage {stage_id}: {e}"));
                        break;
                    }
                };
                let job_span = job.span.clone();
                let Some(stage) = job.stages.get_mut(&stage_id) else {
                    continue;
                };
                if stage.span.is_none() {
                    stage.span = Some(tracing::info_span!(
                        parent: &job_span,
                        "stage",
                        job_id = %job_id,
                        stage_id,
                        partitions = stage.tasks.len()
                    ));
                }
                stage.started.get_or_insert_with(Instant::now);
                stage.finished = None;
                let stage_span = stage.span.clone().unwrap_or_else(tracing::Span::none);
                for (partition, task) in stage.tasks.iter_mut().enumerate() {
                    if !matches!(task.state, TaskState::Pending) {
                        continue;
                    }
                    let Some(executor_id) = Self::pick_executor(
                        &self.executors,
                        task.avoid.as_deref(),
                        self.policy.round_robin.then_some(&mut self.rr_cursor),
                    ) else {
                        return Self::group(assigned, &self.executors);
                    };
                    let Some(executor) = self.executors.get_mut(&executor_id) else {
                        continue;
                    };
                    executor.free_slots -= 1;
                    executor.breaker.placed();
                    task.state = TaskState::Running {
                        executor_id: executor.id.clone(),
                        started: Instant::now(),
                    };
                    task.started_at = Some(SystemTime::now());
                    task.last_executor = Some(executor.id.clone());
                    assigned
                        .entry(executor.id.clone())
                        .or_default()
                        .push(TaskLaunch {
                            job_id: job_id.clone(),
                            stage_id,
                            partition: u32::try_from(partition).unwrap_or(u32::MAX),
                            attempt: task.attempt,
                            plan: Arc::clone(&plan),
                            settings: Arc::clone(&job.settings),
                            span: stage_span.clone(),
                        });
                }
            }
        }
        Self::group(assigned, &self.executors)
    }

    /// Least-loaded (most free slots) or round-robin, avoiding `avoid` when another executor
    /// has a free slot.
    fn pick_executor(
        executors: &BTreeMap<String, ExecutorInfo>,
        avoid: Option<&str>,
        round_robin: Option<&mut usize>,
    ) -> Option<String> {
        let free: Vec<&ExecutorInfo> = executors
            .values()
            .filter(|e| e.alive && !e.draining && e.free_slots > 0 && e.breaker.allows())
            .collect();
        let preferred: Vec<&ExecutorInfo> = free
            .iter()
            .copied()
            .filter(|e| Some(e.id.as_str()) != avoid)
            .collect();
        let candidates = if preferred.is_empty() {
            free
        } else {
            preferred
        };
        match round_robin {
            Some(cursor) => {
                let chosen = candidates.get(*cursor % candidates.len().max(1))?;
                *cursor = cursor.wrapping_add(1);
                Some(chosen.id.clone())
            }
            None => candidates
                .into_iter()
                .max_by_key(|e| (e.free_slots, std::cmp::Reverse(e.id.clone())))
                .map(|e| e.id.clone()),
        }
    }

    /// Running tasks of a failed or cancelled job were stopped on their executors: give their
    /// slots back and forget them.
    pub fn abort_job_tasks(&mut self, job_id: &str) {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        for stage in job.stages.values_mut() {
            for task in stage.tasks.iter_mut() {
                if let TaskState::Running { executor_id, .. } = &task.state {
                    if let Some(e) = self.executors.get_mut(executor_id) {
                        e.free_slots = (e.free_slots + 1).min(e.slots);
                    }
                    task.state = TaskState::Pending;
                    task.attempt += 1;
                }
            }
        }
    }

    fn group(
        assigned: BTreeMap<String, Vec<TaskLaunch>>,
        executors: &BTreeMap<String, ExecutorInfo>,
    ) -> Vec<(ExecutorInfo, Vec<TaskLaunch>)> {
        assigned
            .into_iter()
            .filter_map(|(id, tasks)| executors.get(&id).map(|e| (e.clone(), tasks)))
            .collect()
    }

    /// The stage's plan with every reader pointed at its producer's files, encoded.
    fn resolved_plan(job: &mut Job, stage_id: u32) -> DFResult<Arc<Vec<u8>>> {
        if let Some(plan) = job.stages.get(&stage_id).and_then(|s| s.resolved.clone()) {
            return Ok(plan);
        }
        let Some(stage) = job.stages.get(&stage_id) else {
            return Err(datafusion::error::DataFusionError::Internal(format!(
                "no stage {stage_id}"
            )));
        };
        let plan: Arc<dyn ExecutionPlan> = Arc::clone(&stage.plan.plan) as Arc<dyn ExecutionPlan>;
        let reads = stage.reads.clone();
        let stages = &job.stages;
        let resolved = plan
            .transform_up(|node| {
                let Some(reader) = node.downcast_ref::<ShuffleReaderExec>() else {
                    return Ok(Transformed::no(node));
                };
                let producer_tasks = stages
                    .get(&reader.stage_id())
                    .map(|p| p.tasks.as_slice())
                    .unwrap_or(&[]);
                let outputs = producer_tasks
                    .iter()
                    .enumerate()
                    .flat_map(|(map, task)| match &task.state {
                        TaskState::Succeeded { outputs, .. } => {
                            outputs.iter().map(|o| (map, o)).collect::<Vec<_>>()
                        }
                        _ => Vec::new(),
                    });
                let (partitioning, locations) = match (&reads, reader.hash_partitioned()) {
                    (Some(reads), true) => {
                        let mut locations = vec![Vec::new(); reads.len()];
                        for (map, output) in outputs {
                            for (slot, read) in locations.iter_mut().zip(reads) {
                                if reads_output(read, reader.stage_id(), map, output) {
                                    slot.push(output.clone());
                                }
                            }
                        }
                        let partitioning = match reader.partitioning() {
                            Partitioning::Hash(exprs, _) => {
                                Partitioning::Hash(exprs.clone(), reads.len())
                            }
                            _ => Partitioning::UnknownPartitioning(reads.len()),
                        };
                        (partitioning, locations)
                    }
                    (_, hash) => {
                        // Passthrough readers read one file per map task, however many
                        // tasks the producer ended up with.
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
                Ok(Transformed::yes(
                    Arc::new(ShuffleReaderExec::with_locations(
                        reader.stage_id(),
                        reader.schema(),
                        partitioning,
                        reader.hash_partitioned(),
                        locations,
                    )) as Arc<dyn ExecutionPlan>,
                ))
            })?
            .data;
        let bytes = Arc::new(VolleyCodec::encode_plan(resolved)?);
        if let Some(stage) = job.stages.get_mut(&stage_id) {
            stage.resolved = Some(Arc::clone(&bytes));
        }
        Ok(bytes)
    }

    /// Apply a task status report. Returns the job id when the job reached a final state.
    pub fn update_task(
        &mut self,
        executor_id: &str,
        job_id: &str,
        stage_id: u32,
        partition: u32,
        attempt: u32,
        outcome: TaskOutcome,
    ) -> Option<String> {
        let policy = self.policy.clone();
        let executor = self.executors.get(executor_id).cloned();
        let job = self.jobs.get_mut(job_id)?;
        let stage = job.stages.get_mut(&stage_id)?;
        let task = stage.tasks.get_mut(partition as usize)?;
        let current = matches!(&task.state, TaskState::Running { executor_id: e, .. } if e == executor_id)
            && task.attempt == attempt;
        if !current {
            tracing::debug!(
                job_id,
                stage_id,
                partition,
                attempt,
                "ignoring stale task status"
            );
            return None;
        }
        if let Some(e) = self.executors.get_mut(executor_id) {
            e.free_slots = (e.free_slots + 1).min(e.slots);
        }
        if job.state != JobState::Running {
            task.state = TaskState::Pending;
            return None;
        }
        match outcome {
            TaskOutcome::Succeeded {
                outputs,
                elapsed,
                metrics,
            } => {
                task.spilled_bytes = metrics
                    .iter()
                    .flatten()
                    .filter(|(name, _)| name == "spilled_bytes")
                    .map(|(_, v)| *v)
                    .sum();
                if stage.operator_metrics.len() < metrics.len() {
                    stage
                        .operator_metrics
                        .resize(metrics.len(), BTreeMap::new());
                }
                for (slot, operator) in stage.operator_metrics.iter_mut().zip(metrics) {
                    for (name, value) in operator {
                        *slot.entry(name).or_default() += value;
                    }
                }
                let (host, port) = executor.map(|e| (e.host, e.port)).unwrap_or_default();
                let outputs = outputs
                    .into_iter()
                    .map(
                        |(output_partition, path, num_rows, num_bytes)| PartitionLocation {
                            executor_id: executor_id.to_string(),
                            host: host.clone(),
                            flight_port: port,
                            path,
                            map_partition: partition,
                            output_partition,
                            num_rows,
                            num_bytes,
                            grant: String::new(),
                        },
                    )
                    .collect();
                task.state = TaskState::Succeeded {
                    executor_id: executor_id.to_string(),
                    outputs,
                    elapsed,
                };
                if let Some(e) = self.executors.get_mut(executor_id) {
                    e.completed_tasks += 1;
                    e.breaker.success();
                }
                if stage.is_complete() {
                    stage.finished = Some(Instant::now());
                    stage.span = None;
                    if let Err(e) = adaptive::on_stage_complete(job, stage_id) {
                        job.fail(format!("adaptive re-planning after stage {stage_id}: {e}"));
                    }
                }
                job.touch();
                Self::check_job_done(job);
            }
            TaskOutcome::Failed {
                message,
                retryable,
                out_of_memory,
                fetch_failure,
            } => {
                if let Some(e) = self.executors.get_mut(executor_id) {
                    e.failed_tasks += 1;
                    // User errors and memory limits say nothing about the executor's health.
                    if retryable && !out_of_memory && fetch_failure.is_none() && e.breaker.failure()
                    {
                        tracing::warn!(executor_id, "circuit breaker opened");
                    }
                }
                task.failures += 1;
                task.attempt += 1;
                task.last_error = Some(message.clone());
                task.avoid = Some(executor_id.to_string());
                task.state = TaskState::Pending;
                let attempts = task.failures;
                if let Some((lost_executor, producer, map_partition)) = fetch_failure {
                    tracing::warn!(job_id, stage_id, producer, map_partition, %lost_executor, "shuffle fetch failed; re-running producer");
                    Self::rerun_producer(job, producer, map_partition, &lost_executor, &policy);
                } else if !retryable || attempts >= policy.task_max_attempts {
                    let tries = if retryable {
                        format!(" after {attempts} attempts")
                    } else {
                        String::new()
                    };
                    job.fail(format!(
                        "task {partition} of stage {stage_id} failed{tries}: {message}"
                    ));
                }
                job.touch();
            }
        }
        job.state.is_final().then(|| job_id.to_string())
    }

    fn rerun_producer(
        job: &mut Job,
        producer: u32,
        map_partition: u32,
        lost_executor: &str,
        policy: &SchedulerPolicy,
    ) {
        let Some(stage) = job.stages.get_mut(&producer) else {
            return;
        };
        let mut changed = false;
        for (index, task) in stage.tasks.iter_mut().enumerate() {
            let lost = matches!(&task.state, TaskState::Succeeded { executor_id, .. } if executor_id == lost_executor);
            if lost
                || index == map_partition as usize
                    && matches!(task.state, TaskState::Succeeded { .. })
            {
                task.state = TaskState::Pending;
                task.attempt += 1;
                changed = true;
            }
        }
        if changed {
            stage.attempts += 1;
            if stage.attempts > policy.stage_max_attempts {
                let attempts = stage.attempts - 1;
                job.fail(format!(
                    "stage {producer} failed after {attempts} attempts: its shuffle output was lost"
                ));
                return;
            }
            Self::invalidate_consumers(job, producer);
        }
    }

    fn invalidate_consumers(job: &mut Job, producer: u32) {
        for stage in job.stages.values_mut() {
            if stage.plan.inputs.contains(&producer) {
                stage.resolved = None;
            }
        }
    }

    /// Declare executors silent for longer than `timeout` lost; re-queue their work.
    /// Returns ids of the executors declared lost.
    pub fn expire_executors(&mut self, timeout: Duration) -> Vec<String> {
        let now = Instant::now();
        let lost: Vec<String> = self
            .executors
            .values()
            .filter(|e| e.alive && now.duration_since(e.last_seen) > timeout)
            .map(|e| e.id.clone())
            .collect();
        for id in &lost {
            self.executor_lost(id);
        }
        lost
    }

    /// Tasks whose launch request never reached `executor_id` go back to the queue as they
    /// were: they did not run, so they count neither as failures nor as crashes.
    pub fn unlaunched(&mut self, executor_id: &str, tasks: &[TaskLaunch]) {
        for t in tasks {
            let Some(task) = self
                .jobs
                .get_mut(&t.job_id)
                .and_then(|j| j.stages.get_mut(&t.stage_id))
                .and_then(|s| s.tasks.get_mut(t.partition as usize))
            else {
                continue;
            };
            if task.attempt == t.attempt
                && matches!(&task.state, TaskState::Running { executor_id: e, .. } if e == executor_id)
            {
                task.state = TaskState::Pending;
                task.attempt += 1;
                task.avoid = Some(executor_id.to_string());
            }
        }
    }

    /// Forget an executor: its running tasks go back to the queue, its shuffle files are lost.
    pub fn executor_lost(&mut self, executor_id: &str) {
        if let Some(e) = self.executors.get_mut(executor_id) {
            e.alive = false;
            e.free_slots = 0;
        }
        let policy = self.policy.clone();
        for job in self.jobs.values_mut() {
            if job.state != JobState::Running {
                continue;
            }
            // Output only matters to stages that still have to read it.
            let needed: Vec<u32> = job
                .stages
                .iter()
                .filter(|(id, _)| {
                    **id == job.final_stage
                        || job
                            .stages
                            .values()
                            .any(|c| c.plan.inputs.contains(id) && !c.is_complete())
                })
                .map(|(id, _)| *id)
                .collect();
            let mut lost_stages = Vec::new();
            let mut exhausted = None;
            for (stage_id, stage) in job.stages.iter_mut() {
                let output_needed = needed.contains(stage_id);
                let mut lost_output = false;
                for (partition, task) in stage.tasks.iter_mut().enumerate() {
                    match &task.state {
                        TaskState::Running { executor_id: e, .. } if e == executor_id => {
                            task.state = TaskState::Pending;
                            task.attempt += 1;
                            task.failures += 1;
                            task.avoid = Some(executor_id.to_string());
                            task.crashes += 1;
                            let message = format!("executor {executor_id} was lost");
                            task.last_error = Some(message.clone());
                            if task.crashes >= MAX_TASK_CRASHES && exhausted.is_none() {
                                exhausted = Some(format!(
                                    "task {partition} of stage {stage_id} was running on {} executors that were lost (last: {executor_id}); it likely brings its executor down, e.g. by allocating more memory than the machine has, so it is not retried",
                                    task.crashes
                                ));
                            }
                            if task.failures >= policy.task_max_attempts && exhausted.is_none() {
                                exhausted = Some(format!(
                                    "task {partition} of stage {stage_id} failed after {} attempts: {message}",
                                    task.failures
                                ));
                            }
                        }
                        TaskState::Succeeded { executor_id: e, .. }
                            if e == executor_id && output_needed =>
                        {
                            task.state = TaskState::Pending;
                            task.attempt += 1;
                            lost_output = true;
                        }
                        _ => {}
                    }
                }
                if lost_output {
                    stage.attempts += 1;
                    lost_stages.push((*stage_id, stage.attempts));
                }
            }
            if let Some(message) = exhausted {
                job.fail(message);
            }
            for (stage_id, attempts) in lost_stages {
                if attempts > policy.stage_max_attempts {
                    job.fail(format!(
                        "stage {stage_id} failed after {} attempts: its shuffle output was lost",
                        attempts - 1
                    ));
                }
                Self::invalidate_consumers(job, stage_id);
            }
            job.touch();
        }
    }

    /// Fail a job that has not ended.
    pub fn fail_job(&mut self, job_id: &str, message: String) {
        if let Some(job) = self.jobs.get_mut(job_id) {
            job.fail(message);
        }
    }

    /// Mark a job cancelled. Returns true when it was running.
    pub fn cancel_job(&mut self, job_id: &str) -> bool {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return false;
        };
        if job.state.is_final() {
            return false;
        }
        job.state = JobState::Cancelled;
        job.finished = Some(Instant::now());
        job.end_spans();
        job.touch();
        // Slots held by its running tasks come back when executors report them.
        true
    }

    /// Jobs finished more than `ttl` ago whose results were never released.
    pub fn expired_results(&self, ttl: Duration) -> Vec<String> {
        let now = Instant::now();
        self.jobs
            .values()
            .filter(|j| !j.released && j.finished.is_some_and(|f| now.duration_since(f) > ttl))
            .map(|j| j.id.clone())
            .collect()
    }

    /// Forget the oldest finished and released jobs beyond `keep`.
    pub fn prune_jobs(&mut self, keep: usize) {
        let finished: Vec<String> = self
            .job_order
            .iter()
            .filter(|id| {
                self.jobs
                    .get(*id)
                    .is_some_and(|j| j.state.is_final() && j.released)
            })
            .cloned()
            .collect();
        if finished.len() <= keep {
            return;
        }
        let drop: std::collections::HashSet<String> =
            finished[..finished.len() - keep].iter().cloned().collect();
        self.job_order.retain(|id| !drop.contains(id));
        self.jobs.retain(|id, _| !drop.contains(id));
    }

    /// Forget executors that were lost (or deregistered) longer than `retention` ago; the newest
    /// `keep` of them stay listed whatever their age. Returns how many were forgotten.
    pub fn prune_executors(&mut self, retention: Duration, keep: usize) -> usize {
        let now = Instant::now();
        let mut lost: Vec<(Instant, String)> = self
            .executors
            .values()
            .filter(|e| !e.alive)
            .map(|e| (e.last_seen, e.id.clone()))
            .collect();
        // Newest first: the first `keep` stay.
        lost.sort_unstable_by_key(|(seen, _)| std::cmp::Reverse(*seen));
        let forget: Vec<String> = lost
            .into_iter()
            .enumerate()
            .filter(|(i, (seen, _))| *i >= keep || now.duration_since(*seen) > retention)
            .map(|(_, (_, id))| id)
            .collect();
        for id in &forget {
            self.executors.remove(id);
        }
        forget.len()
    }

    /// Stage kinds, for records.
    pub fn stage_kind(stage: &StageState) -> StageKind {
        stage.plan.kind
    }
}

/// True when task read `read` takes `output`, written by map task `map` of stage `stage`.
fn reads_output(read: &TaskRead, stage: u32, map: usize, output: &PartitionLocation) -> bool {
    read.partitions
        .contains(&(output.output_partition as usize))
        && match &read.maps {
            Some((probe, maps)) if *probe == stage => maps.contains(&map),
            _ => true,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> ClusterState {
        let mut state = ClusterState::default();
        state.register_executor(
            "a".to_string(),
            "127.0.0.1".to_string(),
            1,
            2,
            String::new(),
        );
        state.register_executor(
            "b".to_string(),
            "127.0.0.1".to_string(),
            2,
            2,
            String::new(),
        );
        state
    }

    #[test]
    fn lost_executors_are_forgotten_after_retention() {
        let mut state = cluster();
        state.register_executor(
            "c".to_string(),
            "127.0.0.1".to_string(),
            3,
            2,
            String::new(),
        );
        let hour = Duration::from_secs(3600);
        state.executor_lost("a");
        state.executor_lost("c");
        state.executors.get_mut("a").unwrap().last_seen = Instant::now() - 2 * hour;
        // "c" was lost just now: kept; "a" is past the retention; "b" is alive.
        assert_eq!(state.prune_executors(hour, 10), 1);
        let mut ids: Vec<&str> = state.executors.keys().map(String::as_str).collect();
        ids.sort_unstable();
        assert_eq!(ids, vec!["b", "c"]);
        // Beyond the cap, the oldest lost ones go even when recent.
        state.executor_lost("b");
        state.executors.get_mut("b").unwrap().last_seen = Instant::now() - Duration::from_secs(5);
        assert_eq!(state.prune_executors(hour, 1), 1);
        assert_eq!(
            state.executors.keys().cloned().collect::<Vec<_>>(),
            vec!["c".to_string()]
        );
        // An alive executor is never pruned.
        state.register_executor(
            "d".to_string(),
            "127.0.0.1".to_string(),
            4,
            2,
            String::new(),
        );
        state.executors.get_mut("d").unwrap().last_seen = Instant::now() - 2 * hour;
        assert_eq!(state.prune_executors(hour, 0), 1);
        assert!(state.executors.contains_key("d"));
    }

    #[test]
    fn breaker_opens_after_repeated_failures_half_opens_and_closes() {
        let mut state = cluster();
        for _ in 0..Breaker::THRESHOLD {
            state.executors.get_mut("a").unwrap().breaker.failure();
        }
        assert_eq!(state.executors["a"].breaker.state(), "open");
        for _ in 0..4 {
            let picked = ClusterState::pick_executor(&state.executors, None, None);
            assert_eq!(
                picked.as_deref(),
                Some("b"),
                "no tasks go to an open breaker"
            );
        }
        // Cool-down over: one probe may go.
        state.executors.get_mut("a").unwrap().breaker.open_until =
            Some(Instant::now() - Duration::from_millis(1));
        state.executors.get_mut("b").unwrap().free_slots = 0;
        assert_eq!(state.executors["a"].breaker.state(), "half-open");
        assert_eq!(
            ClusterState::pick_executor(&state.executors, None, None).as_deref(),
            Some("a")
        );
        state.executors.get_mut("a").unwrap().breaker.placed();
        assert_eq!(
            ClusterState::pick_executor(&state.executors, None, None),
            None,
            "one probe at a time"
        );
        state.executors.get_mut("a").unwrap().breaker.success();
        assert_eq!(state.executors["a"].breaker.state(), "closed");
        assert_eq!(
            ClusterState::pick_executor(&state.executors, None, None).as_deref(),
            Some("a")
        );
        // A failed probe opens it again at once.
        state.executors.get_mut("a").unwrap().breaker.open_until =
            Some(Instant::now() - Duration::from_millis(1));
        assert!(state.executors.get_mut("a").unwrap().breaker.failure());
        assert_eq!(state.executors["a"].breaker.state(), "open");
    }

    #[test]
    fn prune_keeps_the_newest_released_jobs() {
        let mut state = cluster();
        let schema = Arc::new(datafusion::arrow::datatypes::Schema::empty());
        for i in 0..5 {
            state.add_inline_job(
                format!("j{i}"),
                String::new(),
                Arc::clone(&schema),
                Vec::new(),
            );
        }
        state.prune_jobs(2);
        assert_eq!(state.jobs.len(), 5, "unreleased jobs stay");
        for job in state.jobs.values_mut() {
            job.released = true;
        }
        state.prune_jobs(2);
        assert_eq!(state.job_order, ["j3", "j4"]);
        assert_eq!(state.jobs.len(), 2);
    }

    #[test]
    fn placement_least_loaded_round_robin_and_avoidance() {
        let mut state = cluster();
        state.executors.get_mut("a").unwrap().free_slots = 1;
        assert_eq!(
            ClusterState::pick_executor(&state.executors, None, None).as_deref(),
            Some("b"),
            "most free slots"
        );
        assert_eq!(
            ClusterState::pick_executor(&state.executors, Some("b"), None).as_deref(),
            Some("a"),
            "retry avoids b"
        );
        state.executors.get_mut("a").unwrap().free_slots = 0;
        assert_eq!(
            ClusterState::pick_executor(&state.executors, Some("b"), None).as_deref(),
            Some("b"),
            "b when nothing else"
        );
        state.executors.get_mut("a").unwrap().free_slots = 2;
        let mut cursor = 0;
        let picks: Vec<String> = (0..4)
            .filter_map(|_| ClusterState::pick_executor(&state.executors, None, Some(&mut cursor)))
            .collect();
        assert_eq!(picks, ["a", "b", "a", "b"]);
        state.drain_executor("a");
        assert_eq!(
            ClusterState::pick_executor(&state.executors, None, None).as_deref(),
            Some("b"),
            "draining gets nothing"
        );
    }
}
