//! Starting and stopping a scheduler server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::InterceptorLayer;
use tonic::transport::server::TcpIncoming;
use volley_core::protobuf::scheduler_grpc_server::SchedulerGrpcServer;
use volley_core::sandbox::Sandbox;
use volley_core::security::Security;
use volley_core::{Result, VolleyError};

use crate::metrics::SchedulerMetrics;
use crate::service::SchedulerService;
use crate::state::SchedulerPolicy;

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Address to bind.
    pub host: String,
    /// Port to bind; 0 picks a free one.
    pub port: u16,
    /// Attempts per task before its job fails.
    pub task_max_attempts: u32,
    /// Attempts per stage before its job fails.
    pub stage_max_attempts: u32,
    /// An executor silent this long is declared lost.
    pub executor_timeout: Duration,
    /// Shuffle partitions per exchange; None = total executor slots (at least 2).
    pub target_partitions: Option<usize>,
    /// Unreleased results are removed this long after their job ended.
    pub result_ttl: Duration,
    /// Largest gRPC message accepted or sent.
    pub max_message_size: usize,
    /// Place tasks round-robin instead of on the least-loaded executor.
    pub round_robin: bool,
    /// Auth token and TLS for the gRPC server and calls to executors.
    pub security: Security,
    /// File sandbox: roots queries may read and write under (empty = the working directory);
    /// None = no restriction (in-process clusters of a library user).
    pub allowed_paths: Option<Vec<PathBuf>>,
    /// Allow DDL/DML (CREATE, DROP, INSERT, COPY).
    pub allow_ddl: bool,
    /// Jobs running at once; later ones queue (0 = no limit).
    pub max_concurrent_jobs: usize,
    /// Allow a non-loopback address without an auth token.
    pub insecure: bool,
    /// Port of the web status page and JSON API (same host; 0 picks a free one; None = off).
    pub http_port: Option<u16>,
    /// Accept jobs that set the `volley.test_*` fault-injection hooks (tests only).
    pub enable_test_hooks: bool,
    /// A running job in which no task finished for this long fails, naming the tasks it waits
    /// for (None: never).
    pub stall_timeout: Option<Duration>,
    /// Memory for everything that runs on the scheduler itself (DDL, `CREATE TABLE AS`, plans
    /// that cannot be sent to executors); beyond it, operators spill or fail.
    pub memory_limit: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".to_string(),
            port: 50050,
            task_max_attempts: 4,
            stage_max_attempts: 4,
            executor_timeout: Duration::from_secs(10),
            target_partitions: None,
            result_ttl: Duration::from_secs(600),
            max_message_size: 64 * 1024 * 1024,
            round_robin: false,
            security: Security::none(),
            allowed_paths: None,
            allow_ddl: true,
            max_concurrent_jobs: 0,
            insecure: false,
            http_port: Some(0),
            enable_test_hooks: false,
            stall_timeout: Some(Duration::from_secs(3600)),
            memory_limit: 2 << 30,
        }
    }
}

impl SchedulerConfig {
    /// Bind to `host:port`.
    pub fn with_address(mut self, host: impl Into<String>, port: u16) -> Self {
        self.host = host.into();
        self.port = port;
        self
    }

    /// Fix the number of shuffle partitions.
    pub fn with_target_partitions(mut self, n: usize) -> Self {
        self.target_partitions = Some(n);
        self
    }
}

/// A running scheduler; dropping it does not stop it, call [`SchedulerHandle::shutdown`].
pub struct SchedulerHandle {
    addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    scheme: &'static str,
    service: SchedulerService,
    shutdown: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<()>>,
    http_shutdown: Option<oneshot::Sender<()>>,
    http: Option<JoinHandle<()>>,
}

impl SchedulerHandle {
    /// Address the gRPC server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://host:port` for clients and executors.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// `http(s)://host:port` of the status page, when it is on.
    pub fn http_url(&self) -> Option<String> {
        self.http_addr.map(|a| format!("{}://{a}", self.scheme))
    }

    /// The service, for in-process inspection.
    pub fn service(&self) -> &SchedulerService {
        &self.service
    }

    /// Stop serving and wait for the server to end.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(tx) = self.http_shutdown.take() {
            let _ = tx.send(());
        }
        self.service.stop_background();
        if let Some(join) = self.join.take() {
            let _ = join.await;
        }
        if let Some(join) = self.http.take() {
            let _ = join.await;
        }
    }
}

/// Serve the status page and JSON API on `host:port` (TLS like the gRPC server).
async fn start_http(
    config: &SchedulerConfig,
    port: u16,
    service: SchedulerService,
    shutdown: oneshot::Receiver<()>,
) -> Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind((config.host.as_str(), port))
        .await
        .map_err(|e| VolleyError::Connect {
            address: format!("{}:{port}", config.host),
            message: format!("cannot bind the status page: {e}"),
        })?;
    let addr = listener.local_addr()?;
    let mut server = config.security.server()?.accept_http1(true);
    let routes = tonic::service::Routes::from(crate::web::router(service));
    let join = tokio::spawn(async move {
        let result = server
            .add_routes(routes)
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    let _ = shutdown.await;
                },
            )
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "status page stopped");
        }
    });
    tracing::info!(%addr, "status page listening");
    Ok((addr, join))
}

/// Refuse to expose a scheduler beyond loopback without a token unless `--insecure`.
fn check_exposure(config: &SchedulerConfig) -> Result<()> {
    let loopback = volley_core::security::is_loopback_host(&config.host);
    if loopback || config.security.token().is_some() || config.insecure {
        return Ok(());
    }
    Err(VolleyError::Config(format!(
        "refusing to listen on {} without an auth token: set --auth-token / {} (or pass --insecure)",
        config.host,
        volley_core::security::TOKEN_ENV
    )))
}

/// Bind and serve a scheduler.
pub async fn start_scheduler(config: SchedulerConfig) -> Result<SchedulerHandle> {
    check_exposure(&config)?;
    let sandbox = match &config.allowed_paths {
        Some(roots) => Sandbox::new(roots, config.allow_ddl)?,
        None => Sandbox::unrestricted(config.allow_ddl),
    };
    let server = config.security.server()?.layer(InterceptorLayer::new(
        config.security.server_interceptor("scheduler"),
    ));
    let listener = TcpListener::bind((config.host.as_str(), config.port))
        .await
        .map_err(|e| VolleyError::Connect {
            address: format!("{}:{}", config.host, config.port),
            message: format!("cannot bind scheduler: {e}"),
        })?;
    let addr = listener.local_addr()?;
    let policy = SchedulerPolicy {
        task_max_attempts: config.task_max_attempts.max(1),
        stage_max_attempts: config.stage_max_attempts.max(1),
        round_robin: config.round_robin,
        max_concurrent_jobs: config.max_concurrent_jobs,
    };
    let metrics = SchedulerMetrics::new()?;
    let service = SchedulerService::new(Arc::new(config.clone()), policy, sandbox, metrics)?;
    service.start_background();
    let (tx, rx) = oneshot::channel::<()>();
    let (http_tx, http_rx) = oneshot::channel::<()>();
    let grpc = SchedulerGrpcServer::new(service.clone())
        .max_decoding_message_size(config.max_message_size)
        .max_encoding_message_size(config.max_message_size);
    let join = tokio::spawn(async move {
        let mut server = server;
        let result = server
            .add_service(grpc)
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    let _ = rx.await;
                },
            )
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "scheduler server stopped");
        }
    });
    tracing::info!(%addr, "scheduler listening");
    let (http_addr, http) = match config.http_port {
        Some(port) => {
            let (addr, join) = start_http(&config, port, service.clone(), http_rx).await?;
            (Some(addr), Some(join))
        }
        None => (None, None),
    };
    Ok(SchedulerHandle {
        addr,
        http_addr,
        http_shutdown: Some(http_tx),
        http,
        scheme: config.security.scheme(),
        service,
        shutdown: Some(tx),
        join: Some(join),
    })
}
