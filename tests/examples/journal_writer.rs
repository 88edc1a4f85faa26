//! The child process of `cases::state::a_sigkill_during_state_writes_loses_no_committed_transition`:
//! writes journal batches to the state file in the folder given as its argument as fast as it
//! can, printing each batch number once its transaction committed, until it is killed.

use std::io::Write;

use volley_scheduler::job::journal::Step;
use volley_scheduler::store::{JournalWrite, RunningJob, StateStore, file::FileStore};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: journal_writer DIR")?;
    let store = FileStore::open(std::path::Path::new(&dir), false)?;
    let first = store.running_jobs()?.len();
    let mut out = std::io::stdout().lock();
    for n in first.. {
        let id = format!("job{n:08}");
        let job = RunningJob {
            session: "s".into(),
            sql: "x".repeat(2000),
            resumes: 0,
            plan: None,
            submitted_at_ms: 0,
            steps: Vec::new(),
        };
        let steps = (0..8).map(|stage| JournalWrite::Step(id.clone(), Step::Launched { stage }));
        let batch: Vec<JournalWrite> = std::iter::once(JournalWrite::Save(id.clone(), job))
            .chain(steps)
            .collect();
        store.journal(&batch)?;
        writeln!(out, "committed {n}")?;
        out.flush()?;
    }
    Ok(())
}
