//! The executor process: gRPC + Flight server, registration, heartbeats, task slots.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arrow_flight::flight_service_server::FlightServiceServer;
use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::session_state::SessionStateBuilder;
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};
use tokio::task::{AbortHandle, JoinHandle};
use tonic::metadata::MetadataMap;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use volley_core::failover::SchedulerUrls;
use volley_core::protobuf::executor_grpc_server::{ExecutorGrpc, ExecutorGrpcServer};
use volley_core::protobuf::scheduler_grpc_client::SchedulerGrpcClient;
use volley_core::protobuf::{self as pb};
use volley_core::sandbox::Sandbox;
use volley_core::security::{AuthChannel, require_cluster};
use volley_core::shuffle::MemoryShuffle;
use volley_core::stores::{StoreCache, StoreScope};
use volley_core::{Result, VolleyError};

use crate::flight::ShuffleFlightService;
use crate::heartbeat::{AttemptKey, Beat, Heartbeat, Reporter, backoff};
use crate::runner::TaskRunner;
use crate::work_dir::WorkDir;

/// How long a graceful shutdown waits for running tasks.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

pub use crate::config::{DEFAULT_SHUFFLE_MEMORY, ExecutorConfig};

struct ExecutorInner {
    id: String,
    work_dir: WorkDir,
    config: ExecutorConfig,
    port: u16,
    runner: TaskRunner,
    slots: Arc<Semaphore>,
    running: Mutex<HashMap<String, Vec<AbortHandle>>>,
    /// Secret of the current registration, carried by heartbeats, reports and deregistration.
    secret: Arc<Mutex<String>>,
    /// Attempts held (waiting for a slot, running or reporting), listed in heartbeats.
    attempts: Arc<Mutex<HashSet<AttemptKey>>>,
    /// A client of each scheduler of `--scheduler` (a leader and its standbys).
    schedulers: Vec<SchedulerGrpcClient<AuthChannel>>,
    /// Their URLs and the one in use.
    urls: Arc<SchedulerUrls>,
    /// Delivers task statuses from the heartbeat thread (never starved by task work).
    reporter: Reporter,
    draining: Arc<AtomicBool>,
    /// A re-registration is under way (heartbeats ask for one every beat until it is done).
    registering: AtomicBool,
}

/// Holds an attempt in the executor's list until its status was delivered or it was aborted
/// (dropped with its task).
struct AttemptGuard {
    attempts: Arc<Mutex<HashSet<AttemptKey>>>,
    key: AttemptKey,
}

impl Drop for AttemptGuard {
    fn drop(&mut self) {
        self.attempts.lock().remove(&self.key);
    }
}

/// The executor's gRPC service.
#[derive(Clone)]
struct ExecutorService {
    inner: Arc<ExecutorInner>,
}

impl ExecutorInner {
    fn metadata(&self) -> pb::ExecutorMetadata {
        pb::ExecutorMetadata {
            id: self.id.clone(),
            host: self.config.host.clone(),
            flight_port: u32::from(self.port),
            grpc_port: u32::from(self.port),
            slots: u32::try_from(self.config.slots).unwrap_or(u32::MAX),
            cores: u32::try_from(self.config.cores).unwrap_or(u32::MAX),
        }
    }

    /// Register; then drop the folders of jobs the scheduler no longer runs (left from before
    /// a scheduler restart or while this executor was cut off and declared lost).
    /// The client of the scheduler in use, and its index.
    fn scheduler(&self) -> (usize, SchedulerGrpcClient<AuthChannel>) {
        let index = self.urls.current();
        (
            index,
            self.schedulers[index % self.schedulers.len()].clone(),
        )
    }

    async fn register(&self) -> Result<()> {
        let (index, mut client) = self.scheduler();
        let asked = std::time::SystemTime::now();
        let mut held_outputs = self.work_dir.files();
        held_outputs.extend(self.runner.memory.paths());
        let answer = match client
            .register_executor(pb::RegisterExecutorParams {
                metadata: Some(self.metadata()),
                held_outputs,
            })
            .await
        {
            Ok(answer) => answer.into_inner(),
            Err(e) => {
                // A standby names the leader: the next try goes there; gone: to the next
                // scheduler of the list.
                if e.code() == tonic::Code::Unavailable {
                    let leader = volley_core::failover::leader_named(&e);
                    if !leader.is_some_and(|url| self.urls.point_to(url)) {
                        self.urls.advance(index);
                    }
                }
                return Err(e.into());
            }
        };
        *self.secret.lock() = answer.secret;
        let active: std::collections::HashSet<String> = answer.active_jobs.into_iter().collect();
        let swept = self.work_dir.sweep_jobs(&active, asked);
        if swept > 0 {
            tracing::info!(
                swept,
                "removed folders of jobs the scheduler no longer runs"
            );
        }
        Ok(())
    }

    /// Register, retrying with backoff while the scheduler is not reachable yet.
    async fn register_with_retry(&self) -> Result<()> {
        let mut attempt = 0;
        loop {
            match self.register().await {
                Ok(()) => return Ok(()),
                Err(VolleyError::Grpc(status))
                    if status.code() == tonic::Code::Unavailable
                        && attempt < 8 + self.schedulers.len() as u32 =>
                {
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn deregister(&self, draining: bool) {
        let (_, mut client) = self.scheduler();
        let secret = self.secret.lock().clone();
        if let Err(e) = client
            .deregister_executor(pb::DeregisterExecutorParams {
                executor_id: self.id.clone(),
                draining,
                secret,
            })
            .await
        {
            tracing::warn!(error = %e, "cannot deregister from scheduler");
        }
    }

    /// Run `tasks` (launched by the scheduler, or handed out in the answer to a status
    /// report), each once a slot is free; `metadata` is the launch request's, with the trace
    /// context of the tasks' stage.
    fn start_tasks(
        self: &Arc<Self>,
        tasks: Vec<pb::TaskDefinition>,
        metadata: Option<&MetadataMap>,
    ) {
        for def in tasks {
            let task = def.task.clone().unwrap_or_default();
            let job_id = task.job_id.clone();
            // The scheduler's stage span is the parent of this task's span.
            let span = tracing::info_span!(
                "task",
                job_id = %task.job_id,
                stage_id = task.stage_id,
                partition = task.partition,
                attempt = task.attempt,
                executor_id = %self.id,
            );
            match metadata {
                Some(metadata) => volley_core::telemetry::set_parent_from(&span, metadata),
                None => {
                    volley_core::telemetry::set_parent_from_traceparent(&span, &def.traceparent)
                }
            }
            let inner = Arc::clone(self);
            let job = job_id.clone();
            let key = (
                task.job_id.clone(),
                task.stage_id,
                task.partition,
                task.attempt,
            );
            self.attempts.lock().insert(key.clone());
            let guard = AttemptGuard {
                attempts: Arc::clone(&self.attempts),
                key,
            };
            let handle = tokio::spawn(
                async move {
                    let _guard = guard;
                    let Ok(_permit) = Arc::clone(&inner.slots).acquire_owned().await else {
                        return;
                    };
                    let status = inner.runner.run(def).await;
                    inner.reporter.report(status).await;
                    inner.remove_finished(&job);
                }
                .instrument(span),
            );
            self.running
                .lock()
                .entry(job_id)
                .or_default()
                .push(handle.abort_handle());
        }
    }

    /// Stop every task: the scheduler asking this executor to register again no longer counts
    /// on them (it restarted, or declared this executor lost and launched them elsewhere).
    fn abort_all(&self) -> usize {
        let handles: Vec<AbortHandle> = self.running.lock().drain().flat_map(|(_, h)| h).collect();
        let mut aborted = 0;
        for handle in handles {
            if !handle.is_finished() {
                handle.abort();
                aborted += 1;
            }
        }
        aborted
    }

    fn remove_finished(&self, job_id: &str) {
        let mut running = self.running.lock();
        if let Some(handles) = running.get_mut(job_id) {
            handles.retain(|h| !h.is_finished());
            if handles.is_empty() {
                running.remove(job_id);
            }
        }
    }
}

#[tonic::async_trait]
impl ExecutorGrpc for ExecutorService {
    async fn launch_tasks(
        &self,
        request: Request<pb::LaunchTasksParams>,
    ) -> Result<Response<pb::LaunchTasksResult>, Status> {
        require_cluster(&request, "launching tasks")?;
        if self.inner.draining.load(Ordering::SeqCst) {
            return Err(Status::unavailable(format!(
                "executor {} is shutting down",
                self.inner.id
            )));
        }
        let (metadata, _, params) = request.into_parts();
        self.inner.start_tasks(params.tasks, Some(&metadata));
        Ok(Response::new(pb::LaunchTasksResult {}))
    }

    async fn cancel_tasks(
        &self,
        request: Request<pb::CancelTasksParams>,
    ) -> Result<Response<pb::CancelTasksResult>, Status> {
        require_cluster(&request, "cancelling tasks")?;
        let job_id = request.into_inner().job_id;
        let handles = self
            .inner
            .running
            .lock()
            .remove(&job_id)
            .unwrap_or_default();
        let mut cancelled = 0u32;
        for handle in handles {
            if !handle.is_finished() {
                handle.abort();
                cancelled += 1;
            }
        }
        if cancelled > 0 {
            tracing::info!(job_id, cancelled, "tasks cancelled");
        }
        Ok(Response::new(pb::CancelTasksResult { cancelled }))
    }

    async fn remove_job_data(
        &self,
        request: Request<pb::RemoveJobDataParams>,
    ) -> Result<Response<pb::RemoveJobDataResult>, Status> {
        require_cluster(&request, "removing job data")?;
        let job_id = request.into_inner().job_id;
        if job_id.is_empty() || job_id.contains(['/', '\\', '.']) {
            return Err(Status::invalid_argument(format!("bad job id {job_id:?}")));
        }
        let dir = self.inner.work_dir.path().join(&job_id);
        self.inner.runner.memory.remove_under(&dir);
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Status::internal(format!(
                    "cannot remove {}: {e}",
                    dir.display()
                )));
            }
        }
        Ok(Response::new(pb::RemoveJobDataResult {}))
    }
}

/// A running executor.
pub struct ExecutorHandle {
    id: String,
    inner: Arc<ExecutorInner>,
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<()>>,
    heartbeat: Option<Heartbeat>,
    /// The gRPC health service's state: NOT_SERVING once draining (probes see it leave).
    health: tonic_health::server::HealthReporter,
}

impl ExecutorHandle {
    /// Shuffle outputs this executor holds in memory now.
    pub fn outputs_in_memory(&self) -> usize {
        self.inner.runner.memory.len()
    }

    /// Executor id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Address of its gRPC/Flight server.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop heartbeats and the server.
    pub async fn shutdown(mut self) {
        // Drain: no new tasks, running ones finish and report, then leave.
        self.inner.draining.store(true, Ordering::SeqCst);
        self.health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        self.inner.deregister(true).await;
        let slots = u32::try_from(self.inner.config.slots.max(1)).unwrap_or(u32::MAX);
        let drained = tokio::time::timeout(
            DRAIN_TIMEOUT,
            Arc::clone(&self.inner.slots).acquire_many_owned(slots),
        )
        .await;
        if drained.is_err() {
            tracing::warn!(executor_id = %self.id, "tasks still running after the drain timeout");
        }
        if let Some(heartbeat) = self.heartbeat.take() {
            heartbeat.stop().await;
        }
        self.inner.deregister(false).await;
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(join) = self.join.take() {
            let _ = join.await;
        }
    }
}

/// Start an executor: bind, serve, register with the scheduler, heartbeat.
pub async fn start_executor(config: ExecutorConfig) -> Result<ExecutorHandle> {
    let exposed = !volley_core::security::is_loopback_host(&config.host);
    let secured = config.security.token().is_some() || config.security.cluster_token().is_some();
    if exposed && !secured && !config.insecure {
        return Err(VolleyError::Config(format!(
            "refusing to listen on {} without a token: anyone reaching it could launch tasks; set --cluster-token (and --auth-token) or pass --insecure",
            config.host
        )));
    }
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    let work_dir = WorkDir::create(&config.work_dir, &id)?;
    let work_path = work_dir.path().to_path_buf();
    let listener = TcpListener::bind((config.host.as_str(), config.port))
        .await
        .map_err(|e| VolleyError::Connect {
            address: format!("{}:{}", config.host, config.port),
            message: format!("cannot bind executor: {e}"),
        })?;
    let addr = listener.local_addr()?;
    let urls = Arc::new(SchedulerUrls::parse(&config.scheduler_url)?);
    let mut schedulers = Vec::new();
    for url in urls.urls() {
        let channel = config
            .security
            .endpoint(url)?
            .timeout(Duration::from_secs(10))
            .connect_lazy();
        schedulers.push(
            SchedulerGrpcClient::new(config.security.authed(channel)?)
                .max_decoding_message_size(config.max_message_size)
                .max_encoding_message_size(config.max_message_size),
        );
    }
    // Every table file a task opens, lists or writes must be under the allowed roots, however
    // the task names it (the scheduler checked the plan too; this holds for any task).
    let sandbox = match &config.allowed_paths {
        Some(roots) => Sandbox::new(roots, true)?,
        None => Sandbox::unrestricted(true),
    };
    let stores = StoreCache::new(sandbox);
    let mut runtime = RuntimeEnvBuilder::new()
        .with_cache_manager(volley_core::stores::cache_config())
        .with_object_store_registry(Arc::new(StoreScope::new(Arc::clone(&stores))));
    if let Some(limit) = config.memory_limit {
        runtime = runtime.with_memory_pool(Arc::new(FairSpillPool::new(limit)));
    }
    let runtime = runtime
        .build_arc()
        .map_err(|e| VolleyError::Config(format!("executor runtime: {e}")))?;
    let mut base_state = SessionStateBuilder::new()
        .with_default_features()
        .with_runtime_env(runtime)
        .build();
    // The same size checks as constant folding on the scheduler (plans name functions).
    volley_core::functions::guard_functions(&mut base_state)?;
    let (reporter, reports) = Reporter::channel();
    let memory = MemoryShuffle::new(config.shuffle_memory);
    let inner = Arc::new(ExecutorInner {
        id: id.clone(),
        work_dir,
        port: addr.port(),
        runner: TaskRunner {
            executor_id: id.clone(),
            host: config.host.clone(),
            work_dir: work_path.clone(),
            base_state,
            stores,
            security: config.security.clone(),
            test_hooks: config.enable_test_hooks,
            memory: Arc::clone(&memory),
            configs: Default::default(),
        },
        slots: Arc::new(Semaphore::new(config.slots.max(1))),
        running: Mutex::new(HashMap::new()),
        attempts: Arc::new(Mutex::new(HashSet::new())),
        secret: Arc::new(Mutex::new(String::new())),
        registering: AtomicBool::new(false),
        schedulers,
        urls: Arc::clone(&urls),
        reporter,
        config: config.clone(),
        draining: Arc::new(AtomicBool::new(false)),
    });

    let (tx, rx) = oneshot::channel::<()>();
    let interceptor = config.security.server_interceptor("executor");
    let grpc = InterceptedService::new(
        ExecutorGrpcServer::new(ExecutorService {
            inner: Arc::clone(&inner),
        })
        .max_decoding_message_size(config.max_message_size)
        .max_encoding_message_size(config.max_message_size),
        interceptor.clone(),
    );
    let flight = InterceptedService::new(
        FlightServiceServer::new(ShuffleFlightService::new(
            work_path,
            config.max_message_size,
            config.security.cluster_token().map(str::to_string),
            memory,
        ))
        .max_decoding_message_size(config.max_message_size)
        .max_encoding_message_size(config.max_message_size),
        interceptor,
    );
    // The standard gRPC health service, without a token (probes carry none).
    let (health_reporter, health) = tonic_health::server::health_reporter();
    let server = config.security.server()?;
    let join = tokio::spawn(async move {
        let mut server = server;
        let result = server
            .add_service(grpc)
            .add_service(flight)
            .add_service(health)
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    let _ = rx.await;
                },
            )
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "executor server stopped");
        }
    });

    inner.register_with_retry().await.map_err(|e| {
        VolleyError::Internal(format!(
            "cannot register with scheduler {}: {e}",
            config.scheduler_url
        ))
    })?;
    tracing::info!(executor_id = %id, %addr, slots = config.slots, "executor registered");

    let main = tokio::runtime::Handle::current();
    let runs = Arc::clone(&inner);
    let launch_on = main.clone();
    let again = Arc::clone(&inner);
    let heartbeat = Heartbeat::start(Beat {
        id: id.clone(),
        secret: Arc::clone(&inner.secret),
        attempts: Arc::clone(&inner.attempts),
        slots: Arc::clone(&inner.slots),
        total_slots: u32::try_from(config.slots).unwrap_or(u32::MAX),
        interval: config.heartbeat_interval,
        schedulers: Arc::clone(&urls),
        security: config.security.clone(),
        max_message_size: config.max_message_size,
        reports: Some(reports),
        draining: Arc::clone(&inner.draining),
        launch: Arc::new(move |tasks| {
            let _runtime = launch_on.enter();
            runs.start_tasks(tasks, None);
        }),
        reregister: Box::new(move || {
            if again.registering.swap(true, Ordering::SeqCst) {
                return;
            }
            let inner = Arc::clone(&again);
            main.spawn(async move {
                let aborted = inner.abort_all();
                if aborted > 0 {
                    tracing::info!(aborted, "stopped the tasks of the previous registration");
                }
                if let Err(e) = inner.register().await {
                    tracing::warn!(error = %e, "re-registration failed");
                }
                inner.registering.store(false, Ordering::SeqCst);
            });
        }),
    })?;

    Ok(ExecutorHandle {
        id,
        inner: Arc::clone(&inner),
        addr,
        shutdown: Some(tx),
        join: Some(join),
        heartbeat: Some(heartbeat),
        health: health_reporter,
    })
}
