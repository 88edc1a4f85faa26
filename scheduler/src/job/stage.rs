//! One stage of a job: its plan, its tasks and its lifecycle.
//!
//! ```text
//! Waiting ──inputs done──▶ Ready ──first launch──▶ Running ──last task done──▶ Succeeded
//!    │     (adaptive regroup)                         ▲                          │
//!    └──broadcast switch──▶ Skipped                   └────── output lost ───────┘
//! ```
//! The phase records where the stage is; what users see (`pending`, `running`, `failed`, ...)
//! is derived from it once, by [`StageState::status`].

use std::collections::BTreeMap;
use std::time::Instant;

use crate::graph::{ShuffledJoin, StagePlan};
use crate::job::edit::{Decision, TaskRead};
use crate::job::task::{TaskInfo, TaskState};

/// Where a stage is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StagePhase {
    /// Waits for its inputs (or for a build side an adaptive decision depends on).
    Waiting,
    /// Inputs done and adaptive planning applied; no task launched yet.
    Ready,
    /// Tasks launched; also after lost output sent finished tasks back.
    Running {
        /// First launch.
        started: Instant,
    },
    /// Every task succeeded.
    Succeeded {
        /// First launch.
        started: Instant,
        /// Last task done.
        finished: Instant,
    },
    /// Never runs: a consumer reads its input directly (broadcast switch).
    Skipped,
}

/// What a stage looks like to users (status page, JSON API, cluster state RPC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageStatus {
    /// Not running yet.
    Pending,
    /// Tasks are running.
    Running,
    /// Done.
    Succeeded,
    /// Its job failed while this stage had failed tasks.
    Failed,
    /// Never ran (broadcast switch).
    Skipped,
}

impl StageStatus {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            StageStatus::Pending => "pending",
            StageStatus::Running => "running",
            StageStatus::Succeeded => "succeeded",
            StageStatus::Failed => "failed",
            StageStatus::Skipped => "skipped",
        }
    }
}

/// One stage of a running job.
#[derive(Debug)]
pub struct StageState {
    /// The plan as cut by the planner (adaptive execution may replace it before it runs).
    pub plan: StagePlan,
    /// Per-partition tasks.
    pub tasks: Vec<TaskInfo>,
    /// The stage's plan with resolved shuffle locations, encoded once for all its tasks.
    pub resolved: Option<crate::graph::trim::ResolvedPlan>,
    /// The plan as encoded at submit, its readers to be encoded again at launch (None once
    /// the plan changed, or for plans encoded whole).
    pub template: Option<std::sync::Arc<crate::graph::trim::Template>>,
    /// Times the stage was (re)started.
    pub attempts: u32,
    /// DataFusion metrics per operator (pre-order), summed over successful tasks.
    pub operator_metrics: Vec<BTreeMap<String, u64>>,
    /// Lifecycle.
    pub phase: StagePhase,
    /// Tracing span while the stage runs (parent of its tasks' spans on the executors).
    pub span: Option<tracing::Span>,
    /// Pending broadcast switch of its join, decided when the build stage is done.
    pub join_switch: Vec<ShuffledJoin>,
    /// Stages it waits for besides its inputs (a probe side waiting for its build side).
    pub wait_for: Vec<u32>,
    /// What each task reads from hash-partitioned inputs, once adaptive execution regrouped
    /// them (None: task `i` reads bucket `i`).
    pub reads: Option<Vec<TaskRead>>,
    /// Adaptive execution decisions, in order.
    pub adaptive: Vec<Decision>,
    /// Completed before a scheduler restart and taken over from the journal (not run again).
    pub resumed: bool,
}

impl StageState {
    /// A stage of `plan` waiting to run, its adaptive candidates noted.
    pub fn new(plan: StagePlan) -> Self {
        let join_switch = plan.adaptive_joins.clone();
        StageState {
            tasks: vec![TaskInfo::pending(); plan.partitions],
            adaptive: join_switch
                .iter()
                .copied()
                .map(Decision::Candidate)
                .collect(),
            plan,
            resolved: None,
            template: None,
            attempts: 1,
            operator_metrics: Vec::new(),
            phase: StagePhase::Waiting,
            span: None,
            join_switch,
            wait_for: Vec::new(),
            reads: None,
            resumed: false,
        }
    }

    /// True when every task succeeded (a stage without tasks is complete).
    pub fn is_complete(&self) -> bool {
        self.tasks.iter().all(TaskInfo::is_done)
    }

    /// Tasks done.
    pub fn done_count(&self) -> usize {
        self.tasks.iter().filter(|t| t.is_done()).count()
    }

    /// Rows and bytes its finished tasks wrote.
    pub fn output_size(&self) -> (u64, u64) {
        self.tasks
            .iter()
            .flat_map(TaskInfo::outputs)
            .fold((0, 0), |(r, b), l| (r + l.num_rows, b + l.num_bytes))
    }

    /// When its first task was launched.
    pub fn started(&self) -> Option<Instant> {
        match self.phase {
            StagePhase::Running { started } | StagePhase::Succeeded { started, .. } => {
                Some(started)
            }
            _ => None,
        }
    }

    /// When its last task finished (None while it runs).
    pub fn finished(&self) -> Option<Instant> {
        match self.phase {
            StagePhase::Succeeded { finished, .. } => Some(finished),
            _ => None,
        }
    }

    /// Waiting -> Ready (adaptive planning done). A prepared stage waits for nothing (a
    /// resumed job replays the preparation of a stage started before its keys stage was done:
    /// adaptive execution's idle start).
    pub fn mark_ready(&mut self) {
        self.wait_for.clear();
        if self.phase == StagePhase::Waiting {
            self.phase = StagePhase::Ready;
        }
    }

    /// Ready -> Running, when its tasks are launched.
    pub fn mark_launched(&mut self) {
        if matches!(self.phase, StagePhase::Waiting | StagePhase::Ready) {
            self.phase = StagePhase::Running {
                started: Instant::now(),
            };
        }
    }

    /// Running -> Succeeded, once its last task is done; its span closes.
    pub fn mark_succeeded(&mut self) {
        let started = self.started().unwrap_or_else(Instant::now);
        self.phase = StagePhase::Succeeded {
            started,
            finished: Instant::now(),
        };
        self.span = None;
    }

    /// Succeeded -> Running: lost output sent some of its tasks back (a new stage attempt).
    pub fn reopen(&mut self) {
        self.attempts += 1;
        if let StagePhase::Succeeded { started, .. } = self.phase {
            self.phase = StagePhase::Running { started };
        }
    }

    /// -> Skipped: a consumer reads its input directly.
    pub fn skip(&mut self) {
        self.tasks.clear();
        self.wait_for.clear();
        self.phase = StagePhase::Skipped;
    }

    /// What users see; `job_failed` when its job failed.
    pub fn status(&self, job_failed: bool) -> StageStatus {
        let complete = self.is_complete();
        if self.phase == StagePhase::Skipped {
            StageStatus::Skipped
        } else if complete {
            StageStatus::Succeeded
        } else if job_failed && self.tasks.iter().any(|t| t.last_error.is_some()) {
            StageStatus::Failed
        } else if self.started().is_some()
            && self
                .tasks
                .iter()
                .any(|t| matches!(t.state, TaskState::Running { .. }))
        {
            StageStatus::Running
        } else {
            StageStatus::Pending
        }
    }
}
