//! Keeping replicas that share a registry (on PostgreSQL) in step. Every controller pass, each
//! replica shares its traffic counters and reads the others', and acts on the events the others
//! appended: every model they name is refreshed from the registry (versions loaded or unloaded,
//! aliases, routing, the running experiment). Then the replica holding the leader lease, and
//! only it, takes the lifecycle decisions, judging traffic summed over every replica, under the
//! lease's epoch (a fencing token: a replica that lost the lease mid-pass writes no decision).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use algolink_registry::EventFilter;
use algolink_registry::lifecycle::ExperimentState;

use crate::error::ApiError;
use crate::lifecycle::LiveExperiment;
use crate::state::AppState;

/// However quiet the event log, every model is refreshed this often: the safety net for an
/// event committed after a later one was read (ids are handed out before commit).
const FULL_SYNC: Duration = Duration::from_secs(30);

impl AppState {
    /// One controller pass: share and sync (when the registry is shared), then decide (when
    /// this replica holds the lease) or only keep the local routing fresh (when it does not).
    pub async fn controller_pass(&self) {
        if self.replicas.shared {
            if let Err(e) = self.share_traffic().await {
                tracing::warn!("sharing traffic counters: {e}");
            }
            if let Err(e) = self.sync().await {
                tracing::warn!("syncing with the registry: {e}");
            }
        }
        let epoch = self.registry.hold_lease().await;
        self.replicas.leader.store(epoch.is_some(), Ordering::Release);
        match epoch {
            // Fenced: should another replica take the lease during this pass, the decisions
            // this one still writes are refused.
            Some(epoch) => algolink_registry::as_leader(epoch, self.tick(true)).await,
            None => self.tick(false).await,
        }
    }

    /// Writes this replica's counters that changed since they were last written (every request
    /// counts, so an unchanged count means an unchanged row), and reads the sum of everyone else's.
    pub(crate) async fn share_traffic(&self) -> Result<(), ApiError> {
        let rows: Vec<_> = {
            let shared = self.replicas.shared_requests.lock().expect("shared requests lock");
            let mut rows = self.traffic_totals();
            rows.retain(|(key, t)| shared.get(key) != Some(&t.requests));
            rows
        };
        if !rows.is_empty() {
            self.registry.save_traffic(&self.replicas.id, &rows).await?;
            let mut shared = self.replicas.shared_requests.lock().expect("shared requests lock");
            shared.extend(rows.iter().map(|(key, t)| (key.clone(), t.requests)));
        }
        let elsewhere = self.registry.traffic_elsewhere(&self.replicas.id).await?;
        self.set_elsewhere(elsewhere);
        Ok(())
    }

    /// Refreshes the models named by events other replicas appended since the last pass (all
    /// models every `FULL_SYNC`), and the outcome totals of running experiments.
    async fn sync(&self) -> Result<(), ApiError> {
        let seen = self.replicas.seen_event.load(Ordering::Acquire);
        let last = self.registry.last_event_id().await?;
        let mut models = BTreeSet::new();
        let mut after = seen;
        while after < last {
            let filter = EventFilter { after: Some(after), limit: 500, ..Default::default() };
            let events = self.registry.events(&filter).await?;
            let Some(newest) = events.last() else { break };
            after = newest.id;
            let own = self.replicas.own_events.lock().expect("own events lock");
            models.extend(events.iter().filter(|e| !own.contains(&e.id)).map(|e| e.model.clone()));
        }
        self.replicas.own_events.lock().expect("own events lock").retain(|&id| id > after);
        self.replicas.seen_event.store(after, Ordering::Release);
        let full = {
            let mut at = self.replicas.last_full_sync.lock().expect("full sync lock");
            let due = at.elapsed() >= FULL_SYNC;
            if due {
                *at = std::time::Instant::now();
            }
            due
        };
        if full {
            models.extend(self.registry.models().await?.into_iter().map(|m| m.name));
            models.extend(self.manager.model_names());
        }
        for name in &models {
            if let Err(e) = self.refresh_model(name).await {
                tracing::error!(model = %name, "refreshing from the registry: {e}");
            }
        }
        // Outcomes reach whichever replica the client posted them to: every replica's totals
        // come from the registry, so verdicts and bandit shares count all of them.
        let running: Vec<(String, u64)> = self
            .experiments
            .lock()
            .expect("experiments lock")
            .iter()
            .map(|(name, live)| (name.clone(), live.experiment.id))
            .collect();
        for (name, id) in running {
            let _gate = self.outcomes_gate.write().await;
            let totals = self.registry.outcome_totals(id).await?;
            if let Some(live) =
                self.experiments.lock().expect("experiments lock").get_mut(&name).filter(|l| l.experiment.id == id)
            {
                live.totals = totals;
            }
        }
        Ok(())
    }

    /// Brings one model in line with the registry, as another replica left it.
    pub(crate) async fn refresh_model(&self, name: &str) -> Result<(), ApiError> {
        let _guard = self.lifecycle.lock().await;
        let running =
            self.registry.experiments(Some(name)).await?.into_iter().find(|e| e.state == ExperimentState::Running);
        let current = self.experiments.lock().expect("experiments lock").get(name).map(|l| l.experiment.clone());
        match running {
            None if current.is_some() => {
                self.experiments.lock().expect("experiments lock").remove(name);
                self.thompson.lock().expect("thompson lock").remove(name);
            }
            Some(e) if current.as_ref() != Some(&e) => {
                let _gate = self.outcomes_gate.write().await;
                let totals = self.registry.outcome_totals(e.id).await?;
                // The window starts when this replica learns of the experiment (within a pass of
                // its start), unless it already followed it.
                let start_marks = match self.experiments.lock().expect("experiments lock").get(name) {
                    Some(live) if live.experiment.id == e.id => live.start_marks.clone(),
                    _ => e.versions.iter().map(|&v| (v, self.merged_mark(name, v))).collect::<BTreeMap<_, _>>(),
                };
                let live = LiveExperiment::new(e, totals, start_marks);
                self.experiments.lock().expect("experiments lock").insert(name.to_string(), live);
            }
            _ => {}
        }
        self.reconcile_locked(name, None).await
    }
}
