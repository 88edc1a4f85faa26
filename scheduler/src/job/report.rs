//! Status reports: the outcome of one task attempt applied to its job.

use std::collections::BTreeMap;

use volley_core::config::MAX_INLINE_RESULT_BYTES;
use volley_core::shuffle::PartitionLocation;

use crate::config::SchedulerPolicy;
use crate::job::task::{Requeue, TaskOutcome, TaskOutput, TaskState};
use crate::job::{Job, JobState};

/// Where the executor that ran an attempt serves its files.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// Executor id.
    pub executor_id: &'a str,
    /// Host of its Flight service.
    pub host: &'a str,
    /// Port of its Flight service.
    pub port: u16,
}

/// What a report did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reported {
    /// Not the current attempt on that executor (stale, duplicate or forged): ignored.
    Stale,
    /// The job had ended; the attempt only gives its slot back.
    JobEnded,
    /// The task succeeded; `stage_done` when it was its stage's last.
    Succeeded {
        /// Its stage is complete now.
        stage_done: bool,
    },
    /// The task failed: retried, its producer re-run, or the job failed.
    Failed,
}

impl Job {
    /// Apply the outcome of attempt `attempt` of task `partition` of stage `stage_id`.
    pub fn report(
        &mut self,
        origin: Origin<'_>,
        stage_id: u32,
        partition: u32,
        attempt: u32,
        outcome: TaskOutcome,
        policy: &SchedulerPolicy,
    ) -> Reported {
        let running = self.state == JobState::Running;
        let Some(task) = self
            .stages
            .get_mut(&stage_id)
            .and_then(|s| s.tasks.get_mut(partition as usize))
        else {
            return Reported::Stale;
        };
        if !task.is_running(origin.executor_id, attempt) {
            tracing::debug!(job_id = %self.id, stage_id, partition, attempt, "ignoring stale task status");
            return Reported::Stale;
        }
        if !running {
            task.requeue(Requeue::Aborted);
            return Reported::JobEnded;
        }
        let reported = match outcome {
            TaskOutcome::Succeeded {
                outputs,
                elapsed,
                metrics,
                inline,
            } => {
                if stage_id == self.final_stage {
                    // This attempt's answer, or none: never an earlier attempt's. Only the one
                    // task of a result stage answers inline, within the cap launches set.
                    let one_task = self
                        .stages
                        .get(&stage_id)
                        .is_some_and(|s| s.tasks.len() == 1);
                    self.inline_result = inline
                        .filter(|bytes| one_task && bytes.len() as u64 <= MAX_INLINE_RESULT_BYTES);
                }
                let stage_done =
                    self.succeeded(origin, stage_id, partition, outputs, metrics, elapsed);
                Reported::Succeeded { stage_done }
            }
            TaskOutcome::Failed {
                message,
                retryable,
                fetch_failure,
                ..
            } => {
                self.failed(
                    origin.executor_id,
                    stage_id,
                    partition,
                    &message,
                    retryable,
                    fetch_failure,
                    policy,
                );
                Reported::Failed
            }
        };
        self.touch();
        reported
    }

    /// A successful attempt: its files are listed, its metrics added to its stage's. Returns
    /// true when that completed the stage.
    fn succeeded(
        &mut self,
        origin: Origin<'_>,
        stage_id: u32,
        partition: u32,
        outputs: Vec<TaskOutput>,
        metrics: Vec<Vec<(String, u64)>>,
        elapsed: std::time::Duration,
    ) -> bool {
        let Some(stage) = self.stages.get_mut(&stage_id) else {
            return false;
        };
        if stage.operator_metrics.len() < metrics.len() {
            stage
                .operator_metrics
                .resize(metrics.len(), BTreeMap::new());
        }
        let spilled: u64 = metrics
            .iter()
            .flatten()
            .filter(|(name, _)| name == "spilled_bytes")
            .map(|(_, v)| *v)
            .sum();
        for (slot, operator) in stage.operator_metrics.iter_mut().zip(metrics) {
            for (name, value) in operator {
                *slot.entry(name).or_default() += value;
            }
        }
        let outputs = outputs
            .into_iter()
            .map(|o| PartitionLocation {
                executor_id: origin.executor_id.to_string(),
                host: origin.host.to_string(),
                flight_port: origin.port,
                path: o.path,
                map_partition: partition,
                output_partition: o.output_partition,
                num_rows: o.num_rows,
                num_bytes: o.num_bytes,
                grant: String::new(),
                in_memory: o.in_memory,
            })
            .collect();
        if let Some(task) = stage.tasks.get_mut(partition as usize) {
            task.spilled_bytes = spilled;
            task.state = TaskState::Succeeded {
                executor_id: origin.executor_id.to_string(),
                outputs,
                elapsed,
            };
        }
        let done = stage.is_complete();
        if done {
            stage.mark_succeeded();
        }
        done
    }

    /// A failed attempt: retried while it may help and attempts remain; a failed fetch
    /// re-runs the producer instead; otherwise the job fails.
    #[allow(clippy::too_many_arguments)]
    fn failed(
        &mut self,
        executor_id: &str,
        stage_id: u32,
        partition: u32,
        message: &str,
        retryable: bool,
        fetch_failure: Option<(String, u32, u32)>,
        policy: &SchedulerPolicy,
    ) {
        let Some(task) = self
            .stages
            .get_mut(&stage_id)
            .and_then(|s| s.tasks.get_mut(partition as usize))
        else {
            return;
        };
        task.requeue(Requeue::Failed(executor_id, message));
        let attempts = task.failures;
        if let Some((lost_executor, producer, map_partition)) = fetch_failure {
            tracing::warn!(job_id = %self.id, stage_id, producer, map_partition, %lost_executor, "shuffle fetch failed; re-running producer");
            self.rerun_producer(producer, &lost_executor, policy);
        } else if !retryable || attempts >= policy.task_max_attempts {
            let tries = if retryable {
                format!(" after {attempts} attempts")
            } else {
                String::new()
            };
            self.fail(format!(
                "task {partition} of stage {stage_id} failed{tries}: {message}"
            ));
        }
    }
}
