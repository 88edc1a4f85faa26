//! Splitting a SQL text into statements at its top-level `;` tokens. Each statement is sent
//! exactly as written: re-printing a parsed statement loses what the printer does not know
//! (DataFusion's drops `CREATE EXTERNAL TABLE` columns and `OPTIONS`, and unquotes `COPY` paths).

use datafusion::error::DataFusionError;
use datafusion::sql::sqlparser::dialect::{GenericDialect, dialect_from_str};
use datafusion::sql::sqlparser::parser::ParserError;
use datafusion::sql::sqlparser::tokenizer::{Location, Token, Tokenizer};
use volley_core::{Result, VolleyError};

/// Split a SQL text into single statements, each as written (trimmed, without its `;`).
/// Semicolons inside strings, quoted identifiers and comments do not split; pieces holding
/// only whitespace and comments are dropped. Tokens are read in DataFusion's default
/// (generic) dialect; see [`split_statements_in`] for sessions that set another.
pub fn split_statements(sql: &str) -> Result<Vec<String>> {
    Ok(split_statements_in(sql, "generic")?.0)
}

/// [`split_statements`] in `dialect` (named as `datafusion.sql_parser.dialect` names it:
/// `MySQL`, `PostgreSQL`, ...), where strings, comments and quoting differ (`#` comments and
/// `\'` escapes in MySQL, say). A `SET datafusion.sql_parser.dialect = '...'` statement
/// switches the dialect for the text after it; returns the statements and the dialect in
/// force at the end, for the next input of the same session.
pub fn split_statements_in(sql: &str, dialect: &str) -> Result<(Vec<String>, String)> {
    let mut statements = Vec::new();
    let mut dialect = dialect.to_string();
    let mut from = 0;
    loop {
        let rest = sql.get(from..).unwrap_or_default();
        let parser_dialect =
            dialect_from_str(&dialect).unwrap_or_else(|| Box::new(GenericDialect {}));
        let mut tokens = Vec::new();
        // Tokens before a tokenizer error are kept: a dialect switch before it still counts.
        let tokenized = Tokenizer::new(parser_dialect.as_ref(), rest)
            .tokenize_with_location_into_buf(&mut tokens);
        let offsets = Offsets::new(rest);
        let mut start = 0;
        let mut has_code = false;
        let mut switch = None;
        for token in &tokens {
            match &token.token {
                Token::SemiColon => {
                    let end = offsets.byte(token.span.start).unwrap_or(rest.len());
                    if let Some(text) = statement(rest, start, end, has_code) {
                        switch = dialect_set_by(&text)
                            .filter(|next| !next.eq_ignore_ascii_case(&dialect))
                            .map(|next| (next, from + end + 1));
                        statements.push(text);
                    }
                    start = (end + 1).min(rest.len());
                    has_code = false;
                    if switch.is_some() {
                        break;
                    }
                }
                Token::Whitespace(_) | Token::EOF => {}
                _ => has_code = true,
            }
        }
        if let Some((next, resume)) = switch {
            dialect = next;
            from = resume.min(sql.len());
            continue;
        }
        tokenized
            .map_err(|e| VolleyError::DataFusion(DataFusionError::from(ParserError::from(e))))?;
        if let Some(text) = statement(rest, start, rest.len(), has_code) {
            if let Some(next) = dialect_set_by(&text) {
                dialect = next;
            }
            statements.push(text);
        }
        return Ok((statements, dialect));
    }
}

/// The dialect a `SET datafusion.sql_parser.dialect = 'X'` (or `TO X`) statement sets.
fn dialect_set_by(statement: &str) -> Option<String> {
    let text = statement.trim();
    let rest = strip_word(text, "set")?;
    let rest = strip_word(rest, "datafusion.sql_parser.dialect")?;
    let rest = rest
        .strip_prefix('=')
        .or_else(|| strip_word(rest, "to"))?
        .trim();
    let value = rest.trim_matches(|c| c == '\'' || c == '"').trim();
    (!value.is_empty()).then(|| value.to_string())
}

/// `text` after `word` (case-insensitive) and the whitespace after it.
fn strip_word<'a>(text: &'a str, word: &str) -> Option<&'a str> {
    let head = text.get(..word.len())?;
    head.eq_ignore_ascii_case(word)
        .then(|| text.get(word.len()..).unwrap_or_default().trim_start())
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

/// The statement between byte offsets `start` and `end` of `sql`, trimmed, if it has code.
fn statement(sql: &str, start: usize, end: usize, has_code: bool) -> Option<String> {
    sql.get(start..end)
        .filter(|_| has_code)
        .map(|text| text.trim().to_string())
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
    fn a_session_dialect_decides_what_a_semicolon_is() {
        // MySQL: `#` starts a comment and `\'` escapes a quote; in the generic dialect
        // neither, so the same text splits elsewhere (or does not tokenize at all).
        let sql = "SET datafusion.sql_parser.dialect = 'MySQL';\n\
                   SELECT 'it\\'s; one' AS s # a comment; still a comment\n;\n\
                   SET datafusion.sql_parser.dialect TO generic; SELECT 2";
        let (statements, dialect) = split_statements_in(sql, "generic").unwrap();
        assert_eq!(
            statements,
            [
                "SET datafusion.sql_parser.dialect = 'MySQL'",
                "SELECT 'it\\'s; one' AS s # a comment; still a comment",
                "SET datafusion.sql_parser.dialect TO generic",
                "SELECT 2",
            ]
        );
        assert_eq!(dialect, "generic");
        let (mysql, dialect) = split_statements_in("SELECT 1 # x; y\n", "MySQL").unwrap();
        assert_eq!((mysql.len(), dialect.as_str()), (1, "MySQL"));
        assert_eq!(split_statements("SELECT 1 # x; y").unwrap().len(), 2);
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
