//! The metrics recorder while nobody scrapes it: a histogram keeps every sample until something
//! drains it, so what it holds must stay flat however many samples go in, as long as
//! `telemetry::keep_metrics` runs. Before it did, each store batch kept 16 bytes for good.

use kaiwa::telemetry::{self, METRICS_UPKEEP};
use metrics_exporter_prometheus::PrometheusRecorder;
use tokio_util::sync::CancellationToken;

// This binary holds one test, on one thread: the heap it measures is the recorder's.
#[global_allocator]
static ALLOCATOR: dhat::Alloc = dhat::Alloc;

fn held() -> usize {
    dhat::HeapStats::get().curr_bytes
}

/// Samples per phase: 8 MB if each one were kept.
const SAMPLES: usize = 1_000_000;

/// Records `samples` commit times, spread over a hundred values as real ones are.
fn record(recorder: &PrometheusRecorder, samples: usize) {
    metrics::with_local_recorder(recorder, || {
        let histogram = metrics::histogram!("kaiwa_store_commit_seconds");
        for i in 0..samples {
            histogram.record((i % 100) as f64 * 1e-4);
        }
    });
}

#[tokio::test(start_paused = true)]
async fn histogram_samples_are_drained_while_nobody_scrapes() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let recorder = telemetry::metrics_builder()
        .expect("the bucket bounds are valid")
        .build_recorder();
    let stop = CancellationToken::new();
    let upkeep = tokio::spawn(telemetry::keep_metrics(
        recorder.handle(),
        METRICS_UPKEEP,
        stop.clone(),
    ));
    // The histogram, its buckets and the first blocks of samples exist before measuring.
    record(&recorder, 10_000);
    tokio::time::sleep(METRICS_UPKEEP).await;

    let before = held();
    for _ in 0..100 {
        record(&recorder, SAMPLES / 100);
        tokio::time::sleep(METRICS_UPKEEP).await;
    }
    let grown = held().saturating_sub(before);
    assert!(
        grown < 256 * 1024,
        "{grown} bytes more held after {SAMPLES} samples drained every {METRICS_UPKEEP:?}"
    );

    // What the recorder holds with nothing draining it: what the assertion above would see if
    // the upkeep stopped.
    stop.cancel();
    upkeep.await.expect("the upkeep ends when told to");
    let before = held();
    record(&recorder, SAMPLES);
    let kept = held().saturating_sub(before);
    assert!(
        kept > 6 * 1024 * 1024,
        "undrained, {SAMPLES} samples should hold about 8 MB, not {kept} bytes"
    );
}
