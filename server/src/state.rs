//! The server's shared state and the lifecycle of versions: push, load, swap, unload.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use algolink_engine::{DeviceRequest, LoadOptions, Model, Scheduler, Stats, load_instances};
use algolink_registry::lifecycle::ModelPolicy;
use algolink_registry::lifecycle::rollout::Rollout;
use algolink_registry::lifecycle::stats::TrafficTotals;
use algolink_registry::policy::aspired;
use algolink_registry::{ArtifactLimits, Format, Manager, Registry, RegistryError, VersionRecord, VersionState};
use serde_json::{Value, json};
use tokio::io::AsyncRead;

use crate::config::Config;
use crate::error::ApiError;
use crate::lifecycle::{Assignments, LiveExperiment, Mark, Routing, ShadowStats, TrafficStats, build_routing, now_ms};

/// One loaded version's copies, one per executor instance.
type Instances = Vec<Arc<dyn Model>>;

/// Traffic marks per version.
pub(crate) type VersionMarks = BTreeMap<u64, Mark>;

/// A loaded version: its model behind a scheduler.
pub struct Servable {
    pub name: String,
    pub version: u64,
    pub scheduler: Scheduler,
    /// What the HTTP layer measured (kept across reloads, like `stats`).
    pub traffic: Arc<TrafficStats>,
    /// When it was installed.
    pub loaded_at_ms: u64,
}

impl Servable {
    pub fn stats(&self) -> &Arc<Stats> {
        self.scheduler.stats()
    }
}

pub struct AppState {
    pub config: Config,
    pub auth: crate::auth::Auth,
    pub registry: Registry,
    pub manager: Manager<Servable>,
    /// Counters per (model, version), kept after unload so Prometheus counters never go back.
    stats: Mutex<BTreeMap<(String, u64), Arc<Stats>>>,
    /// Models unloaded through the repository API: not loaded again until asked.
    unloaded: Mutex<HashSet<String>>,
    /// Serialises lifecycle changes (push, delete, load, unload, traffic) so two never interleave.
    pub(crate) lifecycle: tokio::sync::Mutex<()>,
    ready: AtomicBool,
    /// How requests naming no version are spread, per model with a route or a rollout.
    routes: RwLock<HashMap<String, Arc<Routing>>>,
    /// Aliases per model, for `/versions/{alias}` (the registry is the truth; refreshed on change).
    aliases: RwLock<HashMap<String, BTreeMap<String, u64>>>,
    traffic: Mutex<BTreeMap<(String, u64), Arc<TrafficStats>>>,
    shadows: Mutex<BTreeMap<(String, u64), Arc<ShadowStats>>>,
    /// Running experiments, by model.
    pub(crate) experiments: Mutex<HashMap<String, LiveExperiment>>,
    /// Held shared by a feedback from its registry write to its increment of the running totals,
    /// and exclusively by a refresh from its read of the registry's totals to their replacing the
    /// running ones: a refresh then never replaces totals with a read that misses an outcome
    /// already counted here (one reported 59 of 60 outcomes just acknowledged, on PostgreSQL), nor
    /// with one that an increment still to come would count twice.
    pub(crate) outcomes_gate: tokio::sync::RwLock<()>,
    pub(crate) assignments: Mutex<Assignments>,
    /// Current Thompson shares per model (route order), and when they were computed.
    pub(crate) thompson: Mutex<HashMap<String, (u64, Vec<f64>)>>,
    /// Traffic marks per loaded version at the start of the current retirement-gate window.
    pub(crate) gate_marks: Mutex<HashMap<String, (u64, VersionMarks)>>,
    /// Traffic marks (canary, control) at the start of the current rollout step.
    pub(crate) rollout_marks: Mutex<HashMap<String, (Mark, Mark)>>,
    /// Bounds the mirrored requests in flight: shadow work is dropped, never queued.
    pub shadow_slots: Arc<tokio::sync::Semaphore>,
    /// Wakes the webhook workers when an event is appended.
    pub events_appended: Arc<tokio::sync::Notify>,
    /// Other replicas sharing the registry, and what this one knows of them.
    pub replicas: Replicas,
    /// Traffic counters of the other replicas, summed per (model, version), as last read.
    elsewhere: RwLock<BTreeMap<(String, u64), TrafficTotals>>,
}

/// This replica among those sharing a registry (on PostgreSQL). On SQLite the registry belongs
/// to one process: nothing is shared and this replica always leads.
pub struct Replicas {
    /// This replica's name in shared records: the host name (a pod's name on Kubernetes) and
    /// a random suffix, new at every start.
    pub id: String,
    /// Whether other replicas may share the registry (it is on PostgreSQL).
    pub shared: bool,
    /// The newest event this replica has acted on.
    pub(crate) seen_event: AtomicU64,
    /// Events this replica appended itself and so need not act on again.
    pub(crate) own_events: Mutex<BTreeSet<u64>>,
    /// The request count of each (model, version) as last written to the registry.
    pub(crate) shared_requests: Mutex<HashMap<(String, u64), u64>>,
    /// Whether this replica held the leader lease at the last controller pass.
    pub leader: AtomicBool,
    /// When every model was last refreshed whatever the event log said.
    pub(crate) last_full_sync: Mutex<std::time::Instant>,
}

impl AppState {
    pub fn new(config: Config, registry: Registry) -> AppState {
        AppState {
            auth: crate::auth::Auth::new(config.auth_enabled(), std::time::Duration::from_millis(config.auth.cache_ms)),
            config,
            manager: Manager::default(),
            stats: Mutex::new(BTreeMap::new()),
            unloaded: Mutex::new(HashSet::new()),
            lifecycle: tokio::sync::Mutex::new(()),
            ready: AtomicBool::new(false),
            routes: RwLock::new(HashMap::new()),
            aliases: RwLock::new(HashMap::new()),
            traffic: Mutex::new(BTreeMap::new()),
            shadows: Mutex::new(BTreeMap::new()),
            experiments: Mutex::new(HashMap::new()),
            outcomes_gate: tokio::sync::RwLock::new(()),
            assignments: Mutex::new(Assignments::new(1_000_000)),
            thompson: Mutex::new(HashMap::new()),
            rollout_marks: Mutex::new(HashMap::new()),
            gate_marks: Mutex::new(HashMap::new()),
            shadow_slots: Arc::new(tokio::sync::Semaphore::new(64)),
            events_appended: Arc::new(tokio::sync::Notify::new()),
            replicas: Replicas {
                id: format!(
                    "{}-{:06x}",
                    std::env::var("HOSTNAME").unwrap_or_else(|_| "algolink".into()),
                    rand::random::<u32>() & 0xff_ffff
                ),
                shared: registry.dialect() == algolink_registry::Dialect::Postgres,
                seen_event: AtomicU64::new(0),
                own_events: Mutex::new(BTreeSet::new()),
                shared_requests: Mutex::new(HashMap::new()),
                leader: AtomicBool::new(false),
                last_full_sync: Mutex::new(std::time::Instant::now()),
            },
            elsewhere: RwLock::new(BTreeMap::new()),
            registry,
        }
    }

    /// The routing of a model's unversioned requests, when it has a route or a rollout.
    pub fn routing(&self, name: &str) -> Option<Arc<Routing>> {
        self.routes.read().expect("routes lock").get(name).cloned()
    }

    pub fn all_routings(&self) -> Vec<(String, Arc<Routing>)> {
        let routes = self.routes.read().expect("routes lock");
        let mut all: Vec<_> = routes.iter().map(|(n, r)| (n.clone(), r.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    pub fn all_shadow_stats(&self) -> Vec<((String, u64), Arc<ShadowStats>)> {
        self.shadows.lock().expect("shadow lock").iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Outcome totals per (model, experiment, version) of the running experiments.
    pub fn experiment_totals(&self) -> Vec<(String, u64, u64, algolink_registry::lifecycle::stats::Moments)> {
        let experiments = self.experiments.lock().expect("experiments lock");
        let mut out: Vec<_> = experiments
            .iter()
            .flat_map(|(name, live)| {
                live.experiment
                    .versions
                    .iter()
                    .map(|v| (name.clone(), live.experiment.id, *v, live.totals.get(v).copied().unwrap_or_default()))
            })
            .collect();
        out.sort_by(|a, b| (&a.0, a.2).cmp(&(&b.0, b.2)));
        out
    }

    /// The version an alias points at.
    pub fn alias(&self, name: &str, alias: &str) -> Option<u64> {
        self.aliases.read().expect("aliases lock").get(name).and_then(|a| a.get(alias).copied())
    }

    pub fn traffic_for(&self, name: &str, version: u64) -> Arc<TrafficStats> {
        self.traffic.lock().expect("traffic lock").entry((name.to_string(), version)).or_default().clone()
    }

    /// The traffic mark of a version over every replica (this one's counters now, the others'
    /// as last shared), if it ever took a request.
    pub fn traffic_mark(&self, name: &str, version: u64) -> Option<Mark> {
        let key = (name.to_string(), version);
        let local = self.traffic.lock().expect("traffic lock").get(&key).map(|t| t.mark());
        let elsewhere = self.elsewhere.read().expect("elsewhere lock").get(&key).cloned();
        match (local, elsewhere) {
            (None, None) => None,
            (local, elsewhere) => {
                let mut mark = local.unwrap_or_default();
                mark.add(&elsewhere.unwrap_or_default());
                Some(mark)
            }
        }
    }

    /// This replica's traffic counters per (model, version), as replicas share them.
    pub(crate) fn traffic_totals(&self) -> Vec<((String, u64), TrafficTotals)> {
        self.traffic.lock().expect("traffic lock").iter().map(|(k, t)| (k.clone(), t.mark())).collect()
    }

    pub(crate) fn set_elsewhere(&self, totals: BTreeMap<(String, u64), TrafficTotals>) {
        *self.elsewhere.write().expect("elsewhere lock") = totals;
    }

    /// `traffic_mark`, zero when the version never took a request: what lifecycle decisions judge.
    pub fn merged_mark(&self, name: &str, version: u64) -> Mark {
        self.traffic_mark(name, version).unwrap_or_default()
    }

    pub fn shadow_for(&self, name: &str, version: u64) -> Arc<ShadowStats> {
        self.shadows.lock().expect("shadow lock").entry((name.to_string(), version)).or_default().clone()
    }

    /// The last live or mirrored request a version served.
    pub fn last_request_ms(&self, name: &str, version: u64) -> Option<u64> {
        let key = (name.to_string(), version);
        let live = self.traffic.lock().expect("traffic lock").get(&key).and_then(|t| t.last_request_ms());
        let mirrored = self.shadows.lock().expect("shadow lock").get(&key).and_then(|s| s.traffic.last_request_ms());
        let elsewhere = self.elsewhere.read().expect("elsewhere lock").get(&key).and_then(|t| t.last_request_ms);
        live.max(mirrored).max(elsewhere)
    }

    /// The version answering most unversioned requests: a rollout's control, a route's first
    /// variant, or the default version.
    pub fn serving_version(&self, name: &str) -> Option<u64> {
        match self.routing(name) {
            Some(r) => r.fallback.or(Some(0)).and_then(|i| r.variants.get(i)).map(|v| v.version),
            None => self.manager.default_version(name),
        }
    }

    /// Appends to the event log (with the user whose request made the change, as `by`) and
    /// wakes the webhooks. A failure to record is logged, not returned: the change it describes
    /// has already happened.
    pub async fn event(&self, name: &str, version: Option<u64>, kind: &str, message: &str, mut detail: Value) {
        if let (Ok(by), Some(fields)) = (crate::auth::ACTOR.try_with(String::clone), detail.as_object_mut()) {
            fields.insert("by".into(), Value::String(by));
        }
        tracing::info!(model = name, version, kind, "{message}");
        match self.registry.append_event(name, version, kind, message, detail).await {
            Ok(e) => {
                if self.replicas.shared {
                    self.replicas.own_events.lock().expect("own events lock").insert(e.id);
                }
                self.events_appended.notify_waiters()
            }
            Err(e) => tracing::error!(model = name, kind, "could not record the event: {e}"),
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
        // What happened before is read below: only later events concern the sync.
        self.replicas.seen_event.store(self.registry.last_event_id().await?, Ordering::Release);
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
        self.load_experiments().await.map_err(|e| anyhow::anyhow!("loading experiments: {e}"))?;
        for model in self.registry.models().await? {
            self.apply_config(&model.name).await.map_err(|e| anyhow::anyhow!("[models.{}]: {e}", model.name))?;
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
        let by = crate::auth::ACTOR.try_with(String::clone).ok();
        let record = self.registry.add_version(name, staged, format, VersionState::Loading, by.as_deref()).await?;
        let detail = json!({ "sha256": record.sha256, "size": record.size, "format": record.format });
        self.event(name, Some(record.version), "pushed", &format!("version {} pushed", record.version), detail).await;
        self.unloaded.lock().expect("unloaded lock").remove(name);
        if record.version == 1 {
            // A new model takes the config's route, retirement and rollout settings.
            self.apply_config_locked(name).await?;
        }
        // A model with a rollout policy takes new versions as canaries against what serves now.
        let mut policy = self.registry.policy(name).await?;
        if let (Some(rp), None, Some(control)) =
            (policy.rollout.clone(), &policy.active_rollout, self.serving_version(name))
        {
            let rollout = Rollout::start(record.version, control, rp, policy.route.clone(), now_ms());
            policy.active_rollout = Some(rollout.clone());
            self.registry.set_policy(name, &policy).await?;
            self.rollout_started(name, &rollout).await;
        }
        self.reconcile_locked(name, Some((record.version, model))).await?;
        Ok(self.registry.version(name, record.version).await?)
    }

    /// Loads the version's files as the model's settings say: one copy per executor instance.
    async fn load_files(&self, name: &str, files: algolink_engine::ModelFiles) -> Result<Instances, ApiError> {
        let settings = self.config.settings_for(name);
        let request = settings.device();
        let options = LoadOptions {
            device: request.resolve()?,
            cpu_fallback: request == DeviceRequest::Auto,
            warmup_batch_sizes: settings.warmup_batch_sizes.clone(),
            max_batch_size: settings.max_batch_size,
            onnx_backend: settings.onnx_backend,
            copies: 1,
            measure_lanes: settings.batch_config().measures_lanes(settings.instances),
        };
        let instances = settings.instances;
        tokio::task::spawn_blocking(move || load_instances(&files, &options, instances))
            .await
            .map_err(|e| ApiError::Internal(format!("loader crashed: {e}")))?
            .map_err(ApiError::from)
    }

    async fn load_version(&self, record: &VersionRecord) -> Result<Instances, ApiError> {
        let files = self.registry.files(record, self.artifact_limits()).await?;
        self.load_files(&record.name, files).await
    }

    /// Brings the loaded versions of `name` in line with its policy (availability-preserving:
    /// new versions are loaded and take traffic before old ones are removed).
    pub async fn reconcile(&self, name: &str, preloaded: Option<(u64, Instances)>) -> Result<(), ApiError> {
        let _guard = self.lifecycle.lock().await;
        self.reconcile_locked(name, preloaded).await
    }

    pub(crate) async fn reconcile_locked(
        &self,
        name: &str,
        mut preloaded: Option<(u64, Instances)>,
    ) -> Result<(), ApiError> {
        let settings = self.config.settings_for(name);
        let (versions, aliases) = match self.registry.model(name).await {
            Ok(m) => (m.versions, m.aliases),
            Err(RegistryError::ModelNotFound(_)) => (Vec::new(), BTreeMap::new()),
            Err(e) => return Err(e.into()),
        };
        let policy = if versions.is_empty() { ModelPolicy::default() } else { self.registry.policy(name).await? };
        let version_policy = policy.version_policy.clone().unwrap_or_else(|| settings.version_policy.policy());
        let held_back = self.unloaded.lock().expect("unloaded lock").contains(name);
        let mut failed: Vec<u64> = versions.iter().filter(|v| !v.state.servable()).map(|v| v.version).collect();
        let referenced = referenced_versions(&policy, &aliases);
        let aspired_given = |failed: &[u64]| -> Vec<u64> {
            if held_back {
                return Vec::new();
            }
            let candidates: Vec<u64> = versions.iter().map(|v| v.version).filter(|v| !failed.contains(v)).collect();
            aspired(&version_policy, &candidates)
        };
        // The policy's versions, then those a route, a rollout or an alias names.
        let wanted_given = |failed: &[u64]| -> Vec<u64> {
            let mut wanted = aspired_given(failed);
            if !held_back {
                for &r in &referenced {
                    if versions.iter().any(|v| v.version == r) && !failed.contains(&r) && !wanted.contains(&r) {
                        wanted.push(r);
                    }
                }
            }
            wanted
        };
        // Load what is wanted. A version that fails to load is marked failed and the policy is
        // asked again, so that an older version can stand in; each round loads or fails one.
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
                    let servable = Servable {
                        name: name.into(),
                        version: record.version,
                        scheduler,
                        traffic: self.traffic_for(name, record.version),
                        loaded_at_ms: now_ms(),
                    };
                    self.manager.install(name, record.version, Arc::new(servable));
                    self.event(
                        name,
                        Some(record.version),
                        "ready",
                        &format!("version {} loaded and warmed up", record.version),
                        Value::Null,
                    )
                    .await;
                }
                Err(e) => {
                    tracing::error!(model = name, version = record.version, "load failed: {e}");
                    self.registry.set_state(name, record.version, VersionState::Failed, Some(&e.to_string())).await?;
                    self.event(
                        name,
                        Some(record.version),
                        "failed",
                        &format!("version {} failed to load: {e}", record.version),
                        Value::Null,
                    )
                    .await;
                    failed.push(record.version);
                }
            }
        }
        let wanted = wanted_given(&failed);
        let loaded = self.manager.loaded_versions(name);
        // The default answers unversioned requests when no routing does, and names the model's
        // version in its metadata: during a rollout, the control, never the canary being judged.
        let control = policy.active_rollout.as_ref().map(|r| r.control).filter(|v| wanted.contains(v));
        let default = control
            .into_iter()
            .chain(aspired_given(&failed))
            .chain(wanted.iter().copied())
            .find(|v| loaded.contains(v));
        let set_default = || {
            if let Some(default) = default {
                self.manager.set_default(name, default);
            }
        };
        // Traffic moves without a gap: a new routing is in place before the default version
        // changes under it, the default is right before a routing is removed, and both before
        // anything they no longer use is unloaded.
        self.aliases.write().expect("aliases lock").insert(name.to_string(), aliases.clone());
        let routing = self.build_routing_of(name, &policy, &aliases, |v| wanted.contains(&v));
        if routing.is_some() {
            self.put_routing(name, routing);
            set_default();
        } else {
            set_default();
            self.put_routing(name, None);
        }
        for &v in loaded.iter().filter(|v| !wanted.contains(v)) {
            // In-flight requests hold the version until they are answered; it unloads after.
            self.manager.remove(name, v);
            self.event(name, Some(v), "unloaded", &format!("version {v} unloaded"), Value::Null).await;
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

    /// Rebuilds the routing of a model's unversioned requests from its policy and what is loaded.
    pub(crate) fn install_routing(&self, name: &str, policy: &ModelPolicy, aliases: &BTreeMap<String, u64>) {
        self.put_routing(name, self.build_routing_of(name, policy, aliases, |_| true));
    }

    /// The routing of a model from its policy, using only the loaded versions that `keep` accepts
    /// (those that stay loaded: the routing holds their handles).
    fn build_routing_of(
        &self,
        name: &str,
        policy: &ModelPolicy,
        aliases: &BTreeMap<String, u64>,
        keep: impl Fn(u64) -> bool,
    ) -> Option<Routing> {
        let experiment = self.experiments.lock().expect("experiments lock").get(name).map(|l| l.experiment.clone());
        let shares = self.thompson.lock().expect("thompson lock").get(name).map(|(_, s)| s.clone());
        build_routing(policy, aliases, experiment.as_ref(), shares.as_deref(), |v| {
            keep(v).then(|| self.manager.get(name, Some(v)).map(|(_, s)| s)).flatten()
        })
    }

    fn put_routing(&self, name: &str, routing: Option<Routing>) {
        let mut routes = self.routes.write().expect("routes lock");
        match routing {
            Some(r) => routes.insert(name.to_string(), Arc::new(r)),
            None => routes.remove(name),
        };
    }

    /// Records the start of a rollout (event and the first step's traffic marks).
    pub(crate) async fn rollout_started(&self, name: &str, r: &Rollout) {
        self.mark_rollout_step(name, r);
        let message = format!(
            "version {} enters as a canary at {}% against version {} (step {}% every {} s up to {}%)",
            r.canary, r.weight, r.control, r.policy.step, r.policy.interval_s, r.policy.max_weight
        );
        self.event(name, Some(r.canary), "rollout_started", &message, json!({ "rollout": r })).await;
    }

    pub(crate) fn mark_rollout_step(&self, name: &str, r: &Rollout) {
        let marks = (self.merged_mark(name, r.canary), self.merged_mark(name, r.control));
        self.rollout_marks.lock().expect("marks lock").insert(name.to_string(), marks);
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
        self.event(name, Some(version), "deleted", &format!("version {version} deleted"), Value::Null).await;
        // The deleted version is no longer wanted: the next one loads before it is removed.
        self.reconcile_locked(name, None).await?;
        Ok(record)
    }
}

/// Versions a policy or an alias names, so they stay loaded: route variants and shadow, the
/// rollout's canary and control, alias targets.
fn referenced_versions(policy: &ModelPolicy, aliases: &BTreeMap<String, u64>) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    if let Some(r) = &policy.route {
        out.extend(r.targets().filter_map(|t| t.resolve(aliases)));
    }
    if let Some(r) = &policy.active_rollout {
        out.extend([r.control, r.canary]);
    }
    out.extend(aliases.values().copied());
    out.sort_unstable();
    out.dedup();
    out
}
