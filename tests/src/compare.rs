//! Turning results into rows of text and comparing them with an oracle.
#![allow(clippy::panic)] // assertion helpers: a mismatch fails the calling test

use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::{Array, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One row as display strings; NULL is `NULL`.
pub type Row = Vec<String>;

/// Rows of `batches`, formatted the way `arrow` displays values.
pub fn rows(batches: &[RecordBatch]) -> Result<Vec<Row>, BoxError> {
    let options = FormatOptions::default().with_null("NULL");
    let mut out = Vec::new();
    for batch in batches {
        let formatters = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
            .collect::<Result<Vec<_>, _>>()?;
        for row in 0..batch.num_rows() {
            out.push(
                formatters
                    .iter()
                    .map(|f| f.value(row).to_string())
                    .collect(),
            );
        }
    }
    Ok(out)
}

/// True when columns of `batches` hold floating point values (compared with a tolerance).
pub fn float_columns(batches: &[RecordBatch]) -> Vec<bool> {
    batches
        .first()
        .map(|b| {
            b.schema()
                .fields()
                .iter()
                .map(|f| {
                    matches!(
                        f.data_type(),
                        DataType::Float16 | DataType::Float32 | DataType::Float64
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn close(a: &str, b: &str, tolerance: f64, relative: bool) -> bool {
    match (a.trim().parse::<f64>(), b.trim().parse::<f64>()) {
        (Ok(x), Ok(y)) => {
            let diff = (x - y).abs();
            if relative {
                diff <= tolerance * x.abs().max(y.abs()).max(1.0)
            } else {
                diff <= tolerance
            }
        }
        _ => false,
    }
}

/// Compare two result sets row by row (in order). Float columns may differ by a relative 1e-9
/// (distributed sums add in another order); everything else must be identical text.
pub fn assert_same_rows(expected: &[Row], actual: &[Row], floats: &[bool], what: &str) {
    assert_eq!(
        expected.len(),
        actual.len(),
        "{what}: row count differs\nexpected: {expected:?}\nactual:   {actual:?}"
    );
    for (i, (e, a)) in expected.iter().zip(actual).enumerate() {
        assert_eq!(e.len(), a.len(), "{what}: row {i} width differs");
        for (j, (ev, av)) in e.iter().zip(a).enumerate() {
            let is_float = floats.get(j).copied().unwrap_or(false);
            let ok = ev == av || (is_float && close(ev, av, 1e-9, true));
            assert!(
                ok,
                "{what}: row {i} column {j} differs: expected {ev:?}, got {av:?}\nexpected row: {e:?}\nactual row:   {a:?}"
            );
        }
    }
}

/// Read a CSV file with a header as text rows (header, rows).
pub fn read_csv(path: &Path) -> Result<(Vec<String>, Vec<Row>), BoxError> {
    let text = std::fs::read_to_string(path)?;
    let mut lines = text.lines();
    let header = header_fields(lines.next().ok_or("empty csv")?);
    let schema = Arc::new(Schema::new(
        header
            .iter()
            .map(|h| Field::new(h, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ));
    let reader = datafusion::arrow::csv::ReaderBuilder::new(schema)
        .with_header(true)
        .build(std::fs::File::open(path)?)?;
    let batches = reader.collect::<Result<Vec<_>, _>>()?;
    let mut out = Vec::new();
    for batch in &batches {
        for row in 0..batch.num_rows() {
            out.push(
                batch
                    .columns()
                    .iter()
                    .map(|c| {
                        if c.is_null(row) {
                            String::new()
                        } else {
                            let options = FormatOptions::default();
                            ArrayFormatter::try_new(c.as_ref(), &options)
                                .map(|f| f.value(row).to_string())
                                .unwrap_or_default()
                        }
                    })
                    .collect(),
            );
        }
    }
    Ok((header, out))
}

/// The fields of a CSV header line (a quoted name may hold commas).
fn header_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(String::new()),
            c => fields.last_mut().into_iter().for_each(|f| f.push(c)),
        }
    }
    fields
}

/// Compare rows with DuckDB's answer CSV: numbers within `tolerance`, text equal after trim.
pub fn assert_matches_answer(actual: &[Row], answer: &Path, tolerance: f64, what: &str) {
    let (_, expected) = match read_csv(answer) {
        Ok(v) => v,
        Err(e) => panic!("{what}: cannot read {}: {e}", answer.display()),
    };
    assert_eq!(
        expected.len(),
        actual.len(),
        "{what}: row count differs from DuckDB's answer"
    );
    for (i, (e, a)) in expected.iter().zip(actual).enumerate() {
        assert_eq!(
            e.len(),
            a.len(),
            "{what}: row {i} width differs from DuckDB's answer"
        );
        for (j, (ev, av)) in e.iter().zip(a).enumerate() {
            let ok = ev.trim() == av.trim() || close(ev, av, tolerance, false);
            assert!(
                ok,
                "{what}: row {i} column {j}: DuckDB says {ev:?}, Volley says {av:?}"
            );
        }
    }
}

/// Compare rows with DuckDB's answer CSV as multisets (queries whose ORDER BY leaves ties):
/// every expected row matches one actual row, numbers within `tolerance` (or a relative 1e-6:
/// large sums), text equal after trim.
pub fn assert_matches_answer_unordered(actual: &[Row], answer: &Path, tolerance: f64, what: &str) {
    let (_, expected) = match read_csv(answer) {
        Ok(v) => v,
        Err(e) => panic!("{what}: cannot read {}: {e}", answer.display()),
    };
    assert_eq!(
        expected.len(),
        actual.len(),
        "{what}: row count differs from DuckDB's answer"
    );
    let same = |e: &Row, a: &Row| {
        e.len() == a.len()
            && e.iter().zip(a).all(|(ev, av)| {
                // DuckDB's CSV writes NULL as an empty field.
                (ev.is_empty() && av == "NULL")
                    || ev.trim() == av.trim()
                    || close(ev, av, tolerance, false)
                    || close(ev, av, 1e-6, true)
            })
    };
    let mut used = vec![false; actual.len()];
    for (i, e) in expected.iter().enumerate() {
        let found = (0..actual.len()).find(|&j| !used[j] && same(e, &actual[j]));
        match found {
            Some(j) => used[j] = true,
            None => panic!("{what}: DuckDB's row {i} {e:?} is not in Volley's answer"),
        }
    }
}
