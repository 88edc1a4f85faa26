//! The DataFrame API and `INSERT INTO` on S3 through a remote cluster of separate "hosts":
//! `read_parquet` / `register_parquet` of `s3://` URLs plan on the client and run on the
//! executors, `write_parquet("s3://...")` and `INSERT INTO` an external table on S3 write from
//! every task; every result equals single-node DataFusion on the same local files.

use datafusion::dataframe::DataFrameWriteOptions;
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use volley_tests::compare::rows;
use volley_tests::tpch;

use super::s3::{BUCKET, PREFIX, lake, register, run, settled_objects, three_hosts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dataframe_api_and_insert_into_read_and_write_s3_on_a_remote_cluster() {
    volley_tests::init_tracing();
    let s3 = lake().await;
    let cluster = three_hosts(&s3, s3.env(), "4").await;
    let local = SessionContext::new();
    tpch::register_local(&local, &tpch::sf01().unwrap())
        .await
        .unwrap();
    let expect = |sql: &'static str| {
        let local = local.clone();
        async move { rows(&local.sql(sql).await.unwrap().collect().await.unwrap()).unwrap() }
    };

    // The client plans against S3 itself (here with the test server's client; the standard
    // AWS_* environment otherwise) and the executors read with theirs.
    let ctx = volley::remote(cluster.url()).await.unwrap();
    let url = url::Url::parse(&format!("s3://{BUCKET}")).unwrap();
    ctx.register_object_store(&url, s3.store(BUCKET).unwrap());
    let nation = ctx
        .read_parquet(
            format!("s3://{BUCKET}/{PREFIX}/nation/"),
            ParquetReadOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(nation.count().await.unwrap(), 25);
    ctx.register_parquet(
        "orders",
        format!("s3://{BUCKET}/{PREFIX}/orders/"),
        ParquetReadOptions::default(),
    )
    .await
    .unwrap();
    let by_priority = "SELECT o_orderpriority, count(*) AS n FROM orders GROUP BY 1 ORDER BY 1";
    let actual = rows(&ctx.sql(by_priority).await.unwrap().collect().await.unwrap()).unwrap();
    assert_eq!(actual, expect(by_priority).await);

    // write_parquet from the cluster's tasks, read back.
    let small = "SELECT o_orderkey, o_custkey, o_totalprice FROM orders WHERE o_orderkey < 20000";
    ctx.sql(small)
        .await
        .unwrap()
        .write_parquet(
            &format!("s3://{BUCKET}/out/df/"),
            DataFrameWriteOptions::new(),
            None,
        )
        .await
        .unwrap();
    let written = ctx
        .read_parquet(
            format!("s3://{BUCKET}/out/df/"),
            ParquetReadOptions::default(),
        )
        .await
        .unwrap()
        .sort_by(vec![datafusion::prelude::col("o_orderkey")])
        .unwrap()
        .collect()
        .await
        .unwrap();
    let ordered = "SELECT o_orderkey, o_custkey, o_totalprice FROM orders WHERE o_orderkey < 20000 ORDER BY o_orderkey";
    assert_eq!(rows(&written).unwrap(), expect(ordered).await);
    let objects = settled_objects(&s3, "out/df").await;
    assert!(
        objects.iter().all(|o| o.ends_with(".parquet")),
        "{objects:?}"
    );

    // INSERT INTO an external table on S3, twice: every row twice, nothing temporary left.
    let client = cluster.client().await.unwrap();
    register(&client, "").await;
    client
        .sql(&format!(
            "CREATE EXTERNAL TABLE sink (k BIGINT, name VARCHAR) STORED AS PARQUET LOCATION 's3://{BUCKET}/out/insert/'"
        ))
        .await
        .unwrap();
    for _ in 0..2 {
        let inserted = run(
            &client,
            "INSERT INTO sink SELECT n_nationkey, n_name FROM nation",
        )
        .await
        .unwrap();
        assert_eq!(inserted, vec![vec!["25".to_string()]]);
    }
    let counted = run(
        &client,
        "SELECT count(*), count(DISTINCT k), min(name) FROM sink",
    )
    .await
    .unwrap();
    assert_eq!(
        counted,
        vec![vec![
            "50".to_string(),
            "25".to_string(),
            "ALGERIA".to_string()
        ]]
    );
    let objects = settled_objects(&s3, "out/insert").await;
    assert!(
        objects.iter().all(|o| o.ends_with(".parquet")),
        "{objects:?}"
    );

    // A partitioned COPY: the commit keeps the `key=value/` folders under the target.
    let copied = run(
        &client,
        &format!(
            "COPY (SELECT n_regionkey, n_name FROM nation) TO 's3://{BUCKET}/out/part/' STORED AS PARQUET PARTITIONED BY (n_regionkey)"
        ),
    )
    .await
    .unwrap();
    assert_eq!(copied, vec![vec!["25".to_string()]]);
    let objects = settled_objects(&s3, "out/part").await;
    let folders: std::collections::BTreeSet<&str> =
        objects.iter().filter_map(|o| o.split('/').nth(2)).collect();
    assert_eq!(
        folders.into_iter().collect::<Vec<_>>(),
        [
            "n_regionkey=0",
            "n_regionkey=1",
            "n_regionkey=2",
            "n_regionkey=3",
            "n_regionkey=4"
        ],
        "{objects:?}"
    );
    client
        .sql(&format!(
            "CREATE EXTERNAL TABLE parts (n_name VARCHAR, n_regionkey BIGINT) STORED AS PARQUET PARTITIONED BY (n_regionkey) LOCATION 's3://{BUCKET}/out/part/'"
        ))
        .await
        .unwrap();
    let per_region = run(
        &client,
        "SELECT n_regionkey, count(*) FROM parts GROUP BY 1 ORDER BY 1",
    )
    .await
    .unwrap();
    let expected: Vec<Vec<String>> = (0..5)
        .map(|r| vec![r.to_string(), "5".to_string()])
        .collect();
    assert_eq!(per_region, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_tables_on_s3_are_in_every_session() {
    volley_tests::init_tracing();
    let s3 = lake().await;
    let table = format!("region=s3://{BUCKET}/{PREFIX}/region/");
    let root = format!("s3://{BUCKET}/{PREFIX}");
    let options = volley_tests::process::ProcessOptions {
        env: s3.env(),
        executor_hosts: vec!["127.0.0.2".into()],
        ..Default::default()
    };
    let cluster = volley_tests::process::ProcessCluster::start_with(
        1,
        2,
        &["--allowed-path", &root, "--table", &table],
        options,
    )
    .await
    .unwrap();
    for _ in 0..2 {
        let client = cluster.client().await.unwrap();
        let names = run(&client, "SELECT r_name FROM region ORDER BY r_regionkey")
            .await
            .unwrap();
        let names: Vec<&str> = names.iter().map(|r| r[0].as_str()).collect();
        assert_eq!(
            names,
            ["AFRICA", "AMERICA", "ASIA", "EUROPE", "MIDDLE EAST"]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volley_sql_reads_a_table_url_on_its_embedded_cluster() {
    volley_tests::init_tracing();
    let s3 = lake().await;
    let output = std::process::Command::new(volley_tests::process::volley_bin().unwrap())
        .args([
            "sql",
            "--table",
            &format!("nation=s3://{BUCKET}/{PREFIX}/nation/"),
            "--format",
            "csv",
            "-c",
            "SELECT n_regionkey, count(*) AS n FROM nation GROUP BY 1 ORDER BY 1",
        ])
        .envs(s3.env())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout, "n_regionkey,n\n0,5\n1,5\n2,5\n3,5\n4,5\n");
}

/// `http://` table URLs: a file on a plain web server (moto without authentication serves its
/// objects at `http://host:port/bucket/key` and answers ranged GETs), read by the cluster with
/// the sandbox allowing that server's prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parquet_file_over_http_is_a_table() {
    volley_tests::init_tracing();
    let web = volley_tests::s3::S3Server::start_open(&["web"]).unwrap();
    let dir = tpch::sf01().unwrap();
    web.upload_dir("web", "tpch", &dir).await.unwrap();
    assert!(web.publish("web", "tpch").await.unwrap() >= 8);
    let root = format!("{}/web/tpch", web.endpoint);
    let cluster = volley_tests::process::ProcessCluster::start_with(
        1,
        2,
        &["--allowed-path", &root],
        volley_tests::process::ProcessOptions::default(),
    )
    .await
    .unwrap();
    let client = cluster.client().await.unwrap();
    client
        .sql(&format!(
            "CREATE EXTERNAL TABLE nation STORED AS PARQUET LOCATION '{root}/nation/part-1.parquet'"
        ))
        .await
        .unwrap();
    let by_region = run(
        &client,
        "SELECT n_regionkey, count(*) FROM nation GROUP BY 1 ORDER BY 1",
    )
    .await
    .unwrap();
    let expected: Vec<Vec<String>> = (0..5)
        .map(|r| vec![r.to_string(), "5".to_string()])
        .collect();
    assert_eq!(by_region, expected);
    // Another path on the same server is outside the sandbox.
    let err = run(
        &client,
        &format!(
            "CREATE EXTERNAL TABLE other STORED AS PARQUET LOCATION '{}/web/other.parquet'",
            web.endpoint
        ),
    )
    .await
    .unwrap_err();
    assert!(err.contains("outside the file sandbox"), "{err}");
}
