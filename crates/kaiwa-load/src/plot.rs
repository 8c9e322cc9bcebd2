//! `--plot`: a message run drawn as one SVG. Three panels: messages completed per second and
//! p50/p99 latency to the last reply over the run's seconds (for `--reconnect` runs, with the
//! reconnects and the times no client got a reply marked on the time axis), then the
//! distribution of latency to the last reply by message type. Drawn with plotters' SVG
//! backend, whose text is SVG `<text>` the viewer lays out: no font library at run time.

use crate::report::{Live, Summary, Tally};
use crate::series::Bucket;
use hdrhistogram::Histogram;
use plotters::backend::SVGBackend;
use plotters::chart::{ChartBuilder, ChartContext, SeriesLabelPosition};
use plotters::coord::cartesian::Cartesian2d;
use plotters::coord::combinators::{BindKeyPoints, IntoLogRange, LogCoord, WithKeyPoints};
use plotters::coord::ranged1d::Ranged;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::{CoordTranslate, Shift};
use plotters::drawing::{DrawingArea, DrawingAreaErrorKind, IntoDrawingArea};
use plotters::element::{PathElement, Rectangle, Text};
use plotters::series::LineSeries;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{BLACK, Color, IntoFont, RGBColor, ShapeStyle, WHITE};
use std::path::Path;
use std::time::{Duration, Instant};

/// Silences shorter than this are not marked: at a few hundred messages per second the gaps
/// between replies are milliseconds, and an outage is what the marks are for.
pub const MARKED_SILENCE: Duration = Duration::from_millis(250);
/// The most silences marked (the longest ones), so a run that stalls often stays readable.
const MARKED_SILENCES_MAX: usize = 20;

const SIZE: (u32, u32) = (1100, 1250);
const FONT: &str = "sans-serif";
/// The x axis of the time panels.
pub const TIME_AXIS: &str = "seconds since the run began";
/// The y axis of the throughput panel.
pub const THROUGHPUT_AXIS: &str = "completed messages per second";
/// The throughput line in the legend.
pub const THROUGHPUT_SERIES: &str = "completed messages/s (per-second bucket)";
/// The y axis of the latency panel.
pub const LATENCY_AXIS: &str = "latency to last reply, p50 and p99 (ms, log scale)";
/// The x axis of the distribution panel.
pub const DISTRIBUTION_AXIS: &str = "latency to last reply (ms, log scale)";
/// The y axis of the distribution panel.
pub const SHARE_AXIS: &str = "% of the type's replied messages within";

const THROUGHPUT: RGBColor = RGBColor(31, 119, 180);
const P50: RGBColor = RGBColor(44, 160, 44);
const P99: RGBColor = RGBColor(214, 39, 40);
const RECONNECT: RGBColor = RGBColor(255, 127, 14);
const SILENCE: RGBColor = RGBColor(148, 103, 189);
/// One colour per message type, in order.
const TYPES: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("cannot draw the plot: {0}")]
    Draw(#[from] DrawingAreaErrorKind<std::io::Error>),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

type Drawn = Result<(), DrawingAreaErrorKind<std::io::Error>>;

/// A time in which no client of the run got a reply, in seconds since the run began.
#[derive(Debug, Clone, PartialEq)]
pub struct Silence {
    pub start: f64,
    pub length: f64,
}

/// The latency to the last reply of one message type, as a cumulative distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct TypeCurve {
    pub kind: String,
    pub sent: u64,
    pub replied: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// (latency in ms, % of the replied messages at or under it), as steps.
    pub points: Vec<(f64, f64)>,
}

impl TypeCurve {
    pub fn of(kind: &str, sent: u64, reply: Option<&Histogram<u32>>) -> Self {
        let ms = |micros: u64| micros as f64 / 1000.0;
        let mut points = Vec::new();
        if let Some(histogram) = reply.filter(|h| !h.is_empty()) {
            let mut below = 0.0;
            points.push((ms(histogram.lowest_equivalent(histogram.min())), 0.0));
            for step in histogram.iter_recorded() {
                let at = ms(step.value_iterated_to());
                let share = step.quantile() * 100.0;
                points.push((at, below));
                points.push((at, share));
                below = share;
            }
        }
        let quantile = |q: f64| {
            reply
                .filter(|h| !h.is_empty())
                .map(|h| ms(h.value_at_quantile(q)))
        };
        Self {
            kind: kind.to_owned(),
            sent,
            replied: reply.map_or(0, Histogram::len),
            p50_ms: quantile(0.50),
            p99_ms: quantile(0.99),
            points,
        }
    }

    /// Its entry in the legend.
    pub fn legend(&self) -> String {
        match (self.p50_ms, self.p99_ms) {
            (Some(p50), Some(p99)) => format!(
                "{}: {} replied, p50 {} ms, p99 {} ms",
                self.kind,
                self.replied,
                ms_label(p50),
                ms_label(p99)
            ),
            _ => format!("{}: {} sent, none replied", self.kind, self.sent),
        }
    }
}

/// What a plot of a run shows.
#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub buckets: Vec<Bucket>,
    /// The clients reconnected when a connection ended under them: reconnects and silences
    /// are marked.
    pub reconnect: bool,
    /// The longest silences of at least [`MARKED_SILENCE`], in order.
    pub silences: Vec<Silence>,
    pub types: Vec<TypeCurve>,
}

impl Chart {
    /// The chart of a finished run: `phase` is its sending phase (the silences are looked for
    /// there, as for the summary's longest silence), `end` when its last client was done.
    pub fn of(
        summary: &Summary,
        tally: &Tally,
        live: &Live,
        phase: Option<(Instant, Instant)>,
        end: Instant,
    ) -> Self {
        let mut silences: Vec<Silence> = match phase {
            Some((from, to)) if summary.reconnect => live
                .replies
                .silences(from, to, MARKED_SILENCE)
                .into_iter()
                .map(|(at, length)| Silence {
                    start: live.series.seconds(at),
                    length: length.as_secs_f64(),
                })
                .collect(),
            _ => Vec::new(),
        };
        silences.sort_by(|a, b| b.length.total_cmp(&a.length));
        silences.truncate(MARKED_SILENCES_MAX);
        silences.sort_by(|a, b| a.start.total_cmp(&b.start));
        Self {
            title: title(summary),
            buckets: live.series.buckets(end),
            reconnect: summary.reconnect,
            silences,
            types: tally
                .by_type
                .iter()
                .map(|(kind, t)| TypeCurve::of(kind, t.sent, t.reply.as_ref()))
                .collect(),
        }
    }

    /// The plot as an SVG document.
    pub fn svg(&self) -> Result<String, PlotError> {
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
            root.fill(&WHITE)?;
            let root = root.titled(&self.title, (FONT, 20))?;
            let panels = root.split_evenly((3, 1));
            if let [throughput, latency, distribution] = panels.as_slice() {
                self.draw_throughput(throughput)?;
                self.draw_latency(latency)?;
                self.draw_distribution(distribution)?;
            }
            root.present()?;
        }
        Ok(svg)
    }

    /// Writes the plot to `path`.
    pub fn write(&self, path: &Path) -> Result<(), PlotError> {
        let svg = self.svg()?;
        std::fs::write(path, svg).map_err(|source| PlotError::Write {
            path: path.display().to_string(),
            source,
        })
    }

    /// The end of the time axis: the end of the last bucket.
    fn end(&self) -> f64 {
        self.buckets
            .last()
            .map_or(0.0, |b| b.start + b.span)
            .max(1.0)
    }

    fn draw_throughput(&self, area: &DrawingArea<SVGBackend<'_>, Shift>) -> Drawn {
        let top = self
            .buckets
            .iter()
            .map(Bucket::throughput)
            .fold(0.0, f64::max)
            .max(1.0)
            // Room for the legend above the line: three entries with the marks.
            * if self.reconnect { 1.5 } else { 1.25 };
        let mut chart = ChartBuilder::on(area)
            .caption("Throughput", (FONT, 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..self.end(), 0.0..top)?;
        chart
            .configure_mesh()
            .x_desc(TIME_AXIS)
            .y_desc(THROUGHPUT_AXIS)
            .y_label_formatter(&|rate| format!("{rate:.0}"))
            .draw()?;
        self.draw_marks(&mut chart, (0.0, top), true)?;
        let style = THROUGHPUT.stroke_width(2);
        chart
            .draw_series(
                LineSeries::new(
                    self.buckets.iter().map(|b| (middle(b), b.throughput())),
                    style,
                )
                .point_size(2),
            )?
            .label(THROUGHPUT_SERIES)
            .legend(line_key(style));
        legend(&mut chart, SeriesLabelPosition::UpperRight)
    }

    fn draw_latency(&self, area: &DrawingArea<SVGBackend<'_>, Shift>) -> Drawn {
        let values = || {
            self.buckets
                .iter()
                .flat_map(|b| [b.p50_ms, b.p99_ms])
                .flatten()
        };
        // The top fifth is left to the legend.
        let (low, high) = log_axis(values(), 0.8);
        let mut chart = ChartBuilder::on(area)
            .caption(
                "Latency to the last reply, per second (messages whose last reply came in it)",
                (FONT, 16),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..self.end(), log_range(low, high))?;
        chart
            .configure_mesh()
            .x_desc(TIME_AXIS)
            .y_desc(LATENCY_AXIS)
            .y_label_formatter(&|ms| ms_label(*ms))
            .draw()?;
        self.draw_marks(&mut chart, (low, high), false)?;
        for (name, color, quantile) in [
            (
                "p99",
                P99,
                (|b: &Bucket| b.p99_ms) as fn(&Bucket) -> Option<f64>,
            ),
            ("p50", P50, |b: &Bucket| b.p50_ms),
        ] {
            let style = color.stroke_width(2);
            // A second without replies breaks the line rather than bridging the outage.
            let runs = runs(
                self.buckets
                    .iter()
                    .map(|b| quantile(b).map(|ms| (middle(b), ms))),
            );
            chart
                .draw_series(
                    runs.into_iter()
                        .flat_map(move |run| LineSeries::new(run, style).point_size(2)),
                )?
                .label(name)
                .legend(line_key(style));
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)
    }

    fn draw_distribution(&self, area: &DrawingArea<SVGBackend<'_>, Shift>) -> Drawn {
        // The curves end at the slowest reply: right of it, room for the legend.
        let (low, high) = log_axis(
            self.types
                .iter()
                .flat_map(|t| t.points.iter().map(|(ms, _)| *ms)),
            0.62,
        );
        let mut chart = ChartBuilder::on(area)
            .caption(
                "Latency to the last reply by message type (whole run)",
                (FONT, 16),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(log_range(low, high), 0.0..100.0)?;
        chart
            .configure_mesh()
            .x_desc(DISTRIBUTION_AXIS)
            .y_desc(SHARE_AXIS)
            .x_label_formatter(&|ms| ms_label(*ms))
            .y_label_formatter(&|share| format!("{share:.0}"))
            .draw()?;
        for (index, curve) in self.types.iter().enumerate() {
            let style = TYPES[index % TYPES.len()].stroke_width(2);
            chart
                .draw_series(LineSeries::new(curve.points.iter().copied(), style))?
                .label(curve.legend())
                .legend(line_key(style));
        }
        legend(&mut chart, SeriesLabelPosition::LowerRight)
    }

    /// Silences as bands and reconnects as lines across a time panel; `labelled`, with the
    /// count of reconnects at the foot of each line and entries in the legend (the panels share
    /// one time axis, so one panel says what the marks are).
    fn draw_marks<'a, Y: Ranged<ValueType = f64>>(
        &self,
        chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, Y>>,
        (low, high): (f64, f64),
        labelled: bool,
    ) -> Drawn {
        if !self.reconnect {
            return Ok(());
        }
        let band: ShapeStyle = SILENCE.mix(0.25).filled();
        let bands = chart.draw_series(
            self.silences
                .iter()
                .map(|s| Rectangle::new([(s.start, low), (s.start + s.length, high)], band)),
        )?;
        if labelled {
            let longest = self.silences.iter().map(|s| s.length).fold(0.0, f64::max);
            let label = if self.silences.is_empty() {
                format!(
                    "no client got a reply for {} ms or more: never",
                    MARKED_SILENCE.as_millis()
                )
            } else {
                format!(
                    "no client got a reply (for {} ms or more; longest {longest:.2} s)",
                    MARKED_SILENCE.as_millis()
                )
            };
            bands
                .label(label)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], band));
        }
        let line = RECONNECT.stroke_width(1);
        let reconnected: Vec<&Bucket> = self.buckets.iter().filter(|b| b.reconnects > 0).collect();
        let lines = chart.draw_series(
            reconnected
                .iter()
                .map(|b| PathElement::new(vec![(middle(b), low), (middle(b), high)], line)),
        )?;
        if labelled {
            let total: u64 = reconnected.iter().map(|b| b.reconnects).sum();
            lines
                .label(format!(
                    "reconnects: {total} (count per second at the foot)"
                ))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x + 10, y - 6), (x + 10, y + 6)], line)
                });
            chart.draw_series(reconnected.iter().map(|b| {
                Text::new(
                    format!(" {}", b.reconnects),
                    (middle(b), low),
                    (FONT, 11)
                        .into_font()
                        .color(&RECONNECT)
                        .pos(Pos::new(HPos::Left, VPos::Bottom)),
                )
            }))?;
        }
        Ok(())
    }
}

fn legend<'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, CT>,
    position: SeriesLabelPosition,
) -> Drawn {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 13))
        .draw()
}

/// A series' key in the legend: a short line in its style.
fn line_key(style: ShapeStyle) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style)
}

fn title(summary: &Summary) -> String {
    let label = summary
        .label
        .as_deref()
        .map(|l| format!(" {l}"))
        .unwrap_or_default();
    let rate = summary
        .offered_rate
        .map(|r| format!(", {r:.0} msg/s offered"))
        .unwrap_or_default();
    let reconnect = if summary.reconnect {
        ", --reconnect"
    } else {
        ""
    };
    format!(
        "kaiwa-load {}{label}: {} clients{rate}{reconnect}; {} completed, {:.0} msg/s; started {}",
        summary.scenario,
        summary.clients,
        summary.completed,
        summary.throughput,
        summary.started_at
    )
}

fn middle(bucket: &Bucket) -> f64 {
    bucket.start + bucket.span / 2.0
}

/// The runs of consecutive points that are there.
fn runs(points: impl Iterator<Item = Option<(f64, f64)>>) -> Vec<Vec<(f64, f64)>> {
    let mut runs: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut open = false;
    for point in points {
        match (point, open) {
            (Some(point), true) => {
                if let Some(run) = runs.last_mut() {
                    run.push(point);
                }
            }
            (Some(point), false) => {
                runs.push(vec![point]);
                open = true;
            }
            (None, _) => open = false,
        }
    }
    runs
}

/// A log axis over `values` (milliseconds): from the power of ten at or under the least, so
/// that it has a label at its foot, to where the greatest takes `share` of its length (the
/// rest is the legend's), at least a decade long; a decade around 1 ms when there are none.
fn log_axis(values: impl Iterator<Item = f64>, share: f64) -> (f64, f64) {
    let (least, greatest) = values
        .filter(|v| *v > 0.0)
        .fold((f64::MAX, 0.0_f64), |(low, high), v| {
            (low.min(v), high.max(v))
        });
    if greatest <= 0.0 {
        return (0.1, 10.0);
    }
    let low = 10f64.powf(least.log10().floor()).max(0.001);
    let high = (low * (greatest / low).powf(1.0 / share)).max(low * 10.0);
    (low, high)
}

/// A log range labelled at 1, 2 and 5 of each decade (at each power of ten only, over more
/// than three decades), with light lines at the other multiples: plotters' own choice crowds
/// its labels at the top of a decade.
fn log_range(low: f64, high: f64) -> WithKeyPoints<LogCoord<f64>> {
    let labelled: &[u32] = if high / low > 1_000.0 {
        &[1]
    } else {
        &[1, 2, 5]
    };
    let (mut bold, mut light) = (Vec::new(), Vec::new());
    let mut decade = low;
    while decade <= high {
        for multiple in 1..10u32 {
            let value = decade * f64::from(multiple);
            if value > high {
                break;
            }
            if labelled.contains(&multiple) {
                bold.push(value);
            } else {
                light.push(value);
            }
        }
        decade *= 10.0;
    }
    (low..high)
        .log_scale()
        .with_key_points(bold)
        .with_light_points(light)
}

/// Milliseconds as people write them: 0.25, 3, 40, 1200.
fn ms_label(ms: f64) -> String {
    let text = if ms >= 10.0 {
        return format!("{ms:.0}");
    } else if ms >= 1.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.3}")
    };
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use plotters::coord::ranged1d::BoldPoints;

    fn histogram(values_ms: &[u64]) -> Histogram<u32> {
        let mut histogram = crate::latency::new_histogram().expect("a histogram");
        for ms in values_ms {
            histogram.record(ms * 1000).expect("in range");
        }
        histogram
    }

    #[test]
    fn a_type_curve_rises_in_steps_from_zero_to_all_its_replies() {
        let curve = TypeCurve::of("voice", 5, Some(&histogram(&[2, 2, 10, 40])));
        assert_eq!((curve.sent, curve.replied), (5, 4));
        let first = curve.points.first().expect("points");
        let last = curve.points.last().expect("points");
        assert!((first.0 - 2.0).abs() < 0.05 && first.1 == 0.0, "{first:?}");
        assert!((last.0 - 40.0).abs() < 0.5 && last.1 == 100.0, "{last:?}");
        // Never falls, and reaches 50 % at 2 ms.
        assert!(
            curve
                .points
                .windows(2)
                .all(|w| w[1].0 >= w[0].0 && w[1].1 >= w[0].1)
        );
        assert!(
            curve
                .points
                .iter()
                .any(|(ms, share)| (*ms - 2.0).abs() < 0.05 && *share == 50.0),
            "{:?}",
            curve.points
        );
        assert!(
            curve
                .legend()
                .starts_with("voice: 4 replied, p50 2 ms, p99 40 ms"),
            "{}",
            curve.legend()
        );
        let silent = TypeCurve::of("video", 3, None);
        assert!(silent.points.is_empty());
        assert_eq!(silent.legend(), "video: 3 sent, none replied");
    }

    #[test]
    fn a_latency_line_breaks_where_a_second_had_no_reply() {
        let points = [
            Some((0.5, 1.0)),
            Some((1.5, 2.0)),
            None,
            Some((3.5, 4.0)),
            None,
        ];
        assert_eq!(
            runs(points.into_iter()),
            [vec![(0.5, 1.0), (1.5, 2.0)], vec![(3.5, 4.0)]]
        );
        assert!(runs([None, None].into_iter()).is_empty());
    }

    #[test]
    fn log_axes_start_at_a_power_of_ten_and_leave_room_for_the_legend() {
        assert_eq!(log_axis([].into_iter(), 0.8), (0.1, 10.0));
        let (low, high) = log_axis([0.2, 30.0].into_iter(), 0.5);
        assert_eq!(low, 0.1);
        assert!((high - 0.1 * 300.0 * 300.0).abs() < 1e-6, "{high}");
        assert_eq!(log_axis([110.0, 200.0].into_iter(), 0.8), (100.0, 1_000.0));
        assert_eq!(log_axis([5.0].into_iter(), 0.8), (1.0, 10.0));
        assert_eq!(ms_label(0.25), "0.25");
        assert_eq!(ms_label(3.04), "3");
        assert_eq!(ms_label(3.12), "3.1");
        assert_eq!(ms_label(1.0), "1");
    }

    #[test]
    fn log_axes_are_labelled_at_one_two_and_five_or_at_powers_of_ten_when_long() {
        let labels = |low: f64, high: f64| -> Vec<String> {
            log_range(low, high)
                .key_points(BoldPoints(100))
                .into_iter()
                .map(ms_label)
                .collect()
        };
        assert_eq!(labels(1.0, 60.0), ["1", "2", "5", "10", "20", "50"]);
        assert_eq!(labels(0.01, 100.0), ["0.01", "0.1", "1", "10", "100"]);
        assert_eq!(ms_label(1234.0), "1234");
    }
}
