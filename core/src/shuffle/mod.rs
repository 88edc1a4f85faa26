//! Shuffle data: where partitions live, how they are written and read.

mod fetch;
mod location;
mod writer;

pub use fetch::{FlightChannels, read_local_file, read_partition_location};
pub use location::PartitionLocation;
pub use writer::{ShuffleFileWriter, WrittenPartition};
