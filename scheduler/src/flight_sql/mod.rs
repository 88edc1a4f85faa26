//! L7: Arrow Flight SQL on the scheduler's gRPC port, for ADBC, JDBC and every other Flight
//! SQL client. It sits behind the same token check and TLS as every other RPC ([`FlightSqlAuth`]
//! also takes HTTP Basic with the token as password, and the handshake answers with the bearer
//! token). Each principal (token) has one session: the shared tables of `--table` and
//! `--catalog`, plus what that principal's own DDL created. Queries run as jobs
//! ([`statements`]); their rows stream from the executors holding them. Catalog metadata comes
//! from the session ([`metadata`]).

pub mod auth;
pub mod metadata;
pub mod statements;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::sql::metadata::XdbcTypeInfoData;
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionCancelQueryRequest, ActionCancelQueryResult, ActionClosePreparedStatementRequest,
    ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult, CommandGetCatalogs,
    CommandGetCrossReference, CommandGetDbSchemas, CommandGetExportedKeys, CommandGetImportedKeys,
    CommandGetPrimaryKeys, CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables,
    CommandGetXdbcTypeInfo, CommandPreparedStatementQuery, CommandPreparedStatementUpdate,
    CommandStatementQuery, CommandStatementUpdate, DoPutPreparedStatementResult, ProstMessageExt,
    SqlInfo, TicketStatementQuery,
};
use arrow_flight::{
    Action, CancelFlightInfoRequest, CancelFlightInfoResult, CancelStatus, FlightDescriptor,
    FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse, IpcMessage, SchemaAsIpc,
    Ticket,
};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::arrow::ipc::writer::IpcWriteOptions;
use datafusion::common::ParamValues;
use datafusion::prelude::SessionContext;
use futures::{Stream, StreamExt};
use parking_lot::Mutex;
use prost::Message;
use tonic::{Request, Response, Status, Streaming};
use volley_core::security::Principal;

use crate::service::SchedulerService;
pub use auth::FlightSqlAuth;
use statements::{Prepared, PreparedStatements, bound_parameters};

type DoGetStream = <FlightSqlServer as FlightService>::DoGetStream;

/// Flight SQL sessions kept (one per principal: without tokens, each presented header is one).
const MAX_SESSIONS: usize = 1024;

/// The Flight SQL service of a scheduler.
#[derive(Clone)]
pub struct FlightSqlServer {
    service: SchedulerService,
    /// One session per principal, with when it was last used.
    sessions: Arc<Mutex<HashMap<String, (SessionContext, Instant)>>>,
    prepared: Arc<PreparedStatements>,
    /// Signs the job handles this server gives out (see [`statements::signed`]).
    secret: Arc<str>,
}

impl FlightSqlServer {
    pub fn new(service: SchedulerService) -> Self {
        Self {
            service,
            sessions: Arc::default(),
            prepared: Arc::default(),
            secret: uuid::Uuid::new_v4().to_string().into(),
        }
    }

    /// The gRPC service, at most `max_message_size` bytes a message.
    pub fn into_server(self, max_message_size: usize) -> FlightServiceServer<Self> {
        FlightServiceServer::new(self)
            .max_decoding_message_size(max_message_size)
            .max_encoding_message_size(max_message_size)
    }

    fn principal<T>(request: &Request<T>) -> Principal {
        request
            .extensions()
            .get::<Principal>()
            .cloned()
            .unwrap_or_else(Principal::in_process)
    }

    /// The session of `principal` (made on first use; past [`MAX_SESSIONS`] principals, the
    /// least recently used one's session goes).
    fn session(&self, principal: &Principal) -> Result<SessionContext, Status> {
        let mut sessions = self.sessions.lock();
        if let Some((ctx, used)) = sessions.get_mut(principal.as_str()) {
            *used = Instant::now();
            return Ok(ctx.clone());
        }
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(p, _)| p.clone())
        {
            sessions.remove(&oldest);
        }
        let ctx = self.service.new_session(&[]).map_err(Status::from)?;
        sessions.insert(
            principal.as_str().to_string(),
            (ctx.clone(), Instant::now()),
        );
        Ok(ctx)
    }

    /// A `FlightInfo` for a metadata command answered by `do_get` of the same command.
    fn command_info(
        command: impl ProstMessageExt,
        schema: &Schema,
        descriptor: FlightDescriptor,
    ) -> Result<Response<FlightInfo>, Status> {
        let ticket = Ticket::new(command.as_any().encode_to_vec());
        let info = FlightInfo::new()
            .try_with_schema(schema)
            .map_err(|e| Status::internal(format!("metadata schema: {e}")))?
            .with_endpoint(FlightEndpoint::new().with_ticket(ticket))
            .with_descriptor(descriptor);
        Ok(Response::new(info))
    }

    async fn answer_info(
        &self,
        sql: &str,
        params: Option<ParamValues>,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let principal = Self::principal(&request);
        let ctx = self.session(&principal)?;
        let answer = statements::run(&self.service, &ctx, sql, params, &principal).await?;
        let security = self.service.security();
        let handle = statements::signed(&self.secret, principal.as_str(), &answer.job_id);
        let info = answer.flight_info(
            request.into_inner(),
            &handle,
            security.cluster_token(),
            security.tls_enabled(),
        )?;
        Ok(Response::new(info))
    }

    /// Cancel the job a `FlightInfo` this server gave `principal` stands for (its rows are
    /// dropped).
    async fn cancel_info(&self, info: Option<FlightInfo>, principal: &Principal) -> CancelStatus {
        let handle = info.map(|i| String::from_utf8_lossy(&i.app_metadata).into_owned());
        let job_id = handle
            .as_deref()
            .and_then(|h| statements::verified(&self.secret, principal.as_str(), h));
        match job_id {
            Some(job_id) => {
                if self.service.cancel(job_id).await {
                    CancelStatus::Cancelled
                } else {
                    // Already over: its result is let go.
                    self.service.release(job_id).await;
                    CancelStatus::NotCancellable
                }
            }
            _ => CancelStatus::Unspecified,
        }
    }
}

/// One batch as a `do_get` stream.
fn batch_stream(batch: RecordBatch) -> Response<DoGetStream> {
    Response::new(statements::flight_data(batch.schema(), vec![batch]))
}

fn schema_bytes(schema: &Schema) -> Result<bytes::Bytes, Status> {
    let message: IpcMessage = SchemaAsIpc::new(schema, &IpcWriteOptions::default())
        .try_into()
        .map_err(|e: datafusion::arrow::error::ArrowError| Status::internal(e.to_string()))?;
    Ok(message.0)
}

#[tonic::async_trait]
impl FlightSqlService for FlightSqlServer {
    type FlightService = FlightSqlServer;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<
        Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>,
        Status,
    > {
        // The call passed the token check: the token it presented is the session's bearer.
        let bearer = request.metadata().get("authorization").cloned();
        let token = bearer
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default()
            .to_string();
        let reply = HandshakeResponse {
            protocol_version: 0,
            payload: token.into_bytes().into(),
        };
        let mut response: Response<Pin<Box<dyn Stream<Item = _> + Send>>> =
            Response::new(futures::stream::iter([Ok(reply)]).boxed());
        if let Some(bearer) = bearer {
            response.metadata_mut().insert("authorization", bearer);
        }
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.answer_info(&query.query, None, request).await
    }

    async fn get_flight_info_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let principal = Self::principal(&request);
        let prepared = self
            .prepared
            .get(&query.prepared_statement_handle, principal.as_str())?;
        self.answer_info(&prepared.sql, prepared.params, request)
            .await
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let principal = Self::principal(&request);
        let job_id = statements::inline_handle(&ticket.statement_handle)
            .and_then(|h| statements::verified(&self.secret, principal.as_str(), h))
            .ok_or_else(|| Status::not_found("no such statement handle"))?;
        Ok(Response::new(statements::inline_rows(
            &self.service,
            job_id,
        )?))
    }

    async fn do_put_statement_update(
        &self,
        command: CommandStatementUpdate,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        let principal = Self::principal(&request);
        let ctx = self.session(&principal)?;
        let answer = statements::run(&self.service, &ctx, &command.query, None, &principal).await?;
        let rows = answer.affected_rows(self.service.security()).await;
        self.service.release(&answer.job_id).await;
        rows
    }

    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        let principal = Self::principal(&request);
        let params = bound_parameters(request.into_inner()).await?;
        let handle = query.prepared_statement_handle;
        self.prepared.bind(&handle, principal.as_str(), params)?;
        Ok(DoPutPreparedStatementResult {
            prepared_statement_handle: Some(handle),
        })
    }

    async fn do_put_prepared_statement_update(
        &self,
        query: CommandPreparedStatementUpdate,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        let principal = Self::principal(&request);
        let prepared = self
            .prepared
            .get(&query.prepared_statement_handle, principal.as_str())?;
        let params = bound_parameters(request.into_inner()).await?;
        let params = (!matches!(&params, ParamValues::List(v) if v.is_empty())).then_some(params);
        let ctx = self.session(&principal)?;
        let answer =
            statements::run(&self.service, &ctx, &prepared.sql, params, &principal).await?;
        let rows = answer.affected_rows(self.service.security()).await;
        self.service.release(&answer.job_id).await;
        rows
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let principal = Self::principal(&request);
        let ctx = self.session(&principal)?;
        let (dataset, params) = self.service.describe_statement(&ctx, &query.query).await?;
        let parameters = Schema::new(params);
        let handle = self.prepared.open(Prepared {
            principal: principal.as_str().to_string(),
            opened: std::time::Instant::now(),
            sql: query.query,
            params: None,
        });
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: handle.into(),
            dataset_schema: schema_bytes(&dataset)?,
            parameter_schema: schema_bytes(&parameters)?,
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<(), Status> {
        let principal = Self::principal(&request);
        self.prepared
            .close(&query.prepared_statement_handle, principal.as_str());
        Ok(())
    }

    async fn do_action_cancel_query(
        &self,
        query: ActionCancelQueryRequest,
        request: Request<Action>,
    ) -> Result<ActionCancelQueryResult, Status> {
        let info = FlightInfo::decode(query.info.as_ref()).ok();
        let principal = Self::principal(&request);
        let result = match self.cancel_info(info, &principal).await {
            CancelStatus::Cancelled => 1,
            CancelStatus::NotCancellable => 3,
            _ => 0,
        };
        Ok(ActionCancelQueryResult { result })
    }

    async fn do_action_fallback(
        &self,
        request: Request<Action>,
    ) -> Result<Response<<Self as FlightService>::DoActionStream>, Status> {
        let principal = Self::principal(&request);
        let action = request.into_inner();
        if action.r#type != "CancelFlightInfo" {
            return Err(Status::unimplemented(format!(
                "action {} is not implemented",
                action.r#type
            )));
        }
        let cancel = CancelFlightInfoRequest::decode(action.body.as_ref())
            .map_err(|e| Status::invalid_argument(format!("bad CancelFlightInfo: {e}")))?;
        let status = self.cancel_info(cancel.info, &principal).await;
        let result = CancelFlightInfoResult {
            status: status as i32,
        };
        let body = arrow_flight::Result {
            body: result.encode_to_vec().into(),
        };
        Ok(Response::new(futures::stream::iter([Ok(body)]).boxed()))
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        Self::command_info(query, &schema, request.into_inner())
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        Self::command_info(query, &schema, request.into_inner())
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        Self::command_info(query, &schema, request.into_inner())
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        Self::command_info(query, &schema, request.into_inner())
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = metadata::sql_info()?.schema();
        Self::command_info(query, &schema, request.into_inner())
    }

    async fn get_flight_info_xdbc_type_info(
        &self,
        query: CommandGetXdbcTypeInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = metadata::xdbc_types()?.schema();
        Self::command_info(query, &schema, request.into_inner())
    }

    async fn get_flight_info_primary_keys(
        &self,
        query: CommandGetPrimaryKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Self::command_info(
            query,
            &metadata::primary_keys_schema(),
            request.into_inner(),
        )
    }

    async fn get_flight_info_exported_keys(
        &self,
        query: CommandGetExportedKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Self::command_info(
            query,
            &metadata::foreign_keys_schema(),
            request.into_inner(),
        )
    }

    async fn get_flight_info_imported_keys(
        &self,
        query: CommandGetImportedKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Self::command_info(
            query,
            &metadata::foreign_keys_schema(),
            request.into_inner(),
        )
    }

    async fn get_flight_info_cross_reference(
        &self,
        query: CommandGetCrossReference,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Self::command_info(
            query,
            &metadata::foreign_keys_schema(),
            request.into_inner(),
        )
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let ctx = self.session(&Self::principal(&request))?;
        Ok(batch_stream(metadata::catalogs(&ctx, query)?))
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let ctx = self.session(&Self::principal(&request))?;
        Ok(batch_stream(metadata::schemas(&ctx, query)?))
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let ctx = self.session(&Self::principal(&request))?;
        Ok(batch_stream(metadata::tables(&ctx, query).await?))
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        Ok(batch_stream(metadata::table_types(query)?))
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let batch = query
            .into_builder(&metadata::sql_info()?)
            .build()
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(batch_stream(batch))
    }

    async fn do_get_xdbc_type_info(
        &self,
        query: CommandGetXdbcTypeInfo,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let types: XdbcTypeInfoData = metadata::xdbc_types()?;
        let batch = query
            .into_builder(&types)
            .build()
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(batch_stream(batch))
    }

    async fn do_get_primary_keys(
        &self,
        _query: CommandGetPrimaryKeys,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        Ok(batch_stream(RecordBatch::new_empty(
            metadata::primary_keys_schema(),
        )))
    }

    async fn do_get_exported_keys(
        &self,
        _query: CommandGetExportedKeys,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        Ok(batch_stream(empty_keys()))
    }

    async fn do_get_imported_keys(
        &self,
        _query: CommandGetImportedKeys,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        Ok(batch_stream(empty_keys()))
    }

    async fn do_get_cross_reference(
        &self,
        _query: CommandGetCrossReference,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        Ok(batch_stream(empty_keys()))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

fn empty_keys() -> RecordBatch {
    let schema: SchemaRef = metadata::foreign_keys_schema();
    RecordBatch::new_empty(schema)
}
