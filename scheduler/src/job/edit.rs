//! Edits adaptive execution asks for, as data: the adaptive layer reads a job and returns
//! [`StageEdit`]s; [`crate::job::Job::apply`] is the only code that carries them out.

use std::ops::Range;
use std::sync::Arc;

use datafusion::physical_plan::ExecutionPlan;

use crate::graph::ShuffledJoin;
use crate::job::Job;
use crate::job::task::TaskInfo;

/// Rows and bytes of a finished stage's output, which a decision was taken on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    /// Rows.
    pub rows: u64,
    /// Bytes.
    pub bytes: u64,
}

/// One adaptive decision about a stage, as data: what was decided and the sizes it was decided
/// on (deterministic for given data). Rendered to text only by the explain layer (L5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Planning found a broadcast-switch or semi-join reduction candidate.
    Candidate(ShuffledJoin),
    /// The join stays partitioned: the build side is too big, or the probe side started.
    KeptJoin {
        /// Build-side stage.
        build: u32,
        /// True: too big; false: the probe side already started.
        too_big: bool,
        /// Build side's output.
        size: Size,
    },
    /// The join became a broadcast join; the probe stage is skipped.
    Broadcast {
        /// Build-side stage.
        build: u32,
        /// Probe-side stage, now skipped.
        probe: u32,
        /// Build side's output.
        size: Size,
    },
    /// This stage never runs: stage `by` reads its input directly.
    Skipped {
        /// The join stage that took over its plan.
        by: u32,
    },
    /// This stage runs stage `stage`'s plan in its one task (fused: that stage never runs).
    Fused {
        /// The stage whose plan it took over.
        stage: u32,
        /// Shuffle bytes of the fused stage's inputs.
        bytes: u64,
    },
    /// This stage never runs: stage `by` runs its plan in its one task.
    FusedInto {
        /// The consumer that took over its plan.
        by: u32,
    },
    /// Stage `probe` is filtered by the keys of stage `build` (on the join stage).
    Filtered {
        /// Filtered stage.
        probe: u32,
        /// Keys stage.
        build: u32,
        /// Keys stage's output.
        size: Size,
    },
    /// Stage `probe` stays unfiltered: it started, or the keys stage is too big.
    KeptUnfiltered {
        /// Stage that was to be filtered.
        probe: u32,
        /// Keys stage.
        build: u32,
        /// True: it already started; false: the keys are too big.
        started: bool,
        /// Keys stage's output.
        size: Size,
    },
    /// This stage was to wait for the keys of stage `build` (a semi-join reduction) but
    /// started unfiltered: task slots were idle while that stage ran.
    StartedIdle {
        /// Keys stage.
        build: u32,
    },
    /// This stage keeps only rows whose join keys are in stage `build`.
    KeepsKeysOf {
        /// Keys stage.
        build: u32,
        /// Keys stage's output.
        size: Size,
    },
    /// Shuffle partitions coalesced into fewer tasks.
    Coalesced {
        /// Partitions before.
        partitions: usize,
        /// Tasks after.
        tasks: usize,
        /// Bytes of all of them.
        total: u64,
        /// Bytes targeted per task.
        target: u64,
    },
    /// A skewed partition split by the probe side's map outputs.
    SplitSkew {
        /// The partition.
        bucket: usize,
        /// Tasks it became.
        tasks: usize,
        /// Its probe-side bytes.
        size: u64,
        /// Median probe-side bytes of a partition.
        median: u64,
    },
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
                let floor = self.attempt_floor;
                let Some(stage) = self.stages.get_mut(&stage) else {
                    return;
                };
                stage.plan.plan = Arc::new(stage.plan.plan.with_input(input));
                stage.template = None;
                stage.plan.inputs.retain(|s| Some(*s) != drop_input);
                for input in add_inputs {
                    if !stage.plan.inputs.contains(&input) {
                        stage.plan.inputs.push(input);
                    }
                }
                if let Some(partitions) = partitions {
                    stage.plan.partitions = partitions;
                    stage.tasks = vec![TaskInfo::pending_at(floor); partitions];
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
                let floor = self.attempt_floor;
                if let Some(stage) = self.stages.get_mut(&stage) {
                    stage.tasks = vec![TaskInfo::pending_at(floor); reads.len()];
                    stage.reads = Some(reads);
                    stage.resolved = None;
                }
            }
        }
    }
}
