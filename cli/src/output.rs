//! Printing results as they stream in: table, CSV, TSV, JSON, NDJSON to stdout or a file;
//! Parquet to a file. Memory stays bounded by a batch (the table format keeps a preview of
//! [`TABLE_PREVIEW_ROWS`] rows and says how many more there were).

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::util::pretty::pretty_format_batches;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};

/// Output formats.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Aligned table.
    Table,
    /// CSV with a header row.
    Csv,
    /// Tab-separated with a header row.
    Tsv,
    /// One JSON array of objects.
    Json,
    /// One JSON object per line.
    Ndjson,
    /// Parquet (only with -o FILE).
    Parquet,
}

/// Rows the table format prints at most; the rest are counted, not shown.
pub const TABLE_PREVIEW_ROWS: usize = 10_000;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Batches of one statement's result, as they arrive.
pub type Batches = BoxStream<'static, Result<RecordBatch, String>>;

/// Write one statement's result as it streams in. Statements without columns (DDL, SET)
/// print nothing. `parquet` is the file a Parquet result goes to.
pub async fn write_result(
    out: &mut dyn Write,
    parquet: Option<&Path>,
    schema: &SchemaRef,
    batches: Batches,
    format: Format,
    quiet: bool,
) -> Result<(), String> {
    if schema.fields().is_empty() {
        // Drain it: the stream's end releases the job's files.
        return batches.try_for_each(|_| async { Ok(()) }).await;
    }
    match format {
        Format::Table => write_table(out, schema, batches, quiet).await?,
        Format::Csv | Format::Tsv => {
            let delimiter = if format == Format::Csv { b',' } else { b'\t' };
            let mut writer = datafusion::arrow::csv::WriterBuilder::new()
                .with_header(true)
                .with_delimiter(delimiter)
                .build(&mut *out);
            // The header comes with the first batch, so an empty result still has one.
            writer
                .write(&RecordBatch::new_empty(Arc::clone(schema)))
                .map_err(err)?;
            let mut batches = batches;
            while let Some(batch) = batches.next().await {
                writer.write(&batch?).map_err(err)?;
            }
        }
        Format::Json => {
            let mut writer = arrow_json::ArrayWriter::new(&mut *out);
            let mut batches = batches;
            while let Some(batch) = batches.next().await {
                writer.write(&batch?).map_err(err)?;
            }
            writer.finish().map_err(err)?;
            drop(writer);
            writeln!(out).map_err(err)?;
        }
        Format::Ndjson => {
            let mut writer = arrow_json::LineDelimitedWriter::new(&mut *out);
            let mut batches = batches;
            while let Some(batch) = batches.next().await {
                writer.write(&batch?).map_err(err)?;
            }
            writer.finish().map_err(err)?;
        }
        Format::Parquet => {
            let path = parquet.ok_or_else(|| "--format parquet needs -o FILE".to_string())?;
            return write_parquet(path, schema, batches).await;
        }
    }
    out.flush().map_err(err)
}

async fn write_table(
    out: &mut dyn Write,
    schema: &SchemaRef,
    mut batches: Batches,
    quiet: bool,
) -> Result<(), String> {
    let mut preview = Vec::new();
    let mut kept = 0;
    let mut rows = 0;
    while let Some(batch) = batches.next().await {
        let batch = batch?;
        rows += batch.num_rows();
        if kept < TABLE_PREVIEW_ROWS {
            let take = batch.num_rows().min(TABLE_PREVIEW_ROWS - kept);
            kept += take;
            preview.push(batch.slice(0, take));
        }
    }
    if preview.is_empty() {
        preview.push(RecordBatch::new_empty(Arc::clone(schema)));
    }
    writeln!(out, "{}", pretty_format_batches(&preview).map_err(err)?).map_err(err)?;
    if rows > kept {
        writeln!(
            out,
            "({} more rows not shown: the table format shows the first {TABLE_PREVIEW_ROWS}; use --format csv for all)",
            rows - kept
        )
        .map_err(err)?;
    }
    if !quiet {
        let noun = if rows == 1 { "row" } else { "rows" };
        writeln!(out, "{rows} {noun}").map_err(err)?;
    }
    Ok(())
}

/// Write a result as a Parquet file, batch by batch.
async fn write_parquet(
    path: &Path,
    schema: &SchemaRef,
    mut batches: Batches,
) -> Result<(), String> {
    let file = File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(file, Arc::clone(schema), None).map_err(err)?;
    while let Some(batch) = batches.next().await {
        writer.write(&batch?).map_err(err)?;
    }
    writer.close().map_err(err)?;
    Ok(())
}
