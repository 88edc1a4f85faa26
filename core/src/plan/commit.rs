//! Committing a table write: [`CommitFilesExec`] is the result stage's single task. It reads
//! the rows of the [`super::write::TaskWriteExec`] attempts the scheduler kept — exactly one per
//! partition — moves their files into place (dropping the temporary extension), removes the
//! job's temporary prefix (every attempt's leftovers) and answers the total row count, as
//! DataFusion's sink does. Its first attempt records the kept attempts in a manifest
//! (`_commit`) under the temporary prefix: a commit that fails half-way or whose report is lost
//! runs again on exactly that list, finds the moved files gone and moves the rest, even if the
//! writing tasks ran again meanwhile. The scheduler deletes the temporary prefix, manifest
//! included, when the job ends.

use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::{Array, RecordBatch, StringArray, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::listing::ListingTableUrl;
use datafusion::datasource::physical_plan::FileSinkConfig;
use datafusion::datasource::sink::DataSink;
use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::execution::TaskContext;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, PlanProperties,
    SendableRecordBatchStream,
};
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;

use super::write::{
    TEMPORARY_EXTENSION, file_sink_config, only_child, properties, sink_with, target_paths, url_of,
    writes_single_file,
};

/// Moves the kept attempts' files into place, removes the temporary prefix, answers the count.
#[derive(Debug)]
pub struct CommitFilesExec {
    job_id: String,
    input: Arc<dyn ExecutionPlan>,
    config: FileSinkConfig,
    sink: Arc<dyn DataSink>,
    properties: Arc<PlanProperties>,
}

impl CommitFilesExec {
    /// Commit what the [`TaskWriteExec`] partitions of `input` wrote through `sink`.
    pub fn try_new(
        job_id: String,
        input: Arc<dyn ExecutionPlan>,
        sink: &dyn DataSink,
    ) -> DFResult<Self> {
        let config = file_sink_config(sink)
            .ok_or_else(|| DataFusionError::Internal("not a file sink".to_string()))?
            .clone();
        let schema = Arc::new(Schema::new(vec![Field::new(
            "count",
            DataType::UInt64,
            false,
        )]));
        Ok(Self {
            job_id,
            input,
            sink: sink_with(sink, config.clone())?,
            config,
            properties: properties(schema, 1),
        })
    }

    /// The job whose temporary prefix it removes.
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// URL of the job's temporary prefix, which a failed or cancelled job leaves to delete.
    pub fn temporary_url(&self) -> DFResult<String> {
        let (_, temporary) = target_paths(&self.config, &self.job_id)?;
        Ok(url_of(&self.config, &temporary, true))
    }

    /// The sink whose target it commits to (for encoding).
    pub fn sink(&self) -> &Arc<dyn DataSink> {
        &self.sink
    }

    async fn commit(
        job_id: String,
        input: Arc<dyn ExecutionPlan>,
        config: FileSinkConfig,
        context: Arc<TaskContext>,
    ) -> DFResult<RecordBatch> {
        let store = context
            .runtime_env()
            .object_store(&config.object_store_url)?;
        let (folder, temporary) = target_paths(&config, &job_id)?;
        // The first commit attempt records what it commits; a later one (its report was lost)
        // commits exactly that, not the output of write tasks that ran again since.
        let manifest = temporary.clone().join(MANIFEST);
        let kept = match store.get(&manifest).await {
            Ok(found) => parse_manifest(&found.bytes().await?)?,
            Err(object_store::Error::NotFound { .. }) => {
                let kept = kept_attempts(&input, &context).await?;
                store.put(&manifest, render_manifest(&kept).into()).await?;
                kept
            }
            Err(e) => return Err(e.into()),
        };
        let single = writes_single_file(&config);
        let suffix = format!(".{TEMPORARY_EXTENSION}");
        for (_, dir) in &kept {
            let prefix = ListingTableUrl::parse(dir)?.prefix().clone();
            // Only this job's attempt prefixes: a row naming anything else is not committed.
            if prefix.prefix_match(&temporary).is_none() || prefix == temporary {
                return Err(DataFusionError::Internal(format!(
                    "commit of job {job_id}: {dir} is not one of its attempts' prefixes"
                )));
            }
            let files: Vec<_> = store.list(Some(&prefix)).try_collect().await?;
            for file in files {
                let relative: Vec<_> = file
                    .location
                    .prefix_match(&prefix)
                    .into_iter()
                    .flatten()
                    .collect();
                let name = file.location.filename().unwrap_or_default();
                let Some(final_name) = name.strip_suffix(&suffix) else {
                    continue;
                };
                let target = if single {
                    config
                        .table_paths
                        .first()
                        .map(|u| u.prefix().clone())
                        .unwrap_or_default()
                } else {
                    let mut target = folder.clone();
                    for part in &relative[..relative.len().saturating_sub(1)] {
                        target = target.join(part.as_ref());
                    }
                    target.join(final_name)
                };
                store.rename(&file.location, &target).await?;
            }
        }
        // Every attempt's leftovers go; the manifest stays until the job is released.
        let leftovers = store
            .list(Some(&temporary))
            .try_filter(move |meta| {
                futures::future::ready(meta.location.filename() != Some(MANIFEST))
            })
            .map_ok(|meta| meta.location)
            .boxed();
        store
            .delete_stream(leftovers)
            .try_collect::<Vec<_>>()
            .await?;
        let total: u64 = kept.iter().map(|(count, _)| count).sum();
        Ok(RecordBatch::try_from_iter(vec![(
            "count",
            Arc::new(UInt64Array::from(vec![total])) as Arc<dyn Array>,
        )])?)
    }
}

/// Name of the commit manifest in a job's temporary prefix.
const MANIFEST: &str = "_commit";

/// `(rows, attempt prefix)` of every kept writing attempt, from the commit's input.
async fn kept_attempts(
    input: &Arc<dyn ExecutionPlan>,
    context: &Arc<TaskContext>,
) -> DFResult<Vec<(u64, String)>> {
    let mut kept = Vec::new();
    for partition in 0..input.output_partitioning().partition_count() {
        let batches: Vec<RecordBatch> = input
            .execute(partition, Arc::clone(context))?
            .try_collect()
            .await?;
        for batch in batches {
            let columns = batch.columns();
            let counts = columns
                .first()
                .and_then(|c| c.as_any().downcast_ref::<UInt64Array>());
            let dirs = columns
                .get(1)
                .and_then(|c| c.as_any().downcast_ref::<StringArray>());
            let (Some(counts), Some(dirs)) = (counts, dirs) else {
                return Err(DataFusionError::Internal(
                    "a commit's input is not (count, temporary) rows".to_string(),
                ));
            };
            for row in 0..batch.num_rows() {
                kept.push((counts.value(row), dirs.value(row).to_string()));
            }
        }
    }
    Ok(kept)
}

fn render_manifest(kept: &[(u64, String)]) -> String {
    kept.iter()
        .map(|(count, dir)| format!("{count}\t{dir}\n"))
        .collect()
}

fn parse_manifest(bytes: &[u8]) -> DFResult<Vec<(u64, String)>> {
    let bad = || DataFusionError::Internal("unreadable commit manifest".to_string());
    std::str::from_utf8(bytes)
        .map_err(|_| bad())?
        .lines()
        .filter(|l| !l.is_empty())
        .map(|line| {
            let (count, dir) = line.split_once('\t').ok_or_else(bad)?;
            Ok((count.parse().map_err(|_| bad())?, dir.to_string()))
        })
        .collect()
}

impl DisplayAs for CommitFilesExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let target = self.config.table_paths.first().map_or("?", |u| u.as_str());
        write!(f, "CommitFilesExec: target={target}")
    }
}

impl ExecutionPlan for CommitFilesExec {
    fn name(&self) -> &str {
        "CommitFilesExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
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
        let input = only_child(children, "CommitFilesExec")?;
        Ok(Arc::new(Self::try_new(
            self.job_id.clone(),
            input,
            self.sink.as_ref(),
        )?))
    }

    fn execute(
        &self,
        _partition: usize,
        context: Arc<TaskContext>,
    ) -> DFResult<SendableRecordBatchStream> {
        let future = Self::commit(
            self.job_id.clone(),
            Arc::clone(&self.input),
            self.config.clone(),
            context,
        );
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema(),
            futures::stream::once(future),
        )))
    }
}
