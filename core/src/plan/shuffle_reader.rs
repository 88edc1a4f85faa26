//! The first operator of a stage that consumes another stage's shuffle output.

use std::fmt;
use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::execution::TaskContext;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricBuilder, MetricsSet};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
    ReplaceChildrenOptions, SendableRecordBatchStream,
};
use futures::StreamExt;

use crate::shuffle::{LocalReads, PartitionLocation, read_partition_location};

/// Reads the shuffle output of stage `stage_id`.
///
/// In hash mode output partition `p` reads bucket `p` of every map task; otherwise partition
/// `p` reads the single file of map task `p` (used under CoalescePartitionsExec and
/// SortPreservingMergeExec, and for the broadcast side of a join).
#[derive(Debug, Clone)]
pub struct ShuffleReaderExec {
    stage_id: u32,
    schema: SchemaRef,
    partitioning: Partitioning,
    hash_partitioned: bool,
    locations: Vec<Vec<PartitionLocation>>,
    properties: Arc<PlanProperties>,
    /// `flight_fetches` / `disk_reads`: shuffle files fetched from another executor over
    /// Flight, or read from disk on the same file system.
    metrics: ExecutionPlanMetricsSet,
}

impl ShuffleReaderExec {
    /// A reader whose locations are filled in once the producer stage is done.
    pub fn new(
        stage_id: u32,
        schema: SchemaRef,
        partitioning: Partitioning,
        hash_partitioned: bool,
    ) -> Self {
        let count = partitioning.partition_count();
        Self::with_locations(
            stage_id,
            schema,
            partitioning,
            hash_partitioned,
            vec![Vec::new(); count],
        )
    }

    /// A reader with resolved locations, one list per output partition.
    pub fn with_locations(
        stage_id: u32,
        schema: SchemaRef,
        partitioning: Partitioning,
        hash_partitioned: bool,
        locations: Vec<Vec<PartitionLocation>>,
    ) -> Self {
        let properties = PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            partitioning.clone(),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Self {
            stage_id,
            schema,
            partitioning,
            hash_partitioned,
            locations,
            properties: Arc::new(properties),
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }

    /// The producer stage.
    pub fn stage_id(&self) -> u32 {
        self.stage_id
    }

    /// True in hash mode (partition p = bucket p of all map tasks).
    pub fn hash_partitioned(&self) -> bool {
        self.hash_partitioned
    }

    /// Declared output partitioning.
    pub fn partitioning(&self) -> &Partitioning {
        &self.partitioning
    }

    /// Locations per output partition.
    pub fn locations(&self) -> &[Vec<PartitionLocation>] {
        &self.locations
    }
}

impl DisplayAs for ShuffleReaderExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let mode = if self.hash_partitioned {
            "hash"
        } else {
            "passthrough"
        };
        write!(
            f,
            "ShuffleReaderExec: stage={}, partitions={}, mode={mode}",
            self.stage_id,
            self.partitioning.partition_count()
        )
    }
}

impl ExecutionPlan for ShuffleReaderExec {
    fn name(&self) -> &str {
        "ShuffleReaderExec"
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
                "ShuffleReaderExec has no children".to_string(),
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

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DFResult<SendableRecordBatchStream> {
        let locations = self.locations.get(partition).cloned().ok_or_else(|| {
            DataFusionError::Internal(format!(
                "ShuffleReaderExec of stage {} has no partition {partition}",
                self.stage_id
            ))
        })?;
        let (local, security) = LocalReads::of_task(&context);
        let count = |read: fn(&LocalReads, &PartitionLocation) -> bool| {
            locations
                .iter()
                .filter(|l| local.as_ref().is_some_and(|local| read(local, l)))
                .count()
        };
        let (on_disk, in_memory) = (
            count(LocalReads::reads_from_disk),
            count(LocalReads::reads_from_memory),
        );
        MetricBuilder::new(&self.metrics)
            .counter("disk_reads", partition)
            .add(on_disk);
        MetricBuilder::new(&self.metrics)
            .counter("memory_reads", partition)
            .add(in_memory);
        MetricBuilder::new(&self.metrics)
            .counter("flight_fetches", partition)
            .add(locations.len() - on_disk - in_memory);
        let stage_id = self.stage_id;
        let stream = futures::stream::iter(locations)
            .map(move |location| {
                read_partition_location(location, local.clone(), stage_id, security.clone())
            })
            .flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            stream,
        )))
    }
}
