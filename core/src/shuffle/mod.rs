//! Shuffle data: where partitions live, how they are written and read.

mod fetch;
mod location;
mod memory;
mod writer;

pub use fetch::{FlightChannels, LocalReads, read_chunk, read_local_file, read_partition_location};
pub use location::{EXECUTOR_MARKER, PartitionLocation, written_here};
pub use memory::{MemoryShuffle, decode_stream};
pub use writer::{MemoryBudget, ShuffleFileWriter, WrittenPartition, ipc_bytes};

/// `app_metadata` of Flight messages that carry raw bytes of a shuffle file (an Arrow IPC
/// stream), served by executors and decoded incrementally by readers.
pub const IPC_CHUNK_MARKER: &[u8] = b"volley-ipc-stream-chunk";
