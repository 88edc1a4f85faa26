mod cli;
mod errors;
mod faults;
mod lifecycle;
mod slt;
mod tpch;
