//! `volley sql`: run statements on a remote or embedded cluster and print the results.

use std::io::Write;
use std::path::{Path, PathBuf};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::util::pretty::pretty_format_batches;
use futures::TryStreamExt;
use volley::{EmbeddedCluster, VolleyClient, split_statements};

/// Output formats.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Aligned table.
    Table,
    /// CSV with a header row.
    Csv,
}

/// Arguments of `volley sql`.
#[derive(clap::Args, Debug)]
pub struct SqlArgs {
    /// Scheduler URL; without it an embedded cluster is started.
    #[arg(long, env = "VOLLEY_SCHEDULER")]
    scheduler: Option<String>,
    /// Executors of the embedded cluster.
    #[arg(long, default_value_t = 2)]
    executors: usize,
    /// Task slots per embedded executor (default: number of cores).
    #[arg(long)]
    slots: Option<usize>,
    /// Register a table: NAME=PATH (a Parquet/CSV/JSON file or a folder of them).
    #[arg(long = "table", value_name = "NAME=PATH")]
    tables: Vec<String>,
    /// SQL to run (repeatable).
    #[arg(short = 'c', long = "command", value_name = "SQL")]
    commands: Vec<String>,
    /// File of SQL statements to run (repeatable).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    files: Vec<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
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
    match ext.as_deref() {
        Some("parquet") => Ok("PARQUET"),
        Some("csv") => Ok("CSV"),
        Some("json" | "ndjson") => Ok("JSON"),
        _ => Err(format!(
            "cannot tell the format of {}: use a .parquet, .csv or .json file or folder",
            path.display()
        )),
    }
}

/// The `CREATE EXTERNAL TABLE` statement for `--table NAME=PATH`.
pub fn table_statement(spec: &str) -> Result<String, String> {
    let (name, path) = spec
        .split_once('=')
        .ok_or_else(|| format!("--table expects NAME=PATH, got {spec:?}"))?;
    let path = Path::new(path);
    let absolute = path
        .canonicalize()
        .map_err(|e| format!("table {name}: {}: {e}", path.display()))?;
    let format = format_of(&absolute)?;
    let mut location = absolute.display().to_string();
    if absolute.is_dir() && !location.ends_with('/') {
        location.push('/');
    }
    let options = if format == "CSV" {
        " OPTIONS ('format.has_header' 'true')"
    } else {
        ""
    };
    Ok(format!(
        "CREATE EXTERNAL TABLE \"{name}\" STORED AS {format} LOCATION '{}'{options}",
        location.replace('\'', "''")
    ))
}

fn print(schema: &SchemaRef, batches: &[RecordBatch], format: Format) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Table => {
            if schema.fields().is_empty() {
                return Ok(());
            }
            let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
            let text = if batches.is_empty() {
                pretty_format_batches(&[RecordBatch::new_empty(std::sync::Arc::clone(schema))])
            } else {
                pretty_format_batches(batches)
            }
            .map_err(|e| e.to_string())?;
            writeln!(out, "{text}").map_err(|e| e.to_string())?;
            writeln!(out, "{rows} row(s)").map_err(|e| e.to_string())?;
        }
        Format::Csv => {
            if schema.fields().is_empty() {
                return Ok(());
            }
            let mut writer = datafusion::arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut out);
            if batches.is_empty() {
                writer
                    .write(&RecordBatch::new_empty(std::sync::Arc::clone(schema)))
                    .map_err(|e| e.to_string())?;
            }
            for batch in batches {
                writer.write(batch).map_err(|e| e.to_string())?;
            }
        }
    }
    out.flush().map_err(|e| e.to_string())
}

/// Run one statement; Ctrl-C cancels its job on the cluster.
async fn run_statement(
    client: &VolleyClient,
    statement: &str,
) -> Result<(SchemaRef, Vec<RecordBatch>), String> {
    let job_id = client.submit(statement).await.map_err(|e| e.to_string())?;
    let run = async {
        let (schema, stream) = client.fetch(job_id.clone()).await?;
        let batches: Vec<RecordBatch> = stream.try_collect().await?;
        Ok::<_, volley::VolleyError>((schema, batches))
    };
    tokio::select! {
        result = run => result.map_err(|e| e.to_string()),
        _ = tokio::signal::ctrl_c() => {
            let _ = client.cancel(&job_id).await;
            Err(format!("job {job_id} cancelled by Ctrl-C"))
        }
    }
}

/// Run `volley sql`.
pub async fn run(args: SqlArgs) -> Result<(), String> {
    let mut statements = Vec::new();
    for spec in &args.tables {
        statements.push(table_statement(spec)?);
    }
    for command in &args.commands {
        statements.extend(split_statements(command).map_err(|e| e.to_string())?);
    }
    for file in &args.files {
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        statements.extend(split_statements(&text).map_err(|e| format!("{}: {e}", file.display()))?);
    }

    let (cluster, client) = match &args.scheduler {
        Some(url) => (
            None,
            VolleyClient::connect(url)
                .await
                .map_err(|e| e.to_string())?,
        ),
        None => {
            let slots = args
                .slots
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
            let cluster = EmbeddedCluster::start(args.executors, slots)
                .await
                .map_err(|e| format!("cannot start embedded cluster: {e}"))?;
            let client = cluster.client().await.map_err(|e| e.to_string())?;
            (Some(cluster), client)
        }
    };

    let mut result = Ok(());
    for statement in &statements {
        match run_statement(&client, statement).await {
            Ok((schema, batches)) => {
                if let Err(e) = print(&schema, &batches, args.format) {
                    result = Err(e);
                    break;
                }
            }
            Err(e) => {
                result = Err(format!("{e}\n  in statement: {statement}"));
                break;
            }
        }
    }
    if let Some(cluster) = cluster {
        cluster.shutdown().await;
    }
    result
}
