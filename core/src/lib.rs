//! Volley core: errors, identifiers, configuration, the physical plan codec and the shuffle
//! execution plans shared by the scheduler and the executors.

pub mod codec;
pub mod config;
pub mod duration;
pub mod error;
pub mod failover;
pub mod flat;
pub mod functions;
pub mod grant;
pub mod ids;
pub mod plan;
pub mod rules;
pub mod sandbox;
pub mod sandbox_store;
pub mod security;
pub mod shuffle;
pub mod stack;
pub mod stores;
pub mod telemetry;

pub use error::{Result, VolleyError};

/// Generated protobuf types, re-exported for the crates that convert at their edges.
pub use volley_proto::protobuf;
