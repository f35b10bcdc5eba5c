//! SVG plots of a run's metrics: line plots of JSONL series, histograms, grouped bars.

use anyhow::{Context, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::ops::Range;
use std::path::Path;

/// Series colours, cycled.
const COLORS: [RGBColor; 6] = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];

type Root<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A plotting error naming the file.
fn err(path: &Path, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("plotting {}: {e}", path.display())
}

/// An 800x480 SVG canvas, filled white.
fn canvas(path: &Path) -> Result<Root<'_>> {
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(path, e))?;
    Ok(root)
}

/// The chart every plot draws on: the title, the margins and both axes' ranges.
fn chart<'a, 'b>(
    root: &'a Root<'b>,
    path: &Path,
    title: &str,
    title_size: u32,
    x: Range<f64>,
    y: Range<f64>,
) -> Result<Chart<'a, 'b>> {
    ChartBuilder::on(root)
        .caption(title, ("sans-serif", title_size))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x, y)
        .map_err(|e| err(path, e))
}

/// The mesh of a chart whose x positions 0..names are categories (bars, boxes).
fn category_mesh(chart: &mut Chart, path: &Path, names: &[String], y_label: &str) -> Result<()> {
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(names.len())
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < names.len() {
                names[i as usize].clone()
            } else {
                String::new()
            }
        })
        .y_desc(y_label)
        .draw()
        .map_err(|e| err(path, e))
}

/// Draws the legend of the labelled series and writes the file.
fn finish<'a, 'b: 'a>(mut chart: Chart<'a, 'b>, root: &Root<'b>, path: &Path) -> Result<()> {
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| err(path, e))?;
    root.present().map_err(|e| err(path, e))
}

/// Reads `(x, y)` series from a JSONL file: for each key in `ys`, the points where it is present.
pub fn read_series(path: &Path, x: &str, ys: &[&str]) -> Result<Vec<Vec<(f64, f64)>>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = vec![Vec::new(); ys.len()];
    for l in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
            continue;
        };
        let Some(xv) = v.get(x).and_then(|a| a.as_f64()) else {
            continue;
        };
        for (i, k) in ys.iter().enumerate() {
            if let Some(yv) = v.get(*k).and_then(|a| a.as_f64()).filter(|y| y.is_finite()) {
                out[i].push((xv, yv));
            }
        }
    }
    Ok(out)
}

/// A line plot of named series, written as SVG.
pub fn line_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(&str, &[(f64, f64)])],
) -> Result<()> {
    let pts: Vec<&(f64, f64)> = series.iter().flat_map(|(_, s)| s.iter()).collect();
    if pts.is_empty() {
        return Ok(());
    }
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &&(x, y) in &pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let root = canvas(path)?;
    let mut chart = chart(&root, path, title, 20, x0..x1, (y0 - pad)..(y1 + pad))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(|e| err(path, e))?;
    for (i, (name, s)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(s.iter().copied(), c.stroke_width(2)))
            .map_err(|e| err(path, e))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
        if s.len() < 40 {
            chart
                .draw_series(s.iter().map(|&p| Circle::new(p, 3, c.filled())))
                .map_err(|e| err(path, e))?;
        }
    }
    finish(chart, &root, path)
}

/// Overlaid histograms of named samples on shared bins, written as SVG: how far two
/// distributions separate (a reward model's chosen vs rejected scores) shows at a glance.
/// Non-finite values are left out; nothing is written when no value is finite.
pub fn histogram_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    series: &[(&str, &[f64])],
    bins: usize,
) -> Result<()> {
    let bins = bins.max(1);
    let finite = || {
        series
            .iter()
            .flat_map(|(_, s)| s.iter().copied())
            .filter(|x| x.is_finite())
    };
    let (mut x0, mut x1) = (f64::MAX, f64::MIN);
    for x in finite() {
        x0 = x0.min(x);
        x1 = x1.max(x);
    }
    if x0 > x1 {
        return Ok(());
    }
    if x1 - x0 < 1e-9 {
        x0 -= 0.5;
        x1 += 0.5;
    }
    let width = (x1 - x0) / bins as f64;
    let counts: Vec<Vec<usize>> = series
        .iter()
        .map(|(_, s)| {
            let mut c = vec![0usize; bins];
            for &x in s.iter().filter(|x| x.is_finite()) {
                c[(((x - x0) / width) as usize).min(bins - 1)] += 1;
            }
            c
        })
        .collect();
    let top = counts.iter().flatten().copied().max().unwrap_or(1).max(1) as f64;
    let root = canvas(path)?;
    let mut chart = chart(&root, path, title, 20, x0..x1, 0.0..top * 1.05)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc("count")
        .draw()
        .map_err(|e| err(path, e))?;
    for (i, ((name, _), c)) in series.iter().zip(&counts).enumerate() {
        let color = COLORS[i % COLORS.len()];
        let bars = c.iter().enumerate().filter(|(_, &n)| n > 0).map(|(b, &n)| {
            let l = x0 + b as f64 * width;
            Rectangle::new([(l, 0.0), (l + width, n as f64)], color.mix(0.35).filled())
        });
        chart
            .draw_series(bars)
            .map_err(|e| err(path, e))?
            .label(*name)
            .legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 16, y + 5)], color.mix(0.35).filled())
            });
    }
    finish(chart, &root, path)
}

/// Grouped bars, one group per category and one bar per series in it, written as SVG (reward
/// models' accuracy by rating). Missing values (`None`) draw no bar.
pub fn bar_plot(
    path: &Path,
    title: &str,
    y_label: &str,
    categories: &[&str],
    series: &[(&str, Vec<Option<f64>>)],
) -> Result<()> {
    if categories.is_empty() || series.is_empty() {
        return Ok(());
    }
    let top = series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten().copied())
        .filter(|x| x.is_finite())
        .fold(0f64, f64::max)
        .max(1e-9);
    let n = categories.len();
    let root = canvas(path)?;
    let mut chart = chart(&root, path, title, 20, -0.5..n as f64 - 0.5, 0.0..top * 1.1)?;
    let names: Vec<String> = categories.iter().map(|s| s.to_string()).collect();
    category_mesh(&mut chart, path, &names, y_label)?;
    let w = 0.8 / series.len() as f64;
    for (si, (name, vals)) in series.iter().enumerate() {
        let color = COLORS[si % COLORS.len()];
        let bars = vals.iter().enumerate().filter_map(|(ci, v)| {
            let v = (*v)?;
            let l = ci as f64 - 0.4 + si as f64 * w;
            Some(Rectangle::new(
                [(l, 0.0), (l + w, v)],
                color.mix(0.6).filled(),
            ))
        });
        chart
            .draw_series(bars)
            .map_err(|e| err(path, e))?
            .label(*name)
            .legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 16, y + 5)], color.mix(0.6).filled())
            });
    }
    finish(chart, &root, path)
}

/// One box of [`box_plot`].
#[derive(Clone, Debug)]
pub struct BoxStats {
    pub name: String,
    pub whisker_lo: f64,
    pub q1: f64,
    pub median: f64,
    pub q3: f64,
    pub whisker_hi: f64,
    pub mean: f64,
}

/// One box per named distribution, side by side, written as SVG: whiskers, a box from q1 to
/// q3, the median as a line and the mean as a dot (Figure 20's reward per stage). Nothing is
/// written without a box.
pub fn box_plot(path: &Path, title: &str, y_label: &str, boxes: &[BoxStats]) -> Result<()> {
    if boxes.is_empty() {
        return Ok(());
    }
    let vals = || {
        boxes
            .iter()
            .flat_map(|b| [b.whisker_lo, b.whisker_hi, b.mean])
            .filter(|x| x.is_finite())
    };
    let (mut y0, mut y1) = (
        vals().fold(f64::MAX, f64::min),
        vals().fold(f64::MIN, f64::max),
    );
    if y0 > y1 {
        return Ok(());
    }
    if y1 - y0 < 1e-9 {
        y0 -= 0.5;
        y1 += 0.5;
    }
    let pad = (y1 - y0) * 0.05;
    let n = boxes.len();
    let root = canvas(path)?;
    let x = -0.5..n as f64 - 0.5;
    let mut chart = chart(&root, path, title, 18, x, (y0 - pad)..(y1 + pad))?;
    let names: Vec<String> = boxes.iter().map(|b| b.name.clone()).collect();
    category_mesh(&mut chart, path, &names, y_label)?;
    for (i, b) in boxes.iter().enumerate() {
        let x = i as f64;
        let line = |pts: Vec<(f64, f64)>| PathElement::new(pts, BLACK.stroke_width(1));
        chart
            .draw_series([
                line(vec![(x, b.whisker_lo), (x, b.q1)]),
                line(vec![(x, b.q3), (x, b.whisker_hi)]),
                line(vec![(x - 0.1, b.whisker_lo), (x + 0.1, b.whisker_lo)]),
                line(vec![(x - 0.1, b.whisker_hi), (x + 0.1, b.whisker_hi)]),
            ])
            .map_err(|e| err(path, e))?;
        chart
            .draw_series([Rectangle::new(
                [(x - 0.3, b.q1), (x + 0.3, b.q3)],
                BLUE.mix(0.3).filled(),
            )])
            .map_err(|e| err(path, e))?;
        chart
            .draw_series([PathElement::new(
                vec![(x - 0.3, b.median), (x + 0.3, b.median)],
                BLUE.stroke_width(3),
            )])
            .map_err(|e| err(path, e))?;
        chart
            .draw_series([Circle::new((x, b.mean), 4, RED.filled())])
            .map_err(|e| err(path, e))?;
    }
    root.present().map_err(|e| err(path, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every plot writes an SVG with its title, axis labels and legend names (set
    /// `PLOT_DUMP=DIR` to keep the files, e.g. to compare two versions byte for byte).
    #[test]
    fn every_plot_writes_its_title_labels_and_legend() {
        let dir = tempfile::tempdir().unwrap();
        let d = std::env::var("PLOT_DUMP")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|_| dir.path().to_path_buf());
        std::fs::create_dir_all(&d).unwrap();
        let a: Vec<(f64, f64)> = (0..30).map(|i| (i as f64, (i as f64).sqrt())).collect();
        let b: Vec<(f64, f64)> = (0..30).map(|i| (i as f64, 5.0 - i as f64 / 10.0)).collect();
        line_plot(
            &d.join("line.svg"),
            "T-line",
            "X-step",
            "Y-loss",
            &[("train", &a), ("val", &b)],
        )
        .unwrap();
        let h1: Vec<f64> = (0..50).map(|i| (i as f64 * 0.37).sin()).collect();
        let h2: Vec<f64> = (0..50).map(|i| (i as f64 * 0.11).cos() + 0.5).collect();
        histogram_plot(
            &d.join("hist.svg"),
            "T-hist",
            "X-score",
            &[("chosen", &h1), ("rejected", &h2)],
            12,
        )
        .unwrap();
        bar_plot(
            &d.join("bar.svg"),
            "T-bar",
            "Y-accuracy",
            &["cat-one", "cat-two"],
            &[
                ("helpful", vec![Some(0.8), None]),
                ("safe", vec![Some(0.6), Some(0.9)]),
            ],
        )
        .unwrap();
        let bx = |name: &str, m: f64| BoxStats {
            name: name.into(),
            whisker_lo: m - 1.0,
            q1: m - 0.5,
            median: m,
            q3: m + 0.5,
            whisker_hi: m + 1.0,
            mean: m + 0.1,
        };
        box_plot(
            &d.join("box.svg"),
            "T-box",
            "Y-reward",
            &[bx("stage-a", 0.2), bx("stage-b", 0.7)],
        )
        .unwrap();
        for (f, want) in [
            (
                "line.svg",
                &["T-line", "X-step", "Y-loss", "train", "val"][..],
            ),
            (
                "hist.svg",
                &["T-hist", "X-score", "count", "chosen", "rejected"],
            ),
            (
                "bar.svg",
                &[
                    "T-bar",
                    "Y-accuracy",
                    "cat-one",
                    "cat-two",
                    "helpful",
                    "safe",
                ],
            ),
            ("box.svg", &["T-box", "Y-reward", "stage-a", "stage-b"]),
        ] {
            let svg = std::fs::read_to_string(d.join(f)).unwrap();
            for w in want {
                assert!(svg.contains(w), "{f} lacks {w}");
            }
        }
    }
}
