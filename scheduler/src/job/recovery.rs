//! Recovery: a lost executor's running tasks go back to the queue and the output it held is
//! produced again where a stage still needs it; a failed fetch re-runs the producer's lost
//! map tasks; a stage that loses its output too often fails the job.

use std::collections::HashSet;

use crate::config::SchedulerPolicy;
use crate::job::task::{MAX_TASK_CRASHES, Requeue, TaskInfo, TaskLaunch, TaskState};
use crate::job::{Job, JobState};

/// A finished task whose output is lost runs again, at an attempt number no lower than
/// `floor` (the job's attempt floor, raised when a job is resumed).
fn rerun(task: &mut TaskInfo, floor: u32) {
    task.requeue(Requeue::OutputLost);
    task.attempt = task.attempt.max(floor);
}

impl Job {
    /// True when a result task's output is on `executor_id`.
    fn holds_result_on(&self, executor_id: &str) -> bool {
        self.stages.get(&self.final_stage).is_some_and(|stage| {
            stage.tasks.iter().any(|t| {
                matches!(&t.state, TaskState::Succeeded { executor_id: e, .. } if e == executor_id)
            })
        })
    }

    /// Stages whose output some stage still has to read (and the result stage).
    fn needed_outputs(&self) -> Vec<u32> {
        self.stages
            .keys()
            .filter(|id| {
                **id == self.final_stage
                    || self
                        .stages
                        .values()
                        .any(|c| c.plan.inputs.contains(id) && !c.is_complete())
            })
            .copied()
            .collect()
    }

    /// Executor `executor_id` is gone: its running tasks are retried elsewhere (failing the
    /// job when a task has now crashed too many executors or used its attempts) and its
    /// finished tasks whose output is still needed run again.
    pub fn executor_lost(&mut self, executor_id: &str, policy: &SchedulerPolicy) {
        let reopened =
            self.pinned && self.state == JobState::Succeeded && self.holds_result_on(executor_id);
        if reopened {
            // A cached table lost partitions: the job runs again where they were lost.
            self.state = JobState::Running;
            self.finished = None;
            self.touch();
        }
        if self.state != JobState::Running {
            return;
        }
        // A reopened job's result tasks read their inputs again: every output the lost
        // executor held runs again now, not after a failed fetch.
        let needed = if reopened {
            self.stages.keys().copied().collect()
        } else {
            self.needed_outputs()
        };
        let floor = self.attempt_floor;
        let mut lost_stages = Vec::new();
        let mut exhausted = None;
        for (stage_id, stage) in self.stages.iter_mut() {
            let output_needed = needed.contains(stage_id);
            let mut lost_output = false;
            for (partition, task) in stage.tasks.iter_mut().enumerate() {
                match &task.state {
                    TaskState::Running { executor_id: e, .. } if e == executor_id => {
                        task.requeue(Requeue::Crashed(executor_id));
                        if exhausted.is_some() {
                            continue;
                        }
                        if task.crashes >= MAX_TASK_CRASHES {
                            exhausted = Some(format!(
                                "task {partition} of stage {stage_id} was running on {} executors that were lost (last: {executor_id}); it likely brings its executor down, e.g. by allocating more memory than the machine has, so it is not retried",
                                task.crashes
                            ));
                        } else if task.failures >= policy.task_max_attempts {
                            exhausted = Some(format!(
                                "task {partition} of stage {stage_id} failed after {} attempts: executor {executor_id} was lost",
                                task.failures
                            ));
                        }
                    }
                    TaskState::Succeeded { executor_id: e, .. }
                        if e == executor_id && output_needed =>
                    {
                        rerun(task, floor);
                        lost_output = true;
                    }
                    _ => {}
                }
            }
            if lost_output {
                stage.reopen();
                lost_stages.push((*stage_id, stage.attempts));
            }
        }
        if let Some(message) = exhausted {
            self.fail(message);
        }
        self.outputs_lost(lost_stages, policy);
    }

    /// Executor `executor_id` registered (again) holding the outputs at `held`: its finished
    /// tasks whose output is gone (after a restart of the scheduler, or of the executor under
    /// the same id) and still needed run again.
    pub fn outputs_missing(
        &mut self,
        executor_id: &str,
        held: &HashSet<String>,
        policy: &SchedulerPolicy,
    ) {
        if self.state.is_final() {
            return;
        }
        let needed = self.needed_outputs();
        let floor = self.attempt_floor;
        let mut lost_stages = Vec::new();
        for (stage_id, stage) in self.stages.iter_mut() {
            if !needed.contains(stage_id) {
                continue;
            }
            let mut lost_output = false;
            for task in stage.tasks.iter_mut() {
                let gone = matches!(&task.state, TaskState::Succeeded { executor_id: e, outputs, .. }
                    if e == executor_id && outputs.iter().any(|o| !held.contains(&o.path)));
                if gone {
                    rerun(task, floor);
                    lost_output = true;
                }
            }
            if lost_output {
                tracing::warn!(job_id = %self.id, stage_id, executor_id, "an executor registered without output it had written; re-running its tasks");
                stage.reopen();
                lost_stages.push((*stage_id, stage.attempts));
            }
        }
        self.outputs_lost(lost_stages, policy);
    }

    /// Stages that lost output (with their attempt counts now): their readers resolve again;
    /// a stage past its attempts fails the job.
    fn outputs_lost(&mut self, lost_stages: Vec<(u32, u32)>, policy: &SchedulerPolicy) {
        for (stage_id, attempts) in lost_stages {
            if attempts > policy.stage_max_attempts {
                self.fail(format!(
                    "stage {stage_id} failed after {} attempts: its shuffle output was lost",
                    attempts - 1
                ));
            }
            self.invalidate_consumers(stage_id);
        }
        self.touch();
    }

    /// A consumer could not fetch map output of stage `producer` from `lost_executor`: every
    /// task of the stage whose output lives there (the one it read among them) runs again. A
    /// failure naming output that has moved since (the task already ran again elsewhere:
    /// another reader of the same lost output reported first) changes nothing; the reader,
    /// requeued, resolves the new location.
    pub fn rerun_producer(&mut self, producer: u32, lost_executor: &str, policy: &SchedulerPolicy) {
        let floor = self.attempt_floor;
        let Some(stage) = self.stages.get_mut(&producer) else {
            return;
        };
        let mut changed = false;
        for task in stage.tasks.iter_mut() {
            let lost = matches!(&task.state, TaskState::Succeeded { executor_id, .. } if executor_id == lost_executor);
            if lost {
                rerun(task, floor);
                changed = true;
            }
        }
        if changed {
            stage.reopen();
            let attempts = stage.attempts;
            self.outputs_lost(vec![(producer, attempts)], policy);
        }
    }

    /// Stages reading `producer` must resolve their plans again.
    fn invalidate_consumers(&mut self, producer: u32) {
        for stage in self.stages.values_mut() {
            if stage.plan.inputs.contains(&producer) {
                stage.resolved = None;
            }
        }
    }

    /// The launch of `task` never reached `executor_id`: the task goes back to the queue as it
    /// was (it did not run, so it counts neither as a failure nor as a crash).
    pub fn unlaunched(&mut self, executor_id: &str, task: &TaskLaunch) {
        if let Some(info) = self
            .stages
            .get_mut(&task.stage_id)
            .and_then(|s| s.tasks.get_mut(task.partition as usize))
            && info.is_running(executor_id, task.attempt)
        {
            info.requeue(Requeue::Unlaunched(executor_id));
        }
    }

    /// The job ended and its running tasks were stopped: they go back to `Pending`. Returns
    /// the executor of each, whose slot is free again.
    pub fn abort_tasks(&mut self) -> Vec<String> {
        let mut freed = Vec::new();
        for stage in self.stages.values_mut() {
            for task in stage.tasks.iter_mut() {
                if let TaskState::Running { executor_id, .. } = &task.state {
                    freed.push(executor_id.clone());
                    task.requeue(Requeue::Aborted);
                }
            }
        }
        freed
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use volley_core::config::volley_session_config;
    use volley_core::shuffle::PartitionLocation;

    use crate::config::SchedulerPolicy;
    use crate::graph::cut::plan_stages_inlining;
    use crate::graph::cut::tests::plan_sql;
    use crate::job::{Job, TaskInfo, TaskState};

    /// Task `map` of `stage` succeeded on `executor` (its outputs there).
    fn succeed(job: &mut Job, stage: u32, map: usize, executor: &str) {
        let task = &mut job.stages.get_mut(&stage).unwrap().tasks[map];
        *task = TaskInfo::pending();
        let output = PartitionLocation {
            executor_id: executor.into(),
            host: "127.0.0.1".into(),
            flight_port: 1,
            path: format!("job/{stage}/{map}/0"),
            map_partition: u32::try_from(map).unwrap(),
            output_partition: 0,
            num_rows: 1,
            num_bytes: 1,
            grant: String::new(),
            in_memory: false,
        };
        task.state = TaskState::Succeeded {
            executor_id: executor.into(),
            outputs: vec![output],
            elapsed: Duration::from_millis(1),
        };
    }

    #[tokio::test]
    async fn a_stale_fetch_failure_does_not_rerun_output_that_already_moved() {
        let sql = "SELECT b, count(*) FROM t GROUP BY b";
        let stages = plan_stages_inlining(
            "job",
            plan_sql(sql, volley_session_config(2)).await,
            0,
            false,
        )
        .unwrap();
        let schema = Arc::new(datafusion::arrow::datatypes::Schema::empty());
        let mut job = Job::new(
            "job".into(),
            sql.into(),
            Arc::new(Vec::new()),
            stages,
            schema,
            tracing::Span::none(),
            false,
        );
        let producer = *job.stages.keys().next().unwrap();
        let maps = job.stages[&producer].tasks.len();
        for map in 0..maps {
            succeed(&mut job, producer, map, "a");
        }
        job.stages.get_mut(&producer).unwrap().mark_succeeded();
        let policy = SchedulerPolicy::default();
        // A reader could not fetch map 0 from `a`: the outputs on `a` run again (attempt 2).
        job.rerun_producer(producer, "a", &policy);
        let stage = &job.stages[&producer];
        assert_eq!(stage.attempts, 2);
        assert!(stage.tasks.iter().all(|t| !t.is_done()));
        // They ran again on `b`.
        for map in 0..maps {
            succeed(&mut job, producer, map, "b");
        }
        job.stages.get_mut(&producer).unwrap().mark_succeeded();
        // Another reader of the same lost output reports late: nothing is lost now.
        job.rerun_producer(producer, "a", &policy);
        let stage = &job.stages[&producer];
        assert_eq!(stage.attempts, 2, "no new attempt for a stale failure");
        assert!(
            stage.tasks.iter().all(|t| t.is_done()),
            "map output on b kept"
        );
    }
}
