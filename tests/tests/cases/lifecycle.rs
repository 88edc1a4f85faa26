//! Task retries and cancellation on an in-process cluster (real gRPC servers on 127.0.0.1).

use std::time::{Duration, Instant};

use volley::EmbeddedCluster;
use volley_scheduler::SchedulerConfig;
use volley_scheduler::job::TaskState;
use volley_tests::Hold;
use volley_tests::compare::rows;

async fn cluster(task_max_attempts: u32) -> (EmbeddedCluster, volley::VolleyClient) {
    let config = SchedulerConfig {
        task_max_attempts,
        enable_test_hooks: true,
        ..SchedulerConfig::default().with_address("127.0.0.1", 0)
    };
    let cluster = EmbeddedCluster::start_with(config, 2, 2).await.unwrap();
    let client = cluster.client().await.unwrap();
    create_sales(&client).await;
    (cluster, client)
}

async fn create_sales(client: &volley::VolleyClient) {
    client.sql(&volley_tests::sales_table_sql()).await.unwrap();
}

/// Shuffle outputs the cluster holds: files in the work dirs and outputs kept in memory.
fn held(cluster: &EmbeddedCluster) -> usize {
    volley_tests::files_under(cluster.work_dir()) + cluster.outputs_in_memory()
}

const QUERY: &str = "SELECT region, count(*) AS n, sum(amount) AS total FROM sales GROUP BY region ORDER BY region NULLS LAST";

fn expected() -> Vec<Vec<String>> {
    [
        ["east", "2", "370.00"],
        ["north", "3", "237.75"],
        ["south", "3", "849.99"],
        ["west", "1", "11.11"],
        ["NULL", "1", "18.75"],
    ]
    .iter()
    .map(|r| r.iter().map(|v| v.to_string()).collect())
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_failing_every_attempt_fails_job_after_exactly_n_attempts() {
    volley_tests::init_tracing();
    let (cluster, client) = cluster(3).await;
    client
        .sql("SET volley.test_fail_task = '1:0'")
        .await
        .unwrap();
    let job_id = client.submit(QUERY).await.unwrap();
    let err = client
        .wait(&job_id)
        .await
        .expect_err("the task never succeeds")
        .to_string();
    assert!(
        err.contains("task 0 of stage 1 failed after 3 attempts"),
        "{err}"
    );
    assert!(err.contains("injected fault"), "{err}");
    let attempts = cluster.scheduler().service().with_state(|s| {
        let job = &s.jobs()[&job_id];
        let task = &job.stages[&1].tasks[0];
        (task.failures, task.attempt)
    });
    assert_eq!(attempts, (3, 3), "three failed attempts, no fourth");

    client.sql("SET volley.test_fail_task = ''").await.unwrap();
    let (_, batches) = client.sql(QUERY).await.expect("ordinary query succeeds");
    assert_eq!(rows(&batches).unwrap(), expected());
    cluster.shutdown().await;
}

async fn fail_first_attempt(task_max_attempts: u32) -> Result<(String, Option<String>), String> {
    let (cluster, client) = cluster(task_max_attempts).await;
    client
        .sql("SET volley.test_fail_task = '1:0:1'")
        .await
        .unwrap();
    let job_id = client.submit(QUERY).await.unwrap();
    let outcome = client.sql_job_rows(&job_id).await;
    let placement = cluster.scheduler().service().with_state(|s| {
        let task = &s.jobs()[&job_id].stages[&1].tasks[0];
        let ran_on = match &task.state {
            TaskState::Succeeded { executor_id, .. } => Some(executor_id.clone()),
            _ => None,
        };
        (task.avoid.clone(), ran_on)
    });
    cluster.shutdown().await;
    let batches = outcome.map_err(|e| e.to_string())?;
    assert_eq!(rows(&batches).unwrap(), expected());
    let (failed_on, ran_on) = placement;
    Ok((failed_on.unwrap_or_default(), ran_on))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_task_is_retried_on_another_executor() {
    volley_tests::init_tracing();
    let (failed_on, ran_on) = fail_first_attempt(4).await.expect("retry succeeds");
    assert!(!failed_on.is_empty(), "the first attempt failed");
    assert_ne!(
        Some(failed_on),
        ran_on,
        "the retry ran on the other executor"
    );
    let err = fail_first_attempt(1)
        .await
        .expect_err("without retries the fault fails the job");
    assert!(
        err.contains("task 0 of stage 1 failed after 1 attempts") && err.contains("injected fault"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_tasks_frees_slots_and_removes_files() {
    volley_tests::init_tracing();
    let (cluster, client) = cluster(4).await;
    // Stage 2 is held (never released): only the cancel ends it.
    let hold = Hold::new(2).unwrap();
    client.sql(&hold.set_sql()).await.unwrap();
    let job_id = client.submit(QUERY).await.unwrap();
    let service = cluster.scheduler().service().clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stage2_running = service.with_state(|s| {
            s.jobs()[&job_id].stages[&2]
                .tasks
                .iter()
                .any(|t| matches!(t.state, TaskState::Running { .. }))
        });
        if stage2_running {
            break;
        }
        assert!(Instant::now() < deadline, "stage 2 never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Stage 1 wrote shuffle files by now.
    let files_before = held(&cluster);
    assert!(files_before > 0, "stage 1 wrote shuffle output");

    let cancelled_at = Instant::now();
    assert!(client.cancel(&job_id).await.unwrap());
    let err = client
        .wait(&job_id)
        .await
        .expect_err("cancelled")
        .to_string();
    assert!(err.contains("cancelled"), "{err}");
    loop {
        let (free, slots, reported) = service.with_state(|s| {
            let alive = s.executors().values().filter(|e| e.alive);
            alive.fold((0, 0, 0), |(f, t, r), e| {
                (f + e.free_slots, t + e.slots, r + e.reported_running)
            })
        });
        if free == slots && reported == 0 && held(&cluster) == 0 {
            break;
        }
        assert!(
            cancelled_at.elapsed() < Duration::from_secs(5),
            "after cancel: free {free}/{slots}, executors report {reported} running, {} outputs",
            held(&cluster)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    client.sql(Hold::clear_sql()).await.unwrap();
    let (_, batches) = client.sql(QUERY).await.expect("next query runs");
    assert_eq!(rows(&batches).unwrap(), expected());
    cluster.shutdown().await;
}

/// A job that fails after its first stage wrote shuffle files leaves none behind. (The files
/// used to stay on the executor whose report failed the job: the cancel aborted its reporting
/// task, which cancelled the very RPC handler that was about to delete them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_leaves_no_files() {
    volley_tests::init_tracing();
    let (cluster, client) = cluster(1).await;
    client
        .sql("SET volley.test_fail_task = '2:0'")
        .await
        .unwrap();
    let err = client
        .sql(QUERY)
        .await
        .expect_err("stage 2 fails")
        .to_string();
    assert!(err.contains("injected fault"), "{err}");
    let job_id = cluster
        .scheduler()
        .service()
        .with_state(|s| s.job_order().last().cloned())
        .unwrap();
    let wrote = cluster
        .scheduler()
        .service()
        .with_state(|s| s.jobs()[&job_id].stages[&1].output_size().1);
    assert!(wrote > 0, "stage 1 wrote shuffle files");
    let deadline = Instant::now() + Duration::from_secs(10);
    while held(&cluster) > 0 {
        assert!(
            Instant::now() < deadline,
            "{} outputs left after the job failed",
            held(&cluster)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client.sql("SET volley.test_fail_task = ''").await.unwrap();
    let (_, batches) = client.sql(QUERY).await.expect("next query runs");
    assert_eq!(rows(&batches).unwrap(), expected());
    cluster.shutdown().await;
}

/// A job in which no task finishes for the stall timeout fails, naming the task it waits for
/// (here a task held by the test hook, never released).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_job_fails_naming_its_stuck_tasks() {
    volley_tests::init_tracing();
    let config = SchedulerConfig {
        enable_test_hooks: true,
        stall_timeout: Some(Duration::from_secs(2)),
        ..SchedulerConfig::default().with_address("127.0.0.1", 0)
    };
    let cluster = EmbeddedCluster::start_with(config, 1, 2).await.unwrap();
    let client = cluster.client().await.unwrap();
    volley_tests::register_emp(&client).await.unwrap();
    let hold = Hold::new(1).unwrap();
    client.sql(&hold.set_sql()).await.unwrap();
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        client.sql("SELECT dept_id, count(*) FROM emp GROUP BY dept_id"),
    )
    .await
    .expect("the stall timeout ends the job")
    .expect_err("the job stalls")
    .to_string();
    assert!(
        err.contains("made no progress for 2 s")
            && err.contains("task 0 of stage 1 running on executor"),
        "{err}"
    );
    client.sql(Hold::clear_sql()).await.unwrap();
    let (_, batches) = client
        .sql("SELECT count(*) FROM emp")
        .await
        .expect("the cluster keeps serving");
    assert_eq!(rows(&batches).unwrap(), [["8".to_string()]]);
    cluster.shutdown().await;
}

/// Runs `SELECT count(*), sum(a)` over 20 CSV files (20 scan tasks, each sent a plan with only
/// its own file) with task 7 of the scan stage failing its first attempt; returns the rows.
async fn many_files_first_attempt_fails(
    task_max_attempts: u32,
) -> Result<Vec<Vec<String>>, String> {
    let dir = tempfile::tempdir().unwrap();
    for file in 0..20 {
        let body: String = (0..5).map(|i| format!("{}\n", file * 5 + i)).collect();
        std::fs::write(
            dir.path().join(format!("{file:02}.csv")),
            format!("a\n{body}"),
        )
        .unwrap();
    }
    let config = SchedulerConfig {
        task_max_attempts,
        enable_test_hooks: true,
        ..SchedulerConfig::default()
            .with_address("127.0.0.1", 0)
            .with_target_partitions(20)
    };
    let cluster = EmbeddedCluster::start_with(config, 2, 2).await.unwrap();
    let client = cluster.client().await.unwrap();
    client
        .sql(&format!(
            "CREATE EXTERNAL TABLE t (a BIGINT) STORED AS CSV LOCATION '{}/' \
             OPTIONS ('format.has_header' 'true')",
            dir.path().display()
        ))
        .await
        .unwrap();
    client
        .sql("SET volley.test_fail_task = '1:7:1'")
        .await
        .unwrap();
    let job_id = client
        .submit("SELECT count(*), sum(a) FROM t")
        .await
        .unwrap();
    let outcome = client.sql_job_rows(&job_id).await;
    let scan_tasks = cluster
        .scheduler()
        .service()
        .with_state(|s| s.jobs()[&job_id].stages[&1].tasks.len());
    cluster.shutdown().await;
    assert_eq!(scan_tasks, 20, "one scan task per file");
    outcome
        .map(|batches| rows(&batches).unwrap())
        .map_err(|e| e.to_string())
}

/// The retry of a task whose plan holds only its own files reads that file again: the answer
/// counts each of the 100 rows once. Without retries the same fault fails the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_task_with_its_own_files_counts_each_row_once() {
    volley_tests::init_tracing();
    let rows = many_files_first_attempt_fails(3)
        .await
        .expect("retry succeeds");
    assert_eq!(rows, vec![vec!["100".to_string(), "4950".to_string()]]);
    let err = many_files_first_attempt_fails(1)
        .await
        .expect_err("without retries the fault fails the job");
    assert!(
        err.contains("task 7 of stage 1 failed after 1 attempts") && err.contains("injected fault"),
        "{err}"
    );
}

/// A small map output is handed to its consumers from the executor's memory: no file is
/// written, the answer is the same as with files, and the outputs go with the job. With
/// `volley.shuffle_memory_task_bytes = 0` the same stage writes files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_shuffle_outputs_stay_in_memory_and_leave_with_their_job() {
    volley_tests::init_tracing();
    let (cluster, client) = cluster(1).await;
    let service = cluster.scheduler().service().clone();
    let outputs_of_last_job = || {
        service.with_state(|s| {
            let job = &s.jobs()[s.job_order().last().unwrap()];
            job.stages
                .values()
                .flat_map(|stage| stage.tasks.iter())
                .flat_map(|t| match &t.state {
                    TaskState::Succeeded { outputs, .. } => outputs.clone(),
                    _ => Vec::new(),
                })
                .map(|o| o.in_memory)
                .collect::<Vec<bool>>()
        })
    };
    for (setting, in_memory) in [("4194304", true), ("0", false)] {
        client
            .sql(&format!("SET volley.shuffle_memory_task_bytes = {setting}"))
            .await
            .unwrap();
        let hold = Hold::new(2).unwrap();
        client.sql(&hold.set_sql()).await.unwrap();
        let job_id = client.submit(QUERY).await.unwrap();
        // Stage 2 is held: stage 1's output is where it was put.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !service.with_state(|s| s.jobs()[&job_id].stages[&1].is_complete()) {
            assert!(Instant::now() < deadline, "stage 1 never finished");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let kinds = outputs_of_last_job();
        assert!(!kinds.is_empty(), "stage 1 reported outputs");
        assert!(
            kinds.iter().all(|&k| k == in_memory),
            "{setting}: {kinds:?}"
        );
        let files = volley_tests::files_under(cluster.work_dir());
        assert_eq!(cluster.outputs_in_memory() > 0, in_memory, "{setting}");
        assert_eq!(files > 0, !in_memory, "{setting}: {files} files");
        hold.release().unwrap();
        let batches = client.sql_job_rows(&job_id).await.unwrap();
        assert_eq!(rows(&batches).unwrap(), expected(), "{setting}");
        client.sql(Hold::clear_sql()).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while held(&cluster) > 0 {
            assert!(
                Instant::now() < deadline,
                "{setting}: {} outputs left",
                held(&cluster)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    cluster.shutdown().await;
}

/// The count `via` of `volley_tasks_launched_total` in a Prometheus text exposition.
fn launched(metrics: &str, via: &str) -> u64 {
    let prefix = format!("volley_tasks_launched_total{{via=\"{via}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// A slot's next task rides in the answer to the status report that freed it (one round trip
/// per task, not a report and a launch): on one executor with one slot, every task but a
/// job's first comes that way, and the rows are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freed_slot_gets_its_next_task_in_the_status_answer() {
    volley_tests::init_tracing();
    let config = SchedulerConfig::default().with_address("127.0.0.1", 0);
    let cluster = EmbeddedCluster::start_with(config, 1, 1).await.unwrap();
    let client = cluster.client().await.unwrap();
    create_sales(&client).await;
    // Every planned stage runs as its own (no adaptive fusion), so the job has several tasks.
    client
        .sql("SET volley.adaptive_fuse_bytes = 0")
        .await
        .unwrap();
    let batches = client.sql(QUERY).await.unwrap();
    assert_eq!(rows(&batches.1).unwrap(), expected());
    let service = cluster.scheduler().service().clone();
    let (tasks, jobs_with_tasks) = service.with_state(|s| {
        let per_job: Vec<usize> = s
            .jobs()
            .values()
            .map(|job| job.stages.values().map(|stage| stage.tasks.len()).sum())
            .collect();
        (
            per_job.iter().sum::<usize>() as u64,
            per_job.iter().filter(|&&n| n > 0).count() as u64,
        )
    });
    assert!(tasks >= 3, "{tasks} tasks");
    let metrics = service.render_metrics();
    let (requested, answered) = (
        launched(&metrics, "launch_request"),
        launched(&metrics, "status_answer"),
    );
    assert_eq!(requested + answered, tasks, "{metrics}");
    assert_eq!(requested, jobs_with_tasks, "{metrics}");
    cluster.shutdown().await;
}
