//! The chart, as plain SVG text: a panel of "times better than Mosquitto" bars (one per
//! compared metric), a panel of latency percentiles, and, when the curves ran, a panel of
//! fan-out throughput by number of subscribers.

use std::fmt::Write as _;

use super::{Better, HERALD, MOSQUITTO, Medians, ROWS};

const WIDTH: f64 = 900.0;
const LEFT: f64 = 330.0;
const RIGHT: f64 = 60.0;
const BAR: f64 = 18.0;
const GAP: f64 = 8.0;
const HERALD_COLOR: &str = "#2b6cb0";
const MOSQUITTO_COLOR: &str = "#c05621";

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

struct Canvas {
    body: String,
    y: f64,
}

impl Canvas {
    fn text(&mut self, x: f64, y: f64, anchor: &str, size: u32, text: &str) {
        let _ = writeln!(
            self.body,
            r#"<text x="{x:.1}" y="{y:.1}" text-anchor="{anchor}" font-size="{size}">{}</text>"#,
            escape(text)
        );
    }

    fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: &str) {
        let _ = writeln!(
            self.body,
            r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{h:.1}" fill="{fill}"/>"#,
            w.max(0.5)
        );
    }

    fn line(&mut self, x1: f64, y1: f64, x2: f64, y2: f64, style: &str) {
        let _ = writeln!(
            self.body,
            r#"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}" {style}/>"#
        );
    }

    fn title(&mut self, text: &str) {
        self.y += 30.0;
        self.text(10.0, self.y, "start", 15, text);
        self.y += 14.0;
    }
}

pub fn chart(m: &Medians) -> String {
    let mut c = Canvas {
        body: String::new(),
        y: 0.0,
    };
    advantage_panel(&mut c, m);
    latency_panel(&mut c, m);
    fanout_panel(&mut c, m);
    c.y += 20.0;
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{h:.0}\" viewBox=\"0 0 {WIDTH} {h:.0}\" font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{body}</svg>\n",
        h = c.y,
        body = c.body
    )
}

/// One bar per compared metric: how many times better Herald is (H/M for throughput, M/H for
/// latency and memory), with the line at 1 and the issue's target marked.
fn advantage_panel(c: &mut Canvas, m: &Medians) {
    let bars: Vec<(&str, f64, Option<f64>)> = ROWS
        .iter()
        .filter_map(|row| {
            let h = m.get(row.case, HERALD, row.metric)?;
            let q = m.get(row.case, MOSQUITTO, row.metric)?;
            let adv = match row.better {
                Better::Higher if q > 0.0 => h / q,
                Better::Lower if h > 0.0 => q / h,
                _ => return None,
            };
            let target = row.target.map(|t| match row.better {
                Better::Higher => t,
                Better::Lower => 1.0 / t,
            });
            Some((row.title, adv, target))
        })
        .collect();
    if bars.is_empty() {
        return;
    }
    c.title(
        "Herald vs Mosquitto: times better (bar past the grey line = Herald ahead; | = target)",
    );
    let max = bars
        .iter()
        .map(|b| b.1.max(b.2.unwrap_or(0.0)))
        .fold(2.0_f64, f64::max)
        .min(20.0);
    let scale = (WIDTH - LEFT - RIGHT) / max;
    let top = c.y;
    for (title, adv, target) in &bars {
        c.text(LEFT - 8.0, c.y + BAR - 4.0, "end", 11, title);
        let color = if *adv >= 1.0 {
            HERALD_COLOR
        } else {
            MOSQUITTO_COLOR
        };
        c.rect(LEFT, c.y, adv.min(max) * scale, BAR, color);
        c.text(
            LEFT + adv.min(max) * scale + 4.0,
            c.y + BAR - 4.0,
            "start",
            11,
            &format!("{adv:.2}x"),
        );
        if let Some(t) = target {
            let x = LEFT + t.min(max) * scale;
            c.line(
                x,
                c.y - 2.0,
                x,
                c.y + BAR + 2.0,
                r#"stroke="black" stroke-width="2""#,
            );
        }
        c.y += BAR + GAP;
    }
    let one = LEFT + scale;
    c.line(
        one,
        top - 4.0,
        one,
        c.y,
        r##"stroke="#888" stroke-dasharray="4 3""##,
    );
    c.text(one, c.y + 12.0, "middle", 10, "1x");
    c.y += 14.0;
}

/// Grouped bars: for each group, Herald's and Mosquitto's value.
fn grouped(c: &mut Canvas, unit: &str, groups: &[(String, Option<f64>, Option<f64>)]) {
    let max = groups
        .iter()
        .flat_map(|g| [g.1, g.2])
        .flatten()
        .fold(0.0_f64, f64::max);
    if max <= 0.0 {
        return;
    }
    let scale = (WIDTH - LEFT - RIGHT - 60.0) / max;
    for (name, h, q) in groups {
        c.text(LEFT - 8.0, c.y + BAR, "end", 11, name);
        for (value, color, who) in [
            (h, HERALD_COLOR, "Herald"),
            (q, MOSQUITTO_COLOR, "Mosquitto"),
        ] {
            if let Some(v) = value {
                c.rect(LEFT, c.y, v * scale, BAR * 0.8, color);
                c.text(
                    LEFT + v * scale + 4.0,
                    c.y + BAR * 0.8 - 3.0,
                    "start",
                    10,
                    &format!("{who} {} {unit}", short(*v)),
                );
            }
            c.y += BAR * 0.8 + 2.0;
        }
        c.y += GAP;
    }
}

fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn latency_panel(c: &mut Canvas, m: &Medians) {
    let groups: Vec<(String, Option<f64>, Option<f64>)> = [
        ("p50", "p50_ms"),
        ("p90", "p90_ms"),
        ("p99", "p99_ms"),
        ("p99.9", "p999_ms"),
    ]
    .iter()
    .map(|(name, key)| {
        (
            format!("latency {name}"),
            m.get("latency-q1", HERALD, key),
            m.get("latency-q1", MOSQUITTO, key),
        )
    })
    .filter(|g| g.1.is_some() || g.2.is_some())
    .collect();
    if groups.is_empty() {
        return;
    }
    c.title("End-to-end latency at 10k msg/s, QoS 1 (ms, lower is better)");
    grouped(c, "ms", &groups);
}

fn fanout_panel(c: &mut Canvas, m: &Medians) {
    let groups: Vec<(String, Option<f64>, Option<f64>)> = m
        .series("curve-fanout-")
        .into_iter()
        .map(|(n, case)| {
            (
                format!("{n} subscribers"),
                m.get(&case, HERALD, "delivered_per_s"),
                m.get(&case, MOSQUITTO, "delivered_per_s"),
            )
        })
        .collect();
    if groups.is_empty() {
        return;
    }
    c.title("Fan-out QoS 0: deliveries per second by subscribers (higher is better)");
    grouped(c, "/s", &groups);
}
