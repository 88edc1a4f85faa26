//! The scan of a cached table (`CACHE TABLE`): partition p reads the output of task p of the
//! job that materialized the table, from its executor's memory or work dir (or over Flight
//! from another executor).

use std::fmt;
use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::execution::TaskContext;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
    ReplaceChildrenOptions, SendableRecordBatchStream,
};
use futures::StreamExt;

use crate::shuffle::{LocalReads, PartitionLocation, read_partition_location};

/// Reads a cached table's partitions, optionally only some of its columns.
#[derive(Debug, Clone)]
pub struct CachedScanExec {
    table: String,
    /// The whole table's schema.
    table_schema: SchemaRef,
    stage_id: u32,
    locations: Vec<PartitionLocation>,
    projection: Option<Vec<usize>>,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
}

impl CachedScanExec {
    /// A scan of `table` (schema `table_schema`) whose partition p is `locations[p]`, written
    /// by stage `stage_id` of the materializing job; `projection` picks columns.
    pub fn try_new(
        table: impl Into<String>,
        table_schema: SchemaRef,
        stage_id: u32,
        locations: Vec<PartitionLocation>,
        projection: Option<Vec<usize>>,
    ) -> DFResult<Self> {
        let schema = match &projection {
            Some(columns) => Arc::new(table_schema.project(columns)?),
            None => Arc::clone(&table_schema),
        };
        let properties = PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            Partitioning::UnknownPartitioning(locations.len().max(1)),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Ok(Self {
            table: table.into(),
            table_schema,
            stage_id,
            locations,
            projection,
            schema,
            properties: Arc::new(properties),
        })
    }

    /// The cached table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The whole table's schema.
    pub fn table_schema(&self) -> &SchemaRef {
        &self.table_schema
    }

    /// The materializing job's result stage.
    pub fn stage_id(&self) -> u32 {
        self.stage_id
    }

    /// Where each partition is.
    pub fn locations(&self) -> &[PartitionLocation] {
        &self.locations
    }

    /// The columns read, when not all.
    pub fn projection(&self) -> Option<&[usize]> {
        self.projection.as_deref()
    }
}

impl DisplayAs for CachedScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "CachedScanExec: table={}, partitions={}",
            self.table,
            self.locations.len()
        )?;
        if let Some(columns) = &self.projection {
            write!(f, ", projection={columns:?}")?;
        }
        Ok(())
    }
}

impl ExecutionPlan for CachedScanExec {
    fn name(&self) -> &str {
        "CachedScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DFResult<TreeNodeRecursion>,
    ) -> DFResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        if children.is_empty() {
            Ok(self)
        } else {
            Err(DataFusionError::Internal(
                "CachedScanExec has no children".to_string(),
            ))
        }
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
        let schema = Arc::clone(&self.schema);
        let Some(location) = self.locations.get(partition).cloned() else {
            // A table with no rows has no partition to read.
            return Ok(Box::pin(RecordBatchStreamAdapter::new(
                schema,
                futures::stream::empty(),
            )));
        };
        let (local, security) = LocalReads::of_task(&context);
        let (table, executor) = (self.table.clone(), location.executor_id.clone());
        let projection = self.projection.clone();
        // Not a fetch failure of this job's stages: the cached copy is another job's output.
        let stream = read_partition_location(location, local, self.stage_id, security).map(
            move |batch| {
                let batch = batch.map_err(|e| {
                    DataFusionError::Execution(format!(
                        "partition {partition} of cached table {table} on executor {executor} cannot be read: {e}"
                    ))
                })?;
                match &projection {
                    Some(columns) => Ok(batch.project(columns)?),
                    None => Ok(batch),
                }
            },
        );
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }
}
