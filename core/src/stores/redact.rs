//! Keeping store secrets out of texts: statements as kept for job listings and logs (the value
//! after a secret option key becomes `'***'`), and error messages (any known secret value
//! becomes `***`).

use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use super::options::is_secret_key;

const HIDDEN: &str = "***";

/// `sql` with the value of every secret store option (`'aws.secret_access_key' '...'`)
/// replaced by `'***'`. A statement that cannot be tokenized but names a secret option is
/// replaced as a whole.
pub fn redact_sql(sql: &str) -> String {
    redact_sql_collect(sql).0
}

/// [`redact_sql`], and the secret values it hid (to redact from errors about the statement).
pub fn redact_sql_collect(sql: &str) -> (String, Vec<String>) {
    let lower = sql.to_ascii_lowercase();
    let mentions_secret = ["aws.", "gcp.", "google.", "azure.", "http."]
        .iter()
        .any(|p| lower.contains(p));
    if !mentions_secret {
        return (sql.to_string(), Vec::new());
    }
    let Ok(tokens) = Tokenizer::new(&GenericDialect {}, sql).tokenize() else {
        let hidden = "[statement hidden: it names store options that could not be redacted]";
        return (hidden.to_string(), Vec::new());
    };
    let mut secrets = Vec::new();
    let mut out = String::with_capacity(sql.len());
    // The option key just read: a quoted string, or words joined by dots.
    let mut key = String::new();
    let mut words = String::new();
    for token in tokens {
        match &token {
            Token::Whitespace(_) => out.push_str(&token.to_string()),
            Token::Word(w) => {
                words.push_str(&w.value);
                out.push_str(&token.to_string());
            }
            Token::Period => {
                words.push('.');
                out.push_str(&token.to_string());
            }
            _ => {
                if !words.is_empty() {
                    key = std::mem::take(&mut words);
                }
                match string_value(&token) {
                    Some(value) => {
                        if is_secret_key(&key) && key.contains('.') {
                            secrets.push(value.to_string());
                            out.push_str(&format!("'{HIDDEN}'"));
                            key.clear();
                        } else {
                            out.push_str(&token.to_string());
                            key = value.to_string();
                        }
                    }
                    None => {
                        key.clear();
                        out.push_str(&token.to_string());
                    }
                }
            }
        }
    }
    (out, secrets)
}

fn string_value(token: &Token) -> Option<&str> {
    match token {
        Token::SingleQuotedString(s)
        | Token::DoubleQuotedString(s)
        | Token::TripleSingleQuotedString(s)
        | Token::TripleDoubleQuotedString(s)
        | Token::EscapedStringLiteral(s)
        | Token::NationalStringLiteral(s) => Some(s),
        Token::DollarQuotedString(s) => Some(&s.value),
        _ => None,
    }
}

/// `text` with every one of `secrets` (non-empty) replaced by `***`.
pub fn redact_values(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for secret in secrets.iter().filter(|s| s.len() >= 4) {
        if out.contains(secret.as_str()) {
            out = out.replace(secret.as_str(), HIDDEN);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_option_values_are_hidden() {
        let sql = "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION 's3://b/p/' OPTIONS (\n  'aws.access_key_id' 'AKID1234', 'aws.secret_access_key' 'sEcReT/+x', 'aws.region' 'us-east-1', aws.session_token 'tok123')";
        let shown = redact_sql(sql);
        for secret in ["AKID1234", "sEcReT/+x", "tok123"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("'aws.region' 'us-east-1'"), "{shown}");
        assert!(shown.contains("LOCATION 's3://b/p/'"), "{shown}");
        assert_eq!(redact_sql("SELECT 'aws.x'"), "SELECT 'aws.x'");
        assert_eq!(redact_sql("SELECT 1"), "SELECT 1");
        let hidden = redact_sql("SELECT 'aws.secret_access_key' 'x");
        assert!(!hidden.contains('x') || hidden.starts_with('['), "{hidden}");
        let message = redact_values("403: key AKID1234 denied", &["AKID1234".to_string()]);
        assert_eq!(message, "403: key *** denied");
    }
}
