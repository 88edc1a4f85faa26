//! Write a query result as Parquet from the cluster, then read it back:
//! `cargo run -p volley --example write_results -- /tmp/out`.

use datafusion::prelude::CsvReadOptions;

#[tokio::main]
async fn main() -> datafusion::error::Result<()> {
    let out = std::env::args().nth(1).unwrap_or_else(|| {
        std::env::temp_dir()
            .join("volley-example-out")
            .display()
            .to_string()
    });
    let ctx = volley::standalone(2)
        .await
        .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/slt/data/sales.csv");
    ctx.register_csv("sales", data, CsvReadOptions::new())
        .await?;
    ctx.sql("SELECT day, sum(amount) AS total FROM sales GROUP BY day")
        .await?
        .write_parquet(&out, Default::default(), None)
        .await?;
    ctx.read_parquet(&out, Default::default())
        .await?
        .sort(vec![datafusion::prelude::col("day").sort(true, true)])?
        .show()
        .await?;
    Ok(())
}
