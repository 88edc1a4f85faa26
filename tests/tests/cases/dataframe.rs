//! The DataFrame API: a DataFusion SessionContext whose queries run on the cluster.

use datafusion::functions_aggregate::expr_fn::{count, sum};
use datafusion::prelude::{CsvReadOptions, SessionContext, col, lit};
use volley::EmbeddedCluster;
use volley_tests::compare::rows;

use volley_tests::data_file as data;

async fn revenue_by_dept(ctx: &SessionContext) -> Vec<Vec<String>> {
    let emp = ctx
        .read_csv(data("emp.csv"), CsvReadOptions::new())
        .await
        .unwrap();
    let sales = ctx
        .read_csv(data("sales.csv"), CsvReadOptions::new())
        .await
        .unwrap();
    let df = sales
        .filter(col("amount").gt(lit(20)))
        .unwrap()
        .join(
            emp,
            datafusion::common::JoinType::Inner,
            &["emp_id"],
            &["id"],
            None,
        )
        .unwrap()
        .aggregate(
            vec![col("dept_id")],
            vec![count(lit(1)).alias("n"), sum(col("amount")).alias("total")],
        )
        .unwrap()
        .sort(vec![col("dept_id").sort(true, false)])
        .unwrap()
        .limit(0, Some(10))
        .unwrap();
    rows(&df.collect().await.unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dataframe_api_runs_on_executors_with_datafusion_results() {
    volley_tests::init_tracing();
    let cluster = EmbeddedCluster::start(2, 2).await.unwrap();
    let ctx = volley::context_for(cluster.client().await.unwrap());

    let expected = revenue_by_dept(&SessionContext::new()).await;
    assert_eq!(expected.len(), 2);
    assert_eq!(revenue_by_dept(&ctx).await, expected);

    // SQL through the same context, then write Parquet on the cluster and read it back.
    ctx.register_csv("sales", data("sales.csv"), CsvReadOptions::new())
        .await
        .unwrap();
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("big_sales");
    ctx.sql("SELECT sale_id, amount FROM sales WHERE amount > 100 ORDER BY sale_id")
        .await
        .unwrap()
        .write_parquet(target.to_str().unwrap(), Default::default(), None)
        .await
        .unwrap();
    let back = ctx
        .read_parquet(target.to_str().unwrap(), Default::default())
        .await
        .unwrap();
    let back = rows(
        &back
            .sort(vec![col("sale_id").sort(true, true)])
            .unwrap()
            .collect()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        back,
        vec![
            vec!["100", "120.5"],
            vec!["102", "250.0"],
            vec!["104", "310.0"],
            vec!["107", "500.0"]
        ]
        .into_iter()
        .map(|r| r.into_iter().map(String::from).collect::<Vec<_>>())
        .collect::<Vec<_>>()
    );

    // The scheduler ran these as jobs, with tasks on executors.
    let (jobs, tasks) = cluster.scheduler().service().with_state(|s| {
        let jobs: Vec<_> = s
            .jobs()
            .values()
            .filter(|j| j.sql.starts_with("DataFrame:"))
            .map(|j| j.state.clone())
            .collect();
        let tasks: usize = s
            .executors()
            .values()
            .map(|e| e.completed_tasks as usize)
            .sum();
        (jobs, tasks)
    });
    assert!(
        jobs.len() >= 3,
        "scheduler saw the DataFrame jobs: {jobs:?}"
    );
    assert!(
        jobs.iter()
            .all(|s| *s == volley_scheduler::job::JobState::Succeeded)
    );
    assert!(tasks > 0, "executors ran tasks");
    cluster.shutdown().await;
}
