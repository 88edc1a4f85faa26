//! The state machine's failure paths on hand-built stage graphs, without a cluster: retries,
//! stale reports, lost executors, failed fetches re-running their producer, attempt limits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::{ExecutionPlan, Partitioning};
use volley_core::plan::{ShuffleReaderExec, ShuffleWriterExec};

use crate::cluster::ClusterState;
use crate::config::SchedulerPolicy;
use crate::graph::{StageKind, StagePlan};
use crate::job::{JobState, StagePhase, TaskOutcome, TaskState};

fn stage(id: u32, inputs: Vec<u32>, partitions: usize, kind: StageKind) -> StagePlan {
    let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, false)]));
    let input: Arc<dyn ExecutionPlan> = match inputs.first() {
        Some(input) => Arc::new(ShuffleReaderExec::new(
            *input,
            schema,
            Partitioning::UnknownPartitioning(partitions),
            false,
        )),
        None => Arc::new(EmptyExec::new(schema).with_partitions(partitions)),
    };
    StagePlan {
        stage_id: id,
        plan: Arc::new(ShuffleWriterExec::new("j".to_string(), id, input, None)),
        inputs,
        partitions,
        kind,
        adaptive_joins: Vec::new(),
    }
}

/// Executors `a` and `b` (2 slots each) and job `j`: stage 1 (2 tasks) feeding stage 2 (1).
fn cluster(policy: SchedulerPolicy) -> ClusterState {
    let mut state = ClusterState::new(policy);
    register(&mut state);
    add_job(&mut state);
    state
}

/// Executors `a` and `b`, 2 slots each.
fn register(state: &mut ClusterState) {
    for (port, id) in ["a", "b"].iter().enumerate() {
        let port = u16::try_from(port).unwrap() + 1;
        state.register_executor(id.to_string(), "127.0.0.1".into(), port, 2, String::new());
    }
}

/// Job `j`: stage 1 (2 tasks) feeding stage 2 (1).
fn add_job(state: &mut ClusterState) {
    add_job_of(state, 2);
}

/// Job `j`: stage 1 (`partitions` tasks) feeding stage 2 (1).
fn add_job_of(state: &mut ClusterState, partitions: usize) {
    let stages = vec![
        stage(1, vec![], partitions, StageKind::Merge),
        stage(2, vec![1], 1, StageKind::Result),
    ];
    let schema = Arc::new(Schema::empty());
    let span = tracing::Span::none();
    state.add_job(
        "j".into(),
        "SELECT 1".into(),
        Arc::default(),
        stages,
        schema,
        span,
        1,
    );
}

/// (executor, attempt) of a running task.
fn running(state: &ClusterState, stage: u32, partition: usize) -> (String, u32) {
    let task = &state.job("j").unwrap().stages[&stage].tasks[partition];
    match &task.state {
        TaskState::Running { executor_id, .. } => (executor_id.clone(), task.attempt),
        other => panic!("task {partition} of stage {stage} is {other:?}"),
    }
}

fn succeeded() -> TaskOutcome {
    TaskOutcome::Succeeded {
        outputs: vec![crate::job::TaskOutput {
            output_partition: 0,
            path: "j/1/0/data.arrow".into(),
            num_rows: 10,
            num_bytes: 100,
            in_memory: false,
        }],
        elapsed: Duration::from_millis(5),
        metrics: Vec::new(),
        inline: None,
    }
}

fn failed(fetch_failure: Option<(String, u32, u32)>) -> TaskOutcome {
    TaskOutcome::Failed {
        message: "boom".into(),
        retryable: true,
        out_of_memory: false,
        fetch_failure,
    }
}

fn report(state: &mut ClusterState, stage: u32, partition: usize, outcome: TaskOutcome) {
    let (executor, attempt) = running(state, stage, partition);
    let partition = u32::try_from(partition).unwrap();
    state.update_task(&executor, "j", stage, partition, attempt, outcome);
}

/// Run stage 1 to completion; stage 2's task is then running.
fn finish_stage_one(state: &mut ClusterState) {
    state.assign_tasks();
    report(state, 1, 0, succeeded());
    report(state, 1, 1, succeeded());
    assert!(matches!(
        state.job("j").unwrap().stages[&1].phase,
        StagePhase::Succeeded { .. }
    ));
    assert_eq!(state.assign_tasks().len(), 1, "stage 2 launches");
}

#[test]
fn failed_attempts_retry_elsewhere_until_the_limit() {
    let policy = SchedulerPolicy {
        task_max_attempts: 2,
        ..SchedulerPolicy::default()
    };
    let mut state = cluster(policy);
    state.assign_tasks();
    let (first, _) = running(&state, 1, 0);
    report(&mut state, 1, 0, failed(None));
    let task = &state.job("j").unwrap().stages[&1].tasks[0];
    assert!(matches!(task.state, TaskState::Pending));
    assert_eq!((task.attempt, task.failures), (1, 1));
    state.assign_tasks();
    let (second, attempt) = running(&state, 1, 0);
    assert_ne!(first, second, "the retry avoids the executor it failed on");
    assert_eq!(attempt, 1);
    report(&mut state, 1, 0, failed(None));
    match &state.job("j").unwrap().state {
        JobState::Failed(message) => {
            assert_eq!(message, "task 0 of stage 1 failed after 2 attempts: boom")
        }
        other => panic!("job is {other:?}"),
    }
}

#[test]
fn stale_and_foreign_reports_change_nothing() {
    let mut state = cluster(SchedulerPolicy::default());
    state.assign_tasks();
    let (executor, attempt) = running(&state, 1, 0);
    let other = if executor == "a" { "b" } else { "a" };
    // Another executor's report of this task, and a report of an attempt that is not current.
    assert_eq!(
        state.update_task(other, "j", 1, 0, attempt, succeeded()),
        None
    );
    assert_eq!(
        state.update_task(&executor, "j", 1, 0, attempt + 1, succeeded()),
        None
    );
    assert_eq!(running(&state, 1, 0), (executor.clone(), attempt));
    report(&mut state, 1, 0, failed(None));
    // The old attempt's late success is stale now.
    state.update_task(&executor, "j", 1, 0, attempt, succeeded());
    let task = &state.job("j").unwrap().stages[&1].tasks[0];
    assert!(matches!(task.state, TaskState::Pending));
    assert_eq!(task.attempt, attempt + 1);
}

#[test]
fn lost_executor_requeues_its_running_tasks_and_needed_output() {
    let mut state = cluster(SchedulerPolicy::default());
    finish_stage_one(&mut state);
    let (consumer_on, _) = running(&state, 2, 0);
    state.executor_lost(&consumer_on);
    let job = state.job("j").unwrap();
    let consumer = &job.stages[&2].tasks[0];
    assert!(matches!(consumer.state, TaskState::Pending));
    assert_eq!((consumer.failures, consumer.crashes), (1, 1));
    assert_eq!(consumer.avoid.as_deref(), Some(consumer_on.as_str()));
    // Stage 1's output on that executor is needed again: that task runs again.
    let producer = &job.stages[&1];
    let rerun = producer.tasks.iter().filter(|t| !t.is_done()).count();
    assert_eq!(rerun, 1);
    assert_eq!(producer.attempts, 2);
    assert!(matches!(producer.phase, StagePhase::Running { .. }));
    assert_eq!(job.state, JobState::Running);
    // The survivor takes the rerun, then the consumer.
    state.assign_tasks();
    let lost = producer_rerun_partition(&state);
    report(&mut state, 1, lost, succeeded());
    state.assign_tasks();
    assert_ne!(running(&state, 2, 0).0, consumer_on);
    report(&mut state, 2, 0, succeeded());
    assert_eq!(state.job("j").unwrap().state, JobState::Succeeded);
}

fn producer_rerun_partition(state: &ClusterState) -> usize {
    let tasks = &state.job("j").unwrap().stages[&1].tasks;
    tasks.iter().position(|t| !t.is_done()).unwrap()
}

#[test]
fn a_task_that_crashes_two_executors_fails_its_job() {
    let mut state = cluster(SchedulerPolicy::default());
    state.assign_tasks();
    let (first, _) = running(&state, 1, 0);
    state.executor_lost(&first);
    state.register_executor("c".into(), "127.0.0.1".into(), 3, 2, String::new());
    state.assign_tasks();
    let (second, _) = running(&state, 1, 0);
    state.executor_lost(&second);
    match &state.job("j").unwrap().state {
        JobState::Failed(message) => assert!(
            message.starts_with("task 0 of stage 1 was running on 2 executors that were lost"),
            "{message}"
        ),
        other => panic!("job is {other:?}"),
    }
}

#[test]
fn fetch_failure_reruns_the_producer_task() {
    let mut state = cluster(SchedulerPolicy::default());
    finish_stage_one(&mut state);
    let map_on = match &state.job("j").unwrap().stages[&1].tasks[1].state {
        TaskState::Succeeded { executor_id, .. } => executor_id.clone(),
        other => panic!("{other:?}"),
    };
    report(&mut state, 2, 0, failed(Some((map_on.clone(), 1, 1))));
    let job = state.job("j").unwrap();
    assert_eq!(job.state, JobState::Running);
    let producer = &job.stages[&1];
    assert!(matches!(producer.tasks[1].state, TaskState::Pending));
    assert_eq!(producer.attempts, 2);
    assert!(
        job.stages[&2].resolved.is_none(),
        "the consumer resolves again"
    );
    // The consumer waits for its producer again.
    let launched = state.assign_tasks();
    let stages: Vec<u32> = launched
        .iter()
        .flat_map(|(_, tasks)| tasks.iter().map(|t| t.stage_id))
        .collect();
    assert_eq!(stages, [1]);
}

#[test]
fn stage_attempt_limit_fails_the_job() {
    let policy = SchedulerPolicy {
        stage_max_attempts: 1,
        ..SchedulerPolicy::default()
    };
    let mut state = cluster(policy);
    finish_stage_one(&mut state);
    report(&mut state, 2, 0, failed(Some(("a".into(), 1, 0))));
    assert_eq!(
        state.job("j").unwrap().state,
        JobState::Failed(
            "stage 1 failed after 1 attempts: its shuffle output was lost".to_string()
        )
    );
}

#[test]
fn lost_executors_are_forgotten_after_retention() {
    let mut state = cluster(SchedulerPolicy::default());
    state.register_executor("c".into(), "127.0.0.1".into(), 3, 2, String::new());
    let hour = Duration::from_secs(3600);
    state.executor_lost("a");
    state.executor_lost("c");
    state.executors.get_mut("a").unwrap().last_seen = Instant::now() - 2 * hour;
    // "c" was lost just now: kept; "a" is past the retention; "b" is alive.
    assert_eq!(state.prune_executors(hour, 10), 1);
    let ids: Vec<&str> = state.executors().keys().map(String::as_str).collect();
    assert_eq!(ids, ["b", "c"]);
    // Beyond the cap, the oldest lost ones go even when recent.
    state.executor_lost("b");
    state.executors.get_mut("b").unwrap().last_seen = Instant::now() - Duration::from_secs(5);
    assert_eq!(state.prune_executors(hour, 1), 1);
    let ids: Vec<&str> = state.executors().keys().map(String::as_str).collect();
    assert_eq!(ids, ["c"]);
    // An alive executor is never pruned.
    state.register_executor("d".into(), "127.0.0.1".into(), 4, 2, String::new());
    state.executors.get_mut("d").unwrap().last_seen = Instant::now() - 2 * hour;
    assert_eq!(state.prune_executors(hour, 0), 1);
    assert!(state.executors().contains_key("d"));
}

#[test]
fn prune_keeps_the_newest_released_jobs() {
    let mut state = ClusterState::default();
    let schema = Arc::new(Schema::empty());
    for i in 0..5 {
        state.add_inline_job(
            format!("j{i}"),
            String::new(),
            Arc::clone(&schema),
            Vec::new(),
        );
    }
    state.prune_jobs(2);
    assert_eq!(state.jobs().len(), 5, "unreleased jobs stay");
    for i in 0..5 {
        assert!(state.mark_released(&format!("j{i}")));
    }
    state.prune_jobs(2);
    assert_eq!(state.job_order(), ["j3", "j4"]);
    assert_eq!(state.jobs().len(), 2);
}

#[test]
fn queued_jobs_start_when_a_slot_frees() {
    let policy = SchedulerPolicy {
        max_concurrent_jobs: 1,
        ..SchedulerPolicy::default()
    };
    let mut state = cluster(policy);
    let schema = Arc::new(Schema::empty());
    let stages = vec![stage(1, vec![], 1, StageKind::Result)];
    let span = tracing::Span::none();
    state.add_job(
        "k".into(),
        "SELECT 2".into(),
        Arc::default(),
        stages,
        schema,
        span,
        1,
    );
    assert_eq!(state.job("k").unwrap().state, JobState::Queued);
    state.cancel_job("j");
    state.assign_tasks();
    assert_eq!(state.job("k").unwrap().state, JobState::Running);
}

/// The journal of job `j` once its stage 1 is done and stage 2 launched.
fn journal_of_stage_one() -> Vec<crate::job::journal::Step> {
    use crate::job::journal::JournalWrite;
    let (tx, rx) = std::sync::mpsc::channel();
    let mut state = ClusterState::new(SchedulerPolicy::default());
    state.set_journal(tx);
    register(&mut state);
    add_job(&mut state);
    finish_stage_one(&mut state);
    rx.try_iter()
        .map(|write| match write {
            JournalWrite::Step(job, step) if job == "j" => step,
            other => panic!("unexpected {other:?}"),
        })
        .collect()
}

#[test]
fn a_journal_replayed_after_a_restart_takes_over_completed_stages() {
    let steps = journal_of_stage_one();
    let kinds: Vec<String> = steps
        .iter()
        .map(|s| {
            format!("{s:?}")
                .split([' ', '{'])
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "Planned", "Prepared", "Launched", "Done", "Prepared", "Launched"
        ]
    );

    // A new scheduler: the job is planned again and takes its journal over.
    let mut state = ClusterState::new(SchedulerPolicy::default());
    state.prepare_resume("j".into(), steps, 1);
    add_job(&mut state);
    let job = state.job("j").unwrap();
    let done = &job.stages[&1];
    assert!(done.resumed && done.is_complete() && done.attempts == 1);
    assert_eq!(job.output_executors().len(), 2);
    let next = &job.stages[&2];
    assert!(!next.resumed && matches!(next.phase, StagePhase::Running { .. }));
    assert_eq!(
        next.tasks[0].attempt, 1000,
        "attempts after a resume start at 1000"
    );
    // Nothing runs before executors register; `a` still holds its output, `b` lost it.
    assert!(state.assign_tasks().is_empty());
    let executor_of = |state: &ClusterState, partition: usize| match &state.job("j").unwrap().stages
        [&1]
        .tasks[partition]
        .state
    {
        TaskState::Succeeded { executor_id, .. } => executor_id.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        (executor_of(&state, 0), executor_of(&state, 1)),
        ("a".into(), "b".into())
    );
    // Executors register again: `a` still holds its output, `b` (restarted) holds none.
    let held: std::collections::HashSet<String> = ["j/1/0/data.arrow".to_string()].into();
    state.executor_holds("a", &held);
    state.executor_holds("b", &Default::default());
    register(&mut state);
    let stage = &state.job("j").unwrap().stages[&1];
    assert!(stage.tasks[0].is_done());
    assert!(!stage.tasks[1].is_done(), "b's output runs again");
    assert_eq!(stage.attempts, 2);
    assert_eq!(stage.tasks[1].attempt, 1000);
}

#[test]
fn a_journal_does_not_apply_to_a_plan_that_came_out_different() {
    let steps = journal_of_stage_one();
    // The same statement now plans stage 1 with three tasks (its table has another file).
    let mut state = ClusterState::new(SchedulerPolicy::default());
    state.prepare_resume("j".into(), steps, 1);
    add_job_of(&mut state, 3);
    let job = state.job("j").unwrap();
    assert!(!job.stages[&1].resumed && !job.stages[&1].is_complete());
    assert_eq!(job.stages[&1].tasks.len(), 3);
    assert!(job.stages[&1].tasks.iter().all(|t| t.attempt == 1000));
}

/// A job being resumed is planned with the partitions per grouped task it had before the
/// restart (executors may not have registered again); records from before grouping say none.
#[test]
fn a_resumed_job_keeps_its_partitions_per_task() {
    use crate::job::journal::Step;
    let mut state = cluster(SchedulerPolicy::default());
    let planned = |per_task| Step::Planned {
        shape: vec![(1, 1), (2, 1)],
        plans: Vec::new(),
        per_task,
    };
    state.prepare_resume("j".into(), vec![planned(2)], 1);
    state.prepare_resume("old".into(), vec![planned(0)], 1);
    assert_eq!(state.resumed_per_task("j"), Some(2));
    assert_eq!(state.resumed_per_task("old"), None);
    assert_eq!(state.resumed_per_task("other"), None);
    add_job_of(&mut state, 2);
    assert_eq!(state.resumed_per_task("j"), None, "taken over once added");
}
