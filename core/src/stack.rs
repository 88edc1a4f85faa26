//! Plan work on threads with a deep stack.
//!
//! DataFusion plans, optimizes and prints expressions recursively: a statement with a few
//! thousand `OR` terms overflows a 2 MiB tokio worker stack and aborts the whole process.
//! Statements are therefore planned on threads of their own whose stack
//! ([`PLANNING_STACK_BYTES`], reserved address space, touched only as deep as a plan goes)
//! drives the planning future (in the caller's runtime); a panic there becomes an error
//! instead of a dead process.
//! A planning thread serves one statement at a time and waits, idle, for the next one for up
//! to a minute, so concurrent statements get threads of their own and a busy scheduler does
//! not start a thread per statement.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use parking_lot::Mutex;

use crate::{Result, VolleyError};

/// Stack of a planning thread.
pub const PLANNING_STACK_BYTES: usize = 512 * 1024 * 1024;

/// Stack of the worker threads of Volley's own runtimes (the `volley` binary), where plans
/// are encoded, decoded and executed.
pub const WORKER_STACK_BYTES: usize = 64 * 1024 * 1024;

/// How long an idle planning thread waits for more work before it ends.
const IDLE: Duration = Duration::from_secs(60);

/// A planning thread ends after the statement that finds it this old: the stack pages a very
/// deep statement touched stay resident only while their thread lives.
const MAX_AGE: Duration = Duration::from_secs(600);

/// Work for a planning thread; what it returns delivers the answer once the thread is idle
/// again (a caller's next statement then finds it).
type Job = Box<dyn FnOnce() -> Box<dyn FnOnce() + Send> + Send>;

/// Planning threads waiting for work, each by the sender of its queue. A thread stays after
/// its statement (up to [`IDLE`]): a new thread cost ~0.2 ms per statement, and a fresh thread
/// plans ~1 ms slower still (its allocator caches start empty).
static IDLE_THREADS: Mutex<Vec<(u64, mpsc::Sender<Job>)>> = Mutex::new(Vec::new());

/// Run `make()`'s future to completion on a thread with a [`PLANNING_STACK_BYTES`] stack (an
/// idle one, or a new one). The future runs on that thread but in the caller's runtime: what
/// it spawns (a connection's background task, say) runs and stays on the caller's workers.
pub async fn on_deep_stack<F, Fut, T>(what: &str, make: F) -> Result<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
    T: Send + 'static,
{
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|e| VolleyError::Internal(format!("{what} outside a runtime: {e}")))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let label = what.to_string();
    let job: Job = Box::new(move || {
        let outcome = runtime.block_on(AssertUnwindSafe(make()).catch_unwind());
        let result = outcome.unwrap_or_else(|panic| {
            Err(VolleyError::Internal(format!(
                "{label} panicked: {}",
                panic_message(panic.as_ref())
            )))
        });
        Box::new(move || {
            let _ = tx.send(result);
        })
    });
    let idle = IDLE_THREADS.lock().pop();
    let job = match idle {
        Some((_, sender)) => match sender.send(job) {
            Ok(()) => None,
            // The thread ended meanwhile: start another.
            Err(mpsc::SendError(job)) => Some(job),
        },
        None => Some(job),
    };
    if let Some(job) = job {
        start_thread(job)
            .map_err(|e| VolleyError::Internal(format!("cannot start a {what} thread: {e}")))?;
    }
    rx.await
        .map_err(|_| VolleyError::Internal(format!("{what} thread ended without an answer")))?
}

/// A new planning thread running `first`, then whatever comes while it is idle.
fn start_thread(first: Job) -> std::io::Result<()> {
    static NEXT_ID: AtomicU64 = AtomicU64::new(0);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    std::thread::Builder::new()
        .name("volley-planner".to_string())
        .stack_size(PLANNING_STACK_BYTES)
        .spawn(move || {
            let born = Instant::now();
            let (sender, queue) = mpsc::channel::<Job>();
            let mut next = Some(first);
            while let Some(job) = next.take() {
                let deliver = job();
                if born.elapsed() > MAX_AGE {
                    deliver();
                    break;
                }
                IDLE_THREADS.lock().push((id, sender.clone()));
                deliver();
                next = next_job(id, &queue);
            }
        })?;
    Ok(())
}

/// The next statement for idle thread `id`, or None once it left the idle list unused.
fn next_job(id: u64, queue: &mpsc::Receiver<Job>) -> Option<Job> {
    loop {
        if let Ok(job) = queue.recv_timeout(IDLE) {
            return Some(job);
        }
        let mut idle = IDLE_THREADS.lock();
        if let Some(at) = idle.iter().position(|(other, _)| *other == id) {
            idle.remove(at);
            return None;
        }
        // A caller took this thread from the list: its statement is on the way.
    }
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
    use std::sync::Arc;

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

    #[tokio::test]
    async fn threads_are_reused_and_concurrent_statements_get_their_own() {
        let thread = || on_deep_stack("test", || async { Ok(std::thread::current().id()) });
        let first = thread().await.unwrap();
        // Only a planning thread that stayed (after a panic, too) answers with the same id.
        let _ = on_deep_stack::<_, _, ()>("test", || async { panic!("boom") }).await;
        assert_eq!(thread().await.unwrap(), first);
        // Each waits for the other: on one thread both would wait forever.
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let meet = |barrier: Arc<std::sync::Barrier>| {
            on_deep_stack("test", move || async move {
                barrier.wait();
                Ok(std::thread::current().id())
            })
        };
        let (a, b) = tokio::join!(meet(Arc::clone(&barrier)), meet(barrier));
        assert_ne!(a.unwrap(), b.unwrap());
    }
}
