//! What is loaded now, and which version answers a request that names none.
//!
//! The manager hands out `Arc` handles: a request holds its version's handle until it is
//! answered, so a version removed from the manager drains its in-flight requests and is dropped
//! (unloaded) by the last of them (TF Serving's availability-preserving order).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

#[derive(Debug)]
struct Served<S> {
    versions: BTreeMap<u64, Arc<S>>,
    default: Option<u64>,
}

#[derive(Debug)]
pub struct Manager<S> {
    models: RwLock<HashMap<String, Served<S>>>,
}

impl<S> Default for Manager<S> {
    fn default() -> Self {
        Manager { models: RwLock::new(HashMap::new()) }
    }
}

impl<S> Manager<S> {
    /// The handle for `version`, or for the model's default version when `None`.
    pub fn get(&self, name: &str, version: Option<u64>) -> Option<(u64, Arc<S>)> {
        let models = self.models.read().expect("manager lock");
        let served = models.get(name)?;
        let v = version.or(served.default)?;
        served.versions.get(&v).map(|s| (v, s.clone()))
    }

    /// Adds a loaded, warmed-up version; it takes default traffic only through `set_default`.
    pub fn install(&self, name: &str, version: u64, servable: Arc<S>) {
        let mut models = self.models.write().expect("manager lock");
        let served =
            models.entry(name.to_string()).or_insert_with(|| Served { versions: BTreeMap::new(), default: None });
        served.versions.insert(version, servable);
    }

    /// Points default traffic at an installed version. Returns false if it is not installed.
    pub fn set_default(&self, name: &str, version: u64) -> bool {
        let mut models = self.models.write().expect("manager lock");
        match models.get_mut(name) {
            Some(served) if served.versions.contains_key(&version) => {
                served.default = Some(version);
                true
            }
            _ => false,
        }
    }

    /// Removes a version; in-flight requests keep it alive until they finish. If it was the
    /// default, the newest remaining version becomes the default.
    pub fn remove(&self, name: &str, version: u64) -> Option<Arc<S>> {
        let mut models = self.models.write().expect("manager lock");
        let served = models.get_mut(name)?;
        let removed = served.versions.remove(&version);
        if served.default == Some(version) {
            served.default = served.versions.keys().next_back().copied();
        }
        if served.versions.is_empty() {
            models.remove(name);
        }
        removed
    }

    pub fn default_version(&self, name: &str) -> Option<u64> {
        self.models.read().expect("manager lock").get(name).and_then(|s| s.default)
    }

    /// The models with at least one loaded version.
    pub fn model_names(&self) -> Vec<String> {
        self.models
            .read()
            .expect("manager lock")
            .iter()
            .filter(|(_, s)| !s.versions.is_empty())
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub fn loaded_versions(&self, name: &str) -> Vec<u64> {
        self.models
            .read()
            .expect("manager lock")
            .get(name)
            .map(|s| s.versions.keys().copied().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swap_keeps_old_handle_alive_until_dropped() {
        let m = Manager::default();
        m.install("a", 1, Arc::new("v1"));
        assert!(m.set_default("a", 1));
        let (v, in_flight) = m.get("a", None).unwrap();
        assert_eq!(v, 1);
        m.install("a", 2, Arc::new("v2"));
        assert_eq!(m.get("a", None).unwrap().0, 1, "installed is not yet default");
        assert!(m.set_default("a", 2));
        let old = m.remove("a", 1).unwrap();
        assert_eq!(m.get("a", None).unwrap().0, 2);
        assert!(m.get("a", Some(1)).is_none());
        assert_eq!(Arc::strong_count(&old), 2, "the in-flight request still holds v1");
        drop(in_flight);
        assert_eq!(Arc::strong_count(&old), 1);
    }

    #[test]
    fn removing_the_default_falls_back_to_newest() {
        let m = Manager::default();
        for v in 1..=3 {
            m.install("a", v, Arc::new(v));
        }
        assert!(!m.set_default("a", 9));
        m.set_default("a", 3);
        m.remove("a", 3);
        assert_eq!(m.default_version("a"), Some(2));
        m.remove("a", 1);
        m.remove("a", 2);
        assert!(m.loaded_versions("a").is_empty());
        assert!(m.get("a", None).is_none());
    }
}
