//! The server's TOML configuration. Unknown keys are refused, so a typo is an error, not a
//! silently ignored setting.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use algolink_engine::{BatchConfig, DeviceRequest};
use algolink_registry::policy::VersionPolicy;
use serde::Deserialize;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerSection,
    /// Settings every model gets unless `[models.NAME]` overrides them.
    pub defaults: ModelSettings,
    /// Per-model overrides; only the keys given replace the defaults.
    pub models: BTreeMap<String, ModelOverrides>,
    /// Models pushed from files at start-up when the registry has no version of them yet.
    pub preload: Vec<Preload>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Address to listen on.
    pub http: String,
    /// Registry directory (SQLite database and model files); relative to the config file.
    pub data_dir: PathBuf,
    /// Largest inference request body.
    pub max_body_bytes: usize,
    /// Largest model upload.
    pub max_upload_bytes: u64,
    /// Largest number of files in an uploaded model directory (tar).
    pub max_upload_entries: usize,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            http: "127.0.0.1:8000".into(),
            data_dir: PathBuf::from("data"),
            max_body_bytes: 64 << 20,
            max_upload_bytes: 8 << 30,
            max_upload_entries: 64,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSettings {
    /// `auto`, `cpu` or `cuda:N`.
    pub device: String,
    pub max_batch_size: usize,
    pub max_queue_delay_us: u64,
    pub preferred_batch_sizes: Vec<usize>,
    pub max_queue_size: usize,
    /// Batch sizes run once at load, before the version takes traffic.
    pub warmup_batch_sizes: Vec<usize>,
    /// `"latest"`, `{ latest = N }` or `{ pinned = [1, 2] }`.
    pub version_policy: PolicySetting,
}

impl Default for ModelSettings {
    fn default() -> Self {
        ModelSettings {
            device: "auto".into(),
            max_batch_size: 64,
            max_queue_delay_us: 0,
            preferred_batch_sizes: Vec::new(),
            max_queue_size: 1024,
            warmup_batch_sizes: vec![1],
            version_policy: PolicySetting::default(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq, Default)]
#[serde(untagged)]
pub enum PolicySetting {
    #[default]
    #[serde(skip)]
    Default,
    Named(NamedPolicy),
    Latest {
        latest: usize,
    },
    Pinned {
        pinned: Vec<u64>,
    },
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum NamedPolicy {
    Latest,
}

impl PolicySetting {
    pub fn policy(&self) -> VersionPolicy {
        match self {
            PolicySetting::Default | PolicySetting::Named(NamedPolicy::Latest) => VersionPolicy::Latest(1),
            PolicySetting::Latest { latest } => VersionPolicy::Latest(*latest),
            PolicySetting::Pinned { pinned } => VersionPolicy::Pinned(pinned.clone()),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ModelOverrides {
    pub device: Option<String>,
    pub max_batch_size: Option<usize>,
    pub max_queue_delay_us: Option<u64>,
    pub preferred_batch_sizes: Option<Vec<usize>>,
    pub max_queue_size: Option<usize>,
    pub warmup_batch_sizes: Option<Vec<usize>>,
    pub version_policy: Option<PolicySetting>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preload {
    pub name: String,
    /// Relative paths are resolved against the config file's directory.
    pub path: PathBuf,
}

impl Config {
    /// Reads and checks a config file; relative paths in it (data_dir, preloads) are relative
    /// to the file's directory.
    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        let mut config = Config::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        if config.server.data_dir.is_relative() {
            config.server.data_dir = base.join(&config.server.data_dir);
        }
        for p in &mut config.preload {
            if p.path.is_relative() {
                p.path = base.join(&p.path);
            }
        }
        Ok(config)
    }

    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let config: Config = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        for name in self.models.keys() {
            self.settings_for(name).check().map_err(|e| anyhow::anyhow!("[models.{name}]: {e}"))?;
        }
        self.defaults.check().map_err(|e| anyhow::anyhow!("[defaults]: {e}"))?;
        for p in &self.preload {
            algolink_registry::validate_model_name(&p.name)?;
        }
        Ok(())
    }

    /// The effective settings of a model: defaults with its overrides applied.
    pub fn settings_for(&self, name: &str) -> ModelSettings {
        let mut s = self.defaults.clone();
        if let Some(o) = self.models.get(name) {
            let o = o.clone();
            s.device = o.device.unwrap_or(s.device);
            s.max_batch_size = o.max_batch_size.unwrap_or(s.max_batch_size);
            s.max_queue_delay_us = o.max_queue_delay_us.unwrap_or(s.max_queue_delay_us);
            s.preferred_batch_sizes = o.preferred_batch_sizes.unwrap_or(s.preferred_batch_sizes);
            s.max_queue_size = o.max_queue_size.unwrap_or(s.max_queue_size);
            s.warmup_batch_sizes = o.warmup_batch_sizes.unwrap_or(s.warmup_batch_sizes);
            s.version_policy = o.version_policy.unwrap_or(s.version_policy);
        }
        s
    }
}

impl ModelSettings {
    fn check(&self) -> anyhow::Result<()> {
        self.device.parse::<DeviceRequest>()?;
        anyhow::ensure!(self.max_batch_size >= 1, "max_batch_size must be at least 1");
        anyhow::ensure!(self.max_queue_size >= 1, "max_queue_size must be at least 1");
        if let Some(p) = self.preferred_batch_sizes.iter().find(|&&p| p == 0 || p > self.max_batch_size) {
            anyhow::bail!("preferred batch size {p} is outside 1..=max_batch_size ({})", self.max_batch_size);
        }
        Ok(())
    }

    pub fn batch_config(&self) -> BatchConfig {
        BatchConfig {
            max_batch_size: self.max_batch_size,
            max_queue_delay: Duration::from_micros(self.max_queue_delay_us),
            preferred_batch_sizes: self.preferred_batch_sizes.clone(),
            max_queue_size: self.max_queue_size,
        }
    }

    pub fn device(&self) -> DeviceRequest {
        self.device.parse().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_apply_per_key() {
        let c = Config::parse(
            r#"
            [defaults]
            max_batch_size = 16
            [models.iris]
            max_queue_delay_us = 500
            version_policy = { latest = 2 }
            "#,
        )
        .unwrap();
        let s = c.settings_for("iris");
        assert_eq!((s.max_batch_size, s.max_queue_delay_us), (16, 500));
        assert_eq!(s.version_policy.policy(), VersionPolicy::Latest(2));
        assert_eq!(c.settings_for("other").version_policy.policy(), VersionPolicy::Latest(1));
    }

    #[test]
    fn refuses_typos_and_bad_values() {
        assert!(Config::parse("[server]\nhttp_addr = \"x\"").is_err());
        assert!(Config::parse("[defaults]\ndevice = \"gpu\"").is_err());
        assert!(Config::parse("[defaults]\nmax_batch_size = 4\npreferred_batch_sizes = [8]").is_err());
        assert!(Config::parse("[[preload]]\nname = \"../x\"\npath = \"m.onnx\"").is_err());
        assert!(Config::parse("[models.a]\nversion_policy = \"latest\"").is_ok());
    }
}
