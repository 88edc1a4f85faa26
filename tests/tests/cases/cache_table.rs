//! `CACHE TABLE` on a cluster of real processes: queries over a cached table equal the same
//! queries over its source and read the executors' cached partitions; a SIGKILLed executor's
//! partitions are recomputed while queries stay exact; `/api/executors` shows the cached bytes;
//! `UNCACHE TABLE` drops them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::datatypes::{DataType, Field, Schema};
use volley_core::codec::VolleyCodec;
use volley_core::plan::CachedScanExec;
use volley_core::shuffle::PartitionLocation;

use datafusion::prelude::SessionContext;
use volley::VolleyClient;
use volley_tests::compare::{assert_same_rows, float_columns, rows};
use volley_tests::process::ProcessCluster;
use volley_tests::tpch;

const SOURCE: &str = "SELECT * FROM lineitem \
    WHERE l_shipdate >= DATE '1995-01-01' AND l_shipdate < DATE '1996-01-01'";

const QUERIES: [&str; 3] = [
    "SELECT count(*), sum(l_quantity), min(l_shipdate), max(l_shipdate) FROM lineitem_1995",
    "SELECT l_returnflag, l_linestatus, count(*), sum(l_extendedprice) FROM lineitem_1995 \
     GROUP BY l_returnflag, l_linestatus ORDER BY l_returnflag, l_linestatus",
    "SELECT o_orderpriority, count(*) AS n FROM lineitem_1995 JOIN orders ON l_orderkey = o_orderkey \
     WHERE l_quantity > 30 GROUP BY o_orderpriority ORDER BY o_orderpriority",
];

const REVENUE: &str = "SELECT l_orderkey, sum(l_extendedprice * (1 - l_discount)) AS rev \
    FROM lineitem GROUP BY l_orderkey";

/// The top orders by revenue from the cached aggregate equal DataFusion's; true when the
/// query read the cache.
async fn check_revenue(client: &VolleyClient, ctx: &SessionContext, what: &str) -> bool {
    let sql = "SELECT l_orderkey, rev FROM revenue ORDER BY rev DESC, l_orderkey LIMIT 20";
    check_query(client, ctx, sql, what).await
}

/// `sql` on the cluster equals DataFusion's answer; true when it read a cached table.
async fn check_query(client: &VolleyClient, ctx: &SessionContext, sql: &str, what: &str) -> bool {
    let (_, explained) = client.sql(&format!("EXPLAIN {sql}")).await.unwrap();
    let cached = format!("{:?}", rows(&explained).unwrap()).contains("CachedScanExec");
    let (_, batches) = client.sql(sql).await.unwrap();
    let local = ctx.sql(sql).await.unwrap().collect().await.unwrap();
    assert_same_rows(
        &rows(&local).unwrap(),
        &rows(&batches).unwrap(),
        &float_columns(&local),
        &format!("{what}: {sql}"),
    );
    cached
}

/// Cached bytes by executor id, and the ids of the executors alive.
async fn cached_bytes(cluster: &ProcessCluster) -> (BTreeMap<String, u64>, Vec<String>) {
    let (status, body) =
        volley_tests::http("GET", format!("{}/api/executors", cluster.http_url()), None).await;
    assert_eq!(status, 200, "{body}");
    let executors: serde_json::Value = serde_json::from_str(&body).expect("json");
    let executors = executors.as_array().expect("a list");
    let bytes = executors
        .iter()
        .map(|e| {
            let id = e["id"].as_str().unwrap_or_default().to_string();
            (id, e["cached_bytes"].as_u64().expect("cached_bytes"))
        })
        .collect();
    let alive = executors
        .iter()
        .filter(|e| e["state"] == "alive")
        .map(|e| e["id"].as_str().unwrap_or_default().to_string())
        .collect();
    (bytes, alive)
}

/// Run the queries over the cached table and compare them with DataFusion over the source;
/// true when every one read the cached partitions.
async fn check(client: &VolleyClient, ctx: &SessionContext, what: &str) -> bool {
    let mut all_cached = true;
    for sql in QUERIES {
        all_cached &= check_query(client, ctx, sql, what).await;
    }
    all_cached
}

async fn wait_until<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_tables_are_exact_survive_a_lost_executor_and_uncache() {
    volley_tests::init_tracing();
    let dir = tpch::sf01().expect("generate TPC-H");
    let mut cluster = ProcessCluster::start(2, 2, &[]).await.expect("cluster");
    let client = cluster.client().await.expect("connect");
    let ctx = tpch::register_both(&client, &dir)
        .await
        .expect("TPC-H tables");
    ctx.sql(&format!("CREATE VIEW lineitem_1995 AS {SOURCE}"))
        .await
        .unwrap();

    let err = client
        .sql("CACHE TABLE bad OPTIONS ('ttl' 'soon') AS SELECT 1")
        .await
        .expect_err("a bad ttl");
    assert!(err.to_string().contains("not a duration"), "{err}");
    client
        .sql(&format!("CACHE TABLE lineitem_1995 AS {SOURCE}"))
        .await
        .expect("cache the table");
    assert!(
        check(&client, &ctx, "cached").await,
        "the queries read the cache"
    );
    // A cached aggregate: two stages, its result tasks read a shuffle.
    client
        .sql(&format!("CACHE TABLE revenue AS {REVENUE}"))
        .await
        .expect("cache an aggregate");
    ctx.sql(&format!("CREATE VIEW revenue AS {REVENUE}"))
        .await
        .unwrap();
    assert!(check_revenue(&client, &ctx, "cached").await);
    let (before, _) = cached_bytes(&cluster).await;
    assert!(
        before.values().filter(|b| **b > 0).count() == 2,
        "both executors hold cached partitions: {before:?}"
    );

    // SIGKILL one executor holding partitions: once it is lost, queries stay exact (from the
    // source while its partitions are recomputed on the other), then read the cache again.
    let victim = before.keys().next().cloned().expect("an executor");
    let index = cluster.executor_index(&victim).await.unwrap();
    cluster.kill_executor(index).unwrap();
    wait_until("the executor is lost", async || {
        let (_, alive) = cached_bytes(&cluster).await;
        (!alive.contains(&victim)).then_some(())
    })
    .await;
    check(&client, &ctx, "after the executor was lost").await;
    let survivor = before
        .keys()
        .find(|id| **id != victim)
        .cloned()
        .expect("two");
    let after = wait_until("the lost partitions are recomputed", async || {
        let (bytes, _) = cached_bytes(&cluster).await;
        (bytes.get(&survivor) > before.get(&survivor)).then_some(bytes)
    })
    .await;
    assert_eq!(after.get(&victim).copied().unwrap_or(0), 0, "{after:?}");
    assert!(
        check(&client, &ctx, "recomputed").await,
        "the queries read the recomputed cache"
    );
    check_revenue(&client, &ctx, "after the executor was lost").await;
    wait_until("the aggregate is recomputed", async || {
        check_revenue(&client, &ctx, "recomputing")
            .await
            .then_some(())
    })
    .await;

    // A client cannot hand the cluster a cached scan of its own making (it names executors'
    // files and would make an executor fetch from any host with the cluster's credentials).
    let forged = CachedScanExec::try_new(
        "forged",
        Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, true)])),
        1,
        vec![PartitionLocation {
            executor_id: "x".into(),
            host: "203.0.113.7".into(),
            flight_port: 443,
            path: "/tmp/w/someone/1/0-0/part-0.arrow".into(),
            map_partition: 0,
            output_partition: 0,
            num_rows: 1,
            num_bytes: 1,
            grant: String::new(),
            in_memory: false,
        }],
        None,
    )
    .unwrap();
    let bytes = VolleyCodec::encode_plan(Arc::new(forged)).unwrap();
    let err = client
        .submit_plan(bytes, "forged", &[])
        .await
        .expect_err("a submitted cached scan");
    assert!(err.to_string().contains("CachedScanExec"), "{err}");

    client.sql("UNCACHE TABLE lineitem_1995").await.unwrap();
    let err = client
        .sql("SELECT count(*) FROM lineitem_1995")
        .await
        .expect_err("no such table after UNCACHE");
    assert!(err.to_string().contains("lineitem_1995"), "{err}");
    client.sql("UNCACHE TABLE revenue").await.unwrap();
    let (gone, _) = cached_bytes(&cluster).await;
    assert_eq!(gone.values().sum::<u64>(), 0, "{gone:?}");
    client
        .sql("UNCACHE TABLE IF EXISTS lineitem_1995")
        .await
        .unwrap();

    // CACHE TABLE of an existing table caches it in place; UNCACHE brings the source back.
    client.sql("CACHE TABLE nation").await.unwrap();
    let err = client
        .sql("CACHE TABLE nation")
        .await
        .expect_err("cached already");
    assert!(err.to_string().contains("cached already"), "{err}");
    let (_, explained) = client
        .sql("EXPLAIN SELECT count(*) FROM nation")
        .await
        .unwrap();
    assert!(format!("{:?}", rows(&explained).unwrap()).contains("CachedScanExec"));
    client.sql("UNCACHE TABLE nation").await.unwrap();
    let (_, batches) = client.sql("SELECT count(*) FROM nation").await.unwrap();
    assert_eq!(rows(&batches).unwrap(), vec![vec!["25".to_string()]]);
}
