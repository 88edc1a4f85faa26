//! The scheduler's status page in a real headless browser, the JSON API's numbers, Prometheus
//! metrics, HTTP auth, and distributed traces exported over OTLP.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use serde_json::Value as Json;
use volley::{ClientOptions, EmbeddedCluster, VolleyClient};
use volley_core::security::Security;
use volley_scheduler::SchedulerConfig;
use volley_tests::Hold;
use volley_tests::compare::rows;
use volley_tests::http;
use volley_tests::process::{ProcessCluster, ProcessOptions, free_port};

const BY_DEPT: &str = "SELECT dept_id, count(*) AS n, sum(salary) AS total FROM emp GROUP BY dept_id ORDER BY dept_id";

async fn json(url: String, token: Option<&str>) -> Json {
    let (status, body) = http("GET", url.clone(), token).await;
    assert_eq!(status, 200, "{url}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Number of `Stage` lines of Volley's EXPLAIN: the expected stage count.
async fn explained_stages(client: &VolleyClient, sql: &str) -> usize {
    let (_, batches) = client.sql(&format!("EXPLAIN {sql}")).await.unwrap();
    rows(&batches)
        .unwrap()
        .iter()
        .filter(|r| r[0].starts_with("Stage "))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_in_headless_browser() {
    volley_tests::init_tracing();
    let token = "browser-test-token";
    // The status page lists every session's jobs: it needs the cluster token.
    let ops = "browser-test-cluster-token";
    let options = ProcessOptions {
        env: vec![
            ("VOLLEY_AUTH_TOKEN".to_string(), token.to_string()),
            ("VOLLEY_CLUSTER_TOKEN".to_string(), ops.to_string()),
        ],
        client: ClientOptions::with_token(token),
        log_dir: None,
        executor_hosts: Vec::new(),
    };
    let cluster = ProcessCluster::start_with(2, 2, &[], options)
        .await
        .expect("cluster");
    let client = cluster.client().await.unwrap();
    volley_tests::register_emp(&client)
        .await
        .expect("register emp");
    // Every planned stage runs as its own (no adaptive fusion): the checks count them.
    client
        .sql("SET volley.adaptive_fuse_bytes = 0")
        .await
        .unwrap();
    let stages = explained_stages(&client, BY_DEPT).await;
    assert!(stages >= 2);
    // Stage 1 is held until the browser has seen the job running (it creates the release
    // file itself), however slowly Chromium starts on a loaded machine.
    let hold = Hold::new(1).unwrap();
    client.sql(&hold.set_sql()).await.unwrap();
    let job_id = client.submit(BY_DEPT).await.unwrap();

    let out: PathBuf = volley_tests::workspace_root().join("target/test-output/status-page");
    std::fs::create_dir_all(&out).unwrap();
    let script = volley_tests::workspace_root().join("tests/browser/status_page.mjs");
    let output = tokio::process::Command::new("node")
        .arg(&script)
        .args([cluster.http_url(), &job_id, &stages.to_string()])
        .arg(&out)
        .arg(hold.release_file())
        .arg(ops)
        .output()
        .await
        .expect("node runs (install with `npm ci --prefix tests/browser`)");
    // Never leave the job held, even when the browser failed before releasing it.
    hold.release().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "browser run failed:\n{stdout}\n{stderr}"
    );
    let seen: Json = serde_json::from_str(stdout.trim()).expect("browser report");
    assert_eq!(seen["jobs_page_running"], true);
    assert_eq!(
        seen["auto_refresh"], true,
        "pages of a running job reload themselves"
    );
    assert_eq!(seen["dag_stages"], stages);
    assert_eq!(seen["job_state_while_running"], "running");
    assert_eq!(seen["job_state_at_end"], "succeeded");
    assert_eq!(seen["succeeded_stages"], stages);
    assert_eq!(seen["jobs_page_succeeded"], true);
    assert_eq!(seen["executor_rows"], 2);
    for shot in [
        "1-jobs-running.png",
        "2-job-running.png",
        "3-stage.png",
        "4-job-succeeded.png",
    ] {
        assert!(out.join(shot).metadata().unwrap().len() > 1000, "{shot}");
    }
    // The job's result is still exact.
    let result = rows(&client.sql_job_rows(&job_id).await.unwrap()).unwrap();
    assert_eq!(result.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_api_numbers_metrics_and_http_auth() {
    volley_tests::init_tracing();
    let client_token = "api-test-token";
    // The status page and API list every session's jobs: they need the cluster token.
    let token = "api-test-cluster-token";
    let config = SchedulerConfig {
        security: Security::none()
            .with_token(Some(client_token.to_string()))
            .with_cluster_token(Some(token.to_string())),
        enable_test_hooks: true,
        ..SchedulerConfig::default().with_address("127.0.0.1", 0)
    };
    let cluster = EmbeddedCluster::start_with(config, 2, 2).await.unwrap();
    let base = cluster.scheduler().http_url().expect("status page on");
    let client = cluster.client().await.unwrap();
    volley_tests::register_emp(&client)
        .await
        .expect("register emp");
    // Every planned stage runs as its own (no adaptive fusion): the checks count them.
    client
        .sql("SET volley.adaptive_fuse_bytes = 0")
        .await
        .unwrap();
    let job_id = client.submit(BY_DEPT).await.unwrap();
    let result = client.sql_job_rows(&job_id).await.unwrap();
    let result_rows = rows(&result).unwrap().len() as u64;
    assert_eq!(result_rows, 4);

    // Pages and API need the token; cancel without it is refused.
    assert_eq!(http("GET", format!("{base}/api/jobs"), None).await.0, 401);
    assert_eq!(
        http("GET", format!("{base}/jobs"), Some("wrong")).await.0,
        401
    );
    assert_eq!(http("GET", format!("{base}/metrics"), None).await.0, 401);
    let (status, body) = http("GET", format!("{base}/api/jobs"), Some(client_token)).await;
    assert_eq!(
        status, 403,
        "the client token sees only its own jobs: {body}"
    );
    let (status, _) = http("POST", format!("{base}/api/jobs/{job_id}/cancel"), None).await;
    assert_eq!(status, 401, "HTTP cancel without token");
    let (status, _) = http("POST", format!("{base}/jobs/{job_id}/cancel"), None).await;
    assert_eq!(status, 401, "form cancel without token");
    let (status, page) = http("GET", format!("{base}/jobs?token={token}"), None).await;
    assert_eq!(status, 200);
    assert!(page.contains(&job_id));

    let jobs = json(format!("{base}/api/jobs"), Some(token)).await;
    let summary = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == job_id.as_str())
        .expect("job listed");
    assert_eq!(summary["state"], "succeeded");
    assert_eq!(summary["sql"], BY_DEPT);
    assert_eq!(summary["rows_out"], result_rows);

    let job = json(format!("{base}/api/jobs/{job_id}"), Some(token)).await;
    let stages = job["stages"].as_array().unwrap();
    assert_eq!(stages.len(), explained_stages(&client, BY_DEPT).await);
    assert_eq!(job["stages_total"], stages.len());
    let mut tasks_total = 0;
    for stage in stages {
        let sid = stage["id"].as_u64().unwrap();
        let detail = json(
            format!("{base}/api/jobs/{job_id}/stages/{sid}"),
            Some(token),
        )
        .await;
        let partitions = detail["partitions"].as_u64().unwrap();
        let tasks = detail["tasks"].as_array().unwrap();
        assert_eq!(
            tasks.len() as u64,
            partitions,
            "task count = partition count"
        );
        assert_eq!(detail["tasks_done"], partitions);
        assert_eq!(detail["state"], "succeeded");
        assert!(tasks.iter().all(|t| t["state"] == "succeeded"));
        let task_rows: u64 = tasks.iter().map(|t| t["rows"].as_u64().unwrap()).sum();
        assert_eq!(detail["rows_out"].as_u64().unwrap(), task_rows);
        assert!(detail["durations"]["max_ms"].as_u64().is_some());
        assert!(!detail["plan"].as_array().unwrap().is_empty());
        tasks_total += partitions;
    }
    assert_eq!(job["tasks_total"], tasks_total);
    let result_stage = stages.last().unwrap();
    assert_eq!(result_stage["kind"], "result");
    assert_eq!(result_stage["rows_out"], result_rows);
    // The leaf stage scanned every row of the table, per DataFusion's metrics.
    assert_eq!(stages[0]["rows_in"], 8);
    let scan_metrics = stages[0]["plan"]
        .as_array()
        .unwrap()
        .iter()
        .any(|op| op["metrics"]["output_rows"].as_u64().is_some());
    assert!(scan_metrics, "per-operator metrics: {}", stages[0]["plan"]);

    let executors = json(format!("{base}/api/executors"), Some(token)).await;
    let executors = executors.as_array().unwrap();
    assert_eq!(executors.len(), 2);
    assert!(executors.iter().all(|e| e["state"] == "alive"));
    let completed: u64 = executors
        .iter()
        .map(|e| e["completed_tasks"].as_u64().unwrap())
        .sum();
    assert_eq!(completed, tasks_total);

    let (status, metrics) = http("GET", format!("{base}/metrics"), Some(token)).await;
    assert_eq!(status, 200);
    assert!(metrics.contains("volley_executors_alive 2"), "{metrics}");
    assert!(
        metrics.contains("volley_jobs{state=\"succeeded\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("volley_task_duration_seconds_count {tasks_total}")),
        "{metrics}"
    );
    assert!(metrics.contains("volley_shuffle_bytes_written_total"));
    assert!(metrics.contains("volley_shuffle_bytes_fetched_total"));
    assert!(metrics.contains("volley_running_tasks 0"));

    // Job history keeps at most 4 KiB of a statement; /api/jobs is paginated.
    let long_sql = format!("SELECT 1 AS one -- {}", "x".repeat(100_000));
    client.sql(&long_sql).await.unwrap();
    let page = json(format!("{base}/api/jobs?limit=1"), Some(token)).await;
    let newest = page.as_array().unwrap();
    assert_eq!(newest.len(), 1);
    let kept = newest[0]["sql"].as_str().unwrap();
    assert!(kept.starts_with("SELECT 1 AS one -- xxx"), "{kept}");
    assert!(
        kept.len() < 4200 && kept.ends_with("more bytes)"),
        "{}",
        kept.len()
    );
    let second = json(format!("{base}/api/jobs?limit=1&offset=1"), Some(token)).await;
    assert_ne!(second[0]["id"], newest[0]["id"]);

    // A cancel with the token works (on a running job).
    let hold = Hold::new(1).unwrap();
    client.sql(&hold.set_sql()).await.unwrap();
    let slow = client.submit(BY_DEPT).await.unwrap();
    let (status, body) = http(
        "POST",
        format!("{base}/api/jobs/{slow}/cancel"),
        Some(token),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"cancelled\":true"), "{body}");
    let detail = json(format!("{base}/api/jobs/{slow}"), Some(token)).await;
    assert_eq!(detail["state"], "cancelled");
    cluster.shutdown().await;
}

#[derive(Clone, Debug)]
struct SpanRecord {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
    attributes: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<SpanRecord>>>,
}

fn text(value: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .map(|a| text(&a.value))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push(SpanRecord {
                        service: service.clone(),
                        name: span.name,
                        trace_id: span.trace_id,
                        span_id: span.span_id,
                        parent: span.parent_span_id,
                        attributes: span
                            .attributes
                            .iter()
                            .map(|a| (a.key.clone(), text(&a.value)))
                            .collect(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_spans_are_children_of_stage_spans_across_processes() {
    volley_tests::init_tracing();
    let collector = Collector::default();
    let port = free_port().unwrap();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream_wrapper(listener)),
    );
    let options = ProcessOptions {
        env: vec![
            (
                "VOLLEY_OTLP_ENDPOINT".to_string(),
                format!("http://127.0.0.1:{port}"),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY".to_string(), "100".to_string()),
        ],
        ..ProcessOptions::default()
    };
    let cluster = ProcessCluster::start_with(2, 1, &[], options)
        .await
        .expect("cluster");
    let client = cluster.client().await.unwrap();
    volley_tests::register_emp(&client)
        .await
        .expect("register emp");
    // Every planned stage runs as its own (no adaptive fusion): the checks count them.
    client
        .sql("SET volley.adaptive_fuse_bytes = 0")
        .await
        .unwrap();
    let job_id = client.submit(BY_DEPT).await.unwrap();
    let result = client.sql_job_rows(&job_id).await.unwrap();
    assert_eq!(rows(&result).unwrap().len(), 4);
    let stages = client
        .status(&job_id)
        .await
        .map(|s| s.stages_total as usize)
        .unwrap_or(0);
    let tasks_total: usize = {
        let state = client.cluster_state().await.unwrap();
        state
            .jobs
            .iter()
            .find(|j| j.job_id == job_id)
            .map(|j| j.tasks.len())
            .unwrap_or(0)
    };
    assert!(stages >= 2 && tasks_total >= stages);

    // Wait for the job, its stages and every task span to arrive.
    let deadline = Instant::now() + Duration::from_secs(30);
    let spans = loop {
        let spans = collector.spans.lock().unwrap().clone();
        let of_job = |s: &&SpanRecord| s.attributes.get("job_id") == Some(&job_id);
        let stage_spans = spans
            .iter()
            .filter(of_job)
            .filter(|s| s.name == "stage")
            .count();
        let task_spans = spans
            .iter()
            .filter(of_job)
            .filter(|s| s.name == "task")
            .count();
        let job_spans = spans
            .iter()
            .filter(of_job)
            .filter(|s| s.name == "job")
            .count();
        if job_spans == 1 && stage_spans == stages && task_spans >= tasks_total {
            break spans;
        }
        assert!(
            Instant::now() < deadline,
            "spans missing: job {job_spans}, stages {stage_spans}/{stages}, tasks {task_spans}/{tasks_total}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let of_job: Vec<&SpanRecord> = spans
        .iter()
        .filter(|s| s.attributes.get("job_id") == Some(&job_id))
        .collect();
    let job = of_job.iter().find(|s| s.name == "job").unwrap();
    assert_eq!(job.service, "volley-scheduler");
    for stage in of_job.iter().filter(|s| s.name == "stage") {
        assert_eq!(stage.service, "volley-scheduler");
        assert_eq!(stage.parent, job.span_id, "stage span under the job span");
        assert_eq!(stage.trace_id, job.trace_id);
    }
    for task in of_job.iter().filter(|s| s.name == "task") {
        assert_eq!(
            task.service, "volley-executor",
            "task spans come from executors"
        );
        let parent = of_job
            .iter()
            .find(|s| s.name == "stage" && s.span_id == task.parent)
            .unwrap_or_else(|| panic!("task span {:?} has no stage parent", task.attributes));
        assert_eq!(task.trace_id, job.trace_id);
        assert_eq!(
            parent.attributes.get("stage_id"),
            task.attributes.get("stage_id"),
            "a task's parent is its own stage"
        );
    }
    drop(cluster);
    server.abort();
}

fn tokio_stream_wrapper(
    listener: tokio::net::TcpListener,
) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener)
}

/// Without a token the status page answers only requests for this machine's names: a web page
/// that rebinds its DNS name to 127.0.0.1 cannot read it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_without_token_checks_the_host_header() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = EmbeddedCluster::start(1, 1).await.unwrap();
    let base = cluster.scheduler().http_url().expect("status page on");
    let address = base.trim_start_matches("http://").to_string();
    let status_for = |host: &'static str| {
        let address = address.clone();
        async move {
            let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
            let host = if host.is_empty() {
                address.as_str()
            } else {
                host
            };
            let request =
                format!("GET /api/jobs HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            answer.lines().next().unwrap_or_default().to_string()
        }
    };
    assert!(status_for("").await.contains(" 200 "));
    assert!(status_for("localhost").await.contains(" 200 "));
    assert!(status_for("evil.example:80").await.contains(" 403 "));
    cluster.shutdown().await;
}
