//! Recovery: a lost executor's running tasks go back to the queue and the output it held is
//! produced again where a stage still needs it; a failed fetch re-runs the producer's lost
//! map tasks; a stage that loses its output too often fails the job.

use std::collections::HashSet;

use crate::config::SchedulerPolicy;
use crate::job::task::{MAX_TASK_CRASHES, Requeue, TaskLaunch, TaskState};
use crate::job::{Job, JobState};

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
                        task.requeue(Requeue::OutputLost);
                        task.attempt = task.attempt.max(floor);
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
                    task.requeue(Requeue::OutputLost);
                    task.attempt = task.attempt.max(floor);
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

    /// A consumer could not fetch map output `map_partition` of stage `producer` from
    /// `lost_executor`: that task, and every other of the stage's tasks whose output lives
    /// there, run again.
    pub fn rerun_producer(
        &mut self,
        producer: u32,
        map_partition: u32,
        lost_executor: &str,
        policy: &SchedulerPolicy,
    ) {
        let floor = self.attempt_floor;
        let Some(stage) = self.stages.get_mut(&producer) else {
            return;
        };
        let mut changed = false;
        for (index, task) in stage.tasks.iter_mut().enumerate() {
            let lost = matches!(&task.state, TaskState::Succeeded { executor_id, .. } if executor_id == lost_executor);
            if lost || index == map_partition as usize && task.is_done() {
                task.requeue(Requeue::OutputLost);
                task.attempt = task.attempt.max(floor);
                changed = true;
            }
        }
        if !changed {
            return;
        }
        stage.reopen();
        if stage.attempts > policy.stage_max_attempts {
            let attempts = stage.attempts - 1;
            self.fail(format!(
                "stage {producer} failed after {attempts} attempts: its shuffle output was lost"
            ));
            return;
        }
        self.invalidate_consumers(producer);
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
