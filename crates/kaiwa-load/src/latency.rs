//! Latency histograms: microseconds in HdrHistograms made on first use, shared by the run's
//! report and its per-second series.

use hdrhistogram::Histogram;
use std::time::Duration;

/// Microseconds, up to an hour, at two significant digits (1 %): small enough to keep one per
/// message type per client.
pub(crate) fn new_histogram() -> Option<Histogram<u32>> {
    // The bounds are constants that hdrhistogram accepts, so this is always `Some`.
    Histogram::new_with_bounds(1, 3_600_000_000, 2).ok()
}

/// Adds `other` into `slot`, creating the histogram on first use.
pub(crate) fn add_into(slot: &mut Option<Histogram<u32>>, other: &Histogram<u32>) {
    if slot.is_none() {
        *slot = new_histogram();
    }
    if let Some(mine) = slot {
        // Same bounds on both sides, so adding cannot fail.
        mine.add(other).ok();
    }
}

/// Records `latency` into `slot` (in microseconds, at least one), creating the histogram on
/// first use.
pub(crate) fn record_into(slot: &mut Option<Histogram<u32>>, latency: Duration) {
    let micros = u64::try_from(latency.as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    if slot.is_none() {
        *slot = new_histogram();
    }
    if let Some(histogram) = slot {
        histogram.saturating_record(micros);
    }
}
