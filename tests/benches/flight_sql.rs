//! A big result through Flight SQL: `SELECT * FROM lineitem` at TPC-H SF 1.67 (about 10
//! million rows) streamed to Python's ADBC driver a batch at a time, from a scheduler and two
//! executor processes. Prints rows/s and MB/s (Arrow bytes as the client holds them), the same
//! result read by `volley sql` (as CSV to /dev/null), and the scheduler's peak RSS during the
//! ADBC read — the rows stream from the executors, so it stays flat; the bench fails over
//! `--limit-mib` (default 200).
//!
//! `cargo build --release --bin volley && cargo bench -p volley-tests --bench flight_sql --
//!  [--sf 1.67] [--limit-mib 200]`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use volley::ClientOptions;
use volley_tests::process::{ProcessCluster, ProcessOptions, volley_bin};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const TOKEN: &str = "flight-sql-bench-token";

/// Resident memory (`VmRSS`, MiB) of process `pid` now.
fn rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
        })
        .unwrap_or(0)
        / 1024
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut sf = 1.67f64;
    let mut limit_mib = 200u64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--sf" => sf = args.next().ok_or("--sf needs a value")?.parse()?,
            "--limit-mib" => limit_mib = args.next().ok_or("--limit-mib needs a value")?.parse()?,
            "--bench" => {}
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let dir = volley_tests::workspace_root()
        .join("target/tpch-data")
        .join(format!("sf{sf}"));
    volley_tests::tpch::generate(&dir, sf, 4)?;
    let table = format!("lineitem={}", dir.join("lineitem").display());
    let options = ProcessOptions {
        env: vec![
            ("VOLLEY_AUTH_TOKEN".to_string(), TOKEN.to_string()),
            (
                "VOLLEY_CLUSTER_TOKEN".to_string(),
                "flight-sql-bench-cluster".to_string(),
            ),
        ],
        client: ClientOptions::with_token(TOKEN),
        log_dir: None,
        executor_hosts: Vec::new(),
    };
    let cluster = ProcessCluster::start_with(2, 2, &["--table", &table], options).await?;
    let query = "SELECT * FROM lineitem";

    // The scheduler's RSS, sampled while the ADBC client reads.
    let pid = cluster.scheduler_pid();
    let before = rss_mib(pid);
    let (peak, done) = (
        Arc::new(AtomicU64::new(before)),
        Arc::new(AtomicBool::new(false)),
    );
    let sampler = {
        let (peak, done) = (Arc::clone(&peak), Arc::clone(&done));
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_mib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let grpc = cluster.url().replace("http://", "grpc://");
    let out = Command::new("python3")
        .args(["tests/python/flight_sql_stream.py", &grpc, TOKEN, query])
        .current_dir(volley_tests::workspace_root())
        .stderr(Stdio::inherit())
        .output()?;
    done.store(true, Ordering::Relaxed);
    sampler.join().map_err(|_| "sampler panicked")?;
    if !out.status.success() {
        return Err(format!("ADBC read failed: {}", String::from_utf8_lossy(&out.stdout)).into());
    }
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let rows = report["rows"].as_u64().ok_or("rows")?;
    let bytes = report["bytes"].as_f64().ok_or("bytes")?;
    let secs = report["seconds"].as_f64().ok_or("seconds")?;
    let peak = peak.load(Ordering::Relaxed);
    println!(
        "ADBC (Flight SQL): {rows} rows of lineitem SF {sf} in {secs:.2} s = {:.0} rows/s, {:.0} MB/s; scheduler RSS {before} MiB before, peak {peak} MiB while streaming",
        rows as f64 / secs,
        bytes / secs / 1e6
    );

    let start = Instant::now();
    let status = Command::new(volley_bin()?)
        .args([
            "sql",
            "--scheduler",
            cluster.url(),
            "--format",
            "csv",
            "--quiet",
            "-c",
            query,
        ])
        .env("VOLLEY_AUTH_TOKEN", TOKEN)
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        return Err(format!("volley sql failed: {status}").into());
    }
    let cli = start.elapsed().as_secs_f64();
    println!(
        "volley sql (CSV to /dev/null): the same {rows} rows in {cli:.2} s = {:.0} rows/s",
        rows as f64 / cli
    );
    drop(cluster);
    if peak > limit_mib {
        return Err(format!("scheduler peak RSS {peak} MiB is over {limit_mib} MiB").into());
    }
    println!("ok: the scheduler stayed under {limit_mib} MiB");
    Ok(())
}
