//! The stage graph as SVG.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::fmt::bytes;
use crate::views::StageSummary;
use crate::web::html::esc;

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
