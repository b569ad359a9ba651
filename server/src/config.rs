//! The server's TOML configuration. Unknown keys are refused, so a typo is an error, not a
//! silently ignored setting.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use algolink_engine::{BatchConfig, CpuPair, DeviceRequest, OnnxBackend};
use algolink_registry::lifecycle::retire::RetirementRules;
use algolink_registry::lifecycle::rollout::RolloutPolicy;
use algolink_registry::lifecycle::route::RouteSpec;
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
    /// URLs every lifecycle event is POSTed to.
    pub webhooks: Vec<Webhook>,
    pub auth: AuthSection,
    pub registry: RegistrySection,
}

/// Where the registry lives. The default is embedded: SQLite and model files under `data_dir`.
/// Replicas of a cluster share a PostgreSQL database and an S3-compatible bucket; `data_dir`
/// then holds only a cache of model files, each checked against its sha256 when read.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySection {
    /// `postgres://user:password@host:5432/db`; the environment variable `ALGOLINK_DATABASE_URL`
    /// overrides it (so a password can come from a secret rather than the file).
    pub database: Option<String>,
    /// `s3://bucket/optional/prefix` for model files; `ALGOLINK_STORAGE_URL` overrides it.
    pub storage: Option<String>,
    /// object_store's S3 options (`endpoint`, `region`, `allow_http`, …). Credentials are best
    /// left to the usual `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` environment variables.
    pub storage_options: std::collections::BTreeMap<String, String>,
}

impl RegistrySection {
    pub fn backends(&self) -> algolink_registry::Backends {
        algolink_registry::Backends {
            database: self.database.clone(),
            storage: self.storage.clone(),
            storage_options: self.storage_options.clone(),
        }
    }

    /// Points the registry at the test suite's backends (a fresh PostgreSQL database when the
    /// suite runs on one; see `algolink_registry::testing`).
    pub async fn backends_for_tests(&mut self) {
        let backends = algolink_registry::testing::scratch_backends().await.expect("test backends");
        self.database = backends.database;
        self.storage = backends.storage;
        self.storage_options = backends.storage_options;
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// `"auto"`: on unless the server listens on a loopback address only; `"on"`; `"off"`.
    pub mode: AuthMode,
    /// Where the first owner's token is written when auth is on and the registry has no owner
    /// (default: `owner-token` in the data directory).
    pub owner_token_file: Option<PathBuf>,
    /// How long a resolved token is trusted before it is looked up again: a revocation made
    /// on another replica takes this long to bite (one made here bites at once).
    pub cache_ms: u64,
}

impl Default for AuthSection {
    fn default() -> Self {
        AuthSection { mode: AuthMode::Auto, owner_token_file: None, cache_ms: 2000 }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    #[default]
    Auto,
    On,
    Off,
}

impl Config {
    /// Whether requests must carry tokens.
    pub fn auth_enabled(&self) -> bool {
        match self.auth.mode {
            AuthMode::On => true,
            AuthMode::Off => false,
            AuthMode::Auto => !loopback_only(&self.server.http),
        }
    }

    pub fn owner_token_file(&self) -> PathBuf {
        self.auth.owner_token_file.clone().unwrap_or_else(|| self.server.data_dir.join("owner-token"))
    }
}

/// Whether `http` (host:port) binds loopback addresses only.
fn loopback_only(http: &str) -> bool {
    let host = http.rsplit_once(':').map_or(http, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    pub url: String,
    /// Event kinds to send (`retired`, `promoted`, ...); empty: all.
    #[serde(default)]
    pub kinds: Vec<String>,
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Wait before the first retry; doubled at each retry (up to 60 s).
    #[serde(default = "default_backoff")]
    pub backoff_ms: u64,
    #[serde(default = "default_webhook_timeout")]
    pub timeout_ms: u64,
}

fn default_attempts() -> u32 {
    5
}
fn default_backoff() -> u64 {
    500
}
fn default_webhook_timeout() -> u64 {
    10_000
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
    /// How often the lifecycle controller steps rollouts, bandits and retirement.
    pub lifecycle_interval_ms: u64,
    /// Threads that run HTTP and the control plane (Triton's `--http-thread-count`). Default:
    /// one fewer than the cores, at least one, since the executors need a core to run models on.
    /// Measured on 2 cores with the load generator beside the server: one HTTP thread served
    /// the iris model 1.15-1.2x the requests of two, at 0.7x the CPU per request (two threads
    /// wake each other across cores for every request), and was never slower on the MLPs.
    pub http_threads: Option<usize>,
}

impl ServerSection {
    /// `http_threads`, or its default.
    pub fn http_threads(&self) -> usize {
        self.http_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()).saturating_sub(1).max(1))
    }
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            http: "127.0.0.1:8000".into(),
            data_dir: PathBuf::from("data"),
            max_body_bytes: 64 << 20,
            max_upload_bytes: 8 << 30,
            max_upload_entries: 64,
            lifecycle_interval_ms: 1000,
            http_threads: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSettings {
    /// `auto`, `cpu` or `cuda:N`.
    pub device: String,
    /// Executors per loaded version (Triton's instance group): each its own copy of the model, on
    /// a GPU its own stream, so that several batches run at once.
    pub instances: usize,
    pub max_batch_size: usize,
    pub max_queue_delay_us: u64,
    pub preferred_batch_sizes: Vec<usize>,
    pub max_queue_size: usize,
    /// Models that pad requests to the longest (text encoders): the most padded tokens (rows ×
    /// longest sequence) one batch may hold; a request over it alone is refused (TEI's budget).
    pub max_batch_tokens: usize,
    /// Batch sizes run once at load, before the version takes traffic.
    pub warmup_batch_sizes: Vec<usize>,
    /// What runs ONNX models: `"tract"` (built in) or `"ort"` (ONNX Runtime; a build with the
    /// cargo feature `ort` and an installed libonnxruntime, see engine/src/ort.rs).
    pub onnx_backend: OnnxBackend,
    /// `"latest"`, `{ latest = N }` or `{ pinned = [1, 2] }`.
    pub version_policy: PolicySetting,
    /// `"static"` (Triton's dynamic batcher: max_queue_delay_us, preferred_batch_sizes) or
    /// `"adaptive"` (learns execution time per batch size, waits only while that raises
    /// throughput within `latency_slo_ms`, refuses requests predicted to miss it).
    pub mode: BatchMode,
    /// The latency objective of adaptive mode, per request (queue + execution).
    pub latency_slo_ms: f64,
    /// Adaptive mode on the CPU, one instance, ONNX on tract: `"auto"` (a pair of executors when
    /// a test at load finds two batches side by side faster), `"on"` or `"off"`.
    pub cpu_pair: CpuPair,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum BatchMode {
    #[default]
    Static,
    Adaptive,
}

impl Default for ModelSettings {
    fn default() -> Self {
        ModelSettings {
            device: "auto".into(),
            instances: 1,
            max_batch_size: 64,
            max_queue_delay_us: 0,
            preferred_batch_sizes: Vec::new(),
            max_queue_size: 1024,
            max_batch_tokens: 16_384,
            warmup_batch_sizes: vec![1],
            onnx_backend: OnnxBackend::Tract,
            version_policy: PolicySetting::default(),
            mode: BatchMode::Static,
            latency_slo_ms: 100.0,
            cpu_pair: CpuPair::Auto,
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
    pub instances: Option<usize>,
    pub max_batch_size: Option<usize>,
    pub max_queue_delay_us: Option<u64>,
    pub preferred_batch_sizes: Option<Vec<usize>>,
    pub max_queue_size: Option<usize>,
    pub max_batch_tokens: Option<usize>,
    pub warmup_batch_sizes: Option<Vec<usize>>,
    pub onnx_backend: Option<OnnxBackend>,
    pub version_policy: Option<PolicySetting>,
    pub mode: Option<BatchMode>,
    pub latency_slo_ms: Option<f64>,
    pub cpu_pair: Option<CpuPair>,
    /// Written to the registry at start-up (the config wins over the API's earlier changes).
    pub route: Option<RouteSpec>,
    pub retirement: Option<RetirementRules>,
    /// New versions enter as canaries with this policy.
    pub rollout: Option<RolloutPolicy>,
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
        if let Some(f) = &mut config.auth.owner_token_file
            && f.is_relative()
        {
            *f = base.join(&*f);
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
        for (name, o) in &self.models {
            let at = |e: algolink_registry::RegistryError| anyhow::anyhow!("[models.{name}]: {e}");
            self.settings_for(name).check().map_err(|e| anyhow::anyhow!("[models.{name}]: {e}"))?;
            o.route.as_ref().map(RouteSpec::validate).transpose().map_err(at)?;
            o.retirement.as_ref().map(RetirementRules::validate).transpose().map_err(at)?;
            o.rollout.as_ref().map(RolloutPolicy::validate).transpose().map_err(at)?;
        }
        for w in &self.webhooks {
            anyhow::ensure!(
                w.url.starts_with("http://") || w.url.starts_with("https://"),
                "[[webhooks]]: url {:?} must be http:// or https://",
                w.url
            );
            anyhow::ensure!(w.max_attempts >= 1, "[[webhooks]]: max_attempts must be at least 1");
        }
        anyhow::ensure!(self.server.lifecycle_interval_ms >= 10, "[server]: lifecycle_interval_ms must be at least 10");
        anyhow::ensure!(self.server.http_threads != Some(0), "[server]: http_threads must be at least 1");
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
            s.instances = o.instances.unwrap_or(s.instances);
            s.max_batch_size = o.max_batch_size.unwrap_or(s.max_batch_size);
            s.max_queue_delay_us = o.max_queue_delay_us.unwrap_or(s.max_queue_delay_us);
            s.preferred_batch_sizes = o.preferred_batch_sizes.unwrap_or(s.preferred_batch_sizes);
            s.max_queue_size = o.max_queue_size.unwrap_or(s.max_queue_size);
            s.max_batch_tokens = o.max_batch_tokens.unwrap_or(s.max_batch_tokens);
            s.warmup_batch_sizes = o.warmup_batch_sizes.unwrap_or(s.warmup_batch_sizes);
            s.onnx_backend = o.onnx_backend.unwrap_or(s.onnx_backend);
            s.version_policy = o.version_policy.unwrap_or(s.version_policy);
            s.mode = o.mode.unwrap_or(s.mode);
            s.latency_slo_ms = o.latency_slo_ms.unwrap_or(s.latency_slo_ms);
            s.cpu_pair = o.cpu_pair.unwrap_or(s.cpu_pair);
        }
        s
    }
}

/// Each instance is a thread and a copy of the weights: more than this is a typo, not a plan.
const MAX_INSTANCES: usize = 64;

impl ModelSettings {
    fn check(&self) -> anyhow::Result<()> {
        self.device.parse::<DeviceRequest>()?;
        anyhow::ensure!((1..=MAX_INSTANCES).contains(&self.instances), "instances must be in 1..={MAX_INSTANCES}");
        anyhow::ensure!(self.max_batch_size >= 1, "max_batch_size must be at least 1");
        anyhow::ensure!(self.max_queue_size >= 1, "max_queue_size must be at least 1");
        anyhow::ensure!(self.max_batch_tokens >= 1, "max_batch_tokens must be at least 1");
        anyhow::ensure!(
            self.latency_slo_ms > 0.0 && self.latency_slo_ms.is_finite(),
            "latency_slo_ms must be a positive number"
        );
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
            max_batch_tokens: Some(self.max_batch_tokens),
            latency_slo: (self.mode == BatchMode::Adaptive).then(|| Duration::from_secs_f64(self.latency_slo_ms / 1e3)),
            cpu_pair: self.cpu_pair,
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
            cpu_pair = "off"
            "#,
        )
        .unwrap();
        let s = c.settings_for("iris");
        assert_eq!((s.max_batch_size, s.max_queue_delay_us), (16, 500));
        assert_eq!((s.batch_config().cpu_pair, c.settings_for("other").cpu_pair), (CpuPair::Off, CpuPair::Auto));
        assert_eq!(s.version_policy.policy(), VersionPolicy::Latest(2));
        assert_eq!(c.settings_for("other").version_policy.policy(), VersionPolicy::Latest(1));
    }

    #[test]
    fn auth_auto_is_off_on_loopback_only() {
        let on = |http: &str, mode: &str| {
            Config::parse(&format!("[server]\nhttp = \"{http}\"\n[auth]\nmode = \"{mode}\"")).unwrap().auth_enabled()
        };
        for (http, want) in [
            ("127.0.0.1:8000", false),
            ("localhost:80", false),
            ("[::1]:8000", false),
            ("0.0.0.0:8000", true),
            ("10.1.2.3:1", true),
        ] {
            assert_eq!(on(http, "auto"), want, "{http}");
        }
        assert!(on("127.0.0.1:8000", "on"));
        assert!(!on("0.0.0.0:8000", "off"));
        assert!(Config::parse("[auth]\nmode = \"maybe\"").is_err());
    }

    #[test]
    fn refuses_typos_and_bad_values() {
        assert!(Config::parse("[server]\nhttp_addr = \"x\"").is_err());
        assert!(Config::parse("[defaults]\ndevice = \"gpu\"").is_err());
        assert!(Config::parse("[defaults]\nmax_batch_size = 4\npreferred_batch_sizes = [8]").is_err());
        assert!(Config::parse("[[preload]]\nname = \"../x\"\npath = \"m.onnx\"").is_err());
        assert!(Config::parse("[models.a]\nversion_policy = \"latest\"").is_ok());
        let route = "[models.a.route]\nvariants = [{ target = \"champion\", weight = 90 }, { target = 2, weight = 5 }]";
        assert!(Config::parse(route).unwrap_err().to_string().contains("sum to 100"));
        assert!(Config::parse("[models.a.rollout]\nstep = 0").is_err());
        assert!(Config::parse("[[webhooks]]\nurl = \"ftp://x\"").is_err());
        assert!(Config::parse("[defaults]\nmode = \"greedy\"").is_err());
        assert!(Config::parse("[defaults]\ncpu_pair = \"maybe\"").is_err());
        assert!(Config::parse("[defaults]\nlatency_slo_ms = 0").is_err());
        assert!(Config::parse("[models.a]\ninstances = 0").unwrap_err().to_string().contains("instances"));
        assert_eq!(Config::parse("[models.a]\ninstances = 2").unwrap().settings_for("a").instances, 2);
        let adaptive = Config::parse("[models.a]\nmode = \"adaptive\"\nlatency_slo_ms = 20").unwrap();
        assert_eq!(adaptive.settings_for("a").batch_config().latency_slo, Some(Duration::from_millis(20)));
        assert_eq!(adaptive.settings_for("b").batch_config().latency_slo, None);
        let c = Config::parse(
            "[models.a.route]\nvariants = [{ target = \"champion\", weight = 90 }, { target = 2, weight = 10 }]\n\
             shadow = { target = \"challenger\", percent = 5 }\n[models.a.retirement]\nidle_s = 60\n\
             [models.a.rollout]\nstep = 5\ngates = { max_p99_ratio = 2.0 }\n[[webhooks]]\nurl = \"http://h/x\"",
        )
        .unwrap();
        assert_eq!(c.models["a"].rollout.as_ref().unwrap().gates.max_p99_ratio, 2.0);
        assert_eq!(c.webhooks[0].max_attempts, 5);
    }
}
