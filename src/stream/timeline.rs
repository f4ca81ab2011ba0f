//! A picture of one streamed pass: the copy and the compute intervals of each weight group on
//! two lanes along a time axis (three when pieces are decoded), so that a stall (the GPU
//! waiting for a copy or its decoding) can be seen.
//!
//! [`render_svg`] is a pure function from measured intervals to an SVG document: no
//! dependencies, the same bytes for the same input. Times are ms from the start of the pass;
//! a copy that starts before 0 is prefetch queued during the previous pass.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::size::human_bytes;
use crate::error::{Error, Result};

/// Which queue an interval ran on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// Host→device copies on the PCIe link (the copy stream).
    Copy,
    /// Kernels on the GPU (the compute stream).
    Compute,
    /// Decoding of a compressed piece, on a stream of its own between its copy and its
    /// compute.
    Decode,
}

/// One interval of one weight group.
#[derive(Clone, Debug, PartialEq)]
pub struct TimelineEvent {
    /// The group or piece as people name it: "block 3", "head 1/3". A compute interval is
    /// matched to the copy with the same label to find stalls; a compute interval with no copy
    /// of its label is a resident group.
    pub group: String,
    pub lane: Lane,
    /// ms from the start of the pass.
    pub start_ms: f64,
    pub end_ms: f64,
}

/// What the picture is of: its title and caption.
#[derive(Clone, Debug, PartialEq)]
pub struct PassInfo {
    /// The model as people name it: "Qwen2.5-7B shape (llama), 15.23 GB bf16".
    pub model: String,
    /// Which pass is drawn: "prompt pass of 4 × 512 tokens, the last of 5 timed runs".
    pub pass: String,
    /// The VRAM budget, bytes.
    pub vram_budget: usize,
    /// New tokens in the pass (all sequences together).
    pub tokens: usize,
    pub card: String,
    pub date: String,
    /// Measured time of the pass drawn, ms.
    pub pass_ms: f64,
    /// The physical bound max(compute, streamed bytes / H2D bandwidth), ms.
    pub bound_ms: f64,
    /// What sets the bound: "PCIe: 13.4 GB at 54.6 GB/s" or "compute".
    pub bound: String,
}

impl PassInfo {
    /// bound / measured (1.0 = at the bound).
    pub fn efficiency(&self) -> f64 {
        if self.pass_ms > 0.0 {
            self.bound_ms / self.pass_ms
        } else {
            0.0
        }
    }
}

/// One pass's events caught for drawing, shared between whoever wants the picture and the
/// streaming engine that records the pass. The caller arms it before the pass it wants; the
/// engine, when a pass ends and the capture is armed, reads the pass's device events (they
/// are overwritten by the next pass, so they cannot be read later) and hands them in; the
/// caller takes them after. Model code never sees it.
#[derive(Clone, Default)]
pub struct TimelineCapture(Arc<Mutex<Capture>>);

#[derive(Default)]
enum Capture {
    #[default]
    Idle,
    /// The next pass to end is to be caught.
    Armed,
    Caught(Vec<TimelineEvent>),
}

impl TimelineCapture {
    pub fn new() -> TimelineCapture {
        TimelineCapture::default()
    }

    /// Catch the next pass that ends (dropping one caught before and not taken).
    pub fn arm(&self) {
        *self.lock() = Capture::Armed;
    }

    /// Whether the pass ending now should be caught (the engine asks).
    pub fn armed(&self) -> bool {
        matches!(*self.lock(), Capture::Armed)
    }

    /// The armed pass's events (the engine hands them in); ignored when not armed, so that
    /// one arming catches one pass.
    pub fn fill(&self, events: Vec<TimelineEvent>) {
        let mut c = self.lock();
        if matches!(*c, Capture::Armed) {
            *c = Capture::Caught(events);
        }
    }

    /// The events of the pass caught, once; None when none was caught since the last arming.
    pub fn take(&self) -> Option<Vec<TimelineEvent>> {
        let mut c = self.lock();
        match std::mem::take(&mut *c) {
            Capture::Caught(events) => Some(events),
            other => {
                *c = other;
                None
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Capture> {
        self.0.lock().expect("timeline capture")
    }
}

// Layout, px. The plot spans x in [PLOT_LEFT, WIDTH - PLOT_RIGHT].
const WIDTH: f64 = 1200.0;
const PLOT_LEFT: f64 = 130.0;
const PLOT_RIGHT: f64 = 30.0;
const COPY_Y: f64 = 100.0;
const LANE_H: f64 = 44.0;
/// From the top of one lane to the next.
const LANE_STEP: f64 = 56.0;
/// Labels are 10 px sans-serif; about 6 px a character.
const LABEL_FONT: f64 = 10.0;
const CHAR_W: f64 = 6.0;

// Two shades a lane, alternating so that neighbouring intervals stay apart.
const COPY_FILL: [&str; 2] = ["#3b6ea8", "#5b8cc4"];
const STREAMED_FILL: [&str; 2] = ["#3f8f3a", "#5aa854"];
const RESIDENT_FILL: [&str; 2] = ["#7a7a7a", "#969696"];
const DECODE_FILL: [&str; 2] = ["#8a4fb0", "#a56ccb"];
const STALL_COLOR: &str = "#d62728";

/// Where the lanes lie: the decode lane, when there is one, between copy and compute.
#[derive(Clone, Copy)]
struct Rows {
    decode: Option<f64>,
    compute: f64,
    axis: f64,
    legend: f64,
    height: f64,
}

impl Rows {
    fn new(decoding: bool) -> Rows {
        let decode = decoding.then_some(COPY_Y + LANE_STEP);
        let compute = decode.unwrap_or(COPY_Y) + LANE_STEP;
        let axis = compute + LANE_H + 8.0;
        Rows {
            decode,
            compute,
            axis,
            legend: axis + 54.0,
            height: axis + 82.0,
        }
    }
}

/// The ms → px mapping of the plot.
struct Scale {
    t0: f64,
    px_per_ms: f64,
}

impl Scale {
    fn x(&self, ms: f64) -> f64 {
        PLOT_LEFT + (ms - self.t0) * self.px_per_ms
    }
}

/// Draw one pass as an SVG document (see the module's doc). Events with a time that is not a
/// finite number are left out; an event that ends before it starts is drawn with no width.
pub fn render_svg(events: &[TimelineEvent], info: &PassInfo) -> String {
    let events: Vec<&TimelineEvent> = events
        .iter()
        .filter(|e| e.start_ms.is_finite() && e.end_ms.is_finite())
        .collect();
    let stalls = stalls(&events);
    let stall_ms: f64 = stalls.iter().map(|(a, b)| b - a).sum();
    let rows = Rows::new(events.iter().any(|e| e.lane == Lane::Decode));
    let height = rows.height;

    // Time domain: every event, the pass start (0) and the bound.
    let mut t0: f64 = 0.0;
    let mut t1: f64 = 0.0;
    for e in &events {
        t0 = t0.min(e.start_ms);
        t1 = t1.max(e.end_ms.max(e.start_ms));
    }
    if info.bound_ms.is_finite() && info.bound_ms > 0.0 {
        t1 = t1.max(info.bound_ms);
    }
    if t1 - t0 <= 0.0 {
        t1 = t0 + 1.0;
    }
    let scale = Scale {
        t0,
        px_per_ms: (WIDTH - PLOT_LEFT - PLOT_RIGHT) / (t1 - t0),
    };

    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(
        w,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">"#
    );
    let _ = writeln!(
        w,
        r##"<defs><pattern id="stall" patternUnits="userSpaceOnUse" width="6" height="6" patternTransform="rotate(45)"><rect width="6" height="6" fill="#fbe0e0"/><line x1="0" y1="0" x2="0" y2="6" stroke="{STALL_COLOR}" stroke-width="2.5"/></pattern></defs>"##
    );
    let _ = writeln!(
        w,
        r##"<rect width="{WIDTH}" height="{height}" fill="#ffffff"/>"##
    );
    header(w, info, stall_ms, stalls.len());

    // Lanes, with their names on the left.
    let decode_lane = rows.decode.map(|y| (y, "decode", "GPU, its own stream"));
    let lanes = [
        Some((COPY_Y, "copy", "host → GPU (PCIe)")),
        decode_lane,
        Some((rows.compute, "compute", "GPU kernels")),
    ];
    for (y, name, what) in lanes.into_iter().flatten() {
        let _ = writeln!(
            w,
            r##"<rect x="{PLOT_LEFT}" y="{y}" width="{:.2}" height="{LANE_H}" fill="#f4f4f4"/>"##,
            WIDTH - PLOT_LEFT - PLOT_RIGHT
        );
        let _ = writeln!(
            w,
            r##"<text x="{:.2}" y="{:.2}" font-size="13" font-weight="bold" text-anchor="end" fill="#222">{name}</text>"##,
            PLOT_LEFT - 10.0,
            y + LANE_H / 2.0 - 2.0
        );
        let _ = writeln!(
            w,
            r##"<text x="{:.2}" y="{:.2}" font-size="10" text-anchor="end" fill="#555">{}</text>"##,
            PLOT_LEFT - 10.0,
            y + LANE_H / 2.0 + 12.0,
            escape(what)
        );
    }
    axis(w, &scale, t0, t1, rows.axis);

    // Stalls under the intervals, so that an interval's edge stays sharp.
    for &(a, b) in &stalls {
        let _ = writeln!(
            w,
            r##"<rect class="stall" x="{:.2}" y="{}" width="{:.2}" height="{LANE_H}" fill="url(#stall)"><title>stall {:.3} ms: compute waits for a copy</title></rect>"##,
            scale.x(a),
            rows.compute,
            // At least 2 px: a short stall is still a stall to see.
            ((b - a) * scale.px_per_ms).max(2.0),
            b - a
        );
    }

    // One rectangle per event, in input order; shades alternate in time order per lane.
    let shade = alternation(&events);
    for (i, e) in events.iter().enumerate() {
        let resident = e.lane == Lane::Compute && !has_copy(&events, &e.group);
        let (y, fill, kind) = match e.lane {
            Lane::Copy => (COPY_Y, COPY_FILL[shade[i]], "copy"),
            Lane::Compute if resident => {
                (rows.compute, RESIDENT_FILL[shade[i]], "compute resident")
            }
            Lane::Compute => (rows.compute, STREAMED_FILL[shade[i]], "compute"),
            Lane::Decode => (
                rows.decode.expect("a decode lane where there is decoding"),
                DECODE_FILL[shade[i]],
                "decode",
            ),
        };
        let x = scale.x(e.start_ms);
        let width = (e.end_ms - e.start_ms).max(0.0) * scale.px_per_ms;
        let _ = writeln!(
            w,
            r##"<rect class="ev {kind}" x="{x:.2}" y="{:.2}" width="{width:.2}" height="{:.2}" fill="{fill}" stroke="#ffffff" stroke-width="0.5"><title>{}: {kind} {:.3}–{:.3} ms ({:.3} ms)</title></rect>"##,
            y + 2.0,
            LANE_H - 4.0,
            escape(&e.group),
            e.start_ms,
            e.end_ms,
            e.end_ms - e.start_ms
        );
        if let Some(label) = fitting_label(&e.group, width) {
            let _ = writeln!(
                w,
                r##"<text x="{:.2}" y="{:.2}" font-size="{LABEL_FONT}" text-anchor="middle" fill="#ffffff">{}</text>"##,
                x + width / 2.0,
                y + LANE_H / 2.0 + LABEL_FONT * 0.35,
                escape(label)
            );
        }
    }

    if events.is_empty() {
        let _ = writeln!(
            w,
            r##"<text x="{:.2}" y="{:.2}" font-size="14" text-anchor="middle" fill="#888">no events</text>"##,
            (PLOT_LEFT + WIDTH - PLOT_RIGHT) / 2.0,
            (COPY_Y + rows.compute + LANE_H) / 2.0 + 5.0
        );
    }

    // The bound: where the pass would end at max(compute, copy).
    if info.bound_ms.is_finite() && info.bound_ms > 0.0 {
        let x = scale.x(info.bound_ms);
        let _ = writeln!(
            w,
            r##"<line class="bound" x1="{x:.2}" y1="{:.2}" x2="{x:.2}" y2="{:.2}" stroke="#111" stroke-width="1.5" stroke-dasharray="5,3"/>"##,
            COPY_Y - 8.0,
            rows.compute + LANE_H + 4.0
        );
        let _ = writeln!(
            w,
            r##"<text x="{x:.2}" y="{:.2}" font-size="10" text-anchor="middle" fill="#111">bound</text>"##,
            COPY_Y - 11.0
        );
    }

    legend(w, rows);
    s.push_str("</svg>\n");
    s
}

/// Draw one pass (see [`render_svg`]) into the file `path`.
pub fn write_svg(path: &Path, events: &[TimelineEvent], info: &PassInfo) -> Result<()> {
    std::fs::write(path, render_svg(events, info)).map_err(|e| Error::io(path, e))
}

/// Title and two caption lines.
fn header(w: &mut String, info: &PassInfo, stall_ms: f64, stall_count: usize) {
    let _ = writeln!(
        w,
        r##"<text x="20" y="30" font-size="17" font-weight="bold" fill="#111">One streamed pass: {}</text>"##,
        escape(&info.model)
    );
    let line1 = format!(
        "{} · {} tokens · VRAM budget {} · {} · {}",
        info.pass,
        info.tokens,
        human_bytes(info.vram_budget),
        info.card,
        info.date
    );
    let line2 = format!(
        "pass {:.1} ms · bound {:.1} ms ({}) · {:.1} % of the bound · stalls {:.1} ms in {}",
        info.pass_ms,
        info.bound_ms,
        info.bound,
        100.0 * info.efficiency(),
        stall_ms,
        match stall_count {
            1 => "1 gap".to_string(),
            n => format!("{n} gaps"),
        }
    );
    for (y, line) in [(50, line1), (68, line2)] {
        let _ = writeln!(
            w,
            r##"<text x="20" y="{y}" font-size="12" fill="#333">{}</text>"##,
            escape(&line)
        );
    }
}

/// Ticks every 1, 2 or 5 × 10^k ms (about ten of them), grid lines across the lanes.
fn axis(w: &mut String, scale: &Scale, t0: f64, t1: f64, axis_y: f64) {
    let step = tick_step(t1 - t0);
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10()).ceil() as usize
    };
    let (left, right) = (PLOT_LEFT, WIDTH - PLOT_RIGHT);
    let _ = writeln!(
        w,
        r##"<line x1="{left}" y1="{axis_y}" x2="{right}" y2="{axis_y}" stroke="#333" stroke-width="1"/>"##
    );
    let first = (t0 / step).ceil() as i64;
    let last = (t1 / step + 1e-9).floor() as i64;
    for k in first..=last {
        let t = k as f64 * step;
        let x = scale.x(t);
        let _ = writeln!(
            w,
            r##"<line x1="{x:.2}" y1="{:.2}" x2="{x:.2}" y2="{:.2}" stroke="#dddddd" stroke-width="1"/>"##,
            COPY_Y - 4.0,
            axis_y
        );
        let _ = writeln!(
            w,
            r##"<line x1="{x:.2}" y1="{axis_y}" x2="{x:.2}" y2="{:.2}" stroke="#333" stroke-width="1"/>"##,
            axis_y + 5.0
        );
        // `+ 0.0` turns -0 into 0.
        let _ = writeln!(
            w,
            r##"<text x="{x:.2}" y="{:.2}" font-size="10" text-anchor="middle" fill="#333">{:.*}</text>"##,
            axis_y + 17.0,
            decimals,
            t + 0.0
        );
    }
    let _ = writeln!(
        w,
        r##"<text x="{:.2}" y="{:.2}" font-size="11" text-anchor="middle" fill="#333">ms from the start of the pass</text>"##,
        (left + right) / 2.0,
        axis_y + 33.0
    );
}

fn legend(w: &mut String, rows: Rows) {
    let legend_y = rows.legend;
    let mut items: Vec<(&str, &str)> = vec![
        (COPY_FILL[0], "copy"),
        (STREAMED_FILL[0], "compute, streamed group"),
        (RESIDENT_FILL[0], "compute, resident group"),
        ("url(#stall)", "stall: compute waits for a copy"),
    ];
    if rows.decode.is_some() {
        items.insert(1, (DECODE_FILL[0], "decoding"));
        items[4].1 = "stall: compute waits for a copy or its decoding";
    }
    let mut x = PLOT_LEFT;
    for (fill, text) in items {
        let _ = writeln!(
            w,
            r##"<rect x="{x:.2}" y="{:.2}" width="14" height="12" fill="{fill}"/>"##,
            legend_y - 10.0
        );
        let _ = writeln!(
            w,
            r##"<text x="{:.2}" y="{legend_y}" font-size="11" fill="#333">{text}</text>"##,
            x + 19.0
        );
        x += 19.0 + text.len() as f64 * 6.3 + 22.0;
    }
    let _ = writeln!(
        w,
        r##"<line x1="{x:.2}" y1="{:.2}" x2="{x:.2}" y2="{:.2}" stroke="#111" stroke-width="1.5" stroke-dasharray="5,3"/>"##,
        legend_y - 11.0,
        legend_y + 3.0
    );
    let _ = writeln!(
        w,
        r##"<text x="{:.2}" y="{legend_y}" font-size="11" fill="#333">{}</text>"##,
        x + 7.0,
        if rows.decode.is_some() {
            "bound: max(compute, copy, decoding)"
        } else {
            "bound: max(compute, copy)"
        }
    );
}

/// The gaps in the compute lane during which it waited for a copy or its decoding: before
/// each compute interval, from the end of the previous one (or the start of the pass) until
/// the copy of its group ended (its decoding, where it was decoded), if that was still
/// running. Gaps they do not explain (the host queueing work late, say) are not stalls.
fn stalls(events: &[&TimelineEvent]) -> Vec<(f64, f64)> {
    let mut compute: Vec<&TimelineEvent> = events
        .iter()
        .copied()
        .filter(|e| e.lane == Lane::Compute)
        .collect();
    compute.sort_by(|a, b| a.start_ms.total_cmp(&b.start_ms));
    let pass_start = events
        .iter()
        .map(|e| e.start_ms)
        .fold(f64::INFINITY, f64::min)
        .max(0.0);
    let mut previous_end = pass_start;
    let mut out = Vec::new();
    for c in compute {
        // What this compute waited for: the latest copy and decoding of its group that began
        // before it.
        let ready = |lane| {
            events
                .iter()
                .filter(|e| e.lane == lane && e.group == c.group && e.start_ms <= c.start_ms)
                .max_by(|a, b| a.start_ms.total_cmp(&b.start_ms))
                .map(|e| e.end_ms)
        };
        let ready = match (ready(Lane::Copy), ready(Lane::Decode)) {
            (Some(copy), Some(decode)) => Some(copy.max(decode)),
            (copy, decode) => copy.or(decode),
        };
        if let Some(ready) = ready {
            let end = c.start_ms.min(ready);
            if end > previous_end + 1e-9 {
                out.push((previous_end, end));
            }
        }
        previous_end = previous_end.max(c.end_ms);
    }
    out
}

/// For each event, 0 or 1: its place in time order within its lane, mod 2.
fn alternation(events: &[&TimelineEvent]) -> Vec<usize> {
    let mut shade = vec![0; events.len()];
    for lane in [Lane::Copy, Lane::Compute, Lane::Decode] {
        let mut order: Vec<usize> = (0..events.len())
            .filter(|&i| events[i].lane == lane)
            .collect();
        order.sort_by(|&a, &b| events[a].start_ms.total_cmp(&events[b].start_ms));
        for (k, i) in order.into_iter().enumerate() {
            shade[i] = k % 2;
        }
    }
    shade
}

fn has_copy(events: &[&TimelineEvent], group: &str) -> bool {
    events
        .iter()
        .any(|e| e.lane == Lane::Copy && e.group == group)
}

/// The group's label if it fits in `width` px, else its last word ("3" of "block 3", "1/3"
/// of "head 1/3"), else nothing.
fn fitting_label(group: &str, width: f64) -> Option<&str> {
    let fits = |s: &str| s.chars().count() as f64 * CHAR_W + 4.0 <= width;
    let short = group.split_whitespace().last().unwrap_or("");
    [group, short]
        .into_iter()
        .find(|s| !s.is_empty() && fits(s))
}

/// A tick spacing of 1, 2 or 5 × 10^k that cuts `span` into about ten parts.
fn tick_step(span: f64) -> f64 {
    let raw = span / 10.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= raw)
        .expect("10 × magnitude ≥ raw")
}

/// Text for XML content and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> PassInfo {
        PassInfo {
            model: "test <model> & co".into(),
            pass: "prompt pass".into(),
            vram_budget: 2 << 30,
            tokens: 4096,
            card: "CPU".into(),
            date: "2026-01-01".into(),
            pass_ms: 40.0,
            bound_ms: 30.0,
            bound: "PCIe: 1.5 GB at 50 GB/s".into(),
        }
    }

    fn ev(group: &str, lane: Lane, start_ms: f64, end_ms: f64) -> TimelineEvent {
        TimelineEvent {
            group: group.into(),
            lane,
            start_ms,
            end_ms,
        }
    }

    /// Checks that tags nest and close, entities are whole and the root is one `svg`;
    /// returns the number of elements.
    fn check_xml(s: &str) -> usize {
        let mut stack: Vec<String> = Vec::new();
        let mut elements = 0;
        let mut roots = 0;
        let mut rest = s;
        while let Some(open) = rest.find('<') {
            let text = &rest[..open];
            check_text(text);
            if stack.is_empty() {
                assert!(text.trim().is_empty(), "text outside the root: {text:?}");
            }
            let close = rest[open..].find('>').expect("every < has its >") + open;
            let tag = &rest[open + 1..close];
            assert!(!tag.contains('<'), "< inside a tag: {tag:?}");
            rest = &rest[close + 1..];
            if let Some(name) = tag.strip_prefix('/') {
                let top = stack.pop().expect("a closing tag has an opening one");
                assert_eq!(top, name.trim(), "tags close in order");
                continue;
            }
            let name: String = tag
                .chars()
                .take_while(|c| !c.is_whitespace() && *c != '/')
                .collect();
            assert!(!name.is_empty(), "tag without a name: {tag:?}");
            check_text(tag); // attribute values are escaped the same way
            assert_eq!(tag.matches('"').count() % 2, 0, "quotes pair up: {tag:?}");
            elements += 1;
            if stack.is_empty() {
                roots += 1;
                assert_eq!(name, "svg");
            }
            if !tag.ends_with('/') {
                stack.push(name);
            }
        }
        assert!(rest.trim().is_empty(), "text after the root: {rest:?}");
        assert!(stack.is_empty(), "unclosed: {stack:?}");
        assert_eq!(roots, 1);
        elements
    }

    fn check_text(text: &str) {
        for (i, _) in text.match_indices('&') {
            let entity = &text[i..text[i..].find(';').map_or(text.len(), |j| i + j + 1)];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"].contains(&entity),
                "bare & in {text:?}"
            );
        }
    }

    /// The value of attribute `name` in a tag.
    fn attr(tag: &str, name: &str) -> f64 {
        let key = format!(" {name}=\"");
        let i = tag.find(&key).unwrap_or_else(|| panic!("{name} in {tag}")) + key.len();
        let j = tag[i..].find('"').unwrap() + i;
        tag[i..j].parse().unwrap()
    }

    /// The opening tags of `<rect class="PREFIX...`, in document order.
    fn rects<'a>(svg: &'a str, class_prefix: &str) -> Vec<&'a str> {
        let key = format!("<rect class=\"{class_prefix}");
        svg.match_indices(&key)
            .map(|(i, _)| &svg[i..i + svg[i..].find('>').unwrap()])
            .collect()
    }

    fn streamed_pass() -> Vec<TimelineEvent> {
        vec![
            ev("embedding", Lane::Compute, 0.0, 1.0),
            ev("block 0", Lane::Copy, -8.0, 0.0),
            ev("block 0", Lane::Compute, 1.0, 9.0),
            ev("block 1", Lane::Copy, 0.0, 10.0),
            ev("block 1", Lane::Compute, 10.0, 18.0),
            ev("head 1/2", Lane::Copy, 10.0, 20.0),
            ev("head 1/2", Lane::Compute, 20.0, 25.0),
            ev("norm", Lane::Compute, 25.0, 26.0),
        ]
    }

    #[test]
    fn one_rect_per_event_and_well_formed() {
        let events = streamed_pass();
        let svg = render_svg(&events, &info());
        assert!(check_xml(&svg) > events.len());
        assert_eq!(rects(&svg, "ev ").len(), events.len());
        assert_eq!(rects(&svg, "ev copy").len(), 3);
        // Groups never copied are resident.
        assert_eq!(rects(&svg, "ev compute resident").len(), 2);
        assert!(svg.contains("test &lt;model&gt; &amp; co"));
        assert!(svg.contains(">prompt pass · 4096 tokens · "));
        assert!(svg.contains("75.0 % of the bound"));
        assert!(svg.contains(">block 1<"), "a wide interval has its label");
        assert_eq!(svg, render_svg(&events, &info()), "deterministic");
    }

    #[test]
    fn x_scales_with_time() {
        let events = vec![
            ev("a", Lane::Copy, 0.0, 10.0),
            ev("a", Lane::Compute, 10.0, 20.0),
            ev("b", Lane::Copy, 10.0, 30.0),
            ev("b", Lane::Compute, 30.0, 40.0),
        ];
        let svg = render_svg(&events, &info());
        let r = rects(&svg, "ev ");
        let (x, width): (Vec<f64>, Vec<f64>) =
            r.iter().map(|t| (attr(t, "x"), attr(t, "width"))).unzip();
        let px_per_ms = width[0] / 10.0;
        assert!(px_per_ms > 1.0);
        assert!(
            (x[0] - PLOT_LEFT).abs() < 0.01,
            "0 ms is the plot's left edge"
        );
        for (e, (x, w)) in events.iter().zip(x.iter().zip(&width)) {
            assert!((x - (PLOT_LEFT + e.start_ms * px_per_ms)).abs() < 0.02);
            assert!((w - (e.end_ms - e.start_ms) * px_per_ms).abs() < 0.02);
        }
        // 40 ms (the last end) is the right edge.
        assert!((x[3] + width[3] - (WIDTH - PLOT_RIGHT)).abs() < 0.02);
    }

    #[test]
    fn decoding_is_drawn_on_its_own_lane_and_waiting_for_it_is_stall() {
        // Block 1 decodes (20–23) while block 0 computes (12–22); block 2's decoding ends
        // after block 1's compute, so compute waits 30–32 for it.
        let events = vec![
            ev("block 0", Lane::Copy, 0.0, 10.0),
            ev("block 0", Lane::Decode, 10.0, 12.0),
            ev("block 0", Lane::Compute, 12.0, 22.0),
            ev("block 1", Lane::Copy, 10.0, 20.0),
            ev("block 1", Lane::Decode, 20.0, 23.0),
            ev("block 1", Lane::Compute, 23.0, 30.0),
            ev("block 2", Lane::Copy, 20.0, 29.0),
            ev("block 2", Lane::Decode, 29.0, 32.0),
            ev("block 2", Lane::Compute, 32.0, 40.0),
        ];
        let refs: Vec<&TimelineEvent> = events.iter().collect();
        assert_eq!(stalls(&refs), vec![(0.0, 12.0), (22.0, 23.0), (30.0, 32.0)]);
        let svg = render_svg(&events, &info());
        check_xml(&svg);
        let rows = Rows::new(true);
        let decode = rects(&svg, "ev decode");
        assert_eq!(decode.len(), 3);
        let decode_y = rows.decode.unwrap();
        assert!(decode.iter().all(|r| attr(r, "y") == decode_y + 2.0));
        assert!(decode_y > COPY_Y && rows.compute > decode_y);
        let compute = rects(&svg, "ev compute");
        assert!(compute.iter().all(|r| attr(r, "y") == rows.compute + 2.0));
        assert!(svg.contains(">decoding<"), "the legend names decoding");
        assert!(svg.contains(&format!(r#"height="{}""#, rows.height)));
        // Without decoding: two lanes, a shorter picture.
        let plain = render_svg(&streamed_pass(), &info());
        assert!(!plain.contains(">decoding<"));
        assert!(plain.contains(&format!(r#"height="{}""#, Rows::new(false).height)));
        assert!(Rows::new(false).height < rows.height);
    }

    #[test]
    fn stall_where_compute_waits_for_a_copy() {
        let events = vec![
            ev("block 0", Lane::Copy, 0.0, 10.0),
            ev("block 0", Lane::Compute, 10.0, 15.0),
            ev("block 1", Lane::Copy, 10.0, 25.0),
            ev("block 1", Lane::Compute, 25.0, 30.0),
            // A gap the copy does not explain (copied long before): no stall.
            ev("block 2", Lane::Copy, 25.0, 27.0),
            ev("block 2", Lane::Compute, 32.0, 40.0),
        ];
        let refs: Vec<&TimelineEvent> = events.iter().collect();
        assert_eq!(stalls(&refs), vec![(0.0, 10.0), (15.0, 25.0)]);

        let svg = render_svg(&events, &info());
        check_xml(&svg);
        let drawn = rects(&svg, "stall");
        assert_eq!(drawn.len(), 2);
        let px_per_ms = (WIDTH - PLOT_LEFT - PLOT_RIGHT) / 40.0;
        assert!((attr(drawn[1], "x") - (PLOT_LEFT + 15.0 * px_per_ms)).abs() < 0.02);
        assert!((attr(drawn[1], "width") - 10.0 * px_per_ms).abs() < 0.02);
        assert_eq!(attr(drawn[1], "y"), Rows::new(false).compute);
        assert!(svg.contains("stalls 20.0 ms in 2 gaps"));

        // Copies far ahead: no stall.
        let ahead = streamed_pass()
            .into_iter()
            .map(|mut e| {
                if e.lane == Lane::Copy {
                    e.start_ms -= 30.0;
                    e.end_ms -= 30.0;
                }
                e
            })
            .collect::<Vec<_>>();
        assert!(rects(&render_svg(&ahead, &info()), "stall").is_empty());
    }

    #[test]
    fn empty_pass_is_a_valid_picture() {
        let mut i = info();
        i.pass_ms = 0.0;
        i.bound_ms = 0.0;
        let svg = render_svg(&[], &i);
        check_xml(&svg);
        assert!(svg.contains(">no events<"));
        assert!(rects(&svg, "ev ").is_empty());
        assert!(
            svg.contains(">0.0<") && svg.contains(">1.0<"),
            "the axis has ticks"
        );
    }

    #[test]
    fn labels_shrink_to_fit() {
        assert_eq!(fitting_label("block 12", 100.0), Some("block 12"));
        assert_eq!(fitting_label("block 12", 20.0), Some("12"));
        assert_eq!(fitting_label("head 1/3", 25.0), Some("1/3"));
        assert_eq!(fitting_label("block 12", 5.0), None);
        assert_eq!(fitting_label("", 500.0), None);
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step(100.0), 10.0);
        assert_eq!(tick_step(280.0), 50.0);
        assert_eq!(tick_step(1.3), 0.2);
        assert_eq!(tick_step(1200.0), 200.0);
    }

    #[test]
    fn bad_times_are_left_out_and_write_names_the_path() {
        let events = vec![
            ev("a", Lane::Copy, f64::NAN, 1.0),
            ev("b", Lane::Compute, 2.0, 1.0),
        ];
        let svg = render_svg(&events, &info());
        check_xml(&svg);
        let r = rects(&svg, "ev ");
        assert_eq!(r.len(), 1);
        assert_eq!(attr(r[0], "width"), 0.0);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.svg");
        write_svg(&path, &events, &info()).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), svg);
        let missing = dir.path().join("no/such/dir/t.svg");
        let err = write_svg(&missing, &events, &info()).unwrap_err();
        assert!(err.to_string().contains("no/such/dir/t.svg"), "{err}");
    }

    #[test]
    fn capture_catches_one_armed_pass() {
        let capture = TimelineCapture::new();
        let engine = capture.clone(); // the streaming engine's end
                                      // Passes before the arming are not caught.
        assert!(!engine.armed());
        engine.fill(streamed_pass());
        assert_eq!(capture.take(), None);

        capture.arm();
        assert!(engine.armed());
        assert_eq!(capture.take(), None, "armed, nothing caught yet");
        assert!(engine.armed(), "taking before the pass keeps it armed");
        engine.fill(streamed_pass());
        assert!(!engine.armed(), "one arming, one pass");
        // The pass after is not caught over the first.
        engine.fill(vec![ev("later", Lane::Compute, 0.0, 1.0)]);
        assert_eq!(capture.take(), Some(streamed_pass()));
        assert_eq!(capture.take(), None, "taken once");

        // Arming again drops a pass caught and not taken.
        capture.arm();
        engine.fill(vec![ev("old", Lane::Compute, 0.0, 1.0)]);
        capture.arm();
        engine.fill(streamed_pass());
        assert_eq!(capture.take(), Some(streamed_pass()));
    }
}
