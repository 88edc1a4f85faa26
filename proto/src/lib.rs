//! Volley's wire protocol: generated protobuf messages and tonic services.
//!
//! Generated code stays in this crate; scheduler and executor convert at their edges.

#![allow(clippy::all, missing_docs)]

/// Messages and services of `proto/volley.proto`.
pub mod protobuf {
    tonic::include_proto!("volley");
}
