//! Session defaults shared by the scheduler (planning) and the executors (execution), and the
//! per-task environment executors hand to Volley's execution plans.

use std::path::PathBuf;

use datafusion::common::extensions_options;
use datafusion::config::ConfigExtension;
use datafusion::prelude::SessionConfig;

extensions_options! {
    /// Per-query Volley options, set with `SET volley.<key> = <value>`; they travel with each
    /// task to the executors.
    pub struct VolleyOptions {
        /// Test hook: `STAGE:PARTITION` makes every attempt of that task fail with a
        /// retryable injected fault, `STAGE:PARTITION:K` only its first K attempts
        /// (deterministic fault injection for tests).
        pub test_fail_task: String, default = String::new()
        /// Test hook: `STAGE:PATH` holds every task of that stage before it runs until the
        /// file PATH exists, so a test observes (or kills, or cancels) the stage while it is
        /// surely running and releases it by creating the file. Works only on processes started
        /// with `--enable-test-hooks`.
        pub test_hold_task: String, default = String::new()
        /// Test hook: `STAGE:PARTITION` makes that task panic (as a bug in an operator would)
        /// to show a panic is reported as a task failure, not a lost executor.
        pub test_panic_task: String, default = String::new()
        /// Test hook: `STAGE:PARTITION` makes that task abort its executor process (as a
        /// runaway allocation would), to show such a task fails its job instead of killing
        /// every executor in turn.
        pub test_abort_task: String, default = String::new()
        /// Test hook: `STAGE:MS` keeps the worker thread of every task of that stage busy (a
        /// CPU-bound loop that never yields, as a heavy operator does) for MS milliseconds
        /// before the task runs: with as many such tasks as worker threads, nothing else on the
        /// executor's task runtime moves.
        pub test_busy_task: String, default = String::new()
        /// Test hook: `PARTITION:K` makes the writing task of that partition of a table write
        /// (`COPY`, `INSERT INTO`) fail after its files are written, in its first K attempts.
        pub test_fail_write: String, default = String::new()
        /// Compression of shuffle files: `auto` (default: none when every executor runs on
        /// this host's loopback, where no byte crosses a network, lz4 otherwise), `lz4`,
        /// `zstd` or `none`.
        pub shuffle_compression: String, default = "auto".to_string()
        /// Adaptive execution: re-plan stages from the real sizes of finished stages
        /// (coalesce small shuffle partitions, switch joins to broadcast, split skewed
        /// partitions).
        pub adaptive: bool, default = true
        /// Adaptive execution: target bytes read per task when coalescing small shuffle
        /// partitions and when splitting skewed ones.
        pub adaptive_partition_bytes: u64, default = 64 * 1024 * 1024
        /// Adaptive execution: a stage about to run as one task, whose only consumer would
        /// then be ready and can run as one task too, runs inside that consumer's task (no
        /// output of its own, one task launch and stage transition less) when their inputs
        /// hold at most this many bytes of shuffle output in all; 0 turns fusion off.
        pub adaptive_fuse_bytes: u64, default = 1024 * 1024
        /// Adaptive execution: a partitioned hash join whose build side turns out to be at most
        /// this many bytes of shuffle output is switched to a broadcast join and its probe side
        /// is no longer shuffled (for left outer/semi/anti joins, which cannot be broadcast, the
        /// probe stage instead drops rows whose keys are not on the build side); 0 turns both
        /// off.
        pub adaptive_broadcast_bytes: u64, default = 128 * 1024 * 1024
        /// Adaptive execution: a stage waiting for the keys of a semi-join reduction (see
        /// `adaptive_broadcast_bytes`) starts unfiltered instead when task slots would
        /// otherwise sit idle while the keys stage runs (a one-task keys stage leaves the
        /// other slots free: waiting would run two scans one after the other), if it
        /// aggregates rows its own filters or joins cut down before its shuffle and the keys
        /// stage scans at least as many file bytes.
        pub adaptive_idle_start: bool, default = true
        /// Adaptive execution: a join partition whose probe side is this many times the median
        /// partition and at least `adaptive_skew_min_bytes` is split into several tasks.
        pub adaptive_skew_factor: u64, default = 4
        /// Adaptive execution: smallest probe-side partition (bytes) ever split as skewed.
        pub adaptive_skew_min_bytes: u64, default = 64 * 1024 * 1024
        /// A scan stage shuffled into inner joins whose build sides are selective (filtered
        /// dimensions, broadcast or scanned in the stage) first keeps only the rows whose keys
        /// are on those build sides, as DataFusion's dynamic join filters do on one node (they
        /// cannot cross a shuffle).
        pub key_filters: bool, default = true
        /// A scan on the probe side of a join whose build side is in the same task skips the
        /// row groups and pages holding no key in the build side's range (the executor's
        /// per-task form of DataFusion's dynamic join filters).
        pub runtime_filters: bool, default = true
        /// A `CollectLeft` join's build side that only scans files runs in each join task
        /// instead of as a broadcast stage when its files' bytes times the join's task count
        /// are at most this (0: always a broadcast stage).
        pub inline_build_bytes: u64, default = 16 * 1024 * 1024
        /// A stage that builds a broadcast hash table (a `CollectLeft` join) and reads no
        /// stage partition by partition runs all its partitions in one task, building the
        /// table once, when they are no more than the cores each task slot of the cluster's
        /// executors has (`volley executor --cores` over `--slots`).
        pub group_broadcast_tasks: bool, default = true
        /// A stage identical to another of the same job (a common table expression or a
        /// subquery planned once per reference) is not run again: its readers read the other
        /// one's output. Stages with a volatile function (`random()`) are never shared.
        pub reuse_stages: bool, default = true
        /// A map task whose whole output (Arrow IPC bytes, all buckets) is at most this is
        /// kept in its executor's memory (up to the executor's `--shuffle-memory`) instead of
        /// files (0: always files).
        pub shuffle_memory_task_bytes: u64, default = 4 * 1024 * 1024
        /// A result of at most this many bytes (Arrow IPC) written by a one-task result stage
        /// comes back inside its task's status report and the job status answer: the client
        /// reads it from the scheduler, without a connection to an executor (at most 1 MiB
        /// whatever is set; 0: results are always read from the executors).
        pub inline_result_bytes: u64, default = 256 * 1024
        /// How long the scheduler serves a stored result of the same query (same plan, same
        /// input files unchanged, same token) instead of running it again: `0` turns the
        /// result cache off for this session (`30s`, `5m`, `1h`).
        pub result_cache_ttl: crate::duration::SettingDuration, default = crate::duration::SettingDuration::minutes(5)
        /// Largest result (Arrow IPC bytes) the result cache stores.
        pub result_cache_max_entry_bytes: u64, default = 16 * 1024 * 1024
    }
}

impl ConfigExtension for VolleyOptions {
    const PREFIX: &'static str = "volley";
}

impl VolleyOptions {
    /// The Volley options among shipped session settings (see [`config_to_pairs`]); unknown or
    /// malformed entries keep their defaults.
    pub fn from_pairs(pairs: &[(String, String)]) -> Self {
        use datafusion::config::ExtensionOptions;
        let mut options = Self::default();
        for (key, value) in pairs {
            if let Some(key) = key.strip_prefix("volley.") {
                let _ = options.set(key, value);
            }
        }
        options
    }

    /// True when the fault hook targets this task attempt: `STAGE:PARTITION` fails every
    /// attempt, `STAGE:PARTITION:K` the first K attempts.
    pub fn fails(&self, stage_id: u32, partition: u32, attempt: u32) -> bool {
        let mut parts = self
            .test_fail_task
            .split(':')
            .map(|p| p.trim().parse::<u32>());
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(Ok(s)), Some(Ok(p)), None, None) => s == stage_id && p == partition,
            (Some(Ok(s)), Some(Ok(p)), Some(Ok(k)), None) => {
                s == stage_id && p == partition && attempt < k
            }
            _ => false,
        }
    }

    /// True when the write-fault hook targets this writing attempt of `partition`.
    pub fn fails_after_write(&self, partition: u32, attempt: u32) -> bool {
        let mut parts = self
            .test_fail_write
            .split(':')
            .map(|p| p.trim().parse::<u32>());
        match (parts.next(), parts.next(), parts.next()) {
            (Some(Ok(p)), Some(Ok(k)), None) => p == partition && attempt < k,
            _ => false,
        }
    }

    /// True when the panic hook targets this task.
    pub fn panics(&self, stage_id: u32, partition: u32) -> bool {
        Self::targets(&self.test_panic_task, stage_id, partition)
    }

    /// True when the abort hook targets this task.
    pub fn aborts(&self, stage_id: u32, partition: u32) -> bool {
        Self::targets(&self.test_abort_task, stage_id, partition)
    }

    fn targets(spec: &str, stage_id: u32, partition: u32) -> bool {
        spec.split_once(':')
            .and_then(|(s, p)| Some((s.trim().parse::<u32>().ok()?, p.trim().parse::<u32>().ok()?)))
            == Some((stage_id, partition))
    }

    /// True when a task test hook (`fail`, `panic`, `abort`, `hold`, `busy`) names this stage:
    /// adaptive execution keeps it a stage of its own, so the hook still fires.
    pub fn hooks_stage(&self, stage_id: u32) -> bool {
        [
            &self.test_fail_task,
            &self.test_panic_task,
            &self.test_abort_task,
            &self.test_hold_task,
            &self.test_busy_task,
        ]
        .iter()
        .any(|spec| {
            spec.split(':')
                .next()
                .and_then(|s| s.trim().parse::<u32>().ok())
                == Some(stage_id)
        })
    }

    /// The release file the hold hook waits for before tasks of this stage run.
    pub fn hold(&self, stage_id: u32) -> Option<PathBuf> {
        let (stage, path) = self.test_hold_task.split_once(':')?;
        (stage.trim().parse::<u32>().ok()? == stage_id && !path.trim().is_empty())
            .then(|| PathBuf::from(path.trim()))
    }

    /// How long the busy hook keeps the worker threads of this stage's tasks busy.
    pub fn busy(&self, stage_id: u32) -> Option<std::time::Duration> {
        let (stage, ms) = self.test_busy_task.split_once(':')?;
        (stage.trim().parse::<u32>().ok()? == stage_id)
            .then(|| ms.trim().parse::<u64>().ok())
            .flatten()
            .map(std::time::Duration::from_millis)
    }

    /// The test hooks this session sets (non-empty `volley.test_*` options), by name.
    pub fn test_hooks_set(&self) -> Vec<&'static str> {
        let mut set = Vec::new();
        if !self.test_fail_task.is_empty() {
            set.push("volley.test_fail_task");
        }
        if !self.test_hold_task.is_empty() {
            set.push("volley.test_hold_task");
        }
        if !self.test_panic_task.is_empty() {
            set.push("volley.test_panic_task");
        }
        if !self.test_abort_task.is_empty() {
            set.push("volley.test_abort_task");
        }
        if !self.test_busy_task.is_empty() {
            set.push("volley.test_busy_task");
        }
        if !self.test_fail_write.is_empty() {
            set.push("volley.test_fail_write");
        }
        set
    }
}

impl VolleyOptions {
    /// The IPC compression for shuffle files.
    pub fn compression(&self) -> crate::Result<Option<datafusion::arrow::ipc::CompressionType>> {
        use datafusion::arrow::ipc::CompressionType;
        match self.shuffle_compression.to_ascii_lowercase().as_str() {
            "lz4" | "auto" | "" => Ok(Some(CompressionType::LZ4_FRAME)),
            "zstd" => Ok(Some(CompressionType::ZSTD)),
            "none" => Ok(None),
            other => Err(crate::VolleyError::InvalidMessage(format!(
                "volley.shuffle_compression must be auto, lz4, zstd or none, not {other:?}"
            ))),
        }
    }
}

/// A configuration that knows Volley's options, for executors applying shipped settings.
pub fn base_session_config() -> SessionConfig {
    SessionConfig::new().with_option_extension(VolleyOptions::default())
}

/// Executor-side facts a task needs, stored as a [`SessionConfig`] extension.
#[derive(Debug, Clone)]
pub struct TaskEnv {
    /// Id of the executor running the task: shuffle reads of its own files skip the network.
    pub executor_id: String,
    /// Host the executor advertises: files of other executors advertising the same host are
    /// read from disk when they are there (host-local reads).
    pub host: String,
    /// Root of the executor's shuffle files.
    pub work_dir: PathBuf,
    /// Attempt number of the running task; part of shuffle file names so retries never clash.
    pub attempt: u32,
    /// Token and TLS for shuffle fetches from other executors.
    pub security: crate::security::Security,
    /// The executor honours `volley.test_*` hooks (`--enable-test-hooks`).
    pub test_hooks: bool,
    /// The executor's in-memory shuffle outputs (None: every output is a file).
    pub memory: Option<std::sync::Arc<crate::shuffle::MemoryShuffle>>,
}

/// The session configuration Volley plans and executes with.
///
/// Round-robin repartitioning is off because each task already is one partition of the stage;
/// file-scan work stealing is off because a task runs one partition alone and would otherwise
/// read its siblings' files too; dynamic filters are off because the producer and consumer of a
/// filter may run in different processes. Uncorrelated scalar subqueries are planned as joins
/// (DataFusion's distributed escape hatch) because `ScalarSubqueryExec` must sit in the same
/// task as the expressions reading its results, which a stage cut can separate.
pub fn volley_session_config(target_partitions: usize) -> SessionConfig {
    let mut config = base_session_config()
        .with_target_partitions(target_partitions.max(1))
        .with_information_schema(true)
        .with_round_robin_repartition(false);
    let options = config.options_mut();
    options.execution.enable_file_stream_work_stealing = false;
    options
        .optimizer
        .enable_physical_uncorrelated_scalar_subquery = false;
    options.optimizer.enable_dynamic_filter_pushdown = false;
    options.optimizer.enable_join_dynamic_filter_pushdown = false;
    options.optimizer.enable_topk_dynamic_filter_pushdown = false;
    options.optimizer.enable_aggregate_dynamic_filter_pushdown = false;
    // A partial aggregate that stops aggregating ships every row through a shuffle (IPC write
    // and read back), which costs far more than DataFusion's in-memory repartition, so it
    // gives up only when the first 500K rows were (almost) all distinct: at TPC-H SF10, q17's
    // `GROUP BY l_partkey` (2M keys) saw 97% distinct keys in 100K rows, gave up, and shuffled
    // 60M rows instead of 4M (10.6 s -> 5.3 s).
    options
        .execution
        .skip_partial_aggregation_probe_ratio_threshold = 0.99;
    options
        .execution
        .skip_partial_aggregation_probe_rows_threshold = 500_000;
    // Broadcasting a build side of up to ~1M rows / 32 MiB to every task is far cheaper than
    // hash-shuffling both sides of the join (the probe side is usually a large fact table).
    options.optimizer.hash_join_single_partition_threshold = BROADCAST_MAX_BYTES;
    options.optimizer.hash_join_single_partition_threshold_rows = BROADCAST_MAX_ROWS;
    // Table writes are already parallel across tasks: each task writes one file (more only
    // past `soft_max_rows_per_output_file`), not DataFusion's default of 4 per writer.
    if let Ok(one) = datafusion::config::ConfigNonZeroUsize::try_new(1) {
        options.execution.minimum_parallel_output_files = one;
    }
    config
}

/// Largest estimated build side (bytes) planned as a broadcast join.
pub const BROADCAST_MAX_BYTES: usize = 32 * 1024 * 1024;
/// Largest estimated build side (rows) planned as a broadcast join.
pub const BROADCAST_MAX_ROWS: usize = 1_000_000;

/// The settings of `config` as key/value pairs, to ship with each task.
pub fn config_to_pairs(config: &SessionConfig) -> Vec<(String, String)> {
    let options = config.options();
    // Extension entries come without their prefix; DataFusion's own keys carry theirs.
    let mut pairs: Vec<(String, String)> = options
        .entries()
        .into_iter()
        .filter(|entry| entry.key.starts_with("datafusion."))
        .filter_map(|entry| entry.value.map(|v| (entry.key, v)))
        .collect();
    if let Some(volley) = options.extensions.get::<VolleyOptions>() {
        use datafusion::config::ExtensionOptions;
        pairs.extend(volley.entries().into_iter().filter_map(|entry| {
            entry
                .value
                .map(|v| (format!("{}.{}", VolleyOptions::PREFIX, entry.key), v))
        }));
    }
    pairs
}

/// An inline answer (Arrow IPC bytes) up to this size stays with its job once released, so a
/// client whose status answer was lost can ask again; a larger one is dropped on release, and
/// a client reading it releases the job itself once it has the rows.
pub const KEPT_RELEASED_ANSWER_BYTES: usize = 64 * 1024;

/// The largest result a task returns inside its status report, whatever its session set
/// (clients with gRPC's default 4 MiB limit read the job status answer that carries it).
pub const MAX_INLINE_RESULT_BYTES: u64 = 1024 * 1024;

/// True when a status answer carrying an inline answer of `bytes` also releases its job (asked
/// with `release_inline`): the job keeps such an answer once released. The scheduler and the
/// client decide by this one rule.
pub fn released_with_answer(bytes: usize) -> bool {
    bytes > 0 && bytes <= KEPT_RELEASED_ANSWER_BYTES
}
