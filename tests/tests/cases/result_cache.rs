//! The result cache on a cluster of real processes: a repeated query is answered with no task
//! and identical rows; a rewritten input file, an expired entry, another token and volatile
//! functions are misses; identical queries submitted together are computed once, and a query
//! waiting for one that is cancelled runs itself.

use std::path::Path;
use std::time::Duration;

use datafusion::dataframe::DataFrameWriteOptions;
use datafusion::prelude::SessionContext;
use volley::{ClientOptions, VolleyClient};
use volley_tests::compare::{assert_same_rows, float_columns, rows};
use volley_tests::process::{ProcessCluster, ProcessOptions};
use volley_tests::tpch;

const TOKEN: &str = "client-token-for-the-result-cache";
const CLUSTER: &str = "cluster-token-for-the-result-cache";

/// Run `sql` as one job: its rows and the tasks it ran.
async fn run(client: &VolleyClient, sql: &str) -> (Vec<arrow::array::RecordBatch>, u32, String) {
    let job_id = client.submit(sql).await.expect("submit");
    let batches = client.sql_job_rows(&job_id).await.expect("rows");
    let status = client.status(&job_id).await.expect("status");
    (batches, status.tasks_total, job_id)
}

/// A Parquet file at `path` with the column `a` = 1..=n.
async fn write_numbers(path: &Path, n: u32) {
    let ctx = SessionContext::new();
    let df = ctx
        .sql(&format!("SELECT value AS a FROM generate_series(1, {n})"))
        .await
        .expect("numbers");
    df.write_parquet(
        path.to_str().expect("utf-8 path"),
        DataFrameWriteOptions::new().with_single_file_output(true),
        None,
    )
    .await
    .expect("write parquet");
}

async fn metric(cluster: &ProcessCluster, name: &str) -> u64 {
    let (status, body) = volley_tests::http(
        "GET",
        format!("{}/metrics", cluster.http_url()),
        Some(CLUSTER),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} in /metrics:\n{body}"))
}

fn sum_of(batches: &[arrow::array::RecordBatch]) -> String {
    let rows = rows(batches).expect("format");
    assert_eq!(rows.len(), 1, "one row");
    rows[0][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_queries_are_answered_from_the_result_cache_until_their_inputs_change() {
    volley_tests::init_tracing();
    let dir = tpch::sf01().expect("generate TPC-H");
    let options = ProcessOptions::with_tokens(TOKEN, CLUSTER);
    let cluster = ProcessCluster::start_with(2, 2, &[], options)
        .await
        .expect("cluster");
    let client = cluster.client().await.expect("connect");
    let ctx = tpch::register_both(&client, &dir)
        .await
        .expect("TPC-H tables");

    // The same TPC-H query twice: the second is answered with no task, identical rows.
    let q1 = tpch::query(1).expect("q1");
    let local = ctx.sql(&q1).await.unwrap().collect().await.unwrap();
    let (first, tasks, _) = run(&client, &q1).await;
    assert!(tasks > 0, "the first run computes");
    let (second, tasks, job_id) = run(&client, &q1).await;
    assert_eq!(tasks, 0, "the second run is answered from the cache");
    let floats = float_columns(&local);
    let expected = rows(&local).unwrap();
    assert_same_rows(&expected, &rows(&first).unwrap(), &floats, "q1 first run");
    assert_same_rows(
        &expected,
        &rows(&second).unwrap(),
        &floats,
        "q1 from the cache",
    );
    let (status, body) = volley_tests::http(
        "GET",
        format!("{}/api/jobs", cluster.http_url()),
        Some(CLUSTER),
    )
    .await;
    assert_eq!(status, 200);
    let jobs: serde_json::Value = serde_json::from_str(&body).expect("json");
    let job = jobs
        .as_array()
        .and_then(|jobs| jobs.iter().find(|j| j["id"] == job_id.as_str()))
        .unwrap_or_else(|| panic!("{job_id} in {body}"));
    assert_eq!(job["state"], "cached", "{job}");
    assert_eq!(job["tasks_total"], 0, "{job}");
    assert_eq!(job["rows_out"], expected.len(), "{job}");
    assert!(job["cached_age_ms"].is_u64(), "{job}");
    assert_eq!(metric(&cluster, "volley_result_cache_hits_total").await, 1);
    assert!(metric(&cluster, "volley_result_cache_bytes").await > 0);
    let (_, explained) = client.sql(&format!("EXPLAIN ANALYZE {q1}")).await.unwrap();
    let explained = format!("{:?}", rows(&explained).unwrap());
    assert!(explained.contains("Result cache: hit"), "{explained}");

    // Another token is another principal: no sharing.
    let other = VolleyClient::connect_with(cluster.url(), ClientOptions::with_token(CLUSTER))
        .await
        .expect("connect with the cluster token");
    for statement in tpch::create_table_statements(&dir) {
        other.sql(&statement).await.expect("register table");
    }
    let (theirs, tasks, _) = run(&other, &q1).await;
    assert!(tasks > 0, "another token's query runs");
    assert_same_rows(
        &expected,
        &rows(&theirs).unwrap(),
        &floats,
        "q1, other token",
    );

    // Functions whose answer changes are never cached.
    let volatile = "SELECT count(*) AS n, max(now()) > TIMESTAMP '2000-01-01' AS later FROM nation";
    for _ in 0..2 {
        let (batches, tasks, _) = run(&client, volatile).await;
        assert!(tasks > 0, "now() is never answered from the cache");
        assert_eq!(
            rows(&batches).unwrap(),
            vec![vec!["25".to_string(), "true".to_string()]]
        );
    }
    let (_, explained) = client
        .sql(&format!("EXPLAIN ANALYZE {volatile}"))
        .await
        .unwrap();
    let explained = format!("{:?}", rows(&explained).unwrap());
    assert!(
        explained.contains("Result cache: not used (it calls now()"),
        "{explained}"
    );

    // A rewritten input file (same name, new rows): a miss with the new answer.
    let data = tempfile::Builder::new()
        .prefix("volley-cache-")
        .tempdir()
        .unwrap();
    let table = data.path().join("t");
    std::fs::create_dir(&table).unwrap();
    write_numbers(&table.join("part.parquet"), 100).await;
    client
        .sql(&format!(
            "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '{}/'",
            table.display()
        ))
        .await
        .unwrap();
    let sum = "SELECT sum(a) FROM t";
    let (batches, tasks, _) = run(&client, sum).await;
    assert_eq!((sum_of(&batches), tasks > 0), ("5050".to_string(), true));
    let (batches, tasks, _) = run(&client, sum).await;
    assert_eq!((sum_of(&batches), tasks), ("5050".to_string(), 0));
    let evictions = metric(&cluster, "volley_result_cache_evictions_total").await;
    write_numbers(&data.path().join("new.parquet"), 10).await;
    std::fs::rename(data.path().join("new.parquet"), table.join("part.parquet")).unwrap();
    let (batches, tasks, _) = run(&client, sum).await;
    assert_eq!(
        (sum_of(&batches), tasks > 0),
        ("55".to_string(), true),
        "a miss after the rewrite"
    );
    assert!(
        metric(&cluster, "volley_result_cache_evictions_total").await > evictions,
        "the stale entry was evicted"
    );
    let (batches, tasks, _) = run(&client, sum).await;
    assert_eq!((sum_of(&batches), tasks), ("55".to_string(), 0));

    // A statement asked again in an unchanged session skips planning (its shortcut lists the
    // table roots only); the same text over another table of the same name, or over a folder
    // with one more file, is planned and runs.
    let unplanned = metric(&cluster, "volley_result_cache_unplanned_hits_total").await;
    let (batches, tasks, _) = run(&client, sum).await;
    assert_eq!((sum_of(&batches), tasks), ("55".to_string(), 0));
    assert_eq!(
        metric(&cluster, "volley_result_cache_unplanned_hits_total").await,
        unplanned + 1,
        "answered without planning"
    );
    let other_table = data.path().join("t2");
    std::fs::create_dir(&other_table).unwrap();
    write_numbers(&other_table.join("part.parquet"), 20).await;
    client.sql("DROP TABLE t").await.unwrap();
    client
        .sql(&format!(
            "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '{}/'",
            other_table.display()
        ))
        .await
        .unwrap();
    let (batches, tasks, _) = run(&client, sum).await;
    assert_eq!(
        (sum_of(&batches), tasks > 0),
        ("210".to_string(), true),
        "another table t"
    );
    write_numbers(&data.path().join("more.parquet"), 3).await;
    std::fs::rename(
        data.path().join("more.parquet"),
        other_table.join("more.parquet"),
    )
    .unwrap();
    let (batches, tasks, _) = run(&client, sum).await;
    assert_eq!(
        (sum_of(&batches), tasks > 0),
        ("216".to_string(), true),
        "a file added to t's folder"
    );
    client
        .sql("CREATE VIEW v AS SELECT sum(a) FROM t")
        .await
        .unwrap();
    for _ in 0..2 {
        let (batches, _, _) = run(&client, "SELECT * FROM v").await;
        assert_eq!(sum_of(&batches), "216");
    }
    client
        .sql("CREATE OR REPLACE VIEW v AS SELECT count(*) FROM t")
        .await
        .unwrap();
    let (batches, tasks, _) = run(&client, "SELECT * FROM v").await;
    assert_eq!(
        (sum_of(&batches), tasks > 0),
        ("23".to_string(), true),
        "the replaced view"
    );
    let (batches, tasks, _) = run(&client, sum).await;
    assert_eq!((sum_of(&batches), tasks), ("216".to_string(), 0));
    // A DDL statement that fails after dropping the old table: the shortcut is not taken.
    let broken = data.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    std::fs::write(broken.join("part.parquet"), b"not parquet").unwrap();
    let replaced = client
        .sql(&format!(
            "CREATE OR REPLACE EXTERNAL TABLE t STORED AS PARQUET LOCATION '{}/'",
            broken.display()
        ))
        .await;
    assert!(replaced.is_err(), "a folder of garbage is no table");
    match client.submit(sum).await {
        Ok(job_id) => {
            let answer = client.sql_job_rows(&job_id).await;
            let tasks = client.status(&job_id).await.map(|s| s.tasks_total);
            assert!(
                answer.is_err() || tasks.is_ok_and(|t| t > 0),
                "not served from the shortcut after a failed DDL"
            );
        }
        Err(e) => assert!(e.to_string().contains("not found"), "{e}"),
    }
    client
        .sql(&format!(
            "CREATE OR REPLACE EXTERNAL TABLE t STORED AS PARQUET LOCATION '{}/'",
            other_table.display()
        ))
        .await
        .unwrap();
    let (batches, _, _) = run(&client, sum).await;
    assert_eq!(sum_of(&batches), "216");

    // A session's TTL: an entry older than it is a miss (and gone).
    let err = client
        .sql("SET volley.result_cache_ttl = 'soon'")
        .await
        .expect_err("not a duration");
    assert!(err.to_string().contains("not a duration"), "{err}");
    client
        .sql("SET volley.result_cache_ttl = '1s'")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (batches, tasks, _) = run(&client, sum).await;
    assert_eq!(
        (sum_of(&batches), tasks > 0),
        ("216".to_string(), true),
        "expired"
    );
    let (_, tasks, _) = run(&client, sum).await;
    assert_eq!(tasks, 0, "stored again");
    client
        .sql("SET volley.result_cache_ttl = '0'")
        .await
        .unwrap();
    let (_, tasks, _) = run(&client, sum).await;
    assert!(tasks > 0, "a TTL of 0 turns the cache off for the session");
    client
        .sql("SET volley.result_cache_ttl = '5m'")
        .await
        .unwrap();

    // Identical queries submitted together: computed once.
    let q3 = tpch::query(3).expect("q3");
    let first = client.submit(&q3).await.unwrap();
    let second = client.submit(&q3).await.unwrap();
    let a = client.sql_job_rows(&first).await.unwrap();
    let b = client.sql_job_rows(&second).await.unwrap();
    let tasks = (
        client.status(&first).await.unwrap().tasks_total,
        client.status(&second).await.unwrap().tasks_total,
    );
    assert!(tasks.0 > 0 && tasks.1 == 0, "one computation: {tasks:?}");
    let local = ctx.sql(&q3).await.unwrap().collect().await.unwrap();
    let expected = rows(&local).unwrap();
    for (batches, what) in [(&a, "q3 computed"), (&b, "q3 waited for")] {
        assert_same_rows(
            &expected,
            &rows(batches).unwrap(),
            &float_columns(&local),
            what,
        );
    }

    // The query waited for is cancelled: the waiting one runs itself.
    let join = "SELECT count(*) FROM lineitem a JOIN lineitem b ON a.l_orderkey = b.l_orderkey";
    let leader = client.submit(join).await.unwrap();
    let follower = client.submit(join).await.unwrap();
    assert!(
        client.cancel(&leader).await.unwrap(),
        "cancelled while running"
    );
    let batches = client.sql_job_rows(&follower).await.unwrap();
    let local = ctx.sql(join).await.unwrap().collect().await.unwrap();
    assert_eq!(rows(&batches).unwrap(), rows(&local).unwrap());
    assert!(
        client.status(&follower).await.unwrap().tasks_total > 0,
        "it ran itself"
    );
}
