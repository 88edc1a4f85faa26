//! Volley's integration tests: one binary, cases in `cases/`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod cases;
