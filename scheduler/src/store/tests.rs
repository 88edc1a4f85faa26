use std::path::Path;

use redb::{Database, TableDefinition};

use super::file::{FILE_NAME, FileStore};
use super::*;

fn job(i: u64) -> JobSummary {
    JobSummary {
        id: format!("job{i:04}"),
        sql: format!("SELECT {i}"),
        state: "succeeded".to_string(),
        error: None,
        submitted_at_ms: 1_700_000_000_000 + i,
        duration_ms: i,
        stages_done: 1,
        stages_total: 1,
        tasks_done: 2,
        tasks_total: 2,
        rows_out: i,
        cached_age_ms: None,
        ddl: i.is_multiple_of(2),
    }
}

fn ids(jobs: &[JobSummary]) -> Vec<String> {
    jobs.iter().map(|j| j.id.clone()).collect()
}

#[test]
fn the_file_store_keeps_finished_jobs_across_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = FileStore::open(dir.path(), false).unwrap();
        store.record_finished(&[job(2), job(1)]).unwrap();
        store.record_finished(&[job(3)]).unwrap();
    }
    let store = FileStore::open(dir.path(), false).unwrap();
    let jobs = store.finished_jobs().unwrap();
    assert_eq!(ids(&jobs), ["job0001", "job0002", "job0003"]);
    assert_eq!(jobs[1].sql, "SELECT 2");
    assert!(jobs[1].ddl);
    assert_eq!(jobs[2].rows_out, 3);
    // --state-reset starts empty.
    drop(store);
    let store = FileStore::open(dir.path(), true).unwrap();
    assert!(store.finished_jobs().unwrap().is_empty());
}

#[test]
fn sessions_and_running_jobs_are_saved_replaced_and_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let session = |n: usize| StoredSession {
        settings: vec![("datafusion.execution.target_partitions".into(), "4".into())],
        statements: (0..n).map(|i| format!("SET x.y = {i}")).collect(),
    };
    {
        let store = FileStore::open(dir.path(), false).unwrap();
        store.save_session("a", &session(1)).unwrap();
        store.save_session("b", &session(1)).unwrap();
        store.save_session("a", &session(3)).unwrap();
    }
    let store = FileStore::open(dir.path(), false).unwrap();
    assert_eq!(
        store.sessions().unwrap(),
        vec![("a".to_string(), session(3)), ("b".to_string(), session(1))]
    );
    let running = RunningJob {
        session: "a".to_string(),
        sql: "SELECT 1".to_string(),
        resumes: 0,
        plan: None,
        submitted_at_ms: 0,
        steps: Vec::new(),
    };
    store.save_running("j1", &running).unwrap();
    store.save_running("j2", &running).unwrap();
    store
        .forget_running(&["j1".to_string(), "never-saved".to_string()])
        .unwrap();
    drop(store);
    let store = FileStore::open(dir.path(), false).unwrap();
    assert_eq!(
        store.running_jobs().unwrap(),
        vec![("j2".to_string(), running)]
    );
    store.forget_sessions(&["a".to_string()]).unwrap();
    assert_eq!(
        store.sessions().unwrap(),
        vec![("b".to_string(), session(1))]
    );
    // The file holds statements with credentials: its owner only reads it.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(FILE_NAME))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[test]
fn history_keeps_the_newest_jobs_up_to_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path(), false).unwrap();
    let memory = MemoryStore::default();
    let all: Vec<JobSummary> = (0..HISTORY_LIMIT as u64 + 5).map(job).collect();
    for chunk in all.chunks(100) {
        store.record_finished(chunk).unwrap();
        memory.record_finished(chunk).unwrap();
    }
    for kept in [
        store.finished_jobs().unwrap(),
        memory.finished_jobs().unwrap(),
    ] {
        assert_eq!(kept.len(), HISTORY_LIMIT);
        assert_eq!(kept[0].id, "job0005");
        assert_eq!(
            kept[HISTORY_LIMIT - 1].id,
            format!("job{:04}", HISTORY_LIMIT + 4)
        );
    }
}

fn open_error(dir: &Path) -> String {
    match FileStore::open(dir, false) {
        Ok(_) => panic!("opened"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_newer_or_corrupt_state_file_is_refused_naming_the_file() {
    // A file of a newer format.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn
                .open_table(TableDefinition::<&str, u32>::new("meta"))
                .unwrap();
            meta.insert("format_version", FORMAT_VERSION + 1).unwrap();
        }
        txn.commit().unwrap();
    }
    let message = open_error(dir.path());
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("newer"), "{message}");
    assert!(message.contains("--state-reset"), "{message}");

    // A record of a newer format.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    {
        let store = FileStore::open(dir.path(), false).unwrap();
        store.record_finished(&[job(1)]).unwrap();
    }
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn
                .open_table(TableDefinition::<&str, &[u8]>::new("finished_jobs"))
                .unwrap();
            table
                .insert("x", br#"{"version": 9, "job": {}}"#.as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let message = open_error(dir.path());
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("format version 9"), "{message}");

    // Not a state file at all.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    std::fs::write(&path, vec![0x5a; 8192]).unwrap();
    let message = open_error(dir.path());
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("--state-reset"), "{message}");
    // --state-reset starts over.
    let store = FileStore::open(dir.path(), true).unwrap();
    assert!(store.finished_jobs().unwrap().is_empty());
}

#[test]
fn journals_are_kept_in_order_forgotten_with_their_job_and_orphans_dropped() {
    use crate::job::journal::Step;
    let dir = tempfile::tempdir().unwrap();
    let running = |resumes| RunningJob {
        session: "s".to_string(),
        sql: "SELECT 1".to_string(),
        resumes,
        plan: None,
        submitted_at_ms: 0,
        steps: Vec::new(),
    };
    let launched = |stage| Step::Launched { stage };
    let step = |job: &str, stage| JournalWrite::Step(job.to_string(), launched(stage));
    {
        let store = FileStore::open(dir.path(), false).unwrap();
        store
            .journal(&[
                step("j1", 1),
                JournalWrite::Save("j1".into(), running(0)),
                step("j2", 7),
                step("j1", 2),
                JournalWrite::Save("j2".into(), running(0)),
                // Steps of a job never saved (the process died before its record was written).
                step("orphan", 3),
            ])
            .unwrap();
        store
            .journal(&[step("j1", 3), JournalWrite::Save("j1".into(), running(1))])
            .unwrap();
    }
    for _ in 0..2 {
        let store = FileStore::open(dir.path(), false).unwrap();
        let jobs = store.running_jobs().unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].0, "j1");
        assert_eq!(jobs[0].1.resumes, 1);
        assert_eq!(jobs[0].1.steps, [launched(1), launched(2), launched(3)]);
        assert_eq!(jobs[1].1.steps, [launched(7)]);
    }
    let store = FileStore::open(dir.path(), false).unwrap();
    // Steps written after reopening follow the earlier ones.
    store.journal(&[step("j2", 8)]).unwrap();
    store.forget_running(&["j1".to_string()]).unwrap();
    let jobs = store.running_jobs().unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].1.steps, [launched(7), launched(8)]);
    // The memory store keeps journals the same way.
    let memory = MemoryStore::default();
    memory
        .journal(&[JournalWrite::Save("j".into(), running(0)), step("j", 4)])
        .unwrap();
    assert_eq!(memory.running_jobs().unwrap()[0].1.steps, [launched(4)]);
    memory.forget_running(&["j".to_string()]).unwrap();
    assert!(memory.running_jobs().unwrap().is_empty());
}
