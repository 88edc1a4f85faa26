//! A connection to a scheduler with its own session.

use std::io::Cursor;
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::ipc::reader::StreamReader;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use volley_core::failover::{SchedulerUrls, leader_named, refused_by_standby};
use volley_core::protobuf::scheduler_grpc_client::SchedulerGrpcClient;
use volley_core::protobuf::{self as pb, job_status};
use volley_core::security::{AuthChannel, Security};
use volley_core::shuffle::{LocalReads, PartitionLocation, read_partition_location};
use volley_core::{Result, VolleyError};

/// A client session on a Volley scheduler (the leader among several, when given a list).
#[derive(Clone, Debug)]
pub struct VolleyClient {
    scheduler: Arc<Mutex<SchedulerGrpcClient<AuthChannel>>>,
    schedulers: Arc<Schedulers>,
    session_id: String,
    security: Security,
    max_message_size: usize,
}

/// The schedulers a client may talk to (standbys sharing state in etcd serve nothing until
/// they lead) and the one it talks to now.
#[derive(Debug)]
struct Schedulers {
    urls: SchedulerUrls,
    options: ClientOptions,
}

/// A gRPC client of the scheduler at `url`, connected now.
async fn connect_one(
    url: &str,
    options: &ClientOptions,
) -> Result<SchedulerGrpcClient<AuthChannel>> {
    let security = &options.security;
    let channel = security
        .endpoint(url)?
        .timeout(options.rpc_timeout)
        .connect()
        .await
        .map_err(|e| VolleyError::Connect {
            address: url.to_string(),
            message: format!("scheduler unreachable: {}", error_chain(&e)),
        })?;
    Ok(SchedulerGrpcClient::new(security.authed(channel)?)
        .max_decoding_message_size(options.max_message_size)
        .max_encoding_message_size(options.max_message_size))
}

/// How a client connects: token, TLS and message size limit.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Token and TLS.
    pub security: Security,
    /// Largest gRPC message sent or accepted.
    pub max_message_size: usize,
    /// Deadline of every call to the scheduler: a scheduler that stops answering is an error,
    /// not a hang. Waits for a job are made of short calls, so long queries are not cut.
    pub rpc_timeout: std::time::Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            security: Security::none(),
            max_message_size: 64 * 1024 * 1024,
            rpc_timeout: std::time::Duration::from_secs(120),
        }
    }
}

impl ClientOptions {
    /// Default options with this auth token.
    pub fn with_token(token: impl Into<String>) -> Self {
        Self {
            security: Security::none().with_token(Some(token.into())),
            ..Self::default()
        }
    }
}

/// Releases a job's result files when dropped before its stream ended.
struct ReleaseOnDrop {
    client: Option<VolleyClient>,
    job_id: String,
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if let Some(client) = self.client.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let job_id = std::mem::take(&mut self.job_id);
            runtime.spawn(async move { client.release(&job_id).await });
        }
    }
}

/// How long a client waiting for a job keeps asking a scheduler it cannot reach.
pub const RECONNECT_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Pause before asking an unreachable scheduler again: 100 ms doubling to 2 s, with jitter.
fn reconnect_backoff(attempt: u32) -> std::time::Duration {
    let base = std::time::Duration::from_millis(100)
        .saturating_mul(1 << attempt.min(5))
        .min(std::time::Duration::from_secs(2));
    let jitter = (uuid::Uuid::new_v4().as_u128() % 50) as u32;
    base + base * jitter / 100
}

/// True when a call never reached the scheduler (no connection could be made): sending it
/// again cannot run it twice.
fn never_sent(status: &tonic::Status) -> bool {
    if status.code() != tonic::Code::Unavailable {
        return false;
    }
    let mut text = status.message().to_ascii_lowercase();
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        text.push_str(&cause.to_string().to_ascii_lowercase());
        source = cause.source();
    }
    // A failed connect only: "connection reset" or "closed" may come after the call arrived.
    text.contains("tcp connect error")
        || text.contains("error trying to connect")
        || text.contains("connection refused")
        || refused_by_standby(status)
}

/// Asking an unreachable scheduler again: backoff with jitter, for up to [`RECONNECT_LIMIT`].
#[derive(Default)]
struct Reconnect {
    since: Option<std::time::Instant>,
    attempt: u32,
}

impl Reconnect {
    /// Wait before the next try; an error naming `what` once the limit is reached.
    async fn pause(&mut self, what: &str, status: &tonic::Status) -> Result<()> {
        let since = *self.since.get_or_insert_with(std::time::Instant::now);
        if since.elapsed() > RECONNECT_LIMIT {
            return Err(VolleyError::Internal(format!(
                "the scheduler was unreachable for {} s {what}: {}",
                RECONNECT_LIMIT.as_secs(),
                status.message()
            )));
        }
        tokio::time::sleep(reconnect_backoff(self.attempt)).await;
        self.attempt += 1;
        Ok(())
    }

    /// The scheduler answered.
    fn reached(&mut self) {
        *self = Self::default();
    }
}

fn status_error(status: tonic::Status) -> VolleyError {
    let message = status.message();
    if message.contains("message length too large") {
        return VolleyError::NotAllowed(format!(
            "{message}: the request or response is over the gRPC message size limit; raise --max-message-size (default 64 MiB) on the scheduler and the client"
        ));
    }
    match status.code() {
        tonic::Code::InvalidArgument | tonic::Code::NotFound | tonic::Code::Internal => {
            VolleyError::JobFailed(status.message().to_string())
        }
        _ => VolleyError::Grpc(status),
    }
}

impl VolleyClient {
    /// Connect to the scheduler at `url` (`http://host:port`) and open a session.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, ClientOptions::default()).await
    }

    /// Connect with a token, TLS and message limits. `url` may list several schedulers
    /// (comma-separated, e.g. a leader and its standbys): the first that answers is used, and
    /// when it becomes unreachable the client moves on to one of the others.
    pub async fn connect_with(url: &str, options: ClientOptions) -> Result<Self> {
        let urls = SchedulerUrls::parse(url)?;
        let list = urls.urls().to_vec();
        let mut last = VolleyError::Config(format!("no scheduler URL in {url:?}"));
        for (index, url) in list.iter().enumerate() {
            let mut scheduler = match connect_one(url, &options).await {
                Ok(scheduler) => scheduler,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            let session_id = match scheduler
                .create_session(pb::CreateSessionParams { settings: vec![] })
                .await
            {
                Ok(answer) => answer.into_inner().session_id,
                // A standby: try the others.
                Err(e) if refused_by_standby(&e) => {
                    last = status_error(e);
                    continue;
                }
                Err(e) => return Err(status_error(e)),
            };
            return Ok(Self {
                scheduler: Arc::new(Mutex::new(scheduler)),
                schedulers: {
                    urls.set_current(index);
                    Arc::new(Schedulers {
                        urls,
                        options: options.clone(),
                    })
                },
                session_id,
                security: options.security,
                max_message_size: options.max_message_size,
            });
        }
        Err(last)
    }

    /// The gRPC client of the scheduler in use.
    fn grpc(&self) -> SchedulerGrpcClient<AuthChannel> {
        match self.scheduler.lock() {
            Ok(client) => client.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The scheduler in use cannot be reached or is a standby: use the leader it named
    /// (`hint`), or the next of the others that can be reached (the session lives on in the
    /// shared state). Nothing changes with one URL.
    async fn fail_over(&self, hint: Option<&str>) {
        let urls = &self.schedulers.urls;
        let count = urls.urls().len();
        if count < 2 {
            return;
        }
        let current = urls.current();
        let hinted = hint.and_then(|h| urls.index_of(h));
        let order = hinted
            .into_iter()
            .chain((1..=count).map(|offset| (current + offset) % count));
        for index in order {
            if let Ok(client) = connect_one(&urls.urls()[index], &self.schedulers.options).await {
                match self.scheduler.lock() {
                    Ok(mut slot) => *slot = client,
                    Err(poisoned) => *poisoned.into_inner() = client,
                }
                urls.set_current(index);
                return;
            }
        }
    }

    /// The largest message this client sends or accepts.
    pub fn max_message_size(&self) -> usize {
        self.max_message_size
    }

    /// The raw gRPC client, for cluster inspection.
    pub fn scheduler(&self) -> SchedulerGrpcClient<AuthChannel> {
        self.grpc()
    }

    fn check_size(&self, what: &str, bytes: usize) -> Result<()> {
        if bytes + 1024 > self.max_message_size {
            return Err(VolleyError::NotAllowed(format!(
                "{what} is {bytes} bytes, over the gRPC message size limit of {} bytes: raise --max-message-size (scheduler and client)",
                self.max_message_size
            )));
        }
        Ok(())
    }

    /// Submit one statement; returns its job id. A scheduler that cannot be connected to
    /// (restarting) is asked again with backoff for up to [`RECONNECT_LIMIT`] (a statement
    /// is sent again only when it never reached the scheduler).
    pub async fn submit(&self, sql: &str) -> Result<String> {
        self.check_size("the SQL text", sql.len())?;
        let mut scheduler = self.grpc();
        let mut reconnect = Reconnect::default();
        loop {
            let answer = scheduler
                .execute_sql(pb::ExecuteSqlParams {
                    session_id: self.session_id.clone(),
                    sql: sql.to_string(),
                })
                .await;
            match answer {
                Ok(answer) => return Ok(answer.into_inner().job_id),
                Err(e) if never_sent(&e) => {
                    reconnect
                        .pause("while a statement was submitted", &e)
                        .await?;
                    self.fail_over(leader_named(&e)).await;
                    scheduler = self.grpc();
                }
                Err(e) => return Err(status_error(e)),
            }
        }
    }

    /// Submit a physical plan (encoded with the Volley codec); returns its job id.
    pub async fn submit_plan(
        &self,
        plan: Vec<u8>,
        description: &str,
        settings: &[(String, String)],
    ) -> Result<String> {
        self.check_size("the plan", plan.len())?;
        let mut scheduler = self.grpc();
        Ok(scheduler
            .execute_plan(pb::ExecutePlanParams {
                session_id: self.session_id.clone(),
                plan,
                description: description.to_string(),
                settings: settings
                    .iter()
                    .map(|(key, value)| pb::KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                    })
                    .collect(),
            })
            .await
            .map_err(status_error)?
            .into_inner()
            .job_id)
    }

    /// A job's current status (progress counters included).
    pub async fn status(&self, job_id: &str) -> Result<pb::JobStatus> {
        let mut scheduler = self.grpc();
        Ok(scheduler
            .get_job_status(pb::GetJobStatusParams {
                job_id: job_id.to_string(),
                wait_ms: 0,
                session_id: self.session_id.clone(),
                release_inline: false,
            })
            .await
            .map_err(status_error)?
            .into_inner())
    }

    /// Wait for a job to end; returns its final status. A scheduler that cannot be reached
    /// (restarting) is asked again with backoff for up to [`RECONNECT_LIMIT`]: one started on
    /// its state again resumes the job.
    pub async fn wait(&self, job_id: &str) -> Result<pb::CompletedJob> {
        self.wait_for(job_id, false).await
    }

    /// [`Self::wait`]; with `release_inline`, a result that comes inline in the answer is
    /// released with it (the caller reads it from there).
    async fn wait_for(&self, job_id: &str, release_inline: bool) -> Result<pb::CompletedJob> {
        let mut scheduler = self.grpc();
        let mut reconnect = Reconnect::default();
        loop {
            let answer = scheduler
                .get_job_status(pb::GetJobStatusParams {
                    job_id: job_id.to_string(),
                    wait_ms: 1000,
                    session_id: self.session_id.clone(),
                    release_inline,
                })
                .await;
            let status = match answer {
                Ok(answer) => answer.into_inner(),
                Err(e) if e.code() == tonic::Code::Unavailable => {
                    reconnect
                        .pause(&format!("while job {job_id} ran"), &e)
                        .await?;
                    self.fail_over(leader_named(&e)).await;
                    scheduler = self.grpc();
                    continue;
                }
                Err(e) => return Err(status_error(e)),
            };
            reconnect.reached();
            match status.status {
                Some(job_status::Status::Completed(done)) => return Ok(done),
                Some(job_status::Status::Failed(message)) => {
                    return Err(VolleyError::JobFailed(message));
                }
                Some(job_status::Status::Cancelled(_)) => {
                    return Err(VolleyError::JobFailed(format!(
                        "job {job_id} was cancelled"
                    )));
                }
                Some(job_status::Status::Running(_)) | None => {}
            }
        }
    }

    /// Cancel a job.
    pub async fn cancel(&self, job_id: &str) -> Result<bool> {
        let mut scheduler = self.grpc();
        Ok(scheduler
            .cancel_job(pb::CancelJobParams {
                job_id: job_id.to_string(),
                session_id: self.session_id.clone(),
            })
            .await
            .map_err(status_error)?
            .into_inner()
            .cancelled)
    }

    /// Run one statement and stream its result; the job's files are released at the end.
    pub async fn execute(
        &self,
        sql: &str,
    ) -> Result<(SchemaRef, BoxStream<'static, Result<RecordBatch>>)> {
        let job_id = self.submit(sql).await?;
        self.fetch(job_id).await
    }

    /// Wait for a submitted job and stream its result; its files are released at the end.
    pub async fn fetch(
        &self,
        job_id: String,
    ) -> Result<(SchemaRef, BoxStream<'static, Result<RecordBatch>>)> {
        // An inline result is released by the answer that carries it.
        let done = self.wait_for(&job_id, true).await?;
        let schema = StreamReader::try_new(Cursor::new(done.schema), None)?.schema();
        if !done.inline_result.is_empty() {
            let released = volley_core::config::released_with_answer(done.inline_result.len());
            let reader = StreamReader::try_new(Cursor::new(done.inline_result), None)?;
            let batches: Vec<Result<RecordBatch>> =
                reader.map(|b| b.map_err(VolleyError::from)).collect();
            if !released {
                // Not released with the answer (see `GetJobStatusParams.release_inline`).
                self.release(&job_id).await;
            }
            return Ok((schema, futures::stream::iter(batches).boxed()));
        }
        let locations = done
            .locations
            .iter()
            .map(PartitionLocation::try_from)
            .collect::<Result<Vec<_>>>()?;
        let security = self.security.clone();
        let data = futures::stream::iter(locations)
            .map(move |location| {
                // An executor on a loopback address runs on this machine: read its result
                // files from disk when they are there.
                let local =
                    volley_core::security::is_loopback_host(&location.host).then(|| LocalReads {
                        executor_id: String::new(),
                        host: location.host.clone(),
                        memory: None,
                    });
                read_partition_location(location, local, 0, security.clone())
            })
            .flatten()
            .map_err(VolleyError::from);
        // Released at the end of the stream, or when it is dropped before (a reader that
        // stopped midway), instead of the files waiting for the result TTL.
        let mut guard = ReleaseOnDrop {
            client: Some(self.clone()),
            job_id,
        };
        let release = futures::stream::once(async move {
            if let Some(client) = guard.client.take() {
                client.release(&guard.job_id).await;
            }
            None
        })
        .filter_map(|x: Option<Result<RecordBatch>>| async move { x });
        Ok((schema, data.chain(release).boxed()))
    }

    /// Wait for a submitted job and collect its result.
    pub async fn sql_job_rows(&self, job_id: &str) -> Result<Vec<RecordBatch>> {
        let (_, stream) = self.fetch(job_id.to_string()).await?;
        stream.try_collect().await
    }

    /// Run one statement and collect its result.
    pub async fn sql(&self, sql: &str) -> Result<(SchemaRef, Vec<RecordBatch>)> {
        let (schema, stream) = self.execute(sql).await?;
        let batches = stream.try_collect().await?;
        Ok((schema, batches))
    }

    async fn release(&self, job_id: &str) {
        let mut scheduler = self.grpc();
        if let Err(e) = scheduler
            .release_job(pb::ReleaseJobParams {
                job_id: job_id.to_string(),
                session_id: self.session_id.clone(),
            })
            .await
        {
            tracing::warn!(job_id, error = %e, "cannot release job");
        }
    }

    /// Executors, and jobs with their stages and tasks, as the scheduler sees them: with
    /// client credentials, only this session's jobs; with the cluster token, every job.
    pub async fn cluster_state(&self) -> Result<pb::GetClusterStateResult> {
        let mut scheduler = self.grpc();
        Ok(scheduler
            .get_cluster_state(pb::GetClusterStateParams {
                session_id: self.session_id.clone(),
            })
            .await
            .map_err(status_error)?
            .into_inner())
    }
}

/// An error and its sources on one line (TLS failures hide the reason in the chain).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}
