//! Arrow Flight `do_get` serving shuffle files from the work dir and the outputs held in
//! memory.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use bytes::Bytes;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::ipc::reader::StreamReader;
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use volley_core::grant::{STANDARD_FLIGHT, grant_matches, parse_ticket};
use volley_core::security::{Role, role};
use volley_core::shuffle::MemoryShuffle;

/// Bytes of a shuffle file per Flight message.
const CHUNK_BYTES: usize = 1024 * 1024;
/// `app_metadata` of messages that carry raw Arrow IPC stream bytes.
const IPC_CHUNK: &[u8] = volley_core::shuffle::IPC_CHUNK_MARKER;

type BoxedStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Serves the shuffle files under `work_dir`; a ticket is a file path, followed for clients
/// (who hold only the client token) by the scheduler's grant for it (see
/// [`volley_core::grant`]).
#[derive(Debug, Clone)]
pub struct ShuffleFlightService {
    work_dir: PathBuf,
    chunk_bytes: usize,
    cluster_token: Option<String>,
    memory: Arc<MemoryShuffle>,
}

/// What a ticket reads.
enum Source {
    File(PathBuf),
    Memory(Bytes),
}

impl ShuffleFlightService {
    pub fn new(
        work_dir: PathBuf,
        max_message_size: usize,
        cluster_token: Option<String>,
        memory: Arc<MemoryShuffle>,
    ) -> Self {
        Self {
            work_dir,
            chunk_bytes: CHUNK_BYTES.min(max_message_size / 2).max(4096),
            cluster_token,
            memory,
        }
    }

    /// The output a ticket may read: held in memory under its path, or the file. Every
    /// refusal reads the same, whether the output is missing, outside the work dir or not
    /// granted, so a caller learns nothing about other paths.
    fn checked_source(&self, ticket: &[u8], role: Option<Role>) -> Result<Source, Status> {
        let refused = || Status::not_found("no such shuffle file for this ticket");
        let (path, grant) = parse_ticket(ticket).ok_or_else(refused)?;
        let allowed = match role {
            Some(Role::Cluster) => true,
            Some(Role::Client) => {
                let key = self.cluster_token.as_deref().unwrap_or_default();
                grant.is_some_and(|g| !key.is_empty() && grant_matches(key, path, g))
            }
            None => false,
        };
        if !allowed {
            return Err(refused());
        }
        if let Some(bytes) = self.memory.get(path) {
            return Ok(Source::Memory(bytes));
        }
        let path = Path::new(path);
        let canonical = path.canonicalize().map_err(|_| refused())?;
        let root = self
            .work_dir
            .canonicalize()
            .map_err(|e| Status::internal(format!("work dir {}: {e}", self.work_dir.display())))?;
        if !canonical.starts_with(&root) || !canonical.is_file() {
            return Err(refused());
        }
        Ok(Source::File(canonical))
    }
}

#[tonic::async_trait]
impl FlightService for ShuffleFlightService {
    type HandshakeStream = BoxedStream<HandshakeResponse>;
    type ListFlightsStream = BoxedStream<FlightInfo>;
    type DoGetStream = BoxedStream<FlightData>;
    type DoPutStream = BoxedStream<PutResult>;
    type DoActionStream = BoxedStream<arrow_flight::Result>;
    type ListActionsStream = BoxedStream<ActionType>;
    type DoExchangeStream = BoxedStream<FlightData>;

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        let role = role(&request);
        let chunk_bytes = self.chunk_bytes;
        let ticket = request.into_inner().ticket;
        if let Some(ticket) = ticket.strip_prefix(STANDARD_FLIGHT) {
            let source = self.checked_source(ticket, role)?;
            return Ok(Response::new(standard_flight(source, chunk_bytes).await?));
        }
        let path = match self.checked_source(&ticket, role)? {
            Source::File(path) => path,
            Source::Memory(bytes) => {
                // Already an Arrow IPC stream: its bytes go out in chunks, as a file's do.
                let chunks = (0..bytes.len().div_ceil(chunk_bytes)).map(move |i| {
                    let end = ((i + 1) * chunk_bytes).min(bytes.len());
                    Ok(FlightData {
                        app_metadata: Bytes::from_static(IPC_CHUNK),
                        data_body: bytes.slice(i * chunk_bytes..end),
                        ..FlightData::default()
                    })
                });
                return Ok(Response::new(futures::stream::iter(chunks).boxed()));
            }
        };
        // The file already is an Arrow IPC stream: send its bytes as they are, in chunks,
        // instead of decoding and re-encoding every batch. The reader feeds them to an IPC
        // stream decoder.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<FlightData, Status>>(4);
        tokio::task::spawn_blocking(move || {
            let mut file = match File::open(&path) {
                Ok(f) => f,
                Err(e) => {
                    let _ = tx.blocking_send(Err(Status::not_found(format!(
                        "shuffle file {}: {e}",
                        path.display()
                    ))));
                    return;
                }
            };
            loop {
                let chunk = match volley_core::shuffle::read_chunk(&mut file, chunk_bytes as u64) {
                    Ok(chunk) => chunk,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(Status::internal(format!(
                            "reading {}: {e}",
                            path.display()
                        ))));
                        return;
                    }
                };
                let filled = chunk.len();
                if filled == 0 {
                    return;
                }
                let data = FlightData {
                    app_metadata: Bytes::from_static(IPC_CHUNK),
                    data_body: Bytes::from(chunk),
                    ..FlightData::default()
                };
                if tx.blocking_send(Ok(data)).is_err() || filled < chunk_bytes {
                    return;
                }
            }
        });
        Ok(Response::new(
            tokio_stream::wrappers::ReceiverStream::new(rx).boxed(),
        ))
    }

    async fn handshake(
        &self,
        _request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        Err(Status::unimplemented("handshake"))
    }

    async fn list_flights(
        &self,
        _request: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        Err(Status::unimplemented("list_flights"))
    }

    async fn get_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Err(Status::unimplemented("get_flight_info"))
    }

    async fn poll_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        Err(Status::unimplemented("poll_flight_info"))
    }

    async fn get_schema(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        Err(Status::unimplemented("get_schema"))
    }

    async fn do_put(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        Err(Status::unimplemented("do_put"))
    }

    async fn do_action(
        &self,
        _request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        Err(Status::unimplemented("do_action"))
    }

    async fn list_actions(
        &self,
        _request: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        Err(Status::unimplemented("list_actions"))
    }

    async fn do_exchange(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        Err(Status::unimplemented("do_exchange"))
    }
}

/// The record batches of `source` (an Arrow IPC stream) as standard Flight data, for Flight
/// SQL clients: decoded a batch at a time on a blocking thread and encoded as they go.
async fn standard_flight(
    source: Source,
    max_message_bytes: usize,
) -> Result<BoxedStream<FlightData>, Status> {
    let opened = tokio::task::spawn_blocking(move || {
        let reader: Box<dyn std::io::Read + Send> = match source {
            Source::Memory(bytes) => Box::new(std::io::Cursor::new(bytes)),
            Source::File(path) => {
                let file = File::open(&path).map_err(|e| {
                    Status::not_found(format!("result file {}: {e}", path.display()))
                })?;
                Box::new(std::io::BufReader::new(file))
            }
        };
        StreamReader::try_new(reader, None)
            .map_err(|e| Status::internal(format!("reading a result: {e}")))
    })
    .await
    .map_err(|e| Status::internal(format!("reading a result: {e}")))??;
    let schema = opened.schema();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<RecordBatch, FlightError>>(2);
    tokio::task::spawn_blocking(move || {
        for batch in opened {
            if tx.blocking_send(batch.map_err(FlightError::Arrow)).is_err() {
                return;
            }
        }
    });
    let encoded = FlightDataEncoderBuilder::new()
        .with_max_flight_data_size(max_message_bytes)
        .with_schema(schema)
        .build(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok(encoded
        .map(|r| r.map_err(|e| Status::internal(e.to_string())))
        .boxed())
}
