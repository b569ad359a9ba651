//! Progressive rollout of a canary against a control: raise its weight by steps while its gates
//! hold, promote at the top, roll back at the first failed gate or when the deadline passes.

use serde::{Deserialize, Serialize};

use super::route::RouteSpec;
use super::stats::Verdict;
use crate::RegistryError;

/// The health gates a canary must hold, measured over the current step's window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Gates {
    /// Canary p99 may be at most this multiple of the control's p99 (plus `p99_slack_ms`).
    pub max_p99_ratio: f64,
    /// Absolute allowance on top of the ratio, so that sub-millisecond noise fails nothing.
    pub p99_slack_ms: f64,
    /// Canary server-error rate may exceed the control's by at most this much (0.01 = 1 point).
    pub max_error_rate: f64,
    /// Canary requests in the window before latency and errors are judged.
    pub min_requests: u64,
}

impl Default for Gates {
    fn default() -> Self {
        Gates { max_p99_ratio: 1.5, p99_slack_ms: 2.0, max_error_rate: 0.01, min_requests: 100 }
    }
}

/// How a canary progresses. In the config as `[models.NAME.rollout]`: every new version of the
/// model then enters as a canary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutPolicy {
    /// Canary weight (percent) at the start, and added at each step.
    pub step: u32,
    /// Seconds between steps.
    pub interval_s: f64,
    /// Weight at which a canary whose gates held for a whole step is promoted.
    pub max_weight: u32,
    /// A rollout not promoted by then is rolled back.
    pub deadline_s: f64,
    pub gates: Gates,
}

impl Default for RolloutPolicy {
    fn default() -> Self {
        RolloutPolicy { step: 10, interval_s: 60.0, max_weight: 50, deadline_s: 3600.0, gates: Gates::default() }
    }
}

impl RolloutPolicy {
    pub fn validate(&self) -> Result<(), RegistryError> {
        let bad = |m: String| Err(RegistryError::InvalidPolicy(m));
        if self.step == 0 || self.step > 100 || self.max_weight == 0 || self.max_weight > 100 {
            return bad(format!("step ({}) and max_weight ({}) must be 1-100", self.step, self.max_weight));
        }
        if !(self.interval_s > 0.0 && self.deadline_s >= self.interval_s) {
            return bad("need 0 < interval_s <= deadline_s".into());
        }
        let g = &self.gates;
        if !(g.max_p99_ratio >= 1.0 && g.p99_slack_ms >= 0.0 && (0.0..=1.0).contains(&g.max_error_rate)) {
            return bad("gates: need max_p99_ratio >= 1, p99_slack_ms >= 0, max_error_rate in 0-1".into());
        }
        Ok(())
    }
}

/// A rollout in progress, as recorded in the registry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub canary: u64,
    pub control: u64,
    pub policy: RolloutPolicy,
    /// Current canary weight, percent.
    pub weight: u32,
    pub started_ms: u64,
    pub step_started_ms: u64,
    /// The model's route before the rollout, restored when it ends.
    pub route_before: Option<RouteSpec>,
}

impl Rollout {
    pub fn start(
        canary: u64,
        control: u64,
        policy: RolloutPolicy,
        route_before: Option<RouteSpec>,
        now_ms: u64,
    ) -> Rollout {
        let weight = policy.step.min(policy.max_weight);
        Rollout { canary, control, policy, weight, started_ms: now_ms, step_started_ms: now_ms, route_before }
    }
}

/// What one variant did during the current step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Window {
    pub requests: u64,
    /// Server-side failures (5xx), not refused bad input.
    pub errors: u64,
    pub p99_s: Option<f64>,
}

impl Window {
    fn error_rate(&self) -> f64 {
        if self.requests == 0 { 0.0 } else { self.errors as f64 / self.requests as f64 }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum GateResult {
    Pass,
    /// Too few canary requests to judge.
    NotEnoughData,
    Fail(String),
}

pub fn check_gates(g: &Gates, canary: &Window, control: &Window) -> GateResult {
    if canary.requests < g.min_requests {
        return GateResult::NotEnoughData;
    }
    let (cr, kr) = (canary.error_rate(), control.error_rate());
    if cr > kr + g.max_error_rate {
        return GateResult::Fail(format!(
            "error rate {:.2}% ({} of {}) exceeds the control's {:.2}% by more than {:.2} points",
            cr * 100.0,
            canary.errors,
            canary.requests,
            kr * 100.0,
            g.max_error_rate * 100.0
        ));
    }
    if let (Some(c), Some(k)) = (canary.p99_s, control.p99_s) {
        let limit = k * g.max_p99_ratio + g.p99_slack_ms / 1e3;
        if c > limit {
            return GateResult::Fail(format!(
                "p99 latency {:.1} ms exceeds {:.1} ms (control p99 {:.1} ms x {} + {} ms)",
                c * 1e3,
                limit * 1e3,
                k * 1e3,
                g.max_p99_ratio,
                g.p99_slack_ms
            ));
        }
    }
    GateResult::Pass
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Hold,
    /// Set the canary weight to this (a new step starts).
    Raise(u32),
    Promote,
    Rollback(String),
}

/// The next move of a rollout at `now_ms`, given the step window of both variants and, when an
/// experiment is attached, the sequential test of the canary against the control.
pub fn decide(r: &Rollout, canary: &Window, control: &Window, outcome: Option<Verdict>, now_ms: u64) -> Action {
    let gates = check_gates(&r.policy.gates, canary, control);
    if let GateResult::Fail(why) = gates {
        return Action::Rollback(why);
    }
    if outcome == Some(Verdict::Worse) {
        return Action::Rollback("the sequential test says the canary is worse than the control on the goal".into());
    }
    let elapsed = |since: u64| now_ms.saturating_sub(since) as f64 / 1e3;
    if elapsed(r.started_ms) >= r.policy.deadline_s {
        return Action::Rollback(format!("not promoted within the deadline of {} s", r.policy.deadline_s));
    }
    if elapsed(r.step_started_ms) < r.policy.interval_s || gates != GateResult::Pass {
        return Action::Hold;
    }
    if r.weight >= r.policy.max_weight {
        Action::Promote
    } else {
        Action::Raise((r.weight + r.policy.step).min(r.policy.max_weight))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(requests: u64, errors: u64, p99_ms: f64) -> Window {
        Window { requests, errors, p99_s: Some(p99_ms / 1e3) }
    }

    #[test]
    fn gates_table() {
        let g = Gates::default();
        let cases = [
            (w(50, 50, 900.0), w(1000, 0, 1.0), GateResult::NotEnoughData),
            (w(100, 0, 1.0), w(1000, 0, 1.0), GateResult::Pass),
            (w(100, 0, 3.4), w(1000, 0, 1.0), GateResult::Pass), // 1.0 x 1.5 + 2 ms
            (w(100, 0, 3.6), w(1000, 0, 1.0), GateResult::Fail("p99".into())),
            (w(100, 0, 160.0), w(1000, 0, 100.0), GateResult::Fail("p99".into())),
            (w(100, 0, 140.0), w(1000, 0, 100.0), GateResult::Pass),
            (w(100, 2, 1.0), w(1000, 0, 1.0), GateResult::Fail("error rate".into())),
            (w(100, 1, 1.0), w(1000, 0, 1.0), GateResult::Pass),
            (w(100, 5, 1.0), w(1000, 40, 1.0), GateResult::Pass), // the control fails as much
            (Window { requests: 100, errors: 0, p99_s: Some(1.0) }, Window::default(), GateResult::Pass),
        ];
        for (canary, control, want) in cases {
            match (check_gates(&g, &canary, &control), &want) {
                (GateResult::Fail(got), GateResult::Fail(part)) => assert!(got.contains(part.as_str()), "{got}"),
                (got, want) => assert_eq!(&got, want, "{canary:?} vs {control:?}"),
            }
        }
    }

    #[test]
    fn steps_table() {
        let policy =
            RolloutPolicy { step: 20, interval_s: 10.0, max_weight: 60, deadline_s: 100.0, gates: Gates::default() };
        let at = |weight: u32, step_started_s: u64| Rollout {
            weight,
            step_started_ms: step_started_s * 1000,
            ..Rollout::start(2, 1, policy.clone(), None, 0)
        };
        let ok = w(500, 0, 1.0);
        let slow = w(500, 0, 50.0);
        let cases: Vec<(Rollout, Window, Option<Verdict>, u64, Action)> = vec![
            (Rollout::start(2, 1, policy.clone(), None, 0), ok, None, 5_000, Action::Hold),
            (at(20, 0), ok, None, 10_000, Action::Raise(40)),
            (at(40, 10), ok, None, 20_000, Action::Raise(60)),
            (at(60, 20), ok, None, 30_000, Action::Promote),
            (at(60, 20), ok, None, 25_000, Action::Hold),
            (at(20, 0), w(10, 0, 1.0), None, 50_000, Action::Hold), // too little traffic to judge
            (at(20, 0), w(10, 0, 1.0), None, 100_000, Action::Rollback("deadline".into())),
            (at(40, 10), slow, None, 12_000, Action::Rollback("p99".into())),
            (at(40, 10), ok, Some(Verdict::Worse), 12_000, Action::Rollback("sequential test".into())),
            (at(40, 10), ok, Some(Verdict::Better), 20_000, Action::Raise(60)),
        ];
        let control = w(5000, 0, 1.0);
        for (r, canary, outcome, now, want) in cases {
            let got = decide(&r, &canary, &control, outcome, now);
            match (&got, &want) {
                (Action::Rollback(g), Action::Rollback(part)) => assert!(g.contains(part.as_str()), "{g}"),
                _ => assert_eq!(got, want, "weight {} at {now} ms", r.weight),
            }
        }
        assert_eq!(Rollout::start(2, 1, RolloutPolicy { step: 80, ..policy.clone() }, None, 0).weight, 60);
        assert!(RolloutPolicy { interval_s: 0.0, ..policy.clone() }.validate().is_err());
        assert!(RolloutPolicy { max_weight: 101, ..policy.clone() }.validate().is_err());
        assert!(policy.validate().is_ok());
    }
}
