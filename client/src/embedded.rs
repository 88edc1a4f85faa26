//! The embedded cluster: a scheduler and executors in this process on loopback.

use std::time::Duration;

use volley_executor::{ExecutorConfig, ExecutorHandle, start_executor};
use volley_scheduler::{SchedulerConfig, SchedulerHandle, start_scheduler};

use crate::{ClientOptions, VolleyClient};
use volley_core::{Result, VolleyError};

/// A scheduler and executors running in this process, talking gRPC over 127.0.0.1.
pub struct EmbeddedCluster {
    scheduler: SchedulerHandle,
    executors: Vec<ExecutorHandle>,
    work_dir: tempfile::TempDir,
    options: ClientOptions,
    /// Last, so that it stops after the handles above.
    _scheduler_runtime: SchedulerRuntime,
}

/// The scheduler's own threads. The executors' tasks run on the process's runtime and may
/// keep every one of its workers busy for seconds (CPU-bound operators do not yield); on
/// threads of its own the scheduler still answers heartbeats and status reports, runs its
/// housekeeping and plans new statements meanwhile, as a scheduler process would.
struct SchedulerRuntime(Option<tokio::runtime::Runtime>);

impl SchedulerRuntime {
    fn new() -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("volley-scheduler")
            .thread_stack_size(volley_core::stack::WORKER_STACK_BYTES)
            .enable_all()
            .build()
            .map_err(VolleyError::Io)?;
        Ok(Self(Some(runtime)))
    }
}

impl Drop for SchedulerRuntime {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which an async context may not do.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl EmbeddedCluster {
    /// Start a scheduler and `executors` executors with `slots` slots each.
    pub async fn start(executors: usize, slots: usize) -> Result<Self> {
        Self::start_with(
            SchedulerConfig::default().with_address("127.0.0.1", 0),
            executors,
            slots,
        )
        .await
    }

    /// Start with a given scheduler configuration.
    pub async fn start_with(
        config: SchedulerConfig,
        executors: usize,
        slots: usize,
    ) -> Result<Self> {
        Self::start_with_memory(config, executors, slots, None).await
    }

    /// Start with a given scheduler configuration and a memory limit per executor (operators
    /// spill to disk beyond it).
    pub async fn start_with_memory(
        config: SchedulerConfig,
        executors: usize,
        slots: usize,
        memory_limit: Option<usize>,
    ) -> Result<Self> {
        let work_dir = tempfile::Builder::new()
            .prefix("volley-embedded-")
            .tempdir()
            .map_err(VolleyError::Io)?;
        // The cluster's own processes authenticate with a cluster token that clients never
        // hold; in one process it is simply made up.
        let mut config = config;
        if config.security.token().is_some() && config.security.cluster_token().is_none() {
            let made_up = format!(
                "{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            );
            config.security = config.security.clone().with_cluster_token(Some(made_up));
        }
        let cluster_security = config.security.clone();
        let options = ClientOptions {
            security: config.security.for_clients(),
            max_message_size: config.max_message_size,
            ..ClientOptions::default()
        };
        let test_hooks = config.enable_test_hooks;
        let allowed_paths = config.allowed_paths.clone();
        let scheduler_runtime = SchedulerRuntime::new()?;
        let scheduler = match &scheduler_runtime.0 {
            Some(runtime) => runtime
                .spawn(start_scheduler(config))
                .await
                .map_err(|e| VolleyError::Internal(format!("scheduler did not start: {e}")))??,
            None => start_scheduler(config).await?,
        };
        let mut handles = Vec::new();
        for i in 0..executors.max(1) {
            let mut config = ExecutorConfig::new(scheduler.url());
            config.slots = slots.max(1);
            config.work_dir = work_dir.path().join(format!("executor-{i}"));
            config.heartbeat_interval = Duration::from_secs(2);
            config.security = cluster_security.clone();
            config.max_message_size = options.max_message_size;
            config.memory_limit = memory_limit;
            config.enable_test_hooks = test_hooks;
            config.allowed_paths = allowed_paths.clone();
            handles.push(start_executor(config).await?);
        }
        Ok(Self {
            scheduler,
            executors: handles,
            work_dir,
            options,
            _scheduler_runtime: scheduler_runtime,
        })
    }

    /// The scheduler's URL.
    pub fn url(&self) -> String {
        self.scheduler.url()
    }

    /// The scheduler, for inspection.
    pub fn scheduler(&self) -> &SchedulerHandle {
        &self.scheduler
    }

    /// Ids of the executors.
    pub fn executor_ids(&self) -> Vec<String> {
        self.executors.iter().map(|e| e.id().to_string()).collect()
    }

    /// Shuffle outputs the executors hold in memory now (see `--shuffle-memory`).
    pub fn outputs_in_memory(&self) -> usize {
        self.executors.iter().map(|e| e.outputs_in_memory()).sum()
    }

    /// Root of the executors' work dirs (one folder per executor).
    pub fn work_dir(&self) -> &std::path::Path {
        self.work_dir.path()
    }

    /// A client session on this cluster.
    pub async fn client(&self) -> Result<VolleyClient> {
        VolleyClient::connect_with(&self.url(), self.options.clone()).await
    }

    /// Stop executors, then the scheduler; removes the work dirs.
    pub async fn shutdown(self) {
        for executor in self.executors {
            executor.shutdown().await;
        }
        self.scheduler.shutdown().await;
    }
}
