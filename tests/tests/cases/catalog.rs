//! The shared catalog: `volley scheduler --catalog FILE` registers the tables of a file of
//! `CREATE EXTERNAL TABLE` statements in every session (a client that ran no DDL sees them),
//! and a bad file stops the scheduler at start naming it.

use volley_tests::compare::rows;
use volley_tests::process::{ProcessCluster, volley_bin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_file_tables_are_in_every_session() {
    volley_tests::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog.sql");
    std::fs::write(
        &catalog,
        format!(
            "-- tables every session sees\n{};\n{};\n",
            volley_tests::emp_table_sql(),
            volley_tests::sales_table_sql()
        ),
    )
    .unwrap();
    let path = catalog.display().to_string();
    let cluster = ProcessCluster::start(1, 1, &["--catalog", &path])
        .await
        .expect("cluster");
    for _ in 0..2 {
        let client = cluster.client().await.unwrap();
        let (_, batches) = client
            .sql("SELECT count(*) FROM emp JOIN sales ON emp.id = sales.emp_id")
            .await
            .expect("both catalog tables, no DDL in this session");
        let local = datafusion::prelude::SessionContext::new();
        local.sql(&volley_tests::emp_table_sql()).await.unwrap();
        local.sql(&volley_tests::sales_table_sql()).await.unwrap();
        let expected = local
            .sql("SELECT count(*) FROM emp JOIN sales ON emp.id = sales.emp_id")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        assert_eq!(rows(&batches).unwrap(), rows(&expected).unwrap());
    }

    // A statement that is not a table declaration: the scheduler does not start.
    std::fs::write(&catalog, "CREATE TABLE t AS SELECT 1").unwrap();
    let out = std::process::Command::new(volley_bin().unwrap())
        .args(["scheduler", "--port", "0", "--no-http", "--catalog", &path])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("CREATE EXTERNAL TABLE"), "{stderr}");
}
