//! Splitting a SQL text into statements at its top-level `;` tokens. Each statement is sent
//! exactly as written: re-printing a parsed statement loses what the printer does not know
//! (DataFusion's drops `CREATE EXTERNAL TABLE` columns and `OPTIONS`, and unquotes `COPY` paths).

use datafusion::error::DataFusionError;
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::ParserError;
use datafusion::sql::sqlparser::tokenizer::{Location, Token, Tokenizer};
use volley_core::{Result, VolleyError};

/// Split a SQL text into single statements, each as written (trimmed, without its `;`).
/// Semicolons inside strings, quoted identifiers and comments do not split; pieces holding
/// only whitespace and comments are dropped.
pub fn split_statements(sql: &str) -> Result<Vec<String>> {
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize_with_location()
        .map_err(|e| VolleyError::DataFusion(DataFusionError::from(ParserError::from(e))))?;
    let offsets = Offsets::new(sql);
    let mut statements = Vec::new();
    let mut start = 0;
    let mut has_code = false;
    for token in &tokens {
        match &token.token {
            Token::SemiColon => {
                let end = offsets.byte(token.span.start).unwrap_or(sql.len());
                push_statement(&mut statements, sql, start, end, has_code);
                start = (end + 1).min(sql.len());
                has_code = false;
            }
            Token::Whitespace(_) | Token::EOF => {}
            _ => has_code = true,
        }
    }
    push_statement(&mut statements, sql, start, sql.len(), has_code);
    Ok(statements)
}

/// True when `sql` ends with a top-level `;` (after optional whitespace and comments), i.e. an
/// interactive shell has a complete input. An unterminated string or comment is not complete.
pub fn ends_statement(sql: &str) -> bool {
    let Ok(tokens) = Tokenizer::new(&GenericDialect {}, sql).tokenize() else {
        return false;
    };
    tokens
        .iter()
        .rev()
        .find(|t| !matches!(t, Token::Whitespace(_) | Token::EOF))
        .is_some_and(|t| *t == Token::SemiColon)
}

fn push_statement(out: &mut Vec<String>, sql: &str, start: usize, end: usize, has_code: bool) {
    if has_code && let Some(text) = sql.get(start..end) {
        out.push(text.trim().to_string());
    }
}

/// Byte offsets of the tokenizer's (line, column) locations: both count from 1, columns in
/// characters.
struct Offsets<'a> {
    sql: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> Offsets<'a> {
    fn new(sql: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(sql.match_indices('\n').map(|(i, _)| i + 1));
        Self { sql, line_starts }
    }

    fn byte(&self, location: Location) -> Option<usize> {
        let line = usize::try_from(location.line).ok()?.checked_sub(1)?;
        let column = usize::try_from(location.column).ok()?.checked_sub(1)?;
        let line_start = *self.line_starts.get(line)?;
        let rest = self.sql.get(line_start..)?;
        let within = rest
            .char_indices()
            .nth(column)
            .map_or(rest.len(), |(i, _)| i);
        Some(line_start + within)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_kept_as_written() {
        let sql = "CREATE EXTERNAL TABLE t (a INT, b VARCHAR) STORED AS CSV LOCATION '/x;y.csv' \
                   OPTIONS ('format.has_header' 'false', 'format.delimiter' ';');\n\
                   -- a comment; with a semicolon\n\
                   COPY (SELECT 'é;ü' AS s) TO '/tmp/out dir/x.csv' STORED AS CSV ;\n\
                   /* only a comment; */ ;\n\
                   SELECT \"odd;name\" FROM t";
        let statements = split_statements(sql).unwrap();
        assert_eq!(
            statements,
            [
                "CREATE EXTERNAL TABLE t (a INT, b VARCHAR) STORED AS CSV LOCATION '/x;y.csv' \
                 OPTIONS ('format.has_header' 'false', 'format.delimiter' ';')",
                "-- a comment; with a semicolon\nCOPY (SELECT 'é;ü' AS s) TO '/tmp/out dir/x.csv' STORED AS CSV",
                "SELECT \"odd;name\" FROM t",
            ]
        );
        assert!(split_statements("  ;; -- nothing\n").unwrap().is_empty());
        assert!(split_statements("SELECT 'unterminated").is_err());
    }

    #[test]
    fn complete_input_ends_with_a_top_level_semicolon() {
        assert!(ends_statement("SELECT 1;"));
        assert!(ends_statement("SELECT 1; -- done\n"));
        assert!(!ends_statement("SELECT ';"));
        assert!(!ends_statement("SELECT 1 /* ; */"));
        assert!(!ends_statement("SELECT 1"));
    }
}
