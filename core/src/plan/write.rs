//! Writing a table from every task, atomically per task: `COPY ... TO`, `INSERT INTO` a listing
//! table, `write_parquet`.
//!
//! [`TaskWriteExec`] runs DataFusion's own file sink on one input partition, but aimed at a
//! prefix private to the task attempt (`<target>/_volley_temporary/<job>/<partition>-<attempt>/`)
//! and with a file extension DataFusion's listings skip (`.parquet.volley-tmp`): nothing a
//! failed, retried or zombie attempt writes is visible under the target. Its one output row
//! names that prefix and the rows written.
//!
//! `CommitFilesExec` (the `commit` module), the result stage's single task, then moves the kept
//! attempts' files into place.

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
use futures::StreamExt;
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
pub(crate) fn sink_with(
    sink: &dyn DataSink,
    config: FileSinkConfig,
) -> DFResult<Arc<dyn DataSink>> {
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
pub(crate) fn target_paths(config: &FileSinkConfig, job_id: &str) -> DFResult<(Path, Path)> {
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

pub(crate) fn url_of(config: &FileSinkConfig, path: &Path, folder: bool) -> String {
    let store = config.object_store_url.as_str().trim_end_matches('/');
    let slash = if folder { "/" } else { "" };
    format!("{store}/{path}{slash}")
}

/// The single child of a one-input node (`what` names the node in the error).
pub(crate) fn only_child(
    children: Vec<Arc<dyn ExecutionPlan>>,
    what: &str,
) -> DFResult<Arc<dyn ExecutionPlan>> {
    let [input]: [Arc<dyn ExecutionPlan>; 1] = children
        .try_into()
        .map_err(|_| DataFusionError::Internal(format!("{what} takes exactly one child")))?;
    Ok(input)
}

fn rows_written_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("count", DataType::UInt64, false),
        Field::new("temporary", DataType::Utf8, false),
    ]))
}

pub(crate) fn properties(schema: SchemaRef, partitions: usize) -> Arc<PlanProperties> {
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
        let input = only_child(children, "TaskWriteExec")?;
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
        let input = only_child(children, "PartitionSliceExec")?;
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
