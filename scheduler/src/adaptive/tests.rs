//! Each adaptive decision on stage graphs planned from SQL, with the sizes of finished stages
//! set by hand: no cluster, no executors.

use std::sync::Arc;
use std::time::Duration;

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::physical_plan::ExecutionPlan;

use volley_core::config::volley_session_config;
use volley_core::shuffle::PartitionLocation;

use crate::adaptive::{before_launch, decide_switch, switch_candidates};
use crate::explain::{decision_sizes, decision_what};
use crate::graph::cut::plan_stages_inlining;
use crate::graph::cut::tests::plan_sql;
use crate::graph::{ShuffledJoin, StageKind, mark_broadcast_candidates};
use crate::job::{Job, StageEdit, TaskInfo, TaskRead, TaskState};

/// The job of `sql` over tables `t` and `u` (a, b), with broadcast candidates marked and these
/// settings; joins stay partitioned at planning.
async fn job_of(sql: &str, settings: &[(&str, &str)]) -> Job {
    let mut config = volley_session_config(4);
    config = config
        .set_usize(
            "datafusion.optimizer.hash_join_single_partition_threshold",
            0,
        )
        .set_usize(
            "datafusion.optimizer.hash_join_single_partition_threshold_rows",
            0,
        );
    // `t` and `u` are the same file: reused, their scans would be one stage.
    let mut stages = plan_stages_inlining("job", plan_sql(sql, config).await, 0, false).unwrap();
    mark_broadcast_candidates(&mut stages);
    let settings = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let schema = Arc::new(datafusion::arrow::datatypes::Schema::empty());
    let span = tracing::Span::none();
    Job::new(
        "job".into(),
        sql.into(),
        Arc::new(settings),
        stages,
        schema,
        span,
        false,
    )
}

/// Finish every task of `stage`: map task `m` wrote `bytes(m, bucket)` into each bucket.
fn finish(
    job: &mut Job,
    stage: u32,
    maps: usize,
    buckets: usize,
    bytes: impl Fn(usize, usize) -> u64,
) {
    let tasks = &mut job.stages.get_mut(&stage).unwrap().tasks;
    *tasks = vec![TaskInfo::pending(); maps];
    for (map, task) in tasks.iter_mut().enumerate() {
        let outputs = (0..buckets)
            .map(|bucket| PartitionLocation {
                executor_id: "a".into(),
                host: "127.0.0.1".into(),
                flight_port: 1,
                path: format!("job/{stage}/{map}/{bucket}"),
                map_partition: u32::try_from(map).unwrap(),
                output_partition: u32::try_from(bucket).unwrap(),
                num_rows: 1,
                num_bytes: bytes(map, bucket),
                grant: String::new(),
                in_memory: false,
            })
            .collect();
        task.state = TaskState::Succeeded {
            executor_id: "a".into(),
            outputs,
            elapsed: Duration::from_millis(1),
        };
    }
}

/// The one broadcast-switch candidate of the job (not a semi-join reduction).
fn switch(job: &Job) -> (u32, ShuffledJoin) {
    let found: Vec<(u32, ShuffledJoin)> = job
        .stages
        .values()
        .flat_map(|s| s.join_switch.iter().map(|j| (s.plan.stage_id, *j)))
        .filter(|(_, j)| !j.probe_filter)
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    found[0]
}

/// The semi-join reduction candidates of the job: (join stage, join).
fn probe_filters(job: &Job) -> Vec<(u32, ShuffledJoin)> {
    job.stages
        .values()
        .flat_map(|s| s.join_switch.iter().map(|j| (s.plan.stage_id, *j)))
        .filter(|(_, j)| j.probe_filter)
        .collect()
}

fn notes(edits: &[StageEdit]) -> Vec<String> {
    edits
        .iter()
        .filter_map(|e| match e {
            StageEdit::Note(stage, d) => Some(format!("{stage}: {}", decision_what(d))),
            _ => None,
        })
        .collect()
}

const JOIN: &str = "SELECT t.a, u.a FROM t JOIN u ON t.b = u.b";

#[tokio::test]
async fn small_build_side_switches_to_broadcast_and_skips_the_probe_stage() {
    let mut job = job_of(JOIN, &[("volley.adaptive_broadcast_bytes", "1000")]).await;
    let (join_stage, join) = switch(&job);
    assert_eq!(job.stages[&join.probe].wait_for, [join.build]);
    finish(&mut job, join.build, 2, 4, |_, _| 10);
    assert_eq!(switch_candidates(&job, join.build), [(join_stage, join)]);
    let edits = decide_switch(&job, join_stage, join).unwrap();
    assert!(
        edits
            .iter()
            .any(|e| matches!(e, StageEdit::Skip(s) if *s == join.probe))
    );
    assert!(edits.iter().any(|e| matches!(
        e,
        StageEdit::Replan { stage, drop_input: Some(p), partitions: Some(_), .. }
            if *stage == join_stage && *p == join.probe
    )));
    job.apply(edits);
    let stage = &job.stages[&join_stage];
    assert!(
        !stage.plan.inputs.contains(&join.probe),
        "reads the probe input directly"
    );
    assert!(stage.join_switch.is_empty());
    assert!(job.stages[&join.probe].tasks.is_empty());
    let decision = stage.adaptive.last().unwrap();
    assert!(decision_what(decision).starts_with("switched to broadcast join"));
    assert_eq!(decision_sizes(decision), "8 rows, 80 B");
}

#[tokio::test]
async fn big_build_side_keeps_the_partitioned_join() {
    let mut job = job_of(JOIN, &[("volley.adaptive_broadcast_bytes", "1000")]).await;
    let (join_stage, join) = switch(&job);
    finish(&mut job, join.build, 2, 4, |_, _| 1000);
    let edits = decide_switch(&job, join_stage, join).unwrap();
    assert_eq!(
        notes(&edits),
        [format!(
            "{join_stage}: kept partitioned join: build side (stage {}) too big",
            join.build
        )]
    );
    job.apply(edits);
    assert!(
        job.stages[&join.probe].wait_for.is_empty(),
        "the probe stage may start"
    );
    assert_eq!(job.stages[&join_stage].plan.inputs.len(), 2);
}

#[tokio::test]
async fn small_shuffle_partitions_are_coalesced() {
    let mut job = job_of("SELECT b, count(*) FROM t GROUP BY b", &[]).await;
    let (scan, consumer) = (1, 2);
    assert_eq!(job.stages[&scan].plan.kind, StageKind::Shuffle);
    finish(&mut job, scan, 2, 4, |_, _| 100);
    let edits = before_launch(&job, consumer, 4);
    let reads: Vec<TaskRead> = edits
        .iter()
        .find_map(|e| match e {
            StageEdit::Regroup(stage, reads) if *stage == consumer => Some(reads.clone()),
            _ => None,
        })
        .expect("a regroup");
    assert_eq!(
        reads,
        [TaskRead {
            partitions: 0..4,
            maps: None
        }]
    );
    assert_eq!(
        notes(&edits),
        [format!(
            "{consumer}: coalesced 4 shuffle partitions into 1 tasks"
        )]
    );
    job.apply(edits);
    assert_eq!(job.stages[&consumer].tasks.len(), 1);
}

#[tokio::test]
async fn a_skewed_join_partition_is_split_by_probe_map_output() {
    let settings = [
        ("volley.adaptive_broadcast_bytes", "1"),
        ("volley.adaptive_skew_min_bytes", "1000"),
        ("volley.adaptive_partition_bytes", "2000"),
    ];
    let mut job = job_of(JOIN, &settings).await;
    let (join_stage, join) = switch(&job);
    finish(&mut job, join.build, 2, 4, |_, _| 10);
    let edits = decide_switch(&job, join_stage, join).unwrap();
    job.apply(edits);
    // Bucket 0 of the probe side holds 4 x 1000 bytes, the others 10 each.
    finish(&mut job, join.probe, 4, 4, |_, bucket| {
        if bucket == 0 { 1000 } else { 10 }
    });
    let edits = before_launch(&job, join_stage, 4);
    let split: Vec<TaskRead> = edits
        .iter()
        .filter_map(|e| match e {
            StageEdit::Regroup(_, reads) => Some(reads.clone()),
            _ => None,
        })
        .flatten()
        .filter(|r| r.maps.is_some())
        .collect();
    assert_eq!(
        split,
        [
            TaskRead {
                partitions: 0..1,
                maps: Some((join.probe, 0..2))
            },
            TaskRead {
                partitions: 0..1,
                maps: Some((join.probe, 2..4))
            },
        ]
    );
    assert!(
        notes(&edits).contains(&format!(
            "{join_stage}: split skewed partition 0 into 2 tasks by probe-side map output"
        )),
        "{:?}",
        notes(&edits)
    );
}

#[tokio::test]
async fn a_small_key_side_filters_the_probe_stage_before_its_shuffle() {
    let sql = "SELECT v.a, u.a FROM (SELECT a, b FROM t WHERE a > 1) v LEFT JOIN u ON v.b = u.b";
    let mut job = job_of(sql, &[("volley.adaptive_broadcast_bytes", "1000")]).await;
    let filters = probe_filters(&job);
    assert_eq!(
        filters.len(),
        1,
        "one semi-join reduction candidate: {filters:?}"
    );
    let (join_stage, join) = filters[0];
    finish(&mut job, join.build, 1, 4, |_, _| 10);
    let edits = decide_switch(&job, join_stage, join).unwrap();
    assert_eq!(
        notes(&edits),
        [
            format!(
                "{join_stage}: filtered stage {} by the join keys of stage {}: build side is small",
                join.probe, join.build
            ),
            format!(
                "{}: keeps only rows whose join keys are in stage {} (semi-join reduction before the shuffle)",
                join.probe, join.build
            ),
        ]
    );
    job.apply(edits);
    let probe = &job.stages[&join.probe];
    assert!(
        probe.plan.inputs.contains(&join.build),
        "the probe stage now reads the keys"
    );
    assert!(probe.wait_for.is_empty());
}

#[tokio::test]
async fn a_semi_join_output_side_is_filtered_by_the_keys_of_its_filtered_side() {
    // `t` (the rows kept) is a whole table: its keys would filter nothing. `u`'s filtered keys
    // filter `t`'s stage before its shuffle (before, only the semi join's other side could
    // be filtered, here by `t`'s unselective keys: no candidate at all).
    let sql = "SELECT t.a FROM t WHERE t.b IN (SELECT b FROM u WHERE a > 1)";
    let mut job = job_of(sql, &[("volley.adaptive_broadcast_bytes", "1000")]).await;
    let filters = probe_filters(&job);
    assert_eq!(filters.len(), 1, "one way of the semi join: {filters:?}");
    let (join_stage, join) = filters[0];
    let filtered = |id: u32| {
        let plan = Arc::clone(&job.stages[&id].plan.plan) as Arc<dyn ExecutionPlan>;
        crate::graph::joins::restricts_rows(&plan)
    };
    assert!(filtered(join.build), "the keys are `u`'s filtered ones");
    assert!(!filtered(join.probe), "`t`'s stage is the one filtered");
    finish(&mut job, join.build, 1, 4, |_, _| 10);
    let edits = decide_switch(&job, join_stage, join).unwrap();
    assert!(
        notes(&edits).contains(&format!(
            "{}: keeps only rows whose join keys are in stage {} (semi-join reduction before the shuffle)",
            join.probe, join.build
        )),
        "{:?}",
        notes(&edits)
    );
}

const GROUP_ORDER: &str = "SELECT b, count(*) FROM t GROUP BY b ORDER BY b";

#[tokio::test]
async fn a_one_task_stage_on_little_input_is_fused_into_its_consumer() {
    let mut job = job_of(GROUP_ORDER, &[]).await;
    let kinds: Vec<StageKind> = job.stages.values().map(|s| s.plan.kind).collect();
    assert_eq!(
        kinds,
        [StageKind::Shuffle, StageKind::Merge, StageKind::Result]
    );
    finish(&mut job, 1, 2, 4, |_, _| 100);
    let edits = before_launch(&job, 2, 4);
    assert_eq!(
        notes(&edits),
        [
            "2: coalesced 4 shuffle partitions into 1 tasks".to_string(),
            "2: skipped: fused into stage 3, whose one task runs this plan".to_string(),
            "3: fused: runs stage 2's plan in its one task".to_string(),
        ]
    );
    job.apply(edits);
    assert!(job.stages[&2].tasks.is_empty(), "stage 2 never runs");
    let fused = &job.stages[&3];
    assert_eq!(fused.plan.inputs, [1], "the fused stage reads stage 1");
    assert_eq!(fused.tasks.len(), 1);
    assert!(job.stage_ready(&job.stages[&3]));
    // Its one task reads stage 1's output (every bucket) and nothing of stage 2.
    let plan = Arc::clone(&fused.plan.plan) as Arc<dyn datafusion::physical_plan::ExecutionPlan>;
    let mut readers = Vec::new();
    plan.apply(|node| {
        if let Some(r) = node.downcast_ref::<volley_core::plan::ShuffleReaderExec>() {
            readers.push((r.stage_id(), r.hash_partitioned()));
        }
        Ok(TreeNodeRecursion::Continue)
    })
    .unwrap();
    assert_eq!(readers, [(1, true)]);
    assert_eq!(
        job.stages[&3].reads.as_ref().unwrap()[0].partitions.end,
        u32::MAX as usize
    );
    assert!(job.resolved_plan(3).is_ok());
}

#[tokio::test]
async fn fusion_stays_off_above_its_budget_or_when_turned_off() {
    for settings in [
        [("volley.adaptive_fuse_bytes", "799")],
        [("volley.adaptive_fuse_bytes", "0")],
    ] {
        let mut job = job_of(GROUP_ORDER, &settings).await;
        finish(&mut job, 1, 2, 4, |_, _| 100);
        let edits = before_launch(&job, 2, 4);
        assert_eq!(
            notes(&edits),
            ["2: coalesced 4 shuffle partitions into 1 tasks".to_string()],
            "{settings:?}"
        );
    }
    let mut job = job_of(GROUP_ORDER, &[("volley.adaptive_fuse_bytes", "800")]).await;
    finish(&mut job, 1, 2, 4, |_, _| 100);
    assert_eq!(notes(&before_launch(&job, 2, 4)).len(), 3, "800 bytes fit");
}

/// `t`'s filtered keys (a reduction candidate) and `u`'s rows cut down by a filter,
/// aggregated by those keys: the aggregating stage may start while the keys stage runs.
const IDLE: &str = "SELECT t.a, x.n FROM t JOIN (SELECT b, count(*) AS n FROM u WHERE a > 1 \
    GROUP BY b) x ON x.b = t.b WHERE t.a > 2";

#[tokio::test]
async fn an_aggregating_stage_starts_while_its_keys_stage_runs_if_a_slot_is_free() {
    use crate::adaptive::idle::start_waiting_probes;
    let mut job = job_of(IDLE, &[("volley.adaptive_broadcast_bytes", "1000")]).await;
    let filters = probe_filters(&job);
    assert_eq!(filters.len(), 1, "one reduction candidate: {filters:?}");
    let (_, join) = filters[0];
    // Keys stage not started yet: the stage keeps waiting.
    assert_eq!(start_waiting_probes(&job, 4).1, 0);
    job.stages.get_mut(&join.build).unwrap().mark_launched();
    // No free slot: it keeps waiting too (started, it would get none).
    assert_eq!(start_waiting_probes(&job, 0).1, 0);
    let (edits, started) = start_waiting_probes(&job, 1);
    assert_eq!(started, 1);
    assert_eq!(
        notes(&edits),
        [format!(
            "{}: started without waiting for the join keys of stage {}: task slots were idle",
            join.probe, join.build
        )]
    );
    job.apply(edits);
    assert!(job.stages[&join.probe].wait_for.is_empty());
    let mut off = job_of(
        IDLE,
        &[
            ("volley.adaptive_broadcast_bytes", "1000"),
            ("volley.adaptive_idle_start", "false"),
        ],
    )
    .await;
    off.stages.get_mut(&join.build).unwrap().mark_launched();
    assert_eq!(start_waiting_probes(&off, 4).1, 0);
}
