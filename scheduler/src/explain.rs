//! L5: one formatter for EXPLAIN (the stages a query will run) and EXPLAIN ANALYZE (the
//! stages as they ran: tasks, rows, adaptive decisions), one line per stage; and the text of
//! adaptive decisions, which the JSON API and status page show too.

use std::fmt::Write as _;
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::physical_plan::{ExecutionPlan, Partitioning};
use volley_core::plan::{ShuffleReaderExec, ShuffleWriterExec};

use crate::fmt::bytes;
use crate::graph::StagePlan;
use crate::job::edit::Size;
use crate::job::stage::StageState;
use crate::job::{Decision, Job, StagePhase};

/// Schema of EXPLAIN answers: one `plan` line per row.
pub fn plan_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new("plan", DataType::Utf8, false)]))
}

/// What a decision decided.
pub fn decision_what(decision: &Decision) -> String {
    match decision {
        Decision::Candidate(join) if join.probe_filter => format!(
            "filter stage {} by the join keys of stage {} if it is small; stage {} waits for it",
            join.probe, join.build, join.probe
        ),
        Decision::Candidate(join) => format!(
            "broadcast join if stage {} is small; stage {} waits for it",
            join.build, join.probe
        ),
        Decision::KeptJoin { build, too_big, .. } if *too_big => {
            format!("kept partitioned join: build side (stage {build}) too big")
        }
        Decision::KeptJoin { .. } => {
            "kept partitioned join: probe side already started".to_string()
        }
        Decision::Broadcast { build, probe, .. } => format!(
            "switched to broadcast join: build side (stage {build}) is small; stage {probe} \
             skipped, its input read directly"
        ),
        Decision::Skipped { by } => {
            format!("skipped: stage {by} reads this input directly (broadcast join)")
        }
        Decision::Fused { stage, .. } => {
            format!("fused: runs stage {stage}'s plan in its one task")
        }
        Decision::FusedInto { by } => {
            format!("skipped: fused into stage {by}, whose one task runs this plan")
        }
        Decision::Filtered { probe, build, .. } => {
            format!("filtered stage {probe} by the join keys of stage {build}: build side is small")
        }
        Decision::KeptUnfiltered { probe, started, .. } if *started => {
            format!("kept stage {probe} unfiltered: it already started")
        }
        Decision::KeptUnfiltered { probe, build, .. } => {
            format!("kept stage {probe} unfiltered: build side (stage {build}) too big")
        }
        Decision::StartedIdle { build } => format!(
            "started without waiting for the join keys of stage {build}: task slots were idle"
        ),
        Decision::KeepsKeysOf { build, .. } => format!(
            "keeps only rows whose join keys are in stage {build} (semi-join reduction before \
             the shuffle)"
        ),
        Decision::Coalesced {
            partitions, tasks, ..
        } => format!("coalesced {partitions} shuffle partitions into {tasks} tasks"),
        Decision::SplitSkew { bucket, tasks, .. } => {
            format!("split skewed partition {bucket} into {tasks} tasks by probe-side map output")
        }
    }
}

/// The sizes a decision was taken on (empty when none).
pub fn decision_sizes(decision: &Decision) -> String {
    let size = |s: &Size| format!("{} rows, {}", s.rows, bytes(s.bytes));
    match decision {
        Decision::Candidate(_)
        | Decision::Skipped { .. }
        | Decision::FusedInto { .. }
        | Decision::StartedIdle { .. } => String::new(),
        Decision::Fused { bytes: b, .. } => format!("{} of input", bytes(*b)),
        Decision::KeptJoin { size: s, .. }
        | Decision::Broadcast { size: s, .. }
        | Decision::Filtered { size: s, .. }
        | Decision::KeptUnfiltered { size: s, .. }
        | Decision::KeepsKeysOf { size: s, .. } => size(s),
        Decision::Coalesced { total, target, .. } => format!(
            "{} in all, target {} per task",
            bytes(*total),
            bytes(*target)
        ),
        Decision::SplitSkew { size, median, .. } => {
            format!("{} of probe side, median {}", bytes(*size), bytes(*median))
        }
    }
}

/// `what (sizes)`, or `what` when there are no sizes.
impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sizes = decision_sizes(self);
        if sizes.is_empty() {
            write!(f, "{}", decision_what(self))
        } else {
            write!(f, "{} ({sizes})", decision_what(self))
        }
    }
}

/// One line of a stage: `Stage N: kind=K <state> partitions|tasks=.. inputs=[..]`, then what
/// follows.
fn stage_line(stage: &StagePlan, state: &str, count: &str, tail: &str) -> String {
    let inputs: Vec<String> = stage.inputs.iter().map(u32::to_string).collect();
    format!(
        "Stage {}: kind={}{state} {count} inputs=[{}]{tail}",
        stage.stage_id,
        stage.kind.as_str(),
        inputs.join(" "),
    )
}

/// ` adaptive=[a; b]`, or nothing.
fn adaptive_note<'a>(notes: impl Iterator<Item = &'a str>) -> String {
    let notes: Vec<&str> = notes.collect();
    if notes.is_empty() {
        String::new()
    } else {
        format!(" adaptive=[{}]", notes.join("; "))
    }
}

/// EXPLAIN: one line per stage: id, kind, task count, inputs, adaptive candidates and
/// operators (pre-order).
pub fn explain_stages(stages: &[StagePlan]) -> Vec<String> {
    stages
        .iter()
        .map(|stage| {
            let mut ops = String::new();
            let writer: Arc<dyn ExecutionPlan> = Arc::clone(&stage.plan) as Arc<dyn ExecutionPlan>;
            operators(&writer, &mut ops);
            let notes: Vec<String> = stage
                .adaptive_joins
                .iter()
                .map(|join| Decision::Candidate(*join).to_string())
                .collect();
            let adaptive = adaptive_note(notes.iter().map(String::as_str));
            let count = format!("partitions={}", stage.partitions);
            stage_line(stage, "", &count, &format!("{adaptive} operators: {ops}"))
        })
        .collect()
}

/// EXPLAIN ANALYZE: one line per stage of a finished job: kind, tasks, rows written, adaptive
/// decisions.
pub fn analyze_lines(job: &Job) -> Vec<String> {
    job.stages.values().map(analyze_line).collect()
}

fn analyze_line(stage: &StageState) -> String {
    let (rows, _) = stage.output_size();
    let state = if stage.phase == StagePhase::Skipped {
        " skipped"
    } else {
        " done"
    };
    let whats: Vec<String> = stage.adaptive.iter().map(decision_what).collect();
    let adaptive = adaptive_note(whats.iter().map(String::as_str));
    let count = format!("tasks={}", stage.tasks.len());
    stage_line(
        &stage.plan,
        state,
        &count,
        &format!(" rows={rows}{adaptive}"),
    )
}

fn operators(plan: &Arc<dyn ExecutionPlan>, out: &mut String) {
    let _ = write!(out, "{}", plan.name());
    if let Some(reader) = plan.downcast_ref::<ShuffleReaderExec>() {
        let _ = write!(out, "[stage {}]", reader.stage_id());
    }
    if let Some(writer) = plan.downcast_ref::<ShuffleWriterExec>() {
        match writer.shuffle_partitioning() {
            Some(Partitioning::Hash(_, n)) => {
                let _ = write!(out, "[hash {n}]");
            }
            Some(p) => {
                let _ = write!(out, "[{} buckets]", p.partition_count());
            }
            None => {}
        }
    }
    let children = plan.children();
    match children.len() {
        0 => {}
        1 => {
            out.push_str(" <- ");
            operators(children[0], out);
        }
        _ => {
            out.push_str(" <- (");
            for (i, child) in children.iter().enumerate() {
                if i > 0 {
                    out.push_str("; ");
                }
                operators(child, out);
            }
            out.push(')');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::StageKind;
    use datafusion::physical_plan::empty::EmptyExec;

    #[test]
    fn explain_and_analyze_share_the_stage_line() {
        let schema = plan_schema();
        let input: Arc<dyn ExecutionPlan> = Arc::new(EmptyExec::new(schema));
        let plan = StagePlan {
            stage_id: 1,
            plan: Arc::new(ShuffleWriterExec::new("j", 1, input, None)),
            inputs: Vec::new(),
            partitions: 1,
            kind: StageKind::Result,
            adaptive_joins: Vec::new(),
        };
        assert_eq!(
            explain_stages(std::slice::from_ref(&plan)),
            [
                "Stage 1: kind=result partitions=1 inputs=[] operators: ShuffleWriterExec <- EmptyExec"
            ]
        );
        let mut stage = StageState::new(plan);
        stage.adaptive.push(Decision::Coalesced {
            partitions: 4,
            tasks: 1,
            total: 1024,
            target: 1 << 20,
        });
        assert_eq!(
            analyze_line(&stage),
            "Stage 1: kind=result done tasks=1 inputs=[] rows=0 adaptive=[coalesced 4 shuffle partitions into 1 tasks]"
        );
    }
}
