//! L2: the scheduler's durable state behind one trait, [`StateStore`]. What it keeps today:
//! the summaries of finished jobs (the newest [`HISTORY_LIMIT`]), so the status page and
//! `/api/jobs` show history across restarts. Two backends: in memory (the embedded default;
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
    /// Where the state is, for messages ("memory" or the file's path).
    fn location(&self) -> String;
}

/// The store for a scheduler's settings: a file under `state_dir` (removed first with
/// `reset`), or memory.
pub fn open(state_dir: Option<&Path>, reset: bool) -> Result<Arc<dyn StateStore>> {
    match state_dir {
        Some(dir) => Ok(Arc::new(file::FileStore::open(dir, reset)?)),
        None => Ok(Arc::new(MemoryStore::default())),
    }
}

/// One stored record: its format version and the job.
#[derive(Serialize, Deserialize)]
struct Record {
    version: u32,
    job: JobSummary,
}

/// A finished job as stored.
fn encode(job: &JobSummary) -> Result<Vec<u8>> {
    serde_json::to_vec(&Record {
        version: FORMAT_VERSION,
        job: job.clone(),
    })
    .map_err(|e| VolleyError::Internal(format!("cannot encode job {}: {e}", job.id)))
}

/// A stored record read back; `location` names the store in errors.
fn decode(bytes: &[u8], location: &str) -> Result<JobSummary> {
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
    serde_json::from_slice::<Record>(bytes)
        .map(|r| r.job)
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

    fn location(&self) -> String {
        "memory".to_string()
    }
}

#[cfg(test)]
mod tests;
