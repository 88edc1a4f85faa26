//! Volley's error type.

use datafusion::arrow::error::ArrowError;
use datafusion::error::DataFusionError;

/// Result with [`VolleyError`].
pub type Result<T, E = VolleyError> = std::result::Result<T, E>;

/// Everything that can go wrong inside Volley.
#[derive(Debug, thiserror::Error)]
pub enum VolleyError {
    /// Planning or execution error raised by DataFusion (bad SQL, unknown table, ...).
    #[error("{0}")]
    DataFusion(#[from] DataFusionError),
    /// Arrow error (IPC, casting).
    #[error("Arrow error: {0}")]
    Arrow(#[from] ArrowError),
    /// A gRPC call returned an error.
    #[error("RPC error: {}", .0.message())]
    Grpc(#[from] tonic::Status),
    /// Could not connect a gRPC channel.
    #[error("cannot connect to {address}: {message}")]
    Connect {
        /// Address that was dialed.
        address: String,
        /// Why it failed.
        message: String,
    },
    /// IO error on a shuffle file or work dir.
    #[error("IO error: {0}")]
    Io(#[from] std::io::Error),
    /// A shuffle input could not be fetched: the scheduler re-runs the map task.
    #[error(
        "failed to fetch shuffle output of stage {stage_id} map partition {map_partition} from executor {executor_id}: {message}"
    )]
    FetchFailed {
        /// Executor that held the data.
        executor_id: String,
        /// Producer stage.
        stage_id: u32,
        /// Producer task's partition.
        map_partition: u32,
        /// Underlying error.
        message: String,
    },
    /// A protocol message was malformed.
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    /// A job failed.
    #[error("{0}")]
    JobFailed(String),
    /// A setting or command-line option is wrong.
    #[error("configuration error: {0}")]
    Config(String),
    /// The request is not allowed (file sandbox, disabled DDL, oversized message).
    #[error("not allowed: {0}")]
    NotAllowed(String),
    /// Anything that breaks an internal invariant.
    #[error("internal error: {0}")]
    Internal(String),
}

/// `text` cut to at most `max` bytes at a character boundary, with `note(cut_bytes)` appended
/// when anything was cut (error messages and statement texts kept for display).
pub fn cut_text(text: String, max: usize, note: impl Fn(usize) -> String) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{}", &text[..end], note(text.len() - end))
}

impl VolleyError {
    /// Find a typed fetch failure inside a DataFusion error chain.
    pub fn find_fetch_failure(err: &DataFusionError) -> Option<(&str, u32, u32)> {
        let mut current: &(dyn std::error::Error + 'static) = err;
        loop {
            if let Some(VolleyError::FetchFailed {
                executor_id,
                stage_id,
                map_partition,
                ..
            }) = current.downcast_ref::<VolleyError>()
            {
                return Some((executor_id.as_str(), *stage_id, *map_partition));
            }
            if let Some(DataFusionError::External(inner)) =
                current.downcast_ref::<DataFusionError>()
            {
                current = inner.as_ref();
                continue;
            }
            if let Some(DataFusionError::Context(_, inner)) =
                current.downcast_ref::<DataFusionError>()
            {
                current = inner.as_ref();
                continue;
            }
            if let Some(DataFusionError::Shared(inner)) = current.downcast_ref::<DataFusionError>()
            {
                current = inner.as_ref();
                continue;
            }
            match current.source() {
                Some(next) => current = next,
                None => return None,
            }
        }
    }
}

impl From<VolleyError> for DataFusionError {
    fn from(e: VolleyError) -> Self {
        match e {
            VolleyError::DataFusion(e) => e,
            other => DataFusionError::External(Box::new(other)),
        }
    }
}

impl From<VolleyError> for tonic::Status {
    fn from(e: VolleyError) -> Self {
        match &e {
            VolleyError::DataFusion(df) => match df.find_root() {
                // "table 'x' not found", "file not found": what is named does not exist.
                DataFusionError::Plan(message) if message.contains("not found") => {
                    tonic::Status::not_found(e.to_string())
                }
                DataFusionError::Plan(_)
                | DataFusionError::SQL(..)
                | DataFusionError::SchemaError(..)
                | DataFusionError::NotImplemented(_)
                | DataFusionError::Configuration(_) => {
                    tonic::Status::invalid_argument(e.to_string())
                }
                _ => tonic::Status::internal(e.to_string()),
            },
            VolleyError::Grpc(status) => status.clone(),
            VolleyError::InvalidMessage(_) | VolleyError::Config(_) => {
                tonic::Status::invalid_argument(e.to_string())
            }
            VolleyError::NotAllowed(_) => tonic::Status::permission_denied(e.to_string()),
            VolleyError::Connect { .. } => tonic::Status::unavailable(e.to_string()),
            _ => tonic::Status::internal(e.to_string()),
        }
    }
}
