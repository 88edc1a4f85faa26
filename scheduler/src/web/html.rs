//! HTML pieces every page shares: escaping, the page frame, state cells, local times.

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};

pub fn not_found(what: &str) -> Response {
    (StatusCode::NOT_FOUND, format!("{what} not found\n")).into_response()
}

/// Minimal HTML escaping for text and attribute values.
pub fn esc(text: &str) -> String {
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

pub fn page(title: &str, refresh: bool, body: &str) -> Html<String> {
    let refresh = if refresh {
        "<meta http-equiv=\"refresh\" content=\"1\">"
    } else {
        ""
    };
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\">{refresh}<title>{} · Volley</title>\
<style>body{{font-family:system-ui,sans-serif;margin:1.5em;color:#222}}nav a{{margin-right:1em}}\
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:left;font-size:14px}}\
th{{background:#f3f3f3}}.state-running{{color:#1565c0}}.state-succeeded,.state-cached{{color:#2e7d32}}.state-failed{{color:#c62828}}\
.state-queued,.state-pending{{color:#777}}.state-cancelled{{color:#8d6e63}}pre{{background:#f7f7f7;padding:.5em;overflow:auto}}\
.error{{color:#c62828;white-space:pre-wrap}}.skew{{color:#e65100;font-weight:bold}}</style></head>\
<body><nav><b>Volley</b> <a href=\"/jobs\">Jobs</a><a href=\"/executors\">Executors</a><a href=\"/metrics\">Metrics</a></nav>\
<h1>{}</h1>{body}</body></html>",
        esc(title),
        esc(title)
    ))
}

pub fn state_cell(state: &str) -> String {
    format!("<td class=\"state state-{0}\">{0}</td>", esc(state))
}

/// Show epoch-millisecond cells as local times.
pub const LOCAL_TIMES: &str = "<script>for(const c of document.querySelectorAll('.time[data-ms]')){\
c.textContent=new Date(Number(c.dataset.ms)).toLocaleString();}</script>";
