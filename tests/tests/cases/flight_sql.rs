//! Arrow Flight SQL on the scheduler's port, driven by real clients: Python's ADBC driver
//! (`client/examples/python/adbc_query.py` and `tests/python/flight_sql_checks.py`) and Rust's
//! `FlightSqlServiceClient`. TPC-H q1 and q18 equal DuckDB's answers; a prepared statement
//! runs twice with other parameters; metadata lists the shared tables; wrong tokens are refused;
//! a cancelled query stops its tasks; errors keep their gRPC codes.

use std::path::Path;
use std::process::Command;

use arrow::array::RecordBatch;
use arrow_flight::CancelStatus;
use arrow_flight::sql::client::FlightSqlServiceClient;
use futures::TryStreamExt;
use volley_tests::compare::{assert_matches_answer, assert_same_rows, rows};
use volley_tests::process::{ProcessCluster, ProcessOptions};
use volley_tests::tpch;

const TOKEN: &str = "client-token-for-flight-sql";
const CLUSTER: &str = "cluster-token-for-flight-sql";

fn python(args: &[&str]) -> String {
    let out = Command::new("python3")
        .args(args)
        .current_dir(volley_tests::workspace_root())
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "python3 {args:?}:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn columns_of(table: &serde_json::Value) -> Vec<String> {
    serde_json::from_value(table["columns"].clone()).expect("columns")
}

fn read_arrow(path: &Path) -> Vec<RecordBatch> {
    let file = std::fs::File::open(path).expect("result file");
    arrow::ipc::reader::FileReader::try_new(file, None)
        .expect("Arrow IPC file")
        .collect::<Result<_, _>>()
        .expect("batches")
}

async fn cluster(dir: &Path, catalog: &Path) -> ProcessCluster {
    let statements = tpch::create_table_statements(dir).join(";\n");
    std::fs::write(catalog, statements).unwrap();
    let options = ProcessOptions::with_tokens(TOKEN, CLUSTER);
    let path = catalog.display().to_string();
    ProcessCluster::start_with(2, 2, &["--catalog", &path], options)
        .await
        .expect("cluster")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adbc_and_flight_sql_clients_query_the_cluster() {
    volley_tests::init_tracing();
    let dir = tpch::sf01().expect("generate TPC-H");
    let work = tempfile::tempdir().unwrap();
    let cluster = cluster(&dir, &work.path().join("catalog.sql")).await;
    let grpc = cluster.url().replace("http://", "grpc://");

    // The example script: TPC-H q1 and q18 equal DuckDB's answers.
    for q in [1, 18] {
        let out = work.path().join(format!("q{q}.arrow"));
        let sql = volley_tests::workspace_root().join(format!("sql-examples/tpch/q{q}.sql"));
        python(&[
            "client/examples/python/adbc_query.py",
            "--url",
            &grpc,
            "--token",
            TOKEN,
            "--sql-file",
            sql.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        let batches = read_arrow(&out);
        assert_matches_answer(
            &rows(&batches).unwrap(),
            &tpch::answer_path(q),
            0.01,
            &format!("q{q} through ADBC"),
        );
    }

    // Prepared statements, metadata, cancel, Basic auth, a wrong token.
    let report = python(&[
        "tests/python/flight_sql_checks.py",
        &grpc,
        TOKEN,
        cluster.http_url(),
        CLUSTER,
    ]);
    let report: serde_json::Value = serde_json::from_str(report.trim()).expect("JSON report");
    let ctx = datafusion::prelude::SessionContext::new();
    tpch::register_local(&ctx, &dir).await.unwrap();
    for (i, (quantity, flag)) in [(10, "R"), (30, "A")].into_iter().enumerate() {
        let sql = format!(
            "SELECT count(*) AS n, sum(l_quantity) AS quantity FROM lineitem \
             WHERE l_quantity < {quantity} AND l_returnflag = '{flag}'"
        );
        let expected = ctx.sql(&sql).await.unwrap().collect().await.unwrap();
        let expected = rows(&expected).unwrap();
        let actual: Vec<Vec<String>> =
            serde_json::from_value(report["prepared"][i].clone()).expect("rows");
        assert_same_rows(
            &expected,
            &actual,
            &[false, true],
            &format!("prepared, values {i}"),
        );
    }
    let lineitem = &report["objects"]["lineitem"];
    let type_names: Vec<String> = serde_json::from_value(lineitem["type_names"].clone()).unwrap();
    let columns = columns_of(lineitem);
    let typed: Vec<String> = [0, 3, 4, 10, 15]
        .iter()
        .map(|&i| format!("{} {}", columns[i], type_names[i]))
        .collect();
    assert_eq!(
        typed,
        [
            "l_orderkey BIGINT",
            "l_linenumber INTEGER",
            "l_quantity DECIMAL(15, 2)",
            "l_shipdate DATE",
            "l_comment VARCHAR"
        ],
        "column types in adbc_get_objects: {lineitem}"
    );
    assert_eq!(lineitem["type"], "TABLE", "{report}");
    let local = ctx.table("lineitem").await.unwrap();
    let expected: Vec<String> = local
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(columns, expected, "lineitem's columns in adbc_get_objects");
    for table in tpch::TABLES {
        assert!(
            report["objects"][table].is_object(),
            "{table} listed: {report}"
        );
    }
    let nation: Vec<(String, String)> =
        serde_json::from_value(report["nation_schema"].clone()).unwrap();
    let names: Vec<&str> = nation.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["n_nationkey", "n_name", "n_regionkey", "n_comment"]);
    assert_eq!(
        report["table_types"],
        serde_json::json!(["LOCAL TEMPORARY", "TABLE", "VIEW"])
    );
    assert_eq!(report["basic"], serde_json::json!([["25"]]), "Basic auth");
    let wrong = report["wrong_token"].as_str().unwrap();
    assert!(
        wrong.contains("UNAUTHENTICATED") || wrong.contains("Unauthenticated"),
        "{wrong}"
    );
    let cancel = &report["cancel"];
    assert!(
        cancel["error"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("cancel"),
        "{cancel}"
    );
    let stopped = cancel["tasks_stopped_after"]
        .as_f64()
        .expect("tasks stopped");
    assert!(stopped < 5.0, "tasks stopped {stopped}s after the cancel");

    let expected = ctx
        .sql("SELECT n_name FROM nation WHERE n_nationkey > 20 ORDER BY n_name")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    rust_client(&cluster, rows(&expected).unwrap()).await;
}

/// The rows of one endpoint: from the executor it names, or from the scheduler.
async fn endpoint_rows(
    client: &mut FlightSqlServiceClient<tonic::transport::Channel>,
    endpoint: &arrow_flight::FlightEndpoint,
) -> Result<Vec<RecordBatch>, arrow_flight::error::FlightError> {
    let ticket = endpoint.ticket.clone().expect("ticket");
    let reader = match endpoint.location.first() {
        Some(location) => {
            let url = location.uri.replace("grpc+tcp://", "http://");
            let channel = tonic::transport::Endpoint::from_shared(url)
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut executor = FlightSqlServiceClient::new(channel);
            executor.set_token(TOKEN.to_string());
            executor.do_get(ticket).await?
        }
        None => client.do_get(ticket).await?,
    };
    reader.try_collect().await
}

/// `CancelFlightInfo` through a raw action; the status it answers.
async fn cancel(
    client: &mut FlightSqlServiceClient<tonic::transport::Channel>,
    info: arrow_flight::FlightInfo,
) -> CancelStatus {
    use prost::Message;
    let action = arrow_flight::Action {
        r#type: "CancelFlightInfo".into(),
        body: arrow_flight::CancelFlightInfoRequest::new(info)
            .encode_to_vec()
            .into(),
    };
    let mut results = client.do_action(action).await.expect("CancelFlightInfo");
    let result = results.try_next().await.unwrap().expect("a result");
    let result = arrow_flight::CancelFlightInfoResult::decode(result.body).expect("result");
    CancelStatus::try_from(result.status).expect("a status")
}

/// Rust's Flight SQL client: DDL in the principal's session, errors with their codes.
async fn rust_client(cluster: &ProcessCluster, expected: Vec<Vec<String>>) {
    let channel = tonic::transport::Endpoint::from_shared(cluster.url().to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = FlightSqlServiceClient::new(channel.clone());
    client.set_token(TOKEN.to_string());
    let created = client
        .execute_update(
            "CREATE VIEW big_nations AS SELECT n_name FROM nation WHERE n_nationkey > 20".into(),
            None,
        )
        .await
        .expect("DDL through Flight SQL");
    assert_eq!(created, 0);
    // COPY runs on the cluster: the count it reports is read from where its answer is.
    let out = tempfile::tempdir().unwrap();
    let copied = client
        .execute_update(
            format!(
                "COPY (SELECT * FROM nation) TO '{}/' STORED AS PARQUET",
                out.path().display()
            ),
            None,
        )
        .await
        .expect("COPY through Flight SQL");
    assert_eq!(copied, 25, "rows COPY wrote");
    let info = client
        .execute(
            "SELECT n_name FROM big_nations ORDER BY n_name".into(),
            None,
        )
        .await
        .expect("query the view");
    let mut batches = Vec::new();
    for endpoint in &info.endpoint {
        batches.extend(endpoint_rows(&mut client, endpoint).await.expect("rows"));
    }
    assert_eq!(
        rows(&batches).unwrap(),
        expected,
        "the view, through Flight SQL"
    );

    // CancelFlightInfo: a FlightInfo of another principal (or forged) cancels nothing; the
    // caller's own finished query is released, so its rows are gone.
    let info = client
        .execute("SELECT n_name FROM nation".into(), None)
        .await
        .expect("query");
    let mut stranger_info = info.clone();
    stranger_info.app_metadata = b"some-job:0000".to_vec().into();
    assert_eq!(
        cancel(&mut client, stranger_info).await,
        CancelStatus::Unspecified
    );
    assert_eq!(
        cancel(&mut client, info.clone()).await,
        CancelStatus::NotCancellable
    );
    // The executors drop the rows when the scheduler's release reaches them (asynchronously).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut gone = false;
    while !gone && std::time::Instant::now() < deadline {
        gone = endpoint_rows(&mut client, &info.endpoint[0]).await.is_err();
        if !gone {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    assert!(gone, "the cancelled query's rows were released");

    let code = |e: arrow_flight::error::FlightError| match e {
        arrow_flight::error::FlightError::Tonic(status) => {
            (status.code(), status.message().to_string())
        }
        other => panic!("not a gRPC error: {other}"),
    };
    let (c, m) = code(client.execute("SELEC 1".into(), None).await.unwrap_err());
    assert_eq!(c, tonic::Code::InvalidArgument, "{m}");
    let (c, m) = code(
        client
            .execute("SELECT * FROM no_such_table".into(), None)
            .await
            .unwrap_err(),
    );
    assert_eq!(c, tonic::Code::NotFound, "{m}");
    assert!(m.contains("no_such_table"), "{m}");
    let mut stranger = FlightSqlServiceClient::new(channel);
    stranger.set_token("not-the-token".into());
    let (c, m) = code(stranger.execute("SELECT 1".into(), None).await.unwrap_err());
    assert_eq!(c, tonic::Code::Unauthenticated, "{m}");
}
