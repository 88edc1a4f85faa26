//! Housekeeping, every 500 ms: silent executors are declared lost, unreleased results and
//! result cache entries expire,
//! stuck jobs and jobs without executors fail, old jobs, executors and idle sessions are
//! forgotten, finished jobs are recorded in the state store, and waiting tasks are placed
//! again.

use std::time::{Duration, Instant};

use crate::service::{
    LOST_EXECUTOR_RETENTION, MAX_FINISHED_JOBS, MAX_LOST_EXECUTORS, NO_EXECUTOR_GRACE,
    SESSION_IDLE_TIMEOUT, SchedulerService,
};

impl SchedulerService {
    /// Start the loop that expires silent executors and old results.
    pub fn start_background(&self) {
        let this = self.clone();
        let handle = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            let mut no_executors_since: Option<Instant> = None;
            loop {
                tick.tick().await;
                this.housekeeping(&mut no_executors_since).await;
            }
        });
        *self.background.lock() = Some(handle);
    }

    /// Stop the background loop.
    pub fn stop_background(&self) {
        if let Some(handle) = self.background.lock().take() {
            handle.abort();
        }
        self.record_history();
    }

    async fn housekeeping(&self, no_executors_since: &mut Option<Instant>) {
        // Before old jobs are forgotten below.
        self.record_history();
        self.expire_cached();
        let (lost, expired, failed, pending) = {
            let mut state = self.state.lock();
            let lost = state.expire_executors(self.config.executor_timeout);
            // Tasks held back by an open circuit breaker get placed once it half-opens.
            let pending = state.has_running_jobs();
            let expired = state.expired_results(self.config.result_ttl);
            state.prune_jobs(MAX_FINISHED_JOBS);
            state.prune_executors(LOST_EXECUTOR_RETENTION, MAX_LOST_EXECUTORS);
            let mut failed = match self.config.stall_timeout {
                Some(timeout) => state.fail_stalled(timeout),
                None => Vec::new(),
            };
            if state.total_slots() == 0 && state.has_unfinished_jobs() {
                let since = *no_executors_since.get_or_insert_with(Instant::now);
                if since.elapsed() > NO_EXECUTOR_GRACE {
                    failed.extend(state.fail_unfinished(|job_id| {
                        format!(
                            "no executors alive for {} s: cannot run job {job_id}",
                            NO_EXECUTOR_GRACE.as_secs()
                        )
                    }));
                }
            } else {
                *no_executors_since = None;
            }
            (lost, expired, failed, pending)
        };
        let idle: Vec<String> = {
            let mut sessions = self.sessions.lock();
            let idle = sessions
                .iter()
                .filter(|(_, (_, used))| used.elapsed() >= SESSION_IDLE_TIMEOUT)
                .map(|(id, _)| id.clone())
                .collect();
            sessions.retain(|_, (_, used)| used.elapsed() < SESSION_IDLE_TIMEOUT);
            idle
        };
        self.forget_sessions(&idle);
        for id in &lost {
            tracing::warn!(executor_id = %id, "executor lost: no heartbeat");
            self.clients.lock().remove(id);
        }
        for job_id in expired.into_iter().chain(failed) {
            self.release(&job_id).await;
        }
        if !lost.is_empty() || pending {
            self.schedule();
        }
    }
}
