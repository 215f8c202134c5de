//! Plots of the benchmark report: small SVG line and bar charts, written without a
//! plotting crate (the charts are simple, and SVG is text a browser, GitHub and any image
//! viewer show).

use std::fmt::Write;

/// One line of a line chart: a value per x position (`None`: no measurement there).
pub struct Series {
    pub label: String,
    pub values: Vec<Option<f64>>,
}

const WIDTH: f64 = 820.0;
const HEIGHT: f64 = 440.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 250.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
const GRID_LINES: u32 = 5;
/// Colour-blind-safe palette (Okabe–Ito), then repeated.
const COLOURS: [&str; 8] = [
    "#000000", "#E69F00", "#56B4E9", "#009E73", "#D55E00", "#0072B2", "#CC79A7", "#F0E442",
];

/// A line chart with categorical x positions (stream counts, connection counts), y from 0.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    xs: &[String],
    series: &[Series],
) -> String {
    let top = series
        .iter()
        .flat_map(|s| s.values.iter().flatten())
        .fold(0.0_f64, |m, &v| m.max(v));
    let y_max = nice_ceiling(top);
    let mut svg = open(title, x_label, y_label, y_max);
    let x_at = |i: usize| {
        let plot_w = WIDTH - LEFT - RIGHT;
        if xs.len() <= 1 {
            LEFT + plot_w / 2.0
        } else {
            LEFT + plot_w * i as f64 / (xs.len() - 1) as f64
        }
    };
    for (i, x) in xs.iter().enumerate() {
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            x_at(i),
            HEIGHT - BOTTOM + 18.0,
            escape(x)
        );
    }
    for (n, s) in series.iter().enumerate() {
        let colour = COLOURS[n % COLOURS.len()];
        // A gap (failed cell) breaks the line rather than drawing through it.
        let mut path = String::new();
        let mut pen_down = false;
        for (i, v) in s.values.iter().enumerate() {
            match v {
                Some(v) => {
                    let _ = write!(
                        path,
                        "{}{:.1},{:.1} ",
                        if pen_down { "L" } else { "M" },
                        x_at(i),
                        y_at(*v, y_max)
                    );
                    pen_down = true;
                    let _ = writeln!(
                        svg,
                        r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#,
                        x_at(i),
                        y_at(*v, y_max)
                    );
                }
                None => pen_down = false,
            }
        }
        if !path.is_empty() {
            let _ = writeln!(
                svg,
                r#"<path d="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
                path.trim_end()
            );
        }
        legend(&mut svg, n, colour, &s.label);
    }
    svg.push_str("</svg>\n");
    svg
}

/// A bar chart, one bar per labelled value, y from 0.
pub fn bar_chart(title: &str, y_label: &str, bars: &[(String, f64)]) -> String {
    let top = bars.iter().fold(0.0_f64, |m, (_, v)| m.max(*v));
    let y_max = nice_ceiling(top);
    let mut svg = open(title, "", y_label, y_max);
    let plot_w = WIDTH - LEFT - RIGHT;
    let slot = plot_w / bars.len().max(1) as f64;
    for (n, (label, value)) in bars.iter().enumerate() {
        let colour = COLOURS[n % COLOURS.len()];
        let y = y_at(*value, y_max);
        let _ = writeln!(
            svg,
            r#"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{colour}"/>"#,
            LEFT + slot * n as f64 + slot * 0.15,
            slot * 0.7,
            (HEIGHT - BOTTOM - y).max(0.0)
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            LEFT + slot * (n as f64 + 0.5),
            y - 4.0,
            short_number(*value)
        );
        legend(&mut svg, n, colour, label);
    }
    svg.push_str("</svg>\n");
    svg
}

/// Header, title, axes, horizontal grid and y tick labels.
fn open(title: &str, x_label: &str, y_label: &str, y_max: f64) -> String {
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        LEFT + (WIDTH - LEFT - RIGHT) / 2.0,
        escape(title)
    );
    for i in 0..=GRID_LINES {
        let v = y_max * f64::from(i) / f64::from(GRID_LINES);
        let y = y_at(v, y_max);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#dddddd"/>"##,
            WIDTH - RIGHT
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            y + 4.0,
            short_number(v)
        );
    }
    let _ = writeln!(
        svg,
        r#"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{:.1}" stroke="black"/>"#,
        HEIGHT - BOTTOM
    );
    let _ = writeln!(
        svg,
        r#"<line x1="{LEFT}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/>"#,
        HEIGHT - BOTTOM,
        WIDTH - RIGHT,
        HEIGHT - BOTTOM
    );
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        LEFT + (WIDTH - LEFT - RIGHT) / 2.0,
        HEIGHT - 18.0,
        escape(x_label)
    );
    let _ = writeln!(
        svg,
        r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        TOP + (HEIGHT - TOP - BOTTOM) / 2.0,
        escape(y_label)
    );
    svg
}

fn legend(svg: &mut String, n: usize, colour: &str, label: &str) {
    let y = TOP + 10.0 + 20.0 * n as f64;
    let x = WIDTH - RIGHT + 16.0;
    let _ = writeln!(
        svg,
        r#"<rect x="{x:.1}" y="{:.1}" width="14" height="4" fill="{colour}"/>"#,
        y - 6.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{y:.1}">{}</text>"#,
        x + 20.0,
        escape(label)
    );
}

fn y_at(v: f64, y_max: f64) -> f64 {
    let plot_h = HEIGHT - TOP - BOTTOM;
    HEIGHT - BOTTOM - plot_h * (v / y_max).clamp(0.0, 1.0)
}

/// The smallest of 1, 2, 2.5, 5 × 10^k at or above `v` (1 for nothing to show), so the
/// axis ticks are round numbers.
fn nice_ceiling(v: f64) -> f64 {
    if !v.is_finite() || v <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|&c| c >= v * (1.0 - 1e-9))
        .unwrap_or(10.0 * magnitude)
}

fn short_number(v: f64) -> String {
    if v == 0.0 {
        "0".to_owned()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_tops_are_round_numbers_at_or_above_the_data() {
        assert_eq!(nice_ceiling(0.93), 1.0);
        assert_eq!(nice_ceiling(1.2), 2.0);
        assert_eq!(nice_ceiling(2.2), 2.5);
        assert_eq!(nice_ceiling(1368.3), 2000.0);
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(f64::NAN), 1.0);
    }

    #[test]
    fn a_failed_cell_breaks_the_line_and_labels_are_escaped() {
        let svg = line_chart(
            "a <b>",
            "streams",
            "Gbit/s",
            &["1".into(), "2".into(), "4".into()],
            &[Series {
                label: "x & y".into(),
                values: vec![Some(0.5), None, Some(0.7)],
            }],
        );
        assert!(svg.contains("a &lt;b&gt;"));
        assert!(svg.contains("x &amp; y"));
        // Two pen-down moves: the gap starts a new sub-path.
        let path = svg
            .lines()
            .find(|l| l.starts_with("<path"))
            .expect("a path");
        assert_eq!(path.matches('M').count(), 2);
        assert_eq!(path.matches('L').count(), 0);
        assert_eq!(svg.matches("<circle").count(), 2);
    }

    #[test]
    fn bars_scale_to_the_largest_value() {
        let svg = bar_chart(
            "tps",
            "transactions/s",
            &[("direct".into(), 1000.0), ("xdp".into(), 500.0)],
        );
        let heights: Vec<f64> = svg
            .lines()
            .filter(|l| l.starts_with("<rect x"))
            .filter_map(|l| {
                let h = l.split("height=\"").nth(1)?;
                h.split('"').next()?.parse().ok()
            })
            .filter(|&h| h > 4.0)
            .collect();
        assert_eq!(heights.len(), 2);
        assert!((heights[0] / heights[1] - 2.0).abs() < 0.01, "{heights:?}");
    }
}
