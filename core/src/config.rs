//! Session defaults shared by the scheduler (planning) and the executors (execution), and the
//! per-task environment executors hand to Volley's execution plans.

use std::path::PathBuf;

use datafusion::prelude::SessionConfig;

/// Executor-side facts a task needs, stored as a [`SessionConfig`] extension.
#[derive(Debug, Clone)]
pub struct TaskEnv {
    /// Id of the executor running the task: shuffle reads of its own files skip the network.
    pub executor_id: String,
    /// Root of the executor's shuffle files.
    pub work_dir: PathBuf,
    /// Attempt number of the running task; part of shuffle file names so retries never clash.
    pub attempt: u32,
}

/// The session configuration Volley plans and executes with.
///
/// Round-robin repartitioning is off because each task already is one partition of the stage;
/// file-scan work stealing is off because a task runs one partition alone and would otherwise
/// read its siblings' files too; dynamic filters are off because the producer and consumer of a
/// filter may run in different processes. Uncorrelated scalar subqueries are planned as joins
/// (DataFusion's distributed escape hatch) because `ScalarSubqueryExec` must sit in the same
/// task as the expressions reading its results, which a stage cut can separate.
pub fn volley_session_config(target_partitions: usize) -> SessionConfig {
    let mut config = SessionConfig::new()
        .with_target_partitions(target_partitions.max(1))
        .with_information_schema(true)
        .with_round_robin_repartition(false);
    let options = config.options_mut();
    options.execution.enable_file_stream_work_stealing = false;
    options
        .optimizer
        .enable_physical_uncorrelated_scalar_subquery = false;
    options.optimizer.enable_dynamic_filter_pushdown = false;
    options.optimizer.enable_join_dynamic_filter_pushdown = false;
    options.optimizer.enable_topk_dynamic_filter_pushdown = false;
    options.optimizer.enable_aggregate_dynamic_filter_pushdown = false;
    config
}

/// The settings of `config` as key/value pairs, to ship with each task.
pub fn config_to_pairs(config: &SessionConfig) -> Vec<(String, String)> {
    config
        .options()
        .entries()
        .into_iter()
        .filter_map(|entry| entry.value.map(|v| (entry.key, v)))
        .collect()
}
