//! Heartbeats on a thread of their own. Tasks run CPU-bound DataFusion work on the process's
//! tokio workers; a heartbeat sharing those workers waits behind them, and a saturated executor
//! would look dead to the scheduler (which then throws away its good shuffle output). This
//! thread runs its own single-threaded runtime and its own connection to the scheduler, so an
//! executor misses heartbeats only when its process really stops (crashed, killed, SIGSTOPped)
//! or its network is gone.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{Semaphore, oneshot};
use volley_core::protobuf::scheduler_grpc_client::SchedulerGrpcClient;
use volley_core::protobuf::{self as pb};
use volley_core::security::{AuthChannel, Security};
use volley_core::{Result, VolleyError};

/// (job, stage, partition, attempt) of a task attempt.
pub type AttemptKey = (String, u32, u32, u32);

/// What a heartbeat reports, shared with the executor.
pub struct Beat {
    /// Executor id.
    pub id: String,
    /// Secret of the current registration.
    pub secret: Arc<Mutex<String>>,
    /// Attempts the executor holds.
    pub attempts: Arc<Mutex<HashSet<AttemptKey>>>,
    /// Free task slots.
    pub slots: Arc<Semaphore>,
    /// Task slots in all.
    pub total_slots: u32,
    /// Period.
    pub interval: Duration,
    /// Scheduler URL, and how to reach it.
    pub scheduler_url: String,
    /// Token and TLS for the connection.
    pub security: Security,
    /// Largest gRPC message.
    pub max_message_size: usize,
    /// Called (on the heartbeat thread) when the scheduler does not know this executor.
    pub reregister: Box<dyn Fn() + Send + Sync>,
}

/// The running heartbeat thread; [`Heartbeat::stop`] ends it.
pub struct Heartbeat {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeat {
    /// Start beating on a new thread.
    pub fn start(beat: Beat) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stop, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("volley-heartbeat".to_string())
            .spawn(move || runtime.block_on(run(beat, stopped)))
            .map_err(|e| {
                VolleyError::Internal(format!("cannot start the heartbeat thread: {e}"))
            })?;
        Ok(Heartbeat {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stop beating and wait for the thread to end.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn client(beat: &Beat) -> Result<SchedulerGrpcClient<AuthChannel>> {
    let channel = beat
        .security
        .endpoint(&beat.scheduler_url)?
        .timeout(Duration::from_secs(10))
        .connect_lazy();
    Ok(SchedulerGrpcClient::new(beat.security.authed(channel)?)
        .max_decoding_message_size(beat.max_message_size)
        .max_encoding_message_size(beat.max_message_size))
}

async fn run(beat: Beat, mut stopped: oneshot::Receiver<()>) {
    let mut client = match client(&beat) {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "cannot connect heartbeats to the scheduler");
            return;
        }
    };
    let mut tick = tokio::time::interval(beat.interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stopped => return,
        }
        let free = u32::try_from(beat.slots.available_permits()).unwrap_or(0);
        let attempts: Vec<pb::TaskId> = beat
            .attempts
            .lock()
            .iter()
            .map(|(job_id, stage_id, partition, attempt)| pb::TaskId {
                job_id: job_id.clone(),
                stage_id: *stage_id,
                partition: *partition,
                attempt: *attempt,
            })
            .collect();
        let params = pb::HeartbeatParams {
            executor_id: beat.id.clone(),
            secret: beat.secret.lock().clone(),
            free_slots: free,
            running_tasks: beat.total_slots.saturating_sub(free),
            attempts,
        };
        match client.heartbeat(params).await {
            Ok(resp) if resp.get_ref().reregister => {
                tracing::warn!("scheduler does not know this executor; registering again");
                (beat.reregister)();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
    }
}
