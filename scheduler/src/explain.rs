//! L5: one formatter for EXPLAIN (the stages a query will run) and EXPLAIN ANALYZE (the
//! stages as they ran: tasks, rows, adaptive decisions), one line per stage.

use std::fmt::Write as _;
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::physical_plan::{ExecutionPlan, Partitioning};
use volley_core::plan::{ShuffleReaderExec, ShuffleWriterExec};

use crate::graph::StagePlan;
use crate::job::stage::StageState;
use crate::job::{Decision, Job, StagePhase};

/// Schema of EXPLAIN answers: one `plan` line per row.
pub fn plan_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new("plan", DataType::Utf8, false)]))
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
                .map(|join| Decision::candidate(*join).to_string())
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
    let adaptive = adaptive_note(stage.adaptive.iter().map(|d| d.what.as_str()));
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
        stage.adaptive.push(Decision::new("coalesced", "1 KiB"));
        assert_eq!(
            analyze_line(&stage),
            "Stage 1: kind=result done tasks=1 inputs=[] rows=0 adaptive=[coalesced]"
        );
    }
}
