//! A job mid-run when the scheduler is SIGKILLed is taken over from its journal when the
//! scheduler restarts on the same `--state-dir`: TPC-H q18 at SF 0.1 on two executor processes
//! completes with DuckDB's rows, and the job's records prove that the stages done before the
//! crash did not run again (they are marked resumed, keep their one attempt and their tasks'
//! attempt numbers from before; the restarted scheduler launched only the rest).

use std::time::Duration;

use serde_json::Value as Json;
use volley_tests::compare::{assert_matches_answer, rows};
use volley_tests::process::ProcessCluster;
use volley_tests::{Hold, http, tpch};

/// Attempt numbers of tasks launched after a job's first resume start here.
const RESUMED_ATTEMPTS: u64 = 1000;

async fn get(url: String) -> Json {
    let (status, body) = http("GET", url.clone(), None).await;
    assert_eq!(status, 200, "{url}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn stages(detail: &Json) -> Vec<Json> {
    detail["stages"].as_array().unwrap().clone()
}

/// Task attempts of stage `stage` of job `job`.
async fn attempts(base: &str, job: &str, stage: u64) -> Vec<u64> {
    let detail = get(format!("{base}/api/jobs/{job}/stages/{stage}")).await;
    detail["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["attempt"].as_u64().unwrap())
        .collect()
}

/// Tasks the scheduler launched since it started (Prometheus counter, all carriers).
async fn launched(base: &str) -> u64 {
    let (status, text) = http("GET", format!("{base}/metrics"), None).await;
    assert_eq!(status, 200);
    text.lines()
        .filter(|l| l.starts_with("volley_tasks_launched_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpch_q18_survives_a_scheduler_crash_without_rerunning_completed_stages() {
    volley_tests::init_tracing();
    let data = tpch::sf01().expect("generate TPC-H");
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().display().to_string();
    let mut cluster = ProcessCluster::start(2, 2, &["--state-dir", &dir])
        .await
        .unwrap();
    let client = cluster.client().await.unwrap();
    for statement in tpch::create_table_statements(&data) {
        client.sql(&statement).await.unwrap();
    }
    let sql = tpch::query(18).unwrap();
    let answer = tpch::answer_path(18);
    let base = cluster.http_url().to_string();

    // A first run shows the stages q18 is cut into; its result stage is held the next time.
    let first = client.submit(&sql).await.unwrap();
    let batches = client.sql_job_rows(&first).await.unwrap();
    assert_matches_answer(&rows(&batches).unwrap(), &answer, 0.011, "q18");
    let result_stage = stages(&get(format!("{base}/api/jobs/{first}")).await)
        .iter()
        .find(|s| s["kind"] == "result")
        .and_then(|s| s["id"].as_u64())
        .expect("a result stage");
    let hold = Hold::new(u32::try_from(result_stage).unwrap()).unwrap();
    client.sql(&hold.set_sql()).await.unwrap();

    let job_id = client.submit(&sql).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let done_before: Vec<Json> = loop {
        let listed = stages(&get(format!("{base}/api/jobs/{job_id}")).await);
        let others_done = listed
            .iter()
            .filter(|s| s["id"] != result_stage)
            .all(|s| s["state"] == "succeeded" || s["state"] == "skipped");
        if others_done {
            break listed
                .into_iter()
                .filter(|s| s["state"] == "succeeded")
                .collect();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the stages before the result stage never finished: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(done_before.len() >= 3, "{done_before:?}");
    let submitted = get(format!("{base}/api/jobs/{job_id}")).await["submitted_at_ms"].clone();
    // Give the journal writer its moment (it batches behind the state transitions).
    tokio::time::sleep(Duration::from_millis(500)).await;

    cluster.restart_scheduler().await.unwrap();
    cluster.wait_for_executors(2).await.unwrap();
    hold.release().unwrap();
    let batches = client.sql_job_rows(&job_id).await.unwrap();
    assert_matches_answer(
        &rows(&batches).unwrap(),
        &answer,
        0.011,
        "q18 resumed after a scheduler crash",
    );

    let detail = get(format!("{base}/api/jobs/{job_id}")).await;
    assert_eq!(
        detail["submitted_at_ms"], submitted,
        "it keeps its submission time"
    );
    let after = stages(&detail);
    let mut result_tasks = 0;
    for stage in &after {
        let id = stage["id"].as_u64().unwrap();
        let before = done_before.iter().find(|s| s["id"] == id);
        let tries = attempts(&base, &job_id, id).await;
        if let Some(before) = before {
            assert_eq!(stage["resumed"], true, "stage {id}: {stage}");
            assert_eq!(stage["attempts"], 1, "stage {id} ran once: {stage}");
            assert_eq!(stage["rows_out"], before["rows_out"], "stage {id}");
            assert!(
                tries.iter().all(|a| *a < RESUMED_ATTEMPTS),
                "stage {id}'s tasks are those from before the crash: {tries:?}"
            );
        } else if id == result_stage {
            assert_eq!(stage["resumed"], false, "{stage}");
            assert!(
                !tries.is_empty() && tries.iter().all(|a| *a >= RESUMED_ATTEMPTS),
                "the result stage ran after the restart: {tries:?}"
            );
            result_tasks = tries.len() as u64;
        }
    }
    // The restarted scheduler launched the result stage's tasks and nothing else.
    assert!(result_tasks > 0);
    assert_eq!(launched(&base).await, result_tasks);
}

/// A plan submitted through the DataFrame API (`ExecutePlan`), mid-run when the scheduler is
/// SIGKILLed, is taken over too: the restarted scheduler decodes the saved plan, and the
/// client gets the exact rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataframe_plan_running_at_a_scheduler_crash_completes_after_the_restart() {
    use datafusion::prelude::{CsvReadOptions, SessionContext};
    volley_tests::init_tracing();
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().display().to_string();
    let mut cluster = ProcessCluster::start(2, 1, &["--state-dir", &dir])
        .await
        .unwrap();
    let client = cluster.client().await.unwrap();
    let local = SessionContext::new_with_config(volley_core::config::volley_session_config(2));
    let data = volley_tests::workspace_root().join("tests/slt/data/sales.csv");
    local
        .register_csv("sales", data.to_str().unwrap(), CsvReadOptions::new())
        .await
        .unwrap();
    let query =
        "SELECT region, count(*) AS n FROM sales GROUP BY region ORDER BY region NULLS LAST";
    let df = local.sql(query).await.unwrap();
    let expected = rows(&df.clone().collect().await.unwrap()).unwrap();
    let plan = df.create_physical_plan().await.unwrap();
    let bytes = volley_core::codec::VolleyCodec::encode_plan(plan).unwrap();
    let hold = Hold::new(2).unwrap();
    let set = hold.set_sql();
    let value = set.split('\'').nth(1).unwrap().to_string();
    let settings = vec![("volley.test_hold_task".to_string(), value)];
    let job_id = client
        .submit_plan(bytes, "DataFrame: sales by region", &settings)
        .await
        .unwrap();
    let base = cluster.http_url().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let listed = stages(&get(format!("{base}/api/jobs/{job_id}")).await);
        if listed
            .iter()
            .any(|s| s["id"] == 1 && s["state"] == "succeeded")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "stage 1 never finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.restart_scheduler().await.unwrap();
    hold.release().unwrap();
    let batches = client.sql_job_rows(&job_id).await.unwrap();
    assert_eq!(rows(&batches).unwrap(), expected);
    let after = stages(&get(format!("{base}/api/jobs/{job_id}")).await);
    let first = after.iter().find(|s| s["id"] == 1).unwrap();
    assert_eq!(first["resumed"], true, "{first}");
}
