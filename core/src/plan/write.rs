//! Writing a table from every task, atomically per task: `COPY ... TO`, `INSERT INTO` a listing
//! table, `write_parquet`.
//!
//! [`TaskWriteExec`] runs DataFusion's own file sink on one input partition, but aimed at a
//! prefix private to the task attempt (`<target>/_volley_temporary/<job>/<partition>-<attempt>/`)
//! and with a file extension DataFusion's listings skip (`.parquet.volley-tmp`): nothing a
//! failed, retried or zombie attempt writes is visible under the target. Its one output row
//! names that prefix and the rows written.
//!
//! [`CommitFilesExec`] is the result stage's single task. It reads the rows of the attempts the
//! scheduler kept — exactly one per partition — moves their files into place (dropping the
//! temporary extension), removes the job's temporary prefix (every attempt's leftovers) and
//! answers the total row count, as DataFusion's sink does. Its first attempt records the kept
//! attempts in a manifest (`_commit`) under the temporary prefix: a commit that fails half-way
//! or whose report is lost runs again on exactly that list, finds the moved files gone and
//! moves the rest, even if the writing tasks ran again meanwhile. The scheduler deletes the
//! temporary prefix, manifest included, when the job ends.

use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::{Array, RecordBatch, StringArray, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::file_format::csv::CsvSink;
use datafusion::datasource::file_format::json::JsonSink;
use datafusion::datasource::file_format::parquet::ParquetSink;
use datafusion::datasource::listing::ListingTableUrl;
use datafusion::datasource::physical_plan::{FileOutputMode, FileSink, FileSinkConfig};
use datafusion::datasource::sink::{DataSink, DataSinkExec};
use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::dml::InsertOp;
use datafusion::physical_expr::{EquivalenceProperties, LexRequirement, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, Partitioning,
    PlanProperties, SendableRecordBatchStream,
};
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use object_store::path::Path;

use crate::config::{TaskEnv, VolleyOptions};

/// Folder, below a table's location, of the attempts' private prefixes.
pub const TEMPORARY_DIR: &str = "_volley_temporary";
/// Extension added to files while they are not committed.
pub const TEMPORARY_EXTENSION: &str = "volley-tmp";

/// The config of a file sink Volley knows how to aim elsewhere (Parquet, CSV, JSON).
pub fn file_sink_config(sink: &dyn DataSink) -> Option<&FileSinkConfig> {
    sink.downcast_ref::<ParquetSink>()
        .map(|s| s.config())
        .or_else(|| sink.downcast_ref::<CsvSink>().map(|s| s.config()))
        .or_else(|| sink.downcast_ref::<JsonSink>().map(|s| s.config()))
}

/// The same kind of sink as `sink` (same format options), writing with `config`.
fn sink_with(sink: &dyn DataSink, config: FileSinkConfig) -> DFResult<Arc<dyn DataSink>> {
    if let Some(s) = sink.downcast_ref::<ParquetSink>() {
        Ok(Arc::new(ParquetSink::new(
            config,
            s.parquet_options().clone(),
        )))
    } else if let Some(s) = sink.downcast_ref::<CsvSink>() {
        Ok(Arc::new(CsvSink::new(config, s.writer_options().clone())))
    } else if let Some(s) = sink.downcast_ref::<JsonSink>() {
        Ok(Arc::new(JsonSink::new(config, s.writer_options().clone())))
    } else {
        Err(DataFusionError::Internal(format!(
            "Volley cannot write through {sink:?}"
        )))
    }
}

/// True when `sink` writes one file at exactly its URL (not a folder of files).
pub fn writes_single_file(config: &FileSinkConfig) -> bool {
    config
        .table_paths
        .first()
        .is_some_and(|url| config.file_output_mode.single_file_output(url))
}

/// True for sinks a cluster writes from every task: file sinks appending (COPY, INSERT INTO).
pub fn splits_writes(sink: &dyn DataSink) -> bool {
    file_sink_config(sink).is_some_and(|c| c.insert_op == InsertOp::Append)
}

/// Object path of the folder the target's files go to, and of the job's temporary prefix.
fn target_paths(config: &FileSinkConfig, job_id: &str) -> DFResult<(Path, Path)> {
    let url = config
        .table_paths
        .first()
        .ok_or_else(|| DataFusionError::Internal("file sink without a path".to_string()))?;
    let prefix = url.prefix().clone();
    let folder = if writes_single_file(config) {
        let parts: Vec<_> = prefix.parts().collect();
        Path::from_iter(parts.iter().take(parts.len().saturating_sub(1)).cloned())
    } else {
        prefix
    };
    let temporary = folder.clone().join(TEMPORARY_DIR).join(job_id);
    Ok((folder, temporary))
}

fn url_of(config: &FileSinkConfig, path: &Path, folder: bool) -> String {
    let store = config.object_store_url.as_str().trim_end_matches('/');
    let slash = if folder { "/" } else { "" };
    format!("{store}/{path}{slash}")
}

fn rows_written_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("count", DataType::UInt64, false),
        Field::new("temporary", DataType::Utf8, false),
    ]))
}

fn properties(schema: SchemaRef, partitions: usize) -> Arc<PlanProperties> {
    Arc::new(PlanProperties::new(
        EquivalenceProperties::new(schema),
        Partitioning::UnknownPartitioning(partitions),
        EmissionType::Final,
        Boundedness::Bounded,
    ))
}

/// Runs the file sink on one partition of its input, into an attempt-private prefix.
#[derive(Debug)]
pub struct TaskWriteExec {
    job_id: String,
    input: Arc<dyn ExecutionPlan>,
    sink: Arc<dyn DataSink>,
    sort_order: Option<LexRequirement>,
    properties: Arc<PlanProperties>,
}

impl TaskWriteExec {
    /// Write `input` (every partition on its own) through a copy of `sink`.
    pub fn try_new(
        job_id: String,
        input: Arc<dyn ExecutionPlan>,
        sink: &dyn DataSink,
        sort_order: Option<LexRequirement>,
    ) -> DFResult<Self> {
        let config = file_sink_config(sink)
            .ok_or_else(|| DataFusionError::Internal("not a file sink".to_string()))?
            .clone();
        let sink = sink_with(sink, config)?;
        let partitions = input.output_partitioning().partition_count();
        Ok(Self {
            job_id,
            input,
            sink,
            sort_order,
            properties: properties(rows_written_schema(), partitions),
        })
    }

    /// The job whose temporary prefix it writes under.
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// The sink as DataFusion's plan node (over `input`), for encoding.
    pub fn sink_exec(&self, input: Arc<dyn ExecutionPlan>) -> DataSinkExec {
        DataSinkExec::new(input, Arc::clone(&self.sink), self.sort_order.clone())
    }

    fn attempt_sink(
        &self,
        partition: usize,
        attempt: u32,
    ) -> DFResult<(Arc<dyn DataSink>, String)> {
        let config = file_sink_config(self.sink.as_ref())
            .ok_or_else(|| DataFusionError::Internal("not a file sink".to_string()))?;
        let (_, temporary) = target_paths(config, &self.job_id)?;
        let mine = temporary.join(format!("{partition}-{attempt}"));
        let mut aimed = config.clone();
        aimed.file_extension = format!("{}.{TEMPORARY_EXTENSION}", config.file_extension);
        let url = if writes_single_file(config) {
            let name = config
                .table_paths
                .first()
                .and_then(|u| u.prefix().filename().map(str::to_string))
                .unwrap_or_else(|| format!("data.{}", config.file_extension));
            aimed.file_output_mode = FileOutputMode::SingleFile;
            url_of(
                config,
                &mine.clone().join(format!("{name}.{TEMPORARY_EXTENSION}")),
                false,
            )
        } else {
            aimed.file_output_mode = FileOutputMode::Directory;
            url_of(config, &mine, true)
        };
        aimed.original_url = url.clone();
        aimed.table_paths = vec![ListingTableUrl::parse(&url)?];
        Ok((
            sink_with(self.sink.as_ref(), aimed)?,
            url_of(config, &mine, true),
        ))
    }
}

impl DisplayAs for TaskWriteExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let target = file_sink_config(self.sink.as_ref())
            .and_then(|c| c.table_paths.first())
            .map_or("?", |u| u.as_str());
        write!(f, "TaskWriteExec: target={target}")
    }
}

impl ExecutionPlan for TaskWriteExec {
    fn name(&self) -> &str {
        "TaskWriteExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DFResult<TreeNodeRecursion>,
    ) -> DFResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        let [input]: [Arc<dyn ExecutionPlan>; 1] = children.try_into().map_err(|_| {
            DataFusionError::Internal("TaskWriteExec takes exactly one child".to_string())
        })?;
        Ok(Arc::new(Self::try_new(
            self.job_id.clone(),
            input,
            self.sink.as_ref(),
            self.sort_order.clone(),
        )?))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DFResult<SendableRecordBatchStream> {
        let env = context.session_config().get_extension::<TaskEnv>();
        let attempt = env.as_ref().map_or(0, |env| env.attempt);
        let fail = env.is_some_and(|env| env.test_hooks)
            && context
                .session_config()
                .options()
                .extensions
                .get::<VolleyOptions>()
                .is_some_and(|o| {
                    o.fails_after_write(u32::try_from(partition).unwrap_or(u32::MAX), attempt)
                });
        let (sink, temporary) = self.attempt_sink(partition, attempt)?;
        let slice = Arc::new(PartitionSliceExec::new(Arc::clone(&self.input), partition));
        let exec = DataSinkExec::new(slice, sink, self.sort_order.clone());
        let counts = exec.execute(0, context)?;
        let schema = rows_written_schema();
        let out = Arc::clone(&schema);
        let stream = counts.map(move |batch| {
            let batch = batch?;
            if fail {
                return Err(DataFusionError::IoError(std::io::Error::other(format!(
                    "injected fault after writing (volley.test_fail_write) in attempt {attempt}"
                ))));
            }
            let count = batch
                .column(0)
                .as_any()
                .downcast_ref::<UInt64Array>()
                .map_or(0, |a| a.iter().flatten().sum::<u64>());
            Ok(RecordBatch::try_new(
                Arc::clone(&out),
                vec![
                    Arc::new(UInt64Array::from(vec![count])),
                    Arc::new(StringArray::from(vec![temporary.clone()])),
                ],
            )?)
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }
}

/// Partition `partition` of its input as its only partition.
#[derive(Debug)]
struct PartitionSliceExec {
    input: Arc<dyn ExecutionPlan>,
    partition: usize,
    properties: Arc<PlanProperties>,
}

impl PartitionSliceExec {
    fn new(input: Arc<dyn ExecutionPlan>, partition: usize) -> Self {
        let properties = Arc::new(PlanProperties::new(
            input.equivalence_properties().clone(),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Self {
            input,
            partition,
            properties,
        }
    }
}

impl DisplayAs for PartitionSliceExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "PartitionSliceExec: partition={}", self.partition)
    }
}

impl ExecutionPlan for PartitionSliceExec {
    fn name(&self) -> &str {
        "PartitionSliceExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DFResult<TreeNodeRecursion>,
    ) -> DFResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        let [input]: [Arc<dyn ExecutionPlan>; 1] = children.try_into().map_err(|_| {
            DataFusionError::Internal("PartitionSliceExec takes exactly one child".to_string())
        })?;
        Ok(Arc::new(Self::new(input, self.partition)))
    }

    fn execute(
        &self,
        _partition: usize,
        context: Arc<TaskContext>,
    ) -> DFResult<SendableRecordBatchStream> {
        self.input.execute(self.partition, context)
    }
}

/// Moves the kept attempts' files into place, removes the temporary prefix, answers the count.
#[derive(Debug)]
pub struct CommitFilesExec {
    job_id: String,
    input: Arc<dyn ExecutionPlan>,
    config: FileSinkConfig,
    sink: Arc<dyn DataSink>,
    properties: Arc<PlanProperties>,
}

impl CommitFilesExec {
    /// Commit what the [`TaskWriteExec`] partitions of `input` wrote through `sink`.
    pub fn try_new(
        job_id: String,
        input: Arc<dyn ExecutionPlan>,
        sink: &dyn DataSink,
    ) -> DFResult<Self> {
        let config = file_sink_config(sink)
            .ok_or_else(|| DataFusionError::Internal("not a file sink".to_string()))?
            .clone();
        let schema = Arc::new(Schema::new(vec![Field::new(
            "count",
            DataType::UInt64,
            false,
        )]));
        Ok(Self {
            job_id,
            input,
            sink: sink_with(sink, config.clone())?,
            config,
            properties: properties(schema, 1),
        })
    }

    /// The job whose temporary prefix it removes.
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// URL of the job's temporary prefix, which a failed or cancelled job leaves to delete.
    pub fn temporary_url(&self) -> DFResult<String> {
        let (_, temporary) = target_paths(&self.config, &self.job_id)?;
        Ok(url_of(&self.config, &temporary, true))
    }

    /// The sink whose target it commits to (for encoding).
    pub fn sink(&self) -> &Arc<dyn DataSink> {
        &self.sink
    }

    async fn commit(
        job_id: String,
        input: Arc<dyn ExecutionPlan>,
        config: FileSinkConfig,
        context: Arc<TaskContext>,
    ) -> DFResult<RecordBatch> {
        let store = context
            .runtime_env()
            .object_store(&config.object_store_url)?;
        let (folder, temporary) = target_paths(&config, &job_id)?;
        // The first commit attempt records what it commits; a later one (its report was lost)
        // commits exactly that, not the output of write tasks that ran again since.
        let manifest = temporary.clone().join(MANIFEST);
        let kept = match store.get(&manifest).await {
            Ok(found) => parse_manifest(&found.bytes().await?)?,
            Err(object_store::Error::NotFound { .. }) => {
                let kept = kept_attempts(&input, &context).await?;
                store.put(&manifest, render_manifest(&kept).into()).await?;
                kept
            }
            Err(e) => return Err(e.into()),
        };
        let single = writes_single_file(&config);
        let suffix = format!(".{TEMPORARY_EXTENSION}");
        for (_, dir) in &kept {
            let prefix = ListingTableUrl::parse(dir)?.prefix().clone();
            // Only this job's attempt prefixes: a row naming anything else is not committed.
            if prefix.prefix_match(&temporary).is_none() || prefix == temporary {
                return Err(DataFusionError::Internal(format!(
                    "commit of job {job_id}: {dir} is not one of its attempts' prefixes"
                )));
            }
            let files: Vec<_> = store.list(Some(&prefix)).try_collect().await?;
            for file in files {
                let relative: Vec<_> = file
                    .location
                    .prefix_match(&prefix)
                    .into_iter()
                    .flatten()
                    .collect();
                let name = file.location.filename().unwrap_or_default();
                let Some(final_name) = name.strip_suffix(&suffix) else {
                    continue;
                };
                let target = if single {
                    config
                        .table_paths
                        .first()
                        .map(|u| u.prefix().clone())
                        .unwrap_or_default()
                } else {
                    let mut target = folder.clone();
                    for part in &relative[..relative.len().saturating_sub(1)] {
                        target = target.join(part.as_ref());
                    }
                    target.join(final_name)
                };
                store.rename(&file.location, &target).await?;
            }
        }
        // Every attempt's leftovers go; the manifest stays until the job is released.
        let leftovers = store
            .list(Some(&temporary))
            .try_filter(move |meta| {
                futures::future::ready(meta.location.filename() != Some(MANIFEST))
            })
            .map_ok(|meta| meta.location)
            .boxed();
        store
            .delete_stream(leftovers)
            .try_collect::<Vec<_>>()
            .await?;
        let total: u64 = kept.iter().map(|(count, _)| count).sum();
        Ok(RecordBatch::try_from_iter(vec![(
            "count",
            Arc::new(UInt64Array::from(vec![total])) as Arc<dyn Array>,
        )])?)
    }
}

/// Name of the commit manifest in a job's temporary prefix.
const MANIFEST: &str = "_commit";

/// `(rows, attempt prefix)` of every kept writing attempt, from the commit's input.
async fn kept_attempts(
    input: &Arc<dyn ExecutionPlan>,
    context: &Arc<TaskContext>,
) -> DFResult<Vec<(u64, String)>> {
    let mut kept = Vec::new();
    for partition in 0..input.output_partitioning().partition_count() {
        let batches: Vec<RecordBatch> = input
            .execute(partition, Arc::clone(context))?
            .try_collect()
            .await?;
        for batch in batches {
            let columns = batch.columns();
            let counts = columns
                .first()
                .and_then(|c| c.as_any().downcast_ref::<UInt64Array>());
            let dirs = columns
                .get(1)
                .and_then(|c| c.as_any().downcast_ref::<StringArray>());
            let (Some(counts), Some(dirs)) = (counts, dirs) else {
                return Err(DataFusionError::Internal(
                    "a commit's input is not (count, temporary) rows".to_string(),
                ));
            };
            for row in 0..batch.num_rows() {
                kept.push((counts.value(row), dirs.value(row).to_string()));
            }
        }
    }
    Ok(kept)
}

fn render_manifest(kept: &[(u64, String)]) -> String {
    kept.iter()
        .map(|(count, dir)| format!("{count}\t{dir}\n"))
        .collect()
}

fn parse_manifest(bytes: &[u8]) -> DFResult<Vec<(u64, String)>> {
    let bad = || DataFusionError::Internal("unreadable commit manifest".to_string());
    std::str::from_utf8(bytes)
        .map_err(|_| bad())?
        .lines()
        .filter(|l| !l.is_empty())
        .map(|line| {
            let (count, dir) = line.split_once('\t').ok_or_else(bad)?;
            Ok((count.parse().map_err(|_| bad())?, dir.to_string()))
        })
        .collect()
}

impl DisplayAs for CommitFilesExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let target = self.config.table_paths.first().map_or("?", |u| u.as_str());
        write!(f, "CommitFilesExec: target={target}")
    }
}

impl ExecutionPlan for CommitFilesExec {
    fn name(&self) -> &str {
        "CommitFilesExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DFResult<TreeNodeRecursion>,
    ) -> DFResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        let [input]: [Arc<dyn ExecutionPlan>; 1] = children.try_into().map_err(|_| {
            DataFusionError::Internal("CommitFilesExec takes exactly one child".to_string())
        })?;
        Ok(Arc::new(Self::try_new(
            self.job_id.clone(),
            input,
            self.sink.as_ref(),
        )?))
    }

    fn execute(
        &self,
        _partition: usize,
        context: Arc<TaskContext>,
    ) -> DFResult<SendableRecordBatchStream> {
        let future = Self::commit(
            self.job_id.clone(),
            Arc::clone(&self.input),
            self.config.clone(),
            context,
        );
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema(),
            futures::stream::once(future),
        )))
    }
}
