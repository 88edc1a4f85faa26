//! Volley client: submit SQL to a Volley cluster and stream the result, or start an embedded
//! cluster (scheduler + executors in this process, over the same gRPC paths as a real one).

mod client;
mod context;
mod embedded;

pub use client::{ClientOptions, VolleyClient, split_statements};
pub use context::{DistributedExec, context_for, remote, standalone};
pub use embedded::EmbeddedCluster;
pub use volley_core::{Result, VolleyError};
