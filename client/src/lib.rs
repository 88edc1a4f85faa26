//! Volley client: submit SQL to a Volley cluster and stream the result, or start an embedded
//! cluster (scheduler + executors in this process, over the same gRPC paths as a real one).

mod client;
mod context;
#[cfg(feature = "embedded")]
mod embedded;
mod statements;

pub use client::{ClientOptions, VolleyClient};
#[cfg(feature = "embedded")]
pub use context::standalone;
pub use context::{DistributedExec, context_for, remote, remote_with};
#[cfg(feature = "embedded")]
pub use embedded::EmbeddedCluster;
pub use statements::{ends_statement, split_statements, split_statements_in};
pub use volley_core::{Result, VolleyError};
