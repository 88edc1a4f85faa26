//! `volley sql`: run statements on a remote or embedded cluster and print the results.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use datafusion::arrow::datatypes::SchemaRef;
use futures::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use volley::{ClientOptions, EmbeddedCluster, VolleyClient, split_statements_in};

/// DataFusion's SQL dialect of a new session.
const DEFAULT_DIALECT: &str = "generic";
use volley_core::sandbox::is_url_root;
use volley_scheduler::SchedulerConfig;

use crate::output::{Batches, Format, write_result};
use crate::repl::{HELP, Input, Repl};

/// Arguments of `volley sql`.
#[derive(clap::Args, Debug)]
pub struct SqlArgs {
    /// Scheduler URL, or a comma-separated list (a leader and its standbys: the one that
    /// serves is used); without it an embedded cluster is started.
    #[arg(long, env = "VOLLEY_SCHEDULER")]
    scheduler: Option<String>,
    /// Seconds each call to the scheduler may take before it is an error (a scheduler that
    /// stopped answering does not hang the shell; waiting for a long query is many short calls).
    #[arg(long, env = "VOLLEY_RPC_TIMEOUT_SECS", default_value_t = 120)]
    rpc_timeout_secs: u64,
    /// Executors of the embedded cluster.
    #[arg(long, default_value_t = 2)]
    executors: usize,
    /// Task slots per embedded executor (default: number of cores).
    #[arg(long)]
    slots: Option<usize>,
    /// Register a table: NAME=PATH (a Parquet/CSV/JSON file or a folder of them).
    #[arg(long = "table", value_name = "NAME=PATH")]
    tables: Vec<String>,
    /// SQL to run (repeatable; may hold several statements).
    #[arg(short = 'c', long = "command", value_name = "SQL")]
    commands: Vec<String>,
    /// File of SQL statements to run (repeatable).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    files: Vec<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Write results to FILE instead of stdout (Parquet needs this).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
    /// Print each statement's elapsed time to stderr.
    #[arg(long)]
    timing: bool,
    /// No row counts, no progress bar.
    #[arg(short = 'q', long)]
    quiet: bool,
    /// Keep going after a failed statement (the exit code is still 1).
    #[arg(long)]
    continue_on_error: bool,
    /// Memory per embedded executor, e.g. 4G; operators spill beyond it (default: no limit).
    #[arg(long, value_parser = crate::parse_bytes)]
    memory_limit: Option<usize>,
    /// Export tracing spans over OTLP/gRPC to this collector (embedded cluster).
    #[arg(long, env = "VOLLEY_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Honour the `volley.test_*` fault-injection hooks on the embedded cluster (Volley's own
    /// tests; never in production).
    #[arg(long, env = "VOLLEY_ENABLE_TEST_HOOKS")]
    enable_test_hooks: bool,
    #[command(flatten)]
    sandbox: crate::security::SandboxArgs,
    #[command(flatten)]
    security: crate::security::SecurityArgs,
}

fn format_of(path: &Path) -> Result<&'static str, String> {
    let ext_of = |p: &Path| {
        p.extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
    };
    let ext = if path.is_dir() {
        let entries =
            std::fs::read_dir(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| ext_of(&e.path()))
            .find(|e| matches!(e.as_str(), "parquet" | "csv" | "json" | "ndjson"))
    } else {
        ext_of(path)
    };
    format_of_extension(ext.as_deref()).ok_or_else(|| {
        format!(
            "cannot tell the format of {}: use a .parquet, .csv or .json file or folder",
            path.display()
        )
    })
}

/// The `STORED AS` format a file extension (lowercase) names.
fn format_of_extension(ext: Option<&str>) -> Option<&'static str> {
    match ext {
        Some("parquet") => Some("PARQUET"),
        Some("csv") => Some("CSV"),
        Some("json" | "ndjson") => Some("JSON"),
        _ => None,
    }
}

/// `CREATE EXTERNAL TABLE` of `name` at `location` (CSV files have a header row).
fn create_statement(name: &str, format: &str, location: &str) -> String {
    let options = if format == "CSV" {
        " OPTIONS ('format.has_header' 'true')"
    } else {
        ""
    };
    format!(
        "CREATE EXTERNAL TABLE \"{name}\" STORED AS {format} LOCATION '{}'{options}",
        location.replace('\'', "''")
    )
}

/// The `CREATE EXTERNAL TABLE` statement for `--table NAME=PATH`.
pub fn table_statement(spec: &str) -> Result<String, String> {
    let (name, path) = spec
        .split_once('=')
        .ok_or_else(|| format!("--table expects NAME=PATH, got {spec:?}"))?;
    if is_url_root(path) {
        return Ok(url_table_statement(name, path));
    }
    let path = Path::new(path);
    let absolute = path
        .canonicalize()
        .map_err(|e| format!("table {name}: {}: {e}", path.display()))?;
    let format = format_of(&absolute)?;
    let mut location = absolute.display().to_string();
    if absolute.is_dir() && !location.ends_with('/') {
        location.push('/');
    }
    Ok(create_statement(name, format, &location))
}

/// The statement for a table on an object store (`s3://bucket/prefix/`): the format comes
/// from the extension of its last segment; a folder is Parquet.
fn url_table_statement(name: &str, url: &str) -> String {
    let last = url
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default();
    let ext = last.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    let format = if url.ends_with('/') {
        None
    } else {
        format_of_extension(ext.as_deref())
    };
    create_statement(name, format.unwrap_or("PARQUET"), url)
}

/// Sandbox roots of a cluster started here: `--allowed-path` (or the working directory) and
/// the folders and URLs of the `--table` paths.
pub fn sandbox_roots(allowed: &[String], tables: &[String]) -> Result<Vec<String>, String> {
    let mut roots = allowed.to_vec();
    if roots.is_empty() {
        let cwd = std::env::current_dir().map_err(|e| format!("no working directory: {e}"))?;
        roots.push(cwd.display().to_string());
    }
    for spec in tables {
        if let Some((_, path)) = spec.split_once('=') {
            if is_url_root(path) {
                roots.push(path.to_string());
                continue;
            }
            let path = Path::new(path);
            let folder = if path.is_dir() {
                Some(path)
            } else {
                path.parent().filter(|p| !p.as_os_str().is_empty())
            };
            if let Some(folder) = folder
                && folder.exists()
            {
                roots.push(folder.display().to_string());
            }
        }
    }
    Ok(roots)
}

/// Where results go.
struct Sink {
    format: Format,
    quiet: bool,
    file: Option<PathBuf>,
    writer: Box<dyn Write>,
}

impl Sink {
    fn new(args: &SqlArgs) -> Result<Self, String> {
        let writer: Box<dyn Write> = match (&args.output, args.format) {
            (None, Format::Parquet) => return Err("--format parquet needs -o FILE".to_string()),
            (Some(_), Format::Parquet) => Box::new(std::io::sink()),
            (Some(path), _) => Box::new(
                std::fs::File::create(path)
                    .map_err(|e| format!("cannot create {}: {e}", path.display()))?,
            ),
            (None, _) => Box::new(std::io::stdout()),
        };
        Ok(Self {
            format: args.format,
            quiet: args.quiet,
            file: args.output.clone(),
            writer,
        })
    }

    async fn write(&mut self, schema: &SchemaRef, batches: Batches) -> Result<(), String> {
        write_result(
            &mut self.writer,
            self.file.as_deref(),
            schema,
            batches,
            self.format,
            self.quiet,
        )
        .await
    }
}

/// A live progress bar on stderr for statements running over a second (terminals only).
fn progress(
    client: &VolleyClient,
    job_id: &str,
    enabled: bool,
) -> Option<tokio::task::JoinHandle<()>> {
    if !enabled {
        return None;
    }
    let client = client.clone();
    let job_id = job_id.to_string();
    Some(tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} stages {msg} tasks {pos}/{len} [{bar:30}] {elapsed}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        loop {
            match client.status(&job_id).await {
                Ok(status) => {
                    bar.set_length(u64::from(status.tasks_total));
                    bar.set_position(u64::from(status.tasks_done));
                    bar.set_message(format!("{}/{}", status.stages_done, status.stages_total));
                }
                Err(_) => break,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bar.finish_and_clear();
    }))
}

/// Run one statement, writing its result to `sink` as it streams in; Ctrl-C cancels its job
/// on the cluster.
async fn run_statement(
    client: &VolleyClient,
    statement: &str,
    show_progress: bool,
    sink: &mut Sink,
) -> Result<(), String> {
    let job_id = client.submit(statement).await.map_err(|e| e.to_string())?;
    let bar = progress(client, &job_id, show_progress);
    let run = async {
        let (schema, stream) = client
            .fetch(job_id.clone())
            .await
            .map_err(|e| e.to_string())?;
        let batches: Batches = stream.map_err(|e| e.to_string()).boxed();
        sink.write(&schema, batches).await
    };
    let result = tokio::select! {
        result = run => result,
        _ = tokio::signal::ctrl_c() => {
            let _ = client.cancel(&job_id).await;
            Err(format!("job {job_id} cancelled by Ctrl-C"))
        }
    };
    if let Some(bar) = bar {
        bar.abort();
        let _ = bar.await;
    }
    result
}

struct Session<'a> {
    client: &'a VolleyClient,
    sink: Sink,
    timing: bool,
    progress: bool,
}

impl Session<'_> {
    async fn run(&mut self, statement: &str) -> Result<(), String> {
        let started = Instant::now();
        run_statement(self.client, statement, self.progress, &mut self.sink).await?;
        if self.timing {
            note!("Elapsed {:.3} s", started.elapsed().as_secs_f64());
        }
        Ok(())
    }
}

/// Append the statements of `text` (split in `dialect`, which they may switch); errors start
/// with `what`.
fn split_into(
    statements: &mut Vec<String>,
    dialect: &mut String,
    text: &str,
    what: &str,
) -> Result<(), String> {
    let (more, next) = split_statements_in(text, dialect).map_err(|e| format!("{what}{e}"))?;
    statements.extend(more);
    *dialect = next;
    Ok(())
}

/// Run `volley sql`.
pub async fn run(args: SqlArgs) -> Result<(), String> {
    let _telemetry = volley_core::telemetry::init("volley", args.otlp_endpoint.as_deref())
        .map_err(|e| e.to_string())?;
    let mut setup = Vec::new();
    for spec in &args.tables {
        setup.push(table_statement(spec)?);
    }
    // Statements are split in the session's dialect (`SET datafusion.sql_parser.dialect`
    // switches it for what follows), as the scheduler will parse them.
    let mut statements = Vec::new();
    let mut dialect = DEFAULT_DIALECT.to_string();
    for command in &args.commands {
        split_into(&mut statements, &mut dialect, command, "")?;
    }
    for file in &args.files {
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        split_into(
            &mut statements,
            &mut dialect,
            &text,
            &format!("{}: ", file.display()),
        )?;
    }
    let interactive = statements.is_empty() && std::io::stdin().is_terminal();
    if statements.is_empty() && !interactive {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("cannot read stdin: {e}"))?;
        split_into(&mut statements, &mut dialect, &text, "stdin: ")?;
    }

    let options = ClientOptions {
        security: args.security.security()?,
        max_message_size: args.security.max_message_size,
        rpc_timeout: Duration::from_secs(args.rpc_timeout_secs.max(1)),
    };
    let (cluster, client) = match &args.scheduler {
        Some(url) => (
            None,
            VolleyClient::connect_with(url, options)
                .await
                .map_err(|e| e.to_string())?,
        ),
        None => {
            let slots = args
                .slots
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
            let config = SchedulerConfig {
                security: options.security.clone(),
                max_message_size: options.max_message_size,
                allowed_paths: Some(sandbox_roots(&args.sandbox.allowed_paths, &args.tables)?),
                allow_ddl: !args.sandbox.disable_ddl,
                enable_test_hooks: args.enable_test_hooks,
                ..SchedulerConfig::default().with_address("127.0.0.1", 0)
            };
            let cluster = EmbeddedCluster::start_with_memory(
                config,
                args.executors,
                slots,
                args.memory_limit,
            )
            .await
            .map_err(|e| format!("cannot start embedded cluster: {e}"))?;
            if interactive && !args.quiet {
                note!(
                    "embedded cluster: scheduler {} with {} executors",
                    cluster.url(),
                    args.executors
                );
            }
            if !args.quiet
                && let Some(url) = cluster.scheduler().http_url()
            {
                note!("status page: {url}");
            }
            let client = cluster.client().await.map_err(|e| e.to_string())?;
            (Some(cluster), client)
        }
    };

    let mut session = Session {
        client: &client,
        sink: Sink::new(&args)?,
        timing: args.timing,
        progress: !args.quiet && std::io::stderr().is_terminal(),
    };
    let mut result = Ok(());
    for statement in &setup {
        if let Err(e) = session.run(statement).await {
            result = Err(e);
        }
    }
    if result.is_ok() {
        result = if interactive {
            repl(&mut session).await
        } else {
            batch(&mut session, &statements, args.continue_on_error).await
        };
    }
    if let Some(cluster) = cluster {
        cluster.shutdown().await;
    }
    result
}

async fn batch(
    session: &mut Session<'_>,
    statements: &[String],
    keep_going: bool,
) -> Result<(), String> {
    let mut failed = None;
    for statement in statements {
        if let Err(e) = session.run(statement).await {
            let message = format!("{e}\n  in statement: {statement}");
            if !keep_going {
                return Err(message);
            }
            note!("error: {message}");
            failed = Some(format!(
                "{} statement(s) failed",
                1 + failed.map_or(0, |_: String| 1)
            ));
        }
    }
    failed.map_or(Ok(()), Err)
}

async fn repl(session: &mut Session<'_>) -> Result<(), String> {
    let mut editor = Repl::new()?;
    let mut dialect = DEFAULT_DIALECT.to_string();
    while let Some(input) = editor.next() {
        match input {
            Input::Quit => break,
            Input::Help => println!("{HELP}"),
            Input::Sql(sql) => match split_statements_in(&sql, &dialect) {
                Ok((statements, next)) => {
                    dialect = next;
                    for statement in statements {
                        if let Err(e) = session.run(&statement).await {
                            note!("error: {e}");
                            break;
                        }
                    }
                }
                Err(e) => note!("error: {e}"),
            },
        }
    }
    Ok(())
}
