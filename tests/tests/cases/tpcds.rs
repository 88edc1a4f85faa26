//! All 99 TPC-DS queries at SF 0.1 on a cluster of real processes (1 scheduler, 2 executors):
//! each equals DuckDB's answer as a multiset of rows (ORDER BY ... LIMIT leaves ties); the 14
//! whose answer is empty are also run on single-node DataFusion, which must agree. The
//! executors say their tasks share 8 cores (4 per slot), so stages that build broadcast hash
//! tables run their 4 partitions in one task (`volley.group_broadcast_tasks`); the 99 run
//! that way, then again with the setting off (one task per partition).

use datafusion::prelude::SessionContext;
use volley_core::config::volley_session_config;
use volley_tests::compare::{assert_matches_answer_unordered, rows};
use volley_tests::process::{ProcessCluster, ProcessOptions};
use volley_tests::tpcds;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpcds_sf01_on_process_cluster_matches_duckdb() {
    volley_tests::init_tracing();
    let dir = tpcds::sf01().expect("generate TPC-DS");
    let options = ProcessOptions {
        env: vec![("VOLLEY_EXECUTOR_CORES".to_string(), "8".to_string())],
        ..ProcessOptions::default()
    };
    let cluster = ProcessCluster::start_with(2, 2, &[], options)
        .await
        .expect("start cluster");
    let client = cluster.client().await.expect("connect");
    for statement in tpcds::create_table_statements(&dir) {
        client.sql(&statement).await.expect("register table");
    }
    let local = SessionContext::new_with_config(volley_session_config(4));
    tpcds::register_local(&local, &dir).await.unwrap();
    // Grouped (the cluster's default here), then one task per partition; each run really runs.
    client
        .sql("SET volley.result_cache_ttl = '0'")
        .await
        .unwrap();
    for grouped in [true, false] {
        client
            .sql(&format!("SET volley.group_broadcast_tasks = {grouped}"))
            .await
            .unwrap();
        let empty = run_all(&client, &local).await;
        assert_eq!(
            empty,
            [8, 23, 24, 25, 37, 41, 44, 54, 64, 65, 82, 84, 85, 91],
            "the queries with an empty answer at SF 0.1 (grouped: {grouped})"
        );
    }
}

/// Runs the 99 queries, each compared with DuckDB's answer (and the empty ones with
/// DataFusion's); returns the queries whose answer is empty.
async fn run_all(client: &volley::VolleyClient, local: &SessionContext) -> Vec<usize> {
    let mut empty = Vec::new();
    for q in 1..=99 {
        let sql = tpcds::query(q).unwrap();
        let statements = volley::split_statements(&sql).unwrap();
        assert_eq!(statements.len(), 1, "q{q} is one statement");
        let (_, batches) = client
            .sql(&statements[0])
            .await
            .unwrap_or_else(|e| panic!("q{q} failed on Volley: {e}"));
        let actual = rows(&batches).unwrap();
        assert_matches_answer_unordered(&actual, &tpcds::answer_path(q), 0.011, &format!("q{q}"));
        if actual.is_empty() {
            let local_rows = local.sql(&sql).await.unwrap().collect().await.unwrap();
            assert_eq!(rows(&local_rows).unwrap(), actual, "q{q} vs DataFusion");
            empty.push(q);
        }
    }
    empty
}
