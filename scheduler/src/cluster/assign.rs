//! Assignment: pending tasks of ready stages go to executors with free slots. A stage that
//! becomes ready is first re-planned by the adaptive layer (Waiting -> Ready), then its plan
//! is resolved and its tasks are placed (Ready -> Running).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::adaptive;
use crate::cluster::ClusterState;
use crate::cluster::executors::ExecutorInfo;
use crate::cluster::journal::{Journal, emit};
use crate::cluster::placement::pick_executor;
use crate::config::LoadBalancing;
use crate::graph::trim::ResolvedPlan;
use crate::job::journal::Step;
use crate::job::{Job, JobState, StagePhase, TaskLaunch, TaskState};

/// Tasks to launch, by executor.
type Assigned = BTreeMap<String, Vec<TaskLaunch>>;

impl ClusterState {
    /// Give pending tasks of ready stages to executors with free slots, least loaded first.
    pub fn assign_tasks(&mut self) -> Vec<(ExecutorInfo, Vec<TaskLaunch>)> {
        self.promote_queued();
        let mut assigned = Assigned::new();
        self.place_ready(&mut assigned);
        if self.start_idle_probes() {
            self.place_ready(&mut assigned);
        }
        assigned
            .into_iter()
            .filter_map(|(id, tasks)| self.executors.get(&id).map(|e| (e.clone(), tasks)))
            .collect()
    }

    /// With slots still free, start the stages that only wait for a running semi-join
    /// reduction's keys (see [`adaptive::idle`]); true when one was.
    fn start_idle_probes(&mut self) -> bool {
        let mut free: usize = self
            .executors
            .values()
            .filter(|e| e.accepts_tasks())
            .map(|e| usize::try_from(e.free_slots).unwrap_or(usize::MAX))
            .fold(0, usize::saturating_add);
        let mut started = false;
        for job_id in &self.job_order {
            let Some(job) = self.jobs.get_mut(job_id) else {
                continue;
            };
            if free == 0 {
                break;
            }
            if job.state != JobState::Running {
                continue;
            }
            let (edits, stages) = adaptive::idle::start_waiting_probes(job, free);
            free = free.saturating_sub(stages);
            started |= stages > 0;
            job.apply(edits);
        }
        started
    }

    /// Place the pending tasks of every ready stage, jobs in order, while slots are free.
    fn place_ready(&mut self, assigned: &mut Assigned) {
        let slots = self.total_slots();
        let journal = self.journal.clone();
        let order = self.job_order.clone();
        'jobs: for job_id in order {
            let Some(job) = self.jobs.get_mut(&job_id) else {
                continue;
            };
            if job.state != JobState::Running {
                continue;
            }
            let stage_ids: Vec<u32> = job.stages.keys().copied().collect();
            for stage_id in stage_ids {
                if !prepare_stage(job, stage_id, slots, journal.as_ref()) {
                    continue;
                }
                let plan = match job.resolved_plan(stage_id) {
                    Ok(plan) => plan,
                    Err(e) => {
                        job.fail(format!("cannot prepare stage {stage_id}: {e}"));
                        break;
                    }
                };
                let placement = Placement {
                    journal: journal.as_ref(),
                    executors: &mut self.executors,
                    cursor: (self.policy.load_balancing == LoadBalancing::RoundRobin)
                        .then_some(&mut self.rr_cursor),
                };
                if !placement.place(job, stage_id, plan, assigned) {
                    break 'jobs;
                }
            }
        }
    }
}

/// True when stage `stage_id` has tasks to launch now: not complete and everything it reads
/// is done. A stage becoming ready is regrouped (or fused into its consumer) by adaptive
/// execution first (journaled).
fn prepare_stage(job: &mut Job, stage_id: u32, slots: usize, journal: Option<&Journal>) -> bool {
    let Some(stage) = job.stages.get(&stage_id) else {
        return false;
    };
    if stage.is_complete() || !job.stage_ready(stage) {
        return false;
    }
    if stage.phase == StagePhase::Waiting {
        let edits = adaptive::before_launch(job, stage_id, slots);
        job.apply(edits);
        if let Some(stage) = job.stages.get_mut(&stage_id) {
            stage.mark_ready();
        }
        emit(journal, &job.id, || {
            Some(Step::Prepared {
                stage: stage_id,
                slots,
            })
        });
    }
    // Fused into its consumer: nothing of its own to launch.
    job.stages
        .get(&stage_id)
        .is_some_and(|s| s.phase != StagePhase::Skipped)
}

/// Executors to place tasks on, and the round-robin cursor when that is the policy.
struct Placement<'a> {
    journal: Option<&'a Journal>,
    executors: &'a mut BTreeMap<String, ExecutorInfo>,
    cursor: Option<&'a mut usize>,
}

impl Placement<'_> {
    /// Place the pending tasks of one stage; false once no executor has a free slot.
    fn place(
        mut self,
        job: &mut Job,
        stage_id: u32,
        plan: ResolvedPlan,
        assigned: &mut Assigned,
    ) -> bool {
        let job_span = job.span.clone();
        let settings = Arc::clone(&job.settings);
        let stores = Arc::clone(&job.stores);
        let final_stage = job.final_stage;
        let Some(stage) = job.stages.get_mut(&stage_id) else {
            return true;
        };
        let inline_limit = match stage_id == final_stage && stage.tasks.len() == 1 {
            true => inline_result_limit(&settings),
            false => 0,
        };
        if stage.span.is_none() {
            stage.span = Some(tracing::info_span!(
                parent: &job_span,
                "stage",
                job_id = %job.id,
                stage_id,
                partitions = stage.tasks.len()
            ));
        }
        if matches!(stage.phase, StagePhase::Waiting | StagePhase::Ready) {
            stage.mark_launched();
            emit(self.journal, &job.id, || {
                Some(Step::Launched { stage: stage_id })
            });
        }
        let stage_span = stage.span.clone().unwrap_or_else(tracing::Span::none);
        for (partition, task) in stage.tasks.iter_mut().enumerate() {
            if !matches!(task.state, TaskState::Pending) {
                continue;
            }
            let cursor = self.cursor.as_deref_mut();
            let Some(executor_id) = pick_executor(self.executors, task.avoid.as_deref(), cursor)
            else {
                return false;
            };
            let Some(executor) = self.executors.get_mut(&executor_id) else {
                continue;
            };
            executor.free_slots -= 1;
            executor.breaker.placed();
            task.launch(&executor_id);
            assigned.entry(executor_id).or_default().push(TaskLaunch {
                job_id: job.id.clone(),
                stage_id,
                partition: u32::try_from(partition).unwrap_or(u32::MAX),
                attempt: task.attempt,
                plan: plan.for_partition(partition),
                settings: Arc::clone(&settings),
                stores: Arc::clone(&stores),
                span: stage_span.clone(),
                inline_limit,
            });
        }
        true
    }
}

/// `volley.inline_result_bytes` of a job's settings (looked up alone: parsing every setting
/// would cost more than the task launch).
fn inline_result_limit(settings: &[(String, String)]) -> u64 {
    let default = volley_core::config::VolleyOptions::default().inline_result_bytes;
    settings
        .iter()
        .find(|(key, _)| key == "volley.inline_result_bytes")
        .map_or(default, |(_, value)| {
            value.trim().parse().unwrap_or(default)
        })
}
