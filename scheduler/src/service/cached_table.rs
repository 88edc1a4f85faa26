//! The table a `CACHE TABLE` leaves in its session: scans read the cached partitions from the
//! executors holding them ([`CachedScanExec`]) while they are all there, the source — planned
//! again on a fresh listing — reads the same files as they were, and the TTL has not passed;
//! otherwise the source, exactly as without the cache.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::error::Result as DFResult;
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder};
use datafusion::physical_plan::ExecutionPlan;
use parking_lot::Mutex;
use volley_core::plan::CachedScanExec;
use volley_core::shuffle::PartitionLocation;

use crate::cluster::ClusterState;
use crate::job::JobState;
use crate::result_cache::{FileVersion, file_versions};

/// A cached table (see the module doc).
#[derive(Debug)]
pub struct CachedTable {
    /// Its name.
    pub(super) name: String,
    /// Its columns.
    pub(super) schema: SchemaRef,
    /// The job whose result partitions hold its rows.
    pub(super) job_id: String,
    /// That job's result stage.
    pub(super) stage_id: u32,
    /// What computes its rows from the source.
    pub(super) source: LogicalPlan,
    /// The table `CACHE TABLE name` (without a query) stands for.
    pub(super) replaced: Option<Arc<dyn TableProvider>>,
    /// The files its rows were computed from, as they were listed then.
    pub(super) inputs: Vec<FileVersion>,
    /// When it is read from the source again (`OPTIONS ('ttl' ...)`).
    pub(super) expires: Option<Instant>,
    /// The cluster state, to find the partitions and their executors.
    pub(super) cluster: Arc<Mutex<ClusterState>>,
}

impl CachedTable {
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
        // The source as a query would read it now: the files it lists must be those the rows
        // were computed from (same locations, sizes, dates, e-tags).
        volley_core::stores::forget_listings(session.runtime_env());
        let mut source = LogicalPlanBuilder::from(self.source.clone());
        if let Some(columns) = projection {
            source = source.select(columns.iter().copied())?;
        }
        let source = session.create_physical_plan(&source.build()?).await?;
        let fresh = self.expires.is_none_or(|at| Instant::now() < at);
        if !fresh {
            // Past its TTL: the partitions go with the job's next release.
            self.cluster.lock().unpin(&self.job_id);
        }
        let unchanged = file_versions(&source) == self.inputs;
        if fresh
            && unchanged
            && let Some(locations) = self.partitions()
        {
            return Ok(Arc::new(CachedScanExec::try_new(
                self.name.clone(),
                Arc::clone(&self.schema),
                self.stage_id,
                locations,
                projection.cloned(),
            )?));
        }
        tracing::info!(table = %self.name, fresh, unchanged, "cached table read from its source");
        Ok(source)
    }
}
