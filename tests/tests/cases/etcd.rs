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

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// `volley scheduler` on `port` with its state in etcd (the leader, or a standby).
fn scheduler(port: u16, state: &str, log: &std::path::Path) -> std::process::Child {
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
        .args(["--http-port", &free_port().unwrap().to_string()])
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

/// Index of the one scheduler listening, waiting up to `patience`.
async fn leader(ports: &[u16], patience: Duration) -> Option<usize> {
    let deadline = Instant::now() + patience;
    while Instant::now() < deadline {
        let up: Vec<usize> = (0..ports.len()).filter(|i| listening(ports[*i])).collect();
        assert!(up.len() <= 1, "two schedulers serve at once: {up:?}");
        if let Some(i) = up.first() {
            return Some(*i);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

const QUERY: &str =
    "SELECT region, count(*) AS n FROM sales GROUP BY region ORDER BY region NULLS LAST";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_a_killed_leader_and_its_running_query() {
    volley_tests::init_tracing();
    let etcd = Etcd::start().await.unwrap();
    let state = etcd.state_url("failover");
    let logs = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..3).map(|_| free_port().unwrap()).collect();
    let mut procs = Procs(Vec::new());
    // The first one leads; the others stand by without listening.
    procs.0.push(scheduler(
        ports[0],
        &state,
        &logs.path().join("scheduler-0.log"),
    ));
    assert_eq!(leader(&ports, Duration::from_secs(20)).await, Some(0));
    for (i, port) in ports.iter().enumerate().skip(1) {
        let log = logs.path().join(format!("scheduler-{i}.log"));
        procs.0.push(scheduler(*port, &state, &log));
    }
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
    let client = volley::VolleyClient::connect(&list).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.cluster_state().await.unwrap().executors.len() < 2 {
        assert!(Instant::now() < deadline, "executors did not register");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let data = volley_tests::workspace_root().join("tests/slt/data/sales.csv");
    client
        .sql(&format!(
            "CREATE EXTERNAL TABLE sales (sale_id INT, emp_id INT, amount DECIMAL(10,2), region VARCHAR, day DATE) \
             STORED AS CSV LOCATION '{}' OPTIONS ('format.has_header' 'true')",
            data.display()
        ))
        .await
        .unwrap();
    let (_, batches) = client.sql(QUERY).await.unwrap();
    let expected = rows(&batches).unwrap();
    assert_eq!(expected.len(), 5, "{expected:?}");
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

    // The old leader, started again, stands by: it does not serve while the other leads.
    procs.0[0] = scheduler(ports[0], &state, &logs.path().join("scheduler-0b.log"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(procs.0[0].try_wait().unwrap().is_none(), "it runs");
    assert!(!listening(ports[0]));
    assert!(listening(ports[next]));
    let (_, batches) = client.sql(QUERY).await.unwrap();
    assert_eq!(rows(&batches).unwrap(), expected);
    let log = std::fs::read_to_string(logs.path().join("scheduler-0b.log")).unwrap();
    assert!(log.contains("standby"), "{log}");
}
