//! Task throughput: a scan of many tiny Parquet files, one task per file, on the embedded
//! cluster and on single-node DataFusion (one partition per file) in the same run; prints
//! tasks/s, the slot time each task costs and how much of it the task itself reported.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//!
//! `cargo bench -p volley-tests --bench tasks -- [--files 1000] [--executors 2] [--slots 2]
//!  [--iterations 3]`

/// The allocator of the `volley` binary (the single-node DataFusion baseline, in this same
/// process, uses it too).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use datafusion::prelude::{SessionConfig, SessionContext};
use parquet::arrow::ArrowWriter;
use volley::EmbeddedCluster;
use volley_scheduler::SchedulerConfig;
use volley_scheduler::job::TaskState;
use volley_tests::compare::rows;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const QUERY: &str = "SELECT count(*), sum(a) FROM t";

/// `files` Parquet files of 10 rows each under `target/tiny-files/<files>` (written once).
fn tiny_files(files: usize) -> Result<PathBuf, BoxError> {
    let dir = volley_tests::workspace_root()
        .join("target/tiny-files")
        .join(files.to_string());
    if dir.join("_SUCCESS").exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir)?;
    let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, false)]));
    for file in 0..files {
        let values: Vec<i64> = (0..10).map(|i| (file * 10 + i) as i64).collect();
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(Int64Array::from(values))],
        )?;
        let out = std::fs::File::create(dir.join(format!("part-{file:05}.parquet")))?;
        let mut writer = ArrowWriter::try_new(out, Arc::clone(&schema), None)?;
        writer.write(&batch)?;
        writer.close()?;
    }
    std::fs::write(dir.join("_SUCCESS"), b"")?;
    Ok(dir)
}

fn table_sql(dir: &Path) -> String {
    format!(
        "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '{}/'",
        dir.display()
    )
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), BoxError> {
    volley_tests::init_tracing();
    let (mut files, mut executors, mut slots, mut iterations) = (1000, 2, 2, 3);
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        let mut value = || -> Result<usize, BoxError> {
            Ok(argv
                .next()
                .ok_or(format!("{flag} needs a value"))?
                .parse()?)
        };
        match flag.as_str() {
            "--files" => files = value()?,
            "--executors" => executors = value()?,
            "--slots" => slots = value()?,
            "--iterations" => iterations = value()?.max(1),
            "--bench" => {}
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let dir = tiny_files(files)?;

    let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(files));
    ctx.sql(&table_sql(&dir)).await?;
    let cluster = EmbeddedCluster::start_with_memory(
        SchedulerConfig {
            // Every iteration runs the query (a stored answer would run no task).
            result_cache_bytes: 0,
            ..SchedulerConfig::default()
                .with_address("127.0.0.1", 0)
                .with_target_partitions(files)
        },
        executors,
        slots,
        None,
    )
    .await?;
    let client = cluster.client().await?;
    client.sql(&table_sql(&dir)).await?;

    let (mut best_df, mut best_volley, mut last_job) = (f64::MAX, f64::MAX, String::new());
    for _ in 0..iterations {
        let t = Instant::now();
        let local = ctx.sql(QUERY).await?.collect().await?;
        best_df = best_df.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let job_id = client.submit(QUERY).await?;
        let remote = client.sql_job_rows(&job_id).await?;
        best_volley = best_volley.min(t.elapsed().as_secs_f64());
        assert_eq!(rows(&remote)?, rows(&local)?, "same answer");
        last_job = job_id;
    }
    // The scan stage of the last run: its tasks, how long it ran, what each task reported.
    let (tasks, stage_s, reported_s) = cluster.scheduler().service().with_state(|state| {
        let job = state.job(&last_job).expect("the job's record");
        let scan = job
            .stages
            .values()
            .max_by_key(|s| s.tasks.len())
            .expect("a stage");
        let span = match (scan.started(), scan.finished()) {
            (Some(start), Some(end)) => end.saturating_duration_since(start).as_secs_f64(),
            _ => f64::NAN,
        };
        let reported: f64 = scan
            .tasks
            .iter()
            .filter_map(|t| match &t.state {
                TaskState::Succeeded { elapsed, .. } => Some(elapsed.as_secs_f64()),
                _ => None,
            })
            .sum();
        (scan.tasks.len(), span, reported)
    });
    let slot_count = (executors * slots) as f64;
    let per_task_ms = stage_s * slot_count / tasks as f64 * 1000.0;
    let reported_ms = reported_s / tasks as f64 * 1000.0;
    println!(
        "{files} files | DataFusion: {files} partitions | Volley: {executors} executors x {slots} slots"
    );
    println!(
        "query: DataFusion {best_df:.3} s, Volley {best_volley:.3} s, ratio {:.2}",
        best_volley / best_df
    );
    println!(
        "scan stage: {tasks} tasks in {stage_s:.3} s = {:.0} tasks/s; {per_task_ms:.2} ms of slot \
         time per task, of which the task reported {reported_ms:.2} ms (run) and {:.2} ms went \
         to launch, status report and scheduling",
        tasks as f64 / stage_s,
        per_task_ms - reported_ms
    );
    cluster.shutdown().await;
    Ok(())
}
