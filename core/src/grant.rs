//! Result-file grants. A client holds only the client token, yet reads its job's result files
//! straight from the executors: the scheduler hands it, with each result location, a grant —
//! an HMAC-SHA256 of the file's path under the cluster token — and executors serve a file to a
//! client only with a valid grant for exactly that path. Shuffle files between stages get
//! none, so a client cannot read them, nor any other file.

use ring::hmac;
use subtle::ConstantTimeEq;

/// Separates the path from its grant in a Flight ticket.
const SEPARATOR: u8 = 0;

fn key(cluster_token: &str) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, cluster_token.as_bytes())
}

/// The grant (hex) for reading result file `path`.
pub fn grant(cluster_token: &str, path: &str) -> String {
    let tag = hmac::sign(
        &key(cluster_token),
        format!("volley-result:{path}").as_bytes(),
    );
    tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// True when `presented` is the grant for `path` (compared in constant time).
pub fn grant_matches(cluster_token: &str, path: &str, presented: &str) -> bool {
    bool::from(
        grant(cluster_token, path)
            .as_bytes()
            .ct_eq(presented.as_bytes()),
    )
}

/// A Flight ticket for `path`, with its grant when it has one.
pub fn ticket(path: &str, grant: &str) -> Vec<u8> {
    let mut bytes = path.as_bytes().to_vec();
    if !grant.is_empty() {
        bytes.push(SEPARATOR);
        bytes.extend_from_slice(grant.as_bytes());
    }
    bytes
}

/// Marks a ticket a Flight SQL client redeems: the executor sends the file's record batches
/// as standard Flight data (a schema message, then batches), not raw Arrow IPC chunks.
pub const STANDARD_FLIGHT: &[u8] = b"volley-flight-sql\0";

/// A Flight SQL client's ticket for result file `path` with its `grant`.
pub fn standard_ticket(path: &str, grant: &str) -> Vec<u8> {
    let mut bytes = STANDARD_FLIGHT.to_vec();
    bytes.extend(ticket(path, grant));
    bytes
}

/// The path and grant of a Flight ticket (None: not UTF-8).
pub fn parse_ticket(bytes: &[u8]) -> Option<(&str, Option<&str>)> {
    let text = std::str::from_utf8(bytes).ok()?;
    Some(match text.split_once(char::from(SEPARATOR)) {
        Some((path, grant)) => (path, Some(grant)),
        None => (text, None),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_bind_a_path_to_the_cluster_token() {
        let g = grant("k", "/w/j/3/0-0/part-0.arrow");
        assert_eq!(g.len(), 64);
        assert!(grant_matches("k", "/w/j/3/0-0/part-0.arrow", &g));
        assert!(!grant_matches("k", "/w/j/3/0-0/part-1.arrow", &g));
        assert!(!grant_matches("other", "/w/j/3/0-0/part-0.arrow", &g));
        let t = ticket("/w/j/3/0-0/part-0.arrow", &g);
        assert_eq!(
            parse_ticket(&t),
            Some(("/w/j/3/0-0/part-0.arrow", Some(g.as_str())))
        );
        assert_eq!(parse_ticket(b"/x"), Some(("/x", None)));
        assert_eq!(parse_ticket(&[0xff, 0xfe]), None);
    }
}
