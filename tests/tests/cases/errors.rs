//! Bad input gets a clear error and the cluster keeps serving.

use volley::EmbeddedCluster;
use volley_tests::compare::rows;

async fn good_query(client: &volley::VolleyClient) {
    let (_, batches) = client
        .sql("SELECT count(*) AS n, sum(x) AS s FROM (SELECT * FROM nums) t")
        .await
        .expect("good query after an error");
    assert_eq!(
        rows(&batches).expect("rows"),
        vec![vec!["3".to_string(), "6".to_string()]]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gives_clear_errors_and_cluster_keeps_serving() {
    volley_tests::init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = dir.path().join("nums.csv");
    std::fs::write(&csv, "x\n1\n2\n3\n").expect("write csv");
    let not_parquet = dir.path().join("broken.parquet");
    std::fs::write(&not_parquet, "this is not a parquet file\n").expect("write junk");

    let cluster = EmbeddedCluster::start(2, 2).await.expect("cluster");
    let client = cluster.client().await.expect("client");
    client
        .sql(&format!(
            "CREATE EXTERNAL TABLE nums (x INT) STORED AS CSV LOCATION '{}' OPTIONS ('format.has_header' 'true')",
            csv.display()
        ))
        .await
        .expect("register csv");
    good_query(&client).await;

    let err = client
        .sql("SELEC 1 FROM nums")
        .await
        .expect_err("bad SQL fails")
        .to_string();
    assert!(
        err.contains("SQL error") && err.contains("SELEC"),
        "bad SQL message: {err}"
    );
    good_query(&client).await;

    let err = client
        .sql("SELECT * FROM no_such_table")
        .await
        .expect_err("unknown table fails")
        .to_string();
    assert!(
        err.contains("no_such_table") && err.contains("not found"),
        "unknown table message: {err}"
    );
    good_query(&client).await;

    let err = client
        .sql(&format!(
            "CREATE EXTERNAL TABLE broken STORED AS PARQUET LOCATION '{}'",
            not_parquet.display()
        ))
        .await
        .expect_err("non-parquet file fails")
        .to_string();
    assert!(
        err.to_lowercase().contains("parquet"),
        "not-parquet message: {err}"
    );
    good_query(&client).await;

    let err = client
        .sql("SELECT x / (x - x) FROM nums")
        .await
        .expect_err("divide by zero fails")
        .to_string();
    assert!(
        err.contains("Divide by zero"),
        "runtime error message: {err}"
    );
    good_query(&client).await;

    // Shuffle compression is a per-session option that travels to the executors.
    for codec in ["zstd", "none", "lz4"] {
        client
            .sql(&format!("SET volley.shuffle_compression = '{codec}'"))
            .await
            .unwrap();
        good_query(&client).await;
    }
    client
        .sql("SET volley.shuffle_compression = 'snappy'")
        .await
        .unwrap();
    let err = client
        .sql("SELECT count(*) FROM nums GROUP BY x")
        .await
        .expect_err("unknown codec")
        .to_string();
    assert!(
        err.contains("volley.shuffle_compression must be auto, lz4, zstd or none"),
        "{err}"
    );

    cluster.shutdown().await;
}
