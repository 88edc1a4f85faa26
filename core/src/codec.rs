//! Encoding of physical plans for the wire: datafusion-proto plus Volley's own nodes.

use std::sync::Arc;

use datafusion::arrow::datatypes::Schema;
use datafusion::datasource::sink::DataSinkExec;
use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::execution::TaskContext;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::{ExecutionPlan, Partitioning};
use datafusion_proto::physical_plan::from_proto::parse_protobuf_partitioning;
use datafusion_proto::physical_plan::to_proto::serialize_partitioning;
use datafusion_proto::physical_plan::{
    PhysicalExtensionCodec, PhysicalPlanDecodeContext, PhysicalProtoConverterExtension,
};
use datafusion_proto::protobuf as dfproto;
use prost::Message;

use crate::ids::{check_id, check_partitions, check_shuffle_path};
use crate::plan::{
    CachedScanExec, CommitFilesExec, ShuffleReaderExec, ShuffleWriterExec, TaskWriteExec,
};
use crate::protobuf::{self, volley_plan_node::Node};
use crate::shuffle::PartitionLocation;

/// Knows how to encode and decode every Volley [`ExecutionPlan`].
#[derive(Debug, Default, Clone, Copy)]
pub struct VolleyCodec;

fn decode_err(e: impl std::fmt::Display) -> DataFusionError {
    DataFusionError::Internal(format!("cannot decode Volley plan node: {e}"))
}

impl VolleyCodec {
    /// Serialize a physical plan to bytes (a [`crate::flat`] plan: one operator per entry).
    pub fn encode_plan(plan: Arc<dyn ExecutionPlan>) -> DFResult<Vec<u8>> {
        crate::flat::encode(plan, &VolleyCodec)
    }

    /// The entries of `plan`'s encoding, one per operator (see [`crate::flat::encode_entries`]).
    pub fn encode_entries(plan: Arc<dyn ExecutionPlan>) -> DFResult<Vec<Vec<u8>>> {
        crate::flat::encode_entries(plan, &VolleyCodec)
    }

    /// Deserialize a physical plan from bytes, resolving functions and object stores in `ctx`.
    /// Bytes from the network may be anything: a panic while decoding them is an error.
    pub fn decode_plan(bytes: &[u8], ctx: &TaskContext) -> DFResult<Arc<dyn ExecutionPlan>> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            crate::flat::decode(bytes, ctx, Arc::new(VolleyCodec))
        }))
        .unwrap_or_else(|panic| {
            Err(DataFusionError::Internal(format!(
                "cannot decode plan: the decoder panicked: {}",
                crate::stack::panic_message(panic.as_ref())
            )))
        })
    }

    fn encode_partitioning(
        &self,
        partitioning: &Partitioning,
        converter: &dyn PhysicalProtoConverterExtension,
    ) -> DFResult<Vec<u8>> {
        Ok(serialize_partitioning(partitioning, self, converter)?.encode_to_vec())
    }

    fn decode_partitioning(
        &self,
        bytes: &[u8],
        ctx: &TaskContext,
        schema: &Schema,
        converter: &dyn PhysicalProtoConverterExtension,
    ) -> DFResult<Option<Partitioning>> {
        if bytes.is_empty() {
            return Ok(None);
        }
        let proto = dfproto::Partitioning::decode(bytes).map_err(decode_err)?;
        let decode_ctx = PhysicalPlanDecodeContext::new(ctx, self);
        parse_protobuf_partitioning(Some(&proto), &decode_ctx, schema, converter)
    }
}

/// A write node's holder plan (a `DataSinkExec` over an empty input): decoded with a codec
/// that knows no Volley node, so holders cannot nest write nodes (or anything else of ours)
/// to any depth.
fn decode_sink(bytes: &[u8], ctx: &TaskContext) -> DFResult<Arc<dyn ExecutionPlan>> {
    crate::flat::decode(bytes, ctx, Arc::new(NoExtensions))
}

/// A codec for plans that may hold no extension node.
#[derive(Debug)]
struct NoExtensions;

impl PhysicalExtensionCodec for NoExtensions {
    fn try_decode(
        &self,
        _buf: &[u8],
        _inputs: &[Arc<dyn ExecutionPlan>],
        _ctx: &TaskContext,
        _proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        Err(decode_err("a write node's sink holds a Volley node"))
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        _buf: &mut Vec<u8>,
        _proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> DFResult<()> {
        Err(decode_err(format!(
            "cannot encode {} in a sink",
            node.name()
        )))
    }
}

/// The file sink carried by a decoded holder plan (`DataSinkExec` over an empty input).
fn sink_exec(holder: &Arc<dyn ExecutionPlan>) -> DFResult<&DataSinkExec> {
    holder
        .downcast_ref::<DataSinkExec>()
        .ok_or_else(|| decode_err("a write node's sink is not a DataSinkExec"))
}

impl PhysicalExtensionCodec for VolleyCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &TaskContext,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        let node = protobuf::VolleyPlanNode::decode(buf).map_err(decode_err)?;
        match node.node {
            Some(Node::ShuffleWriter(w)) => {
                let [input] = inputs else {
                    return Err(decode_err("ShuffleWriterExec needs exactly one input"));
                };
                // The job id names the folder the task writes into.
                check_id("shuffle writer job id", &w.job_id).map_err(decode_err)?;
                let partitioning = self.decode_partitioning(
                    &w.partitioning,
                    ctx,
                    &input.schema(),
                    proto_converter,
                )?;
                if let Some(p) = &partitioning {
                    check_partitions("shuffle writer", p.partition_count()).map_err(decode_err)?;
                }
                Ok(Arc::new(ShuffleWriterExec::new(
                    w.job_id,
                    w.stage_id,
                    Arc::clone(input),
                    partitioning,
                )))
            }
            Some(Node::ShuffleReader(r)) => {
                let schema_proto =
                    dfproto::Schema::decode(r.schema.as_slice()).map_err(decode_err)?;
                let schema = Arc::new(Schema::try_from(&schema_proto).map_err(decode_err)?);
                // Bounded before anything is allocated for it.
                let count = check_partitions("shuffle reader", r.partition_count as usize)
                    .map_err(decode_err)?;
                if r.partitions.len() > count {
                    return Err(decode_err(format!(
                        "shuffle reader lists {} partitions but has {count}",
                        r.partitions.len()
                    )));
                }
                let partitioning = self
                    .decode_partitioning(&r.partitioning, ctx, &schema, proto_converter)?
                    .unwrap_or(Partitioning::UnknownPartitioning(count));
                if partitioning.partition_count() != count {
                    return Err(decode_err(
                        "shuffle reader partitioning disagrees with its count",
                    ));
                }
                for location in r.partitions.iter().flat_map(|p| &p.locations) {
                    check_shuffle_path(&location.path, None, r.stage_id).map_err(decode_err)?;
                }
                let mut locations = vec![Vec::new(); count];
                for (slot, partition) in locations.iter_mut().zip(r.partitions.iter()) {
                    *slot = partition
                        .locations
                        .iter()
                        .map(PartitionLocation::try_from)
                        .collect::<crate::Result<Vec<_>>>()?;
                }
                Ok(Arc::new(ShuffleReaderExec::with_locations(
                    r.stage_id,
                    schema,
                    partitioning,
                    r.hash_partitioned,
                    locations,
                )))
            }
            Some(Node::TaskWrite(w)) => {
                let [input] = inputs else {
                    return Err(decode_err("TaskWriteExec needs exactly one input"));
                };
                check_id("task write job id", &w.job_id).map_err(decode_err)?;
                let holder = decode_sink(&w.sink, ctx)?;
                let sink = sink_exec(&holder)?;
                Ok(Arc::new(TaskWriteExec::try_new(
                    w.job_id,
                    Arc::clone(input),
                    sink.sink(),
                    sink.sort_order().clone(),
                )?))
            }
            Some(Node::CommitFiles(c)) => {
                let [input] = inputs else {
                    return Err(decode_err("CommitFilesExec needs exactly one input"));
                };
                check_id("commit job id", &c.job_id).map_err(decode_err)?;
                let holder = decode_sink(&c.sink, ctx)?;
                let sink = sink_exec(&holder)?;
                Ok(Arc::new(CommitFilesExec::try_new(
                    c.job_id,
                    Arc::clone(input),
                    sink.sink(),
                )?))
            }
            Some(Node::CachedScan(c)) => {
                let schema_proto =
                    dfproto::Schema::decode(c.schema.as_slice()).map_err(decode_err)?;
                let schema = Arc::new(Schema::try_from(&schema_proto).map_err(decode_err)?);
                check_partitions("cached scan", c.partitions.len()).map_err(decode_err)?;
                for location in &c.partitions {
                    check_shuffle_path(&location.path, None, c.stage_id).map_err(decode_err)?;
                }
                let locations = c
                    .partitions
                    .iter()
                    .map(PartitionLocation::try_from)
                    .collect::<crate::Result<Vec<_>>>()?;
                let projection = c.projected.then(|| {
                    c.projection
                        .iter()
                        .map(|i| *i as usize)
                        .collect::<Vec<usize>>()
                });
                if let Some(bad) = projection
                    .iter()
                    .flatten()
                    .find(|i| **i >= schema.fields().len())
                {
                    return Err(decode_err(format!("cached scan reads no column {bad}")));
                }
                Ok(Arc::new(CachedScanExec::try_new(
                    c.table, schema, c.stage_id, locations, projection,
                )?))
            }
            Some(Node::ChildSlot(_)) => Err(decode_err("a child slot outside a flat plan")),
            None => Err(decode_err("empty node")),
        }
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> DFResult<()> {
        let encoded = if let Some(w) = node.downcast_ref::<ShuffleWriterExec>() {
            let partitioning = match w.shuffle_partitioning() {
                Some(p) => self.encode_partitioning(p, proto_converter)?,
                None => Vec::new(),
            };
            Node::ShuffleWriter(protobuf::ShuffleWriterExecNode {
                job_id: w.job_id().to_string(),
                stage_id: w.stage_id(),
                partitioning,
            })
        } else if let Some(r) = node.downcast_ref::<ShuffleReaderExec>() {
            let schema = dfproto::Schema::try_from(r.schema().as_ref())
                .map_err(|e| DataFusionError::Internal(format!("cannot encode schema: {e}")))?;
            let partitioning = match r.partitioning() {
                p @ Partitioning::Hash(..) => self.encode_partitioning(p, proto_converter)?,
                _ => Vec::new(),
            };
            Node::ShuffleReader(protobuf::ShuffleReaderExecNode {
                stage_id: r.stage_id(),
                schema: schema.encode_to_vec(),
                partition_count: u32::try_from(r.partitioning().partition_count())
                    .map_err(|_| DataFusionError::Internal("too many partitions".to_string()))?,
                hash_partitioned: r.hash_partitioned(),
                partitioning,
                partitions: r
                    .locations()
                    .iter()
                    .map(|locs| protobuf::ShuffleReaderPartition {
                        locations: locs.iter().map(protobuf::PartitionLocation::from).collect(),
                    })
                    .collect(),
                ordered: false,
            })
        } else if let Some(w) = node.downcast_ref::<TaskWriteExec>() {
            let schema =
                node.children().first().map(|c| c.schema()).ok_or_else(|| {
                    DataFusionError::Internal("TaskWriteExec without input".into())
                })?;
            let holder = w.sink_exec(Arc::new(EmptyExec::new(schema)));
            Node::TaskWrite(protobuf::TaskWriteExecNode {
                job_id: w.job_id().to_string(),
                sink: Self::encode_plan(Arc::new(holder))?,
            })
        } else if let Some(c) = node.downcast_ref::<CommitFilesExec>() {
            let schema = Arc::clone(c.sink().schema());
            let holder =
                DataSinkExec::new(Arc::new(EmptyExec::new(schema)), Arc::clone(c.sink()), None);
            Node::CommitFiles(protobuf::CommitFilesExecNode {
                job_id: c.job_id().to_string(),
                sink: Self::encode_plan(Arc::new(holder))?,
            })
        } else if let Some(c) = node.downcast_ref::<CachedScanExec>() {
            let schema = dfproto::Schema::try_from(c.table_schema().as_ref())
                .map_err(|e| DataFusionError::Internal(format!("cannot encode schema: {e}")))?;
            let columns = c.projection().unwrap_or_default();
            Node::CachedScan(protobuf::CachedScanExecNode {
                table: c.table().to_string(),
                schema: schema.encode_to_vec(),
                stage_id: c.stage_id(),
                partitions: c
                    .locations()
                    .iter()
                    .map(protobuf::PartitionLocation::from)
                    .collect(),
                projected: c.projection().is_some(),
                projection: columns
                    .iter()
                    .map(|i| u32::try_from(*i).unwrap_or(u32::MAX))
                    .collect(),
            })
        } else if let Some(slot) = node.downcast_ref::<crate::flat::ChildSlot>() {
            Node::ChildSlot(slot.index())
        } else {
            return Err(DataFusionError::NotImplemented(format!(
                "Volley cannot send {} to executors",
                node.name()
            )));
        };
        protobuf::VolleyPlanNode {
            node: Some(encoded),
        }
        .encode(buf)
        .map_err(|e| DataFusionError::Internal(format!("cannot encode Volley plan node: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::{DataType, Field};
    use datafusion::physical_expr::expressions::Column;
    use datafusion::physical_plan::{ExecutionPlanProperties, displayable};
    use datafusion::prelude::SessionContext;

    fn schema() -> Arc<Schema> {
        Arc::new(Schema::new(vec![
            Field::new("a", DataType::Int32, false),
            Field::new("b", DataType::Utf8, true),
        ]))
    }

    fn round_trip(plan: Arc<dyn ExecutionPlan>) -> Arc<dyn ExecutionPlan> {
        let bytes = VolleyCodec::encode_plan(Arc::clone(&plan)).unwrap();
        let ctx = SessionContext::new();
        let decoded = VolleyCodec::decode_plan(&bytes, &ctx.task_ctx()).unwrap();
        assert_eq!(
            displayable(plan.as_ref()).indent(true).to_string(),
            displayable(decoded.as_ref()).indent(true).to_string()
        );
        decoded
    }

    #[test]
    fn shuffle_writer_round_trips() {
        let input = Arc::new(EmptyExec::new(schema()).with_partitions(3));
        let hash = Partitioning::Hash(vec![Arc::new(Column::new("a", 0))], 4);
        let writer = Arc::new(ShuffleWriterExec::new("job-1", 7, input, Some(hash)));
        let decoded = round_trip(writer);
        let w = decoded.downcast_ref::<ShuffleWriterExec>().unwrap();
        assert_eq!(w.job_id(), "job-1");
        assert_eq!(w.stage_id(), 7);
        assert_eq!(w.output_partition_count(), 4);
        assert_eq!(w.input().output_partitioning().partition_count(), 3);

        let unpartitioned = Arc::new(ShuffleWriterExec::new(
            "job-2",
            1,
            Arc::new(EmptyExec::new(schema())),
            None,
        ));
        let decoded = round_trip(unpartitioned);
        assert!(
            decoded
                .downcast_ref::<ShuffleWriterExec>()
                .unwrap()
                .shuffle_partitioning()
                .is_none()
        );
    }

    #[test]
    fn cached_scan_round_trips_with_its_projection() {
        let location = |p: u32| PartitionLocation {
            executor_id: format!("exec-{p}"),
            host: "127.0.0.2".to_string(),
            flight_port: 50052,
            path: format!("/tmp/w/job/3/{p}-0/part-0.arrow"),
            map_partition: p,
            output_partition: 0,
            num_rows: 5,
            num_bytes: 100,
            grant: String::new(),
            in_memory: p == 0,
        };
        for projection in [None, Some(vec![1])] {
            let scan = Arc::new(
                CachedScanExec::try_new(
                    "lineitem_1995",
                    schema(),
                    3,
                    vec![location(0), location(1)],
                    projection.clone(),
                )
                .unwrap(),
            );
            let decoded = round_trip(scan.clone());
            let c = decoded.downcast_ref::<CachedScanExec>().unwrap();
            assert_eq!(c.table(), "lineitem_1995");
            assert_eq!(c.stage_id(), 3);
            assert_eq!(c.locations(), scan.locations());
            assert_eq!(c.projection(), projection.as_deref());
            assert_eq!(c.schema(), scan.schema());
            assert_eq!(decoded.output_partitioning().partition_count(), 2);
        }
    }

    #[test]
    fn shuffle_reader_round_trips_with_locations() {
        let location = |map: u32, out: u32| PartitionLocation {
            executor_id: format!("exec-{map}"),
            host: "127.0.0.1".to_string(),
            flight_port: 50051,
            path: format!("/tmp/w/job/2/{map}-0/part-{out}.arrow"),
            map_partition: map,
            output_partition: out,
            num_rows: 10 + u64::from(map),
            num_bytes: 1000,
            grant: String::new(),
            in_memory: map == 1,
        };
        let hash = Partitioning::Hash(vec![Arc::new(Column::new("a", 0))], 2);
        let reader = Arc::new(ShuffleReaderExec::with_locations(
            2,
            schema(),
            hash,
            true,
            vec![vec![location(0, 0), location(1, 0)], vec![location(1, 1)]],
        ));
        let decoded = round_trip(reader.clone());
        let r = decoded.downcast_ref::<ShuffleReaderExec>().unwrap();
        assert_eq!(r.stage_id(), 2);
        assert!(r.hash_partitioned());
        assert_eq!(r.locations(), reader.locations());
        assert!(matches!(r.partitioning(), Partitioning::Hash(exprs, 2) if exprs.len() == 1));
        assert_eq!(r.schema(), schema());

        let passthrough = Arc::new(ShuffleReaderExec::new(
            3,
            schema(),
            Partitioning::UnknownPartitioning(5),
            false,
        ));
        let decoded = round_trip(passthrough);
        let r = decoded.downcast_ref::<ShuffleReaderExec>().unwrap();
        assert!(!r.hash_partitioned());
        assert_eq!(r.locations().len(), 5);
    }
}
