//! Tables on a real S3 server (moto on 127.0.0.1) read by a cluster of separate "hosts":
//! the scheduler on 127.0.0.1, executors on 127.0.0.2 and 127.0.0.3 with their own work dirs,
//! tables only in the bucket. TPC-H SF0.1 equals DuckDB's answers (also with an executor
//! SIGKILLed mid-query), shuffle files cross hosts over Flight, bad input fails clearly and
//! secrets given in OPTIONS appear nowhere; `COPY ... TO 's3://...'` writes from every task and
//! leaves exactly one set of files when a writing task fails after writing.

use std::path::Path;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use volley::VolleyClient;
use volley_core::protobuf::JobRecord;
use volley_tests::compare::{Row, assert_matches_answer, rows};
use volley_tests::process::{ProcessCluster, ProcessOptions};
use volley_tests::s3::S3Server;
use volley_tests::tpch;
use volley_tests::{Hold, http};

pub(super) const BUCKET: &str = "lake";
pub(super) const PREFIX: &str = "tpch/sf0.1";

/// A moto server holding TPC-H SF0.1 under `s3://lake/tpch/sf0.1/<table>/`.
pub(super) async fn lake() -> S3Server {
    let s3 = S3Server::start(&[BUCKET]).expect("start moto_server");
    let files = s3
        .upload_dir(BUCKET, PREFIX, &tpch::sf01().expect("generate TPC-H"))
        .await
        .expect("upload TPC-H");
    assert!(files >= 8, "uploaded {files} files");
    s3
}

/// Scheduler + 2 executors on two other "hosts", allowed to read only the TPC-H prefix.
pub(super) async fn three_hosts(
    s3: &S3Server,
    env: Vec<(String, String)>,
    attempts: &str,
) -> ProcessCluster {
    let root = format!("s3://{BUCKET}/{PREFIX}");
    let log_dir = tempfile::Builder::new()
        .prefix("volley-s3-logs-")
        .tempdir()
        .unwrap()
        .keep();
    let options = ProcessOptions {
        env,
        executor_hosts: vec!["127.0.0.2".into(), "127.0.0.3".into()],
        log_dir: Some(log_dir),
        ..ProcessOptions::default()
    };
    let _ = s3;
    let args = [
        "--allowed-path",
        root.as_str(),
        // Allowed, but not on the server: reads get the server's "no such bucket".
        "--allowed-path",
        "s3://nosuchbucket",
        // Where COPY writes.
        "--allowed-path",
        "s3://lake/out",
        "--executor-timeout-secs",
        "3",
        "--task-max-attempts",
        attempts,
        "--stage-max-attempts",
        attempts,
    ];
    ProcessCluster::start_with(2, 2, &args, options)
        .await
        .expect("start cluster")
}

pub(super) async fn register(client: &VolleyClient, options: &str) {
    for t in tpch::TABLES {
        client
            .sql(&format!(
                "CREATE EXTERNAL TABLE {t} STORED AS PARQUET LOCATION 's3://{BUCKET}/{PREFIX}/{t}/' {options}"
            ))
            .await
            .unwrap_or_else(|e| panic!("register {t}: {e}"));
    }
}

pub(super) async fn run(client: &VolleyClient, sql: &str) -> Result<Vec<Row>, String> {
    let (_, batches) = client.sql(sql).await.map_err(|e| e.to_string())?;
    Ok(rows(&batches).unwrap())
}

pub(super) async fn job(client: &VolleyClient, job_id: &str) -> JobRecord {
    let state = client.cluster_state().await.unwrap();
    state.jobs.into_iter().find(|j| j.job_id == job_id).unwrap()
}

/// Objects under `prefix` once the writing job's temporary objects are gone (its commit
/// manifest goes when the job is released, just after its result was read).
pub(super) async fn settled_objects(s3: &S3Server, prefix: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let objects = s3.list(BUCKET, prefix).await.unwrap();
        if !objects.iter().any(|o| o.contains("_volley_temporary")) {
            return objects;
        }
        assert!(
            Instant::now() < deadline,
            "temporary objects left: {objects:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sum of every `key` number anywhere in a JSON document.
fn sum_of(value: &serde_json::Value, key: &str) -> u64 {
    match value {
        serde_json::Value::Object(map) => map
            .iter()
            .map(|(k, v)| {
                if k == key {
                    v.as_u64().unwrap_or(0)
                } else {
                    sum_of(v, key)
                }
            })
            .sum(),
        serde_json::Value::Array(items) => items.iter().map(|v| sum_of(v, key)).sum(),
        _ => 0,
    }
}

fn logs_of(dir: &Path) -> String {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpch_from_s3_on_three_hosts_matches_duckdb_and_fetches_cross_hosts() {
    volley_tests::init_tracing();
    let s3 = lake().await;
    let cluster = three_hosts(&s3, s3.env(), "4").await;
    let client = cluster.client().await.unwrap();
    register(&client, "").await;
    let mut flight_fetches = 0;
    for q in 1..=22 {
        let sql = tpch::query(q).unwrap();
        let statement = volley::split_statements(&sql).unwrap().remove(0);
        let job_id = client.submit(&statement).await.unwrap();
        let (_, stream) = client
            .fetch(job_id.clone())
            .await
            .unwrap_or_else(|e| panic!("q{q} failed: {e}"));
        let batches: Vec<_> = stream.try_collect().await.unwrap();
        let actual = rows(&batches).unwrap();
        assert_matches_answer(
            &actual,
            &tpch::answer_path(q),
            0.011,
            &format!("q{q} from S3"),
        );
        let (status, body) = http(
            "GET",
            format!("{}/api/jobs/{job_id}", cluster.http_url()),
            None,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        flight_fetches += sum_of(&serde_json::from_str(&body).unwrap(), "flight_fetches");
    }
    // Executors on different hosts never read each other's shuffle files from disk.
    assert!(
        flight_fetches > 0,
        "no shuffle file crossed hosts over Flight"
    );
    let state = client.cluster_state().await.unwrap();
    let hosts: std::collections::BTreeSet<&str> =
        state.executors.iter().map(|e| e.host.as_str()).collect();
    assert_eq!(
        hosts.into_iter().collect::<Vec<_>>(),
        vec!["127.0.0.2", "127.0.0.3"]
    );
}

/// q18 from S3; the executor holding stage 1's finished output is SIGKILLed while stage 2
/// waits to read it. Returns the rows and how often stage 1 ran.
async fn q18_with_a_kill(s3: &S3Server, attempts: &str) -> Result<(Vec<Row>, u32), String> {
    let mut cluster = three_hosts(s3, s3.env(), attempts).await;
    let client = cluster.client().await.unwrap();
    register(&client, "").await;
    let hold = Hold::new(2).unwrap();
    client.sql(&hold.set_sql()).await.unwrap();
    let job_id = client.submit(&tpch::query(18).unwrap()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let holder = loop {
        let record = job(&client, &job_id).await;
        let stage1_done = record
            .stages
            .iter()
            .any(|s| s.stage_id == 1 && s.state == "succeeded");
        let stage2_running = record
            .tasks
            .iter()
            .any(|t| t.state == "running" && t.task.as_ref().is_some_and(|id| id.stage_id == 2));
        if stage1_done && stage2_running {
            break record
                .tasks
                .iter()
                .find(|t| t.task.as_ref().is_some_and(|id| id.stage_id == 1))
                .map(|t| t.executor_id.clone())
                .unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "stage 1 never finished: {record:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let index = cluster.executor_index(&holder).await.unwrap();
    // Only the process dies: its files stay on this machine's disk, but the other "host"
    // must not read them from there (no shared file system), so they are really lost.
    cluster.kill_executor(index).unwrap();
    hold.release().unwrap();
    let (_, stream) = client
        .fetch(job_id.clone())
        .await
        .map_err(|e| e.to_string())?;
    let batches: Vec<_> = stream.try_collect().await.map_err(|e| e.to_string())?;
    let attempts = job(&client, &job_id)
        .await
        .stages
        .iter()
        .find(|s| s.stage_id == 1)
        .unwrap()
        .attempts;
    Ok((rows(&batches).unwrap(), attempts))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_query_on_s3_keeps_exact_answer_and_fails_without_retries() {
    volley_tests::init_tracing();
    let s3 = lake().await;
    let (actual, attempts) = q18_with_a_kill(&s3, "4")
        .await
        .expect("q18 survives the kill");
    assert_matches_answer(&actual, &tpch::answer_path(18), 0.011, "q18 after SIGKILL");
    assert!(attempts >= 2, "stage 1 ran again (attempts = {attempts})");
    let err = q18_with_a_kill(&s3, "1")
        .await
        .expect_err("without retries the lost output fails the job");
    assert!(err.contains("lost"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_s3_input_fails_clearly_and_secrets_appear_nowhere() {
    volley_tests::init_tracing();
    let s3 = lake().await;
    // No credentials in the environment: tables bring their own in OPTIONS.
    let env = vec![("AWS_REGION".to_string(), "us-east-1".to_string())];
    let cluster = three_hosts(&s3, env, "2").await;
    let client = cluster.client().await.unwrap();
    let good = s3.table_options(&s3.access_key, &s3.secret_key);
    register(&client, &good).await;
    let count = run(&client, "SELECT count(*) FROM nation").await.unwrap();
    assert_eq!(count, vec![vec!["25".to_string()]]);
    let q6 = run(&client, &tpch::query(6).unwrap()).await.unwrap();
    assert_matches_answer(
        &q6,
        &tpch::answer_path(6),
        0.011,
        "q6 with per-table credentials",
    );

    // EXPLAIN of a query on the table shows no secret either.
    let explained = run(&client, "EXPLAIN SELECT count(*) FROM nation")
        .await
        .unwrap();
    let explained = format!("{explained:?}");
    assert!(explained.contains("Stage"), "{explained}");
    assert!(!explained.contains(&s3.secret_key) && !explained.contains(&s3.access_key));

    // Wrong secret: an error naming the bucket and the 403.
    let wrong = s3.table_options(&s3.access_key, "wrong-secret-1234");
    let err = run(&client, &format!(
        "CREATE EXTERNAL TABLE w STORED AS PARQUET LOCATION 's3://{BUCKET}/{PREFIX}/nation/' {wrong}"
    ))
    .await
    .unwrap_err();
    assert!(err.contains(BUCKET) && err.contains("403"), "{err}");
    assert!(
        !err.contains("wrong-secret-1234") && !err.contains(&s3.secret_key),
        "{err}"
    );

    // A prefix without objects: DataFusion makes an empty table of no columns, or errs; Volley
    // does the same as DataFusion on the same server.
    let err = run(&client, &format!(
        "CREATE EXTERNAL TABLE m STORED AS PARQUET LOCATION 's3://{BUCKET}/{PREFIX}/none/' {good}"
    ))
    .await;
    let local = datafusion::prelude::SessionContext::new();
    let url = url::Url::parse(&format!("s3://{BUCKET}")).unwrap();
    local.register_object_store(&url, s3.store(BUCKET).unwrap());
    let expected = local
        .sql(&format!(
            "CREATE EXTERNAL TABLE m STORED AS PARQUET LOCATION 's3://{BUCKET}/{PREFIX}/none/'"
        ))
        .await;
    assert_eq!(
        err.is_ok(),
        expected.is_ok(),
        "{err:?} vs DataFusion {expected:?}"
    );

    // Outside --allowed-path: refused, naming the URL and the allowed root.
    let err = run(
        &client,
        &format!(
            "CREATE EXTERNAL TABLE o STORED AS PARQUET LOCATION 's3://{BUCKET}/elsewhere/' {good}"
        ),
    )
    .await
    .unwrap_err();
    assert!(
        err.contains(&format!("s3://{BUCKET}/elsewhere/"))
            && err.contains(&format!("s3://{BUCKET}/{PREFIX}")),
        "{err}"
    );
    let err = run(&client, &format!(
        "CREATE EXTERNAL TABLE n STORED AS PARQUET LOCATION 's3://nosuchbucket/{PREFIX}/' {good}"
    ))
    .await
    .unwrap_err();
    // A missing bucket: the server's answer, naming it.
    assert!(
        err.contains("nosuchbucket") && !err.contains("sandbox"),
        "{err}"
    );

    // The secret is in no page, API answer or log.
    let (_, jobs) = http(
        "GET",
        format!("{}/api/jobs?ddl=true", cluster.http_url()),
        None,
    )
    .await;
    assert!(jobs.contains("CREATE EXTERNAL TABLE"), "{jobs}");
    let ids: Vec<String> = serde_json::from_str::<serde_json::Value>(&jobs)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|j| {
            j["id"]
                .as_str()
                .or(j["job_id"].as_str())
                .map(str::to_string)
        })
        .collect();
    let mut pages = jobs.clone();
    for id in ids {
        for page in [format!("/jobs/{id}"), format!("/api/jobs/{id}")] {
            let (status, body) = http("GET", format!("{}{page}", cluster.http_url()), None).await;
            assert_eq!(status, 200, "{page}: {body}");
            pages.push_str(&body);
        }
    }
    let state = format!("{:?}", client.cluster_state().await.unwrap());
    let logs = logs_of(cluster.log_dir().unwrap());
    for (what, text) in [
        ("status pages", &pages),
        ("cluster state", &state),
        ("logs", &logs),
    ] {
        assert!(
            !text.contains(&s3.secret_key),
            "the secret key is in the {what}"
        );
        assert!(
            !text.contains(&s3.access_key),
            "the access key is in the {what}"
        );
    }
}

/// `COPY` of a query to `s3://lake/out/<name>/` with writing attempts of partition 0 failing
/// after their files are written (`fail_attempts` of them): returns the COPY's count, the
/// most attempts a task of the job ran and the number of writing tasks.
async fn copy_with_failures(
    client: &VolleyClient,
    query: &str,
    name: &str,
    fail_attempts: u32,
) -> Result<(Vec<Row>, u32, u32), String> {
    client
        .sql(&format!("SET volley.test_fail_write = '0:{fail_attempts}'"))
        .await
        .unwrap();
    let job_id = client
        .submit(&format!(
            "COPY ({query}) TO 's3://{BUCKET}/out/{name}/' STORED AS PARQUET"
        ))
        .await
        .map_err(|e| e.to_string())?;
    let result = client
        .fetch(job_id.clone())
        .await
        .map_err(|e| e.to_string());
    let count = match result {
        Ok((_, stream)) => stream
            .try_collect::<Vec<_>>()
            .await
            .map_err(|e| e.to_string())?,
        Err(e) => return Err(e),
    };
    client.sql("SET volley.test_fail_write = ''").await.unwrap();
    let record = job(client, &job_id).await;
    let attempts = record
        .tasks
        .iter()
        .filter_map(|t| t.task.as_ref().map(|id| id.attempt + 1))
        .max()
        .unwrap_or(0);
    let writers = record
        .stages
        .iter()
        .find(|s| s.stage_id == 1)
        .map_or(0, |s| s.partitions);
    Ok((rows(&count).unwrap(), attempts, writers))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_to_s3_with_a_failed_writer_leaves_exactly_one_set_of_files() {
    volley_tests::init_tracing();
    let s3 = lake().await;
    let cluster = three_hosts(&s3, s3.env(), "4").await;
    let client = cluster.client().await.unwrap();
    register(&client, "").await;
    let query =
        "SELECT l_orderkey, l_linenumber, l_quantity FROM lineitem WHERE l_orderkey % 7 = 0";
    let ordered = format!("{query} ORDER BY l_orderkey, l_linenumber");
    let expected = run(&client, &ordered).await.unwrap();
    assert!(expected.len() > 1000, "{} rows", expected.len());

    let (count, attempts, writers) = copy_with_failures(&client, query, "q", 1).await.unwrap();
    assert_eq!(count, vec![vec![expected.len().to_string()]]);
    assert!(
        attempts >= 2,
        "the failing writer ran again (attempts = {attempts})"
    );
    // Exactly one set of files: final names only, nothing temporary left.
    let objects = settled_objects(&s3, "out/q").await;
    assert!(!objects.is_empty());
    assert!(
        objects
            .iter()
            .all(|o| o.ends_with(".parquet") && !o.contains("_volley_temporary")),
        "{objects:?}"
    );
    // One file per writing task (tasks whose partition is empty write none): the writes ran
    // in parallel, each file from another task (DataFusion names a sink's files after a
    // random id per run).
    let writes: std::collections::BTreeSet<&str> = objects
        .iter()
        .filter_map(|o| o.rsplit('/').next()?.split('_').next())
        .collect();
    assert!(objects.len() >= 2, "{objects:?}");
    assert!(
        objects.len() <= writers as usize,
        "{writers} writers: {objects:?}"
    );
    assert_eq!(
        writes.len(),
        objects.len(),
        "one file per task: {objects:?}"
    );
    client
        .sql(&format!(
            "CREATE EXTERNAL TABLE copied STORED AS PARQUET LOCATION 's3://{BUCKET}/out/q/'"
        ))
        .await
        .unwrap();
    let copied = run(
        &client,
        "SELECT * FROM copied ORDER BY l_orderkey, l_linenumber",
    )
    .await
    .unwrap();
    assert_eq!(
        copied, expected,
        "the copied rows are the query's rows, once"
    );
    // A writing task failing before it writes (`volley.test_fail_task` on the write stage,
    // stage 1: scan and write, no exchange) is retried the same way.
    client
        .sql("SET volley.test_fail_task = '1:1:1'")
        .await
        .unwrap();
    let count = run(
        &client,
        &format!("COPY ({query}) TO 's3://{BUCKET}/out/again/' STORED AS PARQUET"),
    )
    .await
    .unwrap();
    client.sql("SET volley.test_fail_task = ''").await.unwrap();
    assert_eq!(count, vec![vec![expected.len().to_string()]]);
    let state = client.cluster_state().await.unwrap();
    let record = state
        .jobs
        .iter()
        .find(|j| j.sql.contains("out/again"))
        .unwrap();
    assert!(
        record.tasks.iter().any(|t| t
            .task
            .as_ref()
            .is_some_and(|id| id.stage_id == 1 && id.attempt == 1)),
        "the failed write task ran again: {record:?}"
    );
    let again = settled_objects(&s3, "out/again").await;
    assert!(again.iter().all(|o| o.ends_with(".parquet")), "{again:?}");
    client
        .sql(&format!(
            "CREATE EXTERNAL TABLE again STORED AS PARQUET LOCATION 's3://{BUCKET}/out/again/'"
        ))
        .await
        .unwrap();
    let rows_again = run(
        &client,
        "SELECT * FROM again ORDER BY l_orderkey, l_linenumber",
    )
    .await
    .unwrap();
    assert_eq!(rows_again, expected);

    // Without retries the same fault fails the COPY, and it leaves no file behind.
    client.sql("SET volley.test_fail_write = ''").await.unwrap();
    let no_retries = three_hosts(&s3, s3.env(), "1").await;
    let client = no_retries.client().await.unwrap();
    register(&client, "").await;
    let err = copy_with_failures(&client, query, "failed", 1)
        .await
        .unwrap_err();
    assert!(err.contains("volley.test_fail_write"), "{err}");
    // The failed job's release removes what its attempts wrote (shortly after the error).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let objects = s3.list(BUCKET, "out/failed").await.unwrap();
        if objects.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a failed COPY left files: {objects:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_server_stopped_mid_scan_fails_in_bounded_time_and_cluster_keeps_serving() {
    volley_tests::init_tracing();
    let mut s3 = lake().await;
    let cluster = three_hosts(&s3, s3.env(), "2").await;
    let client = cluster.client().await.unwrap();
    register(&client, "").await;
    // Hold the scan stage, stop the server, let the scans start.
    let hold = Hold::new(1).unwrap();
    client.sql(&hold.set_sql()).await.unwrap();
    let job_id = client.submit(&tpch::query(1).unwrap()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    s3.stop();
    hold.release().unwrap();
    let started = Instant::now();
    let err = match client.fetch(job_id).await {
        Ok((_, stream)) => stream
            .try_collect::<Vec<_>>()
            .await
            .map(|_| ())
            .unwrap_err()
            .to_string(),
        Err(e) => e.to_string(),
    };
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "took {:?}",
        started.elapsed()
    );
    assert!(err.contains("lineitem") || err.contains(BUCKET), "{err}");
    // The cluster still serves (a query that needs no S3).
    client.sql(Hold::clear_sql()).await.unwrap();
    let rows = run(&client, "SELECT 1 + 1").await.unwrap();
    assert_eq!(rows, vec![vec!["2".to_string()]]);
}
