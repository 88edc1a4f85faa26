//! The scheduler's web status page (server-rendered HTML, SVG stage graph), its JSON API under
//! `/api/` and Prometheus metrics at `/metrics`. When the cluster has an auth token every page
//! needs it (`Authorization: Bearer`, or `?token=` once, which sets a cookie); cancelling a job
//! always needs it.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;

use crate::service::SchedulerService;
use crate::views::{self, ExecutorView, JobDetail, JobSummary, StageDetail, StageSummary};

const TOKEN_COOKIE: &str = "volley_token";

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
        .with_state(service)
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
    if security.token().is_none() {
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
    if !security.token_matches(presented.as_deref()) {
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

fn not_found(what: &str) -> Response {
    (StatusCode::NOT_FOUND, format!("{what} not found\n")).into_response()
}

/// `?limit=N&offset=M` of `/api/jobs` (newest first; limit at most 1000, default 100).
#[derive(Deserialize)]
struct Page {
    limit: Option<usize>,
    offset: Option<usize>,
}

async fn api_jobs(State(service): State<SchedulerService>, Query(page): Query<Page>) -> Response {
    let limit = page.limit.unwrap_or(100).min(1000);
    let offset = page.offset.unwrap_or(0);
    let jobs: Vec<_> = service
        .with_state(views::jobs)
        .into_iter()
        .skip(offset)
        .take(limit)
        .collect();
    axum::Json(jobs).into_response()
}

async fn api_job(State(service): State<SchedulerService>, Path(job_id): Path<String>) -> Response {
    match service.with_state(|s| views::job_detail(s, &job_id)) {
        Some(job) => axum::Json(job).into_response(),
        None => not_found(&format!("job {job_id}")),
    }
}

async fn api_stage(
    State(service): State<SchedulerService>,
    Path((job_id, stage_id)): Path<(String, u32)>,
) -> Response {
    match service.with_state(|s| views::stage_detail(s, &job_id, stage_id)) {
        Some(stage) => axum::Json(stage).into_response(),
        None => not_found(&format!("stage {stage_id} of job {job_id}")),
    }
}

async fn api_executors(State(service): State<SchedulerService>) -> Response {
    axum::Json(service.with_state(views::executors)).into_response()
}

async fn api_cancel(
    State(service): State<SchedulerService>,
    Path(job_id): Path<String>,
) -> Response {
    let cancelled = service.cancel(&job_id).await;
    axum::Json(serde_json::json!({ "job_id": job_id, "cancelled": cancelled })).into_response()
}

async fn cancel_form(
    State(service): State<SchedulerService>,
    Path(job_id): Path<String>,
) -> Response {
    service.cancel(&job_id).await;
    Redirect::to(&format!("/jobs/{job_id}")).into_response()
}

async fn metrics(State(service): State<SchedulerService>) -> Response {
    let text = service.render_metrics();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// Minimal HTML escaping for text and attribute values.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Human-readable byte count (B, KiB, MiB, ...).
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn duration(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        format!("{:.2} s", ms as f64 / 1000.0)
    }
}

fn page(title: &str, refresh: bool, body: &str) -> Html<String> {
    let refresh = if refresh {
        "<meta http-equiv=\"refresh\" content=\"1\">"
    } else {
        ""
    };
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\">{refresh}<title>{} · Volley</title>\
<style>body{{font-family:system-ui,sans-serif;margin:1.5em;color:#222}}nav a{{margin-right:1em}}\
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:left;font-size:14px}}\
th{{background:#f3f3f3}}.state-running{{color:#1565c0}}.state-succeeded{{color:#2e7d32}}.state-failed{{color:#c62828}}\
.state-queued,.state-pending{{color:#777}}.state-cancelled{{color:#8d6e63}}pre{{background:#f7f7f7;padding:.5em;overflow:auto}}\
.error{{color:#c62828;white-space:pre-wrap}}.skew{{color:#e65100;font-weight:bold}}</style></head>\
<body><nav><b>Volley</b> <a href=\"/jobs\">Jobs</a><a href=\"/executors\">Executors</a><a href=\"/metrics\">Metrics</a></nav>\
<h1>{}</h1>{body}</body></html>",
        esc(title),
        esc(title)
    ))
}

fn state_cell(state: &str) -> String {
    format!("<td class=\"state state-{0}\">{0}</td>", esc(state))
}

fn job_rows(jobs: &[JobSummary]) -> String {
    let mut html = String::from(
        "<table id=\"jobs\"><tr><th>Job</th><th>State</th><th>SQL</th><th>Submitted</th>\
<th>Duration</th><th>Stages</th><th>Tasks</th><th>Rows out</th></tr>",
    );
    for job in jobs {
        let sql: String = job.sql.chars().take(160).collect();
        let _ = write!(
            html,
            "<tr class=\"job\" data-job=\"{id}\"><td><a href=\"/jobs/{id}\">{id}</a></td>{state}<td><code>{sql}</code></td>\
<td class=\"time\" data-ms=\"{sub}\">{sub}</td><td>{dur}</td><td>{sd}/{st}</td><td>{td}/{tt}</td><td>{rows}</td></tr>",
            id = esc(&job.id),
            state = state_cell(&job.state),
            sql = esc(&sql),
            sub = job.submitted_at_ms,
            dur = duration(job.duration_ms),
            sd = job.stages_done,
            st = job.stages_total,
            td = job.tasks_done,
            tt = job.tasks_total,
            rows = job.rows_out,
        );
    }
    html.push_str("</table>");
    html
}

/// Show epoch-millisecond cells as local times.
const LOCAL_TIMES: &str = "<script>for(const c of document.querySelectorAll('.time[data-ms]')){\
c.textContent=new Date(Number(c.dataset.ms)).toLocaleString();}</script>";

async fn jobs_page(State(service): State<SchedulerService>) -> Html<String> {
    let jobs = service.with_state(views::jobs);
    let active = |s: &str| s == "running" || s == "queued";
    let refresh = jobs.iter().any(|j| active(&j.state));
    let mut body = String::new();
    for (title, states) in [
        ("Running", &["running", "queued"][..]),
        ("Succeeded", &["succeeded"][..]),
        ("Failed", &["failed", "cancelled"][..]),
    ] {
        let group: Vec<JobSummary> = jobs
            .iter()
            .filter(|j| states.contains(&j.state.as_str()))
            .cloned()
            .collect();
        let _ = write!(body, "<h2>{title} ({})</h2>", group.len());
        if !group.is_empty() {
            body.push_str(&job_rows(&group));
        }
    }
    body.push_str(LOCAL_TIMES);
    page("Jobs", refresh, &body)
}

/// The stage graph as SVG: columns by depth (inputs left of consumers), one box per stage.
pub fn stage_svg(job_id: &str, stages: &[StageSummary]) -> String {
    let mut depth: BTreeMap<u32, usize> = BTreeMap::new();
    for stage in stages {
        let d = stage
            .inputs
            .iter()
            .filter_map(|i| depth.get(i))
            .map(|d| d + 1)
            .max()
            .unwrap_or(0);
        depth.insert(stage.id, d);
    }
    let mut rows_in_column: BTreeMap<usize, usize> = BTreeMap::new();
    let mut position: BTreeMap<u32, (usize, usize)> = BTreeMap::new();
    for stage in stages {
        let column = depth.get(&stage.id).copied().unwrap_or(0);
        let row = rows_in_column.entry(column).or_default();
        position.insert(stage.id, (column, *row));
        *row += 1;
    }
    let (w, h, gap_x, gap_y) = (190usize, 64usize, 60usize, 24usize);
    let columns = rows_in_column.len().max(1);
    let rows = rows_in_column.values().copied().max().unwrap_or(1);
    let width = columns * (w + gap_x) + 20;
    let height = rows * (h + gap_y) + 20;
    let xy = |id: u32| {
        let (c, r) = position.get(&id).copied().unwrap_or((0, 0));
        (10 + c * (w + gap_x), 10 + r * (h + gap_y))
    };
    let mut svg = format!(
        "<svg id=\"dag\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
viewBox=\"0 0 {width} {height}\"><defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" \
markerWidth=\"6\" markerHeight=\"6\" orient=\"auto\"><path d=\"M0,0 L10,5 L0,10 z\" fill=\"#888\"/></marker></defs>"
    );
    for stage in stages {
        let (x2, y2) = xy(stage.id);
        for input in &stage.inputs {
            let (x1, y1) = xy(*input);
            let _ = write!(
                svg,
                "<line class=\"edge\" x1=\"{}\" y1=\"{}\" x2=\"{x2}\" y2=\"{}\" stroke=\"#888\" marker-end=\"url(#arrow)\"/>",
                x1 + w,
                y1 + h / 2,
                y2 + h / 2
            );
        }
    }
    for stage in stages {
        let (x, y) = xy(stage.id);
        let fill = match stage.state.as_str() {
            "succeeded" => "#e8f5e9",
            "running" => "#e3f2fd",
            "failed" => "#ffebee",
            _ => "#f5f5f5",
        };
        let _ = write!(
            svg,
            "<a href=\"/jobs/{job}/stages/{id}\"><g class=\"stage\" data-stage=\"{id}\" data-state=\"{state}\">\
<rect x=\"{x}\" y=\"{y}\" width=\"{w}\" height=\"{h}\" rx=\"6\" fill=\"{fill}\" stroke=\"#555\"/>\
<text x=\"{tx}\" y=\"{t1}\" font-size=\"13\" font-weight=\"bold\">Stage {id} · {kind}</text>\
<text x=\"{tx}\" y=\"{t2}\" font-size=\"12\">{state} · tasks {done}/{total}</text>\
<text x=\"{tx}\" y=\"{t3}\" font-size=\"12\">{rows} rows · {bytes}</text></g></a>",
            job = esc(job_id),
            id = stage.id,
            state = esc(&stage.state),
            kind = esc(&stage.kind),
            tx = x + 8,
            t1 = y + 18,
            t2 = y + 36,
            t3 = y + 54,
            done = stage.tasks_done,
            total = stage.partitions,
            rows = stage.rows_out,
            bytes = bytes(stage.bytes_out),
        );
    }
    svg.push_str("</svg>");
    svg
}

fn plan_html(stage: &StageSummary) -> String {
    let mut text = String::new();
    for op in &stage.plan {
        let metrics: Vec<String> = op
            .metrics
            .iter()
            .map(|(name, value)| {
                if name.contains("time") || name.contains("elapsed") {
                    format!("{name}={:.3}ms", *value as f64 / 1e6)
                } else {
                    format!("{name}={value}")
                }
            })
            .collect();
        let _ = writeln!(
            text,
            "{}{}{}",
            "  ".repeat(op.depth),
            op.operator,
            if metrics.is_empty() {
                String::new()
            } else {
                format!(", metrics=[{}]", metrics.join(", "))
            }
        );
    }
    format!("<pre class=\"plan\">{}</pre>", esc(&text))
}

fn stage_table(job_id: &str, stages: &[StageSummary]) -> String {
    let mut html = String::from(
        "<table id=\"stages\"><tr><th>Stage</th><th>Kind</th><th>State</th><th>Tasks</th><th>Inputs</th>\
<th>Rows in</th><th>Bytes in</th><th>Rows out</th><th>Bytes out</th><th>Shuffle</th><th>Spill</th><th>Duration</th><th>Adaptive</th></tr>",
    );
    for s in stages {
        let inputs: Vec<String> = s.inputs.iter().map(u32::to_string).collect();
        let _ = write!(
            html,
            "<tr><td><a href=\"/jobs/{job}/stages/{id}\">Stage {id}</a></td><td>{kind}</td>{state}<td>{done}/{total}</td>\
<td>{inputs}</td><td>{ri}</td><td>{bi}</td><td>{ro}</td><td>{bo}</td><td>{sh}</td><td>{sp}</td><td>{dur}</td><td class=\"adaptive\">{adaptive}</td></tr>",
            job = esc(job_id),
            id = s.id,
            kind = esc(&s.kind),
            state = state_cell(&s.state),
            done = s.tasks_done,
            total = s.partitions,
            inputs = inputs.join(", "),
            ri = s.rows_in,
            bi = bytes(s.bytes_in),
            ro = s.rows_out,
            bo = bytes(s.bytes_out),
            sh = bytes(s.shuffle_bytes),
            sp = bytes(s.spilled_bytes),
            dur = duration(s.duration_ms),
            adaptive = esc(&s.adaptive.join("; ")),
        );
    }
    html.push_str("</table>");
    html
}

async fn job_page(State(service): State<SchedulerService>, Path(job_id): Path<String>) -> Response {
    let Some(JobDetail { job, stages }) = service.with_state(|s| views::job_detail(s, &job_id))
    else {
        return not_found(&format!("job {job_id}"));
    };
    let active = job.state == "running" || job.state == "queued";
    let mut body = format!(
        "<p>State: <span id=\"job-state\" class=\"state-{state}\">{state}</span> · submitted \
<span class=\"time\" data-ms=\"{sub}\">{sub}</span> · duration {dur} · stages {sd}/{st} · tasks {td}/{tt} · rows out {rows}</p>\
<pre>{sql}</pre>",
        state = esc(&job.state),
        sub = job.submitted_at_ms,
        dur = duration(job.duration_ms),
        sd = job.stages_done,
        st = job.stages_total,
        td = job.tasks_done,
        tt = job.tasks_total,
        rows = job.rows_out,
        sql = esc(&job.sql),
    );
    if let Some(error) = &job.error {
        let _ = write!(
            body,
            "<p class=\"error\" id=\"job-error\">{}</p>",
            esc(error)
        );
    }
    if active {
        let _ = write!(
            body,
            "<form method=\"post\" action=\"/jobs/{}/cancel\"><button id=\"cancel\" type=\"submit\">Cancel job</button></form>",
            esc(&job.id)
        );
    }
    body.push_str("<h2>Stages</h2>");
    body.push_str(&stage_svg(&job.id, &stages));
    body.push_str(&stage_table(&job.id, &stages));
    body.push_str("<h2>Plans</h2>");
    for stage in &stages {
        let _ = write!(body, "<h3>Stage {} ({})</h3>", stage.id, esc(&stage.kind));
        body.push_str(&plan_html(stage));
    }
    body.push_str(LOCAL_TIMES);
    page(&format!("Job {}", job.id), active, &body).into_response()
}

async fn stage_page(
    State(service): State<SchedulerService>,
    Path((job_id, stage_id)): Path<(String, u32)>,
) -> Response {
    let Some(StageDetail {
        stage,
        tasks,
        durations,
        skewed,
        ..
    }) = service.with_state(|s| views::stage_detail(s, &job_id, stage_id))
    else {
        return not_found(&format!("stage {stage_id} of job {job_id}"));
    };
    let active = stage.state == "running" || stage.state == "pending";
    let mut body = format!(
        "<p><a href=\"/jobs/{job}\">Job {job}</a> · {kind} stage · state <span class=\"state-{state}\">{state}</span> · \
tasks {done}/{total} · duration {dur}</p>",
        job = esc(&job_id),
        kind = esc(&stage.kind),
        state = esc(&stage.state),
        done = stage.tasks_done,
        total = stage.partitions,
        dur = duration(stage.duration_ms),
    );
    for note in &stage.adaptive {
        let _ = write!(body, "<p class=\"adaptive\">Adaptive: {}</p>", esc(note));
    }
    if let Some(d) = &durations {
        let _ = write!(
            body,
            "<p id=\"summary\">Task durations: min {} · median {} · max {}{}</p>",
            duration(d.min_ms),
            duration(d.median_ms),
            duration(d.max_ms),
            if skewed {
                " <span class=\"skew\" id=\"skew\">skew: the slowest task took over 3x the median</span>"
            } else {
                ""
            }
        );
    }
    body.push_str(
        "<table id=\"tasks\"><tr><th>Partition</th><th>Attempt</th><th>Executor</th><th>State</th><th>Start</th>\
<th>Duration</th><th>Rows</th><th>Bytes</th><th>Spill</th><th>Error</th></tr>",
    );
    for t in &tasks {
        let _ = write!(
            body,
            "<tr class=\"task\"><td>{p}</td><td>{a}</td><td>{e}</td>{s}<td class=\"time\" {start}></td><td>{d}</td>\
<td>{r}</td><td>{b}</td><td>{sp}</td><td class=\"error\">{err}</td></tr>",
            p = t.partition,
            a = t.attempt,
            e = esc(t.executor.as_deref().unwrap_or("")),
            s = state_cell(&t.state),
            start = t
                .started_at_ms
                .map(|ms| format!("data-ms=\"{ms}\""))
                .unwrap_or_default(),
            d = t.duration_ms.map(duration).unwrap_or_default(),
            r = t.rows,
            b = bytes(t.bytes),
            sp = bytes(t.spilled_bytes),
            err = esc(t.error.as_deref().unwrap_or("")),
        );
    }
    body.push_str("</table><h2>Plan</h2>");
    body.push_str(&plan_html(&stage));
    body.push_str(LOCAL_TIMES);
    page(&format!("Stage {stage_id}"), active, &body).into_response()
}

async fn executors_page(State(service): State<SchedulerService>) -> Html<String> {
    let executors: Vec<ExecutorView> = service.with_state(views::executors);
    let mut body = String::from(
        "<table id=\"executors\"><tr><th>Id</th><th>Address</th><th>State</th><th>Slots</th><th>Running</th>\
<th>Completed</th><th>Failed</th><th>Last heartbeat</th><th>Shuffle held</th></tr>",
    );
    for e in &executors {
        let _ = write!(
            body,
            "<tr class=\"executor\"><td>{}</td><td>{}</td>{}<td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1} s ago</td><td>{}</td></tr>",
            esc(&e.id),
            esc(&e.address),
            state_cell(&e.state),
            e.slots,
            e.running_tasks,
            e.completed_tasks,
            e.failed_tasks,
            e.last_heartbeat_age_ms as f64 / 1000.0,
            bytes(e.shuffle_bytes_held)
        );
    }
    body.push_str("</table>");
    page("Executors", false, &body)
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
