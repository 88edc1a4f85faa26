//! The executor's liveness traffic on a thread of its own: heartbeats and task status reports.
//! Tasks run CPU-bound DataFusion work on the process's tokio workers; a heartbeat or a report
//! sharing those workers waits behind them, and a saturated executor would look dead to the
//! scheduler (which then throws away its good shuffle output) or finish tasks the scheduler
//! hears of late. This thread runs its own single-threaded runtime and its own connection to
//! the scheduler, so an executor goes silent only when its process really stops (crashed,
//! killed, SIGSTOPped) or its network is gone.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use prost::Message;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tonic::Status;
use volley_core::failover::SchedulerUrls;
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
    /// The schedulers (a leader and its standbys) and the one in use.
    pub schedulers: Arc<SchedulerUrls>,
    /// Token and TLS for the connection.
    pub security: Security,
    /// Largest gRPC message.
    pub max_message_size: usize,
    /// Task statuses to deliver (taken by the thread when it starts).
    pub reports: Option<mpsc::UnboundedReceiver<Report>>,
    /// Called (on the heartbeat thread) when the scheduler does not know this executor.
    pub reregister: Box<dyn Fn() + Send + Sync>,
    /// The executor is shutting down: its reports take no new tasks.
    pub draining: Arc<AtomicBool>,
    /// Runs the tasks handed out in the answer to a status report (called on this thread).
    pub launch: Launch,
}

/// Starts tasks on the executor's runtime.
pub type Launch = Arc<dyn Fn(Vec<pb::TaskDefinition>) + Send + Sync>;

/// A task status to deliver, and who waits for its delivery.
pub type Report = (pb::TaskStatus, oneshot::Sender<()>);

/// Hands task statuses to the heartbeat thread, which delivers them.
#[derive(Clone)]
pub struct Reporter {
    tx: mpsc::UnboundedSender<Report>,
}

impl Reporter {
    /// A reporter and the receiving end for [`Beat::reports`].
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<Report>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, rx)
    }

    /// Deliver `status`; returns once the scheduler has it (or delivery was given up, see
    /// [`deliver`]).
    pub async fn report(&self, status: pb::TaskStatus) {
        let (done, delivered) = oneshot::channel();
        if self.tx.send((status, done)).is_err() {
            tracing::error!("task status not delivered: the heartbeat thread has stopped");
            return;
        }
        let _ = delivered.await;
    }
}

/// Longest an executor keeps trying to deliver one task status.
const REPORT_LIMIT: Duration = Duration::from_secs(600);

/// Backoff before retry `attempt`: 100 ms doubling to 5 s, with up to 50% jitter.
pub fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(100)
        .saturating_mul(1 << attempt.min(6))
        .min(Duration::from_secs(5));
    let jitter_percent = (uuid::Uuid::new_v4().as_u128() % 50) as u32;
    base + base * jitter_percent / 100
}

/// An answer that retrying the same report cannot change.
fn permanent(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::InvalidArgument
            | tonic::Code::Unauthenticated
            | tonic::Code::PermissionDenied
            | tonic::Code::Unimplemented
    )
}

/// Heartbeats in a row a scheduler of several may miss before the executor moves on to the
/// next one.
const MOVE_ON_AFTER: u32 = 3;

/// Statuses delivered in one report at most.
const BATCH: usize = 64;
/// Encoded bytes of the statuses one report gathers at most (a status carrying an inline
/// result goes alone beyond it): a report too big for the scheduler would be retried, not
/// split.
const BATCH_BYTES: usize = 512 * 1024;

/// Where reports go, and what their answers start.
#[derive(Clone)]
struct Delivery {
    clients: Clients,
    id: String,
    secret: Arc<Mutex<String>>,
    draining: Arc<AtomicBool>,
    launch: Launch,
}

impl Delivery {
    /// Deliver task statuses in one report, and start the tasks its answer hands out. A lost
    /// report would leave its job waiting for the tasks, so it is retried (with backoff) until
    /// the scheduler has it; only an answer saying the report itself is wrong, or
    /// [`REPORT_LIMIT`] of trying (by then the scheduler declared this executor lost and re-ran
    /// its tasks), ends the attempts. A report of several statuses refused as wrong is tried
    /// again one status at a time, so that one bad status loses no other.
    async fn deliver(&self, statuses: Vec<pb::TaskStatus>) {
        if !self.send(&statuses).await && statuses.len() > 1 {
            for status in statuses {
                self.send(std::slice::from_ref(&status)).await;
            }
        }
    }

    /// One report, retried; false when it was refused as wrong.
    async fn send(&self, statuses: &[pb::TaskStatus]) -> bool {
        let started = std::time::Instant::now();
        let mut attempt = 0;
        loop {
            let mut client = self.clients.current();
            let secret = self.secret.lock().clone();
            let result = client
                .update_task_status(pb::UpdateTaskStatusParams {
                    statuses: statuses.to_vec(),
                    executor_id: self.id.clone(),
                    secret,
                    take_tasks: !self.draining.load(Ordering::SeqCst),
                })
                .await;
            match result {
                Ok(answer) => {
                    let tasks = answer.into_inner().tasks;
                    if !tasks.is_empty() {
                        (self.launch)(tasks);
                    }
                    return true;
                }
                Err(e) if permanent(&e) || started.elapsed() > REPORT_LIMIT => {
                    tracing::error!(attempt, error = %e, "task status not delivered; giving up");
                    return !permanent(&e);
                }
                Err(e) => {
                    tracing::warn!(attempt, error = %e, "cannot report task status; retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
            }
        }
    }
}

/// Deliver every report on this (the heartbeat) thread's runtime: the statuses waiting
/// together go in one report (up to [`BATCH`]), each report on its own.
async fn deliver_all(mut reports: mpsc::UnboundedReceiver<Report>, delivery: Delivery) {
    // A report that did not fit the last batch starts the next one.
    let mut carried: Option<Report> = None;
    loop {
        let first = match carried.take() {
            Some(report) => report,
            None => match reports.recv().await {
                Some(report) => report,
                None => return,
            },
        };
        let (batch, rest) = next_batch(first, &mut reports);
        carried = rest;
        let delivery = delivery.clone();
        tokio::spawn(async move {
            let (statuses, waiting): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            delivery.deliver(statuses).await;
            for done in waiting {
                let _ = done.send(());
            }
        });
    }
}

/// `first` and the reports waiting behind it, up to [`BATCH`] of them and [`BATCH_BYTES`]
/// encoded (`first` goes even when bigger); the first report that did not fit comes back.
fn next_batch(
    first: Report,
    reports: &mut mpsc::UnboundedReceiver<Report>,
) -> (Vec<Report>, Option<Report>) {
    let mut bytes = first.0.encoded_len();
    let mut batch = vec![first];
    while batch.len() < BATCH {
        match reports.try_recv() {
            Ok(report) if bytes + report.0.encoded_len() <= BATCH_BYTES => {
                bytes += report.0.encoded_len();
                batch.push(report);
            }
            Ok(report) => return (batch, Some(report)),
            Err(_) => break,
        }
    }
    (batch, None)
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

/// A client of each scheduler of the list; calls go to the one in use.
#[derive(Clone)]
struct Clients {
    clients: Vec<SchedulerGrpcClient<AuthChannel>>,
    urls: Arc<SchedulerUrls>,
}

impl Clients {
    /// The client of the scheduler in use.
    fn current(&self) -> SchedulerGrpcClient<AuthChannel> {
        self.clients[self.urls.current() % self.clients.len()].clone()
    }
}

fn client(beat: &Beat) -> Result<Clients> {
    connect(beat, Some(Duration::from_secs(10)))
}

/// Connections to the schedulers; `timeout` bounds each call (none for the attach stream,
/// which is open for as long as the executor runs).
fn connect(beat: &Beat, timeout: Option<Duration>) -> Result<Clients> {
    let mut clients = Vec::new();
    for url in beat.schedulers.urls() {
        let mut endpoint = beat.security.endpoint(url)?;
        if let Some(timeout) = timeout {
            endpoint = endpoint.timeout(timeout);
        }
        let channel = endpoint.connect_lazy();
        clients.push(
            SchedulerGrpcClient::new(beat.security.authed(channel)?)
                .max_decoding_message_size(beat.max_message_size)
                .max_encoding_message_size(beat.max_message_size),
        );
    }
    Ok(Clients {
        clients,
        urls: Arc::clone(&beat.schedulers),
    })
}

async fn run(mut beat: Beat, mut stopped: oneshot::Receiver<()>) {
    let clients = match client(&beat) {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "cannot connect heartbeats to the scheduler");
            return;
        }
    };
    if let Some(reports) = beat.reports.take() {
        let delivery = Delivery {
            clients: clients.clone(),
            id: beat.id.clone(),
            secret: Arc::clone(&beat.secret),
            draining: Arc::clone(&beat.draining),
            launch: Arc::clone(&beat.launch),
        };
        tokio::spawn(deliver_all(reports, delivery));
    }
    match connect(&beat, None) {
        Ok(attach_client) => {
            tokio::spawn(attach(
                attach_client,
                beat.id.clone(),
                Arc::clone(&beat.secret),
                beat.interval,
            ));
        }
        Err(e) => tracing::warn!(error = %e, "cannot attach to the scheduler"),
    }
    let mut tick = tokio::time::interval(beat.interval);
    let mut unreachable = 0u32;
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
        let index = beat.schedulers.current();
        match clients.current().heartbeat(params).await {
            Ok(resp) if resp.get_ref().reregister => {
                unreachable = 0;
                tracing::warn!("scheduler does not know this executor; registering again");
                (beat.reregister)();
            }
            Ok(_) => unreachable = 0,
            Err(e) if e.code() == tonic::Code::Unavailable && beat.schedulers.urls().len() > 1 => {
                // A standby says so at once; a leader that does not answer may only be slow
                // (moving on re-registers elsewhere and stops the running tasks).
                unreachable += 1;
                let standby = volley_core::failover::refused_by_standby(&e);
                if (standby || unreachable >= MOVE_ON_AFTER) && beat.schedulers.advance(index) {
                    unreachable = 0;
                    tracing::warn!(error = %e, scheduler = %beat.schedulers.urls()[index], "scheduler unreachable; trying the next one");
                    (beat.reregister)();
                }
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
    }
}

/// Hold an attach stream open for the current registration: when this process dies, its
/// connection closes and the scheduler knows at once. A new registration (a new secret)
/// attaches again; a failed or ended stream is retried with backoff.
async fn attach(
    clients: Clients,
    executor_id: String,
    secret: Arc<Mutex<String>>,
    check: Duration,
) {
    let mut failures = 0;
    loop {
        let current = secret.lock().clone();
        if !current.is_empty() {
            let params = pb::AttachParams {
                executor_id: executor_id.clone(),
                secret: current.clone(),
            };
            match clients.current().attach(params).await {
                Ok(response) => {
                    failures = 0;
                    let mut stream = response.into_inner();
                    loop {
                        tokio::select! {
                            message = stream.message() => {
                                if !matches!(message, Ok(Some(_))) {
                                    break;
                                }
                            }
                            _ = tokio::time::sleep(check) => {
                                if *secret.lock() != current {
                                    break;
                                }
                            }
                        }
                    }
                }
                Err(e) => {
                    failures += 1;
                    tracing::debug!(error = %e, "cannot attach to the scheduler");
                }
            }
        }
        tokio::time::sleep(backoff(failures).min(check)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A succeeded task's report carrying `inline` bytes of answer.
    fn report(inline: usize) -> Report {
        let status = pb::TaskStatus {
            status: Some(pb::task_status::Status::Succeeded(pb::TaskSucceeded {
                inline_result: vec![0; inline],
                ..Default::default()
            })),
            ..Default::default()
        };
        (status, oneshot::channel().0)
    }

    #[test]
    fn a_batch_stays_under_its_byte_limit_and_the_report_left_out_starts_the_next() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        for size in [100, 300 * 1024, 300 * 1024, 100] {
            tx.send(report(size)).unwrap();
        }
        let first = rx.try_recv().unwrap();
        let (batch, rest) = next_batch(first, &mut rx);
        assert_eq!(batch.len(), 2, "100 B + 300 KiB; the next 300 KiB waits");
        let (batch, rest) = next_batch(rest.expect("the report left out"), &mut rx);
        assert_eq!(batch.len(), 2);
        assert!(rest.is_none());
        // A report over the limit goes, alone.
        tx.send(report(600 * 1024)).unwrap();
        tx.send(report(10)).unwrap();
        let first = rx.try_recv().unwrap();
        let (batch, rest) = next_batch(first, &mut rx);
        assert_eq!(batch.len(), 1);
        assert!(rest.is_some());
        // Small reports: at most BATCH in one.
        for _ in 0..BATCH + 5 {
            tx.send(report(10)).unwrap();
        }
        let first = rx.try_recv().unwrap();
        let (batch, rest) = next_batch(first, &mut rx);
        assert_eq!((batch.len(), rest.is_none()), (BATCH, true));
    }
}
