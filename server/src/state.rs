//! The server's shared state and the lifecycle of versions: push, load, swap, unload.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use algolink_engine::{LoadOptions, Model, Scheduler, Stats, load_model};
use algolink_registry::policy::aspired;
use algolink_registry::{ArtifactLimits, Format, Manager, Registry, VersionRecord, VersionState};
use tokio::io::AsyncRead;

use crate::config::Config;
use crate::error::ApiError;

/// A loaded version: its model behind a scheduler.
pub struct Servable {
    pub name: String,
    pub version: u64,
    pub scheduler: Scheduler,
}

impl Servable {
    pub fn stats(&self) -> &Arc<Stats> {
        self.scheduler.stats()
    }
}

pub struct AppState {
    pub config: Config,
    pub registry: Registry,
    pub manager: Manager<Servable>,
    /// Counters per (model, version), kept after unload so Prometheus counters never go back.
    stats: Mutex<BTreeMap<(String, u64), Arc<Stats>>>,
    /// Models unloaded through the repository API: not loaded again until asked.
    unloaded: Mutex<HashSet<String>>,
    /// Serialises lifecycle changes (push, delete, load, unload) so two never interleave.
    lifecycle: tokio::sync::Mutex<()>,
    ready: AtomicBool,
}

impl AppState {
    pub fn new(config: Config, registry: Registry) -> AppState {
        AppState {
            config,
            registry,
            manager: Manager::default(),
            stats: Mutex::new(BTreeMap::new()),
            unloaded: Mutex::new(HashSet::new()),
            lifecycle: tokio::sync::Mutex::new(()),
            ready: AtomicBool::new(false),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn all_stats(&self) -> Vec<((String, u64), Arc<Stats>)> {
        self.stats.lock().expect("stats lock").iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    fn artifact_limits(&self) -> ArtifactLimits {
        ArtifactLimits {
            max_entries: self.config.server.max_upload_entries,
            max_total_bytes: 4 * self.config.server.max_upload_bytes,
        }
    }

    /// Start-up: pushes the configured preloads that the registry lacks, then loads every model
    /// by its version policy. The server is ready when this returns.
    pub async fn start(&self) -> anyhow::Result<()> {
        for p in &self.config.preload {
            if self.registry.model(&p.name).await.is_ok() {
                continue;
            }
            let file = tokio::fs::File::open(&p.path)
                .await
                .map_err(|e| anyhow::anyhow!("preload {}: {}: {e}", p.name, p.path.display()))?;
            let v = self.push(&p.name, file).await.map_err(|e| anyhow::anyhow!("preload {}: {e}", p.name))?;
            tracing::info!(model = %p.name, version = v.version, "preloaded {}", p.path.display());
        }
        for model in self.registry.models().await? {
            if let Err(e) = self.reconcile(&model.name, None).await {
                tracing::error!(model = %model.name, "could not load: {e}");
            }
        }
        self.ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Stores an upload as the next version of `name` after checking it by loading it, then lets
    /// the version policy decide whether it serves. Nothing is acknowledged (or kept) unless the
    /// file is durable and the model loaded and warmed up.
    pub async fn push(&self, name: &str, body: impl AsyncRead + Unpin) -> Result<VersionRecord, ApiError> {
        algolink_registry::validate_model_name(name)?;
        let staged = self.registry.blobs().stage(body, self.config.server.max_upload_bytes).await?;
        if staged.size == 0 {
            return Err(ApiError::BadRequest("empty upload: send the model file as the request body".into()));
        }
        let format = Format::detect(&staged.head);
        let files = algolink_registry::unpack(format, staged.read().await?, self.artifact_limits())?;
        let model = self.load_files(name, files).await.map_err(|e| match e {
            ApiError::BadRequest(m) => ApiError::BadRequest(format!("model refused: {m}")),
            other => other,
        })?;
        let _guard = self.lifecycle.lock().await;
        let record = self.registry.add_version(name, staged, format, VersionState::Loading).await?;
        tracing::info!(model = name, version = record.version, sha256 = %record.sha256, "pushed");
        self.unloaded.lock().expect("unloaded lock").remove(name);
        self.reconcile_locked(name, Some((record.version, model))).await?;
        Ok(self.registry.version(name, record.version).await?)
    }

    async fn load_files(&self, name: &str, files: algolink_engine::ModelFiles) -> Result<Arc<dyn Model>, ApiError> {
        let settings = self.config.settings_for(name);
        let device = settings.device().resolve()?;
        let options = LoadOptions { device, warmup_batch_sizes: settings.warmup_batch_sizes.clone() };
        tokio::task::spawn_blocking(move || load_model(&files, &options))
            .await
            .map_err(|e| ApiError::Internal(format!("loader crashed: {e}")))?
            .map_err(ApiError::from)
    }

    async fn load_version(&self, record: &VersionRecord) -> Result<Arc<dyn Model>, ApiError> {
        let files = self.registry.files(record, self.artifact_limits()).await?;
        self.load_files(&record.name, files).await
    }

    /// Brings the loaded versions of `name` in line with its policy (availability-preserving:
    /// new versions are loaded and take traffic before old ones are removed).
    pub async fn reconcile(&self, name: &str, preloaded: Option<(u64, Arc<dyn Model>)>) -> Result<(), ApiError> {
        let _guard = self.lifecycle.lock().await;
        self.reconcile_locked(name, preloaded).await
    }

    async fn reconcile_locked(&self, name: &str, mut preloaded: Option<(u64, Arc<dyn Model>)>) -> Result<(), ApiError> {
        let settings = self.config.settings_for(name);
        let policy = settings.version_policy.policy();
        let versions = match self.registry.model(name).await {
            Ok(m) => m.versions,
            Err(algolink_registry::RegistryError::ModelNotFound(_)) => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        let held_back = self.unloaded.lock().expect("unloaded lock").contains(name);
        let mut failed: Vec<u64> =
            versions.iter().filter(|v| v.state == VersionState::Failed).map(|v| v.version).collect();
        let wanted_given = |failed: &[u64]| -> Vec<u64> {
            if held_back {
                return Vec::new();
            }
            let candidates: Vec<u64> = versions.iter().map(|v| v.version).filter(|v| !failed.contains(v)).collect();
            aspired(&policy, &candidates)
        };
        // Load what the policy wants. A version that fails to load is marked failed and the policy
        // is asked again, so that an older version can stand in; each round loads or fails one.
        loop {
            let wanted = wanted_given(&failed);
            let loaded = self.manager.loaded_versions(name);
            let Some(record) = versions.iter().find(|v| wanted.contains(&v.version) && !loaded.contains(&v.version))
            else {
                break;
            };
            let model = match preloaded.take_if(|(v, _)| *v == record.version) {
                Some((_, m)) => Ok(m),
                None => self.load_version(record).await,
            };
            match model {
                Ok(model) => {
                    // Recorded first: a version that takes traffic is never missing from the registry.
                    self.registry.set_state(name, record.version, VersionState::Ready, None).await?;
                    let stats = self.stats_for(name, record.version);
                    let scheduler = Scheduler::start(model, settings.batch_config(), stats);
                    let servable = Servable { name: name.into(), version: record.version, scheduler };
                    self.manager.install(name, record.version, Arc::new(servable));
                    tracing::info!(model = name, version = record.version, "ready");
                }
                Err(e) => {
                    tracing::error!(model = name, version = record.version, "load failed: {e}");
                    self.registry.set_state(name, record.version, VersionState::Failed, Some(&e.to_string())).await?;
                    failed.push(record.version);
                }
            }
        }
        let wanted = wanted_given(&failed);
        let loaded = self.manager.loaded_versions(name);
        if let Some(&newest) = wanted.iter().find(|v| loaded.contains(v)) {
            self.manager.set_default(name, newest);
        }
        for &v in loaded.iter().filter(|v| !wanted.contains(v)) {
            // In-flight requests hold the version until they are answered; it unloads after.
            self.manager.remove(name, v);
            tracing::info!(model = name, version = v, "unloaded");
        }
        // Stored versions that do not serve (superseded, not pinned, held back) say so.
        let loaded = self.manager.loaded_versions(name);
        for r in versions.iter().filter(|r| !loaded.contains(&r.version) && !failed.contains(&r.version)) {
            if matches!(r.state, VersionState::Loading | VersionState::Ready) {
                self.registry.set_state(name, r.version, VersionState::Unloaded, None).await?;
            }
        }
        Ok(())
    }

    fn stats_for(&self, name: &str, version: u64) -> Arc<Stats> {
        self.stats.lock().expect("stats lock").entry((name.to_string(), version)).or_default().clone()
    }

    /// Repository API: load the model's versions per policy again.
    pub async fn load_model(&self, name: &str) -> Result<(), ApiError> {
        let _guard = self.lifecycle.lock().await;
        self.registry.model(name).await?;
        self.unloaded.lock().expect("unloaded lock").remove(name);
        self.reconcile_locked(name, None).await?;
        if self.manager.default_version(name).is_none() {
            return Err(ApiError::BadRequest(format!("model {name:?} has no version that loads")));
        }
        Ok(())
    }

    /// Repository API: unload every version of the model (files are kept).
    pub async fn unload_model(&self, name: &str) -> Result<(), ApiError> {
        let _guard = self.lifecycle.lock().await;
        self.registry.model(name).await?;
        self.unloaded.lock().expect("unloaded lock").insert(name.to_string());
        self.reconcile_locked(name, None).await
    }

    pub async fn delete_version(&self, name: &str, version: u64) -> Result<VersionRecord, ApiError> {
        let _guard = self.lifecycle.lock().await;
        let record = self.registry.delete_version(name, version).await?;
        // The deleted version is no longer wanted: the next one loads before it is removed.
        self.reconcile_locked(name, None).await?;
        Ok(record)
    }
}
