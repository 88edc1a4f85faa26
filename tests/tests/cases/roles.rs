//! Separate roles, attacked with hand-built clients that hold only the client token: they can
//! submit, cancel and fetch results, but not act as an executor or the scheduler, and not read
//! any file but their own results.

use std::time::Duration;

use arrow_flight::Ticket;
use arrow_flight::flight_service_client::FlightServiceClient;
use futures::TryStreamExt;
use volley::ClientOptions;
use volley_core::protobuf::executor_grpc_client::ExecutorGrpcClient;
use volley_core::protobuf::scheduler_grpc_client::SchedulerGrpcClient;
use volley_core::protobuf::{self as pb};
use volley_core::security::Security;
use volley_tests::compare::rows;
use volley_tests::process::{ProcessCluster, ProcessOptions};

const TOKEN: &str = "client-token-for-roles";
const BY_DEPT: &str = "SELECT dept_id, count(*) AS n FROM emp GROUP BY dept_id ORDER BY dept_id";

/// A channel to `port` whose calls carry the client token only.
async fn as_client(port: u16) -> volley_core::security::AuthChannel {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Security::none()
        .with_token(Some(TOKEN.to_string()))
        .authed(channel)
        .unwrap()
}

fn denied<T: std::fmt::Debug>(result: Result<T, tonic::Status>, what: &str) {
    let status = result.expect_err(what);
    assert_eq!(
        status.code(),
        tonic::Code::PermissionDenied,
        "{what}: {status}"
    );
    assert!(
        status.message().contains("cluster token"),
        "{what}: {status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_token_is_not_cluster_root() {
    volley_tests::init_tracing();
    let options = ProcessOptions {
        env: vec![("VOLLEY_AUTH_TOKEN".to_string(), TOKEN.to_string())],
        client: ClientOptions::with_token(TOKEN),
        log_dir: None,
        executor_hosts: Vec::new(),
    };
    let cluster = ProcessCluster::start_with(2, 1, &[], options)
        .await
        .expect("cluster");
    let client = cluster.client().await.unwrap();
    volley_tests::register_emp(&client).await.unwrap();

    // Executor RPCs: launching a task (a CSV scan of /etc/shadow, say), cancelling, deleting.
    let port = cluster.executor_ports()[0];
    let mut executor = ExecutorGrpcClient::new(as_client(port).await);
    denied(
        executor
            .launch_tasks(pb::LaunchTasksParams { tasks: vec![] })
            .await,
        "launch",
    );
    denied(
        executor
            .cancel_tasks(pb::CancelTasksParams {
                job_id: "x".to_string(),
            })
            .await,
        "cancel tasks",
    );
    denied(
        executor
            .remove_job_data(pb::RemoveJobDataParams {
                job_id: "x".to_string(),
            })
            .await,
        "remove job data",
    );

    // Scheduler RPCs of executors: registering, heartbeats, a forged "task done, output at
    // /etc/shadow".
    let scheduler_port: u16 = cluster.url().rsplit(':').next().unwrap().parse().unwrap();
    let mut scheduler = SchedulerGrpcClient::new(as_client(scheduler_port).await);
    let executors = client.cluster_state().await.unwrap().executors;
    denied(
        scheduler
            .register_executor(pb::RegisterExecutorParams {
                metadata: Some(executors[0].clone()),
                held_outputs: Vec::new(),
            })
            .await,
        "register",
    );
    denied(
        scheduler
            .heartbeat(pb::HeartbeatParams {
                executor_id: executors[0].id.clone(),
                ..Default::default()
            })
            .await,
        "heartbeat",
    );
    let forged = pb::TaskStatus {
        task: Some(pb::TaskId {
            job_id: "j".to_string(),
            stage_id: 1,
            partition: 0,
            attempt: 0,
        }),
        executor_id: executors[0].id.clone(),
        status: Some(pb::task_status::Status::Succeeded(pb::TaskSucceeded {
            partitions: vec![pb::PartitionStats {
                output_partition: 0,
                path: "/etc/shadow".to_string(),
                num_rows: 1,
                num_bytes: 1,
                in_memory: false,
            }],
            ..Default::default()
        })),
    };
    denied(
        scheduler
            .update_task_status(pb::UpdateTaskStatusParams {
                statuses: vec![forged],
                executor_id: executors[0].id.clone(),
                secret: String::new(),
                take_tasks: true,
            })
            .await,
        "status report",
    );

    // Flight: a result file needs the scheduler's grant for exactly its path; any other file
    // (a shuffle file, /etc/passwd) is "not found", the same answer as a missing one.
    let job_id = client.submit(BY_DEPT).await.unwrap();
    let done = client.wait(&job_id).await.unwrap();
    let location = done
        .locations
        .iter()
        .find(|l| l.num_rows > 0)
        .expect("a result file")
        .clone();
    assert_eq!(location.grant.len(), 64, "result locations carry a grant");
    let mut flight = FlightServiceClient::new(as_client(location.flight_port as u16).await);
    let granted = volley_core::grant::ticket(&location.path, &location.grant);
    let stream = flight
        .do_get(Ticket::new(granted))
        .await
        .expect("granted read")
        .into_inner();
    let data: Vec<arrow_flight::FlightData> =
        tokio::time::timeout(Duration::from_secs(20), stream.try_collect())
            .await
            .unwrap()
            .expect("granted read");
    let bytes: usize = data.iter().map(|d| d.data_body.len()).sum();
    assert!(bytes > 0, "the result file's bytes arrive");
    let sibling = location.path.replace("part-", "part-9");
    for ticket in [
        location.path.clone().into_bytes(),
        volley_core::grant::ticket(&sibling, &location.grant),
        volley_core::grant::ticket("/etc/passwd", &location.grant),
        b"/etc/passwd".to_vec(),
    ] {
        let status = flight
            .do_get(Ticket::new(ticket))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::NotFound, "{status}");
        assert_eq!(status.message(), "no such shuffle file for this ticket");
    }

    // The DataFrame API takes the same credentials.
    assert!(
        volley::remote(cluster.url()).await.is_err(),
        "no token, no session"
    );
    let ctx = volley::remote_with(cluster.url(), ClientOptions::with_token(TOKEN))
        .await
        .expect("a DataFrame session with the client token");
    ctx.register_csv(
        "emp",
        &volley_tests::data_file("emp.csv"),
        datafusion::prelude::CsvReadOptions::new(),
    )
    .await
    .unwrap();
    let batches = ctx.sql(BY_DEPT).await.unwrap().collect().await.unwrap();
    assert_eq!(rows(&batches).unwrap().len(), 4);

    // The client's own work goes on: submit, fetch, cancel.
    let (_, batches) = client.sql(BY_DEPT).await.unwrap();
    assert_eq!(rows(&batches).unwrap().len(), 4);
    assert_eq!(client.cluster_state().await.unwrap().executors.len(), 2);
    drop(cluster);
}

/// Jobs belong to the session that submitted them: another session holding the same client
/// token cannot see, cancel, release or fetch them, does not find them in the cluster state,
/// and the status page (which lists every job) needs the cluster token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_belong_to_the_session_that_submitted_them() {
    volley_tests::init_tracing();
    const CLUSTER: &str = "cluster-token-for-roles";
    let options = ProcessOptions {
        env: vec![
            ("VOLLEY_AUTH_TOKEN".to_string(), TOKEN.to_string()),
            ("VOLLEY_CLUSTER_TOKEN".to_string(), CLUSTER.to_string()),
        ],
        client: ClientOptions::with_token(TOKEN),
        ..ProcessOptions::default()
    };
    let cluster = ProcessCluster::start_with(1, 1, &[], options)
        .await
        .expect("cluster");
    let alice = cluster.client().await.unwrap();
    let mallory = cluster.client().await.unwrap();
    volley_tests::register_emp(&alice).await.unwrap();
    let job_id = alice.submit(BY_DEPT).await.unwrap();
    alice.wait(&job_id).await.unwrap();

    // Another session: the job is unknown to it, whatever it tries.
    let unknown = |what: &str, e: volley_core::VolleyError| {
        assert!(
            e.to_string().contains(&format!("unknown job {job_id}")),
            "{what}: {e}"
        );
    };
    unknown("status", mallory.status(&job_id).await.unwrap_err());
    unknown("cancel", mallory.cancel(&job_id).await.unwrap_err());
    unknown("fetch", mallory.sql_job_rows(&job_id).await.unwrap_err());
    let listed = |state: &pb::GetClusterStateResult| state.jobs.iter().any(|j| j.job_id == job_id);
    assert!(!listed(&mallory.cluster_state().await.unwrap()));
    assert!(listed(&alice.cluster_state().await.unwrap()));
    // A hand-built client naming no session (or a made-up one) gets the same answer, and its
    // release does not touch the job.
    let scheduler_port: u16 = cluster.url().rsplit(':').next().unwrap().parse().unwrap();
    let mut raw = SchedulerGrpcClient::new(as_client(scheduler_port).await);
    for session_id in ["", "0123456789abcdef0123456789abcdef"] {
        let status = raw
            .get_job_status(pb::GetJobStatusParams {
                job_id: job_id.clone(),
                wait_ms: 0,
                session_id: session_id.to_string(),
                release_inline: false,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound, "{status}");
        let status = raw
            .release_job(pb::ReleaseJobParams {
                job_id: job_id.clone(),
                session_id: session_id.to_string(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound, "{status}");
    }
    let state = raw
        .get_cluster_state(pb::GetClusterStateParams::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        state.jobs.is_empty(),
        "no session, no jobs: {:?}",
        state.jobs
    );

    // The status page lists every session's jobs: the client token is refused, the cluster
    // token sees the job.
    let api = format!("{}/api/jobs", cluster.http_url());
    let (status, body) = volley_tests::http("GET", api.clone(), Some(TOKEN)).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("cluster token"), "{body}");
    let (status, body) = volley_tests::http("GET", api, Some(CLUSTER)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&job_id), "{body}");
    let operator =
        volley::VolleyClient::connect_with(cluster.url(), ClientOptions::with_token(CLUSTER))
            .await
            .unwrap();
    assert!(listed(&operator.cluster_state().await.unwrap()));

    // The owner still gets its rows, exact.
    let batches = alice.sql_job_rows(&job_id).await.unwrap();
    let expected: Vec<Vec<String>> = [["10", "2"], ["20", "3"], ["30", "2"], ["NULL", "1"]]
        .iter()
        .map(|r| r.iter().map(|v| v.to_string()).collect())
        .collect();
    assert_eq!(rows(&batches).unwrap(), expected);
    drop(cluster);
}

/// An executor refuses to listen beyond loopback without a token (anyone reaching it could
/// launch tasks), and with a client token the scheduler and executors need a cluster token.
#[test]
fn exposed_executors_and_one_token_clusters_are_refused() {
    use std::process::Command;
    use volley_tests::process::volley_bin;
    let run = |args: &[&str]| {
        let out = Command::new(volley_bin().unwrap())
            .args(args)
            .env_remove("VOLLEY_AUTH_TOKEN")
            .env_remove("VOLLEY_CLUSTER_TOKEN")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} must not start");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let err = run(&[
        "executor",
        "--host",
        "0.0.0.0",
        "--port",
        "0",
        "--scheduler",
        "http://127.0.0.1:1",
    ]);
    assert!(
        err.contains("refusing to listen on 0.0.0.0 without a token") && err.contains("--insecure"),
        "{err}"
    );
    for command in ["scheduler", "executor"] {
        let err = run(&[command, "--port", "0", "--auth-token", "only-one"]);
        assert!(err.contains("--auth-token needs --cluster-token"), "{err}");
    }
}
