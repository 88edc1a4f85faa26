//! Seeded random input (bounded in count and time) against the three decoders that take bytes
//! from the network or disk: physical plans, shuffle IPC files and Flight tickets. None may
//! panic, hang or allocate without bound; each answers with an error, and the executor keeps
//! serving.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_flight::{FlightClient, Ticket};
use datafusion::arrow::array::{Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::ipc::CompressionType;
use datafusion::arrow::ipc::writer::{IpcWriteOptions, StreamWriter};
use datafusion::prelude::{CsvReadOptions, SessionContext};
use futures::TryStreamExt;
use volley::EmbeddedCluster;
use volley_core::codec::VolleyCodec;
use volley_core::plan::ShuffleWriterExec;
use volley_core::shuffle::read_local_file;

const SEED: u64 = 0x5eed_1234;
const BUDGET: Duration = Duration::from_secs(6);

/// `base` with a few random edits: flipped bytes, a cut, inserted junk or a splice.
fn mutate(rng: &mut fastrand::Rng, base: &[u8]) -> Vec<u8> {
    let mut bytes = base.to_vec();
    for _ in 0..rng.usize(1..=4) {
        if bytes.is_empty() {
            bytes.push(rng.u8(..));
        }
        let at = rng.usize(..bytes.len());
        match rng.u8(..4) {
            0 => bytes[at] ^= 1 << rng.u8(..8),
            1 => bytes[at] = rng.u8(..),
            2 => bytes.truncate(at),
            _ => {
                let junk: Vec<u8> = (0..rng.usize(1..16)).map(|_| rng.u8(..)).collect();
                bytes.splice(at..at, junk);
            }
        }
    }
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_plans_never_panic() {
    let ctx = SessionContext::new();
    ctx.register_csv(
        "emp",
        &volley_tests::data_file("emp.csv"),
        CsvReadOptions::new(),
    )
    .await
    .unwrap();
    let plan = ctx
        .sql("SELECT dept_id, count(*), max(name) FROM emp WHERE salary > 10 GROUP BY dept_id")
        .await
        .unwrap()
        .create_physical_plan()
        .await
        .unwrap();
    let writer = Arc::new(ShuffleWriterExec::new("job1", 1, plan, None));
    let base = VolleyCodec::encode_plan(writer).unwrap();
    let task_ctx = ctx.task_ctx();
    let mut rng = fastrand::Rng::with_seed(SEED);
    let started = Instant::now();
    let mut tried = 0;
    while tried < 3000 && started.elapsed() < BUDGET {
        let bytes = mutate(&mut rng, &base);
        // decode_plan turns a decoder panic into an error; a panic escaping it fails here.
        let _ = VolleyCodec::decode_plan(&bytes, &task_ctx);
        tried += 1;
    }
    assert!(tried > 100, "only {tried} plans in {BUDGET:?}");
}

fn ipc_file(compression: Option<CompressionType>) -> Vec<u8> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("n", DataType::Int64, false),
        Field::new("s", DataType::Utf8, true),
    ]));
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![
            Arc::new(Int64Array::from_iter_values(0..500)),
            Arc::new(StringArray::from_iter(
                (0..500).map(|i| (i % 7 != 0).then(|| format!("value {i}"))),
            )),
        ],
    )
    .unwrap();
    let options = IpcWriteOptions::default()
        .try_with_compression(compression)
        .unwrap();
    let mut writer = StreamWriter::try_new_with_options(Vec::new(), &schema, options).unwrap();
    writer.write(&batch).unwrap();
    writer.write(&batch.slice(10, 100)).unwrap();
    writer.finish().unwrap();
    writer.into_inner().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_shuffle_files_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = fastrand::Rng::with_seed(SEED);
    for base in [ipc_file(None), ipc_file(Some(CompressionType::LZ4_FRAME))] {
        // The file as written reads back whole.
        let path = dir.path().join("good.arrow");
        std::fs::write(&path, &base).unwrap();
        let rows: usize = read_local_file(path)
            .try_collect::<Vec<_>>()
            .await
            .unwrap()
            .iter()
            .map(|b| b.num_rows())
            .sum();
        assert_eq!(rows, 600);
        let started = Instant::now();
        let mut tried = 0;
        let mut caught = 0;
        while tried < 750 && started.elapsed() < BUDGET / 2 {
            let path = dir.path().join(format!("bad-{tried}.arrow"));
            std::fs::write(&path, mutate(&mut rng, &base)).unwrap();
            let read = read_local_file(path).try_collect::<Vec<_>>();
            let outcome = tokio::time::timeout(Duration::from_secs(10), read)
                .await
                .expect("a corrupt file never hangs the reader");
            // Arrow's IPC reader still panics on some corrupt bodies (array lengths beyond
            // their buffers); the reader catches that and ends the stream with an error.
            if let Err(e) = outcome
                && e.to_string().contains("panicked")
            {
                caught += 1;
            }
            tried += 1;
        }
        assert!(tried > 50, "only {tried} files");
        eprintln!("{tried} corrupt files read, {caught} arrow panics caught as errors");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_flight_tickets_are_refused_and_the_executor_keeps_serving() {
    volley_tests::init_tracing();
    let cluster = EmbeddedCluster::start(1, 1).await.unwrap();
    let client = cluster.client().await.unwrap();
    volley_tests::register_emp(&client).await.unwrap();
    let port = client.cluster_state().await.unwrap().executors[0].flight_port;
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut flight = FlightClient::new(channel);
    let mut rng = fastrand::Rng::with_seed(SEED);
    let bases: [&[u8]; 3] = [
        b"/etc/shadow",
        b"/tmp/volley-x/job/1/0-0/part-0.arrow",
        b"../../../../etc/passwd",
    ];
    let started = Instant::now();
    let mut tried = 0;
    while tried < 300 && started.elapsed() < BUDGET {
        let ticket = mutate(&mut rng, bases[tried % bases.len()]);
        let answer =
            tokio::time::timeout(Duration::from_secs(10), flight.do_get(Ticket::new(ticket)))
                .await
                .expect("a ticket is answered");
        match answer {
            Ok(stream) => {
                let read = stream.try_collect::<Vec<_>>().await;
                assert!(read.is_err(), "a random ticket read a file");
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
        tried += 1;
    }
    let (_, batches) = client
        .sql("SELECT count(*) AS n FROM emp")
        .await
        .expect("the executor keeps serving");
    assert_eq!(
        volley_tests::compare::rows(&batches).unwrap(),
        [["8".to_string()]]
    );
    cluster.shutdown().await;
}
