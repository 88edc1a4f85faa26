//! Execution-strategy tests (not timings): a memory-capped cluster spills and stays exact, and a
//! join with a small build side is really broadcast.

use datafusion::prelude::SessionContext;
use volley::EmbeddedCluster;
use volley_scheduler::SchedulerConfig;
use volley_scheduler::views;
use volley_tests::compare::rows;
use volley_tests::tpch;

/// Sum of row numbers weighted by key after a global sort: changes if any row moves.
const SORT_CHECKSUM: &str = "SELECT count(*) AS n, sum(rn * l_orderkey) AS checksum FROM (\
     SELECT l_orderkey, row_number() OVER (ORDER BY l_comment, l_orderkey, l_linenumber) AS rn \
     FROM lineitem) t";

/// Two months of orders (a few thousand rows) joined with all of lineitem.
const SMALL_BUILD_JOIN: &str = "SELECT count(*) AS n, sum(l_quantity) AS qty \
     FROM lineitem JOIN orders ON l_orderkey = o_orderkey \
     WHERE o_orderdate < DATE '1992-03-01'";

async fn local(sql: &str) -> Vec<Vec<String>> {
    let dir = tpch::sf01().unwrap();
    let ctx = SessionContext::new();
    tpch::register_local(&ctx, &dir).await.unwrap();
    rows(&ctx.sql(sql).await.unwrap().collect().await.unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_capped_executors_spill_and_stay_exact() {
    volley_tests::init_tracing();
    let dir = tpch::sf01().unwrap();
    // 24 MiB per executor for a global sort of 600K lineitem rows (~100 MB in memory).
    let cluster = EmbeddedCluster::start_with_memory(
        SchedulerConfig::default().with_address("127.0.0.1", 0),
        2,
        1,
        Some(24 * 1024 * 1024),
    )
    .await
    .unwrap();
    let client = cluster.client().await.unwrap();
    for statement in tpch::create_table_statements(&dir) {
        client.sql(&statement).await.unwrap();
    }
    let job_id = client.submit(SORT_CHECKSUM).await.unwrap();
    let result = rows(&client.sql_job_rows(&job_id).await.unwrap()).unwrap();
    assert_eq!(result, local(SORT_CHECKSUM).await);
    let spilled: u64 = cluster
        .scheduler()
        .service()
        .with_state(|s| views::job_detail(s, &job_id))
        .unwrap()
        .stages
        .iter()
        .map(|s| s.spilled_bytes)
        .sum();
    assert!(spilled > 0, "the capped sort must spill");

    // A hash join whose build side cannot fit (all of lineitem's columns, ~45 MB per task)
    // fails with DataFusion's resources message after its retries, within seconds (tasks
    // held back while executors' breakers were open used to wait forever), and the cluster
    // keeps serving.
    for statement in [
        "SET datafusion.optimizer.hash_join_single_partition_threshold = 0",
        "SET datafusion.optimizer.hash_join_single_partition_threshold_rows = 0",
        "SET volley.adaptive_broadcast_bytes = 0",
    ] {
        client.sql(statement).await.unwrap();
    }
    let started = std::time::Instant::now();
    let err = client
        .sql("SELECT count(*), max(a.l_comment || a.l_shipinstruct || a.l_shipmode), max(b.l_comment || b.l_shipinstruct || b.l_shipmode) FROM lineitem a JOIN lineitem b ON a.l_orderkey = b.l_orderkey")
        .await
        .expect_err("the build side does not fit 24 MiB");
    assert!(err.to_string().contains("Resources exhausted"), "{err}");
    assert!(
        started.elapsed().as_secs() < 60,
        "failed in {:?}",
        started.elapsed()
    );
    let job_id = client.submit(SMALL_BUILD_JOIN).await.unwrap();
    let result = rows(&client.sql_job_rows(&job_id).await.unwrap()).unwrap();
    assert_eq!(result, local(SMALL_BUILD_JOIN).await);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_build_side_is_broadcast() {
    volley_tests::init_tracing();
    let dir = tpch::sf01().unwrap();
    let cluster = EmbeddedCluster::start(2, 1).await.unwrap();
    let client = cluster.client().await.unwrap();
    for statement in tpch::create_table_statements(&dir) {
        client.sql(&statement).await.unwrap();
    }
    let (_, explain) = client
        .sql(&format!("EXPLAIN {SMALL_BUILD_JOIN}"))
        .await
        .unwrap();
    let lines: Vec<String> = rows(&explain)
        .unwrap()
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    assert!(
        lines.iter().any(|l| l.contains("kind=broadcast")),
        "{lines:#?}"
    );
    let job_id = client.submit(SMALL_BUILD_JOIN).await.unwrap();
    let result = rows(&client.sql_job_rows(&job_id).await.unwrap()).unwrap();
    assert_eq!(result, local(SMALL_BUILD_JOIN).await);
    // The job really ran a broadcast stage, read whole by every task of the join stage.
    let job = cluster
        .scheduler()
        .service()
        .with_state(|s| views::job_detail(s, &job_id))
        .unwrap();
    let broadcast = job
        .stages
        .iter()
        .find(|s| s.kind == "broadcast")
        .expect("a broadcast stage");
    assert_eq!(broadcast.state, "succeeded");
    let consumer = job
        .stages
        .iter()
        .find(|s| s.inputs.contains(&broadcast.id))
        .expect("its consumer");
    assert!(consumer.partitions >= 2);
    assert!(
        consumer.bytes_in >= broadcast.bytes_out && broadcast.bytes_out > 0,
        "consumer reads the broadcast output"
    );
    cluster.shutdown().await;
}
