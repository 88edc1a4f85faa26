//! L1: the planned stage DAG, pure plan code. A job's physical plan is cut into stages at its
//! exchanges ([`cut`]), keeping small scanned build sides in their joins' stages ([`inline`]); the joins adaptive execution may change are recognised here
//! ([`joins`], [`candidates`]); scan stages are filtered by the selective build sides of the
//! inner joins they feed ([`key_filters`]); Parquet scans get balanced task shares ([`scan_balance`]);
//! table writes are split across tasks ([`writes`]); stages building broadcast hash tables run
//! their partitions in one task when a slot has the cores for them ([`group`]); each task gets a plan with only its own
//! files when a scan has many ([`trim`]); a stage identical to one cut before is read
//! instead of cut again ([`reuse`]).
//! Nothing here knows about tasks, executors or the network.

use std::sync::Arc;

use volley_core::plan::ShuffleWriterExec;

pub mod candidates;
pub mod cut;
pub mod group;
pub mod inline;
pub mod joins;
pub mod key_filters;
pub mod reuse;
pub mod scan_balance;
pub mod trim;
pub mod writes;

pub use candidates::mark_broadcast_candidates;
pub use cut::plan_stages;
pub use joins::ShuffledJoin;
pub use key_filters::add_key_filters;

/// What a stage's output is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageKind {
    /// Hash-partitioned shuffle consumed partition by partition.
    Shuffle,
    /// One file per task, merged or coalesced by a single consumer task.
    Merge,
    /// One file per task, read in full by every task of the consumer (join build side).
    Broadcast,
    /// The job's result, fetched by the client.
    Result,
}

impl StageKind {
    /// Lower-case name used in EXPLAIN and state records.
    pub fn as_str(self) -> &'static str {
        match self {
            StageKind::Shuffle => "shuffle",
            StageKind::Merge => "merge",
            StageKind::Broadcast => "broadcast",
            StageKind::Result => "result",
        }
    }
}

/// One stage of a job: a plan ending in a [`ShuffleWriterExec`], run as one task per partition.
#[derive(Debug, Clone)]
pub struct StagePlan {
    /// Stage id, unique within the job; inputs always have smaller ids.
    pub stage_id: u32,
    /// The stage's plan; its readers have no locations yet.
    pub plan: Arc<ShuffleWriterExec>,
    /// Stages whose output this stage reads.
    pub inputs: Vec<u32>,
    /// Number of tasks.
    pub partitions: usize,
    /// What the output is for.
    pub kind: StageKind,
    /// Adaptive execution may turn this stage's partitioned join into a broadcast join, or
    /// filter its probe stage by the build side's keys, once the build side's real size is
    /// known (see the scheduler's `adaptive` module).
    pub adaptive_joins: Vec<ShuffledJoin>,
}
