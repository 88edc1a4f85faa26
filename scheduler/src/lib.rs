//! Volley scheduler: plans SQL with DataFusion, cuts the physical plan into stages, tracks
//! jobs, stages, tasks and executors, and launches tasks on executors over gRPC.

pub mod adaptive;
pub mod metrics;
pub mod planner;
pub mod rules;
pub mod scan_balance;
pub mod server;
pub mod service;
pub mod state;
pub mod views;
pub mod web;

pub use server::{SchedulerConfig, SchedulerHandle, start_scheduler};
