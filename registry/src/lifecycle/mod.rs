//! Lifecycle policies: routes, experiments, bandits, rollouts and retirement. Each decision is a
//! pure function of recorded state and time, table-tested here; the server only feeds it facts
//! (requests, latencies, outcomes, the clock) and applies the answer.

pub mod bandit;
pub mod retire;
pub mod rollout;
pub mod route;
pub mod stats;

use serde::{Deserialize, Serialize};

use crate::RegistryError;
use crate::policy::VersionPolicy;
use retire::RetirementRules;
use rollout::{Rollout, RolloutPolicy};
use route::RouteSpec;
use stats::SequentialConfig;

/// How a model serves, as recorded in the registry (one document per model). Set through the
/// management API, the CLI, or `[models.NAME]` in the config (applied at start-up).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelPolicy {
    /// Which versions stay loaded; `None`: the config's (default `latest`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_policy: Option<VersionPolicy>,
    /// Where requests that name no version go; `None`: the newest loaded version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<RouteSpec>,
    pub retirement: RetirementRules,
    /// When set, every new version enters as a canary with this policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutPolicy>,
    /// The rollout in progress.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_rollout: Option<Rollout>,
}

impl ModelPolicy {
    pub fn validate(&self) -> Result<(), RegistryError> {
        if let Some(r) = &self.route {
            r.validate()?;
        }
        if let Some(r) = &self.rollout {
            r.validate()?;
        }
        self.retirement.validate()
    }
}

/// What an experiment measures. Higher is better for both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Goal {
    /// 0/1 outcomes.
    #[default]
    Conversion,
    /// Any number (revenue, rating, negative loss...).
    Reward,
}

impl Goal {
    pub fn bandit_outcome(self) -> bandit::Outcome {
        match self {
            Goal::Conversion => bandit::Outcome::Conversion,
            Goal::Reward => bandit::Outcome::Reward,
        }
    }

    /// Whether `value` is a valid outcome for the goal.
    pub fn accepts(self, value: f64) -> bool {
        match self {
            Goal::Conversion => value == 0.0 || value == 1.0,
            Goal::Reward => value.is_finite(),
        }
    }
}

/// An experiment as asked for: the goal, the control, and the sequential test's settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentSpec {
    #[serde(default)]
    pub goal: Goal,
    /// The variant the others are compared with; default: the route's first variant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<route::Target>,
    #[serde(flatten)]
    pub test: SequentialConfig,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExperimentState {
    Running,
    Stopped,
    Concluded,
}

/// An experiment as recorded: variants are resolved to versions when it starts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Experiment {
    pub id: u64,
    pub model: String,
    pub goal: Goal,
    pub test: SequentialConfig,
    pub control: u64,
    /// Every variant's version, the control included.
    pub versions: Vec<u64>,
    pub state: ExperimentState,
    pub started_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conclusion: Option<String>,
    /// Decisions of the sequential test per version, recorded when made (they stand).
    #[serde(default)]
    pub decisions: std::collections::BTreeMap<u64, Decision>,
}

/// A version found better or worse than the control.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub verdict: stats::Verdict,
    pub p_value: f64,
    pub difference: f64,
    pub at_ms: u64,
}

impl Experiment {
    /// Alpha per comparison: the experiment's alpha split over its comparisons with the control
    /// (Bonferroni), so the chance of any false decision stays at most alpha.
    pub fn test_per_comparison(&self) -> SequentialConfig {
        let comparisons = self.versions.len().saturating_sub(1).max(1) as f64;
        SequentialConfig { alpha: self.test.alpha / comparisons, ..self.test }
    }
}

/// Alias names: like model names, but never all digits (that reads as a version).
pub fn validate_alias(alias: &str) -> Result<(), RegistryError> {
    let ok = (1..=64).contains(&alias.len())
        && alias.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && alias.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::InvalidPolicy(format!(
            "invalid alias {alias:?}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_documents_round_trip_and_refuse_typos() {
        let json = r#"{"version_policy":{"latest":2},"route":{"variants":[{"target":"champion","weight":100}]},
            "retirement":{"idle_s":60,"on_loss":true},"rollout":{"step":5}}"#;
        let p: ModelPolicy = serde_json::from_str(json).unwrap();
        p.validate().unwrap();
        assert_eq!(p.rollout.as_ref().unwrap().max_weight, 50);
        let again: ModelPolicy = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(again, p);
        assert!(serde_json::from_str::<ModelPolicy>(r#"{"retirment":{}}"#).is_err());
        let e: ExperimentSpec =
            serde_json::from_str(r#"{"goal":"reward","control":"champion","min_effect":0.5}"#).unwrap();
        assert_eq!((e.goal, e.test.min_effect, e.test.alpha), (Goal::Reward, 0.5, 0.05));
        for (alias, ok) in [("champion", true), ("c-2.b", true), ("12", false), ("", false), ("a/b", false)] {
            assert_eq!(validate_alias(alias).is_ok(), ok, "{alias}");
        }
        assert!(Goal::Conversion.accepts(1.0) && !Goal::Conversion.accepts(0.5) && Goal::Reward.accepts(-3.5));
    }
}
