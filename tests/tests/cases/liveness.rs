//! Liveness under saturation: an executor whose every task slot runs CPU-bound work that never
//! yields keeps its heartbeats (they run on a thread of their own), so the scheduler neither
//! declares it lost nor re-runs its tasks. (A SIGSTOPped executor is still declared lost:
//! `cases::faults::sigstop_executor_tasks_retried_elsewhere_rows_counted_once`.)

use std::time::Duration;

use volley::{EmbeddedCluster, VolleyClient};
use volley_scheduler::SchedulerConfig;
use volley_tests::compare::rows;
use volley_tests::process::ProcessCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_executor_is_not_declared_lost() {
    volley_tests::init_tracing();
    // As many slots as the executor process has tokio workers: busy tasks take them all.
    let slots = std::thread::available_parallelism().map_or(2, |n| n.get());
    let cluster = ProcessCluster::start(1, slots, &["--executor-timeout-secs", "2"])
        .await
        .unwrap();
    let client = cluster.client().await.unwrap();
    busy_tasks_run_once(&client, slots).await;
    drop(cluster);
}

/// The embedded cluster (`volley sql`) runs its executors' tasks on this process's runtime:
/// with every worker of it busy, a scheduler on the same runtime could neither take
/// heartbeats nor report progress, and declared its executors lost once the tasks let go.
/// It has threads of its own now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_embedded_cluster_keeps_its_executors() {
    volley_tests::init_tracing();
    // The embedded executors heartbeat every 2 s: a timeout of twice that (a 2 s timeout
    // was flaky under the full suite's load); the probe below is what a starved scheduler
    // fails.
    let config = SchedulerConfig {
        executor_timeout: Duration::from_secs(4),
        enable_test_hooks: true,
        ..SchedulerConfig::default().with_address("127.0.0.1", 0)
    };
    // Two slots: the busy tasks take both workers of this test's runtime.
    let cluster = EmbeddedCluster::start_with(config, 1, 2).await.unwrap();
    let client = cluster.client().await.unwrap();
    // While the tasks hold every worker, the scheduler answers a client at once (from a
    // thread of the test's own, as another process would ask).
    let url = cluster.url();
    let probe = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let start = std::time::Instant::now();
            let other = VolleyClient::connect(&url).await.unwrap();
            let state = other.cluster_state().await.unwrap();
            (
                start.elapsed(),
                state.jobs.iter().any(|j| j.state == "running"),
            )
        })
    });
    busy_tasks_run_once(&client, 2).await;
    let (answered_in, running) = probe.join().unwrap();
    assert!(running, "the probe asked while the busy job ran");
    assert!(
        answered_in < Duration::from_millis(1000),
        "the scheduler answered only after {answered_in:?}: starved by the tasks"
    );
    cluster.shutdown().await;
}

/// A job whose first stage keeps every slot busy for 3 s (longer than the executor timeout)
/// answers exactly, with no task re-run and the same executor registered throughout.
async fn busy_tasks_run_once(client: &VolleyClient, slots: usize) {
    let dir = tempfile::tempdir().unwrap();
    // Several files: stage 1 gets a task for every slot, all busy at once.
    for i in 0..2 * slots {
        std::fs::write(dir.path().join(format!("part-{i}.csv")), "k,v\na,1\nb,2\n").unwrap();
    }
    client
        .sql(&format!(
            "CREATE EXTERNAL TABLE t (k VARCHAR, v BIGINT) STORED AS CSV LOCATION '{}/' \
             OPTIONS ('format.has_header' 'true')",
            dir.path().display()
        ))
        .await
        .unwrap();
    let before = client.cluster_state().await.unwrap().executors;
    // Each task of stage 1 keeps its worker busy for 3 s, longer than the executor timeout.
    client
        .sql("SET volley.test_busy_task = '1:3000'")
        .await
        .unwrap();
    let job_id = client
        .submit("SELECT k, count(*) AS n, sum(v) AS s FROM t GROUP BY k ORDER BY k")
        .await
        .unwrap();
    let outcome = client.sql_job_rows(&job_id).await;
    let state = client.cluster_state().await.unwrap();
    let job = state.jobs.iter().find(|j| j.job_id == job_id).unwrap();
    let retried: Vec<String> = job
        .tasks
        .iter()
        .filter_map(|t| t.task.as_ref())
        .filter(|t| t.attempt > 0)
        .map(|t| {
            format!(
                "task {} of stage {} attempt {}",
                t.partition, t.stage_id, t.attempt
            )
        })
        .collect();
    assert!(
        retried.is_empty(),
        "the busy executor was declared lost and its tasks re-run: {retried:?}"
    );
    let files = 2 * slots;
    let expected = vec![
        vec!["a".to_string(), files.to_string(), files.to_string()],
        vec!["b".to_string(), files.to_string(), (2 * files).to_string()],
    ];
    let batches = outcome.expect("the query succeeds");
    assert_eq!(rows(&batches).unwrap(), expected);
    let after = client.cluster_state().await.unwrap().executors;
    let ids = |e: &[volley_core::protobuf::ExecutorMetadata]| {
        e.iter().map(|e| e.id.clone()).collect::<Vec<_>>()
    };
    assert_eq!(ids(&after), ids(&before), "the same executor, never lost");
}

/// A killed executor's connection closes: the scheduler declares it lost at once (its attach
/// stream ended) instead of after the heartbeat timeout (60 s here), and a query right after
/// runs exactly on the executor that is left. (A SIGSTOPped executor keeps its connection
/// open and is still found out by the timeout: `cases::faults`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_executor_is_lost_at_once_not_after_the_timeout() {
    volley_tests::init_tracing();
    let mut cluster = ProcessCluster::start(2, 1, &["--executor-timeout-secs", "60"])
        .await
        .unwrap();
    let client = cluster.client().await.unwrap();
    volley_tests::register_emp(&client).await.unwrap();
    cluster.kill_executor(0).unwrap();
    let killed = std::time::Instant::now();
    loop {
        let alive = client.cluster_state().await.unwrap().executors.len();
        if alive == 1 {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "the killed executor is still listed after {:?}",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = killed.elapsed();
    assert!(seen < Duration::from_secs(5), "lost after {seen:?}");
    let (_, batches) = client
        .sql("SELECT dept_id, count(*) AS n FROM emp GROUP BY dept_id ORDER BY dept_id")
        .await
        .unwrap();
    assert_eq!(rows(&batches).unwrap().len(), 4);
    drop(cluster);
}
