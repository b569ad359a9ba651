//! Version policies: which versions of a model should be loaded. Pure functions over records.

use serde::{Deserialize, Serialize};

/// Which versions serve. `latest` (default) is `Latest(1)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VersionPolicy {
    /// The N newest versions that have not failed; the newest takes default traffic.
    Latest(usize),
    /// Exactly these versions (those that exist and have not failed); the highest is default.
    Pinned(Vec<u64>),
}

impl Default for VersionPolicy {
    fn default() -> Self {
        VersionPolicy::Latest(1)
    }
}

/// The versions to keep loaded, newest first, from the candidates (versions that exist and
/// have not failed).
pub fn aspired(policy: &VersionPolicy, candidates: &[u64]) -> Vec<u64> {
    let mut c = candidates.to_vec();
    c.sort_unstable_by(|a, b| b.cmp(a));
    c.dedup();
    match policy {
        VersionPolicy::Latest(n) => c.into_iter().take((*n).max(1)).collect(),
        VersionPolicy::Pinned(pins) => c.into_iter().filter(|v| pins.contains(v)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let cases: Vec<(VersionPolicy, Vec<u64>, Vec<u64>)> = vec![
            (VersionPolicy::Latest(1), vec![], vec![]),
            (VersionPolicy::Latest(1), vec![1, 3, 2], vec![3]),
            (VersionPolicy::Latest(2), vec![1, 3, 2], vec![3, 2]),
            (VersionPolicy::Latest(5), vec![1, 2], vec![2, 1]),
            (VersionPolicy::Latest(0), vec![1, 2], vec![2]),
            (VersionPolicy::Pinned(vec![1, 7]), vec![1, 2, 3], vec![1]),
            (VersionPolicy::Pinned(vec![]), vec![1, 2], vec![]),
        ];
        for (policy, candidates, want) in cases {
            assert_eq!(aspired(&policy, &candidates), want, "{policy:?} over {candidates:?}");
        }
    }
}
