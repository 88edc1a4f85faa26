//! Runs one task: decode the stage plan, execute one partition, report the files written.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use futures::FutureExt;

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::datasource::physical_plan::parquet::CachedParquetFileReaderFactory;
use datafusion::datasource::physical_plan::{FileScanConfig, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::execution::TaskContext;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::session_state::SessionState;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionConfig;
use parking_lot::Mutex;
use volley_core::VolleyError;
use volley_core::codec::VolleyCodec;
use volley_core::config::{TaskEnv, VolleyOptions, base_session_config};
use volley_core::plan::ShuffleWriterExec;
use volley_core::protobuf as pb;
use volley_core::shuffle::MemoryShuffle;
use volley_core::stores::redact::redact_values;
use volley_core::stores::{StoreCache, StoreOptions, StoreScope};

use crate::runtime_filters::{BuildBoundsExec, add_runtime_filters, is_runtime_row_filter};

/// What an executor needs to run tasks.
pub struct TaskRunner {
    pub executor_id: String,
    /// Host the executor advertises (shuffle files of executors on the same host are read
    /// from disk).
    pub host: String,
    pub work_dir: std::path::PathBuf,
    pub base_state: SessionState,
    /// Object stores built by this executor (shared by all tasks).
    pub stores: Arc<StoreCache>,
    pub security: volley_core::security::Security,
    /// Honour the `volley.test_*` hooks (`--enable-test-hooks`).
    pub test_hooks: bool,
    /// Small shuffle outputs held in memory (see [`MemoryShuffle`]).
    pub memory: Arc<MemoryShuffle>,
    /// The session config of the settings tasks came with last.
    pub configs: ConfigCache,
}

/// The session config built from the settings the last task came with: the tasks of a job all
/// carry the same couple hundred settings, parsed once instead of once per task.
#[derive(Default)]
pub struct ConfigCache(Mutex<Option<(Vec<pb::KeyValue>, SessionConfig)>>);

impl ConfigCache {
    /// The session config of a task with `settings`.
    fn config(&self, settings: &[pb::KeyValue]) -> SessionConfig {
        if let Some((seen, config)) = &*self.0.lock()
            && seen.as_slice() == settings
        {
            return config.clone();
        }
        let mut config = base_session_config();
        for kv in settings {
            // Settings of a newer scheduler this executor does not know are not fatal.
            if let Err(e) = config.options_mut().set(&kv.key, &kv.value) {
                tracing::debug!(key = %kv.key, error = %e, "ignoring setting");
            }
        }
        // A task runs one partition: a scan that stole its siblings' files would read them
        // twice across the stage's tasks, whatever the session set.
        config
            .options_mut()
            .execution
            .enable_file_stream_work_stealing = false;
        *self.0.lock() = Some((settings.to_vec(), config.clone()));
        config
    }
}

/// Longest a task waits for a test hold to be released: only a guard against a test that
/// died before releasing it.
const HOLD_LIMIT: std::time::Duration = std::time::Duration::from_secs(600);

/// Wait until the hold hook's release file exists (polled; the wait ends when the task is
/// aborted, e.g. by a cancel).
async fn wait_for_release(path: &std::path::Path) -> Result<(), VolleyError> {
    let started = Instant::now();
    while !path.exists() {
        if started.elapsed() > HOLD_LIMIT {
            return Err(VolleyError::Internal(format!(
                "volley.test_hold_task: {} was not created within {} s",
                path.display(),
                HOLD_LIMIT.as_secs()
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(())
}

impl TaskRunner {
    /// Run `def` and produce the status to report.
    pub async fn run(&self, def: pb::TaskDefinition) -> pb::TaskStatus {
        let started = Instant::now();
        let task = def.task.clone().unwrap_or_default();
        // A panic inside DataFusion or Volley is a failed task, reported like any other; it
        // must not end the executor's task silently (the job would wait for it forever).
        let outcome = AssertUnwindSafe(self.execute(&def, &task))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                Err(VolleyError::Internal(format!(
                    "task {} of stage {} panicked: {}",
                    task.partition,
                    task.stage_id,
                    volley_core::stack::panic_message(panic.as_ref())
                )))
            });
        let status = match outcome {
            Ok((partitions, operators)) => pb::task_status::Status::Succeeded(pb::TaskSucceeded {
                inline_result: self.inline_result(&partitions, def.inline_result_limit),
                partitions,
                elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                operators,
            }),
            Err(e) => {
                let fetch_failure = match &e {
                    VolleyError::DataFusion(df) => VolleyError::find_fetch_failure(df).map(
                        |(executor_id, stage_id, map_partition)| pb::FetchFailure {
                            executor_id: executor_id.to_string(),
                            stage_id,
                            map_partition,
                        },
                    ),
                    VolleyError::FetchFailed {
                        executor_id,
                        stage_id,
                        map_partition,
                        ..
                    } => Some(pb::FetchFailure {
                        executor_id: executor_id.clone(),
                        stage_id: *stage_id,
                        map_partition: *map_partition,
                    }),
                    _ => None,
                };
                let retryable = fetch_failure.is_some() || is_retryable(&e);
                let out_of_memory = matches!(
                    &e,
                    VolleyError::DataFusion(df)
                        if matches!(df.find_root(), datafusion::error::DataFusionError::ResourcesExhausted(_))
                );
                let message = truncate_message(redact_values(&e.to_string(), &task_secrets(&def)));
                tracing::warn!(job_id = %task.job_id, stage_id = task.stage_id, partition = task.partition, attempt = task.attempt, error = %message, "task failed");
                pb::task_status::Status::Failed(pb::TaskFailed {
                    message,
                    retryable,
                    fetch_failure,
                    out_of_memory,
                })
            }
        };
        pb::TaskStatus {
            task: Some(task),
            executor_id: self.executor_id.clone(),
            status: Some(status),
        }
    }

    /// The output of a result stage's task to return inside its report: its one output held
    /// in memory, when at most `limit` bytes (empty otherwise: read from this executor).
    fn inline_result(&self, written: &[pb::PartitionStats], limit: u64) -> Vec<u8> {
        match written {
            [output] if limit > 0 && output.in_memory && output.num_bytes <= limit => self
                .memory
                .get(&output.path)
                .map(|bytes| bytes.to_vec())
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    async fn execute(
        &self,
        def: &pb::TaskDefinition,
        task: &pb::TaskId,
    ) -> Result<(Vec<pb::PartitionStats>, Vec<pb::OperatorMetrics>), VolleyError> {
        let config = self.configs.config(&def.settings);
        let config = config.with_extension(Arc::new(TaskEnv {
            executor_id: self.executor_id.clone(),
            host: self.host.clone(),
            work_dir: self.work_dir.clone(),
            attempt: task.attempt,
            security: self.security.clone(),
            test_hooks: self.test_hooks,
            memory: Some(Arc::clone(&self.memory)),
        }));
        let mut ctx = TaskContext::from(&self.base_state);
        if !def.stores.is_empty() {
            // Per-table store options of this job: a scope of this task's own.
            let scope = StoreScope::with_options(Arc::clone(&self.stores), task_stores(def));
            // Caches of its own: they are keyed by path, not by the credentials reading it.
            let runtime = RuntimeEnvBuilder::from_runtime_env(self.base_state.runtime_env())
                .with_cache_manager(volley_core::stores::cache_config())
                .with_object_store_registry(Arc::new(scope))
                .build_arc()?;
            ctx = ctx.with_runtime(runtime);
        }
        let ctx = Arc::new(ctx.with_session_config(config).with_task_id(format!(
            "{}/{}/{}/{}",
            task.job_id, task.stage_id, task.partition, task.attempt
        )));
        let hooks = ctx
            .session_config()
            .options()
            .extensions
            .get::<VolleyOptions>()
            .filter(|_| self.test_hooks);
        if let Some(options) = hooks {
            if let Some(release) = options.hold(task.stage_id) {
                // Tell the test which executor's task is held (it may signal that executor
                // once the task surely runs there, not just once the scheduler launched it).
                if let Some(dir) = release.parent() {
                    let _ = std::fs::write(dir.join(format!("reached-{}", self.executor_id)), b"");
                }
                wait_for_release(&release).await?;
            }
            if let Some(busy) = options.busy(task.stage_id) {
                let until = std::time::Instant::now() + busy;
                while std::time::Instant::now() < until {
                    std::hint::spin_loop();
                }
            }
            if options.aborts(task.stage_id, task.partition) {
                tracing::error!("injected abort (volley.test_abort_task)");
                std::process::abort();
            }
            if options.panics(task.stage_id, task.partition) {
                #[allow(clippy::panic)]
                {
                    panic!("injected panic (volley.test_panic_task)");
                }
            }
            if options.fails(task.stage_id, task.partition, task.attempt) {
                return Err(VolleyError::Io(std::io::Error::other(format!(
                    "injected fault (volley.test_fail_task) in attempt {}",
                    task.attempt
                ))));
            }
        }
        tracing::debug!(
            stage = task.stage_id,
            partition = task.partition,
            "task start"
        );
        let mut plan = with_metadata_cache(VolleyCodec::decode_plan(&def.plan, &ctx)?, &ctx)?;
        let options = ctx.session_config().options();
        if options
            .extensions
            .get::<VolleyOptions>()
            .is_none_or(|o| o.runtime_filters)
        {
            plan = add_runtime_filters(plan, options)?;
        }
        tracing::debug!(
            stage = task.stage_id,
            partition = task.partition,
            "plan decoded"
        );
        let writer = plan.downcast_ref::<ShuffleWriterExec>().ok_or_else(|| {
            VolleyError::Internal(format!(
                "stage plan root is {}, not ShuffleWriterExec",
                plan.name()
            ))
        })?;
        let written = writer.write_partition(task.partition as usize, ctx).await?;
        tracing::debug!(
            stage = task.stage_id,
            partition = task.partition,
            "task done"
        );
        let partitions = written
            .into_iter()
            .map(|w| pb::PartitionStats {
                output_partition: w.output_partition,
                path: w.path.display().to_string(),
                num_rows: w.num_rows,
                num_bytes: w.num_bytes,
                in_memory: w.in_memory,
            })
            .collect();
        // The plan (a join's hash table and its memory reservation) is freed here, before the
        // status report: the task the report's answer starts may need that memory.
        Ok((partitions, operator_metrics(&plan)))
    }
}

/// Parquet scans decoded from a plan have no reader factory and would read every file's
/// footer again in every task; give them the executor's shared file-metadata cache, as
/// DataFusion's own table scans have.
fn with_metadata_cache(
    plan: Arc<dyn ExecutionPlan>,
    ctx: &TaskContext,
) -> Result<Arc<dyn ExecutionPlan>, VolleyError> {
    let runtime = ctx.runtime_env();
    let rewritten = plan.transform_up(|node| {
        let Some(scan) = node
            .downcast_ref::<DataSourceExec>()
            .and_then(|exec| exec.data_source().downcast_ref::<FileScanConfig>())
        else {
            return Ok(Transformed::no(node));
        };
        let Some(source) = scan.file_source().downcast_ref::<ParquetSource>() else {
            return Ok(Transformed::no(node));
        };
        if source.parquet_file_reader_factory().is_some() {
            return Ok(Transformed::no(node));
        }
        let store = runtime.object_store(scan.object_store_url.clone())?;
        let factory = Arc::new(CachedParquetFileReaderFactory::new(
            store,
            runtime.cache_manager.get_file_metadata_cache(),
        ));
        let source = source.clone().with_parquet_file_reader_factory(factory);
        let config = FileScanConfigBuilder::from(scan.clone())
            .with_source(Arc::new(source))
            .build();
        Ok(Transformed::yes(
            DataSourceExec::from_data_source(config) as Arc<dyn ExecutionPlan>
        ))
    })?;
    Ok(rewritten.data)
}

/// Each operator's DataFusion metrics (summed by name), in pre-order.
fn operator_metrics(plan: &Arc<dyn ExecutionPlan>) -> Vec<pb::OperatorMetrics> {
    let mut out = Vec::new();
    let _ = plan.apply(|node| {
        // Not a node of the scheduler's stage plan.
        if node.is::<BuildBoundsExec>() || is_runtime_row_filter(node) {
            return Ok(TreeNodeRecursion::Continue);
        }
        let metrics = node
            .metrics()
            .map(|set| {
                set.aggregate_by_name()
                    .iter()
                    // Timestamps do not add up across tasks.
                    .filter(|m| !m.value().name().ends_with("timestamp"))
                    .map(|m| pb::Metric {
                        name: m.value().name().to_string(),
                        value: u64::try_from(m.value().as_usize()).unwrap_or(u64::MAX),
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(pb::OperatorMetrics { metrics });
        Ok(TreeNodeRecursion::Continue)
    });
    out
}

/// The store options a task carries.
fn task_stores(def: &pb::TaskDefinition) -> Vec<(String, StoreOptions)> {
    def.stores
        .iter()
        .map(volley_core::stores::options::from_proto)
        .collect()
}

/// Secret values among a task's store options.
fn task_secrets(def: &pb::TaskDefinition) -> Vec<String> {
    task_stores(def)
        .iter()
        .flat_map(|(_, options)| {
            options
                .secret_values()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Longest error message a status report carries: a message quoting a huge value (say a cast
/// of a 70 MB string) would exceed the gRPC message limit, and the report would never arrive.
const MAX_ERROR_BYTES: usize = 16 * 1024;

/// `message` cut to [`MAX_ERROR_BYTES`] at a character boundary, saying how much was cut.
fn truncate_message(message: String) -> String {
    volley_core::error::cut_text(message, MAX_ERROR_BYTES, |cut| {
        format!("... ({cut} more bytes of this error were cut)")
    })
}

/// IO and resource errors may pass on another attempt; user errors (bad cast, divide by zero,
/// missing file, bad plan) will not.
fn is_retryable(e: &VolleyError) -> bool {
    use datafusion::error::DataFusionError as D;
    match e {
        VolleyError::Io(_) | VolleyError::Grpc(_) | VolleyError::Connect { .. } => true,
        VolleyError::DataFusion(df) => match df.find_root() {
            D::ResourcesExhausted(_) => true,
            D::IoError(err) => err.kind() != std::io::ErrorKind::NotFound,
            _ => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_errors_are_cut_at_a_char_boundary() {
        assert_eq!(truncate_message("short".to_string()), "short");
        let long = "é".repeat(MAX_ERROR_BYTES);
        let cut = truncate_message(long.clone());
        assert!(cut.len() < MAX_ERROR_BYTES + 100);
        assert!(cut.ends_with(&format!(
            "... ({} more bytes of this error were cut)",
            long.len() - MAX_ERROR_BYTES
        )));
    }
}
