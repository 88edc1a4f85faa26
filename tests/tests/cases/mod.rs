mod cli;
mod dataframe;
mod errors;
mod faults;
mod lifecycle;
mod slt;
mod tpch;
