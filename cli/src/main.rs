//! The `volley` binary: `sql`, `scheduler` and `executor` subcommands.

/// The allocator: DataFusion's operators and the plan codecs allocate much, and mimalloc (as
/// datafusion-cli and Ballista use) is faster at it than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Like `eprintln!`, but a closed stderr is not fatal: a server keeps serving when whoever
/// started it stops reading its log.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod output;
mod repl;
mod security;
mod sql;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use volley_executor::{ExecutorConfig, start_executor};
use volley_scheduler::{LoadBalancing, SchedulerConfig, start_scheduler};

/// Volley: a distributed SQL batch engine.
#[derive(Parser, Debug)]
#[command(name = "volley", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run SQL on a cluster (embedded unless --scheduler is given).
    Sql(sql::SqlArgs),
    /// Run a scheduler.
    Scheduler(SchedulerArgs),
    /// Run an executor.
    Executor(ExecutorArgs),
}

#[derive(clap::Args, Debug)]
struct SchedulerArgs {
    /// Address to bind.
    #[arg(long, env = "VOLLEY_SCHEDULER_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Port to bind.
    #[arg(long, env = "VOLLEY_SCHEDULER_PORT", default_value_t = 50050)]
    port: u16,
    /// Attempts per task before its job fails.
    #[arg(long, env = "VOLLEY_TASK_MAX_ATTEMPTS", default_value_t = 4)]
    task_max_attempts: u32,
    /// Attempts per stage (re-runs after lost shuffle output) before its job fails.
    #[arg(long, env = "VOLLEY_STAGE_MAX_ATTEMPTS", default_value_t = 4)]
    stage_max_attempts: u32,
    /// Seconds of silence after which an executor is declared lost.
    #[arg(long, env = "VOLLEY_EXECUTOR_TIMEOUT", default_value_t = 10)]
    executor_timeout_secs: u64,
    /// Shuffle partitions per exchange (default: total executor slots).
    #[arg(long, env = "VOLLEY_TARGET_PARTITIONS")]
    target_partitions: Option<usize>,
    /// Task placement: least-loaded executor first, or round-robin.
    #[arg(long, env = "VOLLEY_LOAD_BALANCING", value_enum, default_value_t = LoadBalancing::LeastLoaded)]
    load_balancing: LoadBalancing,
    /// Jobs running at once; later ones wait in a queue (0 = no limit).
    #[arg(long, env = "VOLLEY_MAX_CONCURRENT_JOBS", default_value_t = 0)]
    max_concurrent_jobs: usize,
    /// Listen beyond loopback without an auth token.
    #[arg(long)]
    insecure: bool,
    /// A running job in which no task finished for this many seconds fails, naming the tasks
    /// it waits for (0 = never).
    #[arg(long, env = "VOLLEY_STALL_TIMEOUT", default_value_t = 3600)]
    stall_timeout_secs: u64,
    /// Memory for what runs on the scheduler itself (DDL, CREATE TABLE AS, plans that cannot
    /// be sent to executors), e.g. 2G.
    #[arg(long, env = "VOLLEY_SCHEDULER_MEMORY", value_parser = parse_bytes, default_value = "2G")]
    memory_limit: usize,
    /// Port of the web status page, JSON API and /metrics (0 = any free port).
    #[arg(long, env = "VOLLEY_HTTP_PORT", default_value_t = 50080)]
    http_port: u16,
    /// Do not serve the status page.
    #[arg(long)]
    no_http: bool,
    /// Export tracing spans over OTLP/gRPC to this collector (e.g. http://127.0.0.1:4317).
    #[arg(long, env = "VOLLEY_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Honour the `volley.test_*` fault-injection hooks (Volley's own tests; never in
    /// production).
    #[arg(long, env = "VOLLEY_ENABLE_TEST_HOOKS")]
    enable_test_hooks: bool,
    /// Register a table every session sees: NAME=PATH (a Parquet/CSV/JSON file or folder, or
    /// an object-store URL such as s3://bucket/prefix/; repeatable).
    #[arg(long = "table", value_name = "NAME=PATH")]
    tables: Vec<String>,
    /// A file of `CREATE EXTERNAL TABLE` statements (separated by `;`) whose tables every
    /// session sees, like `--table`'s; their locations must be under `--allowed-path`.
    #[arg(long, env = "VOLLEY_CATALOG", value_name = "FILE")]
    catalog: Option<PathBuf>,
    /// Keep the scheduler's state (the history of finished jobs) in DIR/scheduler.redb, so
    /// it survives restarts (default: in memory).
    #[arg(long, env = "VOLLEY_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Start with an empty state: remove the --state-dir file first.
    #[arg(long, requires = "state_dir")]
    state_reset: bool,
    /// Keep the state in etcd, shared with standby schedulers:
    /// etcd://HOST:PORT[,HOST:PORT][/NAME]. The scheduler serves only while it leads; a
    /// standby waits, and takes over (resuming the running jobs) when the leader is gone.
    #[arg(
        long = "state",
        env = "VOLLEY_STATE",
        value_name = "URL",
        conflicts_with = "state_dir"
    )]
    state_url: Option<String>,
    /// With --state etcd://: the URL clients and executors reach this scheduler at, which
    /// standbys name while it leads (default http://HOST:PORT; set it when binding 0.0.0.0).
    #[arg(
        long,
        env = "VOLLEY_ADVERTISE_URL",
        value_name = "URL",
        requires = "state_url"
    )]
    advertise_url: Option<String>,
    /// Bytes of query answers the result cache keeps, e.g. 1G (0 = no result cache; each
    /// session sets its entries' lifetime with `SET volley.result_cache_ttl`).
    #[arg(long, env = "VOLLEY_RESULT_CACHE_BYTES", value_parser = parse_bytes, default_value = "1G")]
    result_cache_bytes: usize,
    /// Folder for the result cache's answers above 1 MiB (default: a temporary folder).
    #[arg(long, env = "VOLLEY_RESULT_CACHE_DIR", value_name = "DIR")]
    result_cache_dir: Option<PathBuf>,
    #[command(flatten)]
    sandbox: security::SandboxArgs,
    #[command(flatten)]
    security: security::SecurityArgs,
}

#[derive(clap::Args, Debug)]
struct ExecutorArgs {
    /// Scheduler URL, or a comma-separated list (a leader and its standbys: the executor
    /// registers with the one that serves, and follows a takeover).
    #[arg(
        long,
        env = "VOLLEY_SCHEDULER",
        default_value = "http://127.0.0.1:50050"
    )]
    scheduler: String,
    /// Address to bind and advertise.
    #[arg(long, env = "VOLLEY_EXECUTOR_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Port for gRPC and Flight (0 = any free port).
    #[arg(long, env = "VOLLEY_EXECUTOR_PORT", default_value_t = 50051)]
    port: u16,
    /// Concurrent tasks (default: number of cores).
    #[arg(long, env = "VOLLEY_EXECUTOR_SLOTS")]
    slots: Option<usize>,
    /// Cores the tasks share (default: number of cores). With more cores than slots, a task
    /// may run several partitions of a stage that builds a broadcast hash table, building it
    /// once (see `volley.group_broadcast_tasks`).
    #[arg(long, env = "VOLLEY_EXECUTOR_CORES")]
    cores: Option<usize>,
    /// Root for shuffle files: the executor works in a private `volley-<random>` folder (0700)
    /// below it and removes, at start, the folders executors killed on this root left behind.
    #[arg(long, env = "VOLLEY_WORK_DIR")]
    work_dir: Option<PathBuf>,
    /// Heartbeat interval in milliseconds.
    #[arg(long, env = "VOLLEY_HEARTBEAT_MS", default_value_t = 2000)]
    heartbeat_ms: u64,
    /// Export tracing spans over OTLP/gRPC to this collector (e.g. http://127.0.0.1:4317).
    #[arg(long, env = "VOLLEY_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Memory for all running tasks together, e.g. 4G or 512M; sorts, aggregations and joins
    /// spill to disk beyond it (default: no limit).
    #[arg(long, env = "VOLLEY_MEMORY_LIMIT", value_parser = parse_bytes)]
    memory_limit: Option<usize>,
    /// Memory for small shuffle outputs kept instead of files (a task's whole output up to
    /// `volley.shuffle_memory_task_bytes`), e.g. 256M; 0 writes every output to a file.
    #[arg(long, env = "VOLLEY_SHUFFLE_MEMORY", value_parser = parse_bytes, default_value = "256M")]
    shuffle_memory: usize,
    /// Folder or object-store URL prefix (`s3://bucket/prefix`) tasks may read and write table
    /// files under (repeatable; default: the working directory). Give executors the
    /// scheduler's --allowed-path roots.
    #[arg(
        long = "allowed-path",
        value_name = "DIR|URL",
        env = "VOLLEY_ALLOWED_PATHS",
        value_delimiter = ','
    )]
    allowed_paths: Vec<String>,
    /// Listen beyond loopback without a cluster token.
    #[arg(long)]
    insecure: bool,
    /// Honour the `volley.test_*` fault-injection hooks (Volley's own tests; never in
    /// production).
    #[arg(long, env = "VOLLEY_ENABLE_TEST_HOOKS")]
    enable_test_hooks: bool,
    #[command(flatten)]
    security: security::SecurityArgs,
}

/// `4G`, `512M`, `64K` or plain bytes.
pub(crate) fn parse_bytes(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => (&text[..i], text[i..].to_ascii_uppercase()),
        None => (text, String::new()),
    };
    let shift = match unit.trim_end_matches(['B', 'I']) {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        other => return Err(format!("unknown size unit {other:?} in {text:?}")),
    };
    let value: usize = digits
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 4G, 512M or 1048576"))?;
    value
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn run_scheduler(args: SchedulerArgs) -> Result<(), String> {
    let config = SchedulerConfig {
        host: args.host,
        port: args.port,
        task_max_attempts: args.task_max_attempts,
        stage_max_attempts: args.stage_max_attempts,
        executor_timeout: Duration::from_secs(args.executor_timeout_secs.max(1)),
        target_partitions: args.target_partitions,
        load_balancing: args.load_balancing,
        max_concurrent_jobs: args.max_concurrent_jobs,
        insecure: args.insecure,
        security: args.security.server_security()?,
        max_message_size: args.security.max_message_size,
        allowed_paths: Some(sql::sandbox_roots(
            &args.sandbox.allowed_paths,
            &args.tables,
        )?),
        tables: args
            .tables
            .iter()
            .map(|spec| sql::table_statement(spec))
            .chain(
                catalog_statements(args.catalog.as_deref())?
                    .into_iter()
                    .map(Ok),
            )
            .collect::<Result<_, _>>()?,
        allow_ddl: !args.sandbox.disable_ddl,
        http_port: (!args.no_http).then_some(args.http_port),
        enable_test_hooks: args.enable_test_hooks,
        memory_limit: args.memory_limit,
        state_dir: args.state_dir,
        state_reset: args.state_reset,
        state_url: args.state_url,
        advertise_url: args.advertise_url,
        result_cache_bytes: args.result_cache_bytes as u64,
        result_cache_dir: args.result_cache_dir,
        stall_timeout: (args.stall_timeout_secs > 0)
            .then(|| Duration::from_secs(args.stall_timeout_secs)),
        ..SchedulerConfig::default()
    };
    let _telemetry =
        volley_core::telemetry::init("volley-scheduler", args.otlp_endpoint.as_deref())
            .map_err(|e| e.to_string())?;
    let mut handle = start_scheduler(config).await.map_err(|e| e.to_string())?;
    note!("volley scheduler listening on {}", handle.url());
    if let Some(url) = handle.http_url() {
        note!("status page: {url}");
    }
    tokio::select! {
        _ = wait_for_signal() => {}
        _ = handle.leadership_lost() => {
            // Another scheduler may lead now: stop at once rather than risk two leaders.
            return Err("this scheduler lost its leadership in etcd (it could not renew its lease, or another scheduler took over); stopping: start it again to stand by".to_string());
        }
    }
    handle.shutdown().await;
    Ok(())
}

/// The statements of a `--catalog` file (none without one).
fn catalog_statements(file: Option<&std::path::Path>) -> Result<Vec<String>, String> {
    let Some(file) = file else {
        return Ok(Vec::new());
    };
    let text =
        std::fs::read_to_string(file).map_err(|e| format!("--catalog {}: {e}", file.display()))?;
    volley::split_statements(&text).map_err(|e| format!("--catalog {}: {e}", file.display()))
}

async fn run_executor(args: ExecutorArgs) -> Result<(), String> {
    let _telemetry = volley_core::telemetry::init("volley-executor", args.otlp_endpoint.as_deref())
        .map_err(|e| e.to_string())?;
    let mut config = ExecutorConfig::new(args.scheduler);
    config.host = args.host;
    config.port = args.port;
    if let Some(slots) = args.slots {
        config.slots = slots.max(1);
    }
    if let Some(cores) = args.cores {
        config.cores = cores.max(1);
    }
    if let Some(dir) = args.work_dir {
        config.work_dir = dir;
    } else {
        // Each executor works in a private, locked folder below (see --work-dir).
        config.work_dir = std::env::temp_dir().join("volley-executor");
    }
    config.heartbeat_interval = Duration::from_millis(args.heartbeat_ms.max(50));
    config.security = args.security.server_security()?;
    config.insecure = args.insecure;
    config.max_message_size = args.security.max_message_size;
    config.memory_limit = args.memory_limit;
    config.shuffle_memory = args.shuffle_memory;
    config.enable_test_hooks = args.enable_test_hooks;
    config.allowed_paths = Some(args.allowed_paths);
    let handle = start_executor(config).await.map_err(|e| e.to_string())?;
    note!(
        "volley executor {} listening on {}",
        handle.id(),
        handle.addr()
    );
    wait_for_signal().await;
    handle.shutdown().await;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Deep stacks: plans with deeply nested expressions are encoded, decoded and evaluated
    // recursively on these threads (statements are planned on a deeper one of their own).
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .thread_stack_size(volley_core::stack::WORKER_STACK_BYTES)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            note!("error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Sql(args) => sql::run(args).await,
            Command::Scheduler(args) => run_scheduler(args).await,
            Command::Executor(args) => run_executor(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            note!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
