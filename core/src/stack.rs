//! Plan work on threads with a deep stack.
//!
//! DataFusion plans, optimizes and prints expressions recursively: a statement with a few
//! thousand `OR` terms overflows a 2 MiB tokio worker stack and aborts the whole process.
//! Statements are therefore planned on a thread of its own whose stack
//! ([`PLANNING_STACK_BYTES`], reserved address space, touched only as deep as a plan goes)
//! runs a current-thread runtime; a panic there becomes an error instead of a dead process.

use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;

use crate::{Result, VolleyError};

/// Stack of a planning thread.
pub const PLANNING_STACK_BYTES: usize = 512 * 1024 * 1024;

/// Stack of the worker threads of Volley's own runtimes (the `volley` binary), where plans
/// are encoded, decoded and executed.
pub const WORKER_STACK_BYTES: usize = 64 * 1024 * 1024;

/// Run `make()`'s future to completion on a new thread with a [`PLANNING_STACK_BYTES`]
/// stack. Tasks it spawns must finish before it does (its runtime ends with it).
pub async fn on_deep_stack<F, Fut, T>(what: &str, make: F) -> Result<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let label = what.to_string();
    std::thread::Builder::new()
        .name(format!("volley-{label}"))
        .stack_size(PLANNING_STACK_BYTES)
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = tx.send(Err(VolleyError::Internal(format!("{label}: {e}"))));
                    return;
                }
            };
            let outcome = runtime.block_on(AssertUnwindSafe(make()).catch_unwind());
            let result = outcome.unwrap_or_else(|panic| {
                Err(VolleyError::Internal(format!(
                    "{label} panicked: {}",
                    panic_message(panic.as_ref())
                )))
            });
            let _ = tx.send(result);
        })
        .map_err(|e| VolleyError::Internal(format!("cannot start a {what} thread: {e}")))?;
    rx.await
        .map_err(|_| VolleyError::Internal(format!("{what} thread ended without an answer")))?
}

/// The text of a panic payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth(n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            // Keep a frame of real size per level.
            let pad = std::hint::black_box([n; 64]);
            1 + depth(n - 1) + pad[63].saturating_sub(n)
        }
    }

    #[tokio::test]
    async fn deep_recursion_and_panics_become_results() {
        let deep = on_deep_stack("test", || async { Ok(depth(200_000)) })
            .await
            .unwrap();
        assert_eq!(deep, 200_000);
        let err = on_deep_stack::<_, _, ()>("test", || async { panic!("boom") })
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("test panicked: boom"), "{err}");
    }
}
