//! L1: the file backend of [`super::StateStore`]: one redb database, `DIR/scheduler.redb`.
//! Every batch of records is one ACID transaction, so a process killed mid-write loses no
//! committed record; the file's own format version is checked when it opens.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use volley_core::{Result, VolleyError};

use super::{
    FORMAT_VERSION, HISTORY_LIMIT, RunningJob, StateStore, StoredSession, decode, encode, key,
};
use crate::views::JobSummary;

/// Name of the state file in the state directory.
pub const FILE_NAME: &str = "scheduler.redb";

const META: TableDefinition<&str, u32> = TableDefinition::new("meta");
const FINISHED: TableDefinition<&str, &[u8]> = TableDefinition::new("finished_jobs");
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
const RUNNING: TableDefinition<&str, &[u8]> = TableDefinition::new("running_jobs");

/// State in a redb file.
pub struct FileStore {
    db: Database,
    path: PathBuf,
}

impl FileStore {
    /// Open (or create) `dir/scheduler.redb`; `reset` removes it first.
    pub fn open(dir: &Path, reset: bool) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| {
            VolleyError::Config(format!("cannot create state dir {}: {e}", dir.display()))
        })?;
        let path = dir.join(FILE_NAME);
        if reset && path.exists() {
            std::fs::remove_file(&path).map_err(|e| {
                VolleyError::Config(format!("cannot reset state file {}: {e}", path.display()))
            })?;
        }
        let db = Database::create(&path).map_err(|e| {
            VolleyError::Config(format!(
                "cannot open state file {}: {e} (start empty with --state-reset)",
                path.display()
            ))
        })?;
        owner_only(&path)?;
        let store = Self { db, path };
        store.check_version()?;
        // Every record must decode now: a corrupt one is an error at start, not later.
        store.finished_jobs()?;
        store.sessions()?;
        store.running_jobs()?;
        Ok(store)
    }

    fn err(&self, e: impl Into<redb::Error>) -> VolleyError {
        VolleyError::Internal(format!("state file {}: {}", self.path.display(), e.into()))
    }

    /// Stamp a new file with [`FORMAT_VERSION`]; refuse a file of a newer one.
    fn check_version(&self) -> Result<()> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            let found = meta
                .get("format_version")
                .map_err(|e| self.err(e))?
                .map(|v| v.value());
            match found {
                Some(version) if version > FORMAT_VERSION => {
                    return Err(VolleyError::Config(format!(
                        "state file {} has format version {version}, newer than this scheduler's {FORMAT_VERSION}: run a newer volley, or start empty with --state-reset",
                        self.path.display()
                    )));
                }
                Some(_) => {}
                None => {
                    meta.insert("format_version", FORMAT_VERSION)
                        .map_err(|e| self.err(e))?;
                }
            }
            txn.open_table(FINISHED).map_err(|e| self.err(e))?;
            txn.open_table(SESSIONS).map_err(|e| self.err(e))?;
            txn.open_table(RUNNING).map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }
}

type Records = TableDefinition<'static, &'static str, &'static [u8]>;

impl FileStore {
    /// Put one record (one transaction).
    fn put(&self, table: Records, id: &str, bytes: &[u8]) -> Result<()> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        txn.open_table(table)
            .map_err(|e| self.err(e))?
            .insert(id, bytes)
            .map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))
    }

    /// Remove records (one transaction).
    fn remove(&self, table: Records, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = txn.open_table(table).map_err(|e| self.err(e))?;
            for id in ids {
                table.remove(id.as_str()).map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Every record of a table, by key.
    fn all<T: serde::de::DeserializeOwned>(&self, table: Records) -> Result<Vec<(String, T)>> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(table).map_err(|e| self.err(e))?;
        let location = self.location();
        let mut records = Vec::new();
        for entry in table.iter().map_err(|e| self.err(e))? {
            let (id, value) = entry.map_err(|e| self.err(e))?;
            records.push((id.value().to_string(), decode(value.value(), &location)?));
        }
        Ok(records)
    }
}

impl StateStore for FileStore {
    fn record_finished(&self, jobs: &[JobSummary]) -> Result<()> {
        if jobs.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = txn.open_table(FINISHED).map_err(|e| self.err(e))?;
            for job in jobs {
                table
                    .insert(
                        key(job).as_str(),
                        encode(job, &format!("job {}", job.id))?.as_slice(),
                    )
                    .map_err(|e| self.err(e))?;
            }
            let len = table.len().map_err(|e| self.err(e))?;
            for _ in HISTORY_LIMIT as u64..len {
                table.pop_first().map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    fn finished_jobs(&self) -> Result<Vec<JobSummary>> {
        Ok(self
            .all::<JobSummary>(FINISHED)?
            .into_iter()
            .map(|(_, job)| job)
            .collect())
    }

    fn save_session(&self, id: &str, session: &StoredSession) -> Result<()> {
        self.put(SESSIONS, id, &encode(session, &format!("session {id}"))?)
    }

    fn forget_sessions(&self, ids: &[String]) -> Result<()> {
        self.remove(SESSIONS, ids)
    }

    fn sessions(&self) -> Result<Vec<(String, StoredSession)>> {
        self.all(SESSIONS)
    }

    fn save_running(&self, id: &str, job: &RunningJob) -> Result<()> {
        self.put(RUNNING, id, &encode(job, &format!("job {id}"))?)
    }

    fn forget_running(&self, ids: &[String]) -> Result<()> {
        self.remove(RUNNING, ids)
    }

    fn running_jobs(&self) -> Result<Vec<(String, RunningJob)>> {
        self.all(RUNNING)
    }

    fn location(&self) -> String {
        format!("file {}", self.path.display())
    }
}

/// The state file holds sessions' statements, credentials included: its owner only may read it.
fn owner_only(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
            VolleyError::Config(format!(
                "cannot make state file {} private: {e}",
                path.display()
            ))
        })?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}
