//! L6: the scheduler's service — the only place that does network IO. [`submit`] plans
//! statements into jobs, [`launch`] sends tasks to executors and releases jobs,
//! [`housekeeping`] expires executors, results and stuck jobs, [`executors`] handles what
//! executors report, [`status`] answers clients' questions, [`tables`] keeps `CREATE TABLE AS`
//! results, `cached` serves and keeps answers of the result cache, `cache_table` runs
//! `CACHE TABLE` (its tables are `cached_table`'s), and [`grpc`] is the thin gRPC layer over
//! all of them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::prelude::SessionContext;
use parking_lot::Mutex;
use tokio::task::JoinHandle;
use tonic::Status;
use volley_core::Result;
use volley_core::protobuf::executor_grpc_client::ExecutorGrpcClient;
use volley_core::sandbox::Sandbox;
use volley_core::security::{AuthChannel, Security};
use volley_core::stores::{StoreCache, StoreScope};

use crate::cluster::ClusterState;
use crate::cluster::executors::ExecutorInfo;
use crate::config::SchedulerConfig;
use crate::metrics::SchedulerMetrics;
use crate::result_cache::ResultCache;
use crate::store::{HISTORY_LIMIT, StateStore, StoredSession};
use crate::views::{self, JobSummary};

mod cache_table;
mod cached;
mod cached_table;
pub mod executors;
pub mod grpc;
pub mod housekeeping;
pub mod launch;
mod plan;
pub mod sessions;
pub mod status;
pub mod submit;
pub mod tables;

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
    /// A standby's read-only service (another scheduler leads): not ready for probes.
    standby: Arc<std::sync::atomic::AtomicBool>,
    /// The journal's writer thread (a durable store).
    writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
    /// Base runtime of every session: one memory pool for what runs on the scheduler (DDL,
    /// `CREATE TABLE AS`, plans that cannot travel), shared file caches. Each session has its
    /// own object store scope over [`Self::stores`].
    runtime: Arc<datafusion::execution::runtime_env::RuntimeEnv>,
    /// Object stores built on the scheduler (sandboxed local files, remote stores).
    stores: Arc<StoreCache>,
    /// Tables of `--table`, registered at start and seen by every session.
    tables: Arc<Mutex<Vec<SharedTable>>>,
    /// Durable state: the history of finished jobs.
    store: Arc<dyn StateStore>,
    /// The finished jobs recorded in [`Self::store`], oldest first (read once at start).
    history: Arc<Mutex<Vec<JobSummary>>>,
    /// Each open session as [`Self::store`] keeps it.
    session_records: Arc<Mutex<HashMap<String, StoredSession>>>,
    /// Answers of finished queries served again (see [`crate::result_cache`]).
    result_cache: Arc<Mutex<ResultCache>>,
    /// Jobs whose answer is being read into the result cache -> a release was asked for
    /// meanwhile (it happens once the answer is read).
    capturing: Arc<Mutex<HashMap<String, bool>>>,
}

/// A table of `--table`: its name and provider.
type SharedTable = (String, Arc<dyn datafusion::catalog::TableProvider>);

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

impl SchedulerService {
    /// A service with no executors and no jobs.
    pub fn new(
        config: Arc<SchedulerConfig>,
        sandbox: Sandbox,
        metrics: SchedulerMetrics,
        store: Arc<dyn StateStore>,
    ) -> Result<Self> {
        let mut state = ClusterState::new(config.policy());
        let mut writer = None;
        if store.durable() {
            let (journal, thread) = crate::store::spawn_writer(Arc::clone(&store))?;
            state.set_journal(journal);
            writer = Some(thread);
        }
        let history = store.finished_jobs()?;
        // Files DDL, `CREATE TABLE AS` and scheduler-side plans touch stay in the sandbox too.
        let stores = StoreCache::new(sandbox.clone());
        let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(
                datafusion::execution::memory_pool::FairSpillPool::new(config.memory_limit),
            ))
            .with_cache_manager(volley_core::stores::cache_config())
            .with_object_store_registry(Arc::new(StoreScope::new(Arc::clone(&stores))))
            .build_arc()?;
        let result_cache = ResultCache::new(
            config.result_cache_bytes,
            config.result_cache_dir.clone(),
            metrics.result_cache.clone(),
        );
        Ok(Self {
            result_cache: Arc::new(Mutex::new(result_cache)),
            capturing: Arc::new(Mutex::new(HashMap::new())),
            runtime,
            stores,
            tables: Arc::new(Mutex::new(Vec::new())),
            config,
            state: Arc::new(Mutex::new(state)),
            sessions: Arc::new(Mutex::new(HashMap::new())),
            clients: Arc::new(Mutex::new(HashMap::new())),
            sandbox,
            metrics,
            background: Arc::new(Mutex::new(None)),
            standby: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            writer: Arc::new(Mutex::new(writer)),
            store,
            history: Arc::new(Mutex::new(history)),
            session_records: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// Jobs for the list, newest first: those held now, then the recorded history (DDL and
    /// SET statements only with `ddl`).
    pub fn jobs(&self, ddl: bool) -> Vec<JobSummary> {
        let history = self.history.lock().clone();
        self.with_state(|state| views::jobs(state, &history, ddl))
    }

    /// This service is a standby's (another scheduler leads): readiness probes fail, so a
    /// load balancer sends calls to the leader only.
    pub fn mark_standby(&self) {
        self.standby
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// True for a standby's service.
    pub fn is_standby(&self) -> bool {
        self.standby.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Read the history from the state store again (a standby shows what the leader records).
    pub fn reload_history(&self) {
        match self.store.finished_jobs() {
            Ok(jobs) => *self.history.lock() = jobs,
            Err(e) => tracing::debug!(error = %e, "cannot read the job history"),
        }
    }

    /// A job with its stages, or — a job from before a restart — its recorded summary alone.
    pub fn job_detail(&self, job_id: &str) -> Option<views::JobDetail> {
        self.with_state(|s| views::job_detail(s, job_id))
            .or_else(|| {
                self.recorded_job(job_id).map(|job| views::JobDetail {
                    job,
                    stages: Vec::new(),
                })
            })
    }

    /// A job only the history still knows.
    pub fn recorded_job(&self, job_id: &str) -> Option<JobSummary> {
        self.history.lock().iter().find(|j| j.id == job_id).cloned()
    }

    /// Record the jobs that finished since the last call in the state store (one
    /// transaction); a store that cannot write is logged, and the jobs are tried again.
    pub fn record_history(&self) {
        let (finished, ids, journaled) = {
            let mut state = self.state.lock();
            let finished: Vec<JobSummary> = state
                .take_unrecorded()
                .into_iter()
                .map(views::job_summary)
                .collect();
            let ids: Vec<String> = finished.iter().map(|j| j.id.clone()).collect();
            // After the finished jobs' last steps, in the journal's order.
            let journaled = state.journaling() && !ids.is_empty();
            if journaled {
                state.journal(crate::store::JournalWrite::Forget(ids.clone()));
            }
            (finished, ids, journaled)
        };
        if finished.is_empty() {
            return;
        }
        if !journaled && let Err(e) = self.store.forget_running(&ids) {
            tracing::warn!(store = %self.store.location(), error = %e, "cannot forget finished jobs");
        }
        if let Err(e) = self.store.record_finished(&finished) {
            tracing::warn!(store = %self.store.location(), error = %e, "cannot record finished jobs");
            let mut state = self.state.lock();
            for job in &finished {
                state.mark_unrecorded(&job.id);
            }
            return;
        }
        let mut history = self.history.lock();
        history.extend(finished);
        let excess = history.len().saturating_sub(HISTORY_LIMIT);
        history.drain(..excess);
    }

    /// Stop leading the schedulers sharing the state (graceful stop), once everything
    /// journaled so far is written.
    pub async fn resign(&self) {
        self.state.lock().close_journal();
        let writer = self.writer.lock().take();
        if let Some(writer) = writer {
            let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        }
        self.store.resign();
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
        self.expire_cached();
        let state = self.state.lock();
        self.metrics.render(&state)
    }

    /// Read the state (tests, status pages).
    pub fn with_state<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        f(&self.state.lock())
    }

    /// Wait until job `job_id` has ended (succeeded, failed or was cancelled); false when it
    /// is gone.
    pub(crate) async fn wait_final(&self, job_id: &str) -> bool {
        let Some(mut rx) = self.state.lock().job(job_id).map(|j| j.version.subscribe()) else {
            return false;
        };
        loop {
            match self.state.lock().job(job_id) {
                None => return false,
                Some(job) if job.state.is_final() => return true,
                Some(_) => {}
            }
            if rx.changed().await.is_err() {
                return false;
            }
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
}
