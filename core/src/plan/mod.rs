//! Volley's execution plans: the two ends of a shuffle, the scan of a cached table, and writing tables from every task
//! (`write`) with one committing task (`commit`), and following a column down to its source
//! (`trace`).

mod cached_scan;
pub mod commit;
mod shuffle_reader;
mod shuffle_writer;
pub mod trace;
pub mod write;

pub use cached_scan::CachedScanExec;
pub use commit::CommitFilesExec;
pub use shuffle_reader::ShuffleReaderExec;
pub use shuffle_writer::ShuffleWriterExec;
pub use write::TaskWriteExec;
