//! Retirement: which serving versions to take out of service, and why. A version retires when its
//! time-to-live or the model's maximum age passes, when it served nothing for the idle period, or
//! when it lost (failed gates, or the sequential test found it worse than the champion). The last
//! serving version never retires.

use serde::{Deserialize, Serialize};

use super::rollout::Gates;
use crate::RegistryError;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetirementRules {
    /// Retire versions older than this (seconds since push).
    pub max_age_s: Option<f64>,
    /// Retire versions that served no request for this long (seconds).
    pub idle_s: Option<f64>,
    /// Retire a version that loses: the sequential test finds it worse than the control of its
    /// experiment, or it fails `gates` against the serving version.
    pub on_loss: bool,
    /// Health gates every other loaded version must hold against the serving version (the
    /// champion), judged over windows of `gate_window_s`. Needs `on_loss`.
    pub gates: Option<Gates>,
    pub gate_window_s: f64,
}

impl Default for RetirementRules {
    fn default() -> Self {
        RetirementRules { max_age_s: None, idle_s: None, on_loss: false, gates: None, gate_window_s: 60.0 }
    }
}

impl RetirementRules {
    pub fn validate(&self) -> Result<(), RegistryError> {
        for (what, v) in [("max_age_s", self.max_age_s), ("idle_s", self.idle_s)] {
            if v.is_some_and(|s| !(s > 0.0 && s.is_finite())) {
                return Err(RegistryError::InvalidPolicy(format!("{what} must be a positive number of seconds")));
            }
        }
        if !(self.gate_window_s > 0.0 && self.gate_window_s.is_finite()) {
            return Err(RegistryError::InvalidPolicy("gate_window_s must be a positive number of seconds".into()));
        }
        if self.gates.is_some() && !self.on_loss {
            return Err(RegistryError::InvalidPolicy("retirement gates need on_loss = true".into()));
        }
        Ok(())
    }
}

/// What the server knows of a serving version.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VersionFacts {
    pub version: u64,
    pub created_ms: u64,
    /// The version's own time-to-live, as an instant.
    pub expires_ms: Option<u64>,
    /// When it started serving (idle time counts from here when it never served).
    pub serving_since_ms: u64,
    pub last_request_ms: Option<u64>,
    /// Why it lost, when it did.
    pub lost: Option<String>,
}

/// The versions to retire now, with the reason. `keeper` is the version that stays when every
/// serving version would otherwise go (the champion); without one, the newest stays.
pub fn retirements(
    rules: &RetirementRules,
    serving: &[VersionFacts],
    keeper: Option<u64>,
    now_ms: u64,
) -> Vec<(u64, String)> {
    let secs = |ms: u64| now_ms.saturating_sub(ms) as f64 / 1e3;
    let mut out: Vec<(u64, String)> = serving
        .iter()
        .filter_map(|f| {
            let why = if f.expires_ms.is_some_and(|e| now_ms >= e) {
                format!("its time-to-live passed {:.0} s ago", secs(f.expires_ms.unwrap_or(now_ms)))
            } else if let Some(max) = rules.max_age_s.filter(|&m| secs(f.created_ms) >= m) {
                format!("it is {:.0} s old, over the maximum age of {max} s", secs(f.created_ms))
            } else if let Some(idle) = rules
                .idle_s
                .filter(|&i| secs(f.last_request_ms.unwrap_or(f.serving_since_ms).max(f.serving_since_ms)) >= i)
            {
                format!("it served no request for {idle} s")
            } else if let Some(lost) = f.lost.as_ref().filter(|_| rules.on_loss) {
                format!("it lost: {lost}")
            } else {
                return None;
            };
            Some((f.version, why))
        })
        .collect();
    if !serving.is_empty() && out.len() == serving.len() {
        let stay = keeper
            .filter(|k| serving.iter().any(|f| f.version == *k))
            .unwrap_or_else(|| serving.iter().map(|f| f.version).max().unwrap_or(0));
        out.retain(|(v, _)| *v != stay);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(version: u64, created_s: u64) -> VersionFacts {
        VersionFacts { version, created_ms: created_s * 1000, serving_since_ms: created_s * 1000, ..Default::default() }
    }

    #[test]
    fn table() {
        let none = RetirementRules::default();
        let age = RetirementRules { max_age_s: Some(100.0), ..Default::default() };
        let idle = RetirementRules { idle_s: Some(30.0), ..Default::default() };
        let loss = RetirementRules { on_loss: true, ..Default::default() };
        let ttl = |v, created, expires_s: u64| VersionFacts { expires_ms: Some(expires_s * 1000), ..f(v, created) };
        let used = |v, created, last_s: u64| VersionFacts { last_request_ms: Some(last_s * 1000), ..f(v, created) };
        let lost = |v, created| VersionFacts { lost: Some("p99 too high".into()), ..f(v, created) };
        // (rules, serving, keeper, now s, retired versions, reason contains)
        type Case<'a> = (&'a RetirementRules, Vec<VersionFacts>, Option<u64>, u64, Vec<u64>, &'a str);
        let cases: Vec<Case> = vec![
            (&none, vec![f(1, 0), f(2, 10)], None, 1_000_000, vec![], ""),
            (&none, vec![ttl(1, 0, 50), f(2, 10)], Some(2), 60, vec![1], "time-to-live"),
            (&none, vec![ttl(1, 0, 50), f(2, 10)], Some(2), 40, vec![], ""),
            (&none, vec![ttl(1, 0, 50)], Some(1), 60, vec![], ""), // the last serving version stays
            (&none, vec![ttl(1, 0, 50), ttl(2, 0, 50)], Some(1), 60, vec![2], "time-to-live"),
            (&none, vec![ttl(1, 0, 50), ttl(2, 0, 50)], None, 60, vec![1], "time-to-live"), // newest stays
            (&age, vec![f(1, 0), f(2, 50)], Some(2), 120, vec![1], "maximum age"),
            (&age, vec![f(1, 0), f(2, 50)], Some(2), 200, vec![1], "maximum age"), // not both
            (&idle, vec![used(1, 0, 95), f(2, 0)], Some(1), 100, vec![2], "no request"),
            (&idle, vec![used(1, 0, 95), used(2, 0, 80)], Some(1), 100, vec![], ""),
            (&loss, vec![f(1, 0), lost(2, 10)], Some(1), 20, vec![2], "lost: p99"),
            (&none, vec![f(1, 0), lost(2, 10)], Some(1), 20, vec![], ""),
            (&none, vec![], None, 20, vec![], ""),
        ];
        for (rules, serving, keeper, now, want, reason) in cases {
            let got = retirements(rules, &serving, keeper, now * 1000);
            assert_eq!(got.iter().map(|(v, _)| *v).collect::<Vec<_>>(), want, "{rules:?} {serving:?} at {now}");
            assert!(got.iter().all(|(_, why)| why.contains(reason)), "{got:?} lacks {reason:?}");
        }
        assert!(RetirementRules { idle_s: Some(-1.0), ..Default::default() }.validate().is_err());
        assert!(RetirementRules { gates: Some(Gates::default()), ..Default::default() }.validate().is_err());
        let gated = RetirementRules { gates: Some(Gates::default()), on_loss: true, ..Default::default() };
        assert!(gated.validate().is_ok());
    }
}
