//! L7: the scheduler's web status page (server-rendered HTML, SVG stage graph), its JSON API under
//! `/api/` and Prometheus metrics at `/metrics`. When the cluster has an auth token every page
//! needs the cluster's credential (`Authorization: Bearer`, or `?token=` once, which sets a
//! cookie): the cluster token, or the only token of a one-token cluster — pages list every
//! session's jobs, which the client token may not see. Cancelling a job always needs it.
//!
//! `/healthz` and `/readyz` (probes) need no token.
//!
//! [`api`] serves the JSON API and metrics, [`pages`] the HTML pages, [`svg`] the stage graph,
//! [`html`] the shared HTML pieces; this module routes and checks the token.

use axum::Router;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use volley_core::security::Role;

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use volley_core::{Result, VolleyError};

use crate::config::SchedulerConfig;
use crate::service::SchedulerService;

pub mod api;
pub mod html;
pub mod pages;
pub mod svg;

use api::{api_cancel, api_executors, api_job, api_jobs, api_stage, metrics};
use pages::{cancel_form, executors_page, job_page, jobs_page, stage_page};

const TOKEN_COOKIE: &str = "volley_token";

/// Serve the status page and JSON API on `host:port` (TLS like the gRPC server).
pub async fn serve(
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
    let routes = tonic::service::Routes::from(router(service));
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

/// The status page's routes.
pub fn router(service: SchedulerService) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/jobs") }))
        .route("/jobs", get(jobs_page))
        .route("/jobs/{job_id}", get(job_page))
        .route("/jobs/{job_id}/cancel", post(cancel_form))
        .route("/jobs/{job_id}/stages/{stage_id}", get(stage_page))
        .route("/executors", get(executors_page))
        .route("/api/jobs", get(api_jobs))
        .route("/api/jobs/{job_id}", get(api_job))
        .route("/api/jobs/{job_id}/cancel", post(api_cancel))
        .route("/api/jobs/{job_id}/stages/{stage_id}", get(api_stage))
        .route("/api/executors", get(api_executors))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(
            service.clone(),
            require_token,
        ))
        // Probes carry no token: these say only whether the scheduler serves.
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(service)
}

/// Ready: the scheduler accepts jobs (its gRPC server is up once this page serves). Executors
/// are not required: they register through the very Service that waits for readiness.
async fn readyz(State(service): State<SchedulerService>) -> (StatusCode, String) {
    if service.is_standby() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "standby: another scheduler leads\n".to_string(),
        );
    }
    let executors = service.with_state(|s| s.alive_executors().count());
    (StatusCode::OK, format!("ready: {executors} executors\n"))
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

fn presented_token(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        return Some(value.to_string());
    }
    if let Some(token) = query {
        return Some(format!("Bearer {token}"));
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == TOKEN_COOKIE)
        .map(|(_, value)| format!("Bearer {value}"))
}

async fn require_token(
    State(service): State<SchedulerService>,
    Query(query): Query<TokenQuery>,
    request: Request,
    next: Next,
) -> Response {
    let security = service.security();
    if security.token().is_none() && security.cluster_token().is_none() {
        // Without a token the page is meant for this machine: a page of some web site that a
        // browser here visits may not read it by rebinding its DNS name to 127.0.0.1.
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !host_allowed(host, service.bind_host()) {
            tracing::warn!(host, "rejected HTTP request for another host name");
            return (
                StatusCode::FORBIDDEN,
                format!("403 Forbidden: Host {host:?} is not this scheduler's address\n"),
            )
                .into_response();
        }
        return next.run(request).await;
    }
    let presented = presented_token(request.headers(), query.token.as_deref());
    let role = security.role_of(presented.as_deref());
    if role == Some(Role::Client) {
        // Every session's jobs are listed here: client credentials see only their own (gRPC).
        tracing::warn!(path = %request.uri().path(), "rejected HTTP request with the client token");
        return (
            StatusCode::FORBIDDEN,
            "403 Forbidden: the status page and JSON API need the cluster token \
             (--cluster-token); the client token may only see its own session's jobs\n",
        )
            .into_response();
    }
    if role.is_none() {
        tracing::warn!(
            path = %request.uri().path(),
            reason = if presented.is_some() { "wrong auth token" } else { "missing auth token" },
            "rejected unauthenticated HTTP request"
        );
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "401 Unauthorized: this Volley cluster needs its auth token \
             (Authorization: Bearer <token>, or ?token=<token>)\n",
        )
            .into_response();
    }
    let mut response = next.run(request).await;
    let secure = if security.tls_enabled() {
        "; Secure"
    } else {
        ""
    };
    if let Some(token) = query.token
        && let Ok(cookie) =
            format!("{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict{secure}").parse()
    {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

/// A `Host` header naming a loopback address, `localhost` or the address the scheduler binds.
fn host_allowed(host: &str, bind_host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    volley_core::security::is_loopback_host(name)
        || name.eq_ignore_ascii_case(bind_host)
        || (bind_host == "0.0.0.0" || bind_host == "::") && name.parse::<std::net::IpAddr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::host_allowed;

    #[test]
    fn host_header_names_this_scheduler() {
        assert!(host_allowed("127.0.0.1:50080", "127.0.0.1"));
        assert!(host_allowed("localhost:50080", "127.0.0.1"));
        assert!(host_allowed("[::1]:50080", "127.0.0.1"));
        assert!(host_allowed("10.0.0.5:50080", "10.0.0.5"));
        assert!(host_allowed("10.0.0.5:50080", "0.0.0.0"));
        assert!(!host_allowed("evil.example:50080", "127.0.0.1"));
        assert!(!host_allowed("evil.example", "0.0.0.0"));
        assert!(!host_allowed("", "127.0.0.1"));
    }
}
