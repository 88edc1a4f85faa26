//! Sending journal writes: stage transitions and running-job records go, in the order they
//! happen (under the state's lock), to the state store's writer thread. Nothing is sent when
//! the store is not durable.

use std::sync::mpsc::Sender;

use crate::job::journal::{JournalWrite, Step};

/// Where journal writes go.
pub type Journal = Sender<JournalWrite>;

/// Send `write` to `journal` if there is one.
pub(crate) fn send(journal: Option<&Journal>, write: JournalWrite) {
    if let Some(journal) = journal
        && journal.send(write).is_err()
    {
        tracing::warn!("the journal writer is gone; a transition was not saved");
    }
}

/// Journal a step of job `job_id` on `journal`, built only when there is one.
pub(crate) fn emit(journal: Option<&Journal>, job_id: &str, step: impl FnOnce() -> Option<Step>) {
    if journal.is_some()
        && let Some(step) = step()
    {
        send(journal, JournalWrite::Step(job_id.to_string(), step));
    }
}
