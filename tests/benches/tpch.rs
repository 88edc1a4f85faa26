//! TPC-H / TPC-DS benchmark: the queries on single-node DataFusion and on Volley's embedded cluster in

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! the same run; prints per-query seconds, totals and the Volley/DataFusion ratio.
//!
//! `cargo bench -p volley-tests --bench tpch -- [--suite tpch|tpcds] [--sf 1] [--executors 2] [--slots 1]
//!  [--query N] [--iterations 1] [--data DIR] [--compression lz4|zstd|none] [--json FILE]
//!  [--baseline default|volley] [--memory-limit BYTES-per-executor] [--state-dir DIR]
//!  [--compare-state-dir DIR] [--result-cache]`
//!
//! Volley's result cache is off (every iteration runs the query). `--result-cache` runs every
//! query also on a second cluster whose cache is on: each iteration there runs it once with the
//! session's cache off (`SET volley.result_cache_ttl = '0'`) and once as a miss (each sets
//! another `datafusion.sql_parser.recursion_limit`, which is part of the cache key), so the
//! miss cost — looking up, fingerprinting and storing answers — is measured on one cluster,
//! interleaved (`miss_s`/`miss/off` also compares with the first cluster); then a
//! second pass of all queries is answered from the cache, and its total is printed as a share
//! of the first pass.
//!
//! `--state-dir DIR` runs Volley's scheduler with its durable state in DIR (started empty).
//! `--compare-state-dir DIR` runs every query also on a second embedded cluster whose scheduler
//! keeps its state in DIR (history, sessions, job journals), interleaved in the same run, and
//! prints `state/memory` per query and what `--state-dir` costs per query and in total.
//!
//! `--data s3://BUCKET/PREFIX` also runs every query on Volley with the tables in S3: the bench
//! starts the tests' S3 server (moto, see `volley_tests::s3`), uploads the generated data there
//! and prints `volley_s3_s` and `s3/local` (what the object-store path costs) beside the local
//! columns.
//!
//! The DataFusion baseline runs with DataFusion's default settings and one partition per core
//! (`--baseline volley` gives it Volley's session settings instead). `--json FILE` writes one
//! object per query (seconds, ratio, rows, shuffle and spill bytes; `volley_second_s`: the
//! second cluster of `--compare-state-dir` or `--result-cache`) and the totals.

/// The allocator of the `volley` binary (the single-node DataFusion baseline, in this same
/// process, uses it too).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::time::Instant;

use datafusion::prelude::{SessionConfig, SessionContext};
use volley::EmbeddedCluster;
use volley_core::config::volley_session_config;
use volley_scheduler::SchedulerConfig;
use volley_tests::compare::{assert_same_rows, float_columns, rows};
use volley_tests::suite::Suite;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Args {
    suite: Suite,
    sf: f64,
    executors: usize,
    slots: usize,
    queries: Vec<usize>,
    iterations: usize,
    data: Option<PathBuf>,
    /// `--data s3://bucket/prefix`: the S3 location to run on as well.
    s3: Option<(String, String)>,
    compression: Option<String>,
    json: Option<PathBuf>,
    volley_baseline: bool,
    memory_limit: Option<usize>,
    stages: bool,
    /// With `--stages`, each stage's operators with their metrics.
    metrics: bool,
    /// DataFusion settings for the single-node baseline (`--baseline-set key=value`).
    baseline_settings: Vec<(String, String)>,
    /// Settings for Volley's session (`--set key=value`, sent as `SET` statements).
    volley_settings: Vec<(String, String)>,
    /// The scheduler's `--state-dir`.
    state_dir: Option<PathBuf>,
    /// `--compare-state-dir DIR`: also run every query on a second cluster whose scheduler keeps
    /// its state (history, sessions, job journals) in DIR, in the same run.
    compare_state_dir: Option<PathBuf>,
    /// `--result-cache`: also run on a cluster with the result cache on (misses, then hits).
    result_cache: bool,
}

fn key_value(pair: &str) -> Result<(String, String), BoxError> {
    let (key, value) = pair
        .split_once('=')
        .ok_or_else(|| format!("{pair:?} is not key=value"))?;
    Ok((key.trim().to_string(), value.trim().to_string()))
}

fn parse_args() -> Result<Args, BoxError> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut args = Args {
        suite: Suite::Tpch,
        sf: 1.0,
        executors: 2,
        slots: (cores / 2).max(1),
        queries: (1..=22).collect(),
        iterations: 1,
        data: None,
        s3: None,
        compression: None,
        json: None,
        volley_baseline: false,
        state_dir: None,
        compare_state_dir: None,
        result_cache: false,
        memory_limit: None,
        stages: false,
        metrics: false,
        baseline_settings: Vec::new(),
        volley_settings: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--sf" => args.sf = value()?.parse()?,
            "--suite" => {
                args.suite = Suite::parse(&value()?)?;
                args.queries = args.suite.queries();
            }
            "--executors" => args.executors = value()?.parse()?,
            "--slots" => args.slots = value()?.parse()?,
            "--query" => {
                args.queries = value()?
                    .split(',')
                    .map(|q| q.trim().parse())
                    .collect::<Result<_, _>>()?
            }
            "--iterations" => args.iterations = value()?.parse::<usize>()?.max(1),
            "--data" => {
                let data = value()?;
                match data.strip_prefix("s3://") {
                    Some(rest) => {
                        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, "tpch"));
                        let prefix = prefix.trim_matches('/').to_string();
                        args.s3 = Some((bucket.to_string(), prefix));
                    }
                    None => args.data = Some(volley_tests::workspace_root().join(data)),
                }
            }
            "--compression" => args.compression = Some(value()?),
            // Relative paths are the workspace's (cargo runs benches in the crate's folder).
            "--json" => args.json = Some(volley_tests::workspace_root().join(value()?)),
            "--memory-limit" => args.memory_limit = Some(value()?.parse()?),
            "--baseline" => args.volley_baseline = value()? == "volley",
            "--stages" => args.stages = true,
            "--metrics" => args.metrics = true,
            "--baseline-set" => args.baseline_settings.push(key_value(&value()?)?),
            "--set" => args.volley_settings.push(key_value(&value()?)?),
            "--state-dir" => args.state_dir = Some(PathBuf::from(value()?)),
            "--compare-state-dir" => args.compare_state_dir = Some(PathBuf::from(value()?)),
            "--result-cache" => args.result_cache = true,
            "--bench" => {}
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(args)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), BoxError> {
    volley_tests::init_tracing();
    let args = parse_args()?;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let suite = args.suite;
    let dir = match &args.data {
        Some(d) => d.clone(),
        None => suite.data_dir(args.sf),
    };
    let started = Instant::now();
    suite.generate(&dir, args.sf)?;
    eprintln!(
        "data ready in {:.1}s at {}",
        started.elapsed().as_secs_f64(),
        dir.display()
    );

    let config = if args.volley_baseline {
        volley_session_config(cores)
    } else {
        SessionConfig::new().with_target_partitions(cores)
    };
    let mut config = config;
    for (key, value) in &args.baseline_settings {
        config.options_mut().set(key, value)?;
    }
    let ctx = SessionContext::new_with_config(config);
    suite.register_local(&ctx, &dir).await?;

    let boot = Instant::now();
    let (cluster, client) =
        start_cluster(&args, suite, &dir, args.state_dir.clone(), false).await?;
    let boot = boot.elapsed();
    let durable = match &args.compare_state_dir {
        Some(state_dir) => {
            Some(start_cluster(&args, suite, &dir, Some(state_dir.clone()), false).await?)
        }
        None => match args.result_cache {
            true => Some(start_cluster(&args, suite, &dir, None, true).await?),
            false => None,
        },
    };
    let s3 = match &args.s3 {
        Some((bucket, prefix)) => Some(s3_tables(suite, &cluster, &dir, bucket, prefix).await?),
        None => None,
    };
    for client in std::iter::once(&client).chain(s3.as_ref().map(|(_, c)| c)) {
        for (key, value) in &args.volley_settings {
            client.sql(&format!("SET {key} = '{value}'")).await?;
        }
        if let Some(compression) = &args.compression {
            client
                .sql(&format!("SET volley.shuffle_compression = '{compression}'"))
                .await?;
        }
    }

    println!(
        "{} SF{} | DataFusion: {} partitions | Volley: {} executors x {} slots | cluster up in {:.3}s",
        suite.name(),
        args.sf,
        cores,
        args.executors,
        args.slots,
        boot.as_secs_f64()
    );
    println!(
        "{:>5} {:>12} {:>12} {:>8} {:>10}{}",
        "query",
        "datafusion_s",
        "volley_s",
        "ratio",
        "rows",
        if s3.is_some() {
            format!(" {:>12} {:>9}", "volley_s3_s", "s3/local")
        } else {
            String::new()
        }
    );
    if durable.is_some() && args.result_cache {
        println!(
            "      (then miss_s: the same with the result cache on, every run a miss, and miss/off)"
        );
    } else if durable.is_some() {
        println!(
            "      (then volley_state_s: the same on a scheduler with --state-dir, and state/memory)"
        );
    }
    let (mut total_df, mut total_volley, mut total_s3) = (0.0, 0.0, 0.0);
    let mut total_durable = 0.0;
    // With --result-cache: the cache's cluster with the session's cache off.
    let mut total_same_off = 0.0;
    let mut records = Vec::new();
    for &q in &args.queries {
        let sql = suite.query(q)?;
        let mut best_df = f64::MAX;
        let mut best_volley = f64::MAX;
        let mut best_s3 = f64::MAX;
        let mut best_durable = f64::MAX;
        let mut best_same_off = f64::MAX;
        let mut checked = 0;
        let mut last_job = String::new();
        // Of the last run: client-side time to submit (planning included) and in all.
        let mut last_times = (0.0, 0.0);
        let mut df_planning = 0.0;
        for iteration in 0..args.iterations {
            let t = Instant::now();
            let physical = ctx.sql(&sql).await?.create_physical_plan().await?;
            df_planning = t.elapsed().as_secs_f64();
            let local = datafusion::physical_plan::collect(physical, ctx.task_ctx()).await?;
            best_df = best_df.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let job_id = client.submit(&sql).await?;
            let submitted = t.elapsed().as_secs_f64();
            let remote = client.sql_job_rows(&job_id).await?;
            best_volley = best_volley.min(t.elapsed().as_secs_f64());
            last_times = (submitted, t.elapsed().as_secs_f64());
            last_job = job_id;
            let expected = comparable(suite, rows(&local)?);
            assert_same_rows(
                &expected,
                &comparable(suite, rows(&remote)?),
                &float_columns(&local),
                &format!("q{q}"),
            );
            checked = expected.len();
            if let Some((_, durable_client)) = &durable {
                if args.result_cache {
                    // The same cluster with the session's cache off, then on: the miss cost
                    // without the difference between two clusters.
                    durable_client
                        .sql("SET volley.result_cache_ttl = '0'")
                        .await?;
                    let t = Instant::now();
                    let job_id = durable_client.submit(&sql).await?;
                    durable_client.sql_job_rows(&job_id).await?;
                    best_same_off = best_same_off.min(t.elapsed().as_secs_f64());
                    durable_client
                        .sql("SET volley.result_cache_ttl = '5m'")
                        .await?;
                    // Another cache key for each iteration: every run is a miss.
                    durable_client
                        .sql(&format!(
                            "SET datafusion.sql_parser.recursion_limit = {}",
                            60 + iteration
                        ))
                        .await?;
                }
                let t = Instant::now();
                let job_id = durable_client.submit(&sql).await?;
                let kept = durable_client.sql_job_rows(&job_id).await?;
                best_durable = best_durable.min(t.elapsed().as_secs_f64());
                assert_same_rows(
                    &expected,
                    &comparable(suite, rows(&kept)?),
                    &float_columns(&local),
                    &format!("q{q} with --state-dir"),
                );
            }
            if let Some((_, s3_client)) = &s3 {
                let t = Instant::now();
                let job_id = s3_client.submit(&sql).await?;
                let from_s3 = s3_client.sql_job_rows(&job_id).await?;
                best_s3 = best_s3.min(t.elapsed().as_secs_f64());
                assert_same_rows(
                    &expected,
                    &comparable(suite, rows(&from_s3)?),
                    &float_columns(&local),
                    &format!("q{q} from S3"),
                );
            }
        }
        total_df += best_df;
        total_volley += best_volley;
        if s3.is_some() {
            total_s3 += best_s3;
        }
        if durable.is_some() {
            total_durable += best_durable;
        }
        if args.result_cache {
            total_same_off += best_same_off;
        }
        if args.stages {
            print_stages(&cluster, &last_job, last_times, args.metrics);
            println!(
                "      DataFusion: planning {:.1}ms of {:.1}ms",
                df_planning * 1000.0,
                best_df * 1000.0
            );
        }
        let (shuffle_bytes, spill_bytes) = cluster
            .scheduler()
            .service()
            .with_state(|state| volley_scheduler::views::job_detail(state, &last_job))
            .map(|job| {
                (
                    job.stages.iter().map(|s| s.shuffle_bytes).sum::<u64>(),
                    job.stages.iter().map(|s| s.spilled_bytes).sum::<u64>(),
                )
            })
            .unwrap_or_default();
        records.push(serde_json::json!({
            "query": format!("q{q}"),
            "datafusion_s": best_df,
            "volley_s": best_volley,
            "ratio": best_volley / best_df,
            "rows": checked,
            "shuffle_bytes": shuffle_bytes,
            "spill_bytes": spill_bytes,
            "volley_s3_s": s3.as_ref().map(|_| best_s3),
            "volley_second_s": durable.as_ref().map(|_| best_durable),
        }));
        println!(
            "{:>5} {:>12.3} {:>12.3} {:>8.2} {:>10}{}",
            format!("q{q}"),
            best_df,
            best_volley,
            best_volley / best_df,
            checked,
            s3_columns(s3.is_some(), best_s3, best_volley)
                + &s3_columns(durable.is_some(), best_durable, best_volley)
        );
    }
    println!(
        "{:>5} {:>12.3} {:>12.3} {:>8.2} {:>10}{}",
        "total",
        total_df,
        total_volley,
        total_volley / total_df,
        "",
        s3_columns(s3.is_some(), total_s3, total_volley)
            + &s3_columns(durable.is_some(), total_durable, total_volley)
    );
    if let (Some((_, cached_client)), true) = (&durable, args.result_cache) {
        // Second pass: the same queries, answered from the cache (same key as the last miss).
        let mut total_hits = 0.0;
        let mut hits = Vec::new();
        for (&q, record) in args.queries.iter().zip(&records) {
            let sql = suite.query(q)?;
            let mut best = f64::MAX;
            for _ in 0..args.iterations {
                let t = Instant::now();
                let job_id = cached_client.submit(&sql).await?;
                cached_client.sql_job_rows(&job_id).await?;
                best = best.min(t.elapsed().as_secs_f64());
                let tasks = cluster_tasks(&durable, &job_id);
                assert_eq!(tasks, Some(0), "q{q} was answered from the result cache");
            }
            total_hits += best;
            let miss = record["volley_second_s"].as_f64().unwrap_or(f64::NAN);
            hits.push(format!("q{q} {:.1}ms ({:.0}x)", best * 1000.0, miss / best));
        }
        println!("hits (best of {}): {}", args.iterations, hits.join(", "));
        println!(
            "result cache: misses cost {:+.2} ms per query ({:+.1}% in total) against the same cluster with the session's cache off ({:.3}s; {:+.1}% against the cluster without a cache); the second pass (hits) took {:.3}s = {:.1}% of the first pass ({:.3}s)",
            (total_durable - total_same_off) * 1000.0 / args.queries.len() as f64,
            (total_durable / total_same_off - 1.0) * 100.0,
            total_same_off,
            (total_durable / total_volley - 1.0) * 100.0,
            total_hits,
            total_hits / total_durable * 100.0,
            total_durable
        );
    } else if durable.is_some() {
        let queries = args.queries.len() as f64;
        println!(
            "--state-dir costs {:+.2} ms per query ({:+.1}% in total)",
            (total_durable - total_volley) * 1000.0 / queries,
            (total_durable / total_volley - 1.0) * 100.0
        );
    }
    if let Some(path) = &args.json {
        let report = serde_json::json!({
            "sf": args.sf,
            "executors": args.executors,
            "slots": args.slots,
            "datafusion_partitions": cores,
            "queries": records,
            "total": {
                "datafusion_s": total_df,
                "volley_s": total_volley,
                "ratio": total_volley / total_df,
            },
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        eprintln!("wrote {}", path.display());
    }
    if let Some((cluster, _)) = durable {
        cluster.shutdown().await;
    }
    cluster.shutdown().await;
    Ok(())
}

/// Tasks job `job_id` ran on the second cluster.
fn cluster_tasks(
    cluster: &Option<(EmbeddedCluster, volley::VolleyClient)>,
    job_id: &str,
) -> Option<usize> {
    let (cluster, _) = cluster.as_ref()?;
    cluster
        .scheduler()
        .service()
        .with_state(|state| state.job(job_id).map(|j| j.progress().3))
}

/// An embedded cluster as `args` say, its state in `state_dir` (started empty) or memory, its
/// result cache on or off, and a session with the suite's tables.
async fn start_cluster(
    args: &Args,
    suite: Suite,
    dir: &std::path::Path,
    state_dir: Option<PathBuf>,
    result_cache: bool,
) -> Result<(EmbeddedCluster, volley::VolleyClient), BoxError> {
    let cluster = EmbeddedCluster::start_with_memory(
        SchedulerConfig {
            state_dir,
            state_reset: true,
            result_cache_bytes: if result_cache { 1 << 30 } else { 0 },
            ..SchedulerConfig::default()
                .with_address("127.0.0.1", 0)
                .with_target_partitions(args.executors * args.slots)
        },
        args.executors,
        args.slots,
        args.memory_limit,
    )
    .await?;
    let client = cluster.client().await?;
    for statement in suite.create_table_statements(dir) {
        client.sql(&statement).await?;
    }
    Ok((cluster, client))
}

/// Rows as compared: in order for TPC-H, sorted for TPC-DS (whose ORDER BY leaves ties).
fn comparable(
    suite: Suite,
    mut rows: Vec<volley_tests::compare::Row>,
) -> Vec<volley_tests::compare::Row> {
    if !suite.ordered() {
        rows.sort();
    }
    rows
}

/// Time on a second cluster and its ratio to the first (S3 data, or a durable state store).
fn s3_columns(shown: bool, s3: f64, local: f64) -> String {
    if shown {
        format!(" {s3:>12.3} {:>9.2}", s3 / local)
    } else {
        String::new()
    }
}

/// `--data s3://...`: an S3 server holding the data in `dir` under `bucket/prefix`, and a
/// session of `cluster` whose tables are there (per-table credentials and endpoint).
async fn s3_tables(
    suite: Suite,
    cluster: &EmbeddedCluster,
    dir: &std::path::Path,
    bucket: &str,
    prefix: &str,
) -> Result<(volley_tests::s3::S3Server, volley::VolleyClient), BoxError> {
    let started = Instant::now();
    let s3 = volley_tests::s3::S3Server::start(&[bucket])?;
    let files = s3.upload_dir(bucket, prefix, dir).await?;
    eprintln!(
        "uploaded {files} files to s3://{bucket}/{prefix} ({}) in {:.1}s",
        s3.endpoint,
        started.elapsed().as_secs_f64()
    );
    let client = cluster.client().await?;
    let options = s3.table_options(&s3.access_key, &s3.secret_key);
    for table in suite.tables() {
        let location = suite.location(&format!("s3://{bucket}/{prefix}"), table);
        client
            .sql(&format!(
                "CREATE EXTERNAL TABLE {table} STORED AS PARQUET LOCATION '{location}' {options}"
            ))
            .await?;
    }
    Ok((s3, client))
}

/// `--stages`: when each stage of the job started and ended (ms after submission), its tasks,
/// rows and adaptive decisions; then where the client's time went (`times`: seconds until
/// the submission returned, and in all).
fn print_stages(cluster: &EmbeddedCluster, job_id: &str, times: (f64, f64), metrics: bool) {
    cluster.scheduler().service().with_state(|state| {
        let Some(job) = state.job(job_id) else {
            return;
        };
        let ms = |t: Option<Instant>| {
            t.map_or(-1.0, |t| {
                t.saturating_duration_since(job.submitted).as_secs_f64() * 1000.0
            })
        };
        for stage in job.stages.values() {
            let rows: u64 = stage
                .tasks
                .iter()
                .filter_map(|t| match &t.state {
                    volley_scheduler::job::TaskState::Succeeded { outputs, .. } => {
                        Some(outputs.iter().map(|o| o.num_rows).sum::<u64>())
                    }
                    _ => None,
                })
                .sum();
            let decisions: Vec<String> = stage.adaptive.iter().map(|d| d.to_string()).collect();
            let durations: Vec<String> = stage
                .tasks
                .iter()
                .filter_map(|t| match &t.state {
                    volley_scheduler::job::TaskState::Succeeded { elapsed, .. } => {
                        Some(format!("{:.1}", elapsed.as_secs_f64() * 1000.0))
                    }
                    _ => None,
                })
                .collect();
            println!(
                "      stage {:>2} {:<9} tasks={:<2} start={:>7.1}ms end={:>7.1}ms task_ms=[{}] rows={rows} {}",
                stage.plan.stage_id,
                stage.plan.kind.as_str(),
                stage.tasks.len(),
                ms(stage.started()),
                ms(stage.finished()),
                durations.join(" "),
                decisions.join("; ")
            );
        }
        if metrics && let Some(detail) = volley_scheduler::views::job_detail(state, job_id) {
            print_metrics(&detail);
        }
        let job_ms = ms(job.finished);
        let (submit_ms, total_ms) = (times.0 * 1000.0, times.1 * 1000.0);
        println!(
            "      job done at {job_ms:.1}ms | client: submit (planning) {submit_ms:.1}ms, \
             job {job_ms:.1}ms, result wait+fetch {:.1}ms, total {total_ms:.1}ms",
            total_ms - submit_ms - job_ms
        );
    });
}

/// `--metrics`: each stage's operators (one line each, indented by depth) with their output
/// rows and the times DataFusion measured, in milliseconds summed over the stage's tasks.
fn print_metrics(detail: &volley_scheduler::views::JobDetail) {
    for stage in &detail.stages {
        println!("      stage {} operators:", stage.id);
        for op in &stage.plan {
            let name: String = op.operator.chars().take(70).collect();
            let times: Vec<String> = op
                .metrics
                .iter()
                .filter(|(k, v)| **v > 0 && (k.contains("time") || k.contains("elapsed")))
                .map(|(k, v)| format!("{k}={:.1}", *v as f64 / 1e6))
                .collect();
            let rows = op.metrics.get("output_rows").copied().unwrap_or(0);
            println!(
                "        {}{name} rows={rows} {}",
                "  ".repeat(op.depth),
                times.join(" ")
            );
        }
    }
}
