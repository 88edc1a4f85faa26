//! The gRPC layer: each call of the `SchedulerGrpc` service handed to the service method that
//! implements it (executors' calls in [`super::executors`], clients' in [`super::status`]).

use tonic::{Request, Response, Status};
use volley_core::protobuf::{self as pb, scheduler_grpc_server::SchedulerGrpc};

use crate::service::SchedulerService;

#[tonic::async_trait]
impl SchedulerGrpc for SchedulerService {
    type AttachStream = super::executors::AttachStream;

    async fn attach(
        &self,
        request: Request<pb::AttachParams>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        self.handle_attach(request).await
    }

    async fn register_executor(
        &self,
        request: Request<pb::RegisterExecutorParams>,
    ) -> Result<Response<pb::RegisterExecutorResult>, Status> {
        self.handle_register_executor(request).await
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatParams>,
    ) -> Result<Response<pb::HeartbeatResult>, Status> {
        self.handle_heartbeat(request).await
    }

    async fn deregister_executor(
        &self,
        request: Request<pb::DeregisterExecutorParams>,
    ) -> Result<Response<pb::DeregisterExecutorResult>, Status> {
        self.handle_deregister_executor(request).await
    }

    async fn update_task_status(
        &self,
        request: Request<pb::UpdateTaskStatusParams>,
    ) -> Result<Response<pb::UpdateTaskStatusResult>, Status> {
        self.handle_update_task_status(request).await
    }

    async fn create_session(
        &self,
        request: Request<pb::CreateSessionParams>,
    ) -> Result<Response<pb::CreateSessionResult>, Status> {
        self.handle_create_session(request).await
    }

    async fn execute_sql(
        &self,
        request: Request<pb::ExecuteSqlParams>,
    ) -> Result<Response<pb::ExecuteSqlResult>, Status> {
        self.handle_execute_sql(request).await
    }

    async fn execute_plan(
        &self,
        request: Request<pb::ExecutePlanParams>,
    ) -> Result<Response<pb::ExecuteSqlResult>, Status> {
        self.handle_execute_plan(request).await
    }

    async fn get_job_status(
        &self,
        request: Request<pb::GetJobStatusParams>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        self.handle_get_job_status(request).await
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobParams>,
    ) -> Result<Response<pb::CancelJobResult>, Status> {
        self.handle_cancel_job(request).await
    }

    async fn release_job(
        &self,
        request: Request<pb::ReleaseJobParams>,
    ) -> Result<Response<pb::ReleaseJobResult>, Status> {
        self.handle_release_job(request).await
    }

    async fn get_cluster_state(
        &self,
        request: Request<pb::GetClusterStateParams>,
    ) -> Result<Response<pb::GetClusterStateResult>, Status> {
        self.handle_get_cluster_state(request).await
    }
}
