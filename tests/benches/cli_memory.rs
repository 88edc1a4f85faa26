//! Peak memory of `volley sql` streaming a big result: TPC-H `lineitem` as CSV through the
//! embedded cluster (scheduler, executors and client in one process), and through a separate
//! scheduler + executor processes (the client process alone). Peak RSS is read from
//! `/proc/<pid>/status` (`VmHWM`) while the process runs; the bench fails when the embedded
//! run exceeds `--limit-mib` (default 300, issue 13's bound at SF 1).
//!
//! `cargo build --release --bin volley && cargo bench -p volley-tests --bench cli_memory --
//!  [--sf 1] [--limit-mib 300]`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use volley_tests::process::{ProcessCluster, volley_bin};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Run `volley` with `args`, stdout to /dev/null; returns (seconds, peak RSS in MiB).
fn peak_rss(args: &[String]) -> Result<(f64, u64), BoxError> {
    let start = Instant::now();
    let mut child = Command::new(volley_bin()?)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    loop {
        if let Ok(status) = std::fs::read_to_string(&status_file)
            && let Some(line) = status.lines().find(|l| l.starts_with("VmHWM:"))
        {
            let kib: u64 = line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            peak_kib = peak_kib.max(kib);
        }
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                return Err(format!("volley {args:?} failed: {status}").into());
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((start.elapsed().as_secs_f64(), peak_kib / 1024))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut sf = 1.0f64;
    let mut limit_mib = 300u64;
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
    let lineitem = dir.join("lineitem");
    let query = "SELECT * FROM lineitem".to_string();
    let table = format!("lineitem={}", lineitem.display());
    let csv = ["--format", "csv", "--quiet"].map(String::from);

    let mut embedded = vec!["sql".to_string(), "--table".to_string(), table];
    embedded.extend(csv.iter().cloned());
    embedded.extend(["-c".to_string(), query.clone()]);
    let (secs, embedded_mib) = peak_rss(&embedded)?;
    println!(
        "embedded volley sql: lineitem SF {sf} as CSV in {secs:.1} s, peak RSS {embedded_mib} MiB"
    );

    let cluster = ProcessCluster::start(2, 2, &[]).await?;
    let create = format!(
        "CREATE EXTERNAL TABLE lineitem STORED AS PARQUET LOCATION '{}/'",
        lineitem.display()
    );
    let mut remote = vec![
        "sql".to_string(),
        "--scheduler".to_string(),
        cluster.url().to_string(),
    ];
    remote.extend(csv.iter().cloned());
    remote.extend(["-c".to_string(), create, "-c".to_string(), query]);
    let (secs, client_mib) = peak_rss(&remote)?;
    println!(
        "client of a process cluster: lineitem SF {sf} as CSV in {secs:.1} s, peak RSS {client_mib} MiB"
    );
    drop(cluster);

    if embedded_mib > limit_mib {
        return Err(format!("embedded peak RSS {embedded_mib} MiB is over {limit_mib} MiB").into());
    }
    println!("ok: under {limit_mib} MiB");
    Ok(())
}
