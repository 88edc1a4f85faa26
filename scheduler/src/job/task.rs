//! One task (one partition of a stage): its lifecycle, what launching it carries and how its
//! executor reports it.
//!
//! ```text
//! Pending ──launch──▶ Running ──success──▶ Succeeded
//!    ▲                   │                     │
//!    └──── requeue ──────┴─────────────────────┘
//!     (failed, executor lost,     (output lost: executor gone,
//!      never launched, aborted)    failed fetch downstream)
//! ```
//! [`TaskInfo::requeue`] is the one way back to `Pending`; [`Requeue`] says why, and so what
//! it counts (a failure, a crash, neither).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use volley_core::shuffle::PartitionLocation;

/// Executors a task may take down with it before its job fails instead of retrying it on the
/// next one (a task that aborts its process, say on a huge allocation, would kill them all).
pub const MAX_TASK_CRASHES: u32 = 2;

/// Lifecycle of one task.
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

/// Why a task goes back to `Pending`.
#[derive(Debug, Clone, Copy)]
pub enum Requeue<'a> {
    /// Its launch never reached this executor: it did not run, nothing is counted.
    Unlaunched(&'a str),
    /// The attempt failed on this executor with this error.
    Failed(&'a str, &'a str),
    /// The executor running it was lost: a failure and a crash.
    Crashed(&'a str),
    /// Its output is gone: run it again.
    OutputLost,
    /// Its job ended and the attempt was stopped.
    Aborted,
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

    /// A task not launched yet whose first attempt is `attempt`.
    pub fn pending_at(attempt: u32) -> Self {
        TaskInfo {
            attempt,
            ..Self::pending()
        }
    }

    /// Pending -> Running on `executor_id`.
    pub fn launch(&mut self, executor_id: &str) {
        self.state = TaskState::Running {
            executor_id: executor_id.to_string(),
            started: Instant::now(),
        };
        self.started_at = Some(SystemTime::now());
        self.last_executor = Some(executor_id.to_string());
    }

    /// Back to `Pending` for a new attempt (see [`Requeue`]).
    pub fn requeue(&mut self, why: Requeue<'_>) {
        self.state = TaskState::Pending;
        self.attempt += 1;
        match why {
            Requeue::Unlaunched(executor) => self.avoid = Some(executor.to_string()),
            Requeue::Failed(executor, message) => {
                self.failures += 1;
                self.last_error = Some(message.to_string());
                self.avoid = Some(executor.to_string());
            }
            Requeue::Crashed(executor) => {
                self.failures += 1;
                self.crashes += 1;
                self.last_error = Some(format!("executor {executor} was lost"));
                self.avoid = Some(executor.to_string());
            }
            Requeue::OutputLost | Requeue::Aborted => {}
        }
    }

    /// True when attempt `attempt` of this task runs on `executor_id` now.
    pub fn is_running(&self, executor_id: &str, attempt: u32) -> bool {
        self.attempt == attempt
            && matches!(&self.state, TaskState::Running { executor_id: e, .. } if e == executor_id)
    }

    /// True when the task is done.
    pub fn is_done(&self) -> bool {
        matches!(self.state, TaskState::Succeeded { .. })
    }

    /// Files of a finished task (none otherwise).
    pub fn outputs(&self) -> &[PartitionLocation] {
        match &self.state {
            TaskState::Succeeded { outputs, .. } => outputs,
            _ => &[],
        }
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
    /// Object store options of its job.
    pub stores: Arc<Vec<(String, volley_core::stores::StoreOptions)>>,
    /// Span of its stage: the parent of the task's span on the executor.
    pub span: tracing::Span,
    /// Largest output it returns inside its status report (the one task of a result stage;
    /// 0 for every other task).
    pub inline_limit: u64,
}

/// One shuffle output a task reported.
#[derive(Debug, Clone)]
pub struct TaskOutput {
    /// Output bucket.
    pub output_partition: u32,
    /// Path of the file (or of the output held in the executor's memory).
    pub path: String,
    /// Rows.
    pub num_rows: u64,
    /// Bytes.
    pub num_bytes: u64,
    /// Held in the executor's memory, not a file.
    pub in_memory: bool,
}

/// How a task attempt ended, as reported by its executor.
#[derive(Debug, Clone)]
pub enum TaskOutcome {
    /// It wrote these outputs.
    Succeeded {
        /// Outputs written.
        outputs: Vec<TaskOutput>,
        /// Duration.
        elapsed: Duration,
        /// Operator metrics (pre-order): name, value.
        metrics: Vec<Vec<(String, u64)>>,
        /// The whole output of a result stage's one task, as an Arrow IPC stream, when it was
        /// small enough to come with the report.
        inline: Option<Vec<u8>>,
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

impl TaskOutcome {
    /// A failure that says the executor may be unhealthy (not a user error, a memory limit or
    /// someone else's lost output): counts against its circuit breaker.
    pub fn blames_executor(&self) -> bool {
        matches!(
            self,
            TaskOutcome::Failed {
                retryable: true,
                out_of_memory: false,
                fetch_failure: None,
                ..
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requeue_counts_what_each_reason_means() {
        let mut task = TaskInfo::pending();
        task.launch("a");
        assert!(task.is_running("a", 0));
        assert!(!task.is_running("a", 1) && !task.is_running("b", 0));
        task.requeue(Requeue::Unlaunched("a"));
        assert_eq!((task.attempt, task.failures, task.crashes), (1, 0, 0));
        assert_eq!(task.avoid.as_deref(), Some("a"));
        task.launch("b");
        task.requeue(Requeue::Failed("b", "boom"));
        assert_eq!((task.attempt, task.failures, task.crashes), (2, 1, 0));
        assert_eq!(task.last_error.as_deref(), Some("boom"));
        task.launch("a");
        task.requeue(Requeue::Crashed("a"));
        assert_eq!((task.attempt, task.failures, task.crashes), (3, 2, 1));
        assert_eq!(task.last_error.as_deref(), Some("executor a was lost"));
        task.requeue(Requeue::OutputLost);
        assert_eq!((task.attempt, task.failures), (4, 2));
        assert!(matches!(task.state, TaskState::Pending));
    }
}
