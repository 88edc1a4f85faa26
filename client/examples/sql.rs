//! Run SQL on an embedded Volley cluster: `cargo run -p volley --example sql`.

use datafusion::prelude::CsvReadOptions;

#[tokio::main]
async fn main() -> datafusion::error::Result<()> {
    // The one line that differs from plain DataFusion: a context whose queries run on Volley.
    let ctx = volley::standalone(2)
        .await
        .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/slt/data/sales.csv");
    ctx.register_csv("sales", data, CsvReadOptions::new())
        .await?;
    ctx.sql("SELECT region, count(*) AS sales, sum(amount) AS total FROM sales GROUP BY region ORDER BY region")
        .await?
        .show()
        .await?;
    Ok(())
}
