//! L0: the `--state etcd://[user:password@]host:port[,host:port][/name]` URL.

use volley_core::{Result, VolleyError};

/// Where a `--state etcd://[user:password@]h1:2379[,h2:2379][/name]` URL points.
#[derive(Debug, PartialEq)]
pub(super) struct Target {
    pub endpoints: Vec<String>,
    pub name: String,
    /// etcd user and password (etcd with authentication enabled).
    pub user: Option<(String, String)>,
}

/// `url` with its password hidden, for messages.
fn redacted(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(_)) => match rest.split_once('@') {
            Some((user, hosts)) => {
                let name = user.split(':').next().unwrap_or("");
                format!("{scheme}://{name}:***@{hosts}")
            }
            None => url.to_string(),
        },
        _ => url.to_string(),
    }
}

pub(super) fn parse(url: &str) -> Result<Target> {
    let shown = redacted(url);
    let rest = url.strip_prefix("etcd://").ok_or_else(|| {
        VolleyError::Config(format!(
            "--state {shown}: expected etcd://[user:password@]host:port[,host:port][/name]"
        ))
    })?;
    let (user, rest) = match rest.split_once('@') {
        Some((user, rest)) => {
            let (name, password) = user.split_once(':').ok_or_else(|| {
                VolleyError::Config(format!("--state {shown}: expected user:password@"))
            })?;
            (Some((name.to_string(), password.to_string())), rest)
        }
        None => (None, rest),
    };
    let (hosts, name) = rest.split_once('/').unwrap_or((rest, "default"));
    let name = if name.is_empty() { "default" } else { name };
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(VolleyError::Config(format!(
            "--state {shown}: the cluster name may hold only letters, digits, '-' and '_'"
        )));
    }
    let endpoints: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| format!("http://{h}"))
        .collect();
    if endpoints.is_empty() {
        return Err(VolleyError::Config(format!(
            "--state {shown}: no etcd host"
        )));
    }
    Ok(Target {
        endpoints,
        name: name.to_string(),
        user,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_urls_name_endpoints_and_cluster() {
        let target = parse("etcd://127.0.0.1:2379,127.0.0.2:2379/prod").unwrap();
        assert_eq!(
            target.endpoints,
            ["http://127.0.0.1:2379", "http://127.0.0.2:2379"]
        );
        assert_eq!((target.name.as_str(), target.user), ("prod", None));
        assert_eq!(parse("etcd://h:1").unwrap().name, "default");
        let target = parse("etcd://volley:s3cret@h:1/x").unwrap();
        assert_eq!(target.user, Some(("volley".into(), "s3cret".into())));
        assert_eq!(target.endpoints, ["http://h:1"]);
        for bad in [
            "http://h:1",
            "etcd://",
            "etcd://h:1/a/b",
            "etcd://nopass@h:1",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        // Messages never show the password.
        let err = parse("etcd://volley:s3cret@h:1/a/b")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("volley:***@h:1") && !err.contains("s3cret"),
            "{err}"
        );
    }
}
