//! Lock-free counters and histograms, one set per scheduler, read by the server for Prometheus
//! and for the protocol's `statistics` extension.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the latency histograms, in seconds.
pub const LATENCY_BUCKETS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Upper bounds of the executed-batch-size histogram, in rows.
pub const BATCH_BUCKETS: [f64; 11] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

/// A Prometheus-style cumulative histogram with fixed bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in millionths of the unit, so it can be an integer.
    sum_micro: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micro: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            self.counts[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micro.fetch_add((v * 1e6).round() as u64, Relaxed);
    }

    /// `(upper bound, cumulative count)` per bucket, then the total count and the sum.
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let mut acc = 0;
        let buckets = self
            .bounds
            .iter()
            .zip(&self.counts)
            .map(|(&b, c)| {
                acc += c.load(Relaxed);
                (b, acc)
            })
            .collect();
        (buckets, self.count.load(Relaxed), self.sum_micro.load(Relaxed) as f64 / 1e6)
    }

    pub fn mean(&self) -> f64 {
        let n = self.count.load(Relaxed);
        if n == 0 { 0.0 } else { self.sum_micro.load(Relaxed) as f64 / 1e6 / n as f64 }
    }
}

/// Count and accumulated nanoseconds, as the `statistics` extension reports them.
#[derive(Debug, Default)]
pub struct Duration64 {
    pub count: AtomicU64,
    pub ns: AtomicU64,
}

impl Duration64 {
    pub fn add(&self, d: Duration) {
        self.count.fetch_add(1, Relaxed);
        self.ns.fetch_add(d.as_nanos() as u64, Relaxed);
    }

    pub fn get(&self) -> (u64, u64) {
        (self.count.load(Relaxed), self.ns.load(Relaxed))
    }
}

/// Everything measured for one (model version, device).
#[derive(Debug)]
pub struct Stats {
    /// Requests answered successfully, with their end-to-end duration.
    pub success: Duration64,
    /// Requests that failed anywhere after they were parsed.
    pub failure: Duration64,
    /// Time spent queued by requests that reached the device.
    pub queue: Duration64,
    /// Device time per executed batch.
    pub compute: Duration64,
    /// Refused because the queue was full.
    pub rejected: AtomicU64,
    /// Dropped because their deadline passed in the queue.
    pub expired: AtomicU64,
    /// Refused by adaptive batching because they were predicted to miss their deadline.
    pub shed: AtomicU64,
    /// Of `shed`, those refused in the queue (the host slowed down after they were let in), not on
    /// arrival.
    pub shed_late: AtomicU64,
    /// The fitted execution time `a + c·rows`: a and c, in ns.
    pub fit_base_ns: AtomicU64,
    pub fit_per_row_ns: AtomicU64,
    /// Adaptive admission's correction: the p99 of recent actual over predicted latency, in millionths.
    pub prediction_factor_ppm: AtomicU64,
    /// Each wait the batcher chose (for a fuller batch, or until the device frees up).
    pub planned_wait_seconds: Histogram,
    /// Adaptive mode on the CPU: the groups gathered clients run in (1 or 2, see
    /// [`Split`](crate::scheduler::adaptive::Split)), and the rows per second each way made when
    /// last measured.
    pub groups: AtomicU64,
    pub groups_rows_per_second: [AtomicU64; 2],
    /// Dropped because the client went away before the device.
    pub cancelled: AtomicU64,
    /// Requests waiting now.
    pub queue_depth: AtomicU64,
    /// Rows executed (the protocol's inference count).
    pub rows: AtomicU64,
    /// When the last batch finished, in ms since the Unix epoch.
    pub last_inference_ms: AtomicU64,
    pub request_seconds: Histogram,
    pub queue_seconds: Histogram,
    pub compute_seconds: Histogram,
    pub batch_size: Histogram,
    /// Executions per exact batch size: (count, compute ns).
    pub per_batch_size: Mutex<std::collections::BTreeMap<usize, (u64, u64)>>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            success: Duration64::default(),
            failure: Duration64::default(),
            queue: Duration64::default(),
            compute: Duration64::default(),
            rejected: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            shed: AtomicU64::new(0),
            shed_late: AtomicU64::new(0),
            fit_base_ns: AtomicU64::new(0),
            fit_per_row_ns: AtomicU64::new(0),
            prediction_factor_ppm: AtomicU64::new(1_000_000),
            planned_wait_seconds: Histogram::new(&LATENCY_BUCKETS),
            groups: AtomicU64::new(1),
            groups_rows_per_second: Default::default(),
            cancelled: AtomicU64::new(0),
            queue_depth: AtomicU64::new(0),
            rows: AtomicU64::new(0),
            last_inference_ms: AtomicU64::new(0),
            request_seconds: Histogram::new(&LATENCY_BUCKETS),
            queue_seconds: Histogram::new(&LATENCY_BUCKETS),
            compute_seconds: Histogram::new(&LATENCY_BUCKETS),
            batch_size: Histogram::new(&BATCH_BUCKETS),
            per_batch_size: Mutex::new(Default::default()),
        }
    }
}

impl Stats {
    pub fn record_request(&self, elapsed: Duration, ok: bool) {
        if ok { &self.success } else { &self.failure }.add(elapsed);
        self.request_seconds.observe(elapsed.as_secs_f64());
    }

    pub(crate) fn record_batch(&self, rows: usize, compute: Duration) {
        self.compute.add(compute);
        self.compute_seconds.observe(compute.as_secs_f64());
        self.batch_size.observe(rows as f64);
        self.rows.fetch_add(rows as u64, Relaxed);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        self.last_inference_ms.store(now.as_millis() as u64, Relaxed);
        let mut per = self.per_batch_size.lock().expect("stats lock");
        let e = per.entry(rows).or_default();
        e.0 += 1;
        e.1 += compute.as_nanos() as u64;
    }

    pub(crate) fn record_queued(&self, waited: Duration) {
        self.queue.add(waited);
        self.queue_seconds.observe(waited.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::new(&BATCH_BUCKETS);
        for v in [1.0, 3.0, 3.0, 64.0, 5000.0] {
            h.observe(v);
        }
        let (buckets, count, sum) = h.snapshot();
        assert_eq!(count, 5);
        assert_eq!(sum, 5071.0);
        assert_eq!(buckets[0], (1.0, 1));
        assert_eq!(buckets[2], (4.0, 3));
        assert_eq!(buckets[6], (64.0, 4));
        assert_eq!(buckets.last().unwrap().1, 4, "5000 is above every bound: only in +Inf");
    }
}
