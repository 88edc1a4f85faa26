//! L4: the cluster — executors and jobs together. [`ClusterState`] owns both, places tasks
//! ([`assign`], [`placement`]), applies status reports and calls the adaptive layer on
//! them ([`report`]), admits, ends and forgets jobs ([`jobs`]), and journals jobs and takes
//! them over after a restart ([`resume`]). All methods are
//! synchronous and run under the service's one lock; RPCs happen outside of it, driven by what
//! these methods return.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::cluster::executors::ExecutorInfo;
use crate::config::SchedulerPolicy;
use crate::job::{Job, JobState, TaskState};

/// Most partitions of a stage one task runs at once (see [`ClusterState::partitions_per_task`]).
pub const MAX_PARTITIONS_PER_TASK: usize = 64;

pub mod assign;
pub mod executors;
pub mod jobs;
pub mod journal;
pub mod placement;
pub mod report;
pub mod resume;

pub use executors::Breaker;

/// Everything the scheduler tracks.
#[derive(Debug, Default)]
pub struct ClusterState {
    /// Registered executors by id.
    executors: BTreeMap<String, ExecutorInfo>,
    /// Jobs by id.
    jobs: HashMap<String, Job>,
    /// Job ids in submission order.
    job_order: Vec<String>,
    /// Policy.
    policy: SchedulerPolicy,
    /// Next executor index for round-robin placement.
    rr_cursor: usize,
    /// Where stage transitions are journaled (a durable state store).
    journal: Option<journal::Journal>,
    /// Jobs to take over from their journals when they are added.
    resuming: HashMap<String, resume::Resume>,
    /// Executors holding outputs of resumed jobs, not registered again yet, since when.
    awaited: BTreeMap<String, Instant>,
}

/// One task attempt: (job, stage, partition, attempt).
pub type AttemptKey = (String, u32, u32, u32);

impl ClusterState {
    /// Empty state following `policy`.
    pub fn new(policy: SchedulerPolicy) -> Self {
        ClusterState {
            policy,
            ..Default::default()
        }
    }

    /// Registered executors by id (lost ones stay listed a while).
    pub fn executors(&self) -> &BTreeMap<String, ExecutorInfo> {
        &self.executors
    }

    /// Jobs by id.
    pub fn jobs(&self) -> &HashMap<String, Job> {
        &self.jobs
    }

    /// A job.
    pub fn job(&self, id: &str) -> Option<&Job> {
        self.jobs.get(id)
    }

    /// Job ids in submission order.
    pub fn job_order(&self) -> &[String] {
        &self.job_order
    }

    /// The policy.
    pub fn policy(&self) -> &SchedulerPolicy {
        &self.policy
    }

    /// Register (or re-register) an executor.
    pub fn register_executor(
        &mut self,
        id: String,
        host: String,
        port: u16,
        slots: u32,
        secret: String,
    ) {
        let info = ExecutorInfo::new(id.clone(), host, port, slots, secret);
        self.executors.insert(id, info);
    }

    /// Record the cores executor `id` said its tasks share (0 or fewer than its slots: one
    /// per slot).
    pub fn set_executor_cores(&mut self, id: &str, cores: u32) {
        if let Some(e) = self.executors.get_mut(id) {
            e.cores = cores.max(e.slots);
        }
    }

    /// How many partitions of a stage one task may run at once: the fewest cores per slot
    /// among the live executors (1 with none), at most [`MAX_PARTITIONS_PER_TASK`].
    pub fn partitions_per_task(&self) -> usize {
        let per_slot = self
            .alive_executors()
            .map(|e| e.cores / e.slots.max(1))
            .min()
            .unwrap_or(1);
        usize::try_from(per_slot)
            .unwrap_or(1)
            .clamp(1, MAX_PARTITIONS_PER_TASK)
    }

    /// True when `secret` is the registration secret of executor `id` (constant time).
    pub fn secret_matches(&self, id: &str, secret: &str) -> bool {
        use subtle::ConstantTimeEq;
        self.executors
            .get(id)
            .is_some_and(|e| bool::from(e.secret.as_bytes().ct_eq(secret.as_bytes())))
    }

    /// Traffic from a live executor other than a heartbeat (a task status report): it too
    /// shows the process is there.
    pub fn seen(&mut self, id: &str) {
        if let Some(e) = self.executors.get_mut(id).filter(|e| e.alive) {
            e.last_seen = Instant::now();
        }
    }

    /// Record a heartbeat; false when the executor is unknown and must register again.
    pub fn heartbeat(&mut self, id: &str, running_tasks: u32) -> bool {
        match self.executors.get_mut(id) {
            Some(e) if e.alive => {
                e.last_seen = Instant::now();
                e.reported_running = running_tasks;
                true
            }
            _ => false,
        }
    }

    /// Attempts the scheduler believes run on `executor_id`, launched before `launched_before`,
    /// that the executor's heartbeat does not list: their launch or status report was lost.
    pub fn unknown_attempts(
        &self,
        executor_id: &str,
        listed: &HashSet<AttemptKey>,
        launched_before: Instant,
    ) -> Vec<AttemptKey> {
        let mut unknown = Vec::new();
        for job in self.jobs.values().filter(|j| j.state == JobState::Running) {
            for (stage_id, stage) in &job.stages {
                for (partition, task) in stage.tasks.iter().enumerate() {
                    let TaskState::Running {
                        executor_id: on,
                        started,
                    } = &task.state
                    else {
                        continue;
                    };
                    let key = (
                        job.id.clone(),
                        *stage_id,
                        u32::try_from(partition).unwrap_or(u32::MAX),
                        task.attempt,
                    );
                    if on == executor_id && *started < launched_before && !listed.contains(&key) {
                        unknown.push(key);
                    }
                }
            }
        }
        unknown
    }

    /// Stop placing tasks on an executor that is shutting down.
    pub fn drain_executor(&mut self, id: &str) {
        if let Some(e) = self.executors.get_mut(id) {
            e.draining = true;
        }
    }

    /// Total slots of live executors.
    pub fn total_slots(&self) -> usize {
        self.executors
            .values()
            .filter(|e| e.alive && !e.draining)
            .map(|e| e.slots as usize)
            .sum()
    }

    /// Live executors.
    pub fn alive_executors(&self) -> impl Iterator<Item = &ExecutorInfo> {
        self.executors.values().filter(|e| e.alive)
    }

    /// Declare executors silent for longer than `timeout` lost; re-queue their work.
    /// Returns ids of the executors declared lost.
    pub fn expire_executors(&mut self, timeout: Duration) -> Vec<String> {
        let now = Instant::now();
        let lost: Vec<String> = self
            .executors
            .values()
            .filter(|e| e.alive && now.duration_since(e.last_seen) > timeout)
            .map(|e| e.id.clone())
            .collect();
        for id in &lost {
            self.executor_lost(id);
        }
        let mut lost = lost;
        lost.extend(self.expire_awaited(timeout));
        lost
    }

    /// Forget an executor: its running tasks go back to the queue, its shuffle files are lost.
    pub fn executor_lost(&mut self, executor_id: &str) {
        if let Some(e) = self.executors.get_mut(executor_id) {
            e.alive = false;
            e.free_slots = 0;
        }
        for job in self.jobs.values_mut() {
            job.executor_lost(executor_id, &self.policy);
        }
    }

    /// Forget executors that were lost (or deregistered) longer than `retention` ago; the newest
    /// `keep` of them stay listed whatever their age. Returns how many were forgotten.
    pub fn prune_executors(&mut self, retention: Duration, keep: usize) -> usize {
        let now = Instant::now();
        let mut lost: Vec<(Instant, String)> = self
            .executors
            .values()
            .filter(|e| !e.alive)
            .map(|e| (e.last_seen, e.id.clone()))
            .collect();
        // Newest first: the first `keep` stay.
        lost.sort_unstable_by_key(|(seen, _)| std::cmp::Reverse(*seen));
        let forget: Vec<String> = lost
            .into_iter()
            .enumerate()
            .filter(|(i, (seen, _))| *i >= keep || now.duration_since(*seen) > retention)
            .map(|(_, (_, id))| id)
            .collect();
        for id in &forget {
            self.executors.remove(id);
        }
        forget.len()
    }
}

#[cfg(test)]
mod tests;
