//! The table a `CACHE TABLE` leaves in its session: scans read the cached partitions from the
//! executors holding them ([`CachedScanExec`]) while they are all there, the source files are
//! unchanged and the TTL has not passed; otherwise the source, exactly as without the cache.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::TableType;
use datafusion::datasource::object_store::ObjectStoreUrl;
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::Result as DFResult;
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder};
use datafusion::object_store::{ObjectMeta, ObjectStoreExt};
use datafusion::physical_plan::ExecutionPlan;
use parking_lot::Mutex;
use volley_core::plan::CachedScanExec;
use volley_core::shuffle::PartitionLocation;

use crate::cluster::ClusterState;
use crate::job::JobState;

/// A file the cached rows were computed from, as it was listed then.
pub(super) type InputFile = (ObjectStoreUrl, ObjectMeta);

/// The files `plan` scans.
pub(super) fn input_files(plan: &Arc<dyn ExecutionPlan>) -> Vec<InputFile> {
    let mut files = Vec::new();
    let _ = plan.apply(|node| {
        let scan = node
            .downcast_ref::<DataSourceExec>()
            .and_then(|d| d.data_source().downcast_ref::<FileScanConfig>());
        if let Some(scan) = scan {
            for file in scan.file_groups.iter().flat_map(|g| g.iter()) {
                files.push((scan.object_store_url.clone(), file.object_meta.clone()));
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    files
}

/// A cached table (see the module doc).
#[derive(Debug)]
pub struct CachedTable {
    name: String,
    schema: SchemaRef,
    job_id: String,
    stage_id: u32,
    source: LogicalPlan,
    replaced: Option<Arc<dyn TableProvider>>,
    inputs: Vec<InputFile>,
    expires: Option<Instant>,
    cluster: Arc<Mutex<ClusterState>>,
}

impl CachedTable {
    /// Table `name` whose rows are the result of job `job_id` (result stage `stage_id`),
    /// computed by `source` from `inputs`; `replaced` is the table it stands for.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        name: String,
        schema: SchemaRef,
        job_id: String,
        stage_id: u32,
        source: LogicalPlan,
        replaced: Option<Arc<dyn TableProvider>>,
        inputs: Vec<InputFile>,
        expires: Option<Instant>,
        cluster: Arc<Mutex<ClusterState>>,
    ) -> Self {
        Self {
            name,
            schema,
            job_id,
            stage_id,
            source,
            replaced,
            inputs,
            expires,
            cluster,
        }
    }

    /// The job holding the cached partitions.
    pub(super) fn job_id(&self) -> &str {
        &self.job_id
    }

    /// The table `CACHE TABLE name` (without a query) stood for.
    pub(super) fn replaced(&self) -> Option<Arc<dyn TableProvider>> {
        self.replaced.clone()
    }

    /// The cached partitions, when every one is on a live executor.
    fn partitions(&self) -> Option<Vec<PartitionLocation>> {
        let state = self.cluster.lock();
        let job = state.job(&self.job_id)?;
        if job.state != JobState::Succeeded || !job.pinned {
            return None;
        }
        let locations = job.result_locations();
        let alive = |id: &str| state.executors().get(id).is_some_and(|e| e.alive);
        locations
            .iter()
            .all(|l| alive(&l.executor_id))
            .then_some(locations)
    }

    /// True when every source file is listed as it was when the rows were cached.
    async fn inputs_unchanged(&self, session: &dyn Session) -> bool {
        for (url, meta) in &self.inputs {
            let Ok(store) = session.runtime_env().object_store(url) else {
                return false;
            };
            match store.head(&meta.location).await {
                Ok(now) => {
                    if now.size != meta.size
                        || now.last_modified != meta.last_modified
                        || now.e_tag != meta.e_tag
                    {
                        return false;
                    }
                }
                Err(_) => return false,
            }
        }
        true
    }
}

impl Drop for CachedTable {
    fn drop(&mut self) {
        // Its session or its name went: the partitions go with the job's next release.
        self.cluster.lock().unpin(&self.job_id);
    }
}

#[async_trait]
impl TableProvider for CachedTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        session: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        let fresh = self.expires.is_none_or(|at| Instant::now() < at);
        if fresh
            && let Some(locations) = self.partitions()
            && self.inputs_unchanged(session).await
        {
            return Ok(Arc::new(CachedScanExec::try_new(
                self.name.clone(),
                Arc::clone(&self.schema),
                self.stage_id,
                locations,
                projection.cloned(),
            )?));
        }
        tracing::info!(table = %self.name, fresh, "cached table read from its source");
        let mut source = LogicalPlanBuilder::from(self.source.clone());
        if let Some(columns) = projection {
            source = source.select(columns.iter().copied())?;
        }
        session.create_physical_plan(&source.build()?).await
    }
}
