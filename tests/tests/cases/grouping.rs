//! A stage that builds a broadcast hash table runs all its partitions in one task when each
//! executor slot has the cores for them (`volley executor --cores` over `--slots`), building
//! the table once; with real processes, answers compared with single-node DataFusion. The
//! fault test kills the executor running such a task: with retries the task runs again
//! elsewhere and the answer stays exact, without them the job fails.

use std::time::{Duration, Instant};

use datafusion::prelude::SessionContext;
use volley::VolleyClient;
use volley_core::protobuf::JobRecord;
use volley_tests::Hold;
use volley_tests::compare::rows;
use volley_tests::process::{ProcessCluster, ProcessOptions};
use volley_tests::tpch;

/// `lineitem` probing a two-month slice of `orders` that each join task scans and hashes
/// itself (a `CollectLeft` join inside stage 1).
const JOIN: &str = "SELECT count(*) AS n, sum(l_quantity) AS qty, sum(o_totalprice) AS price \
     FROM lineitem JOIN orders ON l_orderkey = o_orderkey \
     WHERE o_orderdate < DATE '1992-03-01'";

async fn local() -> Vec<Vec<String>> {
    let dir = tpch::sf01().unwrap();
    let ctx = SessionContext::new();
    tpch::register_local(&ctx, &dir).await.unwrap();
    rows(&ctx.sql(JOIN).await.unwrap().collect().await.unwrap()).unwrap()
}

/// 2 executors x 1 slot, each saying its tasks share `cores` cores.
async fn start(cores: usize, attempts: &str) -> (ProcessCluster, VolleyClient) {
    let options = ProcessOptions {
        env: vec![("VOLLEY_EXECUTOR_CORES".to_string(), cores.to_string())],
        ..ProcessOptions::default()
    };
    let args = volley_tests::process::fault_args(attempts);
    let cluster = ProcessCluster::start_with(2, 1, &args, options)
        .await
        .unwrap();
    let client = cluster.client().await.unwrap();
    client
        .sql("SET volley.result_cache_ttl = '0'")
        .await
        .unwrap();
    for statement in tpch::create_table_statements(&tpch::sf01().unwrap()) {
        client.sql(&statement).await.unwrap();
    }
    (cluster, client)
}

async fn record(client: &VolleyClient, job_id: &str) -> JobRecord {
    volley_tests::job_record(client, job_id).await.unwrap()
}

/// Runs `JOIN`; returns its rows and stage 1's task count.
async fn run(client: &VolleyClient) -> (Vec<Vec<String>>, u32) {
    let job_id = client.submit(JOIN).await.unwrap();
    let batches = client.sql_job_rows(&job_id).await.unwrap();
    let record = record(client, &job_id).await;
    let stage = record.stages.iter().find(|s| s.stage_id == 1).unwrap();
    assert_eq!(stage.state, "succeeded");
    (rows(&batches).unwrap(), stage.partitions)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_join_stage_runs_in_one_task_when_a_slot_has_the_cores() {
    volley_tests::init_tracing();
    let expected = local().await;
    let (cluster, client) = start(2, "4").await;
    let (_, explain) = client.sql(&format!("EXPLAIN {JOIN}")).await.unwrap();
    let lines: Vec<String> = rows(&explain)
        .unwrap()
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    assert!(
        lines[0].starts_with("Stage 1: kind=merge partitions=1 inputs=[]")
            && lines[0].contains("CoalescePartitionsExec <- AggregateExec <- HashJoinExec"),
        "{lines:#?}"
    );
    assert_eq!(run(&client).await, (expected.clone(), 1));
    client
        .sql("SET volley.group_broadcast_tasks = false")
        .await
        .unwrap();
    assert_eq!(run(&client).await, (expected.clone(), 2));
    drop(cluster);
    // One core per slot: one task per partition.
    let (cluster, client) = start(1, "4").await;
    assert_eq!(run(&client).await, (expected, 2));
    drop(cluster);
}

/// SIGKILL the executor running stage 1's one (grouped) task, held until the kill.
async fn kill_grouped_task(retries: bool) -> Result<Vec<Vec<String>>, String> {
    let (mut cluster, client) = start(2, if retries { "4" } else { "1" }).await;
    let hold = Hold::new(1).unwrap();
    client.sql(&hold.set_sql()).await.unwrap();
    let job_id = client.submit(JOIN).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let victim = loop {
        let record = record(&client, &job_id).await;
        let running = record
            .tasks
            .iter()
            .find(|t| t.state == "running" && t.task.as_ref().is_some_and(|id| id.stage_id == 1));
        if let Some(task) = running {
            let stage = record.stages.iter().find(|s| s.stage_id == 1).unwrap();
            assert_eq!(stage.partitions, 1, "stage 1 runs as one task");
            break task.executor_id.clone();
        }
        assert!(Instant::now() < deadline, "stage 1 never ran: {record:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    cluster.kill_executor_id(&victim).await.unwrap();
    hold.release().unwrap();
    let result = volley_tests::job_rows(&client, &job_id).await;
    drop(cluster);
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_executor_of_a_grouped_task_runs_it_again_elsewhere() {
    volley_tests::init_tracing();
    let expected = local().await;
    let actual = kill_grouped_task(true).await.expect("the query survives");
    assert_eq!(actual, expected);
    let err = kill_grouped_task(false)
        .await
        .expect_err("without retries the kill fails the job");
    assert!(err.contains("was lost"), "{err}");
}
