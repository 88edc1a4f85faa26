//! What executors tell the scheduler: registration (a fresh secret each time), heartbeats
//! (with reconciliation of attempts the executor no longer holds), draining and task status
//! reports — each checked to come from the executor it names — and the attach stream each
//! executor holds open, whose closed connection declares it lost at once.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tonic::{Request, Response, Status};
use volley_core::ids::check_shuffle_path;
use volley_core::protobuf as pb;
use volley_core::security::require_cluster;

use crate::cluster::AttemptKey;
use crate::job::{TaskOutcome, TaskOutput};
use crate::service::{RECONCILE_GRACE, SchedulerService, new_id, speaks_for};

/// Bytes of inline answers all jobs together may hold in the scheduler's memory: results that
/// used to live on executors under their `--shuffle-memory`.
const INLINE_BUDGET: usize = 64 * 1024 * 1024;

impl SchedulerService {
    pub(super) async fn handle_register_executor(
        &self,
        request: Request<pb::RegisterExecutorParams>,
    ) -> Result<Response<pb::RegisterExecutorResult>, Status> {
        require_cluster(&request, "registering an executor")?;
        let params = request.into_inner();
        let held: HashSet<String> = params.held_outputs.into_iter().collect();
        let meta = params
            .metadata
            .ok_or_else(|| Status::invalid_argument("executor metadata missing"))?;
        let port = u16::try_from(meta.grpc_port)
            .map_err(|_| Status::invalid_argument(format!("bad port {}", meta.grpc_port)))?;
        if meta.id.is_empty() || meta.slots == 0 {
            return Err(Status::invalid_argument(
                "executor id and slots are required",
            ));
        }
        tracing::info!(executor_id = %meta.id, host = %meta.host, port, slots = meta.slots, "executor registered");
        self.clients.lock().remove(&meta.id);
        let secret = format!("{}{}", new_id(), new_id());
        let active_jobs = {
            let mut state = self.state.lock();
            state.executor_holds(&meta.id, &held);
            state.register_executor(meta.id.clone(), meta.host, port, meta.slots, secret.clone());
            state.set_executor_cores(&meta.id, meta.cores);
            // Jobs whose files executors must keep; an executor removes the others' folders.
            state.unreleased_jobs()
        };
        self.schedule();
        Ok(Response::new(pb::RegisterExecutorResult {
            success: true,
            active_jobs,
            secret,
        }))
    }

    pub(super) async fn handle_heartbeat(
        &self,
        request: Request<pb::HeartbeatParams>,
    ) -> Result<Response<pb::HeartbeatResult>, Status> {
        require_cluster(&request, "an executor heartbeat")?;
        let hb = request.into_inner();
        let listed: HashSet<AttemptKey> = hb
            .attempts
            .iter()
            .map(|t| (t.job_id.clone(), t.stage_id, t.partition, t.attempt))
            .collect();
        // An attempt launched here a while ago that the executor does not hold any more lost
        // its launch or its status report: fail it (retryable) instead of waiting forever.
        let launched_before = Instant::now()
            .checked_sub(RECONCILE_GRACE)
            .unwrap_or_else(Instant::now);
        let (known, finished, retried) = {
            let mut state = self.state.lock();
            if state.executors().contains_key(&hb.executor_id)
                && !state.secret_matches(&hb.executor_id, &hb.secret)
            {
                return Err(speaks_for(&hb.executor_id));
            }
            let known = state.heartbeat(&hb.executor_id, hb.running_tasks);
            let unknown = if known {
                state.unknown_attempts(&hb.executor_id, &listed, launched_before)
            } else {
                Vec::new()
            };
            let retried = !unknown.is_empty();
            let mut finished = Vec::new();
            for (job_id, stage_id, partition, attempt) in unknown {
                tracing::warn!(executor_id = %hb.executor_id, job_id, stage_id, partition, attempt, "executor does not hold a running attempt; retrying it");
                let outcome = TaskOutcome::Failed {
                    message: format!(
                        "executor {} no longer holds attempt {attempt} of task {partition} of stage {stage_id} (its launch or status report was lost)",
                        hb.executor_id
                    ),
                    retryable: true,
                    out_of_memory: false,
                    fetch_failure: None,
                };
                if let Some(job) = state.update_task(
                    &hb.executor_id,
                    &job_id,
                    stage_id,
                    partition,
                    attempt,
                    outcome,
                ) {
                    finished.push(job);
                }
            }
            (known, finished, retried)
        };
        if retried {
            self.finish_jobs(finished).await;
            self.schedule();
        }
        Ok(Response::new(pb::HeartbeatResult { reregister: !known }))
    }

    pub(super) async fn handle_attach(
        &self,
        request: Request<pb::AttachParams>,
    ) -> Result<Response<AttachStream>, Status> {
        require_cluster(&request, "attaching an executor")?;
        let params = request.into_inner();
        self.check_secret(&params.executor_id, &params.secret)?;
        let attached = Attached {
            service: self.clone(),
            executor_id: params.executor_id,
            secret: params.secret,
        };
        // Never yields; dropped (and with it `attached`) when the connection closes.
        let stream = futures::stream::pending().map(move |event| {
            let _ = &attached;
            event
        });
        Ok(Response::new(Box::pin(stream)))
    }

    pub(super) async fn handle_deregister_executor(
        &self,
        request: Request<pb::DeregisterExecutorParams>,
    ) -> Result<Response<pb::DeregisterExecutorResult>, Status> {
        require_cluster(&request, "deregistering an executor")?;
        let params = request.into_inner();
        self.check_secret(&params.executor_id, &params.secret)?;
        if params.draining {
            tracing::info!(executor_id = %params.executor_id, "executor draining");
            self.state.lock().drain_executor(&params.executor_id);
        } else {
            tracing::info!(executor_id = %params.executor_id, "executor deregistered");
            self.state.lock().executor_lost(&params.executor_id);
            self.clients.lock().remove(&params.executor_id);
            self.schedule();
        }
        Ok(Response::new(pb::DeregisterExecutorResult {}))
    }

    pub(super) async fn handle_update_task_status(
        &self,
        request: Request<pb::UpdateTaskStatusParams>,
    ) -> Result<Response<pb::UpdateTaskStatusResult>, Status> {
        require_cluster(&request, "a task status report")?;
        let mut params = request.into_inner();
        // Only the executor itself reports its tasks.
        self.check_secret(&params.executor_id, &params.secret)?;
        if let Some(other) = params
            .statuses
            .iter()
            .find(|s| s.executor_id != params.executor_id)
        {
            return Err(Status::permission_denied(format!(
                "executor {} cannot report the tasks of executor {}",
                params.executor_id, other.executor_id
            )));
        }
        let statuses = std::mem::take(&mut params.statuses);
        // Output a task reports must be shuffle files of that very task's job and stage: a
        // report naming any other file (say /etc/shadow) is refused whole.
        for status in &statuses {
            if let (Some(task), Some(pb::task_status::Status::Succeeded(s))) =
                (&status.task, &status.status)
            {
                for p in &s.partitions {
                    check_shuffle_path(&p.path, Some(&task.job_id), task.stage_id)
                        .map_err(|e| Status::invalid_argument(e.to_string()))?;
                }
            }
        }
        let mut finished = Vec::new();
        {
            let mut state = self.state.lock();
            state.seen(&params.executor_id);
            // Summed over the jobs only when a report carries an answer.
            let mut inline_held: Option<usize> = None;
            for status in statuses {
                let Some(task) = status.task else { continue };
                let outcome = match status.status {
                    Some(pb::task_status::Status::Succeeded(mut s)) => {
                        // Beyond the budget the client reads the answer from the executor.
                        let inline = match s.inline_result.len() {
                            0 => None,
                            len => {
                                let held =
                                    inline_held.get_or_insert_with(|| state.inline_bytes_held());
                                (*held + len <= INLINE_BUDGET).then(|| {
                                    *held += len;
                                    std::mem::take(&mut s.inline_result)
                                })
                            }
                        };
                        let written: u64 = s.partitions.iter().map(|p| p.num_bytes).sum();
                        self.metrics.shuffle_bytes_written.inc_by(written);
                        self.metrics
                            .task_seconds
                            .observe(s.elapsed_ms as f64 / 1000.0);
                        self.metrics
                            .tasks_finished
                            .with_label_values(&["succeeded"])
                            .inc();
                        self.metrics.shuffle_bytes_fetched.inc_by(state.input_bytes(
                            &task.job_id,
                            task.stage_id,
                            task.partition,
                        ));
                        TaskOutcome::Succeeded {
                            inline,
                            outputs: s
                                .partitions
                                .into_iter()
                                .map(|p| TaskOutput {
                                    output_partition: p.output_partition,
                                    path: p.path,
                                    num_rows: p.num_rows,
                                    num_bytes: p.num_bytes,
                                    in_memory: p.in_memory,
                                })
                                .collect(),
                            elapsed: Duration::from_millis(s.elapsed_ms),
                            metrics: s
                                .operators
                                .into_iter()
                                .map(|o| o.metrics.into_iter().map(|m| (m.name, m.value)).collect())
                                .collect(),
                        }
                    }
                    Some(pb::task_status::Status::Failed(f)) => TaskOutcome::Failed {
                        message: f.message,
                        retryable: f.retryable,
                        out_of_memory: f.out_of_memory,
                        fetch_failure: f
                            .fetch_failure
                            .map(|ff| (ff.executor_id, ff.stage_id, ff.map_partition)),
                    },
                    None => continue,
                };
                if matches!(outcome, TaskOutcome::Failed { .. }) {
                    self.metrics
                        .tasks_finished
                        .with_label_values(&["failed"])
                        .inc();
                }
                if let Some(job) = state.update_task(
                    &status.executor_id,
                    &task.job_id,
                    task.stage_id,
                    task.partition,
                    task.attempt,
                    outcome,
                ) {
                    finished.push(job);
                }
            }
        }
        self.finish_jobs(finished).await;
        let tasks =
            self.schedule_answering(params.take_tasks.then_some(params.executor_id.as_str()));
        Ok(Response::new(pb::UpdateTaskStatusResult { tasks }))
    }
}

/// The stream an executor holds open ([`SchedulerService::handle_attach`]).
pub type AttachStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::AttachEvent, Status>> + Send>>;

/// An executor's open attach stream: dropped when its connection closes.
struct Attached {
    service: SchedulerService,
    executor_id: String,
    secret: String,
}

impl Drop for Attached {
    fn drop(&mut self) {
        // Only the current registration's stream speaks for the executor; a scheduler that is
        // shutting down (no runtime to schedule on) leaves its executors be.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (lost, draining) = {
            let mut state = self.service.state.lock();
            let (alive, draining) = state
                .executors()
                .get(&self.executor_id)
                .map_or((false, false), |e| (e.alive, e.draining));
            let current = alive && state.secret_matches(&self.executor_id, &self.secret);
            if current {
                state.executor_lost(&self.executor_id);
            }
            (current, draining)
        };
        if lost {
            // A draining executor closing its connection is leaving as it said it would.
            if draining {
                tracing::info!(executor_id = %self.executor_id, "drained executor left");
            } else {
                tracing::warn!(executor_id = %self.executor_id, "executor lost: its connection closed");
            }
            self.service.clients.lock().remove(&self.executor_id);
            let service = self.service.clone();
            runtime.spawn(async move { service.schedule() });
        }
    }
}
