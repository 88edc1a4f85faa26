//! Fault tolerance with real processes. Every fault test also runs with retries disabled and
//! must then fail, proving its fault fired. Faults are placed deterministically with the
//! `volley.test_hold_task` / `volley.test_fail_task` hooks: a held stage runs until the test
//! has placed its fault and releases it, so no fault depends on timing.

use std::time::{Duration, Instant};

use datafusion::prelude::SessionContext;
use futures::TryStreamExt;
use volley::VolleyClient;
use volley_core::config::volley_session_config;
use volley_core::protobuf::JobRecord;
use volley_tests::Hold;
use volley_tests::compare::{Row, assert_same_rows, float_columns, rows};
use volley_tests::process::ProcessCluster;
use volley_tests::tpch;

const QUERY: usize = 3;

async fn expected() -> (Vec<Row>, Vec<bool>) {
    let dir = tpch::sf01().unwrap();
    let ctx = SessionContext::new_with_config(volley_session_config(4));
    tpch::register_local(&ctx, &dir).await.unwrap();
    let batches = ctx
        .sql(&tpch::query(QUERY).unwrap())
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    (rows(&batches).unwrap(), float_columns(&batches))
}

pub(super) async fn cluster(executors: usize, retries: bool) -> (ProcessCluster, VolleyClient) {
    let attempts = if retries { "4" } else { "1" };
    cluster_with(executors, attempts, attempts).await
}

async fn cluster_with(
    executors: usize,
    task_attempts: &str,
    stage_attempts: &str,
) -> (ProcessCluster, VolleyClient) {
    let cluster = ProcessCluster::start(
        executors,
        2,
        &[
            "--executor-timeout-secs",
            "2",
            "--task-max-attempts",
            task_attempts,
            "--stage-max-attempts",
            stage_attempts,
        ],
    )
    .await
    .unwrap();
    let client = cluster.client().await.unwrap();
    for statement in tpch::create_table_statements(&tpch::sf01().unwrap()) {
        client.sql(&statement).await.unwrap();
    }
    (cluster, client)
}

async fn job(client: &VolleyClient, job_id: &str) -> JobRecord {
    volley_tests::job_record(client, job_id).await.unwrap()
}

pub(super) async fn wait_for(
    client: &VolleyClient,
    job_id: &str,
    what: &str,
    ready: impl Fn(&JobRecord) -> bool,
) -> JobRecord {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let record = job(client, job_id).await;
        if ready(&record) {
            return record;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {record:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn running_on(record: &JobRecord, stage: u32) -> Option<String> {
    record
        .tasks
        .iter()
        .find(|t| t.state == "running" && t.task.as_ref().is_some_and(|id| id.stage_id == stage))
        .map(|t| t.executor_id.clone())
}

pub(super) async fn result(client: &VolleyClient, job_id: String) -> Result<Vec<Row>, String> {
    let (_, stream) = client.fetch(job_id).await.map_err(|e| e.to_string())?;
    let batches: Vec<_> = stream.try_collect().await.map_err(|e| e.to_string())?;
    Ok(rows(&batches).unwrap())
}

/// Id of the first stage that ends in a hash shuffle, from Volley's EXPLAIN.
async fn first_shuffle_stage(client: &VolleyClient) -> u32 {
    let (_, plan) = client
        .sql(&format!("EXPLAIN {}", tpch::query(QUERY).unwrap()))
        .await
        .unwrap();
    let lines = rows(&plan).unwrap();
    let line = lines
        .iter()
        .map(|r| r[0].clone())
        .find(|l| l.contains("kind=shuffle"))
        .expect("the query has a hash shuffle");
    line.trim_start_matches("Stage ")
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Hold the first shuffle stage, submit the query, wait until a task of that stage runs;
/// returns (job id, the executor running it, the hold to release once the fault is placed).
async fn start_held_job(client: &VolleyClient) -> (String, String, Hold) {
    let stage = first_shuffle_stage(client).await;
    let hold = Hold::new(stage).unwrap();
    client.sql(&hold.set_sql()).await.unwrap();
    let job_id = client.submit(&tpch::query(QUERY).unwrap()).await.unwrap();
    let record = wait_for(client, &job_id, "shuffle stage running", |j| {
        running_on(j, stage).is_some()
    })
    .await;
    let victim = running_on(&record, stage).unwrap();
    (job_id, victim, hold)
}

/// The state the status page's JSON API gives executor `id` (`alive`, `draining`, ...).
async fn executor_state(cluster: &ProcessCluster, id: &str) -> Option<String> {
    let url = format!("{}/api/executors", cluster.http_url());
    let body = tokio::task::spawn_blocking(move || {
        ureq::get(&url)
            .call()
            .ok()?
            .body_mut()
            .read_to_string()
            .ok()
    })
    .await
    .unwrap()?;
    let executors: serde_json::Value = serde_json::from_str(&body).ok()?;
    executors
        .as_array()?
        .iter()
        .find(|e| e["id"] == id)
        .and_then(|e| e["state"].as_str().map(str::to_string))
}

/// Ids of the executors the scheduler considers alive.
async fn live_executor_ids(client: &VolleyClient) -> Vec<String> {
    client
        .cluster_state()
        .await
        .unwrap()
        .executors
        .into_iter()
        .map(|e| e.id)
        .collect()
}

/// Wait until `executor_id` is no longer a live executor of the cluster.
async fn wait_until_gone(client: &VolleyClient, executor_id: &str, seconds: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while live_executor_ids(client)
        .await
        .iter()
        .any(|id| id == executor_id)
    {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A fault scenario gives the exact answer with retries on and fails with them off.
async fn exact_with_retries_fails_without<F, Fut>(scenario: F, what: &str, failure: &str)
where
    F: Fn(bool) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<Row>, String>>,
{
    volley_tests::init_tracing();
    let (expected, floats) = expected().await;
    let actual = scenario(true)
        .await
        .unwrap_or_else(|e| panic!("{what}: the query must survive: {e}"));
    assert_same_rows(&expected, &actual, &floats, what);
    let err = scenario(false)
        .await
        .expect_err("without retries the fault fails the job");
    assert!(err.contains(failure), "{what}: {err}");
}

/// SIGKILL one of 3 executors while a stage (which ends in a hash shuffle) runs on it.
async fn kill_in_map_stage(retries: bool) -> Result<Vec<Row>, String> {
    let (mut cluster, client) = cluster(3, retries).await;
    let (job_id, victim, hold) = start_held_job(&client).await;
    let index = cluster.executor_index(&victim).await.unwrap();
    cluster.kill_executor(index).unwrap();
    hold.release().unwrap();
    result(&client, job_id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_executor_during_shuffle_stage_keeps_exact_answer() {
    exact_with_retries_fails_without(kill_in_map_stage, "q3 after SIGKILL", "was lost").await;
}

/// SIGKILL the executor holding finished map output while the consumer stage waits to read it
/// (with its work dir too when `disk`). `memory` false writes every map output to a file.
async fn kill_after_map_output(
    retries: bool,
    disk: bool,
    memory: bool,
) -> Result<(Vec<Row>, u32), String> {
    // Stage 2 is held until stage 1's output is gone.
    let (rows, record) = kill_producer_of_held_stage(retries, disk, memory, 1, 2).await?;
    Ok((rows, attempts(&record, 1)))
}

fn attempts(record: &JobRecord, stage: u32) -> u32 {
    record
        .stages
        .iter()
        .find(|s| s.stage_id == stage)
        .unwrap()
        .attempts
}

/// SIGKILL the executor holding output of stage `producer` (done) while stage `held` runs,
/// held until the output is gone; returns the rows and the job's record at the end.
async fn kill_producer_of_held_stage(
    retries: bool,
    disk: bool,
    memory: bool,
    producer: u32,
    held: u32,
) -> Result<(Vec<Row>, JobRecord), String> {
    let (mut cluster, client) = cluster(3, retries).await;
    if !memory {
        client
            .sql("SET volley.shuffle_memory_task_bytes = 0")
            .await
            .unwrap();
    }
    let hold = Hold::new(held).unwrap();
    client.sql(&hold.set_sql()).await.unwrap();
    let job_id = client.submit(&tpch::query(QUERY).unwrap()).await.unwrap();
    let what = format!("stage {producer} done, stage {held} running");
    let record = wait_for(&client, &job_id, &what, |j| {
        j.stages
            .iter()
            .any(|s| s.stage_id == producer && s.state == "succeeded")
            && running_on(j, held).is_some()
    })
    .await;
    let holder = record
        .tasks
        .iter()
        .find(|t| t.task.as_ref().is_some_and(|id| id.stage_id == producer))
        .map(|t| t.executor_id.clone())
        .unwrap();
    let index = cluster.executor_index(&holder).await.unwrap();
    // Killing the process alone leaves its files readable by executors on this host (not
    // the outputs it held in memory).
    if disk {
        cluster.kill_executor_and_disk(index).unwrap();
    } else {
        cluster.kill_executor(index).unwrap();
    }
    hold.release().unwrap();
    let rows = result(&client, job_id.clone()).await?;
    Ok((rows, job(&client, &job_id).await))
}

/// q3 at SF 0.1: stage 3 (the sort of the final aggregate, one task on little input) is fused
/// into the result stage 4, whose one task reads stage 2's output itself. Losing that output
/// while the fused task waits re-runs stage 2 and the answer stays exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_input_of_a_fused_stage_reruns_its_producer() {
    volley_tests::init_tracing();
    let (expected, floats) = expected().await;
    let (actual, record) = kill_producer_of_held_stage(true, true, false, 2, 4)
        .await
        .expect("query survives the kill");
    assert_same_rows(
        &expected,
        &actual,
        &floats,
        "q3 after losing a fused stage's input",
    );
    let state = |id: u32| {
        record
            .stages
            .iter()
            .find(|s| s.stage_id == id)
            .map(|s| s.state.clone())
    };
    assert_eq!(
        state(3).as_deref(),
        Some("skipped"),
        "stage 3 was fused into 4"
    );
    assert!(
        !record
            .tasks
            .iter()
            .any(|t| t.task.as_ref().is_some_and(|id| id.stage_id == 3)),
        "stage 3 ran no task of its own"
    );
    assert!(attempts(&record, 2) >= 2, "stage 2 ran again");
    let err = kill_producer_of_held_stage(false, true, false, 2, 4)
        .await
        .expect_err("without retries the lost output fails the job");
    assert!(err.contains("lost"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_executor_holding_map_output_reruns_the_map_stage() {
    volley_tests::init_tracing();
    let (expected, floats) = expected().await;
    let (actual, attempts) = kill_after_map_output(true, true, false)
        .await
        .expect("query survives the kill");
    assert_same_rows(&expected, &actual, &floats, "q3 after losing map output");
    assert!(attempts >= 2, "stage 1 ran again (attempts = {attempts})");
    let err = kill_after_map_output(false, true, false)
        .await
        .expect_err("without retries the lost output fails the job");
    assert!(err.contains("lost"), "{err}");
}

/// Map output held in the executor's memory (the default for small outputs) goes with its
/// process although its disk survives: the map stage runs again and the answer is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_executor_holding_in_memory_map_output_reruns_the_map_stage() {
    volley_tests::init_tracing();
    let (expected, floats) = expected().await;
    let (actual, attempts) = kill_after_map_output(true, false, true)
        .await
        .expect("query survives the kill");
    assert_same_rows(
        &expected,
        &actual,
        &floats,
        "q3 after losing in-memory output",
    );
    assert!(attempts >= 2, "stage 1 ran again (attempts = {attempts})");
    let err = kill_after_map_output(false, false, true)
        .await
        .expect_err("without retries the lost in-memory output fails the job");
    assert!(err.contains("lost"), "{err}");
}

/// SIGSTOP an executor until the scheduler gives its tasks to others, then SIGCONT it.
async fn stop_and_continue(retries: bool) -> Result<Vec<Row>, String> {
    let (cluster, client) = cluster(3, retries).await;
    let (job_id, victim, hold) = start_held_job(&client).await;
    let index = cluster.executor_index(&victim).await.unwrap();
    cluster.signal_executor(index, "STOP").unwrap();
    wait_until_gone(&client, &victim, 20, "stopped executor never declared lost").await;
    // The retries elsewhere run; so does the stopped executor's stale attempt once continued.
    hold.release().unwrap();
    cluster.signal_executor(index, "CONT").unwrap();
    result(&client, job_id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_executor_tasks_retried_elsewhere_rows_counted_once() {
    exact_with_retries_fails_without(stop_and_continue, "q3 after SIGSTOP/SIGCONT", "was lost")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_all_executors_fails_the_query_clearly_within_30s() {
    volley_tests::init_tracing();
    let (mut cluster, client) = cluster(2, true).await;
    // Stage 1 is held (never released): both executors die with it running.
    let hold = Hold::new(1).unwrap();
    client.sql(&hold.set_sql()).await.unwrap();
    let job_id = client.submit(&tpch::query(QUERY).unwrap()).await.unwrap();
    wait_for(&client, &job_id, "stage 1 running", |j| {
        running_on(j, 1).is_some()
    })
    .await;
    let killed = Instant::now();
    cluster.kill_executor(0).unwrap();
    cluster.kill_executor(1).unwrap();
    let err = result(&client, job_id)
        .await
        .expect_err("no executors: the job fails");
    let elapsed = killed.elapsed();
    assert!(
        elapsed < Duration::from_secs(30),
        "failed after {elapsed:?}"
    );
    assert!(err.contains("no executors alive"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_an_executor_its_tasks_finish_and_it_leaves() {
    volley_tests::init_tracing();
    let (expected, floats) = expected().await;
    // One attempt per task: a task killed by the shutdown would fail the job. Map output the
    // executor held when it left is recomputed (stage re-runs are allowed).
    let (cluster, client) = cluster_with(3, "1", "4").await;
    let (job_id, victim, hold) = start_held_job(&client).await;
    // The scheduler counts a task running once it launched it: wait until it runs there (a
    // TERM before the launch arrives would drain an idle executor, gone before it is seen).
    let deadline = Instant::now() + Duration::from_secs(20);
    while !hold.reached_on(&victim) {
        assert!(
            Instant::now() < deadline,
            "the held task never ran on {victim}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let index = cluster.executor_index(&victim).await.unwrap();
    cluster.signal_executor(index, "TERM").unwrap();
    // Its held task is still running when the drain starts; then it may finish.
    let deadline = Instant::now() + Duration::from_secs(20);
    while executor_state(&cluster, &victim).await.as_deref() != Some("draining") {
        assert!(Instant::now() < deadline, "executor never drained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    hold.release().unwrap();
    let actual = result(&client, job_id.clone())
        .await
        .expect("query survives the drain");
    assert_same_rows(&expected, &actual, &floats, "q3 with a draining executor");
    wait_until_gone(&client, &victim, 40, "drained executor never deregistered").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_executor_registers_under_a_new_id_and_gets_work() {
    volley_tests::init_tracing();
    let (expected, floats) = expected().await;
    let (mut cluster, client) = cluster(2, true).await;
    let before = live_executor_ids(&client).await;
    cluster.kill_executor(0).unwrap();
    cluster.add_executor(2).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let new_id = loop {
        let ids = live_executor_ids(&client).await;
        let fresh: Vec<&String> = ids.iter().filter(|id| !before.contains(id)).collect();
        if ids.len() == 2 && fresh.len() == 1 {
            break fresh[0].clone();
        }
        assert!(
            Instant::now() < deadline,
            "restart not visible: {ids:?} (before {before:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let job_id = client.submit(&tpch::query(QUERY).unwrap()).await.unwrap();
    let actual = result(&client, job_id.clone()).await.unwrap();
    assert_same_rows(&expected, &actual, &floats, "q3 after a restart");
    let record = job(&client, &job_id).await;
    assert!(
        record.tasks.iter().any(|t| t.executor_id == new_id),
        "the new executor ran tasks"
    );
}

/// A small result comes back inside its task's status report and the job status answer, so
/// the client reads it from the scheduler: it is still there once every executor is gone.
/// With `volley.inline_result_bytes = 0` the rows stay on the executors and go with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_result_is_read_from_the_scheduler_after_its_executors_are_gone() {
    volley_tests::init_tracing();
    let (expected, floats) = expected().await;
    let sql = tpch::query(QUERY).unwrap();
    for inline in [true, false] {
        let (mut cluster, client) = cluster(2, true).await;
        if !inline {
            client
                .sql("SET volley.inline_result_bytes = 0")
                .await
                .unwrap();
        }
        let job_id = client.submit(&sql).await.unwrap();
        let done = client.wait(&job_id).await.unwrap();
        assert_eq!(!done.inline_result.is_empty(), inline, "inline: {inline}");
        cluster.kill_executor(0).unwrap();
        cluster.kill_executor(1).unwrap();
        match (inline, result(&client, job_id.clone()).await) {
            (true, Ok(actual)) => assert_same_rows(&expected, &actual, &floats, "inline result"),
            (false, Err(e)) => assert!(e.contains("executor"), "{e}"),
            (inline, other) => panic!("inline {inline}: {other:?}"),
        }
        if inline {
            // Released with the answer that carried it, a small answer stays with the job: a
            // client whose reply was lost asks again and still gets it.
            let again = result(&client, job_id).await.expect("asked again");
            assert_same_rows(&expected, &again, &floats, "inline result asked again");
        }
    }
}

/// An inline answer over 64 KiB is not released with the status answer that carries it: the
/// client releases the job once it has read the rows, and the released job drops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bigger_inline_result_is_released_by_the_client_after_reading_it() {
    volley_tests::init_tracing();
    let (_cluster, client) = cluster(2, true).await;
    let job_id = client
        .submit("SELECT * FROM lineitem ORDER BY l_orderkey, l_linenumber LIMIT 1000")
        .await
        .unwrap();
    let done = client.wait(&job_id).await.unwrap();
    let bytes = done.inline_result.len();
    assert!(
        (64 * 1024..256 * 1024).contains(&bytes),
        "{bytes} bytes inline"
    );
    let rows = result(&client, job_id.clone()).await.expect("rows");
    assert_eq!(rows.len(), 1000);
    let err = result(&client, job_id)
        .await
        .expect_err("released by the client");
    assert!(err.contains("was read and released"), "{err}");
}
