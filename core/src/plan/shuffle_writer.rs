//! The last operator of every stage: runs one partition of its input and writes it to
//! shuffle files in the executor's work dir.

use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::{RecordBatch, StringArray, UInt32Array, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::execution::TaskContext;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, Partitioning,
    PlanProperties, ReplaceChildrenOptions, SendableRecordBatchStream,
};

use crate::config::{TaskEnv, VolleyOptions};
use crate::shuffle::{MemoryBudget, ShuffleFileWriter, WrittenPartition};
use crate::{Result, VolleyError};

/// Writes partition `p` of its input to shuffle files: hash/round-robin split into buckets when
/// `partitioning` is set, one file otherwise. Executing it yields one batch describing the files.
#[derive(Debug)]
pub struct ShuffleWriterExec {
    job_id: String,
    stage_id: u32,
    input: Arc<dyn ExecutionPlan>,
    partitioning: Option<Partitioning>,
    properties: Arc<PlanProperties>,
}

impl ShuffleWriterExec {
    /// The same writer (job, stage, partitioning) over another input.
    pub fn with_input(&self, input: Arc<dyn ExecutionPlan>) -> Self {
        Self::new(
            self.job_id.clone(),
            self.stage_id,
            input,
            self.partitioning.clone(),
        )
    }

    /// A writer for `stage_id` of `job_id`.
    pub fn new(
        job_id: impl Into<String>,
        stage_id: u32,
        input: Arc<dyn ExecutionPlan>,
        partitioning: Option<Partitioning>,
    ) -> Self {
        let schema = Self::stats_schema();
        let properties = PlanProperties::new(
            EquivalenceProperties::new(schema),
            Partitioning::UnknownPartitioning(input.output_partitioning().partition_count()),
            EmissionType::Final,
            Boundedness::Bounded,
        );
        Self {
            job_id: job_id.into(),
            stage_id,
            input,
            partitioning,
            properties: Arc::new(properties),
        }
    }

    /// Schema of the batch `execute` returns.
    pub fn stats_schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("output_partition", DataType::UInt32, false),
            Field::new("path", DataType::Utf8, false),
            Field::new("num_rows", DataType::UInt64, false),
            Field::new("num_bytes", DataType::UInt64, false),
        ]))
    }

    /// The job this stage belongs to.
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// The stage this writer ends.
    pub fn stage_id(&self) -> u32 {
        self.stage_id
    }

    /// The plan whose output is written.
    pub fn input(&self) -> &Arc<dyn ExecutionPlan> {
        &self.input
    }

    /// How output is split; None writes one file per task.
    pub fn shuffle_partitioning(&self) -> Option<&Partitioning> {
        self.partitioning.as_ref()
    }

    /// Number of buckets each task writes.
    pub fn output_partition_count(&self) -> usize {
        self.partitioning
            .as_ref()
            .map_or(1, |p| p.partition_count())
    }

    /// Run input partition `partition` and write it; returns the files written.
    pub async fn write_partition(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<Vec<WrittenPartition>> {
        let env = context
            .session_config()
            .get_extension::<TaskEnv>()
            .ok_or_else(|| {
                VolleyError::Internal(
                    "ShuffleWriterExec runs only inside a Volley executor".to_string(),
                )
            })?;
        let dir = env
            .work_dir
            .join(&self.job_id)
            .join(self.stage_id.to_string())
            .join(format!("{partition}-{}", env.attempt));
        let batch_size = context.session_config().batch_size();
        let options = context
            .session_config()
            .options()
            .extensions
            .get::<VolleyOptions>()
            .cloned()
            .unwrap_or_default();
        let compression = options.compression()?;
        let memory = env.memory.as_ref().map(|store| MemoryBudget {
            store: Arc::clone(store),
            task_bytes: usize::try_from(options.shuffle_memory_task_bytes).unwrap_or(usize::MAX),
        });
        let stream = self.input.execute(partition, Arc::clone(&context))?;
        let writer = ShuffleFileWriter::try_new(
            dir,
            self.input.schema(),
            self.partitioning.clone(),
            partition,
            self.input.output_partitioning().partition_count(),
            batch_size,
            compression,
        )?
        .with_memory(memory);
        writer.write_stream(stream).await
    }

    fn stats_batch(written: &[WrittenPartition]) -> Result<RecordBatch> {
        let paths: Vec<String> = written
            .iter()
            .map(|w| w.path.display().to_string())
            .collect();
        Ok(RecordBatch::try_new(
            Self::stats_schema(),
            vec![
                Arc::new(UInt32Array::from_iter_values(
                    written.iter().map(|w| w.output_partition),
                )),
                Arc::new(StringArray::from(paths)),
                Arc::new(UInt64Array::from_iter_values(
                    written.iter().map(|w| w.num_rows),
                )),
                Arc::new(UInt64Array::from_iter_values(
                    written.iter().map(|w| w.num_bytes),
                )),
            ],
        )?)
    }
}

impl DisplayAs for ShuffleWriterExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        match &self.partitioning {
            Some(p) => write!(
                f,
                "ShuffleWriterExec: stage={}, partitioning={p}",
                self.stage_id
            ),
            None => write!(
                f,
                "ShuffleWriterExec: stage={}, partitioning=none",
                self.stage_id
            ),
        }
    }
}

impl ExecutionPlan for ShuffleWriterExec {
    fn name(&self) -> &str {
        "ShuffleWriterExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DFResult<TreeNodeRecursion>,
    ) -> DFResult<TreeNodeRecursion> {
        if let Some(Partitioning::Hash(exprs, _)) = &self.partitioning {
            for expr in exprs {
                if f(expr)? == TreeNodeRecursion::Stop {
                    return Ok(TreeNodeRecursion::Stop);
                }
            }
        }
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        let [input]: [Arc<dyn ExecutionPlan>; 1] = children.try_into().map_err(|_| {
            DataFusionError::Internal("ShuffleWriterExec takes exactly one child".to_string())
        })?;
        Ok(Arc::new(self.with_input(input)))
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(
                datafusion::physical_plan::ChildrenPropertiesMode::Recompute,
            ),
        )
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DFResult<SendableRecordBatchStream> {
        let this = Self::new(
            self.job_id.clone(),
            self.stage_id,
            Arc::clone(&self.input),
            self.partitioning.clone(),
        );
        let future = async move {
            let written = this.write_partition(partition, context).await?;
            Ok(Self::stats_batch(&written)?)
        };
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            Self::stats_schema(),
            futures::stream::once(future),
        )))
    }
}
