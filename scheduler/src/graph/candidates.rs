//! Which stages adaptive execution may re-plan at run time: marks the joins whose broadcast
//! switch or semi-join reduction is decided once their build side's real size is known.

use std::sync::Arc;

use datafusion::physical_plan::{ExecutionPlan, StatisticsArgs, StatisticsContext};

use crate::graph::joins::{
    ShuffledJoin, filterable_joins, readers_of, restricts_rows, shuffled_join,
};
use crate::graph::{StageKind, StagePlan};

/// Mark the stages whose partitioned join may become a broadcast join (or, for left
/// outer/semi/anti/mark joins, have its probe stage filtered by the build side's keys) at run
/// time: both sides are shuffle stages and the probe side feeds nothing else.
pub fn mark_broadcast_candidates(stages: &mut [StagePlan]) {
    let candidates: Vec<(usize, ShuffledJoin)> = stages
        .iter()
        .enumerate()
        .flat_map(|(index, stage)| {
            let plan = Arc::clone(&stage.plan) as Arc<dyn ExecutionPlan>;
            // A broadcast switch moves the probe stage into this one; the filters only
            // change probe stages, so several may apply to one stage.
            let joins = match shuffled_join(&plan) {
                Some(join) => vec![join],
                None => filterable_joins(&plan),
            };
            joins.into_iter().map(move |join| (index, join))
        })
        .filter(|(_, join)| {
            let is_kind = |id: u32, kind: StageKind| {
                stages.iter().any(|s| s.stage_id == id && s.kind == kind)
            };
            let shuffle = |id: u32| is_kind(id, StageKind::Shuffle);
            let probe_consumers = stages
                .iter()
                .filter(|s| s.inputs.contains(&join.probe))
                .count();
            // A filtered probe stage must scan, or read broadcast stages only: its tasks then
            // read nothing that adaptive regrouping could narrow, and the build side is read
            // whole.
            let plain_probe = !join.probe_filter
                || stages
                    .iter()
                    .find(|s| s.stage_id == join.probe)
                    .is_some_and(|s| s.inputs.iter().all(|&i| is_kind(i, StageKind::Broadcast)));
            // Keys of a whole table (no filter, no join below them) would keep nearly every
            // row: TPC-H q13's orders filtered by all customers kept 1,483,918 of 1,483,918.
            let selective_keys = !join.probe_filter
                || stages
                    .iter()
                    .find(|s| s.stage_id == join.build)
                    .is_some_and(|s| {
                        restricts_rows(&(Arc::clone(&s.plan) as Arc<dyn ExecutionPlan>))
                    });
            shuffle(join.build)
                && shuffle(join.probe)
                && probe_consumers == 1
                && plain_probe
                && selective_keys
        })
        .collect();
    // A semi join may filter either side by the other's keys; the filtered stage waits for
    // the keys stage, so the way whose keys stage is expected to be smaller is kept (TPC-DS
    // q83: 21 dates filter 68K returns, not the other way round), the first on a tie.
    let candidates: Vec<(usize, ShuffledJoin)> = candidates
        .iter()
        .enumerate()
        .filter(|(at, (index, join))| {
            !candidates
                .iter()
                .enumerate()
                .any(|(other_at, (other_index, other))| {
                    other_index == index
                        && (other.build, other.probe) == (join.probe, join.build)
                        && (estimated_rows(stages, other.build), other_at)
                            < (estimated_rows(stages, join.build), *at)
                })
        })
        .map(|(_, candidate)| *candidate)
        .collect();
    // The probe stage's output changes (moved, or filtered), so the join stage must read it in
    // this one join only, and a probe stage is filtered for one join at most.
    let candidates: Vec<(usize, ShuffledJoin)> = candidates
        .iter()
        .filter(|(index, join)| {
            let plan = Arc::clone(&stages[*index].plan) as Arc<dyn ExecutionPlan>;
            readers_of(&plan, join.probe) == 1
                && candidates
                    .iter()
                    .filter(|(_, j)| j.probe == join.probe)
                    .count()
                    == 1
        })
        .copied()
        .collect();
    for (index, join) in candidates {
        stages[index].adaptive_joins.push(join);
    }
}

/// Rows DataFusion's statistics expect from a stage that reads no other stage (unknown: the
/// most).
fn estimated_rows(stages: &[StagePlan], id: u32) -> usize {
    stages
        .iter()
        .find(|s| s.stage_id == id && s.inputs.is_empty())
        .and_then(|s| {
            StatisticsContext::new()
                .compute(s.plan.input().as_ref(), &StatisticsArgs::new())
                .ok()
        })
        .and_then(|statistics| statistics.num_rows.get_value().copied())
        .unwrap_or(usize::MAX)
}
