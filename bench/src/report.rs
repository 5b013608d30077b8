//! Output of every benchmark: a table printed to stdout, the same table as CSV, a PNG plot, and
//! rows for `summary.csv` (one per bracketed target in the benchmark issue).

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use plotters::prelude::*;

pub struct Table {
    pub name: &'static str,
    pub title: String,
    pub headers: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(name: &'static str, title: impl Into<String>, headers: &[&str]) -> Self {
        Self {
            name,
            title: title.into(),
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        assert_eq!(cells.len(), self.headers.len(), "{}: row width", self.name);
        self.rows.push(cells);
    }

    /// Markdown, so the README can carry it as printed.
    pub fn render(&self) -> String {
        let mut out = format!(
            "### {}\n\n| {} |\n|{}\n",
            self.title,
            self.headers.join(" | "),
            "---|".repeat(self.headers.len())
        );
        for r in &self.rows {
            let _ = writeln!(out, "| {} |", r.join(" | "));
        }
        out
    }

    pub fn write(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join(format!("{}.csv", self.name));
        let mut csv = self
            .headers
            .iter()
            .map(|h| csv_cell(h))
            .collect::<Vec<_>>()
            .join(",")
            + "\n";
        for r in &self.rows {
            csv += &(r.iter().map(|c| csv_cell(c)).collect::<Vec<_>>().join(",") + "\n");
        }
        fs::write(&path, csv).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// One line of summary.csv: a target from the issue and whether the run met it.
#[derive(Clone, Debug)]
pub struct Target {
    pub metric: String,
    pub value: f64,
    pub baseline: f64,
    pub ratio: f64,
    /// As written in the issue, e.g. "<= 3x floor".
    pub target: String,
    pub met: bool,
}

impl Target {
    pub fn at_most(metric: &str, value: f64, baseline: f64, max_ratio: f64, target: &str) -> Self {
        let ratio = value / baseline;
        Self {
            metric: metric.into(),
            value,
            baseline,
            ratio,
            target: target.into(),
            met: ratio <= max_ratio,
        }
    }

    pub fn at_least(metric: &str, value: f64, baseline: f64, min_ratio: f64, target: &str) -> Self {
        let ratio = value / baseline;
        Self {
            metric: metric.into(),
            value,
            baseline,
            ratio,
            target: target.into(),
            met: ratio >= min_ratio,
        }
    }
}

/// Writes summary.csv; with `merge`, rows of metrics not measured now are kept from the file
/// (a run of some benchmarks updates their rows only).
pub fn write_summary(dir: &Path, targets: &[Target], merge: bool) -> Result<PathBuf> {
    let path = dir.join("summary.csv");
    let mut csv = String::from("metric,value,baseline,ratio,target,met\n");
    if merge && let Ok(old) = fs::read_to_string(&path) {
        let measured: Vec<String> = targets.iter().map(|t| csv_cell(&t.metric)).collect();
        for line in old.lines().skip(1) {
            if !measured.iter().any(|m| line.starts_with(&format!("{m},"))) {
                csv.push_str(line);
                csv.push('\n');
            }
        }
    }
    for t in targets {
        let _ = writeln!(
            csv,
            "{},{:.3},{:.3},{:.3},{},{}",
            csv_cell(&t.metric),
            t.value,
            t.baseline,
            t.ratio,
            csv_cell(&t.target),
            t.met
        );
    }
    fs::write(&path, csv)?;
    Ok(path)
}

/// A line plot of several series over a (log or linear) x axis.
pub struct Plot<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub log_x: bool,
    pub log_y: bool,
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

impl<'a> Plot<'a> {
    /// Latency samples sorted, one series: the shape of the whole distribution at a glance.
    pub fn sorted_samples(title: &'a str, series: &str, samples: &[f64]) -> Self {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        Plot {
            title,
            x_label: "sample",
            y_label: "ms",
            log_x: false,
            log_y: false,
            series: vec![(
                series.to_string(),
                sorted
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (i as f64 + 1.0, *v))
                    .collect(),
            )],
        }
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let points = self.series.iter().flat_map(|(_, p)| p.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in points {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if x0 > x1 {
            return Ok(());
        }
        if x0 == x1 {
            x1 = x0 + 1.0;
        }
        let (y0, y1) = if self.log_y {
            (y0.max(1e-9) / 1.5, y1 * 1.5)
        } else {
            (0.0, y1 * 1.15 + 1e-9)
        };
        let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption(self.title, ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(72);
        macro_rules! draw {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_desc(self.x_label)
                    .y_desc(self.y_label)
                    .label_style(("sans-serif", 16))
                    .draw()
                    .map_err(plot_err)?;
                for (i, (name, pts)) in self.series.iter().enumerate() {
                    let color = Palette99::pick(i).to_rgba();
                    chart
                        .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(3)))
                        .map_err(plot_err)?
                        .label(name.as_str())
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
                        });
                    chart
                        .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                        .map_err(plot_err)?;
                }
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .label_font(("sans-serif", 16))
                    .position(SeriesLabelPosition::UpperLeft)
                    .draw()
                    .map_err(plot_err)?;
            }};
        }
        match (self.log_x, self.log_y) {
            (true, true) => draw!(
                builder
                    .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
                    .map_err(plot_err)?
            ),
            (true, false) => draw!(
                builder
                    .build_cartesian_2d((x0..x1).log_scale(), y0..y1)
                    .map_err(plot_err)?
            ),
            (false, true) => draw!(
                builder
                    .build_cartesian_2d(x0..x1, (y0..y1).log_scale())
                    .map_err(plot_err)?
            ),
            (false, false) => draw!(
                builder
                    .build_cartesian_2d(x0..x1, y0..y1)
                    .map_err(plot_err)?
            ),
        }
        root.present().map_err(plot_err)?;
        Ok(())
    }
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plotting: {e:?}")
}

/// Formats a number with a sensible number of digits for tables.
pub fn num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The median of repeated runs (the upper middle of an even count).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// "min–max" of repeated runs.
pub fn spread(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(0.0, f64::max);
    format!("{}–{}", num(min), num(max))
}
