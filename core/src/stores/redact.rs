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
    // A secret option key was just read: the next value token (quoted or bare) is hidden.
    let mut pending = false;
    // The current run of words joined by dots (an unquoted key such as aws.secret_access_key).
    let mut words = String::new();
    let secret_key = |key: &str| key.contains('.') && is_secret_key(key);
    for token in tokens {
        let value = value_text(&token);
        match &token {
            Token::Word(w) if !pending => {
                words.push_str(&w.value);
                out.push_str(&token.to_string());
                continue;
            }
            Token::Period if !pending && !words.is_empty() => {
                words.push('.');
                out.push_str(&token.to_string());
                continue;
            }
            _ => {}
        }
        if !words.is_empty() {
            pending = secret_key(&std::mem::take(&mut words));
        }
        if matches!(token, Token::Whitespace(_)) {
            out.push_str(&token.to_string());
            continue;
        }
        match value {
            Some(value) if pending => {
                secrets.push(value);
                out.push_str(&format!("'{HIDDEN}'"));
                pending = false;
            }
            _ => {
                pending = string_value(&token).is_some_and(secret_key);
                out.push_str(&token.to_string());
            }
        }
    }
    (out, secrets)
}

/// The text of a token that can be an option value: a string, a bare word or a number.
fn value_text(token: &Token) -> Option<String> {
    match token {
        Token::Word(w) => Some(w.value.clone()),
        Token::Number(n, _) => Some(n.clone()),
        other => string_value(other).map(str::to_string),
    }
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

/// `text` with every one of `secrets` (4 characters or more), as written or percent-encoded
/// (inside a URL), replaced by `***`.
pub fn redact_values(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for secret in secrets.iter().filter(|s| s.len() >= 4) {
        let encoded: String = url::form_urlencoded::byte_serialize(secret.as_bytes()).collect();
        let strict = encoded.replace('+', "%20");
        for form in [secret.as_str(), encoded.as_str(), strict.as_str()] {
            if out.contains(form) {
                out = out.replace(form, HIDDEN);
            }
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
        let bare = "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION 's3://b/' OPTIONS ('aws.access_key_id' AKIDBARE9, aws.secret_access_key 123456789, 'aws.region' 'us-east-1')";
        let (shown, found) = redact_sql_collect(bare);
        assert!(
            !shown.contains("AKIDBARE9") && !shown.contains("123456789"),
            "{shown}"
        );
        assert_eq!(
            found,
            vec!["AKIDBARE9".to_string(), "123456789".to_string()]
        );
        assert!(shown.contains("'aws.region' 'us-east-1'"), "{shown}");
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
        let message = redact_values("GET https://h/x?sig=a%2Fb%2Bc", &["a/b+c".to_string()]);
        assert_eq!(message, "GET https://h/x?sig=***");
    }
}
