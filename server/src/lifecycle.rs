//! Applying the registry's lifecycle policies in the server: the routing table each request
//! consults, traffic and shadow measurements per version, experiment outcomes, and the
//! controller that steps rollouts, re-shares bandits and retires versions. Every decision is
//! made by a pure function in `algolink_registry::lifecycle`; this module feeds it facts.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use algolink_engine::{DataType, Tensor};
use algolink_registry::lifecycle::Decision;
use algolink_registry::lifecycle::retire::VersionFacts;
use algolink_registry::lifecycle::rollout::Window;
use algolink_registry::lifecycle::route::{Split, Strategy, Target, shadowed, traffic_slot};
use algolink_registry::lifecycle::stats::{
    Comparison, LatencyHistogram, LatencySnapshot, Moments, TrafficTotals, Verdict, msprt, verdict,
};
use algolink_registry::lifecycle::{Experiment, ModelPolicy, bandit};
use serde_json::{Value, json};

use crate::state::Servable;

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// Requests, server errors and latency of one version, as the HTTP layer saw them.
#[derive(Debug, Default)]
pub struct TrafficStats {
    requests: AtomicU64,
    errors: AtomicU64,
    latency: LatencyHistogram,
    last_request_ms: AtomicU64,
}

/// Counters at one moment (this replica's, or summed over replicas, as they share them); two
/// marks make a window ([`TrafficTotals::since`]).
pub type Mark = TrafficTotals;

impl TrafficStats {
    pub fn record(&self, elapsed: Duration, server_error: bool) {
        self.requests.fetch_add(1, Relaxed);
        if server_error {
            self.errors.fetch_add(1, Relaxed);
        }
        self.latency.record(elapsed.as_secs_f64());
        self.last_request_ms.store(now_ms(), Relaxed);
    }

    pub fn mark(&self) -> Mark {
        TrafficTotals {
            requests: self.requests.load(Relaxed),
            errors: self.errors.load(Relaxed),
            latency: self.latency.snapshot(),
            last_request_ms: self.last_request_ms(),
        }
    }

    pub fn last_request_ms(&self) -> Option<u64> {
        Some(self.last_request_ms.load(Relaxed)).filter(|&t| t > 0)
    }
}

/// What mirrored requests to a shadow version did, compared with the primary's answers.
#[derive(Debug, Default)]
pub struct ShadowStats {
    pub traffic: TrafficStats,
    /// Mirrors skipped because too many were in flight (shadow work never queues up).
    pub dropped: AtomicU64,
    /// (answers compared, sum of per-request max |difference|, max |difference|, answers whose
    /// shape or type differed)
    diff: Mutex<(u64, f64, f64, u64)>,
}

impl ShadowStats {
    pub fn compare(&self, primary: &[Tensor], shadow: &[Tensor]) {
        let mut d = self.diff.lock().expect("shadow lock");
        d.0 += 1;
        match max_abs_difference(primary, shadow) {
            Some(m) => {
                d.1 += m;
                d.2 = d.2.max(m);
            }
            None => d.3 += 1,
        }
    }

    /// (mirrored requests answered, failed, dropped, largest |difference| seen)
    pub fn counts(&self) -> (u64, u64, u64, f64) {
        let m = self.traffic.mark();
        // Two relaxed loads: errors may be counted before the request they belong to.
        (
            m.requests.saturating_sub(m.errors),
            m.errors,
            self.dropped.load(Relaxed),
            self.diff.lock().expect("shadow lock").2,
        )
    }

    pub fn json(&self) -> Value {
        let m = self.traffic.mark();
        let (compared, sum, max, mismatched) = *self.diff.lock().expect("shadow lock");
        json!({
            "requests": m.requests,
            "errors": m.errors,
            "dropped": self.dropped.load(Relaxed),
            "latency_ms": percentiles_ms(&m.latency),
            "compared": compared,
            "mean_max_abs_difference": if compared > mismatched { sum / (compared - mismatched) as f64 } else { 0.0 },
            "max_abs_difference": max,
            "shape_or_type_mismatches": mismatched,
        })
    }
}

fn as_f64s(t: &Tensor) -> Option<Vec<f64>> {
    match t.dtype {
        DataType::F32 => t.to_f32().ok().map(|v| v.into_iter().map(f64::from).collect()),
        DataType::F64 => t.to_f64().ok(),
        DataType::I64 => t.to_i64().ok().map(|v| v.into_iter().map(|x| x as f64).collect()),
        DataType::I32 => t.to_i32().ok().map(|v| v.into_iter().map(f64::from).collect()),
        _ => None,
    }
}

/// Largest element-wise |a - b| over all outputs; `None` when shapes or types differ.
pub fn max_abs_difference(a: &[Tensor], b: &[Tensor]) -> Option<f64> {
    if a.len() != b.len() {
        return None;
    }
    let mut max = 0.0f64;
    for (x, y) in a.iter().zip(b) {
        if x.shape != y.shape || x.dtype != y.dtype {
            return None;
        }
        match (as_f64s(x), as_f64s(y)) {
            (Some(xs), Some(ys)) => {
                for (p, q) in xs.iter().zip(&ys) {
                    max = max.max((p - q).abs());
                }
            }
            _ if x.data == y.data => {}
            _ => max = max.max(1.0),
        }
    }
    Some(max)
}

pub fn percentiles_ms(s: &LatencySnapshot) -> Value {
    let q = |p: f64| s.quantile(p).map(|x| (x * 1e6).round() / 1e3);
    json!({ "p50": q(0.5), "p90": q(0.9), "p99": q(0.99) })
}

/// A variant of a route, resolved to a loaded version.
pub struct RoutedVariant {
    /// The target as the route names it (`champion`, `3`).
    pub label: String,
    pub version: u64,
    pub servable: Arc<Servable>,
}

/// How requests that name no version are spread over a model's versions right now.
pub struct Routing {
    pub variants: Vec<RoutedVariant>,
    pub split: Split,
    /// Percent mirrored, and where.
    pub shadow: Option<(f64, RoutedVariant)>,
    /// The running experiment whose outcomes these requests feed.
    pub experiment: Option<u64>,
    /// A request that fails with a server error on another variant is answered by this one (a
    /// rollout's control), so a failing canary costs no client a failed request.
    pub fallback: Option<usize>,
}

impl Routing {
    /// The variant for a routing key (sticky), or a random one without a key.
    pub fn pick(&self, model: &str, key: Option<&str>) -> usize {
        let slot = match key {
            Some(k) => traffic_slot(model, k),
            None => rand::random_range(0..algolink_registry::lifecycle::route::SLOTS),
        };
        self.split.pick(slot)
    }

    pub fn mirrors(&self, model: &str, key: Option<&str>) -> Option<&RoutedVariant> {
        let (percent, v) = self.shadow.as_ref()?;
        let hit = match key {
            Some(k) => shadowed(model, k, *percent),
            None => rand::random_range(0.0..100.0) < *percent,
        };
        hit.then_some(v)
    }
}

/// Builds a model's routing from its policy, its aliases and the loaded versions (`loaded`).
/// `None` when requests that name no version should go to the default version.
pub fn build_routing(
    policy: &ModelPolicy,
    aliases: &BTreeMap<String, u64>,
    experiment: Option<&Experiment>,
    thompson_shares: Option<&[f64]>,
    loaded: impl Fn(u64) -> Option<Arc<Servable>>,
) -> Option<Routing> {
    let resolve = |t: &Target| t.resolve(aliases);
    let variant =
        |label: String, version: u64| loaded(version).map(|servable| RoutedVariant { label, version, servable });
    if let Some(r) = &policy.active_rollout
        && let (Some(control), Some(canary)) =
            (variant(r.control.to_string(), r.control), variant(r.canary.to_string(), r.canary))
    {
        let weights = [f64::from(100 - r.weight.min(100)), f64::from(r.weight)];
        return Some(Routing {
            variants: vec![control, canary],
            split: Split::from_weights(&weights),
            shadow: None,
            experiment: experiment.filter(|e| e.versions.contains(&r.canary)).map(|e| e.id),
            fallback: Some(0),
        });
    }
    let route = policy.route.as_ref()?;
    let mut variants = Vec::new();
    let mut weights = Vec::new();
    for (i, v) in route.variants.iter().enumerate() {
        if let Some(rv) = resolve(&v.target).and_then(|ver| variant(v.target.to_string(), ver)) {
            variants.push(rv);
            weights.push(match (route.strategy, thompson_shares) {
                (Strategy::Thompson, Some(s)) if s.len() == route.variants.len() => s[i],
                (Strategy::Thompson, _) => 1.0,
                (Strategy::Fixed, _) => f64::from(v.weight),
            });
        }
    }
    if variants.is_empty() {
        return None;
    }
    let shadow = route
        .shadow
        .as_ref()
        .and_then(|s| resolve(&s.target).and_then(|ver| variant(s.target.to_string(), ver)).map(|v| (s.percent, v)));
    let versions: Vec<u64> = variants.iter().map(|v| v.version).collect();
    Some(Routing {
        split: Split::from_weights(&weights),
        variants,
        shadow,
        experiment: experiment.filter(|e| versions.iter().any(|v| e.versions.contains(v))).map(|e| e.id),
        fallback: None,
    })
}

/// Which experiment variant served a request, by request id or routing key, for joining the
/// business outcome that arrives later. Bounded: the oldest entries go first.
pub struct Assignments {
    map: HashMap<(String, String), (u64, u64)>,
    order: VecDeque<(String, String)>,
    capacity: usize,
}

impl Assignments {
    pub fn new(capacity: usize) -> Assignments {
        Assignments { map: HashMap::new(), order: VecDeque::new(), capacity: capacity.max(1) }
    }

    pub fn record(&mut self, model: &str, key: &str, experiment: u64, version: u64) {
        let k = (model.to_string(), key.to_string());
        if self.map.insert(k.clone(), (experiment, version)).is_none() {
            self.order.push_back(k);
        }
        while self.map.len() > self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                }
                None => break,
            }
        }
    }

    pub fn get(&self, model: &str, key: &str) -> Option<(u64, u64)> {
        self.map.get(&(model.to_string(), key.to_string())).copied()
    }
}

/// An experiment with its outcome totals per version and the sequential test's last look.
pub struct LiveExperiment {
    pub experiment: Experiment,
    pub totals: BTreeMap<u64, Moments>,
    /// The last look per version (p-value and interval only tighten from look to look).
    looks: BTreeMap<u64, Comparison>,
    /// Traffic counters per version when the experiment started (or the server did).
    pub start_marks: BTreeMap<u64, Mark>,
    /// Decisions made at a look but not yet recorded in the registry.
    unsaved: Vec<u64>,
}

impl LiveExperiment {
    pub fn new(experiment: Experiment, totals: BTreeMap<u64, Moments>, start_marks: BTreeMap<u64, Mark>) -> Self {
        // Recorded decisions carry their p-value across restarts.
        let looks = experiment
            .decisions
            .iter()
            .map(|(&v, d)| (v, Comparison { p_value: d.p_value, ..Comparison::START }))
            .collect();
        LiveExperiment { experiment, totals, looks, start_marks, unsaved: Vec::new() }
    }

    /// Looks at each non-control version against the control: the comparison and the verdict.
    /// A decision made at this look goes into `experiment.decisions`, and is listed by
    /// `take_unsaved` until the caller records it.
    pub fn compare(&mut self) -> BTreeMap<u64, (Comparison, Verdict)> {
        let cfg = self.experiment.test_per_comparison();
        let control = self.totals.get(&self.experiment.control).copied().unwrap_or_default();
        let mut out = BTreeMap::new();
        let versions: Vec<u64> =
            self.experiment.versions.iter().copied().filter(|&v| v != self.experiment.control).collect();
        for v in versions {
            let t = self.totals.get(&v).copied().unwrap_or_default();
            let previous = self.looks.get(&v).copied().unwrap_or(Comparison::START);
            let c = msprt(&cfg, &control, &t, &previous);
            self.looks.insert(v, c);
            let before = self.experiment.decisions.get(&v).map(|d| d.verdict).unwrap_or_default();
            let now = verdict(&cfg, &control, &t, &c, before);
            if now != before && matches!(now, Verdict::Better | Verdict::Worse) {
                let d = Decision { verdict: now, p_value: c.p_value, difference: c.difference, at_ms: now_ms() };
                self.experiment.decisions.insert(v, d);
                self.unsaved.push(v);
            }
            out.insert(v, (c, now));
        }
        out
    }

    pub fn take_unsaved(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.unsaved)
    }

    /// Thompson shares over the experiment's versions in `order` (route order).
    pub fn thompson(&self, order: &[u64], floor: f64) -> Vec<f64> {
        let arms: Vec<Moments> = order.iter().map(|v| self.totals.get(v).copied().unwrap_or_default()).collect();
        bandit::thompson_shares(self.experiment.goal.bandit_outcome(), &arms, floor, 2000, &mut rand::rng())
    }

    /// The dashboard: per version, traffic, errors, latency, outcomes and the test.
    pub fn report(&mut self, traffic: impl Fn(u64) -> Option<Mark>) -> Value {
        let comparisons = self.compare();
        let e = &self.experiment;
        let alpha = e.test_per_comparison().alpha;
        let variants: Vec<Value> = e
            .versions
            .iter()
            .map(|&v| {
                let m = self.totals.get(&v).copied().unwrap_or_default();
                let (window, latency) = match (traffic(v), self.start_marks.get(&v)) {
                    (Some(now), Some(start)) => now.since(start),
                    (Some(now), None) => now.since(&Mark::default()),
                    _ => (Window::default(), LatencySnapshot::default()),
                };
                let (lo, hi) = m.mean_interval(alpha);
                let mut out = json!({
                    "version": v,
                    "control": v == e.control,
                    "requests": window.requests,
                    "errors": window.errors,
                    "latency_ms": percentiles_ms(&latency),
                    "outcomes": m.n,
                    "mean": m.mean(),
                    "mean_interval": [finite(lo), finite(hi)],
                });
                if let Some((c, verdict)) = comparisons.get(&v) {
                    out["difference"] = json!(c.difference);
                    out["difference_interval"] = json!([finite(c.interval.0), finite(c.interval.1)]);
                    out["p_value"] = json!(c.p_value);
                    out["verdict"] = json!(verdict);
                }
                out
            })
            .collect();
        let mut doc = serde_json::to_value(e).unwrap_or(Value::Null);
        doc["alpha_per_comparison"] = json!(alpha);
        doc["variants"] = Value::Array(variants);
        doc
    }
}

fn finite(x: f64) -> Value {
    if x.is_finite() { json!(x) } else { Value::Null }
}

/// The facts the retirement rules judge, for the loaded versions of one model. `last_request`
/// counts live and mirrored (shadow) requests.
pub fn version_facts(
    records: &[algolink_registry::VersionRecord],
    loaded: &[u64],
    serving_since: impl Fn(u64) -> u64,
    last_request: impl Fn(u64) -> Option<u64>,
    lost: &BTreeMap<u64, String>,
) -> Vec<VersionFacts> {
    records
        .iter()
        .filter(|r| loaded.contains(&r.version))
        .map(|r| VersionFacts {
            version: r.version,
            created_ms: r.created_at_ms,
            expires_ms: r.expires_at_ms,
            serving_since_ms: serving_since(r.version),
            last_request_ms: last_request(r.version),
            lost: lost.get(&r.version).cloned(),
        })
        .collect()
}
