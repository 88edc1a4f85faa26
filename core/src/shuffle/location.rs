//! A shuffle partition file's location.

use crate::protobuf;

/// File in an executor's work dir naming the executor: a reader that finds a shuffle file's
/// work dir marked with the producer's id shares its file system (host names prove nothing).
pub const EXECUTOR_MARKER: &str = ".executor-id";

/// Levels from a shuffle file up to its executor's work dir
/// (`<work dir>/<job>/<stage>/<partition-attempt>/<file>`).
const FILE_DEPTH: usize = 4;

/// True when this process sees `location`'s file in the work dir of the executor that wrote
/// it: the marker there holds that executor's id.
pub fn written_here(location: &PartitionLocation) -> bool {
    std::path::Path::new(&location.path)
        .ancestors()
        .nth(FILE_DEPTH)
        .and_then(|dir| std::fs::read_to_string(dir.join(EXECUTOR_MARKER)).ok())
        .is_some_and(|id| id.trim() == location.executor_id && !id.trim().is_empty())
}

/// One shuffle file written by one map task for one output partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLocation {
    /// Executor holding the file.
    pub executor_id: String,
    /// Host of that executor's Flight service.
    pub host: String,
    /// Port of that executor's Flight service.
    pub flight_port: u16,
    /// Path of the file on the executor.
    pub path: String,
    /// Map task (input partition) that wrote the file.
    pub map_partition: u32,
    /// Output bucket.
    pub output_partition: u32,
    /// Rows in the file.
    pub num_rows: u64,
    /// Bytes of the file.
    pub num_bytes: u64,
    /// The scheduler's grant for a client to read this result file (empty between stages).
    pub grant: String,
    /// Held in the producer's memory, not in a file: read from its store or over Flight.
    pub in_memory: bool,
}

impl From<&PartitionLocation> for protobuf::PartitionLocation {
    fn from(l: &PartitionLocation) -> Self {
        protobuf::PartitionLocation {
            executor_id: l.executor_id.clone(),
            host: l.host.clone(),
            flight_port: u32::from(l.flight_port),
            path: l.path.clone(),
            map_partition: l.map_partition,
            output_partition: l.output_partition,
            num_rows: l.num_rows,
            num_bytes: l.num_bytes,
            grant: l.grant.clone(),
            in_memory: l.in_memory,
        }
    }
}

impl TryFrom<&protobuf::PartitionLocation> for PartitionLocation {
    type Error = crate::VolleyError;

    fn try_from(l: &protobuf::PartitionLocation) -> crate::Result<Self> {
        let flight_port = u16::try_from(l.flight_port).map_err(|_| {
            crate::VolleyError::InvalidMessage(format!(
                "flight port {} out of range",
                l.flight_port
            ))
        })?;
        Ok(PartitionLocation {
            executor_id: l.executor_id.clone(),
            host: l.host.clone(),
            flight_port,
            path: l.path.clone(),
            map_partition: l.map_partition,
            output_partition: l.output_partition,
            num_rows: l.num_rows,
            num_bytes: l.num_bytes,
            grant: l.grant.clone(),
            in_memory: l.in_memory,
        })
    }
}
