//! Traffic routes: weighted variants chosen by a stable hash of a routing key, and a shadow.
//!
//! The variant of a request is a pure function of (model, key, route): every replica computes the
//! same answer with no shared state, and a key keeps its variant while the weights stay put. When
//! weights change, only the keys in the moved slice of the line change variant (weights are laid
//! out as consecutive ranges of 10,000 basis points, in the route's order).

use serde::{Deserialize, Serialize};

use crate::RegistryError;

/// Basis points: the hash line has 10,000 slots.
pub const SLOTS: u32 = 10_000;

/// What a variant or a shadow points at: a version number or an alias.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Version(u64),
    Alias(String),
}

impl Target {
    /// The version it names, through `aliases`.
    pub fn resolve(&self, aliases: &std::collections::BTreeMap<String, u64>) -> Option<u64> {
        match self {
            Target::Version(v) => Some(*v),
            Target::Alias(a) => aliases.get(a).copied(),
        }
    }

    pub fn parse(s: &str) -> Result<Target, RegistryError> {
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return s
                .parse()
                .map(Target::Version)
                .map_err(|_| RegistryError::InvalidPolicy(format!("version {s:?} is out of range")));
        }
        crate::validate_alias(s)?;
        Ok(Target::Alias(s.to_string()))
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Version(v) => write!(f, "{v}"),
            Target::Alias(a) => f.write_str(a),
        }
    }
}

impl Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(v) => Ok(Target::Version(v)),
            Raw::Text(s) => Target::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// The weights as given.
    #[default]
    Fixed,
    /// Shares follow Thompson sampling on the attached experiment's outcomes, each at least `floor`.
    Thompson,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub target: Target,
    /// Percent of traffic (the weights of a fixed route sum to 100). Ignored by `thompson`.
    #[serde(default)]
    pub weight: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shadow {
    pub target: Target,
    /// Percent of requests mirrored (0-100).
    pub percent: f64,
}

/// A model's route: which variants serve requests that name no version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub variants: Vec<Variant>,
    #[serde(default)]
    pub strategy: Strategy,
    /// Least share of each variant under `thompson`, in percent.
    #[serde(default = "default_floor")]
    pub floor: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<Shadow>,
    /// Seconds between two re-computations of Thompson shares (each moves some keys).
    #[serde(default = "default_rebalance")]
    pub rebalance_s: f64,
}

fn default_floor() -> f64 {
    5.0
}

fn default_rebalance() -> f64 {
    60.0
}

impl RouteSpec {
    /// A route sending everything to one target.
    pub fn single(target: Target) -> RouteSpec {
        RouteSpec {
            variants: vec![Variant { target, weight: 100 }],
            strategy: Strategy::Fixed,
            floor: default_floor(),
            shadow: None,
            rebalance_s: default_rebalance(),
        }
    }

    pub fn validate(&self) -> Result<(), RegistryError> {
        let bad = |m: String| Err(RegistryError::InvalidPolicy(m));
        if self.variants.is_empty() {
            return bad("a route needs at least one variant".into());
        }
        for (i, v) in self.variants.iter().enumerate() {
            if self.variants[..i].iter().any(|w| w.target == v.target) {
                return bad(format!("variant {} appears twice", v.target));
            }
        }
        match self.strategy {
            Strategy::Fixed => {
                let sum: u64 = self.variants.iter().map(|v| u64::from(v.weight)).sum();
                if sum != 100 {
                    return bad(format!("the weights of a fixed route must sum to 100, not {sum}"));
                }
            }
            Strategy::Thompson => {
                if self.variants.len() < 2 {
                    return bad("a thompson route needs at least two variants".into());
                }
                if !(0.0..=100.0).contains(&self.floor) || self.floor * self.variants.len() as f64 > 100.0 {
                    return bad(format!("floor {}% times {} variants exceeds 100%", self.floor, self.variants.len()));
                }
                if !(self.rebalance_s > 0.0 && self.rebalance_s.is_finite()) {
                    return bad("rebalance_s must be a positive number of seconds".into());
                }
            }
        }
        if let Some(s) = &self.shadow {
            if !(0.0..=100.0).contains(&s.percent) {
                return bad(format!("shadow percent {} is outside 0-100", s.percent));
            }
            if self.variants.iter().any(|v| v.target == s.target) {
                return bad(format!("shadow {} also takes live traffic in this route", s.target));
            }
        }
        Ok(())
    }

    /// Every target the route refers to (variants, then the shadow).
    pub fn targets(&self) -> impl Iterator<Item = &Target> {
        self.variants.iter().map(|v| &v.target).chain(self.shadow.iter().map(|s| &s.target))
    }

    /// Slot ranges of the fixed weights.
    pub fn fixed_split(&self) -> Split {
        Split::from_weights(&self.variants.iter().map(|v| f64::from(v.weight)).collect::<Vec<_>>())
    }
}

/// Consecutive ranges of the hash line, one per variant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    /// Cumulative upper bounds, the last one `SLOTS`.
    ends: Vec<u32>,
}

impl Split {
    /// Ranges proportional to `weights` (any non-negative scale), rounded by largest remainder so
    /// they cover the line exactly. All-zero weights split evenly; `weights` must not be empty.
    pub fn from_weights(weights: &[f64]) -> Split {
        debug_assert!(!weights.is_empty(), "a split of nothing");
        let n = weights.len().max(1);
        let total: f64 = weights.iter().map(|w| w.max(0.0)).sum();
        let exact: Vec<f64> = if total > 0.0 {
            weights.iter().map(|w| w.max(0.0) / total * f64::from(SLOTS)).collect()
        } else {
            vec![f64::from(SLOTS) / n as f64; n]
        };
        let mut slots: Vec<u32> = exact.iter().map(|x| x.floor() as u32).collect();
        let mut short = SLOTS - slots.iter().sum::<u32>();
        let mut order: Vec<usize> = (0..exact.len()).collect();
        order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())).then(a.cmp(&b)));
        for i in order {
            if short == 0 {
                break;
            }
            slots[i] += 1;
            short -= 1;
        }
        let mut acc = 0;
        Split {
            ends: slots
                .into_iter()
                .map(|s| {
                    acc += s;
                    acc
                })
                .collect(),
        }
    }

    /// The variant owning `slot` (0..SLOTS).
    pub fn pick(&self, slot: u32) -> usize {
        self.ends.partition_point(|&end| end <= slot).min(self.ends.len() - 1)
    }

    /// Share of each variant, in percent.
    pub fn percents(&self) -> Vec<f64> {
        let mut prev = 0;
        self.ends
            .iter()
            .map(|&e| {
                let p = f64::from(e - prev) / 100.0;
                prev = e;
                p
            })
            .collect()
    }
}

/// Stable 64-bit FNV-1a over `parts` (separated), finished by splitmix64 so that near keys
/// spread. Never change it: routing keys would move.
pub fn stable_hash(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            h = (h ^ 0x1f).wrapping_mul(0x0000_0100_0000_01b3);
        }
        for &b in part.as_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The slot of a routing key for a model's live traffic.
pub fn traffic_slot(model: &str, key: &str) -> u32 {
    ((u128::from(stable_hash(&[model, key])) * u128::from(SLOTS)) >> 64) as u32
}

/// Whether a key's request is mirrored to the shadow (independent of its traffic slot).
pub fn shadowed(model: &str, key: &str, percent: f64) -> bool {
    let slot = ((u128::from(stable_hash(&[model, "shadow", key])) * 1_000_000) >> 64) as f64;
    slot < percent * 10_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(json: &str) -> Result<RouteSpec, String> {
        let r: RouteSpec = serde_json::from_str(json).map_err(|e| e.to_string())?;
        r.validate().map_err(|e| e.to_string())?;
        Ok(r)
    }

    #[test]
    fn validation_table() {
        let cases = [
            (r#"{"variants":[{"target":"champion","weight":90},{"target":3,"weight":10}]}"#, None),
            (r#"{"variants":[{"target":"2","weight":100}]}"#, None),
            (r#"{"variants":[]}"#, Some("at least one")),
            (r#"{"variants":[{"target":"a","weight":60},{"target":"b","weight":30}]}"#, Some("sum to 100, not 90")),
            (r#"{"variants":[{"target":"a","weight":50},{"target":"a","weight":50}]}"#, Some("twice")),
            (r#"{"variants":[{"target":"a b","weight":100}]}"#, Some("alias")),
            (r#"{"variants":[{"target":"a","weight":100}],"shadow":{"target":"a","percent":5}}"#, Some("shadow")),
            (r#"{"variants":[{"target":"a","weight":100}],"shadow":{"target":"b","percent":150}}"#, Some("0-100")),
            (r#"{"variants":[{"target":"a"},{"target":"b"}],"strategy":"thompson","floor":60}"#, Some("exceeds")),
            (r#"{"variants":[{"target":"a"}],"strategy":"thompson"}"#, Some("two variants")),
            (r#"{"variants":[{"target":"a"},{"target":"b"}],"strategy":"thompson"}"#, None),
            (r#"{"variants":[{"target":"a","weight":100}],"colour":"red"}"#, Some("unknown field")),
        ];
        for (json, want) in cases {
            match (route(json), want) {
                (Ok(_), None) => {}
                (Err(e), Some(w)) => assert!(e.contains(w), "{json}: {e:?} lacks {w:?}"),
                (got, want) => panic!("{json}: got {got:?}, want error {want:?}"),
            }
        }
    }

    #[test]
    fn split_table() {
        type Case = (Vec<f64>, Vec<(u32, usize)>, Vec<f64>);
        let cases: Vec<Case> = vec![
            (vec![90.0, 10.0], vec![(0, 0), (8999, 0), (9000, 1), (9999, 1)], vec![90.0, 10.0]),
            (vec![1.0, 1.0, 1.0], vec![(3333, 0), (3334, 1), (6666, 1), (6667, 2)], vec![33.34, 33.33, 33.33]),
            (vec![0.0, 100.0], vec![(0, 1), (9999, 1)], vec![0.0, 100.0]),
            (vec![0.0, 0.0], vec![(4999, 0), (5000, 1)], vec![50.0, 50.0]),
            (vec![100.0], vec![(0, 0), (9999, 0)], vec![100.0]),
        ];
        for (weights, picks, percents) in cases {
            let s = Split::from_weights(&weights);
            for (slot, want) in picks {
                assert_eq!(s.pick(slot), want, "{weights:?} slot {slot}");
            }
            assert_eq!(s.percents(), percents, "{weights:?}");
        }
    }

    #[test]
    fn keys_are_sticky_spread_and_move_only_the_changed_slice() {
        let keys: Vec<String> = (0..20_000).map(|i| format!("user-{i}")).collect();
        let a = Split::from_weights(&[90.0, 10.0]);
        let b = Split::from_weights(&[80.0, 20.0]);
        let on_a: Vec<usize> = keys.iter().map(|k| a.pick(traffic_slot("fraud", k))).collect();
        let share = on_a.iter().filter(|&&v| v == 1).count() as f64 / keys.len() as f64;
        assert!((share - 0.10).abs() < 0.01, "10% variant got {share}");
        let again: Vec<usize> = keys.iter().map(|k| a.pick(traffic_slot("fraud", k))).collect();
        assert_eq!(on_a, again, "same key, same variant");
        // Going 90/10 → 80/20 only moves keys from variant 0 to variant 1.
        for (k, &before) in keys.iter().zip(&on_a) {
            let after = b.pick(traffic_slot("fraud", k));
            assert!(before == after || (before == 0 && after == 1), "{k} moved {before} → {after}");
        }
        // Another model hashes the same keys independently.
        let other: usize =
            keys.iter().filter(|k| a.pick(traffic_slot("other", k)) != a.pick(traffic_slot("fraud", k))).count();
        assert!(other > 1000, "models share no assignment pattern ({other} differ)");
        // Pinned: a change to the hash would move every key on every replica.
        assert_eq!(stable_hash(&["fraud", "user-1"]), 4_428_255_931_470_828_768);
        let mirrored = keys.iter().filter(|k| shadowed("fraud", k, 25.0)).count() as f64 / keys.len() as f64;
        assert!((mirrored - 0.25).abs() < 0.015, "shadowed {mirrored}");
        assert!(!keys.iter().any(|k| shadowed("fraud", k, 0.0)));
        assert!(keys.iter().all(|k| shadowed("fraud", k, 100.0)));
    }
}
