//! Table writes from every task: a plan whose root is DataFusion's file sink (`COPY ... TO`,
//! `INSERT INTO` a listing table) becomes `CommitFilesExec(TaskWriteExec(input))`: each task
//! writes its own partition under an attempt-private prefix, and the result task commits the
//! kept attempts' files (see [`volley_core::plan::write`]). The cutter gives the commit a stage
//! of its own.

use std::sync::Arc;

use datafusion::datasource::sink::DataSinkExec;
use datafusion::error::Result;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use volley_core::plan::write::{file_sink_config, splits_writes, writes_single_file};
use volley_core::plan::{CommitFilesExec, TaskWriteExec};

/// `plan` with its file sink split across tasks; other plans unchanged.
pub fn split_writes(job_id: &str, plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
    let Some(sink) = plan.downcast_ref::<DataSinkExec>() else {
        return Ok(plan);
    };
    let Some(config) = file_sink_config(sink.sink()).filter(|_| splits_writes(sink.sink())) else {
        return Ok(plan);
    };
    let input = Arc::clone(sink.input());
    // One file at an exact path, or rows in one global order: a single writing task.
    let single = writes_single_file(config) || sink.sort_order().is_some();
    let input = match input.downcast_ref::<CoalescePartitionsExec>() {
        Some(coalesce) if !single => Arc::clone(coalesce.input()),
        _ => input,
    };
    let write = Arc::new(TaskWriteExec::try_new(
        job_id.to_string(),
        input,
        sink.sink(),
        sink.sort_order().clone(),
    )?);
    Ok(Arc::new(CommitFilesExec::try_new(
        job_id.to_string(),
        write,
        sink.sink(),
    )?))
}
