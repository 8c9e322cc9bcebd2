//! What a run did second by second, for `--plot`: messages completed, latency to the last reply
//! and reconnects, in one-second buckets shared by every client of the run. What it keeps
//! follows the run's length, not its messages, and is capped: past [`MAX_BUCKETS`] buckets
//! they are merged in pairs and twice as wide, so a long run costs resolution, not memory.

use crate::latency::{add_into, record_into};
use hdrhistogram::Histogram;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// The most buckets a series keeps: about 17 minutes of seconds. A bucket's histogram is about
/// 13 KiB once it has a reply, so a series stays under 14 MiB however long the run.
pub const MAX_BUCKETS: usize = 1024;

/// The width of a bucket until a run outgrows [`MAX_BUCKETS`].
const FIRST_WIDTH: Duration = Duration::from_secs(1);

/// What happened in one bucket.
#[derive(Debug, Clone, Default)]
struct Counts {
    completed: u64,
    reconnects: u64,
    /// Latency to the last reply of the messages whose last reply came in this bucket.
    reply: Option<Histogram<u32>>,
}

impl Counts {
    fn merge(&mut self, other: &Counts) {
        self.completed += other.completed;
        self.reconnects += other.reconnects;
        if let Some(theirs) = &other.reply {
            add_into(&mut self.reply, theirs);
        }
    }
}

#[derive(Debug)]
struct Buckets {
    width: Duration,
    counts: Vec<Counts>,
}

impl Buckets {
    /// The bucket `since` the origin falls in, merging buckets in pairs until it fits.
    fn at(&mut self, since: Duration) -> &mut Counts {
        let mut index = bucket_index(since, self.width);
        while index >= MAX_BUCKETS {
            self.counts = self
                .counts
                .chunks(2)
                .map(|pair| {
                    let mut merged = Counts::default();
                    for counts in pair {
                        merged.merge(counts);
                    }
                    merged
                })
                .collect();
            self.width *= 2;
            index = bucket_index(since, self.width);
        }
        if self.counts.len() <= index {
            self.counts.resize_with(index + 1, Counts::default);
        }
        &mut self.counts[index]
    }
}

fn bucket_index(since: Duration, width: Duration) -> usize {
    usize::try_from(since.as_nanos() / width.as_nanos().max(1)).unwrap_or(usize::MAX)
}

/// The buckets of a run, filled by every client's ledger as frames arrive.
#[derive(Debug)]
pub struct Series {
    origin: Instant,
    buckets: Mutex<Buckets>,
}

impl Default for Series {
    fn default() -> Self {
        Self::new()
    }
}

/// One bucket as plotted.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    /// Where it starts, in seconds since the run began.
    pub start: f64,
    /// The seconds it covers: its width, or less for the last one, which the run's end cuts.
    pub span: f64,
    pub completed: u64,
    pub reconnects: u64,
    /// Latency to the last reply, in milliseconds, of the messages whose last reply came in
    /// it; `None` when none did.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl Bucket {
    /// Messages completed per second.
    pub fn throughput(&self) -> f64 {
        if self.span > 0.0 {
            self.completed as f64 / self.span
        } else {
            0.0
        }
    }
}

impl Series {
    /// A series whose first bucket starts now.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
            buckets: Mutex::new(Buckets {
                width: FIRST_WIDTH,
                counts: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Buckets> {
        // A client that panicked while recording left counts that are still counts.
        self.buckets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn since(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.origin)
    }

    /// Seconds from the start of the series to `at`.
    pub fn seconds(&self, at: Instant) -> f64 {
        self.since(at).as_secs_f64()
    }

    /// A message got everything it was due at `at`.
    pub fn completed(&self, at: Instant) {
        let since = self.since(at);
        self.lock().at(since).completed += 1;
    }

    /// A message's last reply came at `at`, `latency` after it was due.
    pub fn replied(&self, at: Instant, latency: Duration) {
        let since = self.since(at);
        record_into(&mut self.lock().at(since).reply, latency);
    }

    /// A client had a connection again at `at`, after one ended under it.
    pub fn reconnected(&self, at: Instant) {
        let since = self.since(at);
        self.lock().at(since).reconnects += 1;
    }

    /// Every bucket from the start to the one `end` falls in, empty ones too: a second in
    /// which nothing completed is what a plot of an outage is about. The last bucket is cut at
    /// `end`; cut to less than half its width, it is folded into the one before, so that no
    /// rate plotted comes from a sliver of time.
    pub fn buckets(&self, end: Instant) -> Vec<Bucket> {
        let end = self.since(end);
        let mut buckets = self.lock();
        buckets.at(end);
        let width = buckets.width.as_secs_f64();
        let end = end.as_secs_f64();
        let last = buckets.counts.len().saturating_sub(1);
        let sliver = (end - width * last as f64).max(0.0);
        let fold = last > 0 && sliver < width / 2.0;
        let mut plotted = Vec::with_capacity(buckets.counts.len());
        for (index, counts) in buckets.counts.iter().enumerate() {
            let start = width * index as f64;
            if fold && index + 1 == last {
                let mut merged = counts.clone();
                if let Some(tail) = buckets.counts.get(last) {
                    merged.merge(tail);
                }
                plotted.push(Bucket::of(start, width + sliver, &merged));
                break;
            }
            plotted.push(Bucket::of(start, (end - start).clamp(0.0, width), counts));
        }
        plotted
    }
}

impl Bucket {
    fn of(start: f64, span: f64, counts: &Counts) -> Self {
        let ms = |quantile: f64| {
            counts
                .reply
                .as_ref()
                .map(|histogram| histogram.value_at_quantile(quantile) as f64 / 1000.0)
        };
        Self {
            start,
            span,
            completed: counts.completed,
            reconnects: counts.reconnects,
            p50_ms: ms(0.50),
            p99_ms: ms(0.99),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(series: &Series, ms: u64) -> Instant {
        series.origin + Duration::from_millis(ms)
    }

    #[test]
    fn each_event_lands_in_the_second_it_happened_in_and_empty_seconds_are_kept() {
        let series = Series::new();
        for ms in [10, 500, 999, 3_000, 3_001] {
            series.completed(at(&series, ms));
        }
        series.reconnected(at(&series, 2_100));
        series.reconnected(at(&series, 2_900));
        let buckets = series.buckets(at(&series, 3_500));
        let completed: Vec<u64> = buckets.iter().map(|b| b.completed).collect();
        assert_eq!(completed, [3, 0, 0, 2]);
        let reconnects: Vec<u64> = buckets.iter().map(|b| b.reconnects).collect();
        assert_eq!(reconnects, [0, 0, 2, 0]);
        let starts: Vec<f64> = buckets.iter().map(|b| b.start).collect();
        assert_eq!(starts, [0.0, 1.0, 2.0, 3.0]);
        // The last second is cut at the run's end: two messages in half a second.
        assert_eq!(buckets[3].span, 0.5);
        assert_eq!(buckets[3].throughput(), 4.0);
        assert_eq!(buckets[0].throughput(), 3.0);
    }

    #[test]
    fn each_second_has_the_quantiles_of_its_own_replies() {
        let series = Series::new();
        // Second 0: 99 replies at 2 ms and one at 500 ms; second 2: one at 40 ms.
        for _ in 0..99 {
            series.replied(at(&series, 100), Duration::from_millis(2));
        }
        series.replied(at(&series, 900), Duration::from_millis(500));
        series.replied(at(&series, 2_500), Duration::from_millis(40));
        let buckets = series.buckets(at(&series, 2_600));
        let near =
            |value: Option<f64>, want: f64| value.is_some_and(|v| (v - want).abs() <= want * 0.01);
        assert!(near(buckets[0].p50_ms, 2.0), "{:?}", buckets[0]);
        assert!(near(buckets[0].p99_ms, 2.0), "{:?}", buckets[0]);
        assert_eq!(buckets[1].p50_ms, None, "no reply in second 1");
        assert!(near(buckets[2].p50_ms, 40.0), "{:?}", buckets[2]);
        assert!(near(buckets[2].p99_ms, 40.0), "{:?}", buckets[2]);
        // The 500 ms reply is the 100th of 100: above p99, and in no other second.
        series.replied(at(&series, 950), Duration::from_millis(500));
        let buckets = series.buckets(at(&series, 2_600));
        assert!(near(buckets[0].p99_ms, 500.0), "{:?}", buckets[0]);
    }

    #[test]
    fn a_run_longer_than_the_cap_keeps_wider_buckets_and_loses_no_count() {
        let series = Series::new();
        let seconds = MAX_BUCKETS as u64 * 3;
        for second in 0..seconds {
            series.completed(at(&series, second * 1_000 + 10));
            series.replied(at(&series, second * 1_000 + 10), Duration::from_millis(5));
        }
        series.reconnected(at(&series, 7_500));
        let buckets = series.buckets(at(&series, seconds * 1_000));
        assert!(buckets.len() <= MAX_BUCKETS, "{}", buckets.len());
        // Three times the cap fits in four-second buckets.
        assert_eq!(buckets[1].start, 4.0);
        assert_eq!(buckets.iter().map(|b| b.completed).sum::<u64>(), seconds);
        assert_eq!(buckets[1].reconnects, 1, "7.5 s is in the bucket of 4..8 s");
        assert_eq!(buckets[0].throughput(), 1.0);
        assert!(buckets.iter().all(|b| b.p50_ms.is_some()));
    }

    #[test]
    fn a_last_second_cut_short_is_folded_into_the_one_before() {
        let series = Series::new();
        for ms in [1_500, 2_100, 2_150] {
            series.completed(at(&series, ms));
        }
        series.replied(at(&series, 2_100), Duration::from_millis(7));
        let buckets = series.buckets(at(&series, 2_200));
        assert_eq!(buckets.len(), 2);
        let last = &buckets[1];
        assert_eq!((last.start, last.completed), (1.0, 3));
        assert!((last.span - 1.2).abs() < 1e-9, "{last:?}");
        assert!((last.throughput() - 2.5).abs() < 1e-9, "{last:?}");
        assert!(
            last.p50_ms.is_some(),
            "the folded sliver's replies are kept"
        );
    }

    #[test]
    fn a_run_with_nothing_in_it_still_has_its_seconds() {
        let series = Series::new();
        let buckets = series.buckets(at(&series, 2_000));
        assert_eq!(buckets.len(), 2);
        assert!(
            buckets
                .iter()
                .all(|b| b.completed == 0 && b.p50_ms.is_none())
        );
        assert_eq!(buckets[1].span, 1.0);
        assert_eq!(Series::new().buckets(Instant::now()).len(), 1);
    }
}
