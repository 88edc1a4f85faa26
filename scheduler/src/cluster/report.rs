//! Status reports as the cluster sees them: the executor's slot and counters, the job's
//! transition, and — when a stage completes — the adaptive decisions that depended on it.

use datafusion::error::Result;

use crate::adaptive;
use crate::cluster::ClusterState;
use crate::cluster::journal::emit;
use crate::job::report::{Origin, Reported};
use crate::job::{Job, TaskOutcome};

impl ClusterState {
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
        let (host, port) = self
            .executors
            .get(executor_id)
            .map(|e| (e.host.clone(), e.port))
            .unwrap_or_default();
        let blames_executor = outcome.blames_executor();
        let job = self.jobs.get_mut(job_id)?;
        let origin = Origin {
            executor_id,
            host: &host,
            port,
        };
        let reported = job.report(origin, stage_id, partition, attempt, outcome, &self.policy);
        if reported == Reported::Stale {
            return None;
        }
        let executor = self.executors.get_mut(executor_id);
        match (reported, executor) {
            (Reported::Succeeded { .. }, Some(e)) => {
                e.free_slot();
                e.completed_tasks += 1;
                e.breaker.success();
            }
            (Reported::Failed, Some(e)) => {
                e.free_slot();
                e.failed_tasks += 1;
                // User errors and memory limits say nothing about the executor's health.
                if blames_executor && e.breaker.failure() {
                    tracing::warn!(executor_id, "circuit breaker opened");
                }
            }
            (_, Some(e)) => e.free_slot(),
            (_, None) => {}
        }
        match reported {
            Reported::JobEnded | Reported::Stale => return None,
            Reported::Succeeded { stage_done: true } => {
                emit(self.journal.as_ref(), job_id, || job.done_step(stage_id));
                if let Err(e) = after_stage(job, stage_id) {
                    job.fail(format!("adaptive re-planning after stage {stage_id}: {e}"));
                }
                job.check_done();
            }
            Reported::Succeeded { .. } => job.check_done(),
            Reported::Failed => {}
        }
        job.state.is_final().then(|| job_id.to_string())
    }
}

/// Stage `done` just completed: decide the switches of the joins whose build side it is, one
/// after the other (each sees the edits of the ones before).
pub fn after_stage(job: &mut Job, done: u32) -> Result<()> {
    for (join_stage, join) in adaptive::switch_candidates(job, done) {
        let edits = adaptive::decide_switch(job, join_stage, join)?;
        job.apply(edits);
    }
    Ok(())
}
