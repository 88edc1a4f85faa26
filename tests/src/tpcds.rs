//! TPC-DS for tests: data generated once per machine at SF 0.1 under `target/tpcds-data` by
//! `tpcgen-cli` (PyPI, installed by `tests/install`; one Parquet file per table), the 99
//! queries and DuckDB's answers carried in `tests/tpcds/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use datafusion::prelude::{ParquetReadOptions, SessionContext};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The 24 TPC-DS tables.
pub const TABLES: [&str; 24] = [
    "call_center",
    "catalog_page",
    "catalog_returns",
    "catalog_sales",
    "customer",
    "customer_address",
    "customer_demographics",
    "date_dim",
    "household_demographics",
    "income_band",
    "inventory",
    "item",
    "promotion",
    "reason",
    "ship_mode",
    "store",
    "store_returns",
    "store_sales",
    "time_dim",
    "warehouse",
    "web_page",
    "web_returns",
    "web_sales",
    "web_site",
];

/// TPC-DS SF 0.1, generated once per machine under `target/tpcds-data/sf0.1`.
pub fn sf01() -> Result<PathBuf, BoxError> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().map_err(|_| "tpcds lock poisoned")?;
    let dir = crate::workspace_root().join("target/tpcds-data/sf0.1");
    generate(&dir, 0.1)?;
    Ok(dir)
}

/// Generate TPC-DS at scale factor `sf` into `dir` (one Parquet file per table) unless it is
/// already there.
pub fn generate(dir: &Path, sf: f64) -> Result<(), BoxError> {
    let done = dir.join("_SUCCESS");
    if done.exists() {
        return Ok(());
    }
    let staging = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&staging);
    let status = Command::new("tpcgen-cli")
        .args(["tpcds", "parquet", "-s", &sf.to_string(), "--output-dir"])
        .arg(&staging)
        .status()
        .map_err(|e| format!("cannot run tpcgen-cli ({e}): run tests/install first"))?;
    if !status.success() {
        return Err(format!("tpcgen-cli failed: {status}").into());
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&staging, dir)?;
    std::fs::File::create(done)?;
    Ok(())
}

fn table_file(dir: &Path, table: &str) -> PathBuf {
    dir.join(format!("{table}.parquet"))
}

/// `CREATE EXTERNAL TABLE` statements for the tables in `dir`.
pub fn create_table_statements(dir: &Path) -> Vec<String> {
    TABLES
        .iter()
        .map(|t| {
            format!(
                "CREATE EXTERNAL TABLE {t} STORED AS PARQUET LOCATION '{}'",
                table_file(dir, t).display()
            )
        })
        .collect()
}

/// Register the tables in a local DataFusion context.
pub async fn register_local(ctx: &SessionContext, dir: &Path) -> Result<(), BoxError> {
    for t in TABLES {
        ctx.register_parquet(
            t,
            table_file(dir, t).display().to_string(),
            ParquetReadOptions::default(),
        )
        .await?;
    }
    Ok(())
}

/// Text of query `n` (1..=99).
pub fn query(n: usize) -> Result<String, BoxError> {
    let path = crate::workspace_root()
        .join("tests/tpcds/queries")
        .join(format!("q{n}.sql"));
    Ok(std::fs::read_to_string(path)?)
}

/// DuckDB's answer to query `n` at SF 0.1.
pub fn answer_path(n: usize) -> PathBuf {
    crate::workspace_root()
        .join("tests/tpcds/answers/sf0.1")
        .join(format!("q{n}.csv"))
}
