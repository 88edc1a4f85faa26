//! Idle start with real processes: a stage waiting for a semi-join reduction's keys starts
//! unfiltered while the one-task keys stage runs (`volley.adaptive_idle_start`), and a fault in
//! it is retried like any other task's.

use datafusion::prelude::SessionContext;
use volley::VolleyClient;
use volley_core::config::volley_session_config;
use volley_tests::Hold;
use volley_tests::compare::{Row, assert_same_rows, float_columns, rows};
use volley_tests::tpch;

use super::faults::{cluster, result, wait_for};

/// A partitioned join (no broadcast by estimate) of filtered `nation` keys (one task) with
/// `nation` rows cut down by a filter and aggregated by those keys: a semi-join reduction
/// candidate for the aggregating stage, which scans no more than the keys stage.
const SQL: &str = "SELECT n_name, c.n FROM nation \
    JOIN (SELECT n_regionkey AS k, count(*) AS n FROM nation WHERE n_nationkey > 2 \
    GROUP BY n_regionkey) c ON c.k = n_regionkey WHERE n_name LIKE 'A%'";

/// Plan joins as partitioned whatever the estimates say.
const PARTITIONED: [&str; 2] = [
    "SET datafusion.optimizer.hash_join_single_partition_threshold = 0",
    "SET datafusion.optimizer.hash_join_single_partition_threshold_rows = 0",
];

/// (keys stage, filtered stage) of [`SQL`], from Volley's EXPLAIN.
async fn reduction(client: &VolleyClient) -> (u32, u32) {
    let (_, plan) = client.sql(&format!("EXPLAIN {SQL}")).await.unwrap();
    let text: Vec<String> = rows(&plan)
        .unwrap()
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    let text = text.join("\n");
    let (_, rest) = text
        .split_once("filter stage ")
        .unwrap_or_else(|| panic!("a semi-join reduction candidate: {text}"));
    let (filtered, rest) = rest.split_once(" by the join keys of stage ").unwrap();
    let keys = rest.split(' ').next().unwrap();
    (keys.parse().unwrap(), filtered.parse().unwrap())
}

/// Hold the keys stage and fail the first attempt of the filtered stage's first task: the
/// filtered stage runs (and is retried) to the end while its keys stage is still held.
async fn fail_the_idle_started_stage(retries: bool) -> Result<Vec<Row>, String> {
    let (_cluster, client) = cluster(2, retries).await;
    for sql in PARTITIONED {
        client.sql(sql).await.unwrap();
    }
    let (keys, filtered) = reduction(&client).await;
    let hold = Hold::new(keys).unwrap();
    client.sql(&hold.set_sql()).await.unwrap();
    client
        .sql(&format!("SET volley.test_fail_task = '{filtered}:0:1'"))
        .await
        .unwrap();
    let job_id = client.submit(SQL).await.unwrap();
    let what = format!("stage {filtered} done (or the job failed) while stage {keys} is held");
    let record = wait_for(&client, &job_id, &what, |j| {
        j.state == "failed"
            || j.stages
                .iter()
                .any(|s| s.stage_id == filtered && s.state == "succeeded")
    })
    .await;
    assert!(
        record
            .stages
            .iter()
            .any(|s| s.stage_id == keys && s.state != "succeeded"),
        "the keys stage is still held: {record:?}"
    );
    hold.release().unwrap();
    result(&client, job_id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_started_while_slots_were_idle_is_retried_and_exact() {
    volley_tests::init_tracing();
    let ctx = SessionContext::new_with_config(volley_session_config(4));
    tpch::register_local(&ctx, &tpch::sf01().unwrap())
        .await
        .unwrap();
    for sql in PARTITIONED {
        ctx.sql(sql).await.unwrap();
    }
    let local = ctx.sql(SQL).await.unwrap().collect().await.unwrap();
    // No ORDER BY: the rows are compared sorted.
    let mut expected = rows(&local).unwrap();
    expected.sort();
    assert_eq!(expected.len(), 2, "{expected:?}");
    let mut actual = fail_the_idle_started_stage(true)
        .await
        .expect("the retried task gives the answer");
    actual.sort();
    assert_same_rows(
        &expected,
        &actual,
        &float_columns(&local),
        "semi join after idle start",
    );
    let err = fail_the_idle_started_stage(false)
        .await
        .expect_err("without retries the fault fails the job");
    assert!(err.contains("injected fault"), "{err}");
}
