//! L5: the scheduler's durable state behind one trait, [`StateStore`]. What it keeps today:
//! the summaries of finished jobs (the newest [`HISTORY_LIMIT`]), so the status page and
//! `/api/jobs` show history across restarts; the sessions (their settings and the statements
//! that changed them, replayed at start), so a client's session outlives a restart; and the
//! running jobs with their journals ([`crate::job::journal`]), written by one thread
//! ([`spawn_writer`]) in batches, so a restarted scheduler takes them over. Two backends: in
//! memory (the embedded default; history lives as long as the process) and a file
//! (`volley scheduler --state-dir DIR`, an ACID redb database, [`file::FileStore`]). Records carry a format version: a newer one, or a
//! file that is not a state file, is an error at start naming the file, never a silent reset
//! (`--state-reset` starts empty on purpose).

pub mod etcd;
mod etcd_url;
pub mod file;
mod lease;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use volley_core::{Result, VolleyError};

use crate::job::journal::Step;
pub use crate::job::journal::{JournalWrite, RunningJob};
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
    /// Apply running jobs' journal writes in order, in one transaction.
    fn journal(&self, writes: &[JournalWrite]) -> Result<()>;
    /// Save job `id`, submitted and not finished.
    fn save_running(&self, id: &str, job: &RunningJob) -> Result<()> {
        self.journal(&[JournalWrite::Save(id.to_string(), job.clone())])
    }
    /// Forget jobs that finished and their steps (ids not saved are ignored).
    fn forget_running(&self, ids: &[String]) -> Result<()> {
        self.journal(&[JournalWrite::Forget(ids.to_vec())])
    }
    /// The jobs saved as running, each with its journal steps in order.
    fn running_jobs(&self) -> Result<Vec<(String, RunningJob)>>;
    /// True when the state outlives the process (journal steps are worth writing).
    fn durable(&self) -> bool;
    /// Where the state is, for messages ("memory" or the file's path).
    fn location(&self) -> String;
    /// Give up leading the schedulers sharing this state (a graceful stop: a standby takes
    /// over at once instead of after the lease expires).
    fn resign(&self) {}
}

/// A thread that applies journal writes to `store` in the order sent, batching what arrived
/// meanwhile into one transaction (a failed one is tried twice more); it ends, having written
/// everything sent, when every sender is gone. A write that still fails is logged (its job
/// may run more of itself again after a restart).
pub fn spawn_writer(
    store: Arc<dyn StateStore>,
) -> Result<(
    std::sync::mpsc::Sender<JournalWrite>,
    std::thread::JoinHandle<()>,
)> {
    const BATCH: usize = 1024;
    let (tx, rx) = std::sync::mpsc::channel::<JournalWrite>();
    let thread = std::thread::Builder::new()
        .name("volley-journal".to_string())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut batch = vec![first];
                while batch.len() < BATCH {
                    match rx.try_recv() {
                        Ok(more) => batch.push(more),
                        Err(_) => break,
                    }
                }
                for attempt in 0..3 {
                    match store.journal(&batch) {
                        Ok(()) => break,
                        Err(e) if attempt == 2 => {
                            tracing::warn!(store = %store.location(), error = %e, writes = batch.len(), "cannot write the journal");
                        }
                        Err(_) => std::thread::sleep(std::time::Duration::from_millis(200)),
                    }
                }
            }
        })
        .map_err(|e| VolleyError::Internal(format!("cannot start the journal writer: {e}")))?;
    Ok((tx, thread))
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
    steps: Keyed<Vec<Step>>,
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

    fn journal(&self, writes: &[JournalWrite]) -> Result<()> {
        for write in writes {
            match write {
                JournalWrite::Save(id, job) => self.running.put(id, job)?,
                JournalWrite::Step(id, step) => {
                    self.steps
                        .0
                        .lock()
                        .entry(id.clone())
                        .or_default()
                        .push(step.clone());
                }
                JournalWrite::Forget(ids) => {
                    self.running.remove(ids)?;
                    self.steps.remove(ids)?;
                }
            }
        }
        Ok(())
    }

    fn running_jobs(&self) -> Result<Vec<(String, RunningJob)>> {
        let steps = self.steps.0.lock();
        let mut jobs = self.running.all()?;
        for (id, job) in &mut jobs {
            job.steps = steps.get(id).cloned().unwrap_or_default();
        }
        Ok(jobs)
    }

    fn durable(&self) -> bool {
        false
    }

    fn location(&self) -> String {
        "memory".to_string()
    }
}

#[cfg(test)]
mod tests;
