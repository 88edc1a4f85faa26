mod errors;
mod slt;
mod tpch;
