//! Arrow Flight `do_get` serving shuffle files from the work dir.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use datafusion::arrow::ipc::reader::StreamReader;
use futures::{Stream, StreamExt, TryStreamExt};
use tonic::{Request, Response, Status, Streaming};

type BoxedStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Serves the shuffle files under `work_dir`; a ticket is a file path.
#[derive(Debug, Clone)]
pub struct ShuffleFlightService {
    work_dir: PathBuf,
}

impl ShuffleFlightService {
    pub fn new(work_dir: PathBuf) -> Self {
        Self { work_dir }
    }

    fn checked_path(&self, ticket: &[u8]) -> Result<PathBuf, Status> {
        let path = std::str::from_utf8(ticket)
            .map_err(|_| Status::invalid_argument("ticket is not a UTF-8 path"))?;
        let path = Path::new(path);
        let canonical = path
            .canonicalize()
            .map_err(|e| Status::not_found(format!("shuffle file {}: {e}", path.display())))?;
        let root = self
            .work_dir
            .canonicalize()
            .map_err(|e| Status::internal(format!("work dir {}: {e}", self.work_dir.display())))?;
        if !canonical.starts_with(&root) {
            return Err(Status::permission_denied(format!(
                "{} is outside this executor's work dir",
                path.display()
            )));
        }
        Ok(canonical)
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
        let path = self.checked_path(&request.into_inner().ticket)?;
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::task::spawn_blocking(move || {
            let reader = File::open(&path)
                .map_err(|e| FlightError::ExternalError(Box::new(e)))
                .and_then(|f| {
                    StreamReader::try_new(BufReader::with_capacity(256 * 1024, f), None)
                        .map_err(FlightError::from)
                });
            match reader {
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                }
                Ok(reader) => {
                    for batch in reader {
                        let item = batch.map_err(FlightError::from);
                        let failed = item.is_err();
                        if tx.blocking_send(item).is_err() || failed {
                            break;
                        }
                    }
                }
            }
        });
        let batches = tokio_stream::wrappers::ReceiverStream::new(rx);
        let options = datafusion::arrow::ipc::writer::IpcWriteOptions::default()
            .try_with_compression(Some(datafusion::arrow::ipc::CompressionType::LZ4_FRAME))
            .map_err(|e| Status::internal(e.to_string()))?;
        let stream = FlightDataEncoderBuilder::new()
            .with_options(options)
            .build(batches)
            .map_err(|e| Status::internal(e.to_string()));
        Ok(Response::new(stream.boxed()))
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
