//! Statements of Flight SQL clients: run as jobs of the caller's session, waited for (a client
//! that goes away cancels its job), and answered with a `FlightInfo` whose endpoints point at
//! the executors holding the result files — the rows stream from there, not through the
//! scheduler — or, for an answer the scheduler holds (DDL, EXPLAIN, a cached result), at the
//! scheduler itself. Prepared statements keep their SQL and the parameters last bound.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::sql::server::PeekableFlightDataStream;
use arrow_flight::sql::{ProstMessageExt, TicketStatementQuery};
use arrow_flight::{FlightData, FlightDescriptor, FlightEndpoint, FlightInfo, Ticket};
use datafusion::arrow::array::{Array, RecordBatch, UInt64Array};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::common::{ParamValues, ScalarValue};
use datafusion::prelude::SessionContext;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use parking_lot::Mutex;
use prost::Message;
use tonic::Status;
use volley_core::security::{Principal, Security};
use volley_core::shuffle::read_partition_location;

use crate::job::JobState;
use crate::service::SchedulerService;

/// The statement handle of an answer the scheduler holds: this prefix, then the job's
/// [`signed`] name.
const INLINE: &str = "volley-inline:";

/// Job `job_id` as a handle only `principal` can redeem: the id and an HMAC of it and the
/// principal under this server's `secret` (a job id alone is no capability).
pub(super) fn signed(secret: &str, principal: &str, job_id: &str) -> String {
    let tag = volley_core::grant::grant(secret, &format!("{principal}/{job_id}"));
    format!("{job_id}:{tag}")
}

/// The job a [`signed`] handle names, when `principal` is the one it was made for.
pub(super) fn verified<'a>(secret: &str, principal: &str, handle: &'a str) -> Option<&'a str> {
    let (job_id, tag) = handle.split_once(':')?;
    volley_core::grant::grant_matches(secret, &format!("{principal}/{job_id}"), tag)
        .then_some(job_id)
}

/// A finished job's answer as a Flight SQL client gets it.
pub(super) struct Answer {
    pub job_id: String,
    pub schema: SchemaRef,
    /// IPC bytes held by the scheduler (None: result files on the executors).
    pub inline: Option<Vec<u8>>,
    pub locations: Vec<volley_core::shuffle::PartitionLocation>,
}

/// Cancels the job it names when dropped armed: a client that stops waiting (cancels, or
/// disconnects) does not leave its query running.
struct CancelOnDrop {
    service: SchedulerService,
    job_id: Option<String>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(job_id) = self.job_id.take() {
            let service = self.service.clone();
            tokio::spawn(async move {
                if service.cancel(&job_id).await {
                    tracing::info!(job_id, "cancelled: its Flight SQL client stopped waiting");
                }
            });
        }
    }
}

/// Run `sql` in session `ctx` for `principal`, with `params` bound to its placeholders when
/// given, and wait for its answer.
pub(super) async fn run(
    service: &SchedulerService,
    ctx: &SessionContext,
    sql: &str,
    params: Option<ParamValues>,
    principal: &Principal,
) -> Result<Answer, Status> {
    let job_id = match params {
        Some(params) => service.submit_bound(ctx, sql, params).await?,
        None => service.submit_redacted(ctx, sql, principal).await?,
    };
    let mut guard = CancelOnDrop {
        service: service.clone(),
        job_id: Some(job_id.clone()),
    };
    let gone = || Status::not_found(format!("job {job_id} is gone"));
    if !service.wait_final(&job_id).await {
        return Err(gone());
    }
    let ended = service.with_state(|s| {
        s.job(&job_id).map(|job| match &job.state {
            JobState::Failed(message) => Err(failed(message)),
            JobState::Cancelled => Err(Status::cancelled(format!("job {job_id} was cancelled"))),
            _ => {
                let locations = job.result_locations();
                // A cluster query's small answer also came back inline; its endpoints stay
                // the executors (their TLS and grants, and a release that drops the rows).
                let inline = job.inline_result.clone().filter(|_| locations.is_empty());
                Ok(Answer {
                    job_id: job_id.clone(),
                    schema: Arc::clone(&job.schema),
                    inline,
                    locations,
                })
            }
        })
    });
    // Over: nothing to cancel when this call goes.
    guard.job_id = None;
    ended.ok_or_else(gone)?
}

/// A failed job's status: a missing table reads NOT_FOUND, bad SQL INVALID_ARGUMENT.
fn failed(message: &str) -> Status {
    if message.contains("not found") {
        Status::not_found(message.to_string())
    } else {
        Status::internal(message.to_string())
    }
}

impl Answer {
    /// The `FlightInfo` of this answer: one endpoint per result file, at its executor, or one
    /// at the scheduler for an answer held here.
    pub(super) fn flight_info(
        &self,
        descriptor: FlightDescriptor,
        handle: &str,
        cluster_token: Option<&str>,
        tls: bool,
    ) -> Result<FlightInfo, Status> {
        let mut info = FlightInfo::new()
            .try_with_schema(&self.schema)
            .map_err(|e| Status::internal(format!("result schema: {e}")))?
            .with_descriptor(descriptor)
            .with_ordered(true);
        match &self.inline {
            Some(_) => {
                let handle = TicketStatementQuery {
                    statement_handle: format!("{INLINE}{handle}").into(),
                };
                let ticket = Ticket::new(handle.as_any().encode_to_vec());
                info = info.with_endpoint(FlightEndpoint::new().with_ticket(ticket));
            }
            None => {
                let scheme = if tls { "grpc+tls" } else { "grpc+tcp" };
                for location in &self.locations {
                    let grant = cluster_token
                        .map(|key| volley_core::grant::grant(key, &location.path))
                        .unwrap_or_default();
                    let ticket = volley_core::grant::standard_ticket(&location.path, &grant);
                    let endpoint = FlightEndpoint::new()
                        .with_ticket(Ticket::new(ticket))
                        .with_location(format!(
                            "{scheme}://{}:{}",
                            location.host, location.flight_port
                        ));
                    info = info.with_endpoint(endpoint);
                }
            }
        }
        let rows = match &self.inline {
            // Not counted here: unknown.
            Some(_) => -1,
            None => {
                let rows: u64 = self.locations.iter().map(|l| l.num_rows).sum();
                i64::try_from(rows).unwrap_or(-1)
            }
        };
        Ok(info
            .with_total_records(rows)
            .with_app_metadata(handle.to_string().into_bytes()))
    }

    /// Rows a DML statement or `COPY` reports (its `count` column, read where the answer is),
    /// 0 for DDL.
    pub(super) async fn affected_rows(&self, security: &Security) -> Result<i64, Status> {
        let batches: Vec<RecordBatch> = match &self.inline {
            Some(bytes) => StreamReader::try_new(std::io::Cursor::new(bytes), None)
                .and_then(|reader| reader.collect())
                .map_err(|e| Status::internal(format!("answer of job {}: {e}", self.job_id)))?,
            None => {
                let mut batches = Vec::new();
                for location in &self.locations {
                    let mut rows =
                        read_partition_location(location.clone(), None, 0, security.clone());
                    while let Some(batch) = rows.next().await {
                        batches.push(batch.map_err(|e| {
                            Status::internal(format!("answer of job {}: {e}", self.job_id))
                        })?);
                    }
                }
                batches
            }
        };
        let counted = batches
            .iter()
            .filter_map(|b| b.column_by_name("count"))
            .filter_map(|c| c.as_any().downcast_ref::<UInt64Array>())
            .flat_map(|counts| counts.iter().flatten())
            .sum::<u64>();
        Ok(i64::try_from(counted).unwrap_or(i64::MAX))
    }
}

/// The [`signed`] handle of a scheduler-held answer's statement handle.
pub(super) fn inline_handle(handle: &[u8]) -> Option<&str> {
    std::str::from_utf8(handle).ok()?.strip_prefix(INLINE)
}

/// The answer of job `job_id` held by the scheduler, as Flight data.
pub(super) fn inline_rows(
    service: &SchedulerService,
    job_id: &str,
) -> Result<BoxStream<'static, Result<FlightData, Status>>, Status> {
    let bytes = service
        .with_state(|s| s.job(job_id).and_then(|j| j.inline_result.clone()))
        .ok_or_else(|| Status::not_found(format!("no answer of job {job_id} is held here")))?;
    let reader = StreamReader::try_new(std::io::Cursor::new(bytes), None)
        .map_err(|e| Status::internal(format!("answer of job {job_id}: {e}")))?;
    let schema = reader.schema();
    let batches = reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Status::internal(format!("answer of job {job_id}: {e}")))?;
    Ok(flight_data(schema, batches))
}

/// Batches as a `do_get` stream of Flight data.
pub(super) fn flight_data(
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
) -> BoxStream<'static, Result<FlightData, Status>> {
    FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(futures::stream::iter(batches.into_iter().map(Ok)))
        .map_err(|e| Status::internal(e.to_string()))
        .boxed()
}

/// The first row of the parameter batches a client bound.
pub(super) async fn bound_parameters(
    stream: PeekableFlightDataStream,
) -> Result<ParamValues, Status> {
    let bad = |e: &dyn std::fmt::Display| Status::invalid_argument(format!("bad parameters: {e}"));
    let mut batches = arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(
        stream.into_peekable().map_err(FlightError::from),
    );
    // Read up to the first batch with rows, no further: a client cannot make the scheduler
    // hold a stream of parameter rows.
    let batch = loop {
        match batches.try_next().await.map_err(|e| bad(&e))? {
            Some(batch) if batch.num_rows() > 0 => break batch,
            Some(_) => continue,
            None => return Ok(ParamValues::List(Vec::new())),
        }
    };
    if batch.num_rows() > 1 {
        return Err(Status::invalid_argument(format!(
            "{} rows of parameters were bound: a statement runs with one row of values at a time",
            batch.num_rows()
        )));
    }
    let values = batch
        .columns()
        .iter()
        .map(|column| ScalarValue::try_from_array(column, 0).map(Into::into))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&e))?;
    Ok(ParamValues::List(values))
}

/// A prepared statement: its SQL and the parameters last bound to it.
#[derive(Clone)]
pub(super) struct Prepared {
    pub principal: String,
    /// When it was opened (the oldest go first when too many are open).
    pub opened: std::time::Instant,
    pub sql: String,
    pub params: Option<ParamValues>,
}

/// Open prepared statements by handle.
#[derive(Default)]
pub(super) struct PreparedStatements(Mutex<HashMap<String, Prepared>>);

/// At most this many prepared statements stay open (a client that never closes them cannot
/// grow the scheduler's memory without bound): the oldest are closed first.
const MAX_PREPARED: usize = 10_000;

impl PreparedStatements {
    pub fn open(&self, prepared: Prepared) -> String {
        let handle = uuid::Uuid::new_v4().to_string();
        let mut open = self.0.lock();
        if open.len() >= MAX_PREPARED
            && let Some(oldest) = open
                .iter()
                .min_by_key(|(_, p)| p.opened)
                .map(|(h, _)| h.clone())
        {
            open.remove(&oldest);
        }
        open.insert(handle.clone(), prepared);
        handle
    }

    /// The statement under `handle` if `principal` prepared it.
    pub fn get(&self, handle: &[u8], principal: &str) -> Result<Prepared, Status> {
        let handle = String::from_utf8_lossy(handle);
        self.0
            .lock()
            .get(handle.as_ref())
            .filter(|p| p.principal == principal)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no prepared statement {handle}")))
    }

    pub fn bind(&self, handle: &[u8], principal: &str, params: ParamValues) -> Result<(), Status> {
        let handle = String::from_utf8_lossy(handle);
        match self.0.lock().get_mut(handle.as_ref()) {
            Some(p) if p.principal == principal => {
                p.params = Some(params);
                Ok(())
            }
            _ => Err(Status::not_found(format!("no prepared statement {handle}"))),
        }
    }

    pub fn close(&self, handle: &[u8], principal: &str) {
        let handle = String::from_utf8_lossy(handle);
        let mut open = self.0.lock();
        if open
            .get(handle.as_ref())
            .is_some_and(|p| p.principal == principal)
        {
            open.remove(handle.as_ref());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_job_handle_is_redeemed_only_by_its_principal_and_server() {
        let handle = signed("secret", "alice", "job-1");
        assert_eq!(verified("secret", "alice", &handle), Some("job-1"));
        assert_eq!(
            verified("secret", "bob", &handle),
            None,
            "another principal"
        );
        assert_eq!(verified("other", "alice", &handle), None, "another server");
        assert_eq!(verified("secret", "alice", "job-1"), None, "a bare job id");
        let forged = handle.replace("job-1", "job-2");
        assert_eq!(verified("secret", "alice", &forged), None, "another job");
    }
}
