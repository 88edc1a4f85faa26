//! Names that become file paths. Job ids, stage ids and shuffle file paths arrive in plans and
//! status reports; they are checked before any file is created or read under them, and the
//! sizes plan nodes carry are bounded before anything is allocated for them.

use std::path::{Component, Path};

use crate::{Result, VolleyError};

/// Longest id accepted.
pub const MAX_ID_LEN: usize = 64;

/// Most partitions a stage or an exchange may have.
pub const MAX_PARTITIONS: usize = 100_000;

/// An id that is safe as one path component: 1 to [`MAX_ID_LEN`] ASCII letters, digits, `-`
/// or `_` (ids Volley generates are hex).
pub fn check_id(what: &str, id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(VolleyError::InvalidMessage(format!(
            "{what} {:?} is not a valid id (1 to {MAX_ID_LEN} letters, digits, '-' or '_')",
            id.chars().take(80).collect::<String>()
        )))
    }
}

/// A partition count a plan node asks for, bounded by [`MAX_PARTITIONS`].
pub fn check_partitions(what: &str, count: usize) -> Result<usize> {
    if count <= MAX_PARTITIONS {
        Ok(count)
    } else {
        Err(VolleyError::InvalidMessage(format!(
            "{what} has {count} partitions; at most {MAX_PARTITIONS} are allowed"
        )))
    }
}

/// `path` has the shape of a shuffle file that a task of `stage_id` wrote (for `job_id`, when
/// given): absolute, plain components only, ending `<job>/<stage>/<partition>-<attempt>/part-<n>.arrow`.
/// A reported or requested location of any other shape (`/etc/shadow`, `..`) is refused.
pub fn check_shuffle_path(path: &str, job_id: Option<&str>, stage_id: u32) -> Result<()> {
    let bad = |why: &str| {
        VolleyError::InvalidMessage(format!(
            "{:?} is not a shuffle file of stage {stage_id}: {why}",
            path.chars().take(200).collect::<String>()
        ))
    };
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(bad("not an absolute path"));
    }
    if p.components()
        .any(|c| !matches!(c, Component::RootDir | Component::Normal(_)))
    {
        return Err(bad("only plain path components are allowed"));
    }
    let names: Vec<&str> = p
        .components()
        .rev()
        .take(4)
        .filter_map(|c| match c {
            Component::Normal(n) => n.to_str(),
            _ => None,
        })
        .collect();
    let [file, task, stage, job] = names[..] else {
        return Err(bad("too short"));
    };
    let numbered = |text: &str, prefix: &str, suffix: &str| {
        text.strip_prefix(prefix)
            .and_then(|t| t.strip_suffix(suffix))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    let task_ok = task.split_once('-').is_some_and(|(partition, attempt)| {
        numbered(partition, "", "") && numbered(attempt, "", "")
    });
    if !numbered(file, "part-", ".arrow") || !task_ok {
        return Err(bad("not named like shuffle output"));
    }
    if stage != stage_id.to_string() {
        return Err(bad("it belongs to another stage"));
    }
    check_id("job id", job).map_err(|_| bad("bad job id"))?;
    if job_id.is_some_and(|expected| expected != job) {
        return Err(bad("it belongs to another job"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_paths() {
        assert!(check_id("job id", "3f2a9c0d1e4b5a6f").is_ok());
        for bad in ["", "../../x", "/abs", "a/b", "a.b", &"x".repeat(65)] {
            assert!(check_id("job id", bad).is_err(), "{bad}");
        }
        assert!(check_partitions("reader", MAX_PARTITIONS).is_ok());
        assert!(check_partitions("reader", u32::MAX as usize).is_err());
        let good = "/tmp/w/e1/ab12/3/0-1/part-7.arrow";
        assert!(check_shuffle_path(good, Some("ab12"), 3).is_ok());
        assert!(check_shuffle_path(good, None, 3).is_ok());
        assert!(check_shuffle_path(good, Some("other"), 3).is_err());
        assert!(check_shuffle_path(good, None, 4).is_err());
        for bad in [
            "/etc/shadow",
            "relative/ab12/3/0-1/part-7.arrow",
            "/tmp/w/../ab12/3/0-1/part-7.arrow",
            "/tmp/w/ab12/3/0-1/part-7.arrow/../../../../etc/shadow",
            "/tmp/w/ab12/3/x-1/part-7.arrow",
            "/tmp/w/ab12/3/0-1/secret.txt",
            "/ab.c/3/0-1/part-7.arrow",
        ] {
            assert!(check_shuffle_path(bad, None, 3).is_err(), "{bad}");
        }
    }
}
