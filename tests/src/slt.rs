//! sqllogictest databases: a local DataFusion context and a Volley cluster session.

use std::time::Duration;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::prelude::SessionContext;
use sqllogictest::{AsyncDB, DBOutput, DefaultColumnType};
use volley::VolleyClient;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An error as text, so both databases report the same way.
#[derive(Debug)]
pub struct SltError(pub String);

impl std::fmt::Display for SltError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SltError {}

fn column_type(dt: &DataType) -> DefaultColumnType {
    match dt {
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64 => DefaultColumnType::Integer,
        DataType::Float16 | DataType::Float32 | DataType::Float64 | DataType::Decimal128(..) => {
            DefaultColumnType::FloatingPoint
        }
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => DefaultColumnType::Text,
        _ => DefaultColumnType::Any,
    }
}

fn output(
    batches: &[RecordBatch],
    schema: &datafusion::arrow::datatypes::Schema,
) -> Result<DBOutput<DefaultColumnType>, BoxError> {
    if schema.fields().is_empty() {
        return Ok(DBOutput::StatementComplete(0));
    }
    let types = schema
        .fields()
        .iter()
        .map(|f| column_type(f.data_type()))
        .collect();
    let options = FormatOptions::default().with_null("NULL");
    let mut rows = Vec::new();
    for batch in batches {
        let formatters = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
            .collect::<Result<Vec<_>, _>>()?;
        for row in 0..batch.num_rows() {
            rows.push(
                formatters
                    .iter()
                    .map(|f| {
                        let v = f.value(row).to_string();
                        if v.is_empty() {
                            "(empty)".to_string()
                        } else {
                            v
                        }
                    })
                    .collect(),
            );
        }
    }
    Ok(DBOutput::Rows { types, rows })
}

/// Single-node DataFusion.
pub struct LocalDb {
    /// The context statements run in.
    pub ctx: SessionContext,
}

#[async_trait::async_trait]
impl AsyncDB for LocalDb {
    type Error = SltError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, SltError> {
        let run = async {
            let df = self.ctx.sql(sql).await?;
            let schema = df.schema().as_arrow().clone();
            let batches = df.collect().await?;
            output(&batches, &schema)
        };
        run.await.map_err(|e: BoxError| SltError(e.to_string()))
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "datafusion"
    }

    async fn sleep(dur: Duration) {
        tokio::time::sleep(dur).await;
    }
}

/// A session on a Volley cluster.
pub struct ClusterDb {
    /// The client session.
    pub client: VolleyClient,
}

#[async_trait::async_trait]
impl AsyncDB for ClusterDb {
    type Error = SltError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, SltError> {
        let run = async {
            let (schema, batches) = self.client.sql(sql).await?;
            output(&batches, &schema)
        };
        run.await.map_err(|e: BoxError| SltError(e.to_string()))
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "volley"
    }

    async fn sleep(dur: Duration) {
        tokio::time::sleep(dur).await;
    }
}
