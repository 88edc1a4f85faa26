//! The job registry: jobs enter (planned, inline or waiting for another job), are admitted
//! under `max_concurrent_jobs`, end (failed, cancelled, released) and are forgotten.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use volley_core::plan::ShuffleWriterExec;
use volley_core::stores::StoreOptions;

use datafusion::arrow::datatypes::SchemaRef;

use crate::cluster::ClusterState;
use crate::cluster::journal::emit;
use crate::graph::StagePlan;
use crate::graph::trim::Encoded;
use crate::job::{CacheHit, Job, JobState, TaskLaunch};

// A released job keeps an answer up to this size (a later status call still gets it); larger
// ones are dropped: 1,000 kept jobs must not hold gigabytes.
use volley_core::config::KEPT_RELEASED_ANSWER_BYTES;

impl ClusterState {
    /// Bytes of inline answers its jobs hold.
    pub fn inline_bytes_held(&self) -> usize {
        self.jobs
            .values()
            .filter_map(|job| job.inline_result.as_ref())
            .map(Vec::len)
            .sum()
    }

    fn insert(&mut self, mut job: Job) {
        match self.jobs.remove(&job.id) {
            // A waiting job that runs after all (the query it waited for stored no answer):
            // to its client the same job — owner, submission time, waiters of its changes.
            Some(waiting) => {
                job.owner = waiting.owner;
                job.submitted_at = waiting.submitted_at;
                job.submitted = waiting.submitted;
                job.version = waiting.version;
                if waiting.state.is_final() {
                    // Cancelled while it waited: it stays so (and in the history once).
                    job.cancel();
                    job.recorded = waiting.recorded;
                }
                job.touch();
            }
            None => self.job_order.push(job.id.clone()),
        }
        self.jobs.insert(job.id.clone(), job);
    }

    /// Add a job planned into `stages` (stages building broadcast tables grouped by
    /// `per_task`: see `graph::group`); it queues when `max_concurrent_jobs` run already.
    #[allow(clippy::too_many_arguments)]
    pub fn add_job(
        &mut self,
        id: String,
        sql: String,
        settings: Arc<Vec<(String, String)>>,
        stages: Vec<StagePlan>,
        schema: SchemaRef,
        span: tracing::Span,
        per_task: usize,
    ) {
        let limit = self.policy.max_concurrent_jobs;
        let queued = limit > 0 && self.running_jobs() >= limit;
        let mut job = Job::new(id, sql, settings, stages, schema, span, queued);
        job.per_task = per_task;
        // Before anything ran (a resumed job's journal changes partition counts and plans).
        let planned = self.journaling().then(|| job.planned_step());
        self.take_over(&mut job, planned.as_ref());
        emit(self.journal.as_ref(), &job.id, || planned);
        self.insert(job);
    }

    /// Give job `id` the object store options its tasks carry and its table write's temporary
    /// prefix (before it is scheduled).
    pub fn set_job_stores(
        &mut self,
        id: &str,
        stores: Arc<Vec<(String, StoreOptions)>>,
        temporary: Option<String>,
    ) {
        if let Some(job) = self.jobs.get_mut(id) {
            job.stores = stores;
            job.temporary = temporary;
        }
    }

    /// Give stages of job `id` their plans as already encoded (before it is scheduled); a
    /// stage whose plan changed since (a resumed job's journal) resolves its own.
    pub fn set_encoded_plans(
        &mut self,
        id: &str,
        encoded: Vec<(u32, Arc<ShuffleWriterExec>, Encoded)>,
    ) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        for (stage_id, plan, kept) in encoded {
            let Some(stage) = job.stages.get_mut(&stage_id) else {
                continue;
            };
            if stage.resolved.is_some() || !Arc::ptr_eq(&stage.plan.plan, &plan) {
                continue;
            }
            match kept {
                Encoded::Plan(resolved) => stage.resolved = Some(resolved),
                Encoded::Template(template) => stage.template = Some(template),
            }
        }
    }

    /// Bind a job to the session that submitted it.
    pub fn set_job_owner(&mut self, id: &str, session: &str) {
        if let Some(job) = self.jobs.get_mut(id) {
            job.owner = Some(session.to_string());
        }
    }

    /// A resumed job keeps the time it was first submitted at.
    pub fn set_submitted_at(&mut self, id: &str, at: std::time::SystemTime) {
        if let Some(job) = self.jobs.get_mut(id) {
            job.submitted_at = at;
        }
    }

    /// Add a job whose result the scheduler computed itself.
    pub fn add_inline_job(&mut self, id: String, sql: String, schema: SchemaRef, result: Vec<u8>) {
        let mut job = Job::stageless(id, sql, schema);
        job.succeed_with(result);
        self.insert(job);
    }

    /// Add a job answered from the result cache.
    pub fn add_cached_job(
        &mut self,
        id: String,
        sql: String,
        schema: SchemaRef,
        result: Vec<u8>,
        hit: CacheHit,
    ) {
        let mut job = Job::stageless(id, sql, schema);
        job.cached = Some(hit);
        job.succeed_with(result);
        self.insert(job);
    }

    /// Answer the waiting job `id` from the result cache, unless it already ended.
    pub fn finish_waiting_from_cache(&mut self, id: &str, result: Vec<u8>, hit: CacheHit) {
        if let Some(job) = self.jobs.get_mut(id)
            && !job.state.is_final()
        {
            job.cached = Some(hit);
            job.succeed_with(result);
        }
    }

    /// Add job `id` failed with `message` (a job that could not be resumed).
    pub fn add_failed_job(&mut self, id: String, sql: String, message: String) {
        let mut job = Job::stageless(id, sql, Arc::new(arrow::datatypes::Schema::empty()));
        job.fail(message);
        self.insert(job);
    }

    /// Mark job `id` as a statement that changes the session (see [`Job::ddl`]).
    pub fn mark_ddl(&mut self, id: &str) {
        if let Some(job) = self.jobs.get_mut(id) {
            job.ddl = true;
        }
    }

    /// Finished jobs not yet recorded in the state store, marked recorded now.
    pub fn take_unrecorded(&mut self) -> Vec<&Job> {
        self.jobs
            .values_mut()
            .filter(|j| j.state.is_final() && !j.recorded)
            .map(|j| {
                j.recorded = true;
                &*j
            })
            .collect()
    }

    /// Job `id` must be recorded again (its record could not be written).
    pub fn mark_unrecorded(&mut self, id: &str) {
        if let Some(job) = self.jobs.get_mut(id) {
            job.recorded = false;
        }
    }

    /// Add a running job whose result another job produces (EXPLAIN ANALYZE); finish it with
    /// [`ClusterState::finish_waiting_job`].
    pub fn add_waiting_job(&mut self, id: String, sql: String, schema: SchemaRef) {
        let mut job = Job::stageless(id, sql, schema);
        job.waiting = true;
        self.insert(job);
    }

    /// Give a waiting job its result (Arrow IPC stream) or its error, unless it already ended
    /// (cancelled).
    pub fn finish_waiting_job(&mut self, id: &str, result: Result<Vec<u8>, String>) {
        if let Some(job) = self.jobs.get_mut(id) {
            match result {
                Ok(bytes) => job.succeed_with(bytes),
                Err(message) => job.fail(message),
            }
        }
    }

    /// Fail a job that has not ended.
    pub fn fail_job(&mut self, job_id: &str, message: String) {
        if let Some(job) = self.jobs.get_mut(job_id) {
            job.fail(message);
        }
    }

    /// Fail every job that has not ended with `message(job_id)`; returns their ids.
    pub fn fail_unfinished(&mut self, message: impl Fn(&str) -> String) -> Vec<String> {
        let mut failed = Vec::new();
        for job in self.jobs.values_mut().filter(|j| !j.state.is_final()) {
            job.fail(message(&job.id));
            failed.push(job.id.clone());
        }
        failed
    }

    /// Fail the running jobs in which no task finished for `timeout`; returns their ids.
    pub fn fail_stalled(&mut self, timeout: Duration) -> Vec<String> {
        let mut failed = Vec::new();
        for job in self.jobs.values_mut() {
            if let Some(message) = job.stalled(timeout) {
                job.fail(message);
                failed.push(job.id.clone());
            }
        }
        failed
    }

    /// Mark a job cancelled. Returns true when it had not ended.
    pub fn cancel_job(&mut self, job_id: &str) -> bool {
        self.jobs.get_mut(job_id).is_some_and(Job::cancel)
    }

    /// Keep job `id`'s result (a cached table's partitions) until [`ClusterState::unpin`].
    pub fn pin(&mut self, id: &str) {
        if let Some(job) = self.jobs.get_mut(id) {
            job.pinned = true;
        }
    }

    /// Job `id`'s result may go (its cached table was dropped).
    pub fn unpin(&mut self, id: &str) {
        if let Some(job) = self.jobs.get_mut(id) {
            job.pinned = false;
        }
    }

    /// The job's files are being removed: false when that already happened (or it is unknown,
    /// or pinned).
    pub fn mark_released(&mut self, job_id: &str) -> bool {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return false;
        };
        if job.released || job.pinned {
            return false;
        }
        job.released = true;
        if job
            .inline_result
            .as_ref()
            .is_some_and(|r| r.len() > KEPT_RELEASED_ANSWER_BYTES)
        {
            // The client has it (the result cache keeps its own copy of a cached one). A
            // later status call hears that it was released (see `Job::answer_dropped`).
            job.inline_result = None;
            job.answer_dropped = true;
        }
        // Plans and locations are no longer needed once files are gone.
        for stage in job.stages.values_mut() {
            stage.resolved = None;
            stage.template = None;
        }
        true
    }

    /// Jobs whose files executors must keep (not released yet).
    pub fn unreleased_jobs(&self) -> Vec<String> {
        self.jobs
            .values()
            .filter(|j| !j.released)
            .map(|j| j.id.clone())
            .collect()
    }

    /// Jobs finished more than `ttl` ago whose results were never released.
    pub fn expired_results(&self, ttl: Duration) -> Vec<String> {
        let now = Instant::now();
        self.jobs
            .values()
            .filter(|j| {
                !j.released && !j.pinned && j.finished.is_some_and(|f| now.duration_since(f) > ttl)
            })
            .map(|j| j.id.clone())
            .collect()
    }

    /// Forget the oldest finished and released jobs beyond `keep`.
    pub fn prune_jobs(&mut self, keep: usize) {
        let finished: Vec<String> = self
            .job_order
            .iter()
            .filter(|id| {
                self.jobs
                    .get(*id)
                    .is_some_and(|j| j.state.is_final() && j.released)
            })
            .cloned()
            .collect();
        if finished.len() <= keep {
            return;
        }
        let drop: HashSet<String> = finished[..finished.len() - keep].iter().cloned().collect();
        self.job_order.retain(|id| !drop.contains(id));
        self.jobs.retain(|id, _| !drop.contains(id));
    }

    /// Jobs in the running state (EXPLAIN ANALYZE's waiting jobs do not count).
    pub fn running_jobs(&self) -> usize {
        self.jobs
            .values()
            .filter(|j| j.state == JobState::Running && !j.waiting)
            .count()
    }

    /// True when some job has not ended.
    pub fn has_unfinished_jobs(&self) -> bool {
        self.jobs.values().any(|j| !j.state.is_final())
    }

    /// True when some job runs (tasks may wait for a slot or a half-open breaker).
    pub fn has_running_jobs(&self) -> bool {
        self.jobs.values().any(|j| j.state == JobState::Running)
    }

    /// Start queued jobs, oldest first, while there is room under `max_concurrent_jobs`.
    pub(crate) fn promote_queued(&mut self) {
        let limit = self.policy.max_concurrent_jobs;
        let mut running = self.running_jobs();
        for job_id in &self.job_order {
            if limit > 0 && running >= limit {
                break;
            }
            if let Some(job) = self.jobs.get_mut(job_id)
                && job.state == JobState::Queued
            {
                job.admit();
                running += 1;
            }
        }
    }

    /// Tasks whose launch request never reached `executor_id` go back to the queue as they
    /// were: they did not run, so they count neither as failures nor as crashes.
    pub fn unlaunched(&mut self, executor_id: &str, tasks: &[TaskLaunch]) {
        for task in tasks {
            if let Some(job) = self.jobs.get_mut(&task.job_id) {
                job.unlaunched(executor_id, task);
            }
        }
    }

    /// Running tasks of a failed or cancelled job were stopped on their executors: give their
    /// slots back and forget them.
    pub fn abort_job_tasks(&mut self, job_id: &str) {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        for executor_id in job.abort_tasks() {
            if let Some(e) = self.executors.get_mut(&executor_id) {
                e.free_slot();
            }
        }
    }

    /// Shuffle bytes partition `partition` of a stage reads from its input stages.
    pub fn input_bytes(&self, job_id: &str, stage_id: u32, partition: u32) -> u64 {
        self.jobs
            .get(job_id)
            .map_or(0, |job| job.input_bytes(stage_id, partition))
    }
}
