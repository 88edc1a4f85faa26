//! The scheduler's gRPC service: executors register and report, clients submit SQL.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::ipc::writer::StreamWriter;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;
use parking_lot::Mutex;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};
use volley_core::codec::VolleyCodec;
use volley_core::config::{config_to_pairs, volley_session_config};
use volley_core::ids::check_shuffle_path;
use volley_core::protobuf::executor_grpc_client::ExecutorGrpcClient;
use volley_core::protobuf::{self as pb, job_status, scheduler_grpc_server::SchedulerGrpc};
use volley_core::sandbox::Sandbox;
use volley_core::sandbox_store::SandboxedStore;
use volley_core::security::{AuthChannel, Security, require_cluster};
use volley_core::stack::on_deep_stack;
use volley_core::{Result, VolleyError};

use crate::metrics::SchedulerMetrics;
use crate::planner::{StagePlan, explain_stages, mark_broadcast_candidates, plan_stages};
use crate::rules::volley_session_state_with;
use crate::scan_balance::balance_parquet_scans;
use crate::server::SchedulerConfig;
use crate::state::{
    ClusterState, ExecutorInfo, JobState, SchedulerPolicy, TaskLaunch, TaskOutcome, TaskState,
};

/// Shared scheduler service; cheap to clone.
#[derive(Clone)]
pub struct SchedulerService {
    config: Arc<SchedulerConfig>,
    state: Arc<Mutex<ClusterState>>,
    sessions: Arc<Mutex<HashMap<String, (SessionContext, Instant)>>>,
    clients: Arc<Mutex<HashMap<String, ExecutorGrpcClient<AuthChannel>>>>,
    sandbox: Sandbox,
    metrics: SchedulerMetrics,
    background: Arc<Mutex<Option<JoinHandle<()>>>>,
    /// Runtime of every session: one memory pool for what runs on the scheduler (DDL,
    /// `CREATE TABLE AS`, plans that cannot travel) and the sandboxed file store.
    runtime: Arc<datafusion::execution::runtime_env::RuntimeEnv>,
}

/// The refusal of a call naming an executor without its registration secret.
fn speaks_for(executor_id: &str) -> Status {
    Status::permission_denied(format!(
        "this call does not carry the registration secret of executor {executor_id}"
    ))
}

/// How long a launched attempt may be missing from its executor's heartbeats (its launch
/// request may still be on the way) before it is failed as lost.
const RECONCILE_GRACE: Duration = Duration::from_secs(15);

/// Room for a task's ids and settings next to its plan in a launch request.
const MESSAGE_OVERHEAD: usize = 16 * 1024;
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
const NO_EXECUTOR_GRACE: Duration = Duration::from_secs(15);
/// Finished, released jobs kept for inspection; older ones are forgotten.
const MAX_FINISHED_JOBS: usize = 1000;
/// Lost or deregistered executors stay listed (state `lost`) this long, at most this many.
const LOST_EXECUTOR_RETENTION: Duration = Duration::from_secs(3600);
const MAX_LOST_EXECUTORS: usize = 100;
/// Sessions unused this long are dropped.
const SESSION_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Most sessions open at once; a client opening more is refused until idle ones expire.
const MAX_SESSIONS: usize = 10_000;

fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..16].to_string()
}

/// Encode batches as an Arrow IPC stream.
pub fn ipc_bytes(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>> {
    let mut writer = StreamWriter::try_new(Vec::new(), schema)?;
    for batch in batches {
        writer.write(batch)?;
    }
    writer.finish()?;
    Ok(writer.into_inner()?)
}

impl SchedulerService {
    /// A service with no executors and no jobs.
    pub fn new(
        config: Arc<SchedulerConfig>,
        policy: SchedulerPolicy,
        sandbox: Sandbox,
        metrics: SchedulerMetrics,
    ) -> Result<Self> {
        let state = ClusterState {
            policy,
            ..Default::default()
        };
        let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(
                datafusion::execution::memory_pool::FairSpillPool::new(config.memory_limit),
            ))
            .build_arc()?;
        // Files DDL, `CREATE TABLE AS` and scheduler-side plans touch stay in the sandbox too.
        SandboxedStore::install(&runtime, &sandbox)?;
        Ok(Self {
            runtime,
            config,
            state: Arc::new(Mutex::new(state)),
            sessions: Arc::new(Mutex::new(HashMap::new())),
            clients: Arc::new(Mutex::new(HashMap::new())),
            sandbox,
            metrics,
            background: Arc::new(Mutex::new(None)),
        })
    }

    /// Refuse a call that names `executor_id` without its registration secret.
    fn check_secret(&self, executor_id: &str, secret: &str) -> Result<(), Status> {
        if self.state.lock().secret_matches(executor_id, secret) {
            Ok(())
        } else {
            Err(speaks_for(executor_id))
        }
    }

    /// The address the scheduler binds.
    pub fn bind_host(&self) -> &str {
        &self.config.host
    }

    /// Token and TLS settings of this scheduler.
    pub fn security(&self) -> &Security {
        &self.config.security
    }

    /// Prometheus text for `/metrics`.
    pub fn render_metrics(&self) -> String {
        let state = self.state.lock();
        self.metrics.render(&state)
    }

    /// Read the state (tests, status pages).
    pub fn with_state<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        f(&self.state.lock())
    }

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
    }

    async fn housekeeping(&self, no_executors_since: &mut Option<Instant>) {
        let (lost, expired, failed, pending) = {
            let mut state = self.state.lock();
            let lost = state.expire_executors(self.config.executor_timeout);
            // Tasks held back by an open circuit breaker get placed once it half-opens.
            let pending = state.jobs.values().any(|j| j.state == JobState::Running);
            let expired = state.expired_results(self.config.result_ttl);
            state.prune_jobs(MAX_FINISHED_JOBS);
            state.prune_executors(LOST_EXECUTOR_RETENTION, MAX_LOST_EXECUTORS);
            let mut failed = Vec::new();
            if let Some(timeout) = self.config.stall_timeout {
                let stalled: Vec<(String, String)> = state
                    .jobs
                    .values_mut()
                    .filter_map(|job| job.stalled(timeout).map(|m| (job.id.clone(), m)))
                    .collect();
                for (job_id, message) in stalled {
                    state.fail_job(&job_id, message);
                    failed.push(job_id);
                }
            }
            let running = state.jobs.values().any(|j| !j.state.is_final());
            if state.total_slots() == 0 && running {
                let since = *no_executors_since.get_or_insert_with(Instant::now);
                if since.elapsed() > NO_EXECUTOR_GRACE {
                    for job in state.jobs.values_mut() {
                        if !job.state.is_final() {
                            job.state = JobState::Failed(format!(
                                "no executors alive for {} s: cannot run job {}",
                                NO_EXECUTOR_GRACE.as_secs(),
                                job.id
                            ));
                            job.finished = Some(Instant::now());
                            job.version.send_modify(|v| *v += 1);
                            failed.push(job.id.clone());
                        }
                    }
                }
            } else {
                *no_executors_since = None;
            }
            (lost, expired, failed, pending)
        };
        self.sessions
            .lock()
            .retain(|_, (_, used)| used.elapsed() < SESSION_IDLE_TIMEOUT);
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

    fn client(&self, executor: &ExecutorInfo) -> Result<ExecutorGrpcClient<AuthChannel>> {
        let mut clients = self.clients.lock();
        if let Some(c) = clients.get(&executor.id) {
            return Ok(c.clone());
        }
        let security = &self.config.security;
        let channel = security
            .endpoint(&security.url(&executor.host, executor.port))?
            .timeout(RPC_TIMEOUT)
            .connect_lazy();
        let client = ExecutorGrpcClient::new(security.authed(channel)?)
            .max_decoding_message_size(self.config.max_message_size)
            .max_encoding_message_size(self.config.max_message_size);
        clients.insert(executor.id.clone(), client.clone());
        Ok(client)
    }

    /// Hand pending tasks to executors with free slots.
    pub fn schedule(&self) {
        let assignments = self.state.lock().assign_tasks();
        for (executor, tasks) in assignments {
            let this = self.clone();
            tokio::spawn(async move { this.launch(executor, tasks).await });
        }
    }

    async fn launch(&self, executor: ExecutorInfo, tasks: Vec<TaskLaunch>) {
        let limit = self.config.max_message_size;
        let (fits, too_big): (Vec<TaskLaunch>, Vec<TaskLaunch>) = tasks
            .into_iter()
            .partition(|t| t.plan.len() + MESSAGE_OVERHEAD < limit);
        if !too_big.is_empty() {
            let mut failed = Vec::new();
            {
                let mut state = self.state.lock();
                for t in &too_big {
                    tracing::warn!(job_id = %t.job_id, stage = t.stage_id, bytes = t.plan.len(), limit, "task plan over the message size limit");
                    state.fail_job(
                        &t.job_id,
                        format!(
                            "the plan of stage {} is {} bytes, over the gRPC message size limit of {limit} bytes: raise --max-message-size (scheduler and executors) or simplify the query",
                            t.stage_id,
                            t.plan.len()
                        ),
                    );
                    failed.push(t.job_id.clone());
                }
            }
            self.finish_jobs(failed).await;
        }
        if fits.is_empty() {
            return;
        }
        // Several tasks share one request; keep each request under the message limit.
        let mut batch: Vec<TaskLaunch> = Vec::new();
        let mut batch_bytes = 0;
        for task in fits {
            let bytes = task.plan.len() + MESSAGE_OVERHEAD;
            let other_stage = batch.first().is_some_and(|t| {
                (t.job_id.as_str(), t.stage_id) != (task.job_id.as_str(), task.stage_id)
            });
            if !batch.is_empty() && (batch_bytes + bytes >= limit || other_stage) {
                self.launch_batch(&executor, std::mem::take(&mut batch))
                    .await;
                batch_bytes = 0;
            }
            batch_bytes += bytes;
            batch.push(task);
        }
        if !batch.is_empty() {
            self.launch_batch(&executor, batch).await;
        }
    }

    async fn launch_batch(&self, executor: &ExecutorInfo, tasks: Vec<TaskLaunch>) {
        tracing::debug!(executor_id = %executor.id, tasks = tasks.len(), stage = tasks.first().map(|t| t.stage_id), "launching");
        let request = pb::LaunchTasksParams {
            tasks: tasks
                .iter()
                .map(|t| pb::TaskDefinition {
                    task: Some(pb::TaskId {
                        job_id: t.job_id.clone(),
                        stage_id: t.stage_id,
                        partition: t.partition,
                        attempt: t.attempt,
                    }),
                    plan: t.plan.as_ref().clone(),
                    settings: t
                        .settings
                        .iter()
                        .map(|(key, value)| pb::KeyValue {
                            key: key.clone(),
                            value: value.clone(),
                        })
                        .collect(),
                })
                .collect(),
        };
        // One stage per request: its span's trace context rides in the request metadata.
        let mut request = tonic::Request::new(request);
        if let Some(first) = tasks.first() {
            volley_core::telemetry::inject(&first.span, request.metadata_mut());
        }
        let result = match self.client(executor) {
            Ok(mut client) => client
                .launch_tasks(request)
                .await
                .map(|_| ())
                .map_err(VolleyError::from),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            self.metrics
                .rpc_errors
                .with_label_values(&["launch_tasks"])
                .inc();
            tracing::warn!(executor_id = %executor.id, error = %e, "cannot launch tasks");
            // An executor we cannot reach is treated as lost: its tasks go back to the queue
            // (without counting as task failures) and a live executor registers again on its
            // next heartbeat.
            self.clients.lock().remove(&executor.id);
            // Only a connection that never opened proves the tasks did not start: a transport
            // error after the request went out may come from an executor that started a task
            // and died of it at once.
            let never_sent = matches!(&e, VolleyError::Connect { .. })
                || matches!(&e, VolleyError::Grpc(s) if s.code() == tonic::Code::Unavailable
                    && s.message().contains("connect error"));
            {
                let mut state = self.state.lock();
                if never_sent {
                    state.unlaunched(&executor.id, &tasks);
                }
                state.executor_lost(&executor.id);
            }
            self.finish_jobs(tasks.iter().map(|t| t.job_id.clone()).collect())
                .await;
            self.schedule();
        }
    }

    async fn finish_jobs(&self, mut job_ids: Vec<String>) {
        job_ids.sort();
        job_ids.dedup();
        for job_id in job_ids {
            let state = self.state.lock().jobs.get(&job_id).map(|j| j.state.clone());
            if matches!(state, Some(JobState::Failed(_) | JobState::Cancelled)) {
                self.release(&job_id).await;
            }
        }
    }

    /// Cancel a job's tasks and delete its shuffle files on every executor. The work runs
    /// detached: a caller cancelled midway (an RPC handler whose client went away, e.g. the
    /// executor whose status report failed the job, its reporting task aborted by this very
    /// cancel) must not stop it between "released" and "files deleted".
    pub async fn release(&self, job_id: &str) {
        let this = self.clone();
        let job_id = job_id.to_string();
        let _ = tokio::spawn(async move { this.release_now(&job_id).await }).await;
    }

    async fn release_now(&self, job_id: &str) {
        let executors: Vec<ExecutorInfo> = {
            let mut state = self.state.lock();
            state.abort_job_tasks(job_id);
            if let Some(job) = state.jobs.get_mut(job_id) {
                if job.released {
                    return;
                }
                job.released = true;
                // Plans and locations are no longer needed once files are gone.
                for stage in job.stages.values_mut() {
                    stage.resolved = None;
                }
            }
            state
                .executors
                .values()
                .filter(|e| e.alive)
                .cloned()
                .collect()
        };
        // Every executor at once: cancel the job's tasks, then delete its files.
        let calls = executors.into_iter().filter_map(|executor| {
            let mut client = self.client(&executor).ok()?;
            let job = job_id.to_string();
            Some(async move {
                let _ = client
                    .cancel_tasks(pb::CancelTasksParams {
                        job_id: job.clone(),
                    })
                    .await;
                if let Err(e) = client
                    .remove_job_data(pb::RemoveJobDataParams { job_id: job.clone() })
                    .await
                {
                    tracing::warn!(executor_id = %executor.id, job_id = %job, error = %e, "cannot remove job data");
                }
            })
        });
        futures::future::join_all(calls).await;
    }

    fn new_session(&self, settings: &[pb::KeyValue]) -> Result<SessionContext> {
        let target = self
            .config
            .target_partitions
            .unwrap_or_else(|| self.state.lock().total_slots().max(2));
        let mut config = volley_session_config(target);
        for kv in settings {
            volley_core::sandbox::check_setting(&kv.key)?;
            config.options_mut().set(&kv.key, &kv.value)?;
        }
        Ok(SessionContext::new_with_state(volley_session_state_with(
            config,
            Some(Arc::clone(&self.runtime)),
        )))
    }

    fn session(&self, id: &str) -> Result<SessionContext, Status> {
        self.sessions
            .lock()
            .get_mut(id)
            .map(|(ctx, used)| {
                *used = Instant::now();
                ctx.clone()
            })
            .ok_or_else(|| Status::not_found(format!("unknown session {id}: create one first")))
    }

    /// Plan `sql` in session `ctx` and submit it; returns the job id. Planning runs on a
    /// deep-stack thread: a deeply nested statement cannot overflow a worker's stack.
    pub async fn submit(&self, ctx: &SessionContext, sql: &str) -> Result<String> {
        let job_id = new_id();
        let planned = {
            let (ctx, sql, sandbox) = (ctx.clone(), sql.to_string(), self.sandbox.clone());
            let id = job_id.clone();
            on_deep_stack("planner", move || async move {
                plan_statement(&ctx, &sql, &sandbox, &id).await
            })
            .await?
        };
        match planned {
            Planned::Inline(schema, bytes) => {
                self.state
                    .lock()
                    .add_inline_job(job_id.clone(), sql.to_string(), schema, bytes);
                Ok(job_id)
            }
            Planned::Collect(df) => {
                let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
                let batches = df.collect().await?;
                let bytes = ipc_bytes(&schema, &batches)?;
                self.state
                    .lock()
                    .add_inline_job(job_id.clone(), sql.to_string(), schema, bytes);
                Ok(job_id)
            }
            Planned::Analyze(physical, settings) => {
                let inner = self
                    .submit_physical(new_id(), sql, ctx, physical, settings)
                    .await?;
                let schema = plan_schema();
                self.state.lock().add_waiting_job(
                    job_id.clone(),
                    sql.to_string(),
                    Arc::clone(&schema),
                );
                let service = self.clone();
                let outer = job_id.clone();
                tokio::spawn(async move { service.finish_analyze(&outer, &inner, schema).await });
                Ok(job_id)
            }
            Planned::Physical(physical, settings) => {
                self.submit_physical(job_id, sql, ctx, physical, settings)
                    .await
            }
        }
    }

    /// Cut an optimized physical plan into stages and run it; returns the job id.
    pub async fn submit_physical(
        &self,
        job_id: String,
        sql: &str,
        ctx: &SessionContext,
        physical: Arc<dyn ExecutionPlan>,
        settings: Arc<Vec<(String, String)>>,
    ) -> Result<String> {
        self.sandbox.check_physical(&physical)?;
        self.check_test_hooks(&settings)?;
        let physical = balance_parquet_scans(physical, &ctx.state()).await?;
        let settings = self.resolve_settings(settings);
        let schema = physical.schema();
        let mut stages = plan_stages(&job_id, Arc::clone(&physical))?;
        // Task lists are allocated per partition: bound them before anything is allocated.
        for stage in &stages {
            volley_core::ids::check_partitions(
                &format!("stage {}", stage.stage_id),
                stage.partitions,
            )?;
        }
        adaptive_candidates(&mut stages, &settings);
        let distributable = stages.iter().all(|s| {
            VolleyCodec::encode_plan(Arc::clone(&s.plan) as Arc<dyn ExecutionPlan>).is_ok()
        });
        if !distributable {
            // System tables and in-memory sources cannot travel; they are small, run them here.
            tracing::info!(
                job_id,
                "plan cannot be sent to executors; running it on the scheduler"
            );
            let batches = datafusion::physical_plan::collect(physical, ctx.task_ctx()).await?;
            let bytes = ipc_bytes(&schema, &batches)?;
            self.state
                .lock()
                .add_inline_job(job_id.clone(), sql.to_string(), schema, bytes);
            return Ok(job_id);
        }
        let short: String = sql.chars().take(200).collect();
        let span = tracing::info_span!(parent: None, "job", job_id = %job_id, stages = stages.len(), sql = %short);
        tracing::info!(parent: &span, job_id, stages = stages.len(), "job submitted");
        self.state.lock().add_job(
            job_id.clone(),
            sql.to_string(),
            settings,
            stages,
            schema,
            span,
        );
        self.schedule();
        Ok(job_id)
    }

    fn job_status(&self, job_id: &str) -> Result<pb::JobStatus, Status> {
        let state = self.state.lock();
        let job = state
            .jobs
            .get(job_id)
            .ok_or_else(|| Status::not_found(format!("unknown job {job_id}")))?;
        let (stages_done, stages_total, tasks_done, tasks_total) = job.progress();
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

    /// Refuse a job that sets test hooks unless this cluster was started to honour them.
    fn check_test_hooks(&self, settings: &[(String, String)]) -> Result<()> {
        if self.config.enable_test_hooks {
            return Ok(());
        }
        let options = volley_core::config::VolleyOptions::from_pairs(settings);
        match options.test_hooks_set().first() {
            Some(hook) => Err(VolleyError::NotAllowed(format!(
                "{hook} is a test hook: it works only on a cluster started with --enable-test-hooks"
            ))),
            None => Ok(()),
        }
    }

    /// Settings a job's tasks run with: `volley.shuffle_compression = auto` becomes `none` when
    /// every live executor is on a loopback address (shuffle bytes never cross a network and
    /// compressing them only costs CPU), `lz4` otherwise.
    fn resolve_settings(&self, settings: Arc<Vec<(String, String)>>) -> Arc<Vec<(String, String)>> {
        const KEY: &str = "volley.shuffle_compression";
        let auto = settings
            .iter()
            .find(|(k, _)| k == KEY)
            .is_none_or(|(_, v)| v.eq_ignore_ascii_case("auto"));
        if !auto {
            return settings;
        }
        let local = self
            .state
            .lock()
            .executors
            .values()
            .filter(|e| e.alive)
            .all(|e| volley_core::security::is_loopback_host(&e.host));
        let value = if local { "none" } else { "lz4" };
        let mut resolved: Vec<(String, String)> =
            settings.iter().filter(|(k, _)| k != KEY).cloned().collect();
        resolved.push((KEY.to_string(), value.to_string()));
        Arc::new(resolved)
    }

    /// EXPLAIN ANALYZE: wait for the job running the query, then answer with its stages as
    /// they ran (tasks, rows, adaptive decisions) and drop its result.
    async fn finish_analyze(&self, outer: &str, inner: &str, schema: SchemaRef) {
        let Some(mut rx) = self
            .state
            .lock()
            .jobs
            .get(inner)
            .map(|j| j.version.subscribe())
        else {
            return;
        };
        loop {
            let (inner_final, outer_final) = {
                let state = self.state.lock();
                let done = |id: &str| state.jobs.get(id).is_none_or(|j| j.state.is_final());
                (done(inner), done(outer))
            };
            if outer_final && !inner_final {
                self.cancel(inner).await;
                return;
            }
            if inner_final {
                break;
            }
            // Also wakes up now and then to notice a cancelled EXPLAIN ANALYZE.
            let _ = tokio::time::timeout(Duration::from_millis(200), rx.changed()).await;
        }
        let result = {
            let state = self.state.lock();
            match state.jobs.get(inner) {
                Some(job) if job.state == JobState::Succeeded => {
                    let lines = analyze_lines(job);
                    RecordBatch::try_new(
                        Arc::clone(&schema),
                        vec![Arc::new(StringArray::from(lines))],
                    )
                    .map_err(|e| e.to_string())
                    .and_then(|batch| ipc_bytes(&schema, &[batch]).map_err(|e| e.to_string()))
                }
                Some(job) => Err(match &job.state {
                    JobState::Failed(message) => message.clone(),
                    other => format!("the analyzed query was {}", other.as_str()),
                }),
                None => Err("the analyzed query's job is gone".to_string()),
            }
        };
        self.release(inner).await;
        self.state.lock().finish_waiting_job(outer, result);
    }

    /// Cancel a running job.
    pub async fn cancel(&self, job_id: &str) -> bool {
        let cancelled = self.state.lock().cancel_job(job_id);
        if cancelled {
            tracing::info!(job_id, "job cancelled");
            self.release(job_id).await;
        }
        cancelled
    }
}

#[tonic::async_trait]
impl SchedulerGrpc for SchedulerService {
    async fn register_executor(
        &self,
        request: Request<pb::RegisterExecutorParams>,
    ) -> Result<Response<pb::RegisterExecutorResult>, Status> {
        require_cluster(&request, "registering an executor")?;
        let meta = request
            .into_inner()
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
            state.register_executor(meta.id, meta.host, port, meta.slots, secret.clone());
            // Jobs whose files executors must keep; an executor removes the others' folders.
            state
                .jobs
                .values()
                .filter(|j| !j.released)
                .map(|j| j.id.clone())
                .collect()
        };
        self.schedule();
        Ok(Response::new(pb::RegisterExecutorResult {
            success: true,
            active_jobs,
            secret,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatParams>,
    ) -> Result<Response<pb::HeartbeatResult>, Status> {
        require_cluster(&request, "an executor heartbeat")?;
        let hb = request.into_inner();
        let listed: std::collections::HashSet<(String, u32, u32, u32)> = hb
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
            if state.executors.contains_key(&hb.executor_id)
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

    async fn deregister_executor(
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

    async fn update_task_status(
        &self,
        request: Request<pb::UpdateTaskStatusParams>,
    ) -> Result<Response<pb::UpdateTaskStatusResult>, Status> {
        require_cluster(&request, "a task status report")?;
        let params = request.into_inner();
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
        let statuses = params.statuses;
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
            for status in statuses {
                let Some(task) = status.task else { continue };
                let outcome = match status.status {
                    Some(pb::task_status::Status::Succeeded(s)) => {
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
                            outputs: s
                                .partitions
                                .into_iter()
                                .map(|p| (p.output_partition, p.path, p.num_rows, p.num_bytes))
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
        self.schedule();
        Ok(Response::new(pb::UpdateTaskStatusResult {}))
    }

    async fn create_session(
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
        let id = new_id();
        self.sessions
            .lock()
            .insert(id.clone(), (ctx, Instant::now()));
        Ok(Response::new(pb::CreateSessionResult { session_id: id }))
    }

    async fn execute_sql(
        &self,
        request: Request<pb::ExecuteSqlParams>,
    ) -> Result<Response<pb::ExecuteSqlResult>, Status> {
        let params = request.into_inner();
        let ctx = self.session(&params.session_id)?;
        let job_id = self.submit(&ctx, &params.sql).await?;
        Ok(Response::new(pb::ExecuteSqlResult { job_id }))
    }

    async fn execute_plan(
        &self,
        request: Request<pb::ExecutePlanParams>,
    ) -> Result<Response<pb::ExecuteSqlResult>, Status> {
        let params = request.into_inner();
        let ctx = self.session(&params.session_id)?;
        let task_ctx = ctx.task_ctx();
        let plan = VolleyCodec::decode_plan(&params.plan, &task_ctx)
            .map_err(|e| Status::invalid_argument(format!("cannot decode plan: {e}")))?;
        let settings = Arc::new(
            params
                .settings
                .into_iter()
                .map(|kv| (kv.key, kv.value))
                .collect(),
        );
        let job_id = self
            .submit_physical(new_id(), &params.description, &ctx, plan, settings)
            .await?;
        Ok(Response::new(pb::ExecuteSqlResult { job_id }))
    }

    async fn get_job_status(
        &self,
        request: Request<pb::GetJobStatusParams>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        let params = request.into_inner();
        let deadline = Instant::now() + Duration::from_millis(u64::from(params.wait_ms));
        let mut rx = {
            let state = self.state.lock();
            let job = state
                .jobs
                .get(&params.job_id)
                .ok_or_else(|| Status::not_found(format!("unknown job {}", params.job_id)))?;
            job.version.subscribe()
        };
        loop {
            let done = self
                .state
                .lock()
                .jobs
                .get(&params.job_id)
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
        Ok(Response::new(self.job_status(&params.job_id)?))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobParams>,
    ) -> Result<Response<pb::CancelJobResult>, Status> {
        let cancelled = self.cancel(&request.into_inner().job_id).await;
        Ok(Response::new(pb::CancelJobResult { cancelled }))
    }

    async fn release_job(
        &self,
        request: Request<pb::ReleaseJobParams>,
    ) -> Result<Response<pb::ReleaseJobResult>, Status> {
        let job_id = request.into_inner().job_id;
        // Releasing a job that still runs cancels it: its tasks stop and its files go.
        self.state.lock().cancel_job(&job_id);
        self.release(&job_id).await;
        Ok(Response::new(pb::ReleaseJobResult {}))
    }

    async fn get_cluster_state(
        &self,
        _request: Request<pb::GetClusterStateParams>,
    ) -> Result<Response<pb::GetClusterStateResult>, Status> {
        let state = self.state.lock();
        let executors = state
            .executors
            .values()
            .filter(|e| e.alive)
            .map(|e| pb::ExecutorMetadata {
                id: e.id.clone(),
                host: e.host.clone(),
                flight_port: u32::from(e.port),
                grpc_port: u32::from(e.port),
                slots: e.slots,
            })
            .collect();
        let jobs = state
            .job_order
            .iter()
            .filter_map(|id| state.jobs.get(id))
            .map(|job| {
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
                            state: if stage.is_complete() {
                                "succeeded"
                            } else {
                                "running"
                            }
                            .to_string(),
                            kind: ClusterState::stage_kind(stage).as_str().to_string(),
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

/// Mark broadcast-switch candidates when the job's settings enable adaptive execution.
fn adaptive_candidates(stages: &mut [StagePlan], settings: &[(String, String)]) {
    let options = volley_core::config::VolleyOptions::from_pairs(settings);
    if options.adaptive && options.adaptive_broadcast_bytes > 0 {
        mark_broadcast_candidates(stages);
    }
}

/// What planning a statement produced.
enum Planned {
    /// Answered while planning (EXPLAIN): the result as IPC bytes.
    Inline(SchemaRef, Vec<u8>),
    /// Runs on the scheduler (DDL, SET, DESCRIBE).
    Collect(datafusion::dataframe::DataFrame),
    /// EXPLAIN ANALYZE of this plan.
    Analyze(Arc<dyn ExecutionPlan>, Arc<Vec<(String, String)>>),
    /// A plan for the executors, with the session settings its tasks run with.
    Physical(Arc<dyn ExecutionPlan>, Arc<Vec<(String, String)>>),
}

/// Parse, check and plan one statement (on a deep-stack thread; see [`on_deep_stack`]).
async fn plan_statement(
    ctx: &SessionContext,
    sql: &str,
    sandbox: &Sandbox,
    job_id: &str,
) -> Result<Planned> {
    let state = ctx.state();
    let logical = state.create_logical_plan(sql).await?;
    sandbox.check_logical(&logical)?;
    if let LogicalPlan::Explain(explain) = &logical
        && !explain.verbose
    {
        let physical = state.create_physical_plan(&explain.plan).await?;
        let physical = balance_parquet_scans(physical, &state).await?;
        let mut stages = plan_stages(job_id, physical)?;
        let pairs = config_to_pairs(state.config());
        adaptive_candidates(&mut stages, &pairs);
        let lines = explain_stages(&stages);
        let schema = plan_schema();
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(StringArray::from(lines))],
        )?;
        let bytes = ipc_bytes(&schema, &[batch])?;
        return Ok(Planned::Inline(schema, bytes));
    }
    if let LogicalPlan::Analyze(analyze) = &logical {
        let physical = state.create_physical_plan(&analyze.input).await?;
        let settings = Arc::new(config_to_pairs(state.config()));
        return Ok(Planned::Analyze(physical, settings));
    }
    let scheduler_side = matches!(
        logical,
        LogicalPlan::Ddl(_) | LogicalPlan::Statement(_) | LogicalPlan::DescribeTable(_)
    );
    let df = ctx.execute_logical_plan(logical).await?;
    if scheduler_side {
        return Ok(Planned::Collect(df));
    }
    let physical = df.create_physical_plan().await?;
    let settings = Arc::new(config_to_pairs(&state.config().clone()));
    Ok(Planned::Physical(physical, settings))
}

/// Schema of EXPLAIN answers: one `plan` line per row.
fn plan_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new("plan", DataType::Utf8, false)]))
}

/// One line per stage of a finished job: kind, tasks, rows written, adaptive decisions.
fn analyze_lines(job: &crate::state::Job) -> Vec<String> {
    job.stages
        .values()
        .map(|stage| {
            let (rows, _) = stage.output_size();
            let inputs: Vec<String> = stage.plan.inputs.iter().map(u32::to_string).collect();
            let state = if stage.skipped { "skipped" } else { "done" };
            let adaptive = if stage.adaptive.is_empty() {
                String::new()
            } else {
                let what: Vec<&str> = stage.adaptive.iter().map(|d| d.what.as_str()).collect();
                format!(" adaptive=[{}]", what.join("; "))
            };
            format!(
                "Stage {}: kind={} {state} tasks={} inputs=[{}] rows={rows}{adaptive}",
                stage.plan.stage_id,
                stage.plan.kind.as_str(),
                stage.tasks.len(),
                inputs.join(" "),
            )
        })
        .collect()
}
