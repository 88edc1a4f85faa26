//! L8: a standby scheduler (state in etcd, another scheduler leads). It binds the scheduler's
//! ports while it waits: every gRPC call gets `UNAVAILABLE` "not the leader; the leader is
//! URL" (the URL also in the `volley-leader` metadata), which clients and executors follow,
//! and the status page and JSON API serve the job history read-only from the shared state
//! (`/readyz` answers 503, so a load balancer sends calls to the leader only).
//! When it wins the leadership it stops both and the scheduler starts as the leader.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::codegen::{Service, http};
use tonic::transport::server::TcpIncoming;
use volley_core::failover::standby_refusal;
use volley_core::sandbox::Sandbox;
use volley_core::{Result, VolleyError};

use crate::config::SchedulerConfig;
use crate::metrics::SchedulerMetrics;
use crate::service::SchedulerService;
use crate::store::StateStore;

/// Answers every call of the scheduler service with "not the leader".
#[derive(Clone)]
struct NotTheLeader {
    leader: Arc<Mutex<Option<String>>>,
}

impl tonic::server::NamedService for NotTheLeader {
    const NAME: &'static str = "volley.SchedulerGrpc";
}

impl<B> Service<http::Request<B>> for NotTheLeader {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::future::Ready<std::result::Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::result::Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<B>) -> Self::Future {
        let status = standby_refusal(self.leader.lock().as_deref());
        std::future::ready(Ok(status.into_http()))
    }
}

/// A standby's servers.
pub struct Standby {
    leader: Arc<Mutex<Option<String>>>,
    service: SchedulerService,
    stops: Vec<oneshot::Sender<()>>,
    joins: Vec<JoinHandle<()>>,
}

impl Standby {
    /// Bind the scheduler's ports as a standby reading `store`.
    pub async fn start(
        config: &SchedulerConfig,
        sandbox: Sandbox,
        store: Arc<dyn StateStore>,
    ) -> Result<Self> {
        let leader = Arc::new(Mutex::new(None));
        let metrics = SchedulerMetrics::new()?;
        let service = SchedulerService::new(Arc::new(config.clone()), sandbox, metrics, store)?;
        service.mark_standby();
        let listener = TcpListener::bind((config.host.as_str(), config.port))
            .await
            .map_err(|e| VolleyError::Connect {
                address: format!("{}:{}", config.host, config.port),
                message: format!("cannot bind the standby scheduler: {e}"),
            })?;
        let (stop, stopped) = oneshot::channel::<()>();
        let refuse = NotTheLeader {
            leader: Arc::clone(&leader),
        };
        let mut server = config.security.server()?;
        let grpc = tokio::spawn(async move {
            let served = server
                .add_service(refuse)
                .serve_with_incoming_shutdown(
                    TcpIncoming::from(listener).with_nodelay(Some(true)),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "standby server stopped");
            }
        });
        let mut standby = Self {
            leader,
            service: service.clone(),
            stops: vec![stop],
            joins: vec![grpc],
        };
        if let Some(port) = config.http_port {
            let (stop, stopped) = oneshot::channel::<()>();
            let (_, join) = crate::web::serve(config, port, service, stopped).await?;
            standby.stops.push(stop);
            standby.joins.push(join);
        }
        Ok(standby)
    }

    /// The scheduler leading now (named in refusals), and the history it recorded.
    pub fn update(&self, leader: Option<String>) {
        *self.leader.lock() = leader;
        self.service.reload_history();
    }

    /// Stop serving and release the ports.
    pub async fn stop(self) {
        for stop in self.stops {
            let _ = stop.send(());
        }
        for join in self.joins {
            let _ = join.await;
        }
    }
}
