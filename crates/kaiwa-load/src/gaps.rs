//! How long replies stopped coming, the figure a run against a cluster whose processes are
//! killed is about: [`Timeline`] finds the longest time in which no client of the run saw a
//! reply at all, and [`Wait`] one client's longest wait between replies while it had a message
//! awaiting one. Both go by the instant the client's reader saw a reply frame.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The most buckets a timeline keeps (2 MiB of bits): past that, buckets grow instead, so a
/// very long `--timeout` costs resolution rather than memory.
const MAX_BUCKETS: u64 = 1 << 24;

/// The milliseconds in which any client saw a reply, as one bit each, shared by every client
/// of a run. A bit per bucket instead of a "last reply" clock: readers on several threads mark
/// their replies in whatever order they get to it, and the silence must still be measured
/// between replies in the order they came, and cut to the sending phase afterwards.
#[derive(Debug)]
pub struct Timeline {
    origin: Instant,
    bucket: Duration,
    bits: Box<[AtomicU64]>,
}

impl Default for Timeline {
    /// A timeline that keeps nothing, for runs that do not measure silences.
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            bucket: Duration::from_millis(1),
            bits: Box::new([]),
        }
    }
}

impl Timeline {
    /// A timeline from now, long enough for a run that lasts at most `span`.
    pub fn new(span: Duration) -> Self {
        let millis = u64::try_from(span.as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let per_bucket = millis.div_ceil(MAX_BUCKETS).max(1);
        let buckets = millis.div_ceil(per_bucket);
        let words = usize::try_from(buckets.div_ceil(64)).unwrap_or(0);
        Self {
            origin: Instant::now(),
            bucket: Duration::from_millis(per_bucket),
            bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn capacity(&self) -> u64 {
        self.bits.len() as u64 * 64
    }

    /// The bucket of `at`; `None` past the end of the timeline.
    fn bucket_of(&self, at: Instant) -> Option<u64> {
        let since = at.saturating_duration_since(self.origin);
        let index = u64::try_from(since.as_nanos() / self.bucket.as_nanos().max(1)).ok()?;
        (index < self.capacity()).then_some(index)
    }

    /// A client saw a reply at `at`.
    pub fn mark(&self, at: Instant) {
        let Some(index) = self.bucket_of(at) else {
            return;
        };
        if let Some(word) = usize::try_from(index / 64)
            .ok()
            .and_then(|w| self.bits.get(w))
        {
            word.fetch_or(1 << (index % 64), Ordering::Relaxed);
        }
    }

    fn is_marked(&self, index: u64) -> bool {
        usize::try_from(index / 64)
            .ok()
            .and_then(|w| self.bits.get(w))
            .is_some_and(|word| word.load(Ordering::Relaxed) & (1 << (index % 64)) != 0)
    }

    /// The buckets from the one of `from` to the one of `to` (or the last), if the timeline
    /// keeps any.
    fn span(&self, from: Instant, to: Instant) -> Option<(u64, u64)> {
        if self.bits.is_empty() {
            return None;
        }
        let first = self.bucket_of(from)?;
        let last = self.bucket_of(to).unwrap_or(self.capacity() - 1);
        Some((first, last))
    }

    /// The runs of buckets within `first..=last` in which nobody saw a reply, in order, as
    /// (first bucket, length in buckets).
    fn quiet_runs(&self, first: u64, last: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut index = first;
        std::iter::from_fn(move || {
            while index <= last && self.is_marked(index) {
                index += 1;
            }
            if index > last {
                return None;
            }
            let start = index;
            while index <= last && !self.is_marked(index) {
                index += 1;
            }
            Some((start, index - start))
        })
    }

    fn buckets(&self, count: u64) -> Duration {
        self.bucket
            .saturating_mul(u32::try_from(count).unwrap_or(u32::MAX))
    }

    /// The longest run of time within `from..to` in which nobody saw a reply, to the bucket
    /// (a millisecond unless the run was allowed to last days); `None` if the timeline keeps
    /// nothing.
    pub fn longest_silence(&self, from: Instant, to: Instant) -> Option<Duration> {
        let (first, last) = self.span(from, to)?;
        let longest = self
            .quiet_runs(first, last)
            .map(|(_, length)| length)
            .max()
            .unwrap_or(0);
        Some(self.buckets(longest))
    }

    /// Every run of time within `from..to` of at least `at_least` in which nobody saw a reply,
    /// in order, as (when it began, how long it lasted).
    pub fn silences(
        &self,
        from: Instant,
        to: Instant,
        at_least: Duration,
    ) -> Vec<(Instant, Duration)> {
        let Some((first, last)) = self.span(from, to) else {
            return Vec::new();
        };
        self.quiet_runs(first, last)
            .map(|(start, length)| (self.origin + self.buckets(start), self.buckets(length)))
            .filter(|(_, length)| *length >= at_least)
            .collect()
    }
}

/// One client's longest wait for a reply: a wait starts when the client has a message awaiting
/// its answers and nothing else outstanding, and ends at each reply (the next one starts there
/// while messages are still due) or when the last message due settles.
#[derive(Debug, Clone, Copy, Default)]
pub struct Wait {
    since: Option<Instant>,
    longest: Duration,
}

impl Wait {
    /// The client had nothing outstanding and now awaits an answer.
    pub fn start(&mut self, at: Instant) {
        self.since.get_or_insert(at);
    }

    /// A reply came; `more` says whether the client still awaits answers after it.
    pub fn reply(&mut self, at: Instant, more: bool) {
        self.end(at);
        if more {
            self.since = Some(at);
        }
    }

    /// Nothing is outstanding any more (or the client stops counting).
    pub fn end(&mut self, at: Instant) {
        if let Some(since) = self.since.take() {
            self.longest = self.longest.max(at.saturating_duration_since(since));
        }
    }

    pub fn longest(&self) -> Duration {
        self.longest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_silence_is_between_replies_and_cut_to_the_phase() {
        let timeline = Timeline::new(Duration::from_secs(10));
        let at = |ms: u64| timeline.origin + Duration::from_millis(ms);
        // Marked out of order, as readers on two threads would.
        for ms in [100, 130, 900, 110, 120, 1_000, 1_010] {
            timeline.mark(at(ms));
        }
        // 131..899 is the longest gap between replies: 769 buckets empty.
        assert_eq!(
            timeline.longest_silence(at(100), at(1_010)),
            Some(Duration::from_millis(769))
        );
        // From the start of the phase to the first reply, and from the last to its end.
        assert_eq!(
            timeline.longest_silence(at(0), at(200)),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            timeline.longest_silence(at(1_000), at(3_000)),
            Some(Duration::from_millis(1_990))
        );
        assert_eq!(Timeline::default().longest_silence(at(0), at(5)), None);
    }

    #[test]
    fn every_silence_long_enough_is_listed_in_order_and_cut_to_the_phase() {
        let timeline = Timeline::new(Duration::from_secs(10));
        let at = |ms: u64| timeline.origin + Duration::from_millis(ms);
        for ms in (0..100).chain(400..410).chain(420..500).chain(1_500..1_600) {
            timeline.mark(at(ms));
        }
        let ms = |silences: Vec<(Instant, Duration)>| -> Vec<(u128, u128)> {
            silences
                .into_iter()
                .map(|(start, length)| {
                    (
                        start.duration_since(timeline.origin).as_millis(),
                        length.as_millis(),
                    )
                })
                .collect()
        };
        // 100..400 and 500..1 500; the 10 ms gap at 410 is too short to list.
        assert_eq!(
            ms(timeline.silences(at(0), at(1_599), Duration::from_millis(100))),
            [(100, 300), (500, 1_000)]
        );
        // From the start of the phase to the next reply, and from the last to its end.
        assert_eq!(
            ms(timeline.silences(at(200), at(2_000), Duration::from_millis(100))),
            [(200, 200), (500, 1_000), (1_600, 401)]
        );
        assert_eq!(
            ms(timeline.silences(at(0), at(1_599), Duration::from_millis(5))),
            [(100, 300), (410, 10), (500, 1_000)]
        );
        assert!(
            Timeline::default()
                .silences(at(0), at(5), Duration::ZERO)
                .is_empty()
        );
    }

    #[test]
    fn a_very_long_span_keeps_fewer_coarser_buckets() {
        let timeline = Timeline::new(Duration::from_secs(100 * 24 * 3600));
        assert!(timeline.capacity() <= MAX_BUCKETS + 64);
        assert!(timeline.bucket > Duration::from_millis(1));
        timeline.mark(timeline.origin + Duration::from_secs(3600));
        let silence = timeline
            .longest_silence(timeline.origin, timeline.origin + Duration::from_secs(7200))
            .expect("a silence");
        assert!(silence >= Duration::from_secs(3599), "{silence:?}");
    }

    #[test]
    fn a_wait_runs_from_the_first_message_due_to_each_reply_and_stops_when_nothing_is_due() {
        let origin = Instant::now();
        let at = |ms: u64| origin + Duration::from_millis(ms);
        let mut wait = Wait::default();
        wait.start(at(0));
        wait.start(at(50));
        wait.reply(at(300), true);
        wait.reply(at(400), false);
        // Nothing due from 400 to 1 000: not a wait.
        wait.start(at(1_000));
        wait.reply(at(1_200), true);
        wait.end(at(1_250));
        assert_eq!(wait.longest(), Duration::from_millis(300));
    }
}
