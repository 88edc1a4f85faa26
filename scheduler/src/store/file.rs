//! L1: the file backend of [`super::StateStore`]: one redb database, `DIR/scheduler.redb`.
//! Every batch of records is one ACID transaction, so a process killed mid-write loses no
//! committed record; the file's own format version is checked when it opens.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use volley_core::{Result, VolleyError};

use super::{
    FORMAT_VERSION, HISTORY_LIMIT, RunningJob, StateStore, StoredSession, decode, encode, key,
};
use crate::job::journal::{JournalWrite, Step};
use crate::views::JobSummary;

/// Name of the state file in the state directory.
pub const FILE_NAME: &str = "scheduler.redb";

const META: TableDefinition<&str, u32> = TableDefinition::new("meta");
const FINISHED: TableDefinition<&str, &[u8]> = TableDefinition::new("finished_jobs");
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
const RUNNING: TableDefinition<&str, &[u8]> = TableDefinition::new("running_jobs");
/// Journal steps of running jobs by (job id, sequence number).
const STEPS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("job_steps");

/// State in a redb file.
pub struct FileStore {
    db: Database,
    path: PathBuf,
    /// Sequence number of the next journal step (steps of a job read back in this order).
    next_step: AtomicU64,
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
        let store = Self {
            db,
            path,
            next_step: AtomicU64::new(0),
        };
        store.check_version()?;
        // Every record must decode now: a corrupt one is an error at start, not later.
        store.finished_jobs()?;
        store.sessions()?;
        store.running_jobs()?;
        store.drop_orphan_steps()?;
        Ok(store)
    }

    /// Remove the steps of jobs not saved as running (the process died between writing a
    /// job's first steps and the job itself); continue the step sequence after the last one.
    fn drop_orphan_steps(&self) -> Result<()> {
        let running: HashSet<String> = self
            .all::<RunningJob>(RUNNING)?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = txn.open_table(STEPS).map_err(|e| self.err(e))?;
            let mut orphans = Vec::new();
            let mut last = 0;
            for entry in table.iter().map_err(|e| self.err(e))? {
                let (key, _) = entry.map_err(|e| self.err(e))?;
                let (job, seq) = key.value();
                last = last.max(seq + 1);
                if !running.contains(job) {
                    orphans.push((job.to_string(), seq));
                }
            }
            for (job, seq) in &orphans {
                table
                    .remove((job.as_str(), *seq))
                    .map_err(|e| self.err(e))?;
            }
            self.next_step.store(last, Ordering::SeqCst);
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Remove job `id` and its steps in `txn`.
    fn forget_in(&self, txn: &WriteTransaction, id: &str) -> Result<()> {
        txn.open_table(RUNNING)
            .map_err(|e| self.err(e))?
            .remove(id)
            .map_err(|e| self.err(e))?;
        let mut steps = txn.open_table(STEPS).map_err(|e| self.err(e))?;
        steps
            .retain_in((id, 0)..=(id, u64::MAX), |_, _| false)
            .map_err(|e| self.err(e))?;
        Ok(())
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
            txn.open_table(STEPS).map_err(|e| self.err(e))?;
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

    fn journal(&self, writes: &[JournalWrite]) -> Result<()> {
        if writes.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        for write in writes {
            match write {
                JournalWrite::Save(id, job) => {
                    let bytes = encode(job, &format!("job {id}"))?;
                    txn.open_table(RUNNING)
                        .map_err(|e| self.err(e))?
                        .insert(id.as_str(), bytes.as_slice())
                        .map_err(|e| self.err(e))?;
                }
                JournalWrite::Step(id, step) => {
                    let bytes = encode(step, &format!("a step of job {id}"))?;
                    let seq = self.next_step.fetch_add(1, Ordering::SeqCst);
                    txn.open_table(STEPS)
                        .map_err(|e| self.err(e))?
                        .insert((id.as_str(), seq), bytes.as_slice())
                        .map_err(|e| self.err(e))?;
                }
                JournalWrite::Forget(ids) => {
                    for id in ids {
                        self.forget_in(&txn, id)?;
                    }
                }
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    fn running_jobs(&self) -> Result<Vec<(String, RunningJob)>> {
        let mut jobs: BTreeMap<String, RunningJob> = self.all(RUNNING)?.into_iter().collect();
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(STEPS).map_err(|e| self.err(e))?;
        let location = self.location();
        for entry in table.iter().map_err(|e| self.err(e))? {
            let (key, value) = entry.map_err(|e| self.err(e))?;
            let (id, _) = key.value();
            if let Some(job) = jobs.get_mut(id) {
                job.steps.push(decode::<Step>(value.value(), &location)?);
            }
        }
        Ok(jobs.into_iter().collect())
    }

    fn durable(&self) -> bool {
        true
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
