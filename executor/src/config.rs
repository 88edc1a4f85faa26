//! The executor's settings.

use std::path::PathBuf;
use std::time::Duration;

use volley_core::security::Security;

/// Default cap on the shuffle outputs an executor holds in memory.
pub const DEFAULT_SHUFFLE_MEMORY: usize = 256 * 1024 * 1024;

/// Executor settings.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// `http://host:port` of the scheduler, or a comma-separated list of them (a leader and
    /// its standbys).
    pub scheduler_url: String,
    /// Address to bind and to advertise.
    pub host: String,
    /// Port to bind (gRPC and Flight share it); 0 picks a free one.
    pub port: u16,
    /// Tasks run at once.
    pub slots: usize,
    /// Cores the tasks share (default: the machine's); with more cores than slots, the
    /// scheduler may give a task several partitions of a stage to run at once.
    pub cores: usize,
    /// Where shuffle files go; a job's folder is removed when the job ends.
    pub work_dir: PathBuf,
    /// Heartbeat period.
    pub heartbeat_interval: Duration,
    /// Largest gRPC message accepted or sent.
    pub max_message_size: usize,
    /// Auth token and TLS, for serving and for calling the scheduler and other executors.
    pub security: Security,
    /// Memory for all running tasks together; sorts, aggregations and joins spill to disk
    /// beyond it (None = no limit).
    pub memory_limit: Option<usize>,
    /// Honour the `volley.test_*` fault-injection hooks (tests only; off in production).
    pub enable_test_hooks: bool,
    /// File sandbox: the roots tasks may read and write table files under (empty = the working
    /// directory); None = no restriction (in-process clusters of a library user).
    pub allowed_paths: Option<Vec<String>>,
    /// Allow a non-loopback address without a token.
    pub insecure: bool,
    /// Most bytes of small shuffle outputs held in memory instead of files (0: none).
    pub shuffle_memory: usize,
}

impl ExecutorConfig {
    /// Defaults: loopback, free port, one slot per core, a work dir under the system temp dir.
    pub fn new(scheduler_url: impl Into<String>) -> Self {
        Self {
            scheduler_url: scheduler_url.into(),
            host: "127.0.0.1".to_string(),
            port: 0,
            slots: std::thread::available_parallelism().map_or(2, |n| n.get()),
            cores: std::thread::available_parallelism().map_or(2, |n| n.get()),
            work_dir: std::env::temp_dir().join("volley-executor"),
            heartbeat_interval: Duration::from_secs(2),
            max_message_size: 64 * 1024 * 1024,
            security: Security::none(),
            memory_limit: None,
            enable_test_hooks: false,
            allowed_paths: None,
            insecure: false,
            shuffle_memory: DEFAULT_SHUFFLE_MEMORY,
        }
    }
}
