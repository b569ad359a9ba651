//! Lifecycle operations on the server state (aliases, routes, rollouts, experiments, feedback,
//! retirement) and the controller that applies the registry's policies once per tick.
//!
//! Every change that moves traffic holds the lifecycle lock, records the registry first, then
//! reconciles: versions a new route needs are loaded before the routing switches, and versions it
//! no longer needs are removed after (requests in flight finish on the handle they hold).

use std::collections::{BTreeMap, HashMap};

use algolink_registry::lifecycle::retire::retirements;
use algolink_registry::lifecycle::rollout::Rollout;
use algolink_registry::lifecycle::rollout::{self, Action, GateResult, Gates, RolloutPolicy, Window, check_gates};
use algolink_registry::lifecycle::route::{RouteSpec, Strategy, Target};
use algolink_registry::lifecycle::stats::{Comparison, LatencySnapshot, Verdict};
use algolink_registry::lifecycle::{Experiment, ExperimentSpec, ExperimentState, ModelPolicy};
use algolink_registry::{ModelRecord, VersionState};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::lifecycle::{LiveExperiment, Mark, now_ms, version_facts};
use crate::state::AppState;

/// How `set_policy_locked` is told a change comes from the config file.
const FROM_CONFIG: &str = " from the config file";

/// An outcome reported after the fact for a request (by its id) or a routing key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Feedback {
    pub model: String,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub key: Option<String>,
    /// The version that served the request (the response's `model_version`), when known.
    #[serde(default)]
    pub version: Option<u64>,
    pub value: f64,
}

/// What `PATCH /v1/models/{name}/versions/{version}` may change.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionPatch {
    pub tags: Option<Vec<String>>,
    /// Seconds from now until the version retires; `null` clears it.
    #[serde(default, deserialize_with = "some")]
    pub ttl_s: Option<Option<f64>>,
}

impl VersionPatch {
    /// Refuses what the registry would refuse, before anything is written.
    pub fn check(&self) -> Result<(), ApiError> {
        const CENTURY_S: f64 = 100.0 * 365.25 * 86400.0;
        if let Some(Some(t)) = self.ttl_s
            && !(0.0..=CENTURY_S).contains(&t)
        {
            return Err(ApiError::BadRequest(format!("ttl_s must be between 0 and {CENTURY_S} seconds, or null")));
        }
        if let Some(bad) = self.tags.iter().flatten().find(|t| t.is_empty() || t.len() > 128 || t.contains('\n')) {
            return Err(ApiError::BadRequest(format!("invalid tag {bad:?}: 1-128 characters, one line")));
        }
        Ok(())
    }
}

fn some<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<f64>>, D::Error> {
    Option::<f64>::deserialize(d).map(Some)
}

/// A request to start a rollout by hand.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutRequest {
    pub canary: Target,
    #[serde(default)]
    pub control: Option<Target>,
    /// Default: the model's rollout policy, else the defaults.
    #[serde(default)]
    pub policy: Option<RolloutPolicy>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conclusion {
    /// The version to promote; default: the variant the test found best.
    #[serde(default)]
    pub winner: Option<u64>,
    /// The alias moved to the winner.
    #[serde(default)]
    pub alias: Option<String>,
}

impl AppState {
    fn resolve(&self, name: &str, aliases: &BTreeMap<String, u64>, t: &Target) -> Result<u64, ApiError> {
        t.resolve(aliases)
            .ok_or_else(|| ApiError::BadRequest(format!("model {name:?} has no alias {:?}", t.to_string())))
    }

    /// Checks that every target of a policy names a servable version.
    fn check_targets(&self, m: &ModelRecord, policy: &ModelPolicy) -> Result<(), ApiError> {
        let Some(route) = &policy.route else { return Ok(()) };
        for t in route.targets() {
            let v = self.resolve(&m.name, &m.aliases, t)?;
            let record = m.versions.iter().find(|r| r.version == v).ok_or_else(|| {
                ApiError::BadRequest(format!("model {:?} has no version {v} (route target {t})", m.name))
            })?;
            if !record.state.servable() {
                return Err(ApiError::Conflict(format!(
                    "route target {t} is version {v}, which is {}{}",
                    record.state.as_str(),
                    record.reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default()
                )));
            }
        }
        Ok(())
    }

    pub async fn set_alias(&self, name: &str, alias: &str, version: u64) -> Result<Value, ApiError> {
        let _guard = self.lifecycle.lock().await;
        let before = self.registry.set_alias(name, alias, version).await?;
        let was = before.map(|b| format!(" (was {b})")).unwrap_or_default();
        let message = format!("alias {alias} now points at version {version}{was}");
        self.event(name, Some(version), "alias", &message, json!({ "alias": alias, "previous": before })).await;
        self.reconcile_locked(name, None).await?;
        Ok(json!({ "model": name, "alias": alias, "version": version, "previous": before }))
    }

    pub async fn delete_alias(&self, name: &str, alias: &str) -> Result<Value, ApiError> {
        let _guard = self.lifecycle.lock().await;
        let version = self.registry.delete_alias(name, alias).await?;
        self.event(
            name,
            Some(version),
            "alias",
            &format!("alias {alias} removed (was {version})"),
            json!({ "alias": alias }),
        )
        .await;
        self.reconcile_locked(name, None).await?;
        Ok(json!({ "model": name, "alias": alias, "deleted": true }))
    }

    pub async fn patch_version(&self, name: &str, version: u64, patch: VersionPatch) -> Result<Value, ApiError> {
        patch.check()?;
        let _guard = self.lifecycle.lock().await;
        if let Some(tags) = &patch.tags {
            self.registry.set_tags(name, version, tags).await?;
        }
        if let Some(ttl) = patch.ttl_s {
            let expires = ttl.map(|t| now_ms().saturating_add((t * 1e3) as u64));
            self.registry.set_expiry(name, version, expires).await?;
            let message = match ttl {
                Some(t) => format!("version {version} retires in {t} s"),
                None => format!("version {version} has no time-to-live"),
            };
            self.event(name, Some(version), "policy", &message, json!({ "expires_at_ms": expires })).await;
        }
        Ok(serde_json::to_value(self.registry.version(name, version).await?).unwrap_or(Value::Null))
    }

    /// Replaces the model's policy document (version policy, route, retirement rules, rollout
    /// policy). A rollout in progress is kept.
    pub async fn set_policy(&self, name: &str, mut policy: ModelPolicy, source: &str) -> Result<Value, ApiError> {
        let _guard = self.lifecycle.lock().await;
        self.set_policy_locked(name, &mut policy, source).await?;
        self.reconcile_locked(name, None).await?;
        Ok(serde_json::to_value(&policy).unwrap_or(Value::Null))
    }

    /// Records a policy (the caller reconciles).
    async fn set_policy_locked(&self, name: &str, policy: &mut ModelPolicy, source: &str) -> Result<(), ApiError> {
        policy.validate()?;
        let m = self.registry.model(name).await?;
        let from_config = source == FROM_CONFIG;
        if !from_config {
            // The config may name aliases and versions that do not exist yet: they route nothing
            // until they do. The API refuses them.
            self.check_targets(&m, policy)?;
        }
        let before = self.registry.policy(name).await?;
        policy.active_rollout = before.active_rollout.clone();
        if let Some(r) = policy.active_rollout.as_mut()
            && policy.route != before.route
        {
            if !from_config {
                return Err(ApiError::Conflict(format!(
                    "model {name:?} has a rollout in progress: it owns the traffic until it is promoted or rolled back"
                )));
            }
            // The rollout restores this route when it ends.
            r.route_before = policy.route.take();
            policy.route = before.route.clone();
        }
        if *policy == before {
            return Ok(());
        }
        if policy.route != before.route {
            self.thompson.lock().expect("thompson lock").remove(name);
        }
        self.registry.set_policy(name, policy).await?;
        if policy.route != before.route {
            let message = match &policy.route {
                Some(r) => format!("route set{source}: {}", describe_route(r)),
                None => format!("route removed{source}: requests go to the newest version"),
            };
            self.event(name, None, "traffic", &message, json!({ "route": policy.route, "previous": before.route }))
                .await;
        }
        if (&policy.version_policy, &policy.retirement, &policy.rollout)
            != (&before.version_policy, &before.retirement, &before.rollout)
        {
            let detail = json!({ "version_policy": policy.version_policy, "retirement": policy.retirement, "rollout": policy.rollout });
            self.event(name, None, "policy", &format!("policy changed{source}"), detail).await;
        }
        Ok(())
    }

    /// Sets or clears the model's route, keeping the rest of its policy.
    pub async fn set_route(&self, name: &str, route: Option<RouteSpec>) -> Result<Value, ApiError> {
        let _guard = self.lifecycle.lock().await;
        let mut policy = self.registry.policy(name).await?;
        policy.route = route;
        self.set_policy_locked(name, &mut policy, "").await?;
        self.reconcile_locked(name, None).await?;
        Ok(json!({ "model": name, "route": policy.route }))
    }

    /// Applies the config file's `[models.NAME]` route, retirement and rollout settings to the
    /// registry (the config wins over what the API set before the restart). The caller reconciles.
    pub async fn apply_config(&self, name: &str) -> Result<(), ApiError> {
        let _guard = self.lifecycle.lock().await;
        self.apply_config_locked(name).await
    }

    pub(crate) async fn apply_config_locked(&self, name: &str) -> Result<(), ApiError> {
        let Some(o) = self.config.models.get(name) else { return Ok(()) };
        if o.route.is_none() && o.retirement.is_none() && o.rollout.is_none() {
            return Ok(());
        }
        let mut policy = self.registry.policy(name).await?;
        if let Some(r) = &o.route {
            policy.route = Some(r.clone());
        }
        if let Some(r) = &o.retirement {
            policy.retirement = r.clone();
        }
        if let Some(r) = &o.rollout {
            policy.rollout = Some(r.clone());
        }
        self.set_policy_locked(name, &mut policy, FROM_CONFIG).await
    }

    pub async fn start_rollout(&self, name: &str, req: RolloutRequest) -> Result<Value, ApiError> {
        let _guard = self.lifecycle.lock().await;
        let m = self.registry.model(name).await?;
        let mut policy = self.registry.policy(name).await?;
        if let Some(r) = &policy.active_rollout {
            return Err(ApiError::Conflict(format!("version {} of {name:?} is already a canary", r.canary)));
        }
        let canary = self.resolve(name, &m.aliases, &req.canary)?;
        let control = match &req.control {
            Some(t) => self.resolve(name, &m.aliases, t)?,
            None => self
                .serving_version(name)
                .ok_or_else(|| ApiError::Conflict(format!("model {name:?} serves no version to compare with")))?,
        };
        if canary == control {
            return Err(ApiError::BadRequest(format!("the canary and the control are both version {canary}")));
        }
        for v in [canary, control] {
            let r = self.registry.version(name, v).await?;
            if !r.state.servable() {
                return Err(ApiError::Conflict(format!("version {v} is {}", r.state.as_str())));
            }
        }
        let rp = req.policy.or_else(|| policy.rollout.clone()).unwrap_or_default();
        rp.validate()?;
        let rollout = Rollout::start(canary, control, rp, policy.route.clone(), now_ms());
        policy.active_rollout = Some(rollout.clone());
        self.registry.set_policy(name, &policy).await?;
        self.rollout_started(name, &rollout).await;
        self.reconcile_locked(name, None).await?;
        Ok(json!({ "model": name, "rollout": rollout }))
    }

    /// Under a rollout policy, a version pushed while another was a canary waits; when that
    /// rollout ends, the newest such version enters as the next canary against what serves.
    async fn next_canary_locked(&self, name: &str, policy: &mut ModelPolicy, serving: u64) -> Result<(), ApiError> {
        let Some(rp) = policy.rollout.clone() else { return Ok(()) };
        let newest =
            self.registry.model(name).await?.versions.iter().filter(|v| v.state.servable()).map(|v| v.version).max();
        if let Some(next) = newest.filter(|&v| v > serving) {
            let rollout = Rollout::start(next, serving, rp, policy.route.clone(), now_ms());
            policy.active_rollout = Some(rollout.clone());
            self.registry.set_policy(name, policy).await?;
            self.rollout_started(name, &rollout).await;
        }
        Ok(())
    }

    /// Ends the rollout in progress (only if its canary is `expected`, when given): promotion
    /// moves the `champion` alias, and any alias the route reached the control by, to the canary
    /// and gives it the control's traffic; rollback rejects the canary and restores the route.
    pub async fn finish_rollout(
        &self,
        name: &str,
        expected: Option<u64>,
        promote: bool,
        why: &str,
        detail: Value,
    ) -> Result<Value, ApiError> {
        let _guard = self.lifecycle.lock().await;
        let mut policy = self.registry.policy(name).await?;
        let Some(r) = policy.active_rollout.take_if(|r| expected.is_none_or(|e| e == r.canary)) else {
            return Err(ApiError::Conflict(format!("model {name:?} has no rollout of that canary in progress")));
        };
        self.rollout_marks.lock().expect("marks lock").remove(name);
        let serving = if promote {
            // Aliases first: a crash before the policy is written leaves the rollout active, and
            // promoting it again is harmless.
            let aliases = self.registry.aliases(name).await?;
            let mut moved = vec!["champion".to_string()];
            for v in r.route_before.iter().flat_map(|route| route.targets()) {
                if let Target::Alias(a) = v
                    && aliases.get(a) == Some(&r.control)
                    && !moved.contains(a)
                {
                    moved.push(a.clone());
                }
            }
            for a in &moved {
                self.registry.set_alias(name, a, r.canary).await?;
            }
            policy.route = match r.route_before.clone() {
                Some(mut route) => {
                    for v in &mut route.variants {
                        if v.target == Target::Version(r.control) {
                            v.target = Target::Version(r.canary);
                        }
                    }
                    Some(route)
                }
                None => {
                    let newest = self
                        .registry
                        .model(name)
                        .await?
                        .versions
                        .iter()
                        .filter(|v| v.state.servable())
                        .map(|v| v.version)
                        .max();
                    (newest != Some(r.canary)).then(|| RouteSpec::single(Target::Version(r.canary)))
                }
            };
            self.registry.set_policy(name, &policy).await?;
            let message = format!(
                "version {} promoted over version {}: {why}; alias {} now points at it",
                r.canary,
                r.control,
                moved.join(", ")
            );
            self.event(
                name,
                Some(r.canary),
                "promoted",
                &message,
                json!({ "rollout": r, "aliases": moved, "windows": detail }),
            )
            .await;
            r.canary
        } else {
            policy.route = r.route_before.clone();
            self.registry.take_out_of_service(name, r.canary, VersionState::Rejected, why).await?;
            self.registry.set_policy(name, &policy).await?;
            let message = format!("version {} rolled back to version {}: {why}", r.canary, r.control);
            self.event(name, Some(r.canary), "rolled_back", &message, json!({ "rollout": r, "windows": detail })).await;
            r.control
        };
        self.next_canary_locked(name, &mut policy, serving).await?;
        self.reconcile_locked(name, None).await?;
        Ok(json!({ "model": name, "canary": r.canary, "promoted": promote, "reason": why }))
    }

    pub async fn start_experiment(&self, name: &str, spec: ExperimentSpec) -> Result<Value, ApiError> {
        let _guard = self.lifecycle.lock().await;
        let m = self.registry.model(name).await?;
        let routing = self.routing(name).ok_or_else(|| {
            ApiError::Conflict(format!("model {name:?} has no route: set one with the variants to compare first"))
        })?;
        let mut versions: Vec<u64> = Vec::new();
        for v in &routing.variants {
            if !versions.contains(&v.version) {
                versions.push(v.version);
            }
        }
        if versions.len() < 2 {
            return Err(ApiError::Conflict(format!("the route of {name:?} has one variant: nothing to compare")));
        }
        let control = match &spec.control {
            Some(t) => self.resolve(name, &m.aliases, t)?,
            None => routing.variants[routing.fallback.unwrap_or(0)].version,
        };
        if !versions.contains(&control) {
            return Err(ApiError::BadRequest(format!("control version {control} is not a variant of the route")));
        }
        let e = Experiment {
            id: 0,
            model: name.into(),
            goal: spec.goal,
            test: spec.test,
            control,
            versions: versions.clone(),
            state: ExperimentState::Running,
            started_ms: now_ms(),
            ended_ms: None,
            conclusion: None,
            decisions: Default::default(),
        };
        let e = self.registry.create_experiment(e).await?;
        if self.replicas.shared {
            // The window starts with the other replicas' counters as fresh as they come.
            self.share_traffic().await?;
        }
        let start_marks = versions.iter().map(|&v| (v, self.merged_mark(name, v))).collect();
        let live = LiveExperiment::new(e.clone(), BTreeMap::new(), start_marks);
        self.experiments.lock().expect("experiments lock").insert(name.to_string(), live);
        let policy = self.registry.policy(name).await?;
        self.install_routing(name, &policy, &m.aliases);
        let message =
            format!("experiment {} started: {:?} of versions {versions:?} against version {control}", e.id, e.goal);
        self.event(name, None, "experiment", &message, json!({ "experiment": e })).await;
        Ok(serde_json::to_value(&e).unwrap_or(Value::Null))
    }

    /// Loads the running experiments and their outcome totals (at start-up).
    pub async fn load_experiments(&self) -> Result<(), ApiError> {
        for e in self.registry.experiments(None).await? {
            if e.state != ExperimentState::Running {
                continue;
            }
            let totals = self.registry.outcome_totals(e.id).await?;
            let live = LiveExperiment::new(e.clone(), totals, BTreeMap::new());
            self.experiments.lock().expect("experiments lock").insert(e.model.clone(), live);
        }
        Ok(())
    }

    pub async fn experiment_report(&self, id: u64) -> Result<Value, ApiError> {
        let e = self.registry.experiment(id).await?;
        self.report_of(&e).await
    }

    /// The live report of a running experiment, or one rebuilt from its recorded outcomes.
    async fn report_of(&self, e: &Experiment) -> Result<Value, ApiError> {
        let traffic = |v: u64| self.traffic_mark(&e.model, v);
        if let Some(live) =
            self.experiments.lock().expect("experiments lock").get_mut(&e.model).filter(|l| l.experiment.id == e.id)
        {
            return Ok(live.report(traffic));
        }
        let totals = self.registry.outcome_totals(e.id).await?;
        Ok(LiveExperiment::new(e.clone(), totals, BTreeMap::new()).report(traffic))
    }

    /// Stops an experiment; with `conclusion`, also promotes the winner by moving an alias.
    pub async fn end_experiment(&self, id: u64, conclusion: Option<Conclusion>) -> Result<Value, ApiError> {
        let _guard = self.lifecycle.lock().await;
        let mut e = self.registry.experiment(id).await?;
        if e.state != ExperimentState::Running {
            return Err(ApiError::Conflict(format!("experiment {id} is already {:?}", e.state).to_lowercase()));
        }
        let name = e.model.clone();
        let report = self.report_of(&e).await?;
        let mut winner = None;
        if let Some(c) = &conclusion {
            let w = match c.winner {
                Some(w) if e.versions.contains(&w) => w,
                Some(w) => return Err(ApiError::BadRequest(format!("version {w} is not a variant of experiment {id}"))),
                None => best_variant(&report).ok_or_else(|| {
                    ApiError::Conflict(format!(
                        "no variant of experiment {id} is better than the control yet; name the winner to conclude anyway"
                    ))
                })?,
            };
            winner = Some(w);
        }
        let alias = conclusion.and_then(|c| c.alias).unwrap_or_else(|| "champion".into());
        // The alias moves first: if it cannot (a bad name, a retired winner), nothing changed.
        if let Some(w) = winner {
            self.registry.set_alias(&name, &alias, w).await?;
        }
        if let Some(live) =
            self.experiments.lock().expect("experiments lock").get(&name).filter(|l| l.experiment.id == id)
        {
            e.decisions = live.experiment.decisions.clone();
        }
        e.state = if winner.is_some() { ExperimentState::Concluded } else { ExperimentState::Stopped };
        e.ended_ms = Some(now_ms());
        e.conclusion = winner.map(|w| format!("version {w} won"));
        self.registry.update_experiment(&e).await?;
        self.experiments.lock().expect("experiments lock").remove(&name);
        self.thompson.lock().expect("thompson lock").remove(&name);
        let message = match winner {
            Some(w) => format!("experiment {id} concluded: version {w} wins; alias {alias} now points at it"),
            None => format!("experiment {id} stopped"),
        };
        self.event(&name, winner, "experiment", &message, json!({ "experiment": e, "report": report })).await;
        self.reconcile_locked(&name, None).await?;
        Ok(json!({ "experiment": e, "report": report }))
    }

    /// Records business outcomes, joined to the variant that served each request. All or nothing:
    /// one bad item refuses the batch.
    pub async fn feedback(&self, items: Vec<Feedback>) -> Result<Value, ApiError> {
        if items.is_empty() {
            return Err(ApiError::BadRequest("no feedback given".into()));
        }
        // Per experiment: its model and the outcomes (request, version, value).
        type Outcomes = Vec<(String, u64, f64)>;
        let mut batches: HashMap<u64, (String, Outcomes)> = HashMap::new();
        for (i, f) in items.iter().enumerate() {
            let at = if items.len() > 1 { format!("feedback[{i}]: ") } else { String::new() };
            let request = match (&f.id, &f.key) {
                (Some(id), None) => format!("id:{id}"),
                (None, Some(key)) => format!("key:{key}"),
                _ => {
                    return Err(ApiError::BadRequest(format!(
                        "{at}give exactly one of \"id\" (the request id) or \"key\" (the routing key)"
                    )));
                }
            };
            let raw = f.id.as_deref().or(f.key.as_deref()).unwrap_or_default();
            let experiments = self.experiments.lock().expect("experiments lock");
            let live = experiments.get(&f.model).ok_or_else(|| {
                ApiError::Conflict(format!("{at}model {:?} has no running experiment to record outcomes for", f.model))
            })?;
            let e = &live.experiment;
            if !e.goal.accepts(f.value) {
                return Err(ApiError::BadRequest(
                    format!("{at}value {} is not a valid {:?} outcome (conversions are 0 or 1)", f.value, e.goal)
                        .to_lowercase(),
                ));
            }
            let version = match f.version {
                Some(v) if e.versions.contains(&v) => v,
                Some(v) => {
                    return Err(ApiError::BadRequest(format!(
                        "{at}version {v} is not a variant of experiment {}",
                        e.id
                    )));
                }
                None => match self.assignments.lock().expect("assignments lock").get(&f.model, raw) {
                    Some((exp, v)) if exp == e.id => v,
                    Some((exp, _)) => {
                        return Err(ApiError::Conflict(format!(
                            "{at}{request} was served under experiment {exp}, which is no longer running"
                        )));
                    }
                    None => {
                        return Err(ApiError::NotFound(format!(
                            "{at}no record of which variant served {request} (not routed under experiment {}, served by another replica, or too long ago): send \"version\", the response's model_version",
                            e.id
                        )));
                    }
                },
            };
            batches.entry(e.id).or_insert_with(|| (f.model.clone(), Vec::new())).1.push((request, version, f.value));
        }
        let (mut recorded, mut duplicates) = (0, 0);
        for (exp, (model, outcomes)) in batches {
            let _gate = self.outcomes_gate.read().await;
            let fresh = self.registry.record_outcomes(exp, &outcomes).await?;
            let mut experiments = self.experiments.lock().expect("experiments lock");
            let mut live = experiments.get_mut(&model).filter(|l| l.experiment.id == exp);
            for ((_, version, value), new) in outcomes.iter().zip(&fresh) {
                if *new {
                    recorded += 1;
                    if let Some(live) = live.as_deref_mut() {
                        live.totals.entry(*version).or_default().add(*value);
                    }
                } else {
                    duplicates += 1;
                }
            }
        }
        Ok(json!({ "recorded": recorded, "duplicates": duplicates }))
    }

    /// One controller pass over every model: bandit shares, then (on the leader) experiment
    /// verdicts, rollout steps and retirement.
    pub async fn tick(&self, leader: bool) {
        let models = match self.registry.models().await {
            Ok(m) => m,
            Err(e) => return tracing::error!("lifecycle controller: {e}"),
        };
        for m in models {
            if let Err(e) = self.tick_model(&m, leader).await {
                tracing::error!(model = %m.name, "lifecycle controller: {e}");
            }
        }
    }

    async fn tick_model(&self, m: &ModelRecord, leader: bool) -> Result<(), ApiError> {
        let name = &m.name;
        let policy = self.registry.policy(name).await?;
        // Every replica keeps its own bandit shares (from the shared outcome totals); only the
        // leader decides.
        self.reshare_if_due(name, &policy).await?;
        if !leader {
            return Ok(());
        }
        let (verdicts, decided, control) = match self.experiments.lock().expect("experiments lock").get_mut(name) {
            Some(live) => {
                let verdicts = live.compare();
                let decided = live.take_unsaved();
                let control = live.experiment.control;
                (verdicts, (!decided.is_empty()).then(|| (live.experiment.clone(), decided)), Some(control))
            }
            None => (BTreeMap::new(), None, None),
        };
        if let Some((e, versions)) = decided {
            // A decision stands: recorded so that a restart keeps it.
            self.registry.update_experiment(&e).await?;
            for v in versions {
                let d = e.decisions[&v];
                let message = format!(
                    "experiment {}: version {v} is {} than version {} (difference {:.4}, always-valid p = {:.5})",
                    e.id,
                    if d.verdict == Verdict::Better { "better" } else { "worse" },
                    e.control,
                    d.difference,
                    d.p_value
                );
                self.event(name, Some(v), "experiment", &message, json!({ "experiment": e.id, "decision": d })).await;
            }
        }
        if let Some(r) = &policy.active_rollout {
            return self.step_rollout(name, r, verdicts.get(&r.canary).map(|(_, v)| *v)).await;
        }
        let mut lost = experiment_losers(control, &verdicts);
        let loaded = self.manager.loaded_versions(name);
        if let Some(gates) = policy.retirement.gates.as_ref().filter(|_| policy.retirement.on_loss) {
            lost.extend(self.gate_losses(name, &loaded, gates, policy.retirement.gate_window_s));
        }
        let facts = version_facts(
            &m.versions,
            &loaded,
            |v| self.manager.get(name, Some(v)).map(|(_, s)| s.loaded_at_ms).unwrap_or_else(now_ms),
            |v| self.last_request_ms(name, v),
            &lost,
        );
        for (v, why) in retirements(&policy.retirement, &facts, self.serving_version(name), now_ms()) {
            self.retire(name, v, &why).await?;
        }
        Ok(())
    }

    /// At the end of each gate window: the loaded versions that failed their gates against the
    /// serving version over it.
    fn gate_losses(&self, name: &str, loaded: &[u64], gates: &Gates, window_s: f64) -> BTreeMap<u64, String> {
        let now = now_ms();
        let marks: BTreeMap<u64, Mark> = loaded.iter().map(|&v| (v, self.merged_mark(name, v))).collect();
        let mut all = self.gate_marks.lock().expect("gate marks lock");
        let due = all.get(name).is_none_or(|(started, _)| now.saturating_sub(*started) as f64 >= window_s * 1e3);
        if !due {
            return BTreeMap::new();
        }
        let mut lost = BTreeMap::new();
        if let (Some((_, before)), Some(keeper)) = (all.get(name), self.serving_version(name))
            && let (Some(k_now), Some(k_before)) = (marks.get(&keeper), before.get(&keeper))
        {
            let (control, _) = k_now.since(k_before);
            for (&v, m) in marks.iter().filter(|(v, _)| **v != keeper) {
                let Some(b) = before.get(&v) else { continue };
                if let GateResult::Fail(why) = check_gates(gates, &m.since(b).0, &control) {
                    lost.insert(v, format!("it failed its gates against version {keeper}: {why}"));
                }
            }
        }
        all.insert(name.to_string(), (now, marks));
        lost
    }

    async fn reshare_if_due(&self, name: &str, policy: &ModelPolicy) -> Result<(), ApiError> {
        if let Some(route) = policy.route.as_ref().filter(|r| r.strategy == Strategy::Thompson)
            && policy.active_rollout.is_none()
        {
            let due = self
                .thompson
                .lock()
                .expect("thompson lock")
                .get(name)
                .is_none_or(|(at, _)| now_ms().saturating_sub(*at) as f64 >= route.rebalance_s * 1e3);
            if due {
                self.reshare(name).await?;
            }
        }
        Ok(())
    }

    /// Re-computes the Thompson shares of a model's route from its running experiment.
    async fn reshare(&self, name: &str) -> Result<(), ApiError> {
        let _guard = self.lifecycle.lock().await;
        let policy = self.registry.policy(name).await?;
        let Some(route) = policy.route.as_ref().filter(|r| r.strategy == Strategy::Thompson) else { return Ok(()) };
        let aliases = self.registry.aliases(name).await?;
        let order: Vec<u64> = route.variants.iter().filter_map(|v| v.target.resolve(&aliases)).collect();
        if order.len() != route.variants.len() {
            return Ok(()); // a variant resolves to nothing: the routing splits evenly meanwhile
        }
        let shares = match self.experiments.lock().expect("experiments lock").get(name) {
            Some(live) => live.thompson(&order, route.floor),
            None => return Ok(()),
        };
        self.thompson.lock().expect("thompson lock").insert(name.to_string(), (now_ms(), shares));
        self.install_routing(name, &policy, &aliases);
        Ok(())
    }

    async fn step_rollout(&self, name: &str, r: &Rollout, outcome: Option<Verdict>) -> Result<(), ApiError> {
        if self.manager.get(name, Some(r.canary)).is_none() {
            let record = self.registry.version(name, r.canary).await?;
            if !record.state.servable() {
                let why = format!("it is {}: {}", record.state.as_str(), record.reason.unwrap_or_default());
                return self.finish_rollout(name, Some(r.canary), false, &why, Value::Null).await.map(|_| ());
            }
        }
        let Some((canary, control, windows)) = self.rollout_windows(name, r) else {
            // After a restart (or on becoming the leader): the current step's window starts now.
            self.mark_rollout_step(name, r);
            return Ok(());
        };
        match rollout::decide(r, &canary, &control, outcome, now_ms()) {
            Action::Hold => Ok(()),
            Action::Raise(weight) => {
                let _guard = self.lifecycle.lock().await;
                let mut policy = self.registry.policy(name).await?;
                let Some(active) = policy.active_rollout.as_mut().filter(|a| a.canary == r.canary) else {
                    return Ok(());
                };
                active.weight = weight;
                active.step_started_ms = now_ms();
                let active = active.clone();
                self.registry.set_policy(name, &policy).await?;
                self.mark_rollout_step(name, &active);
                let message = format!(
                    "canary version {} raised to {weight}%: gates held over {} requests (p99 {} vs control {})",
                    r.canary,
                    canary.requests,
                    ms(canary.p99_s),
                    ms(control.p99_s)
                );
                self.event(name, Some(r.canary), "rollout_step", &message, windows).await;
                self.install_routing(name, &policy, &self.registry.aliases(name).await?);
                Ok(())
            }
            Action::Promote => {
                let why = format!("its gates held at every step up to {}%", r.weight);
                self.finish_rollout(name, Some(r.canary), true, &why, windows).await.map(|_| ())
            }
            Action::Rollback(why) => self.finish_rollout(name, Some(r.canary), false, &why, windows).await.map(|_| ()),
        }
    }

    /// What the canary and the control did in the current step (traffic summed over replicas),
    /// as the gates judge it, and as JSON; `None` until this replica marked the step's start.
    pub(crate) fn rollout_windows(&self, name: &str, r: &Rollout) -> Option<(Window, Window, Value)> {
        let (canary_mark, control_mark) = self.rollout_marks.lock().expect("marks lock").get(name).cloned()?;
        let (canary, canary_latency) = self.merged_mark(name, r.canary).since(&canary_mark);
        let (control, control_latency) = self.merged_mark(name, r.control).since(&control_mark);
        let side = |version: u64, w: &Window, latency: &LatencySnapshot| {
            let latency_ms = crate::lifecycle::percentiles_ms(latency);
            json!({ "version": version, "requests": w.requests, "errors": w.errors, "latency_ms": latency_ms })
        };
        let json = json!({
            "canary": side(r.canary, &canary, &canary_latency),
            "control": side(r.control, &control, &control_latency),
        });
        Some((canary, control, json))
    }

    async fn retire(&self, name: &str, version: u64, why: &str) -> Result<(), ApiError> {
        let _guard = self.lifecycle.lock().await;
        // Judged before the lock: skip it if a rollout started or the version changed meanwhile.
        let still = self.registry.policy(name).await?.active_rollout.is_none()
            && self.registry.version(name, version).await?.state.servable()
            && self.manager.loaded_versions(name).len() > 1;
        if !still {
            return Ok(());
        }
        self.registry.take_out_of_service(name, version, VersionState::Retired, why).await?;
        self.event(
            name,
            Some(version),
            "retired",
            &format!("version {version} retired: {why}"),
            json!({ "reason": why }),
        )
        .await;
        self.reconcile_locked(name, None).await
    }
}

fn ms(s: Option<f64>) -> String {
    s.map_or("n/a".into(), |s| format!("{:.2} ms", s * 1e3))
}

fn describe_route(r: &RouteSpec) -> String {
    let variants: Vec<String> = r
        .variants
        .iter()
        .map(|v| match r.strategy {
            Strategy::Fixed => format!("{} {}%", v.target, v.weight),
            Strategy::Thompson => v.target.to_string(),
        })
        .collect();
    let mut s = match r.strategy {
        Strategy::Fixed => variants.join(", "),
        Strategy::Thompson => format!("thompson over {} (floor {}%)", variants.join(", "), r.floor),
    };
    if let Some(sh) = &r.shadow {
        s.push_str(&format!("; shadow {}% to {}", sh.percent, sh.target));
    }
    s
}

/// The variant with the highest mean among those the test found better than the control.
fn best_variant(report: &Value) -> Option<u64> {
    report["variants"]
        .as_array()?
        .iter()
        .filter(|v| v["verdict"] == "better")
        .max_by(|a, b| a["mean"].as_f64().unwrap_or(0.0).total_cmp(&b["mean"].as_f64().unwrap_or(0.0)))
        .and_then(|v| v["version"].as_u64())
}

/// The versions a running experiment's verdicts make losers, each with why: a variant found worse
/// than the control, and the control once a variant is found better (the best such variant names
/// why) and no other variant is still being measured against it. With two variants, whichever is
/// worse loses as soon as the test decides.
fn experiment_losers(control: Option<u64>, verdicts: &BTreeMap<u64, (Comparison, Verdict)>) -> BTreeMap<u64, String> {
    let mut lost: BTreeMap<u64, String> = verdicts
        .iter()
        .filter(|(_, (_, v))| *v == Verdict::Worse)
        .map(|(&v, (c, _))| {
            let why = format!(
                "the sequential test found it worse than the control (difference {:.4}, p = {:.5})",
                c.difference, c.p_value
            );
            (v, why)
        })
        .collect();
    let best = verdicts
        .iter()
        .filter(|(_, (_, v))| *v == Verdict::Better)
        .max_by(|a, b| a.1.0.difference.total_cmp(&b.1.0.difference));
    let all_decided = verdicts.values().all(|(_, v)| *v != Verdict::Continue);
    if let (Some(control), Some((winner, (c, _))), true) = (control, best, all_decided) {
        let why = format!(
            "the sequential test found version {winner} better than it (difference {:.4}, p = {:.5})",
            c.difference, c.p_value
        );
        lost.entry(control).or_insert(why);
    }
    lost
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(difference: f64, v: Verdict) -> (Comparison, Verdict) {
        (Comparison { difference, p_value: 0.001, ..Comparison::START }, v)
    }

    #[test]
    fn the_control_loses_only_when_no_variant_still_needs_it() {
        let none = experiment_losers(Some(1), &BTreeMap::from([(2, verdict(0.1, Verdict::Continue))]));
        assert!(none.is_empty());
        // Two variants: the control loses as soon as its challenger wins.
        let two = experiment_losers(Some(1), &BTreeMap::from([(2, verdict(0.5, Verdict::Better))]));
        assert_eq!(two.keys().collect::<Vec<_>>(), [&1]);
        assert!(two[&1].contains("found version 2 better"), "{two:?}");
        // Three: one winner, one still measured against the control: the control stays.
        let three = BTreeMap::from([(2, verdict(0.5, Verdict::Better)), (3, verdict(0.2, Verdict::Continue))]);
        assert!(experiment_losers(Some(1), &three).is_empty());
        // Once the third is decided too, the control goes, named by the best of the better ones.
        let three = BTreeMap::from([
            (2, verdict(0.5, Verdict::Better)),
            (3, verdict(0.8, Verdict::Better)),
            (4, verdict(-0.4, Verdict::Worse)),
        ]);
        let lost = experiment_losers(Some(1), &three);
        assert_eq!(lost.keys().collect::<Vec<_>>(), [&1, &4]);
        assert!(lost[&1].contains("found version 3 better"), "{lost:?}");
        assert!(lost[&4].contains("worse than the control"), "{lost:?}");
    }
}
