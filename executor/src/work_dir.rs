//! The executor's private work dir: `<root>/volley-<random>`, mode 0700, locked (`flock`) for
//! as long as the executor lives, so its name cannot be guessed and only its owner reads it.
//!
//! At start the executor removes the `volley-*` folders under its root whose lock nobody holds:
//! what executors killed on this root left behind. On re-registration it removes the folders of
//! jobs the scheduler no longer runs. Shuffle files inside are 0600 (see the shuffle writer).

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use volley_core::Result;

const PREFIX: &str = "volley-";

/// A locked private folder under an executor's `--work-dir`; removed when dropped.
#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
    _lock: File,
}

impl WorkDir {
    /// Sweep what dead executors left under `root`, then create and lock a fresh folder
    /// marked with `executor_id` (see [`volley_core::shuffle::EXECUTOR_MARKER`]).
    pub fn create(root: &Path, executor_id: &str) -> Result<Self> {
        std::fs::create_dir_all(root)?;
        let swept = sweep_dead(root);
        if swept > 0 {
            tracing::info!(root = %root.display(), swept, "removed work dirs of dead executors");
        }
        let name = uuid::Uuid::new_v4().simple().to_string();
        // Created and locked under a name the sweep ignores, then renamed: a sweep by an
        // executor starting at the same moment never sees it unlocked.
        let staging = root.join(format!(".{PREFIX}new-{name}"));
        let mut builder = std::fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&staging)?;
        std::fs::write(
            staging.join(volley_core::shuffle::EXECUTOR_MARKER),
            executor_id,
        )?;
        let lock = File::open(&staging)?;
        lock.try_lock().map_err(|e| {
            std::io::Error::other(format!("cannot lock {}: {e}", staging.display()))
        })?;
        let path = root.join(format!("{PREFIX}{name}"));
        std::fs::rename(&staging, &path)?;
        Ok(Self { path, _lock: lock })
    }

    /// The folder; jobs' shuffle files go in `<path>/<job id>/`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Paths of every file under the folder's job folders (the shuffle outputs it holds).
    pub fn files(&self) -> Vec<String> {
        let mut files = Vec::new();
        let mut dirs = vec![self.path.clone()];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                match entry.file_type() {
                    Ok(kind) if kind.is_dir() => dirs.push(path),
                    Ok(kind) if kind.is_file() && dir != self.path => {
                        files.push(path.display().to_string());
                    }
                    _ => {}
                }
            }
        }
        files
    }

    /// Remove the folders of jobs not in `active` (their jobs ended while this executor was
    /// cut off from the scheduler, or the scheduler restarted) last changed before `asked`,
    /// when the scheduler was asked (a folder of a job submitted since is kept). Returns how
    /// many went.
    pub fn sweep_jobs(&self, active: &HashSet<String>, asked: SystemTime) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.path) else {
            return 0;
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|modified| modified < asked);
            if old && !active.contains(&name) && std::fs::remove_dir_all(entry.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Remove `volley-*` folders under `root` whose lock is free (their executor is gone).
fn sweep_dead(root: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(root) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let path = entry.path();
        if !name.starts_with(PREFIX) || !path.is_dir() {
            continue;
        }
        let Ok(dir) = File::open(&path) else { continue };
        if dir.try_lock().is_ok() && std::fs::remove_dir_all(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_locked_and_swept() {
        let root = tempfile::tempdir().unwrap();
        let live = WorkDir::create(root.path(), "e1").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(live.path()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
        }
        // What a killed executor left: an unlocked volley-* folder with a job in it.
        let dead = root.path().join("volley-dead");
        std::fs::create_dir_all(dead.join("job1/1/0-0")).unwrap();
        std::fs::create_dir_all(live.path().join("job-a")).unwrap();
        std::fs::create_dir_all(live.path().join("job-b")).unwrap();
        let other = WorkDir::create(root.path(), "e1").unwrap();
        assert!(!dead.exists(), "the dead executor's folder is swept");
        assert!(live.path().exists(), "a live executor's folder is kept");
        let active: HashSet<String> = ["job-a".to_string()].into();
        let before = SystemTime::UNIX_EPOCH;
        assert_eq!(
            live.sweep_jobs(&active, before),
            0,
            "newer folders are kept"
        );
        let asked = SystemTime::now() + std::time::Duration::from_secs(1);
        assert_eq!(live.sweep_jobs(&active, asked), 1);
        assert!(live.path().join("job-a").exists() && !live.path().join("job-b").exists());
        let path = other.path().to_path_buf();
        drop(other);
        assert!(!path.exists());
    }
}
