//! TPC-H data generated in-process with `tpchgen-arrow` (identical to dbgen) as Parquet.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::error::ArrowError;
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use tpchgen::generators::{
    CustomerGenerator, LineItemGenerator, NationGenerator, OrderGenerator, PartGenerator,
    PartSuppGenerator, RegionGenerator, SupplierGenerator,
};
use tpchgen_arrow::{
    CustomerArrow, LineItemArrow, NationArrow, OrderArrow, PartArrow, PartSuppArrow, RegionArrow,
    SupplierArrow,
};

/// The eight TPC-H tables.
pub const TABLES: [&str; 8] = [
    "customer", "lineitem", "nation", "orders", "part", "partsupp", "region", "supplier",
];

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn batches(
    table: &str,
    sf: f64,
    part: i32,
    parts: i32,
) -> Result<Box<dyn Iterator<Item = Result<RecordBatch, ArrowError>>>, BoxError> {
    Ok(match table {
        "customer" => Box::new(CustomerArrow::new(CustomerGenerator::new(sf, part, parts))),
        "lineitem" => Box::new(LineItemArrow::new(LineItemGenerator::new(sf, part, parts))),
        "nation" => Box::new(NationArrow::new(NationGenerator::new(sf, part, parts))),
        "orders" => Box::new(OrderArrow::new(OrderGenerator::new(sf, part, parts))),
        "part" => Box::new(PartArrow::new(PartGenerator::new(sf, part, parts))),
        "partsupp" => Box::new(PartSuppArrow::new(PartSuppGenerator::new(sf, part, parts))),
        "region" => Box::new(RegionArrow::new(RegionGenerator::new(sf, part, parts))),
        "supplier" => Box::new(SupplierArrow::new(SupplierGenerator::new(sf, part, parts))),
        other => return Err(format!("unknown TPC-H table {other}").into()),
    })
}

fn write_parquet(
    path: &Path,
    batches: impl Iterator<Item = Result<RecordBatch, ArrowError>>,
) -> Result<(), BoxError> {
    let mut batches = batches.peekable();
    let schema: SchemaRef = match batches.peek() {
        Some(Ok(first)) => first.schema(),
        Some(Err(e)) => return Err(e.to_string().into()),
        None => return Err(format!("no data for {}", path.display()).into()),
    };
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let tmp = path.with_extension("tmp");
    let mut writer = ArrowWriter::try_new(File::create(&tmp)?, schema, Some(props))?;
    for batch in batches {
        writer.write(&batch?)?;
    }
    writer.close()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Generate TPC-H at scale factor `sf` into `dir` (one folder per table, `parts` files for the
/// large tables) unless it is already there.
pub fn generate(dir: &Path, sf: f64, parts: i32) -> Result<(), BoxError> {
    let done = dir.join("_SUCCESS");
    if done.exists() {
        return Ok(());
    }
    for table in TABLES {
        let table_dir = dir.join(table);
        std::fs::create_dir_all(&table_dir)?;
        let n = if matches!(table, "nation" | "region") {
            1
        } else {
            parts.max(1)
        };
        for part in 1..=n {
            write_parquet(
                &table_dir.join(format!("part-{part}.parquet")),
                batches(table, sf, part, n)?,
            )?;
        }
    }
    File::create(done)?;
    Ok(())
}

/// TPC-H SF 0.1 for tests, generated once per machine under `target/tpch-data`.
pub fn sf01() -> Result<PathBuf, BoxError> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().map_err(|_| "tpch lock poisoned")?;
    let dir = crate::workspace_root()
        .join("target")
        .join("tpch-data")
        .join("sf0.1");
    generate(&dir, 0.1, 2)?;
    Ok(dir)
}

/// `CREATE EXTERNAL TABLE` statements for the tables in `dir`.
pub fn create_table_statements(dir: &Path) -> Vec<String> {
    TABLES
        .iter()
        .map(|t| {
            format!(
                "CREATE EXTERNAL TABLE {t} STORED AS PARQUET LOCATION '{}/'",
                dir.join(t).display()
            )
        })
        .collect()
}

/// Register the tables in a local DataFusion context.
pub async fn register_local(ctx: &SessionContext, dir: &Path) -> Result<(), BoxError> {
    for t in TABLES {
        ctx.register_parquet(
            t,
            dir.join(t).display().to_string(),
            ParquetReadOptions::default(),
        )
        .await?;
    }
    Ok(())
}

/// Register the tables in `dir` in a cluster session, and return a local DataFusion context
/// (Volley's session settings, 4 partitions) holding them too: the oracle of the cluster's
/// answers.
pub async fn register_both(
    client: &volley::VolleyClient,
    dir: &Path,
) -> Result<SessionContext, BoxError> {
    for statement in create_table_statements(dir) {
        client.sql(&statement).await?;
    }
    let ctx = SessionContext::new_with_config(volley_core::config::volley_session_config(4));
    register_local(&ctx, dir).await?;
    Ok(ctx)
}

/// Text of TPC-H query `n` (1..=22).
pub fn query(n: usize) -> Result<String, BoxError> {
    let path = crate::workspace_root()
        .join("sql-examples/tpch")
        .join(format!("q{n}.sql"));
    Ok(std::fs::read_to_string(path)?)
}

/// DuckDB's answer file for query `n` at SF 0.1.
pub fn answer_path(n: usize) -> PathBuf {
    crate::workspace_root()
        .join("tests/tpch/answers/sf0.1")
        .join(format!("q{n}.csv"))
}
