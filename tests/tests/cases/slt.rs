//! The same .slt files on a local DataFusion context and on an in-process Volley cluster.

use std::path::PathBuf;

use datafusion::prelude::SessionContext;
use sqllogictest::Runner;
use volley::EmbeddedCluster;
use volley_core::config::volley_session_config;
use volley_tests::slt::{ClusterDb, LocalDb};

fn slt_files() -> Vec<PathBuf> {
    let dir = volley_tests::workspace_root().join("tests/slt");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("slt dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "slt"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "slt files found: {files:?}");
    files
}

/// `VOLLEY_SLT_COMPLETE=1`: write the actual results into the .slt file (run the local test
/// first, then the cluster one for its `onlyif volley` records; a normal run then checks both).
async fn complete<D: sqllogictest::AsyncDB, M: sqllogictest::MakeConnection<Conn = D>>(
    runner: &mut Runner<D, M>,
    path: &std::path::Path,
    file: &std::path::Path,
) {
    runner
        .update_test_file(
            path,
            " ",
            sqllogictest::default_validator,
            sqllogictest::default_normalizer,
            sqllogictest::default_column_validator,
        )
        .await
        .expect("complete");
    let text = std::fs::read_to_string(path).expect("read completed");
    let data = volley_tests::workspace_root().join("tests/slt/data");
    std::fs::write(file, text.replace(&data.display().to_string(), "${DATA}")).expect("write back");
}

/// A copy of `file` with `${DATA}` replaced by the data folder.
fn prepared(file: &PathBuf, out: &tempfile::TempDir) -> PathBuf {
    let data = volley_tests::workspace_root().join("tests/slt/data");
    let text = std::fs::read_to_string(file).expect("read slt");
    let path = out.path().join(file.file_name().expect("file name"));
    std::fs::write(&path, text.replace("${DATA}", &data.display().to_string())).expect("write slt");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slt_local_datafusion() {
    let out = tempfile::tempdir().expect("tempdir");
    for file in slt_files() {
        let path = prepared(&file, &out);
        let mut runner = Runner::new(|| async {
            Ok(LocalDb {
                ctx: SessionContext::new_with_config(volley_session_config(4)),
            })
        });
        if std::env::var("VOLLEY_SLT_COMPLETE").is_ok() {
            complete(&mut runner, &path, &file).await;
            continue;
        }
        runner
            .run_file_async(&path)
            .await
            .unwrap_or_else(|e| panic!("{} (local): {e}", file.display()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slt_volley_cluster() {
    volley_tests::init_tracing();
    let cluster = EmbeddedCluster::start(2, 2).await.expect("cluster");
    let url = cluster.url();
    let out = tempfile::tempdir().expect("tempdir");
    for file in slt_files() {
        let path = prepared(&file, &out);
        let url = url.clone();
        let mut runner = Runner::new(move || {
            let url = url.clone();
            async move {
                let client = volley::VolleyClient::connect(&url)
                    .await
                    .map_err(|e| volley_tests::slt::SltError(e.to_string()))?;
                // EXPLAIN ANALYZE records show how a query ran: every one runs.
                client
                    .sql("SET volley.result_cache_ttl = '0'")
                    .await
                    .map_err(|e| volley_tests::slt::SltError(e.to_string()))?;
                Ok(ClusterDb { client })
            }
        });
        // `onlyif volley` records (Volley options, EXPLAIN ANALYZE) run on the cluster only.
        runner.add_label("volley");
        if std::env::var("VOLLEY_SLT_COMPLETE").is_ok() {
            complete(&mut runner, &path, &file).await;
            continue;
        }
        runner
            .run_file_async(&path)
            .await
            .unwrap_or_else(|e| panic!("{} (cluster): {e}", file.display()));
    }
    let executors_used = cluster.scheduler().service().with_state(|s| {
        let mut used = std::collections::BTreeSet::new();
        for job in s.jobs().values() {
            for stage in job.stages.values() {
                for task in &stage.tasks {
                    if let volley_scheduler::job::TaskState::Succeeded { executor_id, .. } =
                        &task.state
                    {
                        used.insert(executor_id.clone());
                    }
                }
            }
        }
        used
    });
    assert_eq!(executors_used.len(), 2, "slt queries ran on both executors");
    // adaptive.slt's decisions are in the job state the JSON API serves, with their sizes.
    let decisions: Vec<(String, String)> = cluster.scheduler().service().with_state(|s| {
        s.jobs()
            .keys()
            .filter_map(|id| volley_scheduler::views::job_detail(s, id))
            .flat_map(|job| job.stages)
            .flat_map(|stage| {
                let state = stage.state.clone();
                stage.adaptive.into_iter().map(move |d| (state.clone(), d))
            })
            .collect()
    });
    // Decisions taken from sizes carry them in parentheses, e.g. "(9 rows, 1.1 KiB)".
    let has = |state: &str, prefix: &str| {
        decisions.iter().any(|(s, d)| {
            s == state && d.starts_with(prefix) && (state == "skipped" || d.contains(" ("))
        })
    };
    assert!(
        has("succeeded", "switched to broadcast join"),
        "{decisions:?}"
    );
    assert!(has("skipped", "skipped: stage"), "{decisions:?}");
    assert!(
        has("succeeded", "coalesced 4 shuffle partitions into 1 tasks"),
        "{decisions:?}"
    );
    assert!(has("succeeded", "split skewed partition"), "{decisions:?}");
    assert!(
        has("succeeded", "filtered stage 2 by the join keys of stage 1"),
        "{decisions:?}"
    );
    assert!(
        has(
            "succeeded",
            "keeps only rows whose join keys are in stage 1"
        ),
        "{decisions:?}"
    );
    cluster.shutdown().await;
}
