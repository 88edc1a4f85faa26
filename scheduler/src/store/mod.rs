//! L5: the scheduler's durable state behind one trait, [`StateStore`]. What it keeps today:
//! the summaries of finished jobs (the newest [`HISTORY_LIMIT`]), so the status page and
//! `/api/jobs` show history across restarts, and the sessions (their settings and the
//! statements that changed them, replayed at start), so a client's session outlives a restart. Two backends: in memory (the embedded default;
//! history lives as long as the process) and a file (`volley scheduler --state-dir DIR`, an
//! ACID redb database, [`file::FileStore`]). Records carry a format version: a newer one, or a
//! file that is not a state file, is an error at start naming the file, never a silent reset
//! (`--state-reset` starts empty on purpose).

pub mod file;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use volley_core::{Result, VolleyError};

use crate::views::JobSummary;

/// Finished jobs a store keeps; older ones are dropped as new ones arrive.
pub const HISTORY_LIMIT: usize = 1000;

/// Version of the record encoding this scheduler writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Where the scheduler's durable state lives.
pub trait StateStore: Send + Sync {
    /// Record finished jobs (one transaction), keeping the newest [`HISTORY_LIMIT`].
    fn record_finished(&self, jobs: &[JobSummary]) -> Result<()>;
    /// The finished jobs recorded, oldest first.
    fn finished_jobs(&self) -> Result<Vec<JobSummary>>;
    /// Save session `id` as it is now.
    fn save_session(&self, id: &str, session: &StoredSession) -> Result<()>;
    /// Forget sessions (expired).
    fn forget_sessions(&self, ids: &[String]) -> Result<()>;
    /// The sessions saved.
    fn sessions(&self) -> Result<Vec<(String, StoredSession)>>;
    /// Save job `id`, submitted and not finished.
    fn save_running(&self, id: &str, job: &RunningJob) -> Result<()>;
    /// Forget jobs that finished (ids not saved are ignored).
    fn forget_running(&self, ids: &[String]) -> Result<()>;
    /// The jobs saved as running.
    fn running_jobs(&self) -> Result<Vec<(String, RunningJob)>>;
    /// Where the state is, for messages ("memory" or the file's path).
    fn location(&self) -> String;
}

/// A job that was submitted and has not finished, as stored: run again after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunningJob {
    /// The session that submitted it.
    pub session: String,
    /// Its statement.
    pub sql: String,
}

/// A session as stored: the settings it was created with and the statements that changed it
/// (DDL, SET), in order. Statements are kept as given (an object store's credentials in
/// `OPTIONS` included: replaying needs them), so the state file is readable by its owner only.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoredSession {
    /// Settings at creation.
    pub settings: Vec<(String, String)>,
    /// Statements that changed it, in order.
    pub statements: Vec<String>,
}

/// The store for a scheduler's settings: a file under `state_dir` (removed first with
/// `reset`), or memory.
pub fn open(state_dir: Option<&Path>, reset: bool) -> Result<Arc<dyn StateStore>> {
    match state_dir {
        Some(dir) => Ok(Arc::new(file::FileStore::open(dir, reset)?)),
        None => Ok(Arc::new(MemoryStore::default())),
    }
}

/// One stored record: its format version and its value.
#[derive(Serialize, Deserialize)]
struct Record<T> {
    version: u32,
    value: T,
}

/// A record as stored; `what` names it in errors.
fn encode<T: Serialize>(value: &T, what: &str) -> Result<Vec<u8>> {
    serde_json::to_vec(&Record {
        version: FORMAT_VERSION,
        value,
    })
    .map_err(|e| VolleyError::Internal(format!("cannot encode {what}: {e}")))
}

/// A stored record read back; `location` names the store in errors.
fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], location: &str) -> Result<T> {
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    let version = serde_json::from_slice::<Version>(bytes)
        .map_err(|e| VolleyError::Config(format!("state {location}: a record is corrupt: {e}")))?
        .version;
    if version > FORMAT_VERSION {
        return Err(VolleyError::Config(format!(
            "state {location}: a record has format version {version}, newer than this scheduler's {FORMAT_VERSION}: run a newer volley, or start empty with --state-reset"
        )));
    }
    serde_json::from_slice::<Record<T>>(bytes)
        .map(|r| r.value)
        .map_err(|e| VolleyError::Config(format!("state {location}: a record is corrupt: {e}")))
}

/// The sort key of a stored job: submission time, then id.
fn key(job: &JobSummary) -> String {
    format!("{:020}-{}", job.submitted_at_ms, job.id)
}

/// State in memory (the embedded default), bounded like the file store.
#[derive(Default)]
pub struct MemoryStore {
    jobs: Mutex<VecDeque<JobSummary>>,
    sessions: Keyed<StoredSession>,
    running: Keyed<RunningJob>,
}

/// Records of one kind in memory, by id.
struct Keyed<T>(Mutex<std::collections::BTreeMap<String, T>>);

impl<T> Default for Keyed<T> {
    fn default() -> Self {
        Self(Mutex::new(std::collections::BTreeMap::new()))
    }
}

impl<T: Clone> Keyed<T> {
    fn put(&self, id: &str, value: &T) -> Result<()> {
        self.0.lock().insert(id.to_string(), value.clone());
        Ok(())
    }

    fn remove(&self, ids: &[String]) -> Result<()> {
        let mut records = self.0.lock();
        for id in ids {
            records.remove(id);
        }
        Ok(())
    }

    fn all(&self) -> Result<Vec<(String, T)>> {
        Ok(self
            .0
            .lock()
            .iter()
            .map(|(id, v)| (id.clone(), v.clone()))
            .collect())
    }
}

impl StateStore for MemoryStore {
    fn record_finished(&self, jobs: &[JobSummary]) -> Result<()> {
        let mut stored = self.jobs.lock();
        stored.extend(jobs.iter().cloned());
        while stored.len() > HISTORY_LIMIT {
            stored.pop_front();
        }
        Ok(())
    }

    fn finished_jobs(&self) -> Result<Vec<JobSummary>> {
        let mut jobs: Vec<JobSummary> = self.jobs.lock().iter().cloned().collect();
        jobs.sort_by_key(key);
        Ok(jobs)
    }

    fn save_session(&self, id: &str, session: &StoredSession) -> Result<()> {
        self.sessions.put(id, session)
    }

    fn forget_sessions(&self, ids: &[String]) -> Result<()> {
        self.sessions.remove(ids)
    }

    fn sessions(&self) -> Result<Vec<(String, StoredSession)>> {
        self.sessions.all()
    }

    fn save_running(&self, id: &str, job: &RunningJob) -> Result<()> {
        self.running.put(id, job)
    }

    fn forget_running(&self, ids: &[String]) -> Result<()> {
        self.running.remove(ids)
    }

    fn running_jobs(&self) -> Result<Vec<(String, RunningJob)>> {
        self.running.all()
    }

    fn location(&self) -> String {
        "memory".to_string()
    }
}

#[cfg(test)]
mod tests;
