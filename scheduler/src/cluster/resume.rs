//! Jobs across a scheduler restart. With a durable state store each job's stage transitions go
//! to its journal (see [`crate::cluster::journal`]); a job
//! resumed after a restart gets its journal replayed on its new plan before it is scheduled
//! ([`ClusterState::prepare_resume`]), so its completed stages keep their outputs and do not
//! run again. The executors holding those outputs are awaited: one that registers says which
//! outputs it still holds (the others run again), one that does not register within the
//! executor timeout is lost like any other (its outputs are recomputed by lineage).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use datafusion::error::DataFusionError;

use crate::adaptive;
use crate::cluster::ClusterState;
use crate::cluster::journal::send;
use crate::cluster::report::after_stage;
use crate::job::Job;
use crate::job::journal::{JournalWrite, RESUME_ATTEMPT_STRIDE, Step};

/// A job to take over when it is added: its journal and how often it was resumed (this time
/// included).
#[derive(Debug)]
pub(crate) struct Resume {
    steps: Vec<Step>,
    resumes: u32,
}

impl ClusterState {
    /// Write stage transitions to a journal from now on.
    pub fn set_journal(&mut self, journal: crate::cluster::journal::Journal) {
        self.journal = Some(journal);
    }

    /// Journal nothing more (the writer ends once it wrote what was sent).
    pub fn close_journal(&mut self) {
        self.journal = None;
    }

    /// True when transitions are journaled (the state store is durable).
    pub fn journaling(&self) -> bool {
        self.journal.is_some()
    }

    /// Send one write to the journal (in the order of the calls, under the state's lock).
    pub fn journal(&self, write: JournalWrite) {
        send(self.journal.as_ref(), write);
    }

    /// Job `id`, about to be submitted again after a restart, takes over `steps` when it is
    /// added; `resumes` counts this resume.
    pub fn prepare_resume(&mut self, id: String, steps: Vec<Step>, resumes: u32) {
        self.resuming.insert(id, Resume { steps, resumes });
    }

    /// The partitions per grouped task job `id` was planned with before a restart, when it is
    /// being resumed: planned with the same, it comes out the same (executors may not have
    /// registered again yet).
    pub fn resumed_per_task(&self, id: &str) -> Option<usize> {
        self.resuming
            .get(id)?
            .steps
            .iter()
            .find_map(|step| match step {
                Step::Planned { per_task, .. } if *per_task > 0 => Some(*per_task),
                _ => None,
            })
    }

    /// Job `id` was not added after all (its statement failed to plan again).
    pub fn cancel_resume(&mut self, id: &str) {
        self.resuming.remove(id);
    }

    /// Replay the journal of `job` if it is being resumed; `fresh` is its Planned step when
    /// already taken.
    pub(crate) fn take_over(&mut self, job: &mut Job, fresh: Option<&Step>) {
        let Some(resume) = self.resuming.remove(&job.id) else {
            return;
        };
        let fresh = match fresh {
            Some(step) => step.clone(),
            None => job.planned_step(),
        };
        if let Err(why) = replay(job, &fresh, &resume.steps) {
            tracing::warn!(job_id = %job.id, error = %why, "the journal of a resumed job does not fit its plan; the rest of it runs again");
        }
        let restored = job.stages.values().filter(|s| s.resumed).count();
        job.raise_attempts(resume.resumes.saturating_mul(RESUME_ATTEMPT_STRIDE));
        job.check_done();
        for executor in job.output_executors() {
            if !self.executors.get(&executor).is_some_and(|e| e.alive) {
                self.awaited.entry(executor).or_insert_with(Instant::now);
            }
        }
        tracing::info!(job_id = %job.id, stages = restored, "job taken over from its journal");
    }

    /// Executor `id` registered holding the outputs at `held`: no longer awaited, and the
    /// finished tasks whose outputs it lacks run again.
    pub fn executor_holds(&mut self, id: &str, held: &HashSet<String>) {
        self.awaited.remove(id);
        for job in self.jobs.values_mut() {
            job.outputs_missing(id, held, &self.policy);
        }
    }

    /// Executors awaited after a restart that did not register within `timeout`: lost.
    pub(crate) fn expire_awaited(&mut self, timeout: Duration) -> Vec<String> {
        let now = Instant::now();
        let lost: Vec<String> = self
            .awaited
            .iter()
            .filter(|(_, since)| now.duration_since(**since) > timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &lost {
            self.awaited.remove(id);
            tracing::warn!(executor_id = %id, "an executor holding outputs of resumed jobs did not register again; recomputing them");
            for job in self.jobs.values_mut() {
                job.executor_lost(id, &self.policy);
            }
        }
        lost
    }
}

/// True when `journaled` (a Planned step) describes the same stages as `fresh` (records from
/// before plan hashes were kept compare by shape only).
fn same_plan(journaled: &Step, fresh: &Step) -> bool {
    match (journaled, fresh) {
        (
            Step::Planned { shape, plans, .. },
            Step::Planned {
                shape: fresh_shape,
                plans: fresh_plans,
                ..
            },
        ) => shape == fresh_shape && (plans.is_empty() || plans == fresh_plans),
        _ => false,
    }
}

/// Apply `steps` to `job` as they happened; an error says why the rest could not be applied.
fn replay(job: &mut Job, fresh: &Step, steps: &[Step]) -> Result<(), String> {
    for step in steps {
        match step {
            Step::Planned { .. } if !same_plan(step, fresh) => {
                return Err(
                    "the statement plans into other stages (or reads other files) now".into(),
                );
            }
            Step::Planned { .. } => {}
            Step::Prepared { stage, slots } => {
                if !job.stages.contains_key(stage) {
                    return Err(format!("stage {stage} is not in the plan"));
                }
                let edits = adaptive::before_launch(job, *stage, *slots);
                job.apply(edits);
                if let Some(stage) = job.stages.get_mut(stage) {
                    stage.mark_ready();
                }
            }
            Step::Launched { stage } => match job.stages.get_mut(stage) {
                Some(stage) => stage.mark_launched(),
                None => return Err(format!("stage {stage} is not in the plan")),
            },
            Step::Done {
                stage,
                attempts,
                tasks,
                metrics,
            } => {
                job.restore_done(*stage, *attempts, tasks, metrics)?;
                after_stage(job, *stage).map_err(|e: DataFusionError| e.to_string())?;
            }
        }
    }
    Ok(())
}
