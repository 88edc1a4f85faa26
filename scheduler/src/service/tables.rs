//! `CREATE TABLE ... AS SELECT` on the cluster: the query runs as a job on the executors
//! (cancellable, under their memory pools and sandbox), then its rows come back into a table
//! kept in scheduler memory. Such a table is bounded twice: by half the message size (its
//! scans ship it inside their tasks) and by the scheduler's memory pool, which holds a
//! reservation for every table until it is dropped or its session ends.

use std::collections::HashSet;
use std::io::Cursor;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{Constraints, DataFusionError, Statistics};
use datafusion::datasource::{MemTable, TableType};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::logical_expr::dml::InsertOp;
use datafusion::logical_expr::{CreateMemoryTable, Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;
use futures::StreamExt;
use volley_core::shuffle::read_partition_location;
use volley_core::{Result, VolleyError};

use crate::job::JobState;
use crate::service::SchedulerService;
use volley_core::shuffle::ipc_bytes;

/// True when `create` should run its query on the cluster: DataFusion would run it (the
/// table is new, or replaced). Otherwise (IF NOT EXISTS of an existing table, and every
/// error case) DataFusion answers at once without running anything.
pub(super) fn runs_on_cluster(ctx: &SessionContext, create: &CreateMemoryTable) -> Result<bool> {
    if create.temporary {
        return Ok(false);
    }
    let mut names = HashSet::new();
    if !create
        .input
        .schema()
        .fields()
        .iter()
        .all(|f| names.insert(f.name()))
    {
        return Ok(false);
    }
    let exists = ctx.table_exist(create.name.clone())?;
    Ok(match (create.if_not_exists, create.or_replace, exists) {
        (_, _, false) | (false, true, true) => true,
        (true, _, true) | (false, false, true) => false,
    })
}

/// Where the rows of a finished query are.
enum Rows {
    /// Computed on the scheduler: an Arrow IPC stream.
    Inline(Vec<u8>),
    /// Result files of the final stage on the executors.
    Files(Vec<volley_core::shuffle::PartitionLocation>, u32),
}

impl SchedulerService {
    /// Wait for the query job `inner` of `CREATE TABLE AS` (the waiting job `outer`), then
    /// keep its rows as the table and end `outer`.
    pub(super) async fn finish_create_table(
        &self,
        outer: &str,
        inner: &str,
        create: CreateMemoryTable,
        ctx: SessionContext,
    ) {
        if !self.wait_inner(outer, inner).await {
            return;
        }
        let result = self.create_table(outer, inner, &create, &ctx).await;
        self.release(inner).await;
        let result = result.and_then(|()| ipc_bytes(&Arc::new(Schema::empty()), &[]));
        self.state
            .lock()
            .finish_waiting_job(outer, result.map_err(|e| e.to_string()));
    }

    async fn create_table(
        &self,
        outer: &str,
        inner: &str,
        create: &CreateMemoryTable,
        ctx: &SessionContext,
    ) -> Result<()> {
        let name = &create.name;
        let rows = {
            let state = self.state.lock();
            let job = state
                .job(inner)
                .ok_or_else(|| VolleyError::Internal(format!("the query of {name} is gone")))?;
            match &job.state {
                JobState::Succeeded => {}
                JobState::Failed(message) => return Err(VolleyError::JobFailed(message.clone())),
                other => {
                    return Err(VolleyError::JobFailed(format!(
                        "the query of {name} was {}",
                        other.as_str()
                    )));
                }
            }
            match &job.inline_result {
                Some(bytes) => Rows::Inline(bytes.clone()),
                None => Rows::Files(job.result_locations(), job.final_stage),
            }
        };
        let limit = self.config.max_message_size / 2;
        let too_big = || {
            VolleyError::NotAllowed(format!(
                "CREATE TABLE {name} AS: the result is over {}, the most a table kept in \
                 scheduler memory may hold (half of --max-message-size: its scans ship it \
                 inside their tasks); write bigger results to files with COPY ... TO, or \
                 CREATE EXTERNAL TABLE and INSERT INTO it",
                crate::fmt::bytes(limit as u64)
            ))
        };
        let pool = &ctx.runtime_env().memory_pool;
        let reservation = MemoryConsumer::new(format!("table {name}")).register(pool);
        let mut kept = Kept {
            reservation,
            bytes: 0,
            limit,
        };
        let mut partitions = Vec::new();
        match rows {
            Rows::Inline(bytes) => {
                let reader = StreamReader::try_new(Cursor::new(bytes), None)?;
                let mut partition = Vec::new();
                for batch in reader {
                    partition.push(kept.keep(batch?).map_err(|e| e.or(too_big()))?);
                }
                partitions.push(partition);
            }
            Rows::Files(locations, stage_id) => {
                let ipc: u64 = locations.iter().map(|l| l.num_bytes).sum();
                if usize::try_from(ipc).unwrap_or(usize::MAX) > limit {
                    return Err(too_big());
                }
                let security = self.config.security.clone();
                for location in locations {
                    let mut stream =
                        read_partition_location(location, None, stage_id, security.clone());
                    let mut partition = Vec::new();
                    while let Some(batch) = stream.next().await {
                        partition.push(kept.keep(batch?).map_err(|e| e.or(too_big()))?);
                    }
                    partitions.push(partition);
                }
            }
        }
        let schema = Arc::clone(create.input.schema().inner());
        let table = MemTable::try_new(schema, partitions)?
            .with_constraints(create.constraints.clone())
            .with_column_defaults(create.column_defaults.iter().cloned().collect());
        // A statement cancelled meanwhile creates nothing.
        if self
            .state
            .lock()
            .job(outer)
            .is_none_or(|j| j.state.is_final())
        {
            return Err(VolleyError::JobFailed(format!(
                "CREATE TABLE {name} was cancelled"
            )));
        }
        // Another statement of the session may have created the name in the meantime.
        if ctx.table_exist(name.clone())? {
            if create.or_replace {
                ctx.deregister_table(name.clone())?;
            } else if create.if_not_exists {
                return Ok(());
            } else {
                return Err(VolleyError::DataFusion(DataFusionError::Execution(
                    format!("Table '{name}' already exists"),
                )));
            }
        }
        let table = PooledTable {
            table,
            _reservation: kept.reservation,
        };
        ctx.register_table(name.clone(), Arc::new(table))?;
        super::cached::catalog_changed(ctx);
        Ok(())
    }
}

/// Batches kept so far and what they hold of the scheduler's memory pool.
struct Kept {
    reservation: MemoryReservation,
    bytes: usize,
    limit: usize,
}

/// Why a batch could not be kept: over the table limit (`None`: the caller names it) or
/// the memory pool is full.
struct Refused(Option<VolleyError>);

impl Refused {
    fn or(self, too_big: VolleyError) -> VolleyError {
        self.0.unwrap_or(too_big)
    }
}

impl Kept {
    fn keep(&mut self, batch: RecordBatch) -> std::result::Result<RecordBatch, Refused> {
        // The batch's own data: batches decoded from Flight are slices of shared chunks, whose
        // whole capacity `get_array_memory_size` would count once per column.
        let size = batch
            .columns()
            .iter()
            .map(|c| {
                c.to_data()
                    .get_slice_memory_size()
                    .unwrap_or_else(|_| c.get_array_memory_size())
            })
            .sum::<usize>();
        self.bytes = self.bytes.saturating_add(size);
        if self.bytes > self.limit {
            return Err(Refused(None));
        }
        self.reservation.try_grow(size).map_err(|e| {
            Refused(Some(VolleyError::NotAllowed(format!(
                "no room in the scheduler's memory (--memory-limit) for another table kept \
                 in memory: {e}"
            ))))
        })?;
        Ok(batch)
    }
}

/// A [`MemTable`] that holds its share of the scheduler's memory pool while it exists.
#[derive(Debug)]
struct PooledTable {
    table: MemTable,
    _reservation: MemoryReservation,
}

#[async_trait]
impl TableProvider for PooledTable {
    fn schema(&self) -> SchemaRef {
        self.table.schema()
    }

    fn constraints(&self) -> Option<&Constraints> {
        self.table.constraints()
    }

    fn table_type(&self) -> TableType {
        self.table.table_type()
    }

    fn get_column_default(&self, column: &str) -> Option<&Expr> {
        self.table.get_column_default(column)
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        self.table.scan(state, projection, filters, limit).await
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::common::Result<Vec<TableProviderFilterPushDown>> {
        self.table.supports_filters_pushdown(filters)
    }

    fn statistics(&self) -> Option<Statistics> {
        self.table.statistics()
    }

    async fn insert_into(
        &self,
        _state: &dyn Session,
        _input: Arc<dyn ExecutionPlan>,
        _insert_op: InsertOp,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        // Rows inserted here would grow scheduler memory past the table's reservation.
        datafusion::common::not_impl_err!(
            "INSERT INTO a table made by CREATE TABLE AS: it lives in scheduler memory; \
             recreate it with CREATE OR REPLACE TABLE ... AS, or use an external table"
        )
    }
}
