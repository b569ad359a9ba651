//! The statistics behind automatic decisions: running moments, latency histograms, and the
//! mixture sequential probability ratio test (mSPRT; Johari, Koomen, Pekelis & Walsh, "Always
//! Valid Inference", 2017) whose p-value may be looked at after every outcome without inflating
//! false positives.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

use super::rollout::Window;

/// Count, sum and sum of squares of an outcome (a 0/1 conversion or a numeric reward).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Moments {
    pub n: u64,
    pub sum: f64,
    pub sum_sq: f64,
}

impl Moments {
    pub fn add(&mut self, x: f64) {
        self.n += 1;
        self.sum += x;
        self.sum_sq += x * x;
    }

    /// Adds `n` outcomes whose sum and sum of squares are given (a batch).
    pub fn add_many(&mut self, n: u64, sum: f64, sum_sq: f64) {
        self.n += n;
        self.sum += sum;
        self.sum_sq += sum_sq;
    }

    pub fn mean(&self) -> f64 {
        if self.n == 0 { 0.0 } else { self.sum / self.n as f64 }
    }

    /// Sample variance (n - 1 in the denominator); 0 below two outcomes.
    pub fn variance(&self) -> f64 {
        if self.n < 2 {
            return 0.0;
        }
        let n = self.n as f64;
        ((self.sum_sq - self.sum * self.sum / n) / (n - 1.0)).max(0.0)
    }

    /// Normal-approximation confidence interval of the mean at level `1 - alpha`.
    pub fn mean_interval(&self, alpha: f64) -> (f64, f64) {
        let half = normal_quantile(1.0 - alpha / 2.0) * (self.variance() / self.n.max(1) as f64).sqrt();
        (self.mean() - half, self.mean() + half)
    }
}

/// Inverse of the standard normal CDF (Acklam's rational approximation, |error| < 1.2e-9).
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.38357751867269e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] =
        [-5.447609879822406e1, 1.615858368580409e2, -1.556989798598866e2, 6.680131188771972e1, -1.328068155288572e1];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [7.784695709041462e-3, 3.224671290700398e-1, 2.445134137142996, 3.754408661907416];
    let p = p.clamp(1e-300, 1.0 - 1e-16);
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// How a sequential comparison is run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SequentialConfig {
    /// False-positive rate over the whole experiment, however often it is looked at.
    pub alpha: f64,
    /// Standard deviation of the normal mixture over effect sizes: the size of difference the test
    /// is tuned to find (in the outcome's unit: 0.02 is two conversion points).
    pub min_effect: f64,
    /// Outcomes per variant before any decision (the variance estimate needs some).
    pub min_samples: u64,
    /// Outcomes per variant after which the experiment stops with no difference found.
    pub max_samples: u64,
}

impl Default for SequentialConfig {
    fn default() -> Self {
        SequentialConfig { alpha: 0.05, min_effect: 0.02, min_samples: 100, max_samples: 20_000 }
    }
}

impl SequentialConfig {
    pub fn validate(&self) -> Result<(), crate::RegistryError> {
        let bad = |m: &str| Err(crate::RegistryError::InvalidPolicy(m.into()));
        if !(self.alpha > 0.0 && self.alpha < 0.5) {
            return bad("alpha must be in (0, 0.5)");
        }
        if !(self.min_effect > 0.0 && self.min_effect.is_finite()) {
            return bad("min_effect must be a positive number");
        }
        if self.min_samples < 2 || self.max_samples < self.min_samples {
            return bad("need 2 <= min_samples <= max_samples");
        }
        Ok(())
    }
}

/// A comparison of a treatment with the control at one look, carrying what the earlier looks
/// established (the p-value and the interval only ever tighten).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Comparison {
    /// Treatment mean minus control mean.
    pub difference: f64,
    /// Always-valid confidence interval of the difference at level 1 - alpha: the intersection
    /// of every look's interval.
    pub interval: (f64, f64),
    /// Always-valid p-value: the least 1/Λ seen so far.
    pub p_value: f64,
}

impl Comparison {
    /// Before the first look.
    pub const START: Comparison =
        Comparison { difference: 0.0, interval: (f64::NEG_INFINITY, f64::INFINITY), p_value: 1.0 };
}

/// The mSPRT of H0 "equal means" after `control` and `treatment` outcomes, given the previous
/// look (`Comparison::START` at first).
pub fn msprt(cfg: &SequentialConfig, control: &Moments, treatment: &Moments, previous: &Comparison) -> Comparison {
    let difference = treatment.mean() - control.mean();
    let (nc, nt) = (control.n as f64, treatment.n as f64);
    let mut v =
        if control.n < 2 || treatment.n < 2 { 0.0 } else { control.variance() / nc + treatment.variance() / nt };
    if v <= 0.0 && control.n >= 2 && treatment.n >= 2 {
        // Both arms constant (0% against 100%, say): the pooled spread still measures the gap.
        let mut pooled = *control;
        pooled.add_many(treatment.n, treatment.sum, treatment.sum_sq);
        v = pooled.variance() * (1.0 / nc + 1.0 / nt);
    }
    let tau2 = cfg.min_effect * cfg.min_effect;
    if v <= 0.0 || !v.is_finite() {
        // No spread measured yet: no evidence either way.
        return Comparison { difference, ..*previous };
    }
    let log_lambda = 0.5 * (v / (v + tau2)).ln() + difference * difference * tau2 / (2.0 * v * (v + tau2));
    let p = (-log_lambda).exp().min(1.0);
    let half = (v * (v + tau2) / tau2 * (((v + tau2) / v).ln() - 2.0 * cfg.alpha.ln())).sqrt();
    let interval = ((difference - half).max(previous.interval.0), (difference + half).min(previous.interval.1));
    Comparison { difference, interval, p_value: previous.p_value.min(p) }
}

/// What a sequential comparison says now. Higher outcomes are better.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    #[default]
    /// Keep collecting.
    Continue,
    /// The treatment is better than the control (p <= alpha).
    Better,
    /// The treatment is worse than the control (p <= alpha).
    Worse,
    /// The sample budget is spent with no difference found.
    NoDifference,
}

/// The verdict after a look. A decision, once made, stands: `previous` Better or Worse is kept
/// (the running p-value stays below alpha, and the direction is the one seen when it crossed).
pub fn verdict(
    cfg: &SequentialConfig,
    control: &Moments,
    treatment: &Moments,
    c: &Comparison,
    previous: Verdict,
) -> Verdict {
    if matches!(previous, Verdict::Better | Verdict::Worse) {
        return previous;
    }
    let least = control.n.min(treatment.n);
    if least < cfg.min_samples {
        return Verdict::Continue;
    }
    if c.p_value <= cfg.alpha {
        return if c.difference > 0.0 { Verdict::Better } else { Verdict::Worse };
    }
    if least >= cfg.max_samples { Verdict::NoDifference } else { Verdict::Continue }
}

/// Bucket growth of the latency histogram: 5% relative resolution.
const GROWTH: f64 = 1.05;
/// Buckets from 1 µs up to about 100 s.
const BUCKETS: usize = 380;

/// A lock-free latency histogram with log-spaced buckets (5% resolution from 1 µs to ~100 s),
/// for percentiles over a window: snapshot at the window's start, subtract at its end.
#[derive(Debug)]
pub struct LatencyHistogram {
    counts: Box<[AtomicU64]>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram { counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect() }
    }
}

fn bucket_of(seconds: f64) -> usize {
    let micros = seconds * 1e6;
    if micros <= 1.0 || micros.is_nan() { 0 } else { ((micros.ln() / GROWTH.ln()) as usize + 1).min(BUCKETS - 1) }
}

/// Upper bound of a bucket, in seconds.
fn bucket_upper(i: usize) -> f64 {
    GROWTH.powi(i as i32) * 1e-6
}

impl LatencyHistogram {
    pub fn record(&self, seconds: f64) {
        self.counts[bucket_of(seconds)].fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot { counts: self.counts.iter().map(|c| c.load(Relaxed)).collect() }
    }
}

/// Counts per bucket at one moment; `since` gives a window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LatencySnapshot {
    counts: Vec<u64>,
}

impl LatencySnapshot {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// What was recorded after `earlier` was taken.
    pub fn since(&self, earlier: &LatencySnapshot) -> LatencySnapshot {
        LatencySnapshot {
            counts: self
                .counts
                .iter()
                .enumerate()
                .map(|(i, &c)| c.saturating_sub(earlier.counts.get(i).copied().unwrap_or(0)))
                .collect(),
        }
    }

    /// Adds another histogram's counts (histograms from several replicas merge exactly).
    pub fn add(&mut self, other: &LatencySnapshot) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (c, o) in self.counts.iter_mut().zip(&other.counts) {
            *c += o;
        }
    }

    /// A compact text form for storage: `bucket:count` pairs of the non-empty buckets.
    pub fn encode(&self) -> String {
        let pairs: Vec<String> =
            self.counts.iter().enumerate().filter(|(_, c)| **c > 0).map(|(i, c)| format!("{i}:{c}")).collect();
        pairs.join(",")
    }

    /// Reads `encode`'s form; `None` when it is not that.
    pub fn decode(text: &str) -> Option<LatencySnapshot> {
        let mut counts = vec![0; BUCKETS];
        for pair in text.split(',').filter(|p| !p.is_empty()) {
            let (i, c) = pair.split_once(':')?;
            let i: usize = i.parse().ok()?;
            *counts.get_mut(i)? = c.parse().ok()?;
        }
        Some(LatencySnapshot { counts })
    }

    /// The `q` quantile in seconds (the upper bound of its bucket); `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut acc = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            acc += c;
            if acc >= rank {
                return Some(bucket_upper(i));
            }
        }
        None
    }
}

/// One version's cumulative traffic counters on one replica, as replicas share them: summed over
/// replicas, they are what the lifecycle's gates and experiments judge.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrafficTotals {
    pub requests: u64,
    pub errors: u64,
    pub latency: LatencySnapshot,
    pub last_request_ms: Option<u64>,
}

impl TrafficTotals {
    pub fn add(&mut self, other: &TrafficTotals) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.latency.add(&other.latency);
        self.last_request_ms = self.last_request_ms.max(other.last_request_ms);
    }

    /// What happened between `earlier` and these totals: the window the gates judge, and its
    /// latency histogram.
    pub fn since(&self, earlier: &TrafficTotals) -> (Window, LatencySnapshot) {
        let latency = self.latency.since(&earlier.latency);
        let window = Window {
            requests: self.requests.saturating_sub(earlier.requests),
            errors: self.errors.saturating_sub(earlier.errors),
            p99_s: latency.quantile(0.99),
        };
        (window, latency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_histograms_survive_encoding_and_merge_exactly() {
        let (a, b, both) = (LatencyHistogram::default(), LatencyHistogram::default(), LatencyHistogram::default());
        for (i, ms) in [0.2, 1.0, 3.0, 3.1, 40.0, 900.0].into_iter().enumerate() {
            let h = if i % 2 == 0 { &a } else { &b };
            h.record(ms / 1e3);
            both.record(ms / 1e3);
        }
        let encoded = a.snapshot().encode();
        assert_eq!(LatencySnapshot::decode(&encoded), Some(a.snapshot()));
        assert_eq!(LatencySnapshot::decode(""), Some(LatencyHistogram::default().snapshot()));
        let mut merged = LatencySnapshot::decode(&encoded).unwrap();
        merged.add(&b.snapshot());
        assert_eq!(merged, both.snapshot());
        assert_eq!(merged.quantile(0.5), both.snapshot().quantile(0.5));
        for bad in ["x", "1:", "9999:1", "1:2:3", "-1:4"] {
            assert_eq!(LatencySnapshot::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn traffic_windows_count_what_happened_between_two_marks_over_every_replica() {
        let (here, there) = (LatencyHistogram::default(), LatencyHistogram::default());
        let totals = |requests, errors, h: &LatencyHistogram| TrafficTotals {
            requests,
            errors,
            latency: h.snapshot(),
            last_request_ms: None,
        };
        here.record(0.001);
        let mut start = totals(1, 0, &here);
        start.add(&totals(0, 0, &there));
        for _ in 0..98 {
            here.record(0.002);
        }
        there.record(0.5);
        there.record(0.5);
        let mut now = totals(99, 1, &here);
        now.add(&totals(2, 2, &there));
        let (window, latency) = now.since(&start);
        assert_eq!((window.requests, window.errors), (100, 3));
        assert!(latency.quantile(0.5).unwrap() < 0.003, "{latency:?}");
        assert!(window.p99_s.unwrap() > 0.4, "the other replica's slow answers count: {window:?}");
    }

    fn bernoulli(n: u64, successes: u64) -> Moments {
        Moments { n, sum: successes as f64, sum_sq: successes as f64 }
    }

    #[test]
    fn moments_and_quantiles() {
        let mut m = Moments::default();
        for x in [1.0, 2.0, 3.0, 4.0] {
            m.add(x);
        }
        assert_eq!(m.mean(), 2.5);
        assert!((m.variance() - 5.0 / 3.0).abs() < 1e-12);
        for (p, z) in [(0.975, 1.959964), (0.5, 0.0), (0.05, -1.644854), (0.999, 3.090232)] {
            assert!((normal_quantile(p) - z).abs() < 1e-5, "{p}");
        }
        let (lo, hi) = bernoulli(10_000, 1000).mean_interval(0.05);
        assert!((lo - 0.0941).abs() < 1e-3 && (hi - 0.1059).abs() < 1e-3, "{lo} {hi}");
    }

    #[test]
    fn msprt_table() {
        let cfg = SequentialConfig::default();
        // (control, treatment, verdict)
        let cases = [
            (bernoulli(50, 5), bernoulli(50, 1), Verdict::Continue), // below min_samples
            (bernoulli(5000, 500), bernoulli(5000, 505), Verdict::Continue),
            (bernoulli(5000, 500), bernoulli(5000, 350), Verdict::Worse),
            (bernoulli(5000, 500), bernoulli(5000, 650), Verdict::Better),
            (bernoulli(20_000, 2000), bernoulli(20_000, 2010), Verdict::NoDifference),
            (bernoulli(200, 0), bernoulli(200, 0), Verdict::Continue), // no spread at all
        ];
        for (c, t, want) in cases {
            let cmp = msprt(&cfg, &c, &t, &Comparison::START);
            assert_eq!(verdict(&cfg, &c, &t, &cmp, Verdict::Continue), want, "{c:?} vs {t:?}: {cmp:?}");
            if want == Verdict::Worse || want == Verdict::Better {
                assert!(cmp.interval.0 * cmp.interval.1 > 0.0, "the interval excludes 0 when p <= alpha: {cmp:?}");
            }
        }
        // The always-valid p-value never rises, the interval never widens, a decision stands.
        let (c, t) = (bernoulli(5000, 500), bernoulli(5000, 350));
        let first = msprt(&cfg, &c, &t, &Comparison::START);
        let later = msprt(&cfg, &bernoulli(6000, 600), &bernoulli(6000, 600), &first);
        assert_eq!(later.p_value, first.p_value);
        assert!(later.interval.1 <= first.interval.1 && later.interval.0 >= first.interval.0);
        assert_eq!(verdict(&cfg, &c, &t, &later, Verdict::Worse), Verdict::Worse);
        // Constant arms: the pooled spread decides 0% against 100%.
        let all_or_nothing = msprt(&cfg, &bernoulli(200, 0), &bernoulli(200, 200), &Comparison::START);
        assert!(all_or_nothing.p_value < 1e-6, "{all_or_nothing:?}");
    }

    #[test]
    fn histogram_windows() {
        let h = LatencyHistogram::default();
        for _ in 0..99 {
            h.record(0.001);
        }
        h.record(0.5);
        let start = h.snapshot();
        let p50 = start.quantile(0.5).unwrap();
        assert!((0.001..0.00106).contains(&p50), "{p50}");
        assert!((0.5..0.53).contains(&start.quantile(1.0).unwrap()));
        for _ in 0..10 {
            h.record(0.02);
        }
        let window = h.snapshot().since(&start);
        assert_eq!(window.count(), 10);
        assert!((0.02..0.021).contains(&window.quantile(0.99).unwrap()));
        assert_eq!(LatencySnapshot::default().quantile(0.5), None);
        h.record(0.0);
        h.record(1e9);
    }
}
