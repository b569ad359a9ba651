use crate::RegistryError;

/// Model names become path components and URL segments: keep them plain.
pub fn validate_model_name(name: &str) -> Result<(), RegistryError> {
    let ok = (1..=128).contains(&name.len())
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok { Ok(()) } else { Err(RegistryError::InvalidName(name.into())) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["iris", "fraud-v2", "a.b_c", "X1"] {
            assert!(validate_model_name(good).is_ok(), "{good}");
        }
        for bad in ["", "../etc", ".hidden", "a/b", "a b", "é", &"x".repeat(129)] {
            assert!(validate_model_name(bad).is_err(), "{bad}");
        }
    }
}
