//! Security: token auth on every RPC, TLS (with mutual TLS), the file sandbox, message limits
//! and the concurrent-job limit. Every rejection is followed by an authorized query that must
//! return exact rows.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use arrow_flight::{FlightClient, Ticket};
use volley::{ClientOptions, EmbeddedCluster, VolleyClient};
use volley_core::protobuf::executor_grpc_client::ExecutorGrpcClient;
use volley_core::protobuf::{self as pb};
use volley_core::security::{Security, TlsSettings};
use volley_scheduler::SchedulerConfig;
use volley_tests::Hold;
use volley_tests::compare::rows;
use volley_tests::process::{ProcessCluster, ProcessOptions, free_port, volley_bin};

const TOKEN: &str = "volley-test-token-7f3a";

/// A query with a shuffle (GROUP BY over two partitions) on the shared emp table.
const BY_DEPT: &str = "SELECT dept_id, count(*) AS n FROM emp GROUP BY dept_id ORDER BY dept_id";

async fn expected_by_dept() -> Vec<Vec<String>> {
    let ctx = datafusion::prelude::SessionContext::new();
    ctx.sql(&volley_tests::emp_table_sql())
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let batches = ctx.sql(BY_DEPT).await.unwrap().collect().await.unwrap();
    rows(&batches).unwrap()
}

async fn authorized_query_works(client: &VolleyClient) {
    let (_, batches) = client.sql(BY_DEPT).await.expect("authorized query");
    assert_eq!(rows(&batches).unwrap(), expected_by_dept().await);
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Wait until `file` mentions `needle` (logs are flushed asynchronously).
async fn wait_for_log(file: &Path, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !read(file).contains(needle) {
        assert!(
            Instant::now() < deadline,
            "{} never logged {needle:?}:\n{}",
            file.display(),
            read(file)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth_rejects_strangers_and_keeps_serving() {
    volley_tests::init_tracing();
    let logs = tempfile::tempdir().unwrap();
    let options = ProcessOptions {
        env: vec![("VOLLEY_AUTH_TOKEN".to_string(), TOKEN.to_string())],
        client: ClientOptions::with_token(TOKEN),
        log_dir: Some(logs.path().to_path_buf()),
        executor_hosts: Vec::new(),
    };
    let mut cluster = ProcessCluster::start_with(2, 1, &[], options)
        .await
        .expect("cluster");
    let client = cluster.client().await.expect("authorized client");
    volley_tests::register_emp(&client)
        .await
        .expect("register emp");
    authorized_query_works(&client).await;
    let scheduler_log = logs.path().join("scheduler.log");

    // No token.
    let err = VolleyClient::connect(cluster.url())
        .await
        .expect_err("no token is rejected")
        .to_string();
    assert!(err.contains("missing auth token"), "{err}");
    wait_for_log(&scheduler_log, "missing auth token").await;

    // Wrong token.
    let err = VolleyClient::connect_with(cluster.url(), ClientOptions::with_token("guess"))
        .await
        .expect_err("wrong token is rejected")
        .to_string();
    assert!(err.contains("wrong auth token"), "{err}");
    wait_for_log(&scheduler_log, "wrong auth token").await;

    // A rogue executor without the token cannot register.
    let rogue_dir = tempfile::tempdir().unwrap();
    let rogue = Command::new(volley_bin().unwrap())
        .args([
            "executor",
            "--scheduler",
            cluster.url(),
            "--host",
            "127.0.0.1",
        ])
        .args(["--port", &free_port().unwrap().to_string(), "--work-dir"])
        .arg(rogue_dir.path())
        .env_remove("VOLLEY_AUTH_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("rogue executor runs");
    assert!(!rogue.status.success(), "rogue executor must fail to start");
    let rogue_err = String::from_utf8_lossy(&rogue.stderr);
    assert!(rogue_err.contains("missing auth token"), "{rogue_err}");
    let state = client.cluster_state().await.unwrap();
    assert_eq!(state.executors.len(), 2, "nothing registered");

    // Executors refuse task launches and shuffle fetches without the token.
    let port = cluster.executor_ports()[0];
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let status = ExecutorGrpcClient::new(channel.clone())
        .launch_tasks(pb::LaunchTasksParams { tasks: vec![] })
        .await
        .expect_err("launch without token");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let err = match FlightClient::new(channel)
        .do_get(Ticket::new("/etc/passwd"))
        .await
    {
        Ok(_) => panic!("shuffle fetch without token must fail"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("missing auth token"), "{err}");
    wait_for_log(&logs.path().join("executor-0.log"), "missing auth token").await;

    // Still serving.
    assert!(cluster.scheduler_alive());
    authorized_query_works(&client).await;
    let fresh = cluster.client().await.expect("new authorized client");
    volley_tests::register_emp(&fresh)
        .await
        .expect("register emp");
    authorized_query_works(&fresh).await;
}

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// A CA and one certificate for 127.0.0.1/localhost usable as server and client.
    fn new() -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        };
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(dir.path().join("node.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("node.key"), key.serialize_pem()).unwrap();
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("VOLLEY_AUTH_TOKEN".to_string(), TOKEN.to_string()),
            (
                "VOLLEY_TLS_CERT".to_string(),
                self.path("node.pem").display().to_string(),
            ),
            (
                "VOLLEY_TLS_KEY".to_string(),
                self.path("node.key").display().to_string(),
            ),
            (
                "VOLLEY_TLS_CA".to_string(),
                self.path("ca.pem").display().to_string(),
            ),
            ("VOLLEY_TLS_CLIENT_AUTH".to_string(), "true".to_string()),
        ]
    }

    fn client(&self, with_cert: bool) -> ClientOptions {
        let tls = TlsSettings::from_files(
            with_cert.then(|| self.path("node.pem")).as_deref(),
            with_cert.then(|| self.path("node.key")).as_deref(),
            Some(&self.path("ca.pem")),
            false,
        )
        .unwrap();
        ClientOptions {
            security: Security::none()
                .with_token(Some(TOKEN.to_string()))
                .with_tls(Some(tls)),
            ..ClientOptions::default()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_cluster_serves_tls_clients_only() {
    volley_tests::init_tracing();
    let pki = Pki::new();
    let options = ProcessOptions {
        env: pki.env(),
        client: pki.client(true),
        log_dir: None,
        executor_hosts: Vec::new(),
    };
    let cluster = ProcessCluster::start_with(2, 1, &[], options)
        .await
        .expect("TLS cluster");
    assert!(cluster.url().starts_with("https://"));
    // TLS client with certificate and token: the query shuffles between executors over TLS.
    let client = cluster.client().await.expect("TLS client");
    volley_tests::register_emp(&client)
        .await
        .expect("register emp");
    authorized_query_works(&client).await;

    // Plaintext against the TLS server.
    let plain = cluster.url().replace("https://", "http://");
    let err = VolleyClient::connect_with(&plain, ClientOptions::with_token(TOKEN))
        .await
        .expect_err("plaintext client is rejected")
        .to_string();
    assert!(!err.is_empty());
    // TLS without a client certificate: mutual TLS refuses the handshake.
    let err = VolleyClient::connect_with(cluster.url(), pki.client(false))
        .await
        .expect_err("client without certificate is rejected")
        .to_string();
    assert!(!err.is_empty());

    authorized_query_works(&client).await;
    flight_sql_over_tls(&cluster, &pki).await;
}

/// Flight SQL on the TLS cluster: the statement's endpoints are `grpc+tls://` executors, whose
/// rows a TLS client with the token reads.
async fn flight_sql_over_tls(cluster: &ProcessCluster, pki: &Pki) {
    use arrow_flight::sql::client::FlightSqlServiceClient;
    use futures::TryStreamExt;
    let security = pki.client(true).security;
    let connect = |url: String| {
        let endpoint = security.endpoint(&url).expect("TLS endpoint");
        async move { endpoint.connect().await.expect("TLS connection") }
    };
    let mut client = FlightSqlServiceClient::new(connect(cluster.url().to_string()).await);
    client.set_token(TOKEN.to_string());
    client
        .execute_update(volley_tests::emp_table_sql(), None)
        .await
        .expect("CREATE EXTERNAL TABLE over Flight SQL");
    // The TLS client above ran the same query with this token: without the result cache the
    // rows come from the executors.
    client
        .execute_update("SET volley.result_cache_ttl = '0'".into(), None)
        .await
        .expect("SET over Flight SQL");
    let info = client
        .execute(BY_DEPT.into(), None)
        .await
        .expect("query over Flight SQL with TLS");
    let mut batches = Vec::new();
    for endpoint in &info.endpoint {
        let ticket = endpoint.ticket.clone().expect("ticket");
        let location = endpoint.location.first().expect("rows at an executor");
        assert!(location.uri.starts_with("grpc+tls://"), "{}", location.uri);
        let url = location.uri.replace("grpc+tls://", "https://");
        let mut executor = FlightSqlServiceClient::new(connect(url).await);
        executor.set_token(TOKEN.to_string());
        let rows: Vec<_> = executor
            .do_get(ticket)
            .await
            .expect("rows over TLS")
            .try_collect()
            .await
            .expect("batches");
        batches.extend(rows);
    }
    assert_eq!(rows(&batches).unwrap(), expected_by_dept().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_rejects_escapes_and_allows_its_roots() {
    volley_tests::init_tracing();
    let allowed = tempfile::tempdir().unwrap();
    let data = allowed.path().join("nums.csv");
    std::fs::write(&data, "x\n1\n2\n3\n").unwrap();
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink("/etc", allowed.path().join("etc-link")).unwrap();
        // A symlinked file, alone and inside an allowed folder of tables.
        std::os::unix::fs::symlink("/etc/passwd", allowed.path().join("passwd.csv")).unwrap();
        std::fs::create_dir_all(allowed.path().join("tables")).unwrap();
        std::fs::write(allowed.path().join("tables/a.csv"), "line\nok\n").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", allowed.path().join("tables/b.csv")).unwrap();
    }
    // A folder of tables holding a symlinked folder that leads outside (file names there
    // must not get out either).
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("hidden-name.csv"), "line\nsecret\n").unwrap();
    std::fs::create_dir_all(allowed.path().join("nested")).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(outside.path(), allowed.path().join("nested/sub")).unwrap();
    let root = allowed.path().display().to_string();
    let cluster = ProcessCluster::start(1, 1, &["--allowed-path", &root])
        .await
        .expect("cluster");
    let client = cluster.client().await.unwrap();

    let escapes = [
        "CREATE EXTERNAL TABLE p STORED AS CSV LOCATION '/etc/passwd'".to_string(),
        format!("CREATE EXTERNAL TABLE p STORED AS CSV LOCATION '{root}/../../etc/passwd'"),
        format!("CREATE EXTERNAL TABLE p STORED AS CSV LOCATION '{root}/etc-link/passwd'"),
        "CREATE EXTERNAL TABLE p STORED AS PARQUET LOCATION 's3://bucket/x/'".to_string(),
        "COPY (SELECT 1 AS x) TO '/tmp/volley-sandbox-escape.csv' STORED AS CSV".to_string(),
        // `file:` without `//` is a URL for DataFusion, not a relative path.
        "CREATE EXTERNAL TABLE p (line VARCHAR) STORED AS CSV LOCATION 'file:/etc/passwd' \
         OPTIONS ('format.has_header' 'false', 'format.delimiter' '|')"
            .to_string(),
        "CREATE EXTERNAL TABLE p STORED AS CSV LOCATION 'file:///etc/passwd'".to_string(),
        format!(
            "CREATE EXTERNAL TABLE p (line VARCHAR) STORED AS CSV LOCATION '{root}/passwd.csv'"
        ),
        "CREATE EXTERNAL TABLE p (line VARCHAR) STORED AS CSV LOCATION '/etc/*.conf'".to_string(),
    ];
    for sql in &escapes {
        let err = client.sql(sql).await.expect_err(sql).to_string();
        assert!(err.contains("outside the file sandbox"), "{sql}: {err}");
    }
    assert!(!Path::new("/tmp/volley-sandbox-escape.csv").exists());

    // A folder inside the root holding a symlink to /etc/passwd: the table may be declared,
    // and neither a query (executors) nor CREATE TABLE AS sees the link (listings leave it
    // out); a folder that is a symlink leading outside shows nothing (its files' names used to
    // reach the client in the read's error).
    client
        .sql(&format!(
            "CREATE EXTERNAL TABLE t (line VARCHAR) STORED AS CSV LOCATION '{root}/tables/' \
             OPTIONS ('format.has_header' 'true')"
        ))
        .await
        .expect("the folder is inside the root");
    let ok = vec![vec!["ok".to_string()]];
    let (_, batches) = client.sql("SELECT * FROM t").await.unwrap();
    assert_eq!(rows(&batches).unwrap(), ok);
    client
        .sql("CREATE TABLE y AS SELECT * FROM t")
        .await
        .unwrap();
    let (_, batches) = client.sql("SELECT * FROM y").await.unwrap();
    assert_eq!(rows(&batches).unwrap(), ok);
    client
        .sql(&format!(
            "CREATE EXTERNAL TABLE n (line VARCHAR) STORED AS CSV LOCATION '{root}/nested/' \
             OPTIONS ('format.has_header' 'true')"
        ))
        .await
        .expect("the folder is inside the root");
    let (_, batches) = client.sql("SELECT * FROM n").await.unwrap();
    assert!(rows(&batches).unwrap().is_empty());
    let globbed = format!(
        "CREATE EXTERNAL TABLE g (line VARCHAR) STORED AS CSV LOCATION '{root}/tables/a*.csv' \
         OPTIONS ('format.has_header' 'true')"
    );
    client.sql(&globbed).await.expect("a glob inside the root");
    let (_, batches) = client.sql("SELECT * FROM g").await.unwrap();
    assert_eq!(rows(&batches).unwrap(), vec![vec!["ok".to_string()]]);

    client
        .sql(&format!(
            "CREATE EXTERNAL TABLE nums (x INT) STORED AS CSV LOCATION '{}' OPTIONS ('format.has_header' 'true')",
            data.display()
        ))
        .await
        .expect("allowed path works");
    let (_, batches) = client.sql("SELECT sum(x) FROM nums").await.unwrap();
    assert_eq!(rows(&batches).unwrap(), vec![vec!["6".to_string()]]);
    let out = allowed.path().join("out");
    client
        .sql(&format!(
            "COPY (SELECT x * 10 AS y FROM nums) TO '{}/' STORED AS CSV",
            out.display()
        ))
        .await
        .expect("COPY inside the root works");
    assert!(out.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_can_be_disabled() {
    volley_tests::init_tracing();
    let config = SchedulerConfig {
        allow_ddl: false,
        ..SchedulerConfig::default().with_address("127.0.0.1", 0)
    };
    let cluster = EmbeddedCluster::start_with(config, 1, 1).await.unwrap();
    let client = cluster.client().await.unwrap();
    let err = client
        .sql(&format!(
            "CREATE EXTERNAL TABLE emp STORED AS CSV LOCATION '{}'",
            volley_tests::data_file("emp.csv")
        ))
        .await
        .expect_err("DDL refused")
        .to_string();
    assert!(err.contains("disabled on this cluster"), "{err}");
    let (_, batches) = client.sql("SELECT 1 + 1 AS two").await.unwrap();
    assert_eq!(rows(&batches).unwrap(), vec![vec!["2".to_string()]]);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_plan_names_the_limit() {
    volley_tests::init_tracing();
    let config = SchedulerConfig {
        max_message_size: 64 * 1024,
        ..SchedulerConfig::default().with_address("127.0.0.1", 0)
    };
    let cluster = EmbeddedCluster::start_with(config, 2, 1).await.unwrap();
    let client = cluster.client().await.unwrap();
    volley_tests::register_emp(&client)
        .await
        .expect("register emp");
    // ~40 KiB of SQL (under the limit) that plans into a much larger IN list.
    let list: Vec<String> = (0..8000).map(|i| (10000 + i).to_string()).collect();
    let sql = format!(
        "SELECT count(*) FROM emp WHERE salary IN ({})",
        list.join(",")
    );
    assert!(sql.len() < 64 * 1024);
    let err = client.sql(&sql).await.expect_err("too big").to_string();
    assert!(
        err.contains("message size limit") && err.contains("--max-message-size"),
        "{err}"
    );
    // A request over the limit is refused with the same advice.
    let huge = format!("SELECT '{}' AS s", "x".repeat(70 * 1024));
    let err = client.sql(&huge).await.expect_err("too big").to_string();
    assert!(err.contains("--max-message-size"), "{err}");
    authorized_query_works(&client).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_over_the_concurrency_limit_queue() {
    volley_tests::init_tracing();
    let config = SchedulerConfig {
        max_concurrent_jobs: 1,
        enable_test_hooks: true,
        ..SchedulerConfig::default().with_address("127.0.0.1", 0)
    };
    let cluster = EmbeddedCluster::start_with(config, 2, 2).await.unwrap();
    let slow = cluster.client().await.unwrap();
    volley_tests::register_emp(&slow)
        .await
        .expect("register emp");
    // The first job is held in stage 1 until the second was seen waiting.
    let hold = Hold::new(1).unwrap();
    slow.sql(&hold.set_sql()).await.unwrap();
    let fast = cluster.client().await.unwrap();
    volley_tests::register_emp(&fast)
        .await
        .expect("register emp");

    let first = slow.submit(BY_DEPT).await.unwrap();
    let second = fast.submit(BY_DEPT).await.unwrap();
    let status = fast.status(&second).await.unwrap();
    assert_eq!(
        status.status,
        Some(pb::job_status::Status::Running("queued".to_string())),
        "second job waits while the first runs"
    );
    hold.release().unwrap();
    let second_rows = rows(&fast.sql_job_rows(&second).await.unwrap()).unwrap();
    let first_rows = rows(&slow.sql_job_rows(&first).await.unwrap()).unwrap();
    let expected = expected_by_dept().await;
    assert_eq!(first_rows, expected);
    assert_eq!(second_rows, expected);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposed_scheduler_needs_a_token_or_insecure() {
    let port = free_port().unwrap().to_string();
    let out = Command::new(volley_bin().unwrap())
        .args([
            "scheduler",
            "--host",
            "0.0.0.0",
            "--port",
            &port,
            "--http-port",
            "0",
        ])
        .env_remove("VOLLEY_AUTH_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("without an auth token") && err.contains("--insecure"),
        "{err}"
    );
    // Port 0: the scheduler picks a free port and prints it (no race with other tests).
    let mut insecure = Command::new(volley_bin().unwrap())
        .args([
            "scheduler",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--insecure",
        ])
        .args(["--http-port", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = insecure.stderr.take().unwrap();
    let (port_tx, port_rx) = std::sync::mpsc::channel::<String>();
    // Keep draining stderr after the port line: a closed pipe would make the scheduler's next
    // log line fail.
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(port) = line.strip_prefix("volley scheduler listening on http://0.0.0.0:") {
                let _ = port_tx.send(port.to_string());
            }
        }
    });
    let port = tokio::task::spawn_blocking(move || port_rx.recv_timeout(Duration::from_secs(20)))
        .await
        .unwrap()
        .expect("insecure scheduler starts and prints its port");
    let client = VolleyClient::connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("insecure scheduler serves");
    // It serves: a session was created; EXPLAIN runs on the scheduler itself.
    let (_, batches) = client.sql("EXPLAIN SELECT 1").await.unwrap();
    let _ = insecure.kill();
    let _ = insecure.wait();
    assert!(rows(&batches).unwrap()[0][0].starts_with("Stage"));
}
