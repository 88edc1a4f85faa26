//! What clients ask: sessions, statements and plans to run, job status (long-polled),
//! cancel and release, and the cluster state.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};
use volley_core::codec::VolleyCodec;
use volley_core::config::released_with_answer;
use volley_core::protobuf::{self as pb, job_status};
use volley_core::security::{Role, principal, role};

use crate::job::journal::SubmittedPlan;
use crate::job::{JobState, TaskState};
use crate::service::sessions::running_job;
use crate::service::{MAX_SESSIONS, SESSION_IDLE_TIMEOUT, SchedulerService, new_id};
use volley_core::shuffle::ipc_bytes;

impl SchedulerService {
    /// Refuse `job_id` to a caller with client credentials unless `session` submitted it,
    /// with the answer an unknown job gets: other sessions' job ids cannot be probed.
    fn check_owner(&self, role: Option<Role>, session: &str, job_id: &str) -> Result<(), Status> {
        if role == Some(Role::Cluster) {
            return Ok(());
        }
        let state = self.state.lock();
        match state.job(job_id) {
            Some(job) if job.owned_by(session) => Ok(()),
            _ => Err(Status::not_found(format!("unknown job {job_id}"))),
        }
    }

    fn job_status(&self, job_id: &str) -> Result<pb::JobStatus, Status> {
        let state = self.state.lock();
        let job = state
            .job(job_id)
            .ok_or_else(|| Status::not_found(format!("unknown job {job_id}")))?;
        let (stages_done, stages_total, tasks_done, tasks_total) = job.progress();
        if job.answer_dropped {
            return Err(Status::failed_precondition(format!(
                "the result of job {job_id} was read and released"
            )));
        }
        let status = match &job.state {
            JobState::Queued => job_status::Status::Running("queued".to_string()),
            JobState::Running => job_status::Status::Running("running".to_string()),
            JobState::Failed(msg) => job_status::Status::Failed(msg.clone()),
            JobState::Cancelled => job_status::Status::Cancelled("cancelled".to_string()),
            JobState::Succeeded => {
                let locations = job.result_locations();
                let num_rows = locations.iter().map(|l| l.num_rows).sum();
                // Clients read result files from executors with a grant for each path.
                let cluster_token = self.config.security.cluster_token();
                let locations = locations
                    .iter()
                    .map(|l| {
                        let mut location = pb::PartitionLocation::from(l);
                        if let Some(key) = cluster_token {
                            location.grant = volley_core::grant::grant(key, &l.path);
                        }
                        location
                    })
                    .collect();
                job_status::Status::Completed(pb::CompletedJob {
                    schema: ipc_bytes(&job.schema, &[]).map_err(Status::from)?,
                    locations,
                    inline_result: job.inline_result.clone().unwrap_or_default(),
                    num_rows,
                })
            }
        };
        let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        Ok(pb::JobStatus {
            job_id: job_id.to_string(),
            status: Some(status),
            stages_total: n(stages_total),
            stages_done: n(stages_done),
            tasks_total: n(tasks_total),
            tasks_done: n(tasks_done),
        })
    }

    pub(super) async fn handle_create_session(
        &self,
        request: Request<pb::CreateSessionParams>,
    ) -> Result<Response<pb::CreateSessionResult>, Status> {
        if self.sessions.lock().len() >= MAX_SESSIONS {
            return Err(Status::resource_exhausted(format!(
                "too many open sessions ({MAX_SESSIONS}); sessions idle for {} s are closed",
                SESSION_IDLE_TIMEOUT.as_secs()
            )));
        }
        let ctx = self.new_session(&request.into_inner().settings)?;
        // A session id is the capability to its jobs: 122 random bits, not a short job id.
        let id = uuid::Uuid::new_v4().simple().to_string();
        self.remember_session(&id, &ctx);
        self.sessions
            .lock()
            .insert(id.clone(), (ctx, Instant::now()));
        Ok(Response::new(pb::CreateSessionResult { session_id: id }))
    }

    pub(super) async fn handle_execute_sql(
        &self,
        request: Request<pb::ExecuteSqlParams>,
    ) -> Result<Response<pb::ExecuteSqlResult>, Status> {
        let principal = principal(&request);
        let params = request.into_inner();
        let ctx = self.session(&params.session_id)?;
        let job_id = self.submit_redacted(&ctx, &params.sql, &principal).await?;
        let changed_session = {
            let mut state = self.state.lock();
            state.set_job_owner(&job_id, &params.session_id);
            let job = state.job(&job_id);
            let changed = job.is_some_and(|j| j.ddl && j.state == JobState::Succeeded);
            if let Some(job) = job.filter(|j| !j.state.is_final()) {
                // Under the same lock as the check: its Forget cannot come first.
                let record = running_job(&params.session_id, &params.sql, None, job.submitted_at);
                self.remember_running(&mut state, &job_id, record);
            }
            changed
        };
        if changed_session {
            self.remember_statement(&params.session_id, &params.sql);
        }
        Ok(Response::new(pb::ExecuteSqlResult { job_id }))
    }

    pub(super) async fn handle_execute_plan(
        &self,
        request: Request<pb::ExecutePlanParams>,
    ) -> Result<Response<pb::ExecuteSqlResult>, Status> {
        let params = request.into_inner();
        let ctx = self.session(&params.session_id)?;
        let task_ctx = ctx.task_ctx();
        let plan = VolleyCodec::decode_plan(&params.plan, &task_ctx)
            .map_err(|e| Status::invalid_argument(format!("cannot decode plan: {e}")))?;
        refuse_cached_scans(&plan)?;
        let pairs: Vec<(String, String)> = params
            .settings
            .into_iter()
            .map(|kv| (kv.key, kv.value))
            .collect();
        let job_id = self
            .submit_physical(
                new_id(),
                &params.description,
                &ctx,
                plan,
                Arc::new(pairs.clone()),
            )
            .await
            .map_err(|e| self.redacted(&ctx, &params.description, e))?;
        {
            let mut state = self.state.lock();
            state.set_job_owner(&job_id, &params.session_id);
            let running = state.job(&job_id).filter(|j| !j.state.is_final());
            if let Some(submitted_at) = running.map(|j| j.submitted_at) {
                let plan = SubmittedPlan::new(&params.plan, pairs);
                let record = running_job(
                    &params.session_id,
                    &params.description,
                    Some(plan),
                    submitted_at,
                );
                self.remember_running(&mut state, &job_id, record);
            }
        }
        Ok(Response::new(pb::ExecuteSqlResult { job_id }))
    }

    pub(super) async fn handle_get_job_status(
        &self,
        request: Request<pb::GetJobStatusParams>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        let role = role(&request);
        let params = request.into_inner();
        self.check_owner(role, &params.session_id, &params.job_id)?;
        let deadline = Instant::now() + Duration::from_millis(u64::from(params.wait_ms));
        let mut rx = {
            let state = self.state.lock();
            let job = state
                .job(&params.job_id)
                .ok_or_else(|| Status::not_found(format!("unknown job {}", params.job_id)))?;
            job.version.subscribe()
        };
        loop {
            let done = self
                .state
                .lock()
                .job(&params.job_id)
                .is_none_or(|j| j.state.is_final());
            let now = Instant::now();
            if done || now >= deadline {
                break;
            }
            if tokio::time::timeout(deadline - now, rx.changed())
                .await
                .is_err()
            {
                break;
            }
        }
        let status = self.job_status(&params.job_id)?;
        // Only an answer that stays with the released job: one whose reply is lost is asked
        // for again. A bigger one the client releases once it has read it.
        let inline = matches!(
            &status.status,
            Some(job_status::Status::Completed(done))
                if released_with_answer(done.inline_result.len())
        );
        if params.release_inline && inline {
            self.release_read(&params.job_id);
        }
        Ok(Response::new(status))
    }

    pub(super) async fn handle_cancel_job(
        &self,
        request: Request<pb::CancelJobParams>,
    ) -> Result<Response<pb::CancelJobResult>, Status> {
        let role = role(&request);
        let params = request.into_inner();
        self.check_owner(role, &params.session_id, &params.job_id)?;
        let cancelled = self.cancel(&params.job_id).await;
        Ok(Response::new(pb::CancelJobResult { cancelled }))
    }

    pub(super) async fn handle_release_job(
        &self,
        request: Request<pb::ReleaseJobParams>,
    ) -> Result<Response<pb::ReleaseJobResult>, Status> {
        let role = role(&request);
        let params = request.into_inner();
        self.check_owner(role, &params.session_id, &params.job_id)?;
        let job_id = params.job_id;
        // Releasing a job that still runs cancels it: its tasks stop and its files go (right
        // after the answer: a client that read a small result does not wait for executors).
        self.state.lock().cancel_job(&job_id);
        self.release_read(&job_id);
        Ok(Response::new(pb::ReleaseJobResult {}))
    }

    pub(super) async fn handle_get_cluster_state(
        &self,
        request: Request<pb::GetClusterStateParams>,
    ) -> Result<Response<pb::GetClusterStateResult>, Status> {
        let everything = role(&request) == Some(Role::Cluster);
        let session = request.into_inner().session_id;
        let state = self.state.lock();
        let executors = state
            .alive_executors()
            .map(|e| pb::ExecutorMetadata {
                id: e.id.clone(),
                host: e.host.clone(),
                flight_port: u32::from(e.port),
                grpc_port: u32::from(e.port),
                slots: e.slots,
                cores: e.cores,
            })
            .collect();
        let jobs = state
            .job_order()
            .iter()
            .filter_map(|id| state.job(id))
            .filter(|job| everything || job.owned_by(&session))
            .map(|job| {
                let failed = matches!(job.state, JobState::Failed(_));
                let mut tasks = Vec::new();
                let stages = job
                    .stages
                    .iter()
                    .map(|(stage_id, stage)| {
                        for (partition, task) in stage.tasks.iter().enumerate() {
                            let (executor_id, state) = match &task.state {
                                TaskState::Pending => (String::new(), "pending"),
                                TaskState::Running { executor_id, .. } => {
                                    (executor_id.clone(), "running")
                                }
                                TaskState::Succeeded { executor_id, .. } => {
                                    (executor_id.clone(), "succeeded")
                                }
                            };
                            tasks.push(pb::TaskRecord {
                                task: Some(pb::TaskId {
                                    job_id: job.id.clone(),
                                    stage_id: *stage_id,
                                    partition: u32::try_from(partition).unwrap_or(u32::MAX),
                                    attempt: task.attempt,
                                }),
                                executor_id,
                                state: state.to_string(),
                            });
                        }
                        pb::StageRecord {
                            stage_id: *stage_id,
                            partitions: u32::try_from(stage.tasks.len()).unwrap_or(u32::MAX),
                            inputs: stage.plan.inputs.clone(),
                            state: stage.status(failed).as_str().to_string(),
                            kind: stage.plan.kind.as_str().to_string(),
                            attempts: stage.attempts,
                        }
                    })
                    .collect();
                pb::JobRecord {
                    job_id: job.id.clone(),
                    sql: job.sql.clone(),
                    state: job.state.as_str().to_string(),
                    stages,
                    tasks,
                }
            })
            .collect();
        Ok(Response::new(pb::GetClusterStateResult { executors, jobs }))
    }
}

/// A cached table's scan names executors and files of the cluster: only the scheduler places
/// it (planning a session's cached table), never a submitted plan.
fn refuse_cached_scans(
    plan: &std::sync::Arc<dyn datafusion::physical_plan::ExecutionPlan>,
) -> Result<(), Status> {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    let mut found = false;
    let _ = plan.apply(|node| {
        found = node
            .downcast_ref::<volley_core::plan::CachedScanExec>()
            .is_some();
        Ok(if found {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    });
    if found {
        return Err(Status::permission_denied(
            "a submitted plan may not contain CachedScanExec (the scheduler places it for cached tables)",
        ));
    }
    Ok(())
}
