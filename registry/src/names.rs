use crate::RegistryError;
use crate::access::validate_principal_name;

/// Words that follow a model name in the API's paths (`/v2/models/{name}/infer`, ...): the
/// model part of a `team/model` name may not be one, so `/v2/models/team/infer` stays readable
/// as "infer on model team" and `/v2/models/team/fraud/infer` as "infer on team/fraud".
pub const PATH_WORDS: [&str; 12] = [
    "ready",
    "infer",
    "stats",
    "versions",
    "aliases",
    "policy",
    "route",
    "rollout",
    "experiments",
    "load",
    "unload",
    "live",
];

/// Model names become URL segments and metric labels: keep them plain. `team/model` names a
/// model in namespace `team`.
pub fn validate_model_name(name: &str) -> Result<(), RegistryError> {
    let (namespace, model) = match name.split_once('/') {
        Some((ns, m)) => (Some(ns), m),
        None => (None, name),
    };
    if let Some(ns) = namespace {
        validate_principal_name("namespace", ns).map_err(|_| RegistryError::InvalidName(name.into()))?;
    }
    let ok = (1..=128).contains(&model.len())
        && model.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && model.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && !(namespace.is_some() && PATH_WORDS.contains(&model));
    if ok { Ok(()) } else { Err(RegistryError::InvalidName(name.into())) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["iris", "fraud-v2", "a.b_c", "X1", "team/fraud", "t-1/m.2"] {
            assert!(validate_model_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "../etc",
            ".hidden",
            "a/b/c",
            "/b",
            "a/",
            "Team/b",
            "team/infer",
            "team/versions",
            "a b",
            "é",
            &"x".repeat(129),
        ] {
            assert!(validate_model_name(bad).is_err(), "{bad}");
        }
    }
}
