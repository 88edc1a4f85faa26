//! Volley executor: registers with the scheduler, runs tasks with DataFusion, writes shuffle
//! files and serves them over Arrow Flight.

mod config;
mod flight;
mod heartbeat;
mod runner;
mod runtime_filters;
pub mod server;
mod work_dir;

pub use server::{ExecutorConfig, ExecutorHandle, start_executor};
