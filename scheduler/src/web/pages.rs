//! The HTML pages: jobs, one job (stage graph, stage table, plans), one stage (tasks) and the
//! executors, plus the cancel form.

use std::fmt::Write as _;

use axum::extract::{Path, Query, State};
use axum::response::{Html, IntoResponse, Redirect, Response};

use crate::fmt::{bytes, duration};
use crate::service::SchedulerService;
use crate::views::{self, ExecutorView, JobDetail, JobSummary, StageDetail, StageSummary};
use crate::web::html::{LOCAL_TIMES, esc, not_found, page, state_cell};
use crate::web::svg::stage_svg;

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
            state = match job.cached_age_ms {
                Some(age) => format!(
                    "<td class=\"state state-cached\">cached ({} old)</td>",
                    duration(age)
                ),
                None => state_cell(&job.state),
            },
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

/// `/?ddl=true` lists DDL and SET statements too.
#[derive(serde::Deserialize)]
pub struct JobsQuery {
    #[serde(default)]
    ddl: bool,
}

pub async fn jobs_page(
    State(service): State<SchedulerService>,
    Query(query): Query<JobsQuery>,
) -> Html<String> {
    let jobs = service.jobs(query.ddl);
    let hidden = if query.ddl {
        0
    } else {
        service.jobs(true).len() - jobs.len()
    };
    let active = |s: &str| s == "running" || s == "queued";
    let refresh = jobs.iter().any(|j| active(&j.state));
    let mut body = String::new();
    for (title, states) in [
        ("Running", &["running", "queued"][..]),
        ("Succeeded", &["succeeded", "cached"][..]),
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
    if query.ddl {
        body.push_str("<p><a href=\"/\">hide DDL and SET statements</a></p>");
    } else if hidden > 0 {
        let _ = write!(
            body,
            "<p><a href=\"/?ddl=true\">show {hidden} DDL and SET statements</a></p>"
        );
    }
    body.push_str(LOCAL_TIMES);
    page("Jobs", refresh, &body)
}

pub async fn cancel_form(
    State(service): State<SchedulerService>,
    Path(job_id): Path<String>,
) -> Response {
    service.cancel(&job_id).await;
    Redirect::to(&format!("/jobs/{job_id}")).into_response()
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

pub async fn job_page(
    State(service): State<SchedulerService>,
    Path(job_id): Path<String>,
) -> Response {
    let Some(JobDetail { job, stages }) = service.job_detail(&job_id) else {
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
    if stages.is_empty() && job.stages_total > 0 {
        body.push_str("<p id=\"history-only\">Recorded before the scheduler restarted: its stages were not kept.</p>");
    }
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

pub async fn stage_page(
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

pub async fn executors_page(State(service): State<SchedulerService>) -> Html<String> {
    let executors: Vec<ExecutorView> = service.with_state(views::executors);
    let mut body = String::from(
        "<table id=\"executors\"><tr><th>Id</th><th>Address</th><th>State</th><th>Slots</th><th>Running</th>\
<th>Completed</th><th>Failed</th><th>Last heartbeat</th><th>Shuffle held</th><th>Cached tables</th></tr>",
    );
    for e in &executors {
        let _ = write!(
            body,
            "<tr class=\"executor\"><td>{}</td><td>{}</td>{}<td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1} s ago</td><td>{}</td><td>{}</td></tr>",
            esc(&e.id),
            esc(&e.address),
            state_cell(&e.state),
            e.slots,
            e.running_tasks,
            e.completed_tasks,
            e.failed_tasks,
            e.last_heartbeat_age_ms as f64 / 1000.0,
            bytes(e.shuffle_bytes_held),
            bytes(e.cached_bytes)
        );
    }
    body.push_str("</table>");
    page("Executors", false, &body)
}
