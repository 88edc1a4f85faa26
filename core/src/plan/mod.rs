//! Volley's execution plans: the two ends of a shuffle.

mod shuffle_reader;
mod shuffle_writer;

pub use shuffle_reader::ShuffleReaderExec;
pub use shuffle_writer::ShuffleWriterExec;
