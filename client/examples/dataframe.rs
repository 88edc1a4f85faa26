//! The DataFrame API on an embedded Volley cluster: `cargo run -p volley --example dataframe`.

use datafusion::common::JoinType;
use datafusion::functions_aggregate::expr_fn::sum;
use datafusion::prelude::{CsvReadOptions, col, lit};

#[tokio::main]
async fn main() -> datafusion::error::Result<()> {
    let ctx = volley::standalone(2)
        .await
        .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/slt/data");
    let emp = ctx
        .read_csv(format!("{dir}/emp.csv"), CsvReadOptions::new())
        .await?;
    let sales = ctx
        .read_csv(format!("{dir}/sales.csv"), CsvReadOptions::new())
        .await?;
    sales
        .filter(col("amount").gt(lit(50)))?
        .join(emp, JoinType::Inner, &["emp_id"], &["id"], None)?
        .aggregate(vec![col("name")], vec![sum(col("amount")).alias("total")])?
        .sort(vec![
            col("total").sort(false, true),
            col("name").sort(true, true),
        ])?
        .limit(0, Some(3))?
        .show()
        .await?;
    Ok(())
}
