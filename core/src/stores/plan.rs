//! Which object stores a physical plan touches: the stores of its file scans and file sinks,
//! as registry keys (`s3://bucket`), so that a job ships only those stores' options.

use std::sync::Arc;

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::sink::DataSinkExec;
use datafusion::datasource::source::DataSourceExec;
use datafusion::physical_plan::ExecutionPlan;

use super::options::store_key;
use crate::plan::write::file_sink_config;

/// Store keys of every scan and sink in `plan`, sorted, without repeats.
pub fn plan_stores(plan: &Arc<dyn ExecutionPlan>) -> Vec<String> {
    let mut urls: Vec<String> = Vec::new();
    let _ = plan.apply(|node| {
        if let Some(source) = node.downcast_ref::<DataSourceExec>()
            && let Some(scan) = source.data_source().downcast_ref::<FileScanConfig>()
        {
            urls.push(scan.object_store_url.as_str().to_string());
        }
        if let Some(sink) = node.downcast_ref::<DataSinkExec>()
            && let Some(config) = file_sink_config(sink.sink())
        {
            urls.push(config.object_store_url.as_str().to_string());
        }
        Ok(TreeNodeRecursion::Continue)
    });
    let mut keys: Vec<String> = urls
        .iter()
        .filter_map(|u| url::Url::parse(u).ok())
        .map(|u| store_key(&u))
        .collect();
    keys.sort();
    keys.dedup();
    keys
}
