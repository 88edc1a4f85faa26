//! Hardening: hostile or careless input against real processes. Every test here failed on the
//! main branch before the fix it names, and checks that every process keeps serving.

use std::process::Command;
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::physical_plan::Partitioning;
use volley::VolleyClient;
use volley_core::codec::VolleyCodec;
use volley_core::plan::ShuffleReaderExec;
use volley_core::shuffle::PartitionLocation;
use volley_tests::compare::rows;
use volley_tests::data_file;
use volley_tests::process::{ProcessCluster, volley_bin};

const BY_DEPT: &str = "SELECT dept_id, count(*) AS n FROM emp GROUP BY dept_id ORDER BY dept_id";

async fn by_dept_works(client: &VolleyClient) {
    let (_, batches) = client
        .sql(BY_DEPT)
        .await
        .expect("the cluster keeps serving");
    assert_eq!(
        rows(&batches).unwrap(),
        [["10", "2"], ["20", "3"], ["30", "2"], ["NULL", "1"]]
            .iter()
            .map(|r| r.iter().map(|v| v.to_string()).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    );
}

async fn process_cluster() -> (ProcessCluster, VolleyClient) {
    let cluster = ProcessCluster::start(2, 2, &[]).await.expect("cluster");
    let client = cluster.client().await.unwrap();
    volley_tests::register_emp(&client).await.unwrap();
    (cluster, client)
}

/// A statement with 2,000 `OR` terms used to overflow a 2 MiB worker stack in DataFusion's
/// planner and abort the scheduler (the embedded `volley sql` with it). It is planned on a
/// deep-stack thread now: EXPLAIN and the query itself answer exactly.
#[test]
fn deeply_nested_statement_is_planned_not_fatal() {
    let terms: Vec<String> = (0..2000)
        .map(|i| format!("salary = {}", 100_000 + i))
        .collect();
    let filter = format!("{} OR dept_id = 20", terms.join(" OR "));
    let output = Command::new(volley_bin().unwrap())
        .args(["sql", "--executors", "2", "--slots", "1", "--format", "csv"])
        .args(["--table", &format!("emp={}", data_file("emp.csv")), "-c"])
        .arg(format!(
            "EXPLAIN SELECT count(*) AS n FROM emp WHERE {filter}"
        ))
        .arg("-c")
        .arg(format!("SELECT count(*) AS n FROM emp WHERE {filter}"))
        .arg("-c")
        .arg("SELECT max(salary) AS top FROM emp")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.starts_with("plan\nStage 1: "), "{stdout}");
    assert!(stdout.ends_with("n\n3\ntop\n6100\n"), "{stdout}");
}

/// A panic inside a task (here injected) is reported as that task's failure: the job fails
/// at once with a message naming it, instead of waiting forever for a task that never reports,
/// and the executor keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_task_fails_its_job_and_the_executor_lives() {
    volley_tests::init_tracing();
    let (cluster, client) = process_cluster().await;
    client
        .sql("SET volley.test_panic_task = '1:0'")
        .await
        .unwrap();
    let err = tokio::time::timeout(std::time::Duration::from_secs(60), client.sql(BY_DEPT))
        .await
        .expect("the job ends")
        .expect_err("the panic fails the job")
        .to_string();
    assert!(
        err.contains("task 0 of stage 1 panicked: injected panic"),
        "{err}"
    );
    client.sql("SET volley.test_panic_task = ''").await.unwrap();
    assert_eq!(client.cluster_state().await.unwrap().executors.len(), 2);
    by_dept_works(&client).await;
    drop(cluster);
}

/// An error quoting a 70 MB value used to exceed the status report's message limit: the
/// executor gave up reporting and the job hung at 0/1 tasks. Errors are cut to fit now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_error_message_still_fails_the_job() {
    volley_tests::init_tracing();
    let (cluster, client) = process_cluster().await;
    let err = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        client.sql("SELECT CAST(repeat('x', n) AS INT) FROM (VALUES (70000000)) t(n)"),
    )
    .await
    .expect("the job ends")
    .expect_err("the cast fails")
    .to_string();
    assert!(err.contains("Cannot cast string 'xxxx"), "{err}");
    assert!(err.contains("bytes of this error were cut"), "{err}");
    assert!(err.len() < 64 * 1024, "{} bytes", err.len());
    by_dept_works(&client).await;
    drop(cluster);
}

/// Volley's shuffle nodes name files and stages of the cluster: a submitted plan holding one
/// (here a reader of a missing stage with u32::MAX partitions, which made the scheduler try a
/// 103 GB allocation, or hang its job) is refused, and the scheduler keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submitted_plans_cannot_carry_shuffle_nodes() {
    volley_tests::init_tracing();
    let (cluster, client) = process_cluster().await;
    let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int32, true)]));
    let location = PartitionLocation {
        executor_id: "e".to_string(),
        host: "127.0.0.1".to_string(),
        flight_port: 1,
        path: "/etc/shadow".to_string(),
        map_partition: 0,
        output_partition: 0,
        num_rows: 1,
        num_bytes: 1,
        grant: String::new(),
        in_memory: false,
    };
    let hostile = [
        ShuffleReaderExec::new(
            99,
            Arc::clone(&schema),
            Partitioning::UnknownPartitioning(3),
            false,
        ),
        ShuffleReaderExec::with_locations(
            1,
            Arc::clone(&schema),
            Partitioning::UnknownPartitioning(1),
            false,
            vec![vec![location]],
        ),
    ];
    for reader in hostile {
        let plan = VolleyCodec::encode_plan(Arc::new(reader)).unwrap();
        let err = client
            .submit_plan(plan, "hostile", &[])
            .await
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("may not contain ShuffleReaderExec")
                || err.contains("is not a shuffle file"),
            "{err}"
        );
    }
    // Nor Volley's write nodes: a hand-built commit could name another job's temporary files
    // or skip the sandbox's check of its sink.
    let ctx = datafusion::prelude::SessionContext::new();
    let copy = ctx
        .sql("COPY (SELECT 1 AS x) TO '/tmp/volley-hostile-write/' STORED AS CSV")
        .await
        .unwrap()
        .create_physical_plan()
        .await
        .unwrap();
    let split = volley_scheduler::graph::writes::split_writes("victimjob", copy).unwrap();
    assert_eq!(split.name(), "CommitFilesExec");
    let err = client
        .submit_plan(
            VolleyCodec::encode_plan(split).unwrap(),
            "hostile write",
            &[],
        )
        .await
        .expect_err("refused")
        .to_string();
    assert!(err.contains("may not contain CommitFilesExec"), "{err}");
    // A partition count far beyond any cluster is refused before anything is allocated.
    let huge = volley_core::protobuf::ShuffleReaderExecNode {
        partition_count: u32::MAX,
        stage_id: 1,
        ..Default::default()
    };
    let err = client
        .submit_plan(reader_plan_bytes(huge), "huge", &[])
        .await
        .expect_err("refused")
        .to_string();
    assert!(err.contains("at most 100000 are allowed"), "{err}");
    by_dept_works(&client).await;
    drop(cluster);
}

/// A plan whose only node is a Volley shuffle reader built from `node`.
fn reader_plan_bytes(node: volley_core::protobuf::ShuffleReaderExecNode) -> Vec<u8> {
    use datafusion_proto::protobuf::{PhysicalExtensionNode, PhysicalPlanNode, physical_plan_node};
    use prost::Message;
    let mut node = node;
    node.schema = datafusion_proto::protobuf::Schema::try_from(&Schema::new(vec![Field::new(
        "x",
        DataType::Int32,
        true,
    )]))
    .unwrap()
    .encode_to_vec();
    let volley = volley_core::protobuf::VolleyPlanNode {
        node: Some(volley_core::protobuf::volley_plan_node::Node::ShuffleReader(node)),
    };
    let root = PhysicalPlanNode {
        physical_plan_type: Some(physical_plan_node::PhysicalPlanType::Extension(
            PhysicalExtensionNode {
                node: volley.encode_to_vec(),
                inputs: Vec::new(),
            },
        )),
    };
    volley_core::protobuf::FlatPlan {
        nodes: vec![root.encode_to_vec()],
    }
    .encode_to_vec()
}

/// A task that aborts its executor process (here injected; a runaway allocation does the same)
/// used to be retried on the next executor, and the next, until none was left. After it took
/// down two executors its job fails with a message naming it; the third executor lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_kills_executors_fails_its_job_after_two() {
    volley_tests::init_tracing();
    let cluster = ProcessCluster::start(3, 1, &["--executor-timeout-secs", "2"])
        .await
        .expect("cluster");
    let client = cluster.client().await.unwrap();
    volley_tests::register_emp(&client).await.unwrap();
    client
        .sql("SET volley.test_abort_task = '1:0'")
        .await
        .unwrap();
    let err = tokio::time::timeout(std::time::Duration::from_secs(90), client.sql(BY_DEPT))
        .await
        .expect("the job ends")
        .expect_err("the job fails")
        .to_string();
    assert!(
        err.contains("task 0 of stage 1 was running on 2 executors that were lost"),
        "{err}"
    );
    client.sql("SET volley.test_abort_task = ''").await.unwrap();
    assert_eq!(client.cluster_state().await.unwrap().executors.len(), 1);
    by_dept_works(&client).await;
    drop(cluster);
}

/// `CREATE TABLE AS` used to run its query on the scheduler and keep any amount of rows in
/// scheduler memory, uncancellable. Its query now runs as a job on the executors and the
/// table it keeps is bounded (half of `--max-message-size`, and the scheduler's memory pool):
/// a table over the bound is a clear error, nothing is registered, everything keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_table_as_runs_on_executors_and_is_bounded() {
    volley_tests::init_tracing();
    let dir = volley_tests::tpch::sf01().unwrap();
    let cluster = ProcessCluster::start(2, 2, &["--max-message-size", "4194304"])
        .await
        .expect("cluster");
    let client = cluster.client().await.unwrap();
    volley_tests::register_emp(&client).await.unwrap();
    let local = datafusion::prelude::SessionContext::new();
    volley_tests::tpch::register_local(&local, &dir)
        .await
        .unwrap();
    for sql in volley_tests::tpch::create_table_statements(&dir) {
        client.sql(&sql).await.unwrap();
    }

    let query = "SELECT l_orderkey, sum(l_quantity) AS q FROM lineitem GROUP BY l_orderkey \
                 ORDER BY q DESC, l_orderkey LIMIT 100";
    let ctas = format!("CREATE TABLE top AS {query}");
    client.sql(&ctas).await.expect("CTAS");
    let (_, batches) = client
        .sql("SELECT * FROM top ORDER BY q DESC, l_orderkey")
        .await
        .unwrap();
    let oracle = local.sql(query).await.unwrap().collect().await.unwrap();
    assert_eq!(rows(&batches).unwrap(), rows(&oracle).unwrap());
    assert_eq!(rows(&batches).unwrap().len(), 100);
    // Its query ran as a job of several stages on the executors.
    let state = client.cluster_state().await.unwrap();
    let job = state
        .jobs
        .iter()
        .find(|j| j.sql == ctas && !j.stages.is_empty())
        .expect("the CTAS query ran as a job with stages");
    assert!(job.stages.len() >= 2, "{job:?}");
    assert!(
        job.tasks.iter().all(|t| !t.executor_id.is_empty()),
        "{job:?}"
    );

    // The same name again, IF NOT EXISTS, OR REPLACE: DataFusion's answers.
    let err = client.sql(&ctas).await.expect_err("exists").to_string();
    assert!(err.contains("Table 'top' already exists"), "{err}");
    client
        .sql(&format!("CREATE TABLE IF NOT EXISTS top AS {query}"))
        .await
        .unwrap();
    client
        .sql("CREATE OR REPLACE TABLE top AS SELECT count(*) AS n FROM orders")
        .await
        .unwrap();
    let (_, batches) = client.sql("SELECT n FROM top").await.unwrap();
    assert_eq!(rows(&batches).unwrap(), vec![vec!["150000".to_string()]]);
    let err = client
        .sql("INSERT INTO top VALUES (1)")
        .await
        .expect_err("insert into a table in scheduler memory")
        .to_string();
    assert!(err.contains("scheduler memory"), "{err}");

    // Over the bound: a clear error naming it; no table; the scheduler keeps serving.
    let err = client
        .sql("CREATE TABLE big AS SELECT * FROM lineitem")
        .await
        .expect_err("a table over the bound")
        .to_string();
    assert!(
        err.contains("CREATE TABLE big AS: the result is over 2.0 MiB")
            && err.contains("--max-message-size"),
        "{err}"
    );
    let err = client
        .sql("SELECT count(*) FROM big")
        .await
        .expect_err("no table")
        .to_string();
    assert!(err.contains("big"), "{err}");
    by_dept_works(&client).await;
    drop(cluster);
}

/// `array_repeat(1, 1500000000)` used to abort the process that evaluated it: the scheduler
/// (constant folding, taking the embedded `volley sql` with it) or, with a column argument,
/// one executor after another. Size-choosing functions now check the size first: the
/// statement fails naming the function, every process keeps serving, no executor is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runaway_function_sizes_fail_the_statement_not_the_process() {
    volley_tests::init_tracing();
    let mut cluster = ProcessCluster::start(2, 1, &[]).await.expect("cluster");
    let client = cluster.client().await.unwrap();
    volley_tests::register_emp(&client).await.unwrap();
    for (sql, name) in [
        (
            "SELECT cardinality(array_repeat(1, 1500000000))",
            "array_repeat",
        ),
        (
            "SELECT cardinality(array_repeat(1, x)) FROM (VALUES (1500000000)) t(x)",
            "array_repeat",
        ),
        ("SELECT length(repeat(name, 2000000000)) FROM emp", "repeat"),
        ("SELECT cardinality(range(0, 9000000000000))", "range"),
    ] {
        let err = client.sql(sql).await.expect_err(sql).to_string();
        assert!(
            err.contains(&format!("{name}() would build about")) && err.contains("1024 MiB"),
            "{sql}: {err}"
        );
    }
    assert!(cluster.scheduler_alive());
    assert_eq!(client.cluster_state().await.unwrap().executors.len(), 2);
    let (_, batches) = client
        .sql("SELECT cardinality(array_repeat(1, 1000)), repeat('ab', 3)")
        .await
        .unwrap();
    assert_eq!(
        rows(&batches).unwrap(),
        vec![vec!["1000".to_string(), "ababab".to_string()]]
    );
    by_dept_works(&client).await;
    drop(cluster);

    // The embedded cluster of `volley sql` lives in one process: it ends with the error.
    let output = Command::new(volley_bin().unwrap())
        .args([
            "sql",
            "-c",
            "SELECT cardinality(array_repeat(1, 1500000000))",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "an error, not a signal: {stderr}"
    );
    assert!(
        stderr.contains("array_repeat() would build about"),
        "{stderr}"
    );
}

/// Executors decoded plans at most 100 protobuf levels deep (prost's limit) while the
/// scheduler encoded any depth: about 45 broadcast joins in one stage failed every task.
/// Plans travel as flat lists of operators now: 60 joins in one stage answer exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_of_sixty_broadcast_joins_runs_on_executors() {
    volley_tests::init_tracing();
    let (cluster, client) = process_cluster().await;
    let mut sql = "SELECT count(*) AS n, sum(e0.salary) AS s FROM emp e0".to_string();
    for i in 1..=60 {
        sql.push_str(&format!(" JOIN emp e{i} ON e{}.id = e{i}.id", i - 1));
    }
    let (_, batches) = client.sql(&sql).await.expect("sixty joins");
    let local = datafusion::prelude::SessionContext::new();
    local
        .sql(&volley_tests::emp_table_sql())
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let oracle = local.sql(&sql).await.unwrap().collect().await.unwrap();
    assert_eq!(rows(&batches).unwrap(), rows(&oracle).unwrap());
    // The joins ran in a stage on the executors, not on the scheduler.
    let explained = client.sql(&format!("EXPLAIN {sql}")).await.unwrap().1;
    let text = format!("{:?}", rows(&explained).unwrap());
    assert!(text.contains("HashJoinExec"), "{text}");
    drop(cluster);
}

/// An expression nested deeper than executors decode (prost's ~100 levels) used to be sent
/// anyway and fail to decode with a protobuf message. SQL cannot nest that deep (the parser
/// stops at 50; operator chains travel linearized), but the DataFrame API can: such a plan
/// is refused before it is sent, naming the limit, and the cluster keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expression_too_deep_for_executors_is_refused_up_front() {
    use datafusion::functions::math::expr_fn::abs;
    use datafusion::prelude::{CsvReadOptions, col};
    volley_tests::init_tracing();
    let (cluster, client) = process_cluster().await;
    let ctx = volley::context_for(cluster.client().await.unwrap());
    ctx.register_csv("emp", data_file("emp.csv"), CsvReadOptions::new())
        .await
        .unwrap();
    let nested = (0..120).fold(col("salary"), |e, _| abs(e));
    let df = ctx
        .table("emp")
        .await
        .unwrap()
        .select(vec![nested])
        .unwrap();
    let err = df.collect().await.expect_err("too deep").to_string();
    assert!(
        err.contains("is nested too deeply to send to executors"),
        "{err}"
    );
    // 46 levels, as deep as SQL goes, travel fine.
    let ok = (0..46).fold(col("salary"), |e, _| abs(e));
    let df = ctx.table("emp").await.unwrap().select(vec![ok]).unwrap();
    assert_eq!(
        df.collect()
            .await
            .unwrap()
            .iter()
            .map(|b| b.num_rows())
            .sum::<usize>(),
        8
    );
    by_dept_works(&client).await;
    drop(cluster);
}
