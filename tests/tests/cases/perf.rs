//! Execution-strategy tests (not timings): a memory-capped cluster spills and stays exact, and a
//! join with a small build side is really broadcast, and Parquet scan tasks get equal shares, and
//! a fact table shuffled into a star join is first filtered by the join's filtered dimensions,
//! and a scan below a broadcast join skips the row groups holding none of its build side's keys.

use datafusion::prelude::SessionContext;
use volley::EmbeddedCluster;
use volley_scheduler::SchedulerConfig;
use volley_scheduler::views;
use volley_tests::compare::{assert_matches_answer_unordered, rows};
use volley_tests::{tpcds, tpch};

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

/// A cluster of 2 executors x 1 slot with the tables of `statements` registered.
async fn cluster_with(statements: Vec<String>) -> (EmbeddedCluster, volley::VolleyClient) {
    let cluster = EmbeddedCluster::start(2, 1).await.unwrap();
    let client = cluster.client().await.unwrap();
    // These tests compare runs of the same query: each must run.
    client
        .sql("SET volley.result_cache_ttl = '0'")
        .await
        .unwrap();
    for statement in statements {
        client.sql(&statement).await.unwrap();
    }
    (cluster, client)
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

/// EXPLAIN's stage lines for `sql`.
async fn explain_lines(client: &volley::VolleyClient, sql: &str) -> Vec<String> {
    let (_, explain) = client.sql(&format!("EXPLAIN {sql}")).await.unwrap();
    rows(&explain)
        .unwrap()
        .into_iter()
        .map(|r| r[0].clone())
        .collect()
}

/// The build side of the join (two months of `orders`, 6 MB of files at SF0.1) is small: by
/// default each join task scans it itself (no broadcast stage: one stage barrier, task launch
/// and file round trip fewer); with `volley.inline_build_bytes = 0` it is a broadcast stage
/// read whole by every task of the join stage. Both answers equal DataFusion's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_build_side_is_broadcast() {
    volley_tests::init_tracing();
    let dir = tpch::sf01().unwrap();
    let (cluster, client) = cluster_with(tpch::create_table_statements(&dir)).await;
    let expected = local(SMALL_BUILD_JOIN).await;
    let lines = explain_lines(&client, SMALL_BUILD_JOIN).await;
    assert!(
        !lines.iter().any(|l| l.contains("kind=broadcast")),
        "{lines:#?}"
    );
    let job_id = client.submit(SMALL_BUILD_JOIN).await.unwrap();
    let result = rows(&client.sql_job_rows(&job_id).await.unwrap()).unwrap();
    assert_eq!(result, expected);
    let stages = cluster.scheduler().service().with_state(|s| {
        let job = views::job_detail(s, &job_id).unwrap();
        job.stages
            .iter()
            .map(|s| s.kind.clone())
            .collect::<Vec<_>>()
    });
    assert!(!stages.iter().any(|k| k == "broadcast"), "{stages:?}");

    client
        .sql("SET volley.inline_build_bytes = 0")
        .await
        .unwrap();
    // Several join tasks, each reading the broadcast (not one task running every partition).
    client
        .sql("SET volley.group_broadcast_tasks = false")
        .await
        .unwrap();
    let lines = explain_lines(&client, SMALL_BUILD_JOIN).await;
    assert!(
        lines.iter().any(|l| l.contains("kind=broadcast")),
        "{lines:#?}"
    );
    let job_id = client.submit(SMALL_BUILD_JOIN).await.unwrap();
    let result = rows(&client.sql_job_rows(&job_id).await.unwrap()).unwrap();
    assert_eq!(result, expected);
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

/// Three Parquet files of a 1000-row and a 500-row group: DataFusion's file groups would give
/// one scan task 3000 rows and the other 1500; Volley redraws them as runs of whole row groups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_scan_tasks_get_balanced_row_groups() {
    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};
    use parquet::arrow::ArrowWriter;
    use parquet::file::properties::WriterProperties;
    use std::sync::Arc;

    volley_tests::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
    for file in 0..3i64 {
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(1000))
            .build();
        let out = std::fs::File::create(dir.path().join(format!("part-{file}.parquet"))).unwrap();
        let mut writer = ArrowWriter::try_new(out, Arc::clone(&schema), Some(props)).unwrap();
        let values: Vec<i64> = (0..1500)
            .map(|i| (file * 1500 + i) * 7919 % 100_003)
            .collect();
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(Int64Array::from(values))],
        )
        .unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
    }
    let location = dir.path().to_str().unwrap();
    let sql = "SELECT x FROM t ORDER BY x";

    let ctx = SessionContext::new();
    ctx.sql(&format!(
        "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '{location}'"
    ))
    .await
    .unwrap();
    let expected = rows(&ctx.sql(sql).await.unwrap().collect().await.unwrap()).unwrap();

    let cluster = EmbeddedCluster::start(2, 1).await.unwrap();
    let client = cluster.client().await.unwrap();
    client
        .sql(&format!(
            "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '{location}'"
        ))
        .await
        .unwrap();
    let job_id = client.submit(sql).await.unwrap();
    let result = rows(&client.sql_job_rows(&job_id).await.unwrap()).unwrap();
    assert_eq!(result.len(), 4500);
    assert_eq!(result, expected);
    // The scan stage (sorting each task's rows) ran two tasks of 2000 and 2500 rows.
    let tasks = cluster.scheduler().service().with_state(|s| {
        let job = views::job_detail(s, &job_id).unwrap();
        let scan = job.stages.iter().find(|st| st.inputs.is_empty()).unwrap();
        views::stage_detail(s, &job_id, scan.id).unwrap().tasks
    });
    let mut task_rows: Vec<u64> = tasks.iter().map(|t| t.rows).collect();
    task_rows.sort_unstable();
    assert_eq!(task_rows, vec![2000, 2500]);
    cluster.shutdown().await;
}

/// TPC-DS q72 joins `catalog_sales` with `inventory` (~650 rows per item at SF1) before the
/// joins with its filtered dimensions (one year of dates, one marital status, one buying
/// potential). On one node DataFusion's dynamic join filters prune `catalog_sales` by those
/// dimensions first; they cannot cross a shuffle, so the cluster used to join every sale with
/// the inventory (SF1: 63 s against DataFusion's 5.6 s). The stage reading `catalog_sales` now
/// keeps only sales matching those dimensions, and the join with the inventory emits over 20
/// times fewer rows than without (`volley.key_filters = false`). Both answers equal DuckDB's. The broadcast threshold is scaled down with
/// the data (32 MiB at SF1, 4 MB here), so the plan has SF1's shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_star_joins_filtered_dimensions_filter_the_shuffled_fact_table() {
    volley_tests::init_tracing();
    let dir = tpcds::sf01().unwrap();
    let (cluster, client) = cluster_with(tpcds::create_table_statements(&dir)).await;
    client
        .sql("SET datafusion.optimizer.hash_join_single_partition_threshold = 4000000")
        .await
        .unwrap();
    let sql = tpcds::query(72).unwrap();
    // Rows out of the join of sales with inventory (wherever adaptive execution put it).
    let joined = |job_id: &str| -> u64 {
        cluster.scheduler().service().with_state(|s| {
            let job = views::job_detail(s, job_id).unwrap();
            let joins: Vec<u64> = job
                .stages
                .iter()
                .flat_map(|st| &st.plan)
                .filter(|op| {
                    op.operator.starts_with("HashJoinExec")
                        && op.operator.contains("inv_item_sk")
                        && op.operator.contains("cs_item_sk")
                })
                .map(|op| op.metrics.get("output_rows").copied().unwrap_or(0))
                .collect();
            assert_eq!(joins.len(), 1, "one join of sales with inventory");
            joins[0]
        })
    };
    let mut joined_rows = Vec::new();
    for setting in ["true", "false"] {
        client
            .sql(&format!("SET volley.key_filters = {setting}"))
            .await
            .unwrap();
        let job_id = client.submit(&sql).await.unwrap();
        let result = rows(&client.sql_job_rows(&job_id).await.unwrap()).unwrap();
        assert_matches_answer_unordered(&result, &tpcds::answer_path(72), 0.011, "q72");
        joined_rows.push(joined(&job_id));
    }
    assert!(
        joined_rows[0] * 20 < joined_rows[1],
        "sales joined with inventory: {} with key filters, {} without",
        joined_rows[0],
        joined_rows[1]
    );
    cluster.shutdown().await;
}

/// A `fact` file of 40 row groups sorted by `k`, and a `dim` table whose category `a` holds
/// 100 of its 4000 keys, all in one stretch (the shape of a date dimension filtered to a month
/// over sales clustered by date). The filter is on `dim.cat`, not the key, so no plan-time
/// rule can move it to `fact`; only the join's build side knows which keys survive.
fn star_tables(dir: &std::path::Path) {
    use arrow::array::{Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use parquet::arrow::ArrowWriter;
    use parquet::file::properties::WriterProperties;
    use std::sync::Arc;

    let write = |name: &str, batch: RecordBatch, row_group: usize| {
        std::fs::create_dir_all(dir.join(name)).unwrap();
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(row_group))
            .build();
        let out = std::fs::File::create(dir.join(name).join("part-0.parquet")).unwrap();
        let mut writer = ArrowWriter::try_new(out, batch.schema(), Some(props)).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
    };
    let fact = Schema::new(vec![
        Field::new("k", DataType::Int64, false),
        Field::new("v", DataType::Int64, false),
    ]);
    let keys: Vec<i64> = (0..40_000).map(|i| i / 10).collect();
    let values: Vec<i64> = (0..40_000).map(|i| i * 7 % 1013).collect();
    let batch = RecordBatch::try_new(
        Arc::new(fact),
        vec![
            Arc::new(Int64Array::from(keys)),
            Arc::new(Int64Array::from(values)),
        ],
    )
    .unwrap();
    write("fact", batch, 1000);
    let dim = Schema::new(vec![
        Field::new("k", DataType::Int64, false),
        Field::new("cat", DataType::Utf8, false),
    ]);
    let categories: Vec<&str> = (0..4000)
        .map(|k| if (1200..1300).contains(&k) { "a" } else { "b" })
        .collect();
    let batch = RecordBatch::try_new(
        Arc::new(dim),
        vec![
            Arc::new(Int64Array::from((0..4000).collect::<Vec<i64>>())),
            Arc::new(StringArray::from(categories)),
        ],
    )
    .unwrap();
    write("dim", batch, 4000);
}

/// Rows the scans of `fact` read in job `job_id`.
fn fact_rows_read(cluster: &EmbeddedCluster, job_id: &str) -> u64 {
    cluster.scheduler().service().with_state(|s| {
        views::job_detail(s, job_id)
            .unwrap()
            .stages
            .iter()
            .flat_map(|st| &st.plan)
            .filter(|op| op.operator.starts_with("DataSourceExec") && op.operator.contains("fact"))
            .map(|op| op.metrics.get("output_rows").copied().unwrap_or(0))
            .sum()
    })
}

/// A scan on the probe side of a broadcast join skips the row groups holding no key of the
/// join's build side: the task learns the keys' range from the build side it reads first (the
/// executor's form of DataFusion's dynamic join filters, which cannot work per task). With the
/// filter the scan reads 1 of the 40 row groups (keys 1200..1299 are rows 12,000..12,999);
/// without it (`volley.runtime_filters = false`) all 40,000. Every answer equals single-node DataFusion's: the inner join, the
/// preserved side of an outer join, an empty build side (the join then reads no probe row
/// either way), an outer join whose preserved side is the scan (no filter may apply), and a
/// union of two scans on the probe side (each is filtered: TPC-DS q5's sales and returns), and
/// a dimension on the build side of a lower join, whose rows the filter drops one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_join_prunes_the_row_groups_of_its_probe_scan() {
    volley_tests::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    star_tables(dir.path());
    let tables: Vec<String> = ["fact", "dim"]
        .iter()
        .map(|t| {
            format!(
                "CREATE EXTERNAL TABLE {t} STORED AS PARQUET LOCATION '{}'",
                dir.path().join(t).display()
            )
        })
        .collect();
    let queries = [
        (
            "SELECT count(*), sum(f.v) FROM fact f JOIN dim d ON f.k = d.k WHERE d.cat = 'a'",
            [1000, 40_000],
        ),
        (
            "SELECT d.k, count(f.v), sum(f.v) FROM dim d LEFT JOIN fact f ON f.k = d.k \
             WHERE d.cat = 'a' GROUP BY d.k ORDER BY d.k",
            [1000, 40_000],
        ),
        (
            "SELECT count(*), sum(f.v) FROM fact f JOIN dim d ON f.k = d.k WHERE d.cat = 'none'",
            [0, 0],
        ),
        (
            "SELECT count(*), count(d.k), sum(f.v) FROM fact f \
             LEFT JOIN dim d ON f.k = d.k AND d.cat = 'a'",
            [40_000, 40_000],
        ),
        // Each scan of a union on the probe side gets the filter.
        (
            "SELECT count(*), sum(u.v) FROM \
             (SELECT k, v FROM fact UNION ALL SELECT k, v * 2 AS v FROM fact) u \
             JOIN dim d ON u.k = d.k WHERE d.cat = 'a'",
            [2000, 80_000],
        ),
        // A filter above a lower join (TPC-DS q6's `d_month_seq = (scalar subquery)`) drops
        // the rows of `dim`, that join's build side, so `dim` holds only category `a`'s keys and
        // the lower join's own filter prunes `fact` (without the row filter: all 4,000 keys).
        (
            "SELECT count(*), sum(f.v) FROM fact f JOIN dim d ON f.k = d.k \
             WHERE d.cat = (SELECT min(cat) FROM dim WHERE k = 1250)",
            [1000, 40_000],
        ),
    ];
    let ctx = SessionContext::new();
    for statement in &tables {
        ctx.sql(statement).await.unwrap();
    }
    let (cluster, client) = cluster_with(tables.clone()).await;
    for (sql, expected_read) in queries {
        let expected = rows(&ctx.sql(sql).await.unwrap().collect().await.unwrap()).unwrap();
        let mut read = Vec::new();
        for setting in ["true", "false"] {
            client
                .sql(&format!("SET volley.runtime_filters = {setting}"))
                .await
                .unwrap();
            let job_id = client.submit(sql).await.unwrap();
            let result = rows(&client.sql_job_rows(&job_id).await.unwrap()).unwrap();
            assert_eq!(result, expected, "{sql} with runtime_filters = {setting}");
            read.push(fact_rows_read(&cluster, &job_id));
        }
        assert_eq!(
            read, expected_read,
            "{sql}: rows read with and without filters"
        );
    }
    cluster.shutdown().await;
}

/// A session that turns DataFusion's file-stream work stealing back on still counts each row
/// once: a task runs one partition of its scan and must not take its siblings' row groups
/// (the executor forces the option off in every task; a guard, this run passed without it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_stealing_set_by_a_session_reads_no_row_twice() {
    volley_tests::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    star_tables(dir.path());
    let cluster = EmbeddedCluster::start(2, 1).await.unwrap();
    let client = cluster.client().await.unwrap();
    client
        .sql(&format!(
            "CREATE EXTERNAL TABLE fact STORED AS PARQUET LOCATION '{}'",
            dir.path().join("fact").display()
        ))
        .await
        .unwrap();
    client
        .sql("SET datafusion.execution.enable_file_stream_work_stealing = true")
        .await
        .unwrap();
    let (_, batches) = client
        .sql("SELECT count(*), sum(v) FROM fact")
        .await
        .unwrap();
    let expected: i64 = (0..40_000i64).map(|i| i * 7 % 1013).sum();
    assert_eq!(
        rows(&batches).unwrap(),
        vec![vec!["40000".to_string(), expected.to_string()]]
    );
    cluster.shutdown().await;
}

/// A broadcast build side ending in a `LIMIT` is limited once, by a one-task broadcast stage
/// whose 10 rows every join task reads, not in each join task (which could each keep other
/// rows: the first to arrive).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_build_side_is_limited_once_for_all_join_tasks() {
    volley_tests::init_tracing();
    let dir = tpch::sf01().unwrap();
    let (cluster, client) = cluster_with(tpch::create_table_statements(&dir)).await;
    // Several join tasks, each reading the broadcast (not one task running every partition).
    client
        .sql("SET volley.group_broadcast_tasks = false")
        .await
        .unwrap();
    let sql = "SELECT count(*) FROM lineitem JOIN (SELECT o_orderkey FROM orders LIMIT 10) o \
               ON l_orderkey = o_orderkey";
    let lines = explain_lines(&client, sql).await;
    assert!(
        lines
            .iter()
            .any(|l| l.contains("kind=broadcast partitions=1")
                && l.contains("CoalescePartitionsExec <- ShuffleReaderExec")),
        "{lines:#?}"
    );
    let job_id = client.submit(sql).await.unwrap();
    let result = rows(&client.sql_job_rows(&job_id).await.unwrap()).unwrap();
    let n: u64 = result[0][0].parse().unwrap();
    // 10 orders of 1 to 7 lines each.
    assert!((10..=70).contains(&n), "{n}");
    let broadcast = cluster.scheduler().service().with_state(|s| {
        let job = views::job_detail(s, &job_id).unwrap();
        job.stages
            .iter()
            .filter(|st| st.kind == "broadcast")
            .map(|st| (st.partitions, st.rows_out))
            .collect::<Vec<_>>()
    });
    assert_eq!(broadcast, vec![(1, 10)], "one task writes the 10 rows");
    cluster.shutdown().await;
}
