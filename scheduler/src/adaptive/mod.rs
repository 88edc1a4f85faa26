//! L3: adaptive execution. Stages are re-planned from the real row and byte counts of the stages
//! they read, once those are done and before their own first task starts.
//!
//! * **Broadcast switch.** A stage whose partitioned hash join reads both sides straight from
//!   shuffle stages is a candidate: its probe-side stage waits for the build-side stage. When the
//!   build side turns out small (`volley.adaptive_broadcast_bytes`), the join becomes a
//!   `CollectLeft` (broadcast) join that reads the whole build side in every task, the probe-side
//!   stage's plan moves into the join stage and that stage never runs: the probe side (usually
//!   the fact table) is not shuffled at all.
//! * **Semi-join reduction.** In outer, semi, anti and mark joins that stay partitioned, one side
//!   matters only through its key matches (the probe side of left joins, the build side of
//!   right ones). When that side is a plain scan stage, it waits for the stage holding the other
//!   side's keys (found below row-local operators and semi/anti joins); if that one turns out
//!   small, the scan stage first keeps only rows whose join keys are there (a `CollectLeft`
//!   right-semi join against all of it), so rows that could never match are not shuffled
//!   (TPC-H q4 at SF1: 3.8M lineitem rows -> 145K; q21: 3.8M + 6M -> 250K + 357K).
//! * **Coalescing.** A stage that reads only hash-partitioned shuffle output runs one task per
//!   run of adjacent small partitions instead of one per partition.
//! * **Fusion.** A stage about to run as one task on at most `volley.adaptive_fuse_bytes` of
//!   input, whose only consumer would then be ready and can run as one task too, is not run on
//!   its own: the consumer runs its plan in place of the reader of it ([`fuse`]).
//! * **Idle start.** A stage waiting for a semi-join reduction's keys starts unfiltered when
//!   task slots would sit idle while the keys stage runs ([`idle`]).
//! * **Skew split.** In such a join stage, a partition whose probe side is far above the median
//!   is split into several tasks, each reading a range of the probe side's map outputs joined
//!   with the whole build-side partition.
//!
//! This layer reads a [`crate::job::Job`] and returns [`crate::job::StageEdit`]s; it never
//! writes state (the cluster layer applies the edits). The joins it may change are found by
//! [`crate::graph::joins`]; [`switch`] decides broadcast switches and semi-join reductions,
//! [`rewrite`] builds the new plans, [`regroup`] coalesces and splits tasks. Every decision is
//! an edit noting a [`crate::job::Decision`] on the stage: job state, JSON API, status page and
//! `EXPLAIN ANALYZE` show them.

pub mod fuse;
pub mod idle;
pub mod regroup;
pub mod rewrite;
pub mod switch;

pub use regroup::{MIN_PARTITION_BYTES, coalesce, split_maps};
pub use switch::{decide_switch, switch_candidates};

use volley_core::config::VolleyOptions;

use crate::job::{Job, StageEdit};

/// Edits for a stage about to launch its first task: coalesce small partitions and split
/// skewed ones from its inputs' real sizes (`slots`: task slots of the cluster); then, when it
/// runs as one task on little input, fuse it into the stage reading it (see [`mod@fuse`]).
pub fn before_launch(job: &Job, stage_id: u32, slots: usize) -> Vec<StageEdit> {
    let options = VolleyOptions::from_pairs(&job.settings);
    if !options.adaptive {
        return Vec::new();
    }
    let mut edits = Vec::new();
    let regrouped = regroup::regroup(job, stage_id, slots, &options).map(|(reads, notes)| {
        edits.push(StageEdit::Regroup(stage_id, reads.clone()));
        edits.extend(notes.into_iter().map(|n| StageEdit::Note(stage_id, n)));
        reads
    });
    // A plan that cannot be rewritten runs unfused.
    edits.extend(
        fuse::into_consumer(job, stage_id, regrouped.as_deref(), &options).unwrap_or_default(),
    );
    edits
}

#[cfg(test)]
mod tests;
