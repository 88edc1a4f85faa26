//! The scheduler's durable state (`volley scheduler --state-dir`): the job history and the
//! sessions (their tables) survive a SIGKILL and restart, DDL and SET statements are hidden
//! from the job list unless asked for,
//! and a state file the scheduler cannot read is refused at start, naming the file.

use std::time::Duration;

use serde_json::Value as Json;
use volley_tests::Hold;
use volley_tests::compare::rows;
use volley_tests::http;
use volley_tests::process::{ProcessCluster, volley_bin};

const QUERY: &str =
    "SELECT region, count(*) AS n FROM sales GROUP BY region ORDER BY region NULLS LAST";

fn expected() -> Vec<Vec<String>> {
    [
        ["east", "2"],
        ["north", "3"],
        ["south", "3"],
        ["west", "1"],
        ["NULL", "1"],
    ]
    .iter()
    .map(|r| r.iter().map(|v| v.to_string()).collect())
    .collect()
}

fn create_sales() -> String {
    volley_tests::sales_table_sql()
}

async fn jobs(base: &str, ddl: bool) -> Vec<Json> {
    let url = format!("{base}/api/jobs{}", if ddl { "?ddl=true" } else { "" });
    let (status, body) = http("GET", url.clone(), None).await;
    assert_eq!(status, 200, "{url}: {body}");
    serde_json::from_str::<Json>(&body)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn find<'a>(jobs: &'a [Json], id: &str) -> Option<&'a Json> {
    jobs.iter().find(|j| j["id"] == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_history_and_sessions_survive_a_scheduler_restart_and_ddl_is_hidden() {
    volley_tests::init_tracing();
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().display().to_string();
    let mut cluster = ProcessCluster::start(1, 2, &["--state-dir", &dir])
        .await
        .unwrap();
    let client = cluster.client().await.unwrap();
    let create = create_sales();
    client.sql(&create).await.unwrap();
    client
        .sql("SET datafusion.execution.batch_size = 4096")
        .await
        .unwrap();
    let job_id = client.submit(QUERY).await.unwrap();
    let batches = client.sql_job_rows(&job_id).await.unwrap();
    assert_eq!(rows(&batches).unwrap(), expected());

    let base = cluster.http_url().to_string();
    let listed = jobs(&base, false).await;
    let all = jobs(&base, true).await;
    let query = find(&listed, &job_id).expect("the query is listed").clone();
    assert_eq!(query["state"], "succeeded");
    assert_eq!(query["sql"], QUERY);
    assert_eq!(query["rows_out"], 5);
    assert!(listed.iter().all(|j| j["ddl"] == false), "{listed:?}");
    let ddl: Vec<&Json> = all.iter().filter(|j| j["ddl"] == true).collect();
    assert_eq!(ddl.len(), 2, "the CREATE and the SET: {all:?}");
    assert_eq!(all.len(), listed.len() + 2);
    // The status page says how many it hides.
    let (_, page) = http("GET", format!("{base}/"), None).await;
    assert!(page.contains("show 2 DDL and SET statements"), "{page}");

    // Finished jobs are recorded within a housekeeping tick (500 ms); then SIGKILL.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.restart_scheduler().await.unwrap();
    let after = jobs(&base, false).await;
    let recorded = find(&after, &job_id).expect("the query survives the restart");
    for field in ["state", "sql", "rows_out", "submitted_at_ms", "tasks_total"] {
        assert_eq!(recorded[field], query[field], "{field}");
    }
    assert_eq!(jobs(&base, true).await.len(), all.len());
    let (status, detail) = http("GET", format!("{base}/api/jobs/{job_id}"), None).await;
    assert_eq!(status, 200, "{detail}");
    assert!(detail.contains(QUERY), "{detail}");
    // Its page too, saying its stages went with the old process.
    let (status, page) = http("GET", format!("{base}/jobs/{job_id}"), None).await;
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains("history-only") && page.contains("succeeded"),
        "{page}"
    );

    // The client's session survives too: its table was replayed from the state file.
    cluster.wait_for_executors(1).await.unwrap();
    let (_, batches) = client.sql(QUERY).await.unwrap();
    assert_eq!(rows(&batches).unwrap(), expected());
    // And a new session runs the query.
    let client = cluster.client().await.unwrap();
    client.sql(&create).await.unwrap();
    let (_, batches) = client.sql(QUERY).await.unwrap();
    assert_eq!(rows(&batches).unwrap(), expected());
}

/// `volley scheduler --state-dir DIR` with the given extra arguments: its exit status and
/// stderr, or None when it was still running after 3 s (then it is killed).
fn start_scheduler(dir: &str, extra: &[&str]) -> Option<(bool, String)> {
    let port = volley_tests::process::free_port().unwrap().to_string();
    let mut child = std::process::Command::new(volley_bin().unwrap())
        .args([
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--no-http",
            "--state-dir",
            dir,
        ])
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            return Some((status.success(), stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    None
}

#[test]
fn a_state_file_that_is_not_one_is_refused_at_start_naming_it() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().display().to_string();
    let file = state.path().join("scheduler.redb");
    std::fs::write(&file, vec![0x5a; 8192]).unwrap();
    let (ok, stderr) = start_scheduler(&dir, &[]).expect("the scheduler refuses to start");
    assert!(!ok);
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    assert!(stderr.contains("--state-reset"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // The file is left as it was: no silent reset.
    assert_eq!(std::fs::read(&file).unwrap(), vec![0x5a; 8192]);
    // --state-reset starts empty and serves.
    assert_eq!(start_scheduler(&dir, &["--state-reset"]), None);
    assert_ne!(std::fs::read(&file).unwrap(), vec![0x5a; 8192]);
}

/// A query running when the scheduler is SIGKILLed completes after the scheduler restarts on
/// its state: the client waits through the restart (asking again with backoff) and gets the
/// exact rows. Without `--state-dir` the same crash loses the job (the fault fired).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_running_at_a_scheduler_crash_completes_after_the_restart() {
    volley_tests::init_tracing();
    for durable in [true, false] {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path().display().to_string();
        let args: Vec<&str> = if durable {
            vec!["--state-dir", &dir]
        } else {
            Vec::new()
        };
        let mut cluster = ProcessCluster::start(2, 1, &args).await.unwrap();
        let client = cluster.client().await.unwrap();
        client.sql(&create_sales()).await.unwrap();
        let hold = Hold::new(2).unwrap();
        client.sql(&hold.set_sql()).await.unwrap();
        let job_id = client.submit(QUERY).await.unwrap();
        // Stage 1 done, stage 2 held: the job is mid-run when the scheduler dies.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let cluster_state = client.cluster_state().await.unwrap();
            let stage_one_done = cluster_state
                .jobs
                .iter()
                .filter(|j| j.job_id == job_id)
                .flat_map(|j| j.stages.iter())
                .any(|s| s.stage_id == 1 && s.state == "succeeded");
            if stage_one_done {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "stage 1 never finished"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cluster.restart_scheduler().await.unwrap();
        hold.release().unwrap();
        let result = client.sql_job_rows(&job_id).await;
        if durable {
            assert_eq!(rows(&result.unwrap()).unwrap(), expected());
            let listed = jobs(cluster.http_url(), false).await;
            let job = find(&listed, &job_id).expect("the resumed job is listed");
            assert_eq!(job["state"], "succeeded");
            assert_eq!(job["sql"], QUERY);
        } else {
            let err = result.unwrap_err().to_string();
            assert!(err.contains(&format!("unknown job {job_id}")), "{err}");
        }
    }
}

/// SIGKILL a process (`tests/examples/journal_writer.rs`) in the middle of writing the state
/// file, three times: every batch it reported committed is there, complete and in order, and
/// the file opens each time.
#[test]
fn a_sigkill_during_state_writes_loses_no_committed_transition() {
    use std::io::BufRead;
    use volley_scheduler::store::{StateStore, file::FileStore};
    let state = tempfile::tempdir().unwrap();
    let mut committed = None;
    for round in 0..3 {
        // tests/examples/journal_writer.rs, built beside the volley binary.
        let writer = volley_bin()
            .unwrap()
            .with_file_name("examples")
            .join("journal_writer");
        let mut child = std::process::Command::new(writer)
            .arg(state.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(stdout).lines();
        // Let it commit a varying number of batches, then kill it mid-write.
        let wanted = 40 + round * 17;
        let mut seen = 0;
        while seen < wanted {
            let line = lines.next().expect("the child writes").unwrap();
            if let Some(n) = line.strip_prefix("committed ") {
                committed = Some(n.parse::<usize>().unwrap());
                seen += 1;
            }
        }
        child.kill().unwrap();
        // What it printed before dying was committed too.
        for line in lines.map_while(Result::ok) {
            if let Some(n) = line.strip_prefix("committed ") {
                committed = Some(n.parse::<usize>().unwrap());
            }
        }
        child.wait().unwrap();
        let store = FileStore::open(state.path(), false).expect("the file opens after a SIGKILL");
        let jobs = store.running_jobs().unwrap();
        let last = committed.unwrap();
        assert!(
            jobs.len() > last,
            "round {round}: {} jobs, {last} committed",
            jobs.len()
        );
        for (n, (id, job)) in jobs.iter().enumerate() {
            assert_eq!(id, &format!("job{n:08}"));
            assert_eq!(job.steps.len(), 8, "{id}: a batch is whole or absent");
        }
    }
}
