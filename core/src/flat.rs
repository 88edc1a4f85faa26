//! Plans on the wire as a flat list of operators ([`crate::protobuf::FlatPlan`]): each operator
//! is encoded alone, its children replaced by [`ChildSlot`]s that name earlier entries, so no
//! decode nests deeper than one operator and its expressions. A plan of any depth the
//! scheduler builds (dozens of joins in one stage) decodes under prost's fixed recursion
//! limit; operator trees deeper than [`MAX_DEPTH`] are refused, so hostile bytes cannot nest
//! operators to exhaust a stack in the code that walks plans later. Both walks here are
//! iterative.

use std::fmt;
use std::sync::Arc;

use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::execution::TaskContext;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::{
    ChildrenPropertiesMode, DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties,
    ReplaceChildrenOptions, SendableRecordBatchStream,
};
use datafusion_proto::physical_plan::{PhysicalExtensionCodec, PhysicalProtoConverterExtension};
use parking_lot::Mutex;
use prost::Message;

use crate::protobuf::{self, volley_plan_node::Node};

/// The most operators one flat plan may hold.
pub const MAX_NODES: usize = 100_000;

/// The deepest operator tree one flat plan may hold: code that walks plans recursively (stage
/// cutting, execution, drop) must not exhaust a worker's stack on a hostile plan.
pub const MAX_DEPTH: usize = 1_000;

/// Stands for child `index` of a flat plan while its parent is encoded alone: the child's
/// properties (schema, partitioning, ordering), so the parent is rebuilt unchanged. Never
/// executed: decoding replaces it with the decoded child.
#[derive(Debug)]
pub struct ChildSlot {
    index: u32,
    properties: Arc<PlanProperties>,
}

impl ChildSlot {
    /// The flat plan entry this slot stands for.
    pub fn index(&self) -> u32 {
        self.index
    }
}

impl DisplayAs for ChildSlot {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "ChildSlot: {}", self.index)
    }
}

impl ExecutionPlan for ChildSlot {
    fn name(&self) -> &str {
        "ChildSlot"
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

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        if children.is_empty() {
            Ok(self)
        } else {
            Err(DataFusionError::Internal(
                "ChildSlot has no children".into(),
            ))
        }
    }

    fn execute(
        &self,
        _partition: usize,
        _context: Arc<TaskContext>,
    ) -> DFResult<SendableRecordBatchStream> {
        Err(DataFusionError::Internal(
            "a ChildSlot of a flat plan cannot run".into(),
        ))
    }
}

/// Why a plan cannot be sent: one of its expressions nests deeper than prost decodes.
#[derive(Debug)]
pub struct TooDeep(String);

impl fmt::Display for TooDeep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TooDeep {}

/// Nesting depth at which prost refuses to decode a message.
const PROST_RECURSION_LIMIT: usize = 100;

/// True when `e` is [`encode`]'s [`TooDeep`]: the plan is valid but cannot travel.
pub fn is_too_deep(e: &DataFusionError) -> bool {
    matches!(e, DataFusionError::External(inner) if inner.is::<TooDeep>())
}

/// Encode `plan` as a flat plan: children first, each operator alone, through `codec`
/// (which must encode [`ChildSlot`] as `VolleyPlanNode::child_slot`).
pub fn encode(
    plan: Arc<dyn ExecutionPlan>,
    codec: &dyn PhysicalExtensionCodec,
) -> DFResult<Vec<u8>> {
    Ok(assemble(encode_entries(plan, codec)?))
}

/// A flat plan of these entries (see [`encode_entries`]).
pub fn assemble(nodes: Vec<Vec<u8>>) -> Vec<u8> {
    protobuf::FlatPlan { nodes }.encode_to_vec()
}

/// The operators of `plan` in the order of a flat plan's entries: each after its children,
/// children left to right.
pub fn post_order(plan: &Arc<dyn ExecutionPlan>) -> Vec<Arc<dyn ExecutionPlan>> {
    let mut out = Vec::new();
    let mut stack = vec![(Arc::clone(plan), false)];
    while let Some((node, expanded)) = stack.pop() {
        let children: Vec<Arc<dyn ExecutionPlan>> = node.children().into_iter().cloned().collect();
        if !expanded && !children.is_empty() {
            stack.push((node, true));
            stack.extend(children.into_iter().rev().map(|c| (c, false)));
            continue;
        }
        out.push(node);
    }
    out
}

/// The entries of `plan`'s flat plan, entry `i` the operator `i` of [`post_order`]: an entry
/// names its children by index only, so a caller may swap one leaf's entry for another
/// leaf's (the same operator with other files) and [`assemble`] the result.
pub fn encode_entries(
    plan: Arc<dyn ExecutionPlan>,
    codec: &dyn PhysicalExtensionCodec,
) -> DFResult<Vec<Vec<u8>>> {
    let mut nodes: Vec<Vec<u8>> = Vec::new();
    // Indices of encoded subtrees whose parent is not encoded yet, in order.
    let mut done: Vec<u32> = Vec::new();
    for node in post_order(&plan) {
        let children: Vec<Arc<dyn ExecutionPlan>> = node.children().into_iter().cloned().collect();
        let ids = done.split_off(done.len().saturating_sub(children.len()));
        let alone = if children.is_empty() {
            node
        } else {
            let slots = children
                .iter()
                .zip(&ids)
                .map(|(child, &index)| {
                    Arc::new(ChildSlot {
                        index,
                        properties: Arc::clone(child.properties()),
                    }) as Arc<dyn ExecutionPlan>
                })
                .collect();
            node.replace_children(
                slots,
                ReplaceChildrenOptions::new(ChildrenPropertiesMode::Keep),
            )?
        };
        let name = alone.name().to_string();
        let bytes =
            datafusion_proto::bytes::physical_plan_to_bytes_with_extension_codec(alone, codec)?;
        // One operator decodes under prost's recursion limit unless an expression of it is
        // nested too deeply: find out here, not on every executor. Each level of nesting takes
        // at least two bytes (a tag and a length), so a shorter entry cannot be too deep.
        if bytes.len() >= 2 * PROST_RECURSION_LIMIT
            && let Err(e) = datafusion_proto::protobuf::PhysicalPlanNode::decode(bytes.as_ref())
        {
            return Err(DataFusionError::External(Box::new(TooDeep(format!(
                "an expression of {name} is nested too deeply to send to executors (more \
                 than about 100 protobuf levels): {e}"
            )))));
        }
        nodes.push(bytes.to_vec());
        done.push(
            u32::try_from(nodes.len() - 1)
                .map_err(|_| DataFusionError::Internal("plan too large".into()))?,
        );
    }
    Ok(nodes)
}

/// Decode a flat plan, extension nodes through `codec`; each child slot is used exactly
/// once, by a later entry.
pub fn decode(
    bytes: &[u8],
    ctx: &TaskContext,
    codec: Arc<dyn PhysicalExtensionCodec>,
) -> DFResult<Arc<dyn ExecutionPlan>> {
    let flat = protobuf::FlatPlan::decode(bytes).map_err(bad)?;
    if flat.nodes.len() > MAX_NODES {
        return Err(bad(format!(
            "{} operators, over the limit of {MAX_NODES}",
            flat.nodes.len()
        )));
    }
    let codec = SlotCodec {
        decoded: Arc::default(),
        deepest_child: Arc::default(),
        inner: codec,
    };
    for node in &flat.nodes {
        *codec.deepest_child.lock() = 0;
        let plan = datafusion_proto::bytes::physical_plan_from_bytes_with_extension_codec(
            node, ctx, &codec,
        )?;
        let depth = *codec.deepest_child.lock() + 1;
        if depth > MAX_DEPTH {
            return Err(bad(format!(
                "operators nested {depth} deep, over the limit of {MAX_DEPTH}"
            )));
        }
        codec.decoded.lock().push(Some((plan, depth)));
    }
    let mut decoded = std::mem::take(&mut *codec.decoded.lock());
    let (root, _) = decoded.pop().flatten().ok_or_else(|| bad("no operators"))?;
    if decoded.iter().any(Option::is_some) {
        return Err(bad("operators no parent uses"));
    }
    Ok(root)
}

fn bad(e: impl fmt::Display) -> DataFusionError {
    DataFusionError::Internal(format!("cannot decode plan: {e}"))
}

/// Entries decoded so far with their depths; `None` once a slot used it.
type Decoded = Arc<Mutex<Vec<Option<(Arc<dyn ExecutionPlan>, usize)>>>>;

/// A codec, plus child slots resolved to the entries decoded so far.
#[derive(Debug)]
struct SlotCodec {
    decoded: Decoded,
    /// Depth of the deepest child the entry being decoded took.
    deepest_child: Arc<Mutex<usize>>,
    inner: Arc<dyn PhysicalExtensionCodec>,
}

impl PhysicalExtensionCodec for SlotCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &TaskContext,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        let node = protobuf::VolleyPlanNode::decode(buf).map_err(bad)?;
        let Some(Node::ChildSlot(index)) = node.node else {
            return self.inner.try_decode(buf, inputs, ctx, proto_converter);
        };
        if !inputs.is_empty() {
            return Err(bad("a child slot with inputs"));
        }
        let mut decoded = self.decoded.lock();
        let (plan, depth) = decoded
            .get_mut(index as usize)
            .and_then(Option::take)
            .ok_or_else(|| {
                bad(format!(
                    "child slot {index} names no unused earlier operator"
                ))
            })?;
        let mut deepest = self.deepest_child.lock();
        *deepest = (*deepest).max(depth);
        Ok(plan)
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> DFResult<()> {
        self.inner.try_encode(node, buf, proto_converter)
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::physical_expr::expressions::lit;
    use datafusion::physical_plan::displayable;
    use datafusion::physical_plan::empty::EmptyExec;
    use datafusion::physical_plan::filter::FilterExec;
    use datafusion::physical_plan::union::UnionExec;
    use datafusion::prelude::SessionContext;

    use super::*;
    use crate::codec::VolleyCodec;

    fn encode(plan: Arc<dyn ExecutionPlan>) -> DFResult<Vec<u8>> {
        super::encode(plan, &VolleyCodec)
    }

    fn decode(bytes: &[u8], ctx: &TaskContext) -> DFResult<Arc<dyn ExecutionPlan>> {
        super::decode(bytes, ctx, Arc::new(VolleyCodec))
    }

    fn deep(levels: usize) -> Arc<dyn ExecutionPlan> {
        let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int32, false)]));
        let mut plan: Arc<dyn ExecutionPlan> = Arc::new(EmptyExec::new(schema));
        for _ in 0..levels {
            plan = Arc::new(FilterExec::try_new(lit(true), plan).unwrap());
        }
        plan
    }

    #[test]
    fn plans_of_any_depth_round_trip() {
        // Nested datafusion-proto plans stop decoding at about 100 protobuf levels.
        let ctx = SessionContext::new();
        for plan in [
            deep(500),
            UnionExec::try_new(vec![deep(3), deep(200), deep(0)]).unwrap(),
        ] {
            let bytes = encode(Arc::clone(&plan)).unwrap();
            let back = decode(&bytes, &ctx.task_ctx()).unwrap();
            assert_eq!(
                displayable(back.as_ref()).indent(true).to_string(),
                displayable(plan.as_ref()).indent(true).to_string()
            );
        }
    }

    #[test]
    fn trees_over_the_depth_limit_are_refused() {
        let ctx = SessionContext::new();
        let bytes = encode(deep(MAX_DEPTH + 5)).unwrap();
        let err = decode(&bytes, &ctx.task_ctx()).unwrap_err().to_string();
        assert!(err.contains("over the limit of 1000"), "{err}");
    }

    #[test]
    fn hostile_slots_are_errors() {
        let ctx = SessionContext::new();
        let good = protobuf::FlatPlan::decode(encode(deep(2)).unwrap().as_slice()).unwrap();
        assert_eq!(good.nodes.len(), 3);
        // A child used twice, a node no one uses, no nodes, the root alone twice.
        let cases = [
            vec![
                good.nodes[0].clone(),
                good.nodes[1].clone(),
                good.nodes[1].clone(),
            ],
            vec![good.nodes[0].clone(), good.nodes[0].clone()],
            vec![],
            vec![good.nodes[1].clone()],
        ];
        for nodes in cases {
            let bytes = protobuf::FlatPlan { nodes }.encode_to_vec();
            let err = decode(&bytes, &ctx.task_ctx()).unwrap_err().to_string();
            assert!(err.contains("cannot decode plan"), "{err}");
        }
    }
}
