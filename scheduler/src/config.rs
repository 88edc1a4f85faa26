//! Scheduler settings: what a user configures ([`SchedulerConfig`]), the policy the state
//! machine follows ([`SchedulerPolicy`]) and the task placement choice ([`LoadBalancing`],
//! also the CLI's `--load-balancing`).

use std::time::Duration;

use volley_core::security::Security;

/// Task placement policies.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoadBalancing {
    /// The executor with the most free slots.
    #[default]
    LeastLoaded,
    /// Executors in turn.
    RoundRobin,
}

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Address to bind.
    pub host: String,
    /// Port to bind; 0 picks a free one.
    pub port: u16,
    /// Attempts per task before its job fails.
    pub task_max_attempts: u32,
    /// Attempts per stage before its job fails.
    pub stage_max_attempts: u32,
    /// An executor silent this long is declared lost.
    pub executor_timeout: Duration,
    /// Shuffle partitions per exchange; None = total executor slots (at least 2).
    pub target_partitions: Option<usize>,
    /// Unreleased results are removed this long after their job ended.
    pub result_ttl: Duration,
    /// Largest gRPC message accepted or sent.
    pub max_message_size: usize,
    /// How tasks are placed on executors.
    pub load_balancing: LoadBalancing,
    /// Auth token and TLS for the gRPC server and calls to executors.
    pub security: Security,
    /// File sandbox: roots queries may read and write under (empty = the working directory);
    /// None = no restriction (in-process clusters of a library user).
    pub allowed_paths: Option<Vec<String>>,
    /// Allow DDL/DML (CREATE, DROP, INSERT, COPY).
    pub allow_ddl: bool,
    /// `CREATE EXTERNAL TABLE` statements run at start; their tables are in every session.
    pub tables: Vec<String>,
    /// Jobs running at once; later ones queue (0 = no limit).
    pub max_concurrent_jobs: usize,
    /// Allow a non-loopback address without an auth token.
    pub insecure: bool,
    /// Port of the web status page and JSON API (same host; 0 picks a free one; None = off).
    pub http_port: Option<u16>,
    /// Accept jobs that set the `volley.test_*` fault-injection hooks (tests only).
    pub enable_test_hooks: bool,
    /// A running job in which no task finished for this long fails, naming the tasks it waits
    /// for (None: never).
    pub stall_timeout: Option<Duration>,
    /// Memory for everything that runs on the scheduler itself (DDL, `CREATE TABLE AS`, plans
    /// that cannot be sent to executors); beyond it, operators spill or fail.
    pub memory_limit: usize,
    /// Where the durable state lives (`DIR/scheduler.redb`); None keeps it in memory.
    pub state_dir: Option<std::path::PathBuf>,
    /// Remove the state file at start instead of reading it.
    pub state_reset: bool,
    /// Keep the durable state in etcd (`etcd://host:2379[,host:2379][/name]`) shared with
    /// standby schedulers: this one serves only while it leads (see the store's etcd backend).
    pub state_url: Option<String>,
    /// The URL clients and executors reach this scheduler at, named to them by standbys when
    /// it leads (default: `http(s)://host:port`; set it when binding 0.0.0.0).
    pub advertise_url: Option<String>,
    /// Bytes of query answers the result cache keeps (0: no result cache).
    pub result_cache_bytes: u64,
    /// Folder of the result cache's larger answers (None: a temporary folder).
    pub result_cache_dir: Option<std::path::PathBuf>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".to_string(),
            port: 50050,
            task_max_attempts: 4,
            stage_max_attempts: 4,
            executor_timeout: Duration::from_secs(10),
            target_partitions: None,
            result_ttl: Duration::from_secs(600),
            max_message_size: 64 * 1024 * 1024,
            load_balancing: LoadBalancing::LeastLoaded,
            security: Security::none(),
            allowed_paths: None,
            allow_ddl: true,
            tables: Vec::new(),
            max_concurrent_jobs: 0,
            insecure: false,
            http_port: Some(0),
            enable_test_hooks: false,
            stall_timeout: Some(Duration::from_secs(3600)),
            memory_limit: 2 << 30,
            state_dir: None,
            state_reset: false,
            state_url: None,
            advertise_url: None,
            result_cache_bytes: 1 << 30,
            result_cache_dir: None,
        }
    }
}

impl SchedulerConfig {
    /// Bind to `host:port`.
    pub fn with_address(mut self, host: impl Into<String>, port: u16) -> Self {
        self.host = host.into();
        self.port = port;
        self
    }

    /// Fix the number of shuffle partitions.
    pub fn with_target_partitions(mut self, n: usize) -> Self {
        self.target_partitions = Some(n);
        self
    }

    /// The policy the state machine follows.
    pub fn policy(&self) -> SchedulerPolicy {
        SchedulerPolicy {
            task_max_attempts: self.task_max_attempts.max(1),
            stage_max_attempts: self.stage_max_attempts.max(1),
            load_balancing: self.load_balancing,
            max_concurrent_jobs: self.max_concurrent_jobs,
        }
    }
}

/// Scheduler policy knobs.
#[derive(Debug, Clone)]
pub struct SchedulerPolicy {
    /// Attempts per task before the job fails.
    pub task_max_attempts: u32,
    /// Attempts per stage (re-runs after lost output) before the job fails.
    pub stage_max_attempts: u32,
    /// How tasks are placed.
    pub load_balancing: LoadBalancing,
    /// Jobs running at once; later ones queue (0 = no limit).
    pub max_concurrent_jobs: usize,
}

impl Default for SchedulerPolicy {
    fn default() -> Self {
        Self {
            task_max_attempts: 4,
            stage_max_attempts: 4,
            load_balancing: LoadBalancing::LeastLoaded,
            max_concurrent_jobs: 0,
        }
    }
}
