//! Printing results: table, CSV, TSV, JSON, NDJSON to stdout or a file; Parquet to a file.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::util::pretty::pretty_format_batches;

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

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Write one statement's result. Statements without columns (DDL, SET) print nothing.
pub fn write_result(
    out: &mut dyn Write,
    schema: &SchemaRef,
    batches: &[RecordBatch],
    format: Format,
    quiet: bool,
) -> Result<(), String> {
    if schema.fields().is_empty() {
        return Ok(());
    }
    let empty = [RecordBatch::new_empty(Arc::clone(schema))];
    let batches = if batches.is_empty() {
        &empty[..]
    } else {
        batches
    };
    match format {
        Format::Table => {
            let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
            writeln!(out, "{}", pretty_format_batches(batches).map_err(err)?).map_err(err)?;
            if !quiet {
                let noun = if rows == 1 { "row" } else { "rows" };
                writeln!(out, "{rows} {noun}").map_err(err)?;
            }
        }
        Format::Csv | Format::Tsv => {
            let delimiter = if format == Format::Csv { b',' } else { b'\t' };
            let mut writer = datafusion::arrow::csv::WriterBuilder::new()
                .with_header(true)
                .with_delimiter(delimiter)
                .build(&mut *out);
            for batch in batches {
                writer.write(batch).map_err(err)?;
            }
        }
        Format::Json => {
            let mut writer = arrow_json::ArrayWriter::new(&mut *out);
            let refs: Vec<&RecordBatch> = batches.iter().collect();
            writer.write_batches(&refs).map_err(err)?;
            writer.finish().map_err(err)?;
            drop(writer);
            writeln!(out).map_err(err)?;
        }
        Format::Ndjson => {
            let mut writer = arrow_json::LineDelimitedWriter::new(&mut *out);
            let refs: Vec<&RecordBatch> = batches.iter().collect();
            writer.write_batches(&refs).map_err(err)?;
            writer.finish().map_err(err)?;
        }
        Format::Parquet => {
            return Err("--format parquet needs -o FILE".to_string());
        }
    }
    out.flush().map_err(err)
}

/// Write a result as a Parquet file.
pub fn write_parquet(
    path: &Path,
    schema: &SchemaRef,
    batches: &[RecordBatch],
) -> Result<(), String> {
    let file = File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(file, Arc::clone(schema), None).map_err(err)?;
    for batch in batches {
        writer.write(batch).map_err(err)?;
    }
    writer.close().map_err(err)?;
    Ok(())
}
