//! A soak: 50 concurrent mixed TPC-H queries at SF 0.1 on real processes, every answer equal
//! to single-node DataFusion, and afterwards every process back at its baseline: resident
//! memory, open file descriptors, no shuffle file left. Also: `volley sql` streams a large
//! result as CSV in bounded memory.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use datafusion::prelude::SessionContext;
use volley_core::config::volley_session_config;
use volley_tests::compare::{Row, assert_same_rows, float_columns, rows};
use volley_tests::process::{ProcessCluster, volley_bin};
use volley_tests::tpch;

const QUERIES: [usize; 8] = [1, 3, 5, 6, 10, 12, 14, 18];
const CONCURRENT: usize = 50;

/// Resident set and its high-water mark (KiB) of a process.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_queries_exact_and_back_to_baseline() {
    volley_tests::init_tracing();
    let dir = tpch::sf01().unwrap();
    let cluster = ProcessCluster::start(2, 2, &[]).await.expect("cluster");
    let client = cluster.client().await.unwrap();
    for statement in tpch::create_table_statements(&dir) {
        client.sql(&statement).await.unwrap();
    }
    let ctx = SessionContext::new_with_config(volley_session_config(4));
    tpch::register_local(&ctx, &dir).await.unwrap();
    let mut expected: HashMap<usize, (Vec<Row>, Vec<bool>)> = HashMap::new();
    for q in QUERIES {
        let batches = ctx
            .sql(&tpch::query(q).unwrap())
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        expected.insert(q, (rows(&batches).unwrap(), float_columns(&batches)));
        // Warm-up on the cluster: caches and pools reach their working size.
        let (_, warm) = client.sql(&tpch::query(q).unwrap()).await.unwrap();
        assert_same_rows(
            &expected[&q].0,
            &rows(&warm).unwrap(),
            &expected[&q].1,
            "warm-up",
        );
    }
    let mut pids = vec![cluster.scheduler_pid()];
    pids.extend(cluster.executor_pids());
    let baseline: Vec<(u64, usize)> = pids
        .iter()
        .map(|&p| (memory_kib(p).0, open_fds(p)))
        .collect();

    let started = Instant::now();
    let mut runs = Vec::new();
    for i in 0..CONCURRENT {
        let q = QUERIES[i % QUERIES.len()];
        let client = cluster.client().await.unwrap();
        for statement in tpch::create_table_statements(&dir) {
            client.sql(&statement).await.unwrap();
        }
        runs.push(tokio::spawn(async move {
            let (_, batches) = client
                .sql(&tpch::query(q).unwrap())
                .await
                .map_err(|e| format!("q{q}: {e}"))?;
            Ok::<_, String>((q, rows(&batches).unwrap()))
        }));
    }
    for run in runs {
        let (q, actual) = run.await.unwrap().unwrap();
        let (rows, floats) = &expected[&q];
        assert_same_rows(rows, &actual, floats, &format!("q{q} under load"));
    }
    let elapsed = started.elapsed();

    // Everything back: no shuffle file, descriptors and memory near the baseline.
    let deadline = Instant::now() + Duration::from_secs(20);
    while volley_tests::files_under(cluster.work_dir()) > 0 {
        assert!(Instant::now() < deadline, "shuffle files left behind");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut report = Vec::new();
    for (&pid, &(rss_before, fds_before)) in pids.iter().zip(&baseline) {
        let (rss, peak) = memory_kib(pid);
        let fds = open_fds(pid);
        report.push(format!(
            "pid {pid}: rss {} -> {} MiB (peak {} MiB), fds {fds_before} -> {fds}",
            rss_before / 1024,
            rss / 1024,
            peak / 1024
        ));
        assert!(fds <= fds_before + 8, "descriptors leak: {report:?}");
        assert!(
            rss <= rss_before * 3 / 2 + 128 * 1024,
            "memory not back near its baseline: {report:?}"
        );
    }
    eprintln!("soak: {CONCURRENT} queries in {elapsed:?}; {report:?}");
}

/// `volley sql` writes a result as it streams in: SF 0.1 lineitem (600K rows, ~75 MB of CSV)
/// goes to a file through a client whose peak memory stays far below the result's size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volley_sql_streams_large_csv_results_in_bounded_memory() {
    volley_tests::init_tracing();
    let dir = tpch::sf01().unwrap();
    let cluster = ProcessCluster::start(2, 2, &[]).await.expect("cluster");
    let out = tempfile::tempdir().unwrap();
    let csv = out.path().join("lineitem.csv");
    let mut script = tpch::create_table_statements(&dir).join(";\n");
    script.push_str(";\nSELECT * FROM lineitem");
    let mut child = Command::new(volley_bin().unwrap())
        .args(["sql", "--scheduler", cluster.url(), "--format", "csv", "-o"])
        .arg(&csv)
        .args(["-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut peak = 0;
    let status = loop {
        peak = peak.max(memory_kib(pid).1);
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success());
    let written = std::fs::metadata(&csv).unwrap().len();
    let lines = std::fs::read_to_string(&csv).unwrap().lines().count();
    assert_eq!(lines, 600_572 + 1, "every row and the header");
    eprintln!(
        "volley sql: {} MiB of CSV, client peak RSS {} MiB",
        written >> 20,
        peak / 1024
    );
    assert!(
        peak * 1024 < written,
        "client peak {} KiB for a {written}-byte result: buffered",
        peak
    );
}
