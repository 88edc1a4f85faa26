//! All 22 TPC-H queries at SF 0.1 on a cluster of real processes (1 scheduler, 2 executors):
//! identical to single-node DataFusion and to DuckDB's answers.

use std::collections::BTreeSet;

use volley_tests::compare::{assert_matches_answer, assert_same_rows, float_columns, rows};
use volley_tests::process::ProcessCluster;
use volley_tests::tpch;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpch_sf01_on_process_cluster_matches_datafusion_and_duckdb() {
    volley_tests::init_tracing();
    let dir = tpch::sf01().expect("generate TPC-H");
    let cluster = ProcessCluster::start(2, 2, &[])
        .await
        .expect("start cluster");
    let client = cluster.client().await.expect("connect");
    let ctx = tpch::register_both(&client, &dir)
        .await
        .expect("TPC-H tables");

    for q in 1..=22 {
        let sql = tpch::query(q).expect("query text");
        let statement = volley::split_statements(&sql).expect("parse");
        assert_eq!(statement.len(), 1, "q{q} is one statement");
        let (_, volley_batches) = client
            .sql(&statement[0])
            .await
            .unwrap_or_else(|e| panic!("q{q} failed on Volley: {e}"));
        let local_batches = ctx
            .sql(&sql)
            .await
            .expect("local plan")
            .collect()
            .await
            .expect("local run");
        let expected = rows(&local_batches).expect("format");
        let actual = rows(&volley_batches).expect("format");
        assert_same_rows(
            &expected,
            &actual,
            &float_columns(&local_batches),
            &format!("q{q} vs DataFusion"),
        );
        assert_matches_answer(
            &actual,
            &tpch::answer_path(q),
            0.011,
            &format!("q{q} vs DuckDB"),
        );
    }

    // The scheduler's records: shuffles happened and tasks ran on both executors.
    let state = client.cluster_state().await.expect("cluster state");
    assert_eq!(state.executors.len(), 2);
    let q5 = state
        .jobs
        .iter()
        .find(|j| j.sql.contains("local supplier volume") || j.sql.contains("r_name = 'ASIA'"))
        .expect("q5 job recorded");
    assert_eq!(q5.state, "succeeded");
    assert!(
        q5.stages.iter().any(|s| s.kind == "shuffle"),
        "q5 has a hash shuffle: {:?}",
        q5.stages
    );
    let executors: BTreeSet<&str> = q5.tasks.iter().map(|t| t.executor_id.as_str()).collect();
    let registered: BTreeSet<&str> = state.executors.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(executors, registered, "q5's tasks ran on both executors");

    // Every job's shuffle files are removed once its result was read (each executor works in
    // a private folder under its work dir root); the release answers before the executors
    // delete them, so the last job's may take a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let leftovers = job_dirs(cluster.work_dir());
        if leftovers.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "job dirs left behind: {leftovers:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The job folders under a cluster's work dir root (each executor's private folder).
fn job_dirs(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for executor_root in std::fs::read_dir(root).expect("work dir") {
        let executor_root = executor_root.expect("entry").path();
        for private in std::fs::read_dir(&executor_root).expect("executor root") {
            let private = private.expect("entry").path();
            for job_dir in std::fs::read_dir(&private).expect("executor dir") {
                let job_dir = job_dir.expect("entry");
                if job_dir.file_name() != volley_core::shuffle::EXECUTOR_MARKER {
                    found.push(job_dir.path());
                }
            }
        }
    }
    found
}
