//! The JSON API under `/api/` and Prometheus metrics at `/metrics`.

use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::service::SchedulerService;
use crate::views;
use crate::web::html::not_found;

/// `?limit=N&offset=M&ddl=true` of `/api/jobs` (newest first; limit at most 1000, default 100;
/// DDL and SET statements only with `ddl=true`).
#[derive(Deserialize)]
pub struct Page {
    /// Jobs per page (default 100, at most 1000).
    pub limit: Option<usize>,
    /// Jobs to skip.
    pub offset: Option<usize>,
    /// List DDL and SET statements too (hidden by default).
    #[serde(default)]
    pub ddl: bool,
}

pub async fn api_jobs(
    State(service): State<SchedulerService>,
    Query(page): Query<Page>,
) -> Response {
    let limit = page.limit.unwrap_or(100).min(1000);
    let offset = page.offset.unwrap_or(0);
    let jobs: Vec<_> = service
        .jobs(page.ddl)
        .into_iter()
        .skip(offset)
        .take(limit)
        .collect();
    axum::Json(jobs).into_response()
}

pub async fn api_job(
    State(service): State<SchedulerService>,
    Path(job_id): Path<String>,
) -> Response {
    // A job from before a restart is known by its recorded summary only.
    match service.job_detail(&job_id) {
        Some(job) => axum::Json(job).into_response(),
        None => not_found(&format!("job {job_id}")),
    }
}

pub async fn api_stage(
    State(service): State<SchedulerService>,
    Path((job_id, stage_id)): Path<(String, u32)>,
) -> Response {
    match service.with_state(|s| views::stage_detail(s, &job_id, stage_id)) {
        Some(stage) => axum::Json(stage).into_response(),
        None => not_found(&format!("stage {stage_id} of job {job_id}")),
    }
}

pub async fn api_executors(State(service): State<SchedulerService>) -> Response {
    axum::Json(service.with_state(views::executors)).into_response()
}

pub async fn api_cancel(
    State(service): State<SchedulerService>,
    Path(job_id): Path<String>,
) -> Response {
    let cancelled = service.cancel(&job_id).await;
    axum::Json(serde_json::json!({ "job_id": job_id, "cancelled": cancelled })).into_response()
}

pub async fn metrics(State(service): State<SchedulerService>) -> Response {
    let text = service.render_metrics();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
