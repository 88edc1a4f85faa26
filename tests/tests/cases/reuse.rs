//! Identical stages run once (`volley.reuse_stages`): TPC-H q15 plans its `revenue0` view
//! twice (the join and the `max` subquery), and the `lineitem` stage under it runs once for
//! both readers; with real processes, answers compared with single-node DataFusion. The fault
//! test kills an executor holding that shared stage's output while one of its readers waits:
//! with retries the lost output is computed again and both readers get exact rows, without
//! them the job fails.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use datafusion::prelude::SessionContext;
use volley::VolleyClient;
use volley_tests::Hold;
use volley_tests::compare::rows;
use volley_tests::process::ProcessCluster;
use volley_tests::tpch;

async fn local(sql: &str) -> Vec<Vec<String>> {
    let dir = tpch::sf01().unwrap();
    let ctx = SessionContext::new();
    tpch::register_local(&ctx, &dir).await.unwrap();
    let mut out = Vec::new();
    for statement in sql.split(';').filter(|s| !s.trim().is_empty()) {
        out = rows(&ctx.sql(statement).await.unwrap().collect().await.unwrap()).unwrap();
    }
    out
}

/// q15 as one statement (its view inlined as a CTE by the test data's query file).
fn q15() -> String {
    tpch::query(15).unwrap()
}

/// 2 executors x 1 slot; fusion off, so every planned stage runs as a stage of its own.
async fn start(attempts: &str) -> (ProcessCluster, VolleyClient) {
    let args = volley_tests::process::fault_args(attempts);
    let cluster = ProcessCluster::start_with(2, 1, &args, Default::default())
        .await
        .unwrap();
    let client = cluster.client().await.unwrap();
    for setting in [
        "SET volley.result_cache_ttl = '0'",
        "SET volley.adaptive_fuse_bytes = 0",
    ] {
        client.sql(setting).await.unwrap();
    }
    for statement in tpch::create_table_statements(&tpch::sf01().unwrap()) {
        client.sql(&statement).await.unwrap();
    }
    (cluster, client)
}

/// Planned stages from EXPLAIN: stage id -> its inputs.
async fn planned(client: &VolleyClient, sql: &str) -> BTreeMap<u32, Vec<u32>> {
    let (_, explain) = client.sql(&format!("EXPLAIN {sql}")).await.unwrap();
    let mut stages = BTreeMap::new();
    for line in rows(&explain).unwrap().into_iter().map(|r| r[0].clone()) {
        let Some(rest) = line.strip_prefix("Stage ") else {
            continue;
        };
        let id: u32 = rest.split(':').next().unwrap().parse().unwrap();
        let inputs = line
            .split("inputs=[")
            .nth(1)
            .unwrap()
            .split(']')
            .next()
            .unwrap();
        let inputs = inputs
            .split([' ', ','])
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect();
        stages.insert(id, inputs);
    }
    stages
}

/// The first stage read by two others, and those readers.
fn shared(stages: &BTreeMap<u32, Vec<u32>>) -> Option<(u32, Vec<u32>)> {
    stages.keys().find_map(|id| {
        let readers: Vec<u32> = stages
            .iter()
            .filter(|(_, inputs)| inputs.contains(id))
            .map(|(reader, _)| *reader)
            .collect();
        (readers.len() >= 2).then_some((*id, readers))
    })
}

async fn run(client: &VolleyClient, sql: &str) -> Vec<Vec<String>> {
    let (_, batches) = client.sql(sql).await.unwrap();
    rows(&batches).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_planned_twice_runs_its_stages_once() {
    volley_tests::init_tracing();
    let sql = q15();
    let expected = local(&sql).await;
    let (cluster, client) = start("4").await;
    let reused = planned(&client, &sql).await;
    let (stage, readers) = shared(&reused).expect("a stage with two readers");
    assert_eq!(readers.len(), 2, "stage {stage}: {reused:?}");
    assert_eq!(run(&client, &sql).await, expected);
    client.sql("SET volley.reuse_stages = false").await.unwrap();
    let separate = planned(&client, &sql).await;
    assert_eq!(shared(&separate), None, "{separate:?}");
    assert!(separate.len() > reused.len(), "{separate:?} vs {reused:?}");
    assert_eq!(run(&client, &sql).await, expected);
    drop(cluster);
}

/// Hold one reader of the shared stage, kill an executor holding the shared stage's output
/// once that reader's task waits, then let it go.
/// Returns the rows and the shared stage's attempts.
async fn kill_shared_output(retries: bool) -> Result<(Vec<Vec<String>>, u32), String> {
    let sql = q15();
    let (mut cluster, client) = start(if retries { "4" } else { "1" }).await;
    let (stage, readers) = shared(&planned(&client, &sql).await).unwrap();
    let hold = Hold::new(readers[0]).unwrap();
    client.sql(&hold.set_sql()).await.unwrap();
    let job_id = client.submit(&sql).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let victim = loop {
        let record = volley_tests::job_record(&client, &job_id).await.unwrap();
        let of = |id: u32| {
            record
                .tasks
                .iter()
                .filter(move |t| t.task.as_ref().is_some_and(|t| t.stage_id == id))
        };
        let held = of(readers[0]).any(|t| t.state == "running");
        let done = of(stage).find(|t| t.state == "succeeded");
        if held && let Some(done) = done {
            break done.executor_id.clone();
        }
        assert!(Instant::now() < deadline, "never held: {record:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    cluster.kill_executor_id(&victim).await.unwrap();
    hold.release().unwrap();
    let result = async {
        let rows = volley_tests::job_rows(&client, &job_id).await?;
        let record = volley_tests::job_record(&client, &job_id).await.unwrap();
        let attempts = record
            .stages
            .iter()
            .find(|s| s.stage_id == stage)
            .map_or(0, |s| s.attempts);
        Ok((rows, attempts))
    }
    .await;
    drop(cluster);
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_shared_stage_output_is_computed_again_for_its_readers() {
    volley_tests::init_tracing();
    let expected = local(&q15()).await;
    let (actual, attempts) = kill_shared_output(true).await.expect("the query survives");
    assert_eq!(actual, expected);
    assert!(
        attempts >= 2,
        "the shared stage ran again: {attempts} attempts"
    );
    let err = kill_shared_output(false)
        .await
        .expect_err("without retries the kill fails the job");
    assert!(err.contains("lost"), "{err}");
}
