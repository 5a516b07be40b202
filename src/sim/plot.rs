//! `simulate --plot FILE.svg`: the run's figures over time, one line per policy, because a
//! reader sees in a picture what forty numbers in a table hide (when the delay happens, how
//! long a starving guest waits, whether a policy converges).
//!
//! A run records a [`Series`] per policy: its quanta folded into at most [`POINTS`] buckets.
//! [`render_svg`] draws four panels with `plotters`' SVG backend (no system libraries).

use plotters::prelude::*;

/// Buckets of a series at most: enough for a 1000-pixel-wide panel.
pub const POINTS: usize = 480;

/// One policy's figures over time, bucketed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    /// Virtual hours at the middle of each bucket.
    pub hours: Vec<f64>,
    /// Mean busiest-cpu load over the lower bound (NaN where the bound was under 0.5).
    pub busiest_over_bound: Vec<f64>,
    /// Mean unmet vCPU demand, cores.
    pub delay_cores: Vec<f64>,
    /// Reclaimed over reclaimable memory (NaN where nothing was reclaimable).
    pub mem_reclaimed: Vec<f64>,
    /// Mean number of guests swapping.
    pub starving_guests: Vec<f64>,
}

/// Folds a run's quanta into a [`Series`].
#[derive(Debug)]
pub struct Recorder {
    per_bucket: u64,
    quantum_h: f64,
    at: u64,
    ratio: (f64, u32),
    delay: f64,
    reclaimed: (f64, f64),
    starving: f64,
    out: Series,
}

impl Recorder {
    /// A recorder for a run of `quanta` quanta of `quantum_s` virtual seconds.
    pub fn new(quanta: u64, quantum_s: f64) -> Self {
        let points = u64::try_from(POINTS).unwrap_or(u64::MAX);
        Recorder {
            per_bucket: quanta.div_ceil(points).max(1),
            quantum_h: quantum_s / 3600.0,
            at: 0,
            ratio: (0.0, 0),
            delay: 0.0,
            reclaimed: (0.0, 0.0),
            starving: 0.0,
            out: Series::default(),
        }
    }

    /// One quantum's figures: busiest/bound (None when the bound is under 0.5), unmet demand in
    /// cores, reclaimed and reclaimable KiB, guests swapping.
    pub fn push(&mut self, ratio: Option<f64>, delay_cores: f64, reclaimed: (f64, f64), starving: usize) {
        if let Some(r) = ratio {
            self.ratio.0 += r;
            self.ratio.1 += 1;
        }
        self.delay += delay_cores;
        self.reclaimed.0 += reclaimed.0;
        self.reclaimed.1 += reclaimed.1;
        #[allow(clippy::cast_precision_loss)]
        let starving = starving as f64;
        self.starving += starving;
        self.at += 1;
        if self.at.is_multiple_of(self.per_bucket) {
            self.flush();
        }
    }

    #[allow(clippy::cast_precision_loss)]
    fn flush(&mut self) {
        let n = match self.at % self.per_bucket {
            0 => self.per_bucket,
            r => r,
        } as f64;
        let start = self.at as f64 - n;
        let s = &mut self.out;
        s.hours.push((start + n / 2.0) * self.quantum_h);
        s.busiest_over_bound.push(if self.ratio.1 > 0 { self.ratio.0 / f64::from(self.ratio.1) } else { f64::NAN });
        s.delay_cores.push(self.delay / n);
        s.mem_reclaimed.push(if self.reclaimed.1 > 0.0 { self.reclaimed.0 / self.reclaimed.1 } else { f64::NAN });
        s.starving_guests.push(self.starving / n);
        (self.ratio, self.delay, self.reclaimed, self.starving) = ((0.0, 0), 0.0, (0.0, 0.0), 0.0);
    }

    /// The series, the last partial bucket included.
    pub fn finish(mut self) -> Series {
        if !self.at.is_multiple_of(self.per_bucket) {
            self.flush();
        }
        self.out
    }
}

impl Series {
    /// The bucket-wise mean of several seeds' series of one policy (NaN buckets left out).
    pub fn mean(all: &[&Series]) -> Series {
        let Some(first) = all.first() else { return Series::default() };
        let avg = |f: fn(&Series) -> &Vec<f64>| -> Vec<f64> {
            (0..f(first).len())
                .map(|i| {
                    let xs: Vec<f64> =
                        all.iter().filter_map(|s| f(s).get(i).copied()).filter(|x| x.is_finite()).collect();
                    #[allow(clippy::cast_precision_loss)]
                    let n = xs.len() as f64;
                    if xs.is_empty() { f64::NAN } else { xs.iter().sum::<f64>() / n }
                })
                .collect()
        };
        Series {
            hours: first.hours.clone(),
            busiest_over_bound: avg(|s| &s.busiest_over_bound),
            delay_cores: avg(|s| &s.delay_cores),
            mem_reclaimed: avg(|s| &s.mem_reclaimed),
            starving_guests: avg(|s| &s.starving_guests),
        }
    }
}

/// Drawing the picture failed (plotters reports its errors as text).
#[derive(Debug, thiserror::Error)]
#[error("drawing the plot: {0}")]
pub struct PlotError(String);

const COLOURS: [RGBColor; 5] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(127, 127, 127),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
];

type Panel = (&'static str, fn(&Series) -> &Vec<f64>);

/// The SVG document: four panels (busiest/bound, delay, memory reclaimed, starving guests)
/// with one line per `(policy name, series)`.
pub fn render_svg(title: &str, lines: &[(&str, &Series)]) -> Result<String, PlotError> {
    let mut svg = String::new();
    draw(&mut svg, title, lines).map_err(|e| PlotError(e.to_string()))?;
    Ok(svg)
}

fn draw<'a>(
    svg: &'a mut String,
    title: &str,
    lines: &[(&str, &Series)],
) -> Result<(), Box<dyn std::error::Error + 'a>> {
    let root = SVGBackend::with_string(svg, (1200, 800)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let panels: [Panel; 4] = [
        ("busiest cpu load / lower bound", |s| &s.busiest_over_bound),
        ("vCPU delay (cores of unmet demand)", |s| &s.delay_cores),
        ("memory reclaimed / reclaimable", |s| &s.mem_reclaimed),
        ("guests starving (swapping)", |s| &s.starving_guests),
    ];
    let x_max = lines.iter().filter_map(|(_, s)| s.hours.last().copied()).fold(0.0f64, f64::max).max(1e-3);
    for (area, (caption, get)) in root.split_evenly((2, 2)).iter().zip(panels) {
        let finite = lines.iter().flat_map(|(_, s)| get(s).iter().copied()).filter(|x| x.is_finite());
        let y_max = finite.fold(0.0f64, f64::max);
        let y_max = if y_max > 0.0 { y_max * 1.05 } else { 1.0 };
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(32)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
        chart.configure_mesh().x_desc("virtual hours").light_line_style(WHITE.mix(0.0)).draw()?;
        for (i, (name, s)) in lines.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let points = s.hours.iter().zip(get(s)).filter(|(_, y)| y.is_finite()).map(|(&x, &y)| (x, y));
            chart
                .draw_series(LineSeries::new(points, colour.stroke_width(2)))?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2)));
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorder_folds_quanta_into_buckets_and_keeps_the_partial_last_one() {
        let mut r = Recorder::new(1000, 3600.0);
        for q in 0..1000 {
            r.push(if q % 2 == 0 { Some(1.0) } else { None }, 2.0, (1.0, 4.0), 3);
        }
        let s = r.finish();
        // 1000 quanta in buckets of 3: 333 full ones and one of a single quantum.
        assert_eq!(s.hours.len(), 334);
        assert!((s.hours[0] - 1.5).abs() < 1e-9, "{}", s.hours[0]);
        assert!((s.hours[333] - 999.5).abs() < 1e-9, "{}", s.hours[333]);
        assert!(s.delay_cores.iter().all(|&d| (d - 2.0).abs() < 1e-9));
        assert!(s.mem_reclaimed.iter().all(|&m| (m - 0.25).abs() < 1e-9));
        assert!(s.starving_guests.iter().all(|&g| (g - 3.0).abs() < 1e-9));
        // The last bucket's one quantum had no bound: no ratio there.
        assert!(s.busiest_over_bound[..333].iter().all(|&b| (b - 1.0).abs() < 1e-9));
        assert!(s.busiest_over_bound[333].is_nan());
    }

    #[test]
    fn a_bucket_without_a_bound_has_no_ratio_and_the_mean_skips_it() {
        let mut r = Recorder::new(2, 1.0);
        r.push(None, 0.0, (0.0, 0.0), 0);
        r.push(None, 0.0, (0.0, 0.0), 0);
        let a = r.finish();
        assert!(a.busiest_over_bound[0].is_nan() && a.mem_reclaimed[0].is_nan());
        let mut r = Recorder::new(2, 1.0);
        r.push(Some(2.0), 1.0, (1.0, 1.0), 2);
        r.push(Some(2.0), 1.0, (1.0, 1.0), 2);
        let b = r.finish();
        let m = Series::mean(&[&a, &b]);
        assert_eq!(m.busiest_over_bound, vec![2.0, 2.0]);
        assert_eq!(m.delay_cores, vec![0.5, 0.5]);
    }

    #[test]
    fn the_picture_names_every_panel_and_policy() {
        let mut r = Recorder::new(10, 60.0);
        for q in 0..10u32 {
            r.push(Some(1.0 + f64::from(q) / 10.0), f64::from(q), (1.0, 2.0), 1);
        }
        let s = r.finish();
        let svg = render_svg("test run", &[("vm-balancer", &s), ("baseline", &Series::default())]).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        for word in
            ["test run", "busiest cpu load", "vCPU delay", "memory reclaimed", "starving", "vm-balancer", "baseline"]
        {
            assert!(svg.contains(word), "no {word:?} in the picture");
        }
        assert!(svg.contains("<polyline"), "no line drawn");
    }
}
