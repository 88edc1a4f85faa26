//! The scheduler's state in a real etcd (`volley scheduler --state etcd://...`): schedulers
//! sharing it elect one leader, a deposed leader's writes are refused by etcd itself (fencing),
//! the state survives the leader, and an etcd that cannot be reached at start is a clear error.

use std::time::{Duration, Instant};

use volley_scheduler::store::etcd::{Campaign, EtcdStore};
use volley_scheduler::store::{StateStore, StoredSession};
use volley_tests::compare::rows;
use volley_tests::etcd::Etcd;
use volley_tests::process::{free_port, volley_bin};

fn session(statement: &str) -> StoredSession {
    StoredSession {
        settings: Vec::new(),
        statements: vec![statement.to_string()],
    }
}

async fn connect(url: String) -> EtcdStore {
    tokio::task::spawn_blocking(move || EtcdStore::connect(&url))
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_and_a_deposed_leaders_write_is_refused() {
    let etcd = Etcd::start().await.unwrap();
    let url = etcd.state_url("fencing");
    let first = connect(url.clone()).await;
    let second = connect(url.clone()).await;
    let Campaign::Leader(_first_lost) = first.campaign("http://127.0.0.1:1").unwrap() else {
        panic!("the first campaign wins");
    };
    match second.campaign("http://127.0.0.1:2").unwrap() {
        Campaign::Standby(leader) => assert_eq!(leader.as_deref(), Some("http://127.0.0.1:1")),
        Campaign::Leader(_) => panic!("two leaders"),
    }
    // A standby writes nothing.
    let err = second.save_session("s", &session("standby")).unwrap_err();
    assert!(err.to_string().contains("not the leader"), "{err}");
    first.save_session("s", &session("leader")).unwrap();

    // The leader key goes (as when the first leader's lease expires while it is cut off) and
    // the second scheduler takes over, while the first still believes it leads.
    let mut raw = etcd_client::Client::connect(
        [url.trim_start_matches("etcd://").split('/').next().unwrap()],
        None,
    )
    .await
    .unwrap();
    raw.delete("/volley/fencing/leader", None).await.unwrap();
    let Campaign::Leader(_second_lost) = second.campaign("http://127.0.0.1:2").unwrap() else {
        panic!("the second campaign wins once the leader key is gone");
    };
    assert_eq!(
        second.leader().unwrap().as_deref(),
        Some("http://127.0.0.1:2")
    );
    // etcd refuses the deposed leader's write (its lease no longer holds the leader key).
    let err = first.save_session("s", &session("deposed")).unwrap_err();
    assert!(err.to_string().contains("deposed"), "{err}");
    // And it knows: its next write fails at once.
    let err = first.save_session("t", &session("deposed")).unwrap_err();
    assert!(err.to_string().contains("not the leader"), "{err}");
    // The new leader reads what the old one wrote while it led, and nothing it wrote after.
    assert_eq!(
        second.sessions().unwrap(),
        vec![("s".to_string(), session("leader"))]
    );
    second.save_session("s", &session("new leader")).unwrap();
    assert_eq!(
        first.sessions().unwrap(),
        vec![("s".to_string(), session("new leader"))]
    );
    // A graceful stop hands over at once: the key goes with the lease.
    second.resign();
    assert_eq!(second.leader().unwrap(), None);
}

#[test]
fn an_etcd_that_cannot_be_reached_at_start_is_a_clear_error() {
    let port = free_port().unwrap();
    let scheduler_port = free_port().unwrap().to_string();
    let url = format!("etcd://127.0.0.1:{port}");
    let started = Instant::now();
    let out = std::process::Command::new(volley_bin().unwrap())
        .args([
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            &scheduler_port,
            "--no-http",
            "--state",
            &url,
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot reach etcd at http://127.0.0.1:{port} after"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Bounded: a few tries with backoff, not forever.
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// Processes killed on drop.
struct Procs(Vec<std::process::Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// True when the scheduler on `port` leads: it opens a session (a standby refuses, naming the
/// leader).
async fn leads(port: u16) -> bool {
    volley::VolleyClient::connect(&format!("http://127.0.0.1:{port}"))
        .await
        .is_ok()
}

/// `volley scheduler` on `port` with its state in etcd (the leader, or a standby).
fn scheduler(port: u16, state: &str, log: &std::path::Path) -> std::process::Child {
    scheduler_with_page(port, free_port().unwrap(), state, log)
}

/// The same, its status page on `http_port`.
fn scheduler_with_page(
    port: u16,
    http_port: u16,
    state: &str,
    log: &std::path::Path,
) -> std::process::Child {
    let root = volley_tests::workspace_root().display().to_string();
    let temp = std::env::temp_dir().display().to_string();
    std::process::Command::new(volley_bin().unwrap())
        .args([
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
        ])
        .args(["--http-port", &http_port.to_string()])
        .args(["--state", state, "--enable-test-hooks"])
        .args(["--allowed-path", &root, "--allowed-path", &temp])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

fn executor(
    schedulers: &str,
    work: &std::path::Path,
    log: &std::path::Path,
) -> std::process::Child {
    let root = volley_tests::workspace_root().display().to_string();
    let temp = std::env::temp_dir().display().to_string();
    std::process::Command::new(volley_bin().unwrap())
        .args(["executor", "--scheduler", schedulers, "--host", "127.0.0.1"])
        .args(["--port", &free_port().unwrap().to_string(), "--slots", "2"])
        .args(["--heartbeat-ms", "500", "--enable-test-hooks", "--work-dir"])
        .arg(work)
        .args(["--allowed-path", &root, "--allowed-path", &temp])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// `n` schedulers on `state`: the first leads (waited for), the others stand by.
async fn schedulers(n: usize, state: &str, logs: &std::path::Path) -> (Procs, Vec<u16>) {
    let ports: Vec<u16> = (0..n).map(|_| free_port().unwrap()).collect();
    let mut procs = Procs(Vec::new());
    for (i, port) in ports.iter().enumerate() {
        let log = logs.join(format!("scheduler-{i}.log"));
        procs.0.push(scheduler(*port, state, &log));
        if i == 0 {
            assert_eq!(leader(&ports, Duration::from_secs(20)).await, Some(0));
        }
    }
    (procs, ports)
}

/// Index of the one scheduler leading, waiting up to `patience`.
async fn leader(ports: &[u16], patience: Duration) -> Option<usize> {
    let deadline = Instant::now() + patience;
    while Instant::now() < deadline {
        let mut up = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            if leads(*port).await {
                up.push(i);
            }
        }
        assert!(up.len() <= 1, "two schedulers lead at once: {up:?}");
        if let Some(i) = up.first() {
            return Some(*i);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

const QUERY: &str =
    "SELECT region, count(*) AS n FROM sales GROUP BY region ORDER BY region NULLS LAST";

/// A client of the schedulers `list` once `executors` executors registered, with the sales
/// table, and the rows of [`QUERY`] on it.
async fn sales_client(list: &str, executors: usize) -> (volley::VolleyClient, Vec<Vec<String>>) {
    let client = volley::VolleyClient::connect(list).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.cluster_state().await.unwrap().executors.len() < executors {
        assert!(Instant::now() < deadline, "executors did not register");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client.sql(&volley_tests::sales_table_sql()).await.unwrap();
    let (_, batches) = client.sql(QUERY).await.unwrap();
    let expected = rows(&batches).unwrap();
    assert_eq!(expected.len(), 5, "{expected:?}");
    (client, expected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_a_killed_leader_and_its_running_query() {
    volley_tests::init_tracing();
    let etcd = Etcd::start().await.unwrap();
    let state = etcd.state_url("failover");
    let logs = tempfile::tempdir().unwrap();
    let (mut procs, ports) = schedulers(3, &state, logs.path()).await;
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let list = urls.join(",");
    let work = tempfile::tempdir().unwrap();
    for i in 0..2 {
        let log = logs.path().join(format!("executor-{i}.log"));
        procs.0.push(executor(&list, work.path(), &log));
    }
    let (client, expected) = sales_client(&list, 2).await;
    let hold = volley_tests::Hold::new(2).unwrap();
    client.sql(&hold.set_sql()).await.unwrap();
    let job_id = client.submit(QUERY).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let state = client.cluster_state().await.unwrap();
        let done = state
            .jobs
            .iter()
            .filter(|j| j.job_id == job_id)
            .flat_map(|j| j.stages.iter())
            .any(|s| s.stage_id == 1 && s.state == "succeeded");
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "stage 1 never finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // SIGKILL the leader mid-query: a standby serves within 10 s.
    procs.0[0].kill().unwrap();
    procs.0[0].wait().unwrap();
    let killed = Instant::now();
    let next = leader(&ports, Duration::from_secs(15))
        .await
        .expect("a standby took over");
    let takeover = killed.elapsed();
    assert!(next != 0);
    assert!(takeover < Duration::from_secs(10), "took {takeover:?}");
    hold.release().unwrap();
    let batches = client.sql_job_rows(&job_id).await.unwrap();
    assert_eq!(rows(&batches).unwrap(), expected);

    // The old leader, started again, stands by: it refuses calls naming the leader, and its
    // status page shows the history the leader records.
    let page = free_port().unwrap();
    let log = logs.path().join("scheduler-0b.log");
    procs.0[0] = scheduler_with_page(ports[0], page, &state, &log);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(procs.0[0].try_wait().unwrap().is_none(), "it runs");
    let refused = volley::VolleyClient::connect(&urls[0]).await.unwrap_err();
    assert!(
        refused
            .to_string()
            .contains(&format!("not the leader; the leader is {}", urls[next])),
        "{refused}"
    );
    assert_eq!(leader(&ports, Duration::from_secs(1)).await, Some(next));
    let (status, history) =
        volley_tests::http("GET", format!("http://127.0.0.1:{page}/api/jobs"), None).await;
    assert_eq!(status, 200, "{history}");
    assert!(history.contains(&job_id), "{history}");
    let (status, ready) =
        volley_tests::http("GET", format!("http://127.0.0.1:{page}/readyz"), None).await;
    assert_eq!(status, 503, "a standby is not ready: {ready}");
    let (_, batches) = client.sql(QUERY).await.unwrap();
    assert_eq!(rows(&batches).unwrap(), expected);
    let log = std::fs::read_to_string(logs.path().join("scheduler-0b.log")).unwrap();
    assert!(log.contains("standby"), "{log}");
}

/// etcd stops mid-query: the leader, unable to renew its lease, stops rather than risk two
/// leaders; when etcd is back, the standby takes over and the query completes exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_steps_down_when_etcd_goes_and_the_query_resumes_when_it_returns() {
    volley_tests::init_tracing();
    let mut etcd = Etcd::start().await.unwrap();
    let state = etcd.state_url("outage");
    let logs = tempfile::tempdir().unwrap();
    let (mut procs, ports) = schedulers(2, &state, logs.path()).await;
    let list = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let work = tempfile::tempdir().unwrap();
    procs.0.push(executor(
        &list,
        work.path(),
        &logs.path().join("executor.log"),
    ));
    let (client, expected) = sales_client(&list, 1).await;
    let hold = volley_tests::Hold::new(2).unwrap();
    client.sql(&hold.set_sql()).await.unwrap();
    let job_id = client.submit(QUERY).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    etcd.stop();
    let stopped = Instant::now();
    let status = loop {
        if let Some(status) = procs.0[0].try_wait().unwrap() {
            break status;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(20),
            "the leader kept serving without etcd"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success());
    let log = std::fs::read_to_string(logs.path().join("scheduler-0.log")).unwrap();
    assert!(log.contains("lost its leadership"), "{log}");
    // No scheduler serves while etcd is gone.
    assert_eq!(leader(&ports, Duration::from_secs(2)).await, None);

    etcd.resume().await.unwrap();
    assert_eq!(
        leader(&ports, Duration::from_secs(30)).await,
        Some(1),
        "the standby takes over once etcd is back"
    );
    hold.release().unwrap();
    let batches = client.sql_job_rows(&job_id).await.unwrap();
    assert_eq!(rows(&batches).unwrap(), expected);
}

/// A history of 1,005 jobs (each with a 4 KiB statement: more than one gRPC answer holds) is
/// written in capped transactions, trimmed to the newest 1,000 and read back in pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_history_is_kept_trimmed_and_read_back_in_pages() {
    use volley_scheduler::views::JobSummary;
    let etcd = Etcd::start().await.unwrap();
    let store = connect(etcd.state_url("history")).await;
    let Campaign::Leader(_lost) = store.campaign("http://127.0.0.1:1").unwrap() else {
        panic!("the only campaign wins");
    };
    let job = |i: u64| JobSummary {
        id: format!("job{i:05}"),
        sql: format!("SELECT {i} -- {}", "x".repeat(4096)),
        state: "succeeded".to_string(),
        error: None,
        submitted_at_ms: 1_700_000_000_000 + i,
        duration_ms: i,
        stages_done: 1,
        stages_total: 1,
        tasks_done: 1,
        tasks_total: 1,
        rows_out: i,
        cached_age_ms: None,
        ddl: false,
    };
    let jobs: Vec<JobSummary> = (0..1005).map(job).collect();
    store.record_finished(&jobs).unwrap();
    let kept = store.finished_jobs().unwrap();
    assert_eq!(kept.len(), 1000);
    assert_eq!(kept[0].id, "job00005");
    assert_eq!(kept[999].id, "job01004");
    assert_eq!(kept[500].rows_out, 505);
}

/// An etcd with authentication: the store connects with the user and password of its URL
/// and leads; a wrong password is refused at start, and messages never show it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_with_authentication_takes_the_user_of_the_url() {
    let etcd = Etcd::start().await.unwrap();
    etcd.enable_auth("s3cret-pw").unwrap();
    let plain = etcd.state_url("auth");
    let with = |password: &str| plain.replacen("etcd://", &format!("etcd://root:{password}@"), 1);
    let store = connect(with("s3cret-pw")).await;
    let Campaign::Leader(_lost) = store.campaign("http://127.0.0.1:1").unwrap() else {
        panic!("the only campaign wins");
    };
    store.save_session("s", &session("authenticated")).unwrap();
    assert_eq!(
        store.sessions().unwrap(),
        vec![("s".to_string(), session("authenticated"))]
    );
    let wrong = with("wrong-pw");
    let err = tokio::task::spawn_blocking(move || EtcdStore::connect(&wrong).err())
        .await
        .unwrap()
        .expect("a wrong password is refused")
        .to_string();
    assert!(err.contains("authentication failed"), "{err}");
    assert!(!err.contains("wrong-pw"), "{err}");
}
