//! Volley scheduler: plans SQL with DataFusion, cuts the physical plan into stages, tracks
//! jobs, stages, tasks and executors, and launches tasks on executors over gRPC.
//!
//! Layers, each importing only from the ones below it (see `README.md` next to `src/`):
//! L0 [`config`], [`fmt`] · L1 [`graph`] · L2 [`job`] · L3 [`adaptive`] · L4 [`cluster`] ·
//! L5 [`explain`], [`views`], [`metrics`], [`store`] (keeps views' job summaries), [`result_cache`] · L6 [`service`] · L7 [`web`], [`flight_sql`] · L8 [`server`], [`standby`].

pub mod adaptive;
pub mod cluster;
pub mod config;
pub mod explain;
pub mod flight_sql;
pub mod fmt;
pub mod graph;
pub mod job;
pub mod metrics;
pub mod result_cache;
pub mod server;
pub mod service;
pub mod standby;
pub mod store;
pub mod views;
pub mod web;

pub use config::{LoadBalancing, SchedulerConfig, SchedulerPolicy};
pub use server::{SchedulerHandle, start_scheduler};
