//! A DataFusion [`SessionContext`] whose queries run on a Volley cluster.
//!
//! The context plans locally (catalog, DataFrame API, optimizer with Volley's rules) and its
//! query planner wraps the optimized plan in a [`DistributedExec`], which ships the plan to the
//! scheduler and streams the result back from the executors.

use std::fmt;
use std::sync::Arc;

use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::execution::TaskContext;
use datafusion::execution::context::QueryPlanner;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, Partitioning,
    PlanProperties, ReplaceChildrenOptions, SendableRecordBatchStream,
};
use datafusion::physical_planner::{DefaultPhysicalPlanner, PhysicalPlanner};
use datafusion::prelude::SessionContext;
use futures::{StreamExt, TryStreamExt};
use volley_core::codec::VolleyCodec;
use volley_core::config::{config_to_pairs, volley_session_config};
use volley_core::rules::volley_session_state_with;
use volley_core::sandbox::Sandbox;
use volley_core::stores::{StoreCache, StoreScope};

use crate::VolleyClient;

/// Plans with DataFusion, then hands the plan to the cluster.
#[derive(Debug)]
struct VolleyQueryPlanner {
    client: VolleyClient,
}

#[async_trait::async_trait]
impl QueryPlanner for VolleyQueryPlanner {
    async fn create_physical_plan(
        &self,
        logical_plan: &LogicalPlan,
        session: &dyn datafusion::catalog::Session,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        let plan = DefaultPhysicalPlanner::default()
            .create_physical_plan(logical_plan, session)
            .await?;
        let settings = config_to_pairs(session.config());
        Ok(Arc::new(DistributedExec::new(
            plan,
            self.client.clone(),
            settings,
        )))
    }
}

/// Runs its child plan on the Volley cluster; one output partition with the whole result.
#[derive(Debug)]
pub struct DistributedExec {
    plan: Arc<dyn ExecutionPlan>,
    client: VolleyClient,
    settings: Vec<(String, String)>,
    properties: Arc<PlanProperties>,
}

impl DistributedExec {
    fn new(
        plan: Arc<dyn ExecutionPlan>,
        client: VolleyClient,
        settings: Vec<(String, String)>,
    ) -> Self {
        // Partitions are returned one after the other: order survives only from one partition.
        let eq = if plan.output_partitioning().partition_count() == 1 {
            plan.equivalence_properties().clone()
        } else {
            EquivalenceProperties::new(plan.schema())
        };
        let properties = PlanProperties::new(
            eq,
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Self {
            plan,
            client,
            settings,
            properties: Arc::new(properties),
        }
    }
}

impl DisplayAs for DistributedExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "DistributedExec: runs on the Volley cluster")
    }
}

impl ExecutionPlan for DistributedExec {
    fn name(&self) -> &str {
        "DistributedExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.plan]
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
        let [plan]: [Arc<dyn ExecutionPlan>; 1] = children.try_into().map_err(|_| {
            DataFusionError::Internal("DistributedExec takes one child".to_string())
        })?;
        Ok(Arc::new(Self::new(
            plan,
            self.client.clone(),
            self.settings.clone(),
        )))
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
        _context: Arc<TaskContext>,
    ) -> DFResult<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "DistributedExec has one partition, not {partition}"
            )));
        }
        let bytes = VolleyCodec::encode_plan(Arc::clone(&self.plan))?;
        let client = self.client.clone();
        let settings = self.settings.clone();
        let description = format!("DataFrame: {}", first_line(&self.plan));
        let stream = futures::stream::once(async move {
            let job_id = client.submit_plan(bytes, &description, &settings).await?;
            let (_, batches) = client.fetch(job_id).await?;
            Ok::<_, volley_core::VolleyError>(batches)
        })
        .map_ok(|batches| batches.map_err(DataFusionError::from))
        .map_err(DataFusionError::from)
        .try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.plan.schema(),
            stream.boxed(),
        )))
    }
}

fn first_line(plan: &Arc<dyn ExecutionPlan>) -> String {
    datafusion::physical_plan::displayable(plan.as_ref())
        .one_line()
        .to_string()
        .trim()
        .to_string()
}

/// A [`SessionContext`] planning locally and executing on the scheduler at `url`.
pub async fn remote(url: &str) -> crate::Result<SessionContext> {
    remote_with(url, crate::ClientOptions::default()).await
}

/// [`remote`] with credentials: the client token and TLS settings (CA, client certificate)
/// the CLI takes as `--auth-token`, `--tls-ca`, `--tls-cert` / `--tls-key`, e.g.
/// `volley::remote_with(url, ClientOptions::with_token(token))`.
pub async fn remote_with(
    url: &str,
    options: crate::ClientOptions,
) -> crate::Result<SessionContext> {
    let client = VolleyClient::connect_with(url, options).await?;
    Ok(context_for(client))
}

/// A [`SessionContext`] on a new embedded cluster of `executors` executors (one slot per core
/// each). The cluster lives as long as the process; use [`crate::EmbeddedCluster`] to control it.
#[cfg(feature = "embedded")]
pub async fn standalone(executors: usize) -> crate::Result<SessionContext> {
    let slots = std::thread::available_parallelism().map_or(2, |n| n.get());
    let cluster = crate::EmbeddedCluster::start(executors, slots).await?;
    let client = cluster.client().await?;
    // The cluster must outlive every context handed out; it is reclaimed at process exit.
    std::mem::forget(cluster);
    Ok(context_for(client))
}

/// A [`SessionContext`] that runs its queries through `client`. It reaches object stores
/// (`s3://`, `gs://`, ...) as the cluster does, from the standard environment (`AWS_*`, ...);
/// `register_object_store` overrides that per bucket.
pub fn context_for(client: VolleyClient) -> SessionContext {
    let stores = StoreCache::new(Sandbox::unrestricted(true));
    let runtime = RuntimeEnvBuilder::new()
        .with_cache_manager(volley_core::stores::cache_config())
        .with_object_store_registry(Arc::new(StoreScope::new(stores)))
        .build_arc()
        .ok();
    let state = volley_session_state_with(volley_session_config(4), runtime);
    let state = SessionStateBuilder::new_from_existing(state)
        .with_query_planner(Arc::new(VolleyQueryPlanner { client }))
        .build();
    SessionContext::new_with_state(state)
}
