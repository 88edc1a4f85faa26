//! L8: starting and stopping a scheduler: the gRPC server, the status page and the
//! background loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use volley_core::protobuf::scheduler_grpc_server::SchedulerGrpcServer;
use volley_core::sandbox::Sandbox;
use volley_core::{Result, VolleyError};

use crate::config::SchedulerConfig;
use crate::metrics::SchedulerMetrics;
use crate::service::SchedulerService;
use crate::standby::Standby;
use crate::store::StateStore;
use crate::store::etcd::{Campaign, EtcdStore};

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
    /// Turns true when this scheduler loses its leadership (state in etcd).
    lost: Option<watch::Receiver<bool>>,
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

    /// Returns once this scheduler lost its leadership of the schedulers sharing its state in
    /// etcd (its lease could not be renewed, or another one took over); never otherwise. A
    /// scheduler that lost it must stop: the new leader runs its jobs.
    pub async fn leadership_lost(&mut self) {
        match self.lost.as_mut() {
            Some(lost) => {
                let _ = lost.wait_for(|lost| *lost).await;
            }
            None => std::future::pending().await,
        }
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
        self.service.resign().await;
        if let Some(join) = self.join.take() {
            let _ = join.await;
        }
        if let Some(join) = self.http.take() {
            let _ = join.await;
        }
    }
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
    let server = config.security.server()?;
    // A standby waits here until it leads (refusing calls on the port meanwhile).
    let (store, lost) = open_state(&config, &sandbox).await?;
    let listener = TcpListener::bind((config.host.as_str(), config.port))
        .await
        .map_err(|e| VolleyError::Connect {
            address: format!("{}:{}", config.host, config.port),
            message: format!("cannot bind scheduler: {e}"),
        })?;
    let addr = listener.local_addr()?;
    let metrics = SchedulerMetrics::new()?;
    let service = SchedulerService::new(Arc::new(config.clone()), sandbox, metrics, store)?;
    service.register_tables(&config.tables).await?;
    service.restore_sessions().await?;
    service.resume_jobs().await?;
    service.start_background();
    let (tx, rx) = oneshot::channel::<()>();
    let (http_tx, http_rx) = oneshot::channel::<()>();
    let grpc = InterceptedService::new(
        SchedulerGrpcServer::new(service.clone())
            .max_decoding_message_size(config.max_message_size)
            .max_encoding_message_size(config.max_message_size),
        config.security.server_interceptor("scheduler"),
    );
    // Flight SQL on the same port, behind the same token check (and HTTP Basic with the token).
    let flight_sql = InterceptedService::new(
        crate::flight_sql::FlightSqlServer::new(service.clone())
            .into_server(config.max_message_size),
        crate::flight_sql::FlightSqlAuth(config.security.server_interceptor("scheduler")),
    );
    // The standard gRPC health service answers without a token (probes carry none); it says
    // only whether this server is serving.
    let (_reporter, health) = tonic_health::server::health_reporter();
    let deposed = lost.clone();
    let join = tokio::spawn(async move {
        let mut server = server;
        let result = server
            .add_service(grpc)
            .add_service(flight_sql)
            .add_service(health)
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    // A scheduler that lost its leadership stops serving at once: another
                    // one may lead now.
                    match deposed {
                        Some(mut lost) => tokio::select! {
                            _ = rx => {}
                            _ = lost.wait_for(|lost| *lost) => {
                                tracing::error!("stopped serving: the leadership is lost");
                            }
                        },
                        None => {
                            let _ = rx.await;
                        }
                    }
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
            let (addr, join) = crate::web::serve(&config, port, service.clone(), http_rx).await?;
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
        lost,
    })
}

/// The state store of `config`: etcd (after winning the leadership: a standby waits for it
/// here, serving refusals and the history, campaigning again every second), a file, or memory.
async fn open_state(
    config: &SchedulerConfig,
    sandbox: &Sandbox,
) -> Result<(Arc<dyn StateStore>, Option<watch::Receiver<bool>>)> {
    let Some(url) = config.state_url.clone() else {
        let store = crate::store::open(config.state_dir.as_deref(), config.state_reset)?;
        return Ok((store, None));
    };
    let me = config.advertise_url.clone().unwrap_or_else(|| {
        format!(
            "{}://{}:{}",
            config.security.scheme(),
            config.host,
            config.port
        )
    });
    let etcd = tokio::task::spawn_blocking(move || EtcdStore::connect(&url))
        .await
        .map_err(|e| VolleyError::Internal(format!("connecting to etcd: {e}")))??;
    let etcd = Arc::new(etcd);
    let mut standby: Option<Standby> = None;
    let mut announced = None;
    loop {
        match etcd.campaign(&me) {
            Ok(Campaign::Leader(lost)) => {
                if let Some(standby) = standby.take() {
                    standby.stop().await;
                }
                tracing::info!(scheduler = %me, store = %etcd.location(), "this scheduler leads");
                return Ok((etcd, Some(lost)));
            }
            Ok(Campaign::Standby(leader)) => {
                let seen = Some(leader.clone().unwrap_or_default());
                if announced != seen {
                    tracing::info!(
                        leader = leader.as_deref().unwrap_or("none"),
                        "standby: another scheduler leads; waiting to take over"
                    );
                    announced = seen;
                }
                if standby.is_none() {
                    let store: Arc<dyn StateStore> = etcd.clone();
                    standby = Some(Standby::start(config, sandbox.clone(), store).await?);
                }
                if let Some(standby) = &standby {
                    standby.update(leader);
                }
            }
            // etcd went away after the start: stand by until it is back.
            Err(e) => {
                if announced.as_deref() != Some("") {
                    tracing::warn!(error = %e, "standby: cannot campaign for the leadership; trying again");
                    announced = Some(String::new());
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
