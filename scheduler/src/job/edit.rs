//! Edits adaptive execution asks for, as data: the adaptive layer reads a job and returns
//! [`StageEdit`]s; [`crate::job::Job::apply`] is the only code that carries them out.

use std::ops::Range;
use std::sync::Arc;

use datafusion::physical_plan::ExecutionPlan;

use crate::graph::ShuffledJoin;
use crate::job::Job;
use crate::job::task::TaskInfo;

/// One adaptive decision about a stage: what was decided, and the sizes it was decided on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The decision (deterministic for given data; shown by EXPLAIN ANALYZE).
    pub what: String,
    /// Sizes behind it (rows, bytes), empty when none.
    pub sizes: String,
}

impl Decision {
    /// A decision and the sizes behind it.
    pub fn new(what: impl Into<String>, sizes: impl Into<String>) -> Self {
        Decision {
            what: what.into(),
            sizes: sizes.into(),
        }
    }

    /// The note a broadcast-switch or semi-join reduction candidate starts with.
    pub fn candidate(join: ShuffledJoin) -> Self {
        let what = if join.probe_filter {
            format!(
                "filter stage {} by the join keys of stage {} if it is small; stage {} waits for it",
                join.probe, join.build, join.probe
            )
        } else {
            format!(
                "broadcast join if stage {} is small; stage {} waits for it",
                join.build, join.probe
            )
        };
        Decision::new(what, "")
    }
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.sizes.is_empty() {
            write!(f, "{}", self.what)
        } else {
            write!(f, "{} ({})", self.what, self.sizes)
        }
    }
}

/// What one task of an adaptively planned stage reads from its hash-partitioned inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRead {
    /// Shuffle partitions (buckets) read from every hash-partitioned input.
    pub partitions: Range<usize>,
    /// Skew split: from this input stage, only the outputs of these map tasks.
    pub maps: Option<(u32, Range<usize>)>,
}

/// One change to a job's stages.
#[derive(Debug, Clone)]
pub enum StageEdit {
    /// Record a decision on a stage.
    Note(u32, Decision),
    /// A decided switch candidate leaves the stage's pending list.
    Decided(u32, ShuffledJoin),
    /// The stage stops waiting for another one.
    StopWaiting {
        /// Stage that waited.
        stage: u32,
        /// Stage it waited for.
        on: u32,
    },
    /// A new plan for the stage (its writer's input).
    Replan {
        /// Stage.
        stage: u32,
        /// New input of its shuffle writer.
        input: Arc<dyn ExecutionPlan>,
        /// Input stage it no longer reads.
        drop_input: Option<u32>,
        /// Input stages it now reads.
        add_inputs: Vec<u32>,
        /// New task count (tasks start over), or None to keep the tasks.
        partitions: Option<usize>,
    },
    /// Pending switch candidates of one stage now concern another (which runs its plan).
    Inherit {
        /// Stage whose candidates move.
        from: u32,
        /// Stage they move to.
        to: u32,
    },
    /// The stage never runs.
    Skip(u32),
    /// The stage's tasks read these groups of partitions instead of one partition each.
    Regroup(u32, Vec<TaskRead>),
}

impl Job {
    /// Carry out adaptive edits, in order.
    pub fn apply(&mut self, edits: Vec<StageEdit>) {
        for edit in edits {
            self.apply_one(edit);
        }
    }

    fn apply_one(&mut self, edit: StageEdit) {
        match edit {
            StageEdit::Note(stage, decision) => {
                if let Some(stage) = self.stages.get_mut(&stage) {
                    stage.adaptive.push(decision);
                }
            }
            StageEdit::Decided(stage, join) => {
                if let Some(stage) = self.stages.get_mut(&stage) {
                    stage.join_switch.retain(|j| *j != join);
                }
            }
            StageEdit::StopWaiting { stage, on } => {
                if let Some(stage) = self.stages.get_mut(&stage) {
                    stage.wait_for.retain(|s| *s != on);
                }
            }
            StageEdit::Replan {
                stage,
                input,
                drop_input,
                add_inputs,
                partitions,
            } => {
                let Some(stage) = self.stages.get_mut(&stage) else {
                    return;
                };
                stage.plan.plan = Arc::new(stage.plan.plan.with_input(input));
                stage.plan.inputs.retain(|s| Some(*s) != drop_input);
                for input in add_inputs {
                    if !stage.plan.inputs.contains(&input) {
                        stage.plan.inputs.push(input);
                    }
                }
                if let Some(partitions) = partitions {
                    stage.plan.partitions = partitions;
                    stage.tasks = vec![TaskInfo::pending(); partitions];
                }
                stage.resolved = None;
            }
            StageEdit::Inherit { from, to } => {
                let moved = self
                    .stages
                    .get_mut(&from)
                    .map(|s| std::mem::take(&mut s.join_switch))
                    .unwrap_or_default();
                if let Some(stage) = self.stages.get_mut(&to) {
                    stage.join_switch.extend(moved);
                }
            }
            StageEdit::Skip(stage) => {
                if let Some(stage) = self.stages.get_mut(&stage) {
                    stage.skip();
                }
            }
            StageEdit::Regroup(stage, reads) => {
                if let Some(stage) = self.stages.get_mut(&stage) {
                    stage.tasks = vec![TaskInfo::pending(); reads.len()];
                    stage.reads = Some(reads);
                    stage.resolved = None;
                }
            }
        }
    }
}
