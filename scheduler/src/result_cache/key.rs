//! What makes two queries the same for the result cache, and what their answer depends on.
//!
//! - [`uncacheable`]: statements whose answer may change with nothing else changing are
//!   never cached: not a query (DDL, DML, `COPY`, `EXPLAIN`), a function that is not
//!   immutable (`now()`, `random()`, `uuid()`, `current_date`), a table that is not files
//!   (in-memory tables, system tables, table functions).
//! - [`QueryKey`]: the optimized physical plan (every operator's description and the file
//!   pieces each scan reads), the settings that change results, and the caller's principal,
//!   hashed (SHA-256); and the input files as the planner listed them just now (location,
//!   size, last-modified, e-tag, version).

use std::fmt::Write;
use std::sync::Arc;

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::listing::ListingTable;
use datafusion::datasource::physical_plan::{CsvSource, FileScanConfig, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::source_as_provider;
use datafusion::logical_expr::{Expr, LogicalPlan, Volatility};
use datafusion::object_store::ObjectMeta;
use datafusion::physical_plan::{ExecutionPlan, displayable};

/// Settings (by key or key prefix) that only change how a query runs, not what it returns
/// (partition counts, batch sizes, optimizer choices, Volley's execution knobs); every other
/// setting (time zone, SQL parser and ANSI options, Parquet type options, ...) is part of the
/// key.
const EXECUTION_SETTINGS: [&str; 11] = [
    "volley.",
    "datafusion.optimizer.",
    "datafusion.explain.",
    "datafusion.runtime.",
    "datafusion.format.",
    "datafusion.execution.target_partitions",
    "datafusion.execution.batch_size",
    "datafusion.execution.planning_concurrency",
    "datafusion.execution.meta_fetch_concurrency",
    "datafusion.execution.enable_file_stream_work_stealing",
    "datafusion.execution.skip_partial_aggregation_probe_",
];

/// One input file as listed: what a change of its contents changes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FileVersion {
    /// Location in its object store (`file:///...`, `s3://bucket/...`).
    pub location: String,
    /// Bytes.
    pub size: u64,
    /// Last modified, nanoseconds since the Unix epoch.
    pub modified_ns: i64,
    /// The store's e-tag, if it has one.
    pub e_tag: Option<String>,
    /// The store's object version, if it has one.
    pub version: Option<String>,
}

impl FileVersion {
    /// The version of file `meta` of `scan`, as listed.
    fn of(scan: &FileScanConfig, meta: &ObjectMeta) -> Self {
        FileVersion {
            location: format!("{}{}", scan.object_store_url.as_str(), meta.location),
            size: meta.size,
            modified_ns: meta
                .last_modified
                .timestamp_nanos_opt()
                .unwrap_or_else(|| meta.last_modified.timestamp_micros()),
            e_tag: meta.e_tag.clone(),
            version: meta.version.clone(),
        }
    }
}

/// The versions of the files `plan` scans, sorted by location, without repeats.
pub fn file_versions(plan: &Arc<dyn ExecutionPlan>) -> Vec<FileVersion> {
    let mut versions = Vec::new();
    let _ = plan.apply(|node| {
        if let Some(scan) = file_scan(node) {
            for file in scan.file_groups.iter().flat_map(|g| g.iter()) {
                versions.push(FileVersion::of(scan, &file.object_meta));
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    versions.sort_by(|a, b| a.location.cmp(&b.location));
    versions.dedup();
    versions
}

fn file_scan(node: &Arc<dyn ExecutionPlan>) -> Option<&FileScanConfig> {
    node.downcast_ref::<DataSourceExec>()
        .and_then(|d| d.data_source().downcast_ref::<FileScanConfig>())
}

/// The cache identity of one planned query.
#[derive(Debug, Clone)]
pub struct QueryKey {
    /// Hash of the plan, result settings and principal.
    pub key: String,
    /// The input files, sorted by location.
    pub inputs: Vec<FileVersion>,
    /// Hash of [`Self::inputs`].
    pub inputs_hash: String,
}

/// Whether the result cache may answer a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheUse {
    /// A query over tables of files with immutable functions only.
    Allowed,
    /// Never cached, for this reason.
    Never(String),
}

impl CacheUse {
    /// Whether the answer to `logical` may be cached.
    pub fn of(logical: &LogicalPlan) -> Self {
        match uncacheable(logical) {
            None => CacheUse::Allowed,
            Some(reason) => CacheUse::Never(reason),
        }
    }
}

/// Why the answer to `logical` must not be cached (None: it may be).
pub fn uncacheable(logical: &LogicalPlan) -> Option<String> {
    match logical {
        LogicalPlan::Dml(_)
        | LogicalPlan::Copy(_)
        | LogicalPlan::Ddl(_)
        | LogicalPlan::Statement(_)
        | LogicalPlan::Explain(_)
        | LogicalPlan::Analyze(_)
        | LogicalPlan::DescribeTable(_) => return Some("the statement is not a query".into()),
        _ => {}
    }
    let mut reason = None;
    let _ = logical.apply_with_subqueries(|node| {
        reason = node_reason(node);
        Ok(if reason.is_some() {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    });
    reason
}

fn node_reason(node: &LogicalPlan) -> Option<String> {
    if let LogicalPlan::TableScan(scan) = node {
        let provider = source_as_provider(&scan.source).ok()?;
        if provider.downcast_ref::<ListingTable>().is_some() {
            return None;
        }
        // A view: what it reads decides.
        if let Some(plan) = provider.get_logical_plan() {
            return uncacheable(plan.as_ref());
        }
        return Some(format!(
            "it reads {}, which is not a table of files",
            scan.table_name
        ));
    }
    let mut reason = None;
    let _ = node.apply_expressions(|expr| {
        expr.apply(|e| {
            if let Expr::ScalarFunction(f) = e
                && f.func.signature().volatility != Volatility::Immutable
            {
                reason = Some(format!(
                    "it calls {}(), whose answer can change between runs",
                    f.func.name()
                ));
                return Ok(TreeNodeRecursion::Stop);
            }
            Ok(TreeNodeRecursion::Continue)
        })
    });
    reason
}

/// The key of `plan` run with `settings` for `principal`, and its inputs.
pub fn query_key(
    plan: &Arc<dyn ExecutionPlan>,
    settings: &[(String, String)],
    principal: &str,
) -> QueryKey {
    let mut text = String::from("volley result cache v1\n");
    let _ = writeln!(text, "principal {principal}");
    let mut relevant: Vec<&(String, String)> = settings
        .iter()
        .filter(|(k, _)| !EXECUTION_SETTINGS.iter().any(|p| k.starts_with(p)))
        .collect();
    relevant.sort();
    for (k, v) in relevant {
        let _ = writeln!(text, "set {k}={v}");
    }
    for field in plan.schema().fields() {
        let _ = writeln!(
            text,
            "column {}: {} {}",
            field.name(),
            field.data_type(),
            field.is_nullable()
        );
    }
    describe(plan, 0, &mut text);
    let inputs = file_versions(plan);
    let mut listed = String::new();
    for f in &inputs {
        let _ = writeln!(
            listed,
            "{} {} {} {:?} {:?}",
            f.location, f.size, f.modified_ns, f.e_tag, f.version
        );
    }
    QueryKey {
        key: sha256(&text),
        inputs_hash: sha256(&listed),
        inputs,
    }
}

/// Each operator's description and each scan's file pieces (locations and byte ranges) into
/// `text`, pre-order with depths.
fn describe(plan: &Arc<dyn ExecutionPlan>, depth: usize, text: &mut String) {
    let _ = writeln!(
        text,
        "{depth} {}",
        displayable(plan.as_ref()).one_line().to_string().trim_end()
    );
    if let Some(scan) = file_scan(plan) {
        // The display leaves out format options (a CSV delimiter) and the file schema.
        let _ = writeln!(text, "store {}", scan.object_store_url.as_str());
        let _ = write!(text, "file schema");
        for field in scan.file_schema().fields() {
            let _ = write!(
                text,
                " {}:{}:{}",
                field.name(),
                field.data_type(),
                field.is_nullable()
            );
        }
        let _ = writeln!(text);
        let source = scan.file_source();
        let options = match (
            source.downcast_ref::<CsvSource>(),
            source.downcast_ref::<ParquetSource>(),
        ) {
            (Some(csv), _) => format!("{csv:?}"),
            // Its predicate and projection are in the display; its options are not.
            (_, Some(parquet)) => format!("{:?}", parquet.table_parquet_options()),
            // JSON and Arrow: their format and compression are all they have.
            _ => String::new(),
        };
        let _ = writeln!(
            text,
            "source {} {:?} {options}",
            source.file_type(),
            scan.file_compression_type
        );
        for (group, files) in scan.file_groups.iter().enumerate() {
            for file in files.iter() {
                let meta = &file.object_meta;
                let range = file.range.as_ref().map(|r| (r.start, r.end));
                let _ = writeln!(text, "file {group} {} {range:?}", meta.location);
            }
        }
    }
    for child in plan.children() {
        describe(child, depth + 1, text);
    }
}

pub(super) fn sha256(text: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    digest.as_ref().iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}
