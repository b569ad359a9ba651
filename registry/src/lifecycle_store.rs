//! The registry's lifecycle records: aliases, tags, time-to-live, per-model policy documents,
//! experiments and their outcomes, the event log, and webhook delivery cursors.

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::Row;

use crate::lifecycle::stats::Moments;
use crate::lifecycle::{Experiment, ExperimentState, ModelPolicy, validate_alias};
use crate::store::{found, now_ms, write_state};
use crate::{Registry, RegistryError, VersionState};

/// One entry of the event log.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    pub id: u64,
    pub at_ms: u64,
    pub model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// `pushed`, `ready`, `failed`, `unloaded`, `traffic`, `alias`, `policy`, `rollout_started`,
    /// `rollout_step`, `promoted`, `rolled_back`, `retired`, `experiment`, `deleted`.
    pub kind: String,
    pub message: String,
    pub detail: serde_json::Value,
}

#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    pub model: Option<String>,
    pub kind: Option<String>,
    /// Only events with a larger id.
    pub after: Option<u64>,
    /// Only events with a smaller id.
    pub before: Option<u64>,
    /// The newest first (the last `limit` matches) instead of the oldest.
    pub newest_first: bool,
    pub limit: u32,
}

impl Registry {
    pub async fn aliases(&self, model: &str) -> Result<BTreeMap<String, u64>, RegistryError> {
        let rows = sqlx::query("SELECT alias, version FROM aliases WHERE model = $1 ORDER BY alias")
            .bind(model)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get::<i64, _>(1) as u64)).collect())
    }

    /// Points `alias` at `version`, which must exist and be servable. Returns the previous target.
    pub async fn set_alias(&self, model: &str, alias: &str, version: u64) -> Result<Option<u64>, RegistryError> {
        validate_alias(alias)?;
        let v = self.version(model, version).await?;
        if !v.state.servable() {
            return Err(RegistryError::Conflict(format!(
                "version {version} of {model:?} is {}; an alias must point at a servable version",
                v.state.as_str()
            )));
        }
        let before = self.aliases(model).await?.get(alias).copied();
        let mut tx = self.begin_decision().await?;
        sqlx::query(
            "INSERT INTO aliases (model, alias, version, updated_at_ms) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (model, alias) DO UPDATE SET version = excluded.version, updated_at_ms = excluded.updated_at_ms",
        )
        .bind(model)
        .bind(alias)
        .bind(version as i64)
        .bind(now_ms() as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(before)
    }

    pub async fn delete_alias(&self, model: &str, alias: &str) -> Result<u64, RegistryError> {
        let mut tx = self.begin_decision().await?;
        let row = sqlx::query("DELETE FROM aliases WHERE model = $1 AND alias = $2 RETURNING version")
            .bind(model)
            .bind(alias)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| RegistryError::AliasNotFound { model: model.into(), alias: alias.into() })?;
        tx.commit().await?;
        Ok(row.get::<i64, _>(0) as u64)
    }

    /// Replaces a version's tags.
    pub async fn set_tags(&self, model: &str, version: u64, tags: &[String]) -> Result<(), RegistryError> {
        self.version(model, version).await?;
        if let Some(bad) = tags.iter().find(|t| t.is_empty() || t.len() > 128 || t.contains('\n')) {
            return Err(RegistryError::InvalidPolicy(format!("invalid tag {bad:?}: 1-128 characters, one line")));
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM tags WHERE model = $1 AND version = $2")
            .bind(model)
            .bind(version as i64)
            .execute(&mut *tx)
            .await?;
        for t in tags {
            sqlx::query("INSERT INTO tags (model, version, tag) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
                .bind(model)
                .bind(version as i64)
                .bind(t)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Sets (or clears) the instant a version's time-to-live ends.
    pub async fn set_expiry(&self, model: &str, version: u64, expires_at_ms: Option<u64>) -> Result<(), RegistryError> {
        let done = sqlx::query("UPDATE versions SET expires_at_ms = $1 WHERE model = $2 AND version = $3")
            .bind(expires_at_ms.map(|v| v as i64))
            .bind(model)
            .bind(version as i64)
            .execute(&self.pool)
            .await?;
        found(done.rows_affected(), model, version)
    }

    /// The model's policy document (the default one when none was set).
    pub async fn policy(&self, model: &str) -> Result<ModelPolicy, RegistryError> {
        let row =
            sqlx::query("SELECT doc FROM policies WHERE model = $1").bind(model).fetch_optional(&self.pool).await?;
        match row {
            None => Ok(ModelPolicy::default()),
            Some(r) => serde_json::from_str(&r.get::<String, _>(0))
                .map_err(|e| RegistryError::InvalidPolicy(format!("stored policy of {model:?} is unreadable: {e}"))),
        }
    }

    pub async fn set_policy(&self, model: &str, policy: &ModelPolicy) -> Result<(), RegistryError> {
        policy.validate()?;
        self.model(model).await?;
        let doc = serde_json::to_string(policy).map_err(|e| RegistryError::InvalidPolicy(e.to_string()))?;
        let mut tx = self.begin_decision().await?;
        sqlx::query(
            "INSERT INTO policies (model, doc, updated_at_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (model) DO UPDATE SET doc = excluded.doc, updated_at_ms = excluded.updated_at_ms",
        )
        .bind(model)
        .bind(doc)
        .bind(now_ms() as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Appends to the event log; returns the event with its id.
    pub async fn append_event(
        &self,
        model: &str,
        version: Option<u64>,
        kind: &str,
        message: &str,
        detail: serde_json::Value,
    ) -> Result<Event, RegistryError> {
        let at_ms = now_ms();
        let mut tx = self.begin_decision().await?;
        let id: i64 = sqlx::query(
            "INSERT INTO events (at_ms, model, version, kind, message, detail) VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        )
        .bind(at_ms as i64)
        .bind(model)
        .bind(version.map(|v| v as i64))
        .bind(kind)
        .bind(message)
        .bind(detail.to_string())
        .fetch_one(&mut *tx)
        .await?
        .get(0);
        tx.commit().await?;
        Ok(Event {
            id: id as u64,
            at_ms,
            model: model.into(),
            version,
            kind: kind.into(),
            message: message.into(),
            detail,
        })
    }

    /// Events in id order, filtered.
    pub async fn events(&self, f: &EventFilter) -> Result<Vec<Event>, RegistryError> {
        const SELECT: &str = "SELECT id, at_ms, model, version, kind, message, detail FROM events \
             WHERE (CAST($1 AS TEXT) IS NULL OR model = $1) AND (CAST($2 AS TEXT) IS NULL OR kind = $2) AND id > $3 AND id < $4";
        let sql = format!("{SELECT} ORDER BY id {} LIMIT $5", if f.newest_first { "DESC" } else { "ASC" });
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(f.model.as_deref())
            .bind(f.kind.as_deref())
            .bind(f.after.unwrap_or(0) as i64)
            .bind(f.before.map_or(i64::MAX, |b| b.min(i64::MAX as u64) as i64))
            .bind(i64::from(f.limit.max(1)))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| Event {
                id: r.get::<i64, _>(0) as u64,
                at_ms: r.get::<i64, _>(1) as u64,
                model: r.get(2),
                version: r.get::<Option<i64>, _>(3).map(|v| v as u64),
                kind: r.get(4),
                message: r.get(5),
                detail: serde_json::from_str(&r.get::<String, _>(6)).unwrap_or(serde_json::Value::Null),
            })
            .collect())
    }

    /// Records a new running experiment; refused while another of the model runs.
    pub async fn create_experiment(&self, mut e: Experiment) -> Result<Experiment, RegistryError> {
        e.test.validate()?;
        if let Some(running) = self.running_experiment(&e.model).await? {
            return Err(RegistryError::Conflict(format!(
                "experiment {} of {:?} is still running: stop or conclude it first",
                running.id, e.model
            )));
        }
        let mut tx = self.pool.begin().await?;
        let id: i64 =
            sqlx::query("INSERT INTO experiments (model, doc, state) VALUES ($1, '{}', 'running') RETURNING id")
                .bind(&e.model)
                .fetch_one(&mut *tx)
                .await?
                .get(0);
        e.id = id as u64;
        e.state = ExperimentState::Running;
        sqlx::query("UPDATE experiments SET doc = $1 WHERE id = $2")
            .bind(serde_json::to_string(&e).map_err(|x| RegistryError::InvalidPolicy(x.to_string()))?)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(e)
    }

    pub async fn update_experiment(&self, e: &Experiment) -> Result<(), RegistryError> {
        let state = serde_json::to_value(e.state).map_err(|x| RegistryError::InvalidPolicy(x.to_string()))?;
        let mut tx = self.begin_decision().await?;
        let done = sqlx::query("UPDATE experiments SET doc = $1, state = $2 WHERE id = $3")
            .bind(serde_json::to_string(e).map_err(|x| RegistryError::InvalidPolicy(x.to_string()))?)
            .bind(state.as_str().unwrap_or("running"))
            .bind(e.id as i64)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(RegistryError::ExperimentNotFound(e.id));
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn experiment(&self, id: u64) -> Result<Experiment, RegistryError> {
        let row = sqlx::query("SELECT doc FROM experiments WHERE id = $1")
            .bind(id as i64)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(RegistryError::ExperimentNotFound(id))?;
        parse_experiment(&row.get::<String, _>(0))
    }

    /// A model's experiments, newest first (every model's when `None`).
    pub async fn experiments(&self, model: Option<&str>) -> Result<Vec<Experiment>, RegistryError> {
        let rows =
            sqlx::query("SELECT doc FROM experiments WHERE (CAST($1 AS TEXT) IS NULL OR model = $1) ORDER BY id DESC")
                .bind(model)
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(|r| parse_experiment(&r.get::<String, _>(0))).collect()
    }

    pub async fn running_experiment(&self, model: &str) -> Result<Option<Experiment>, RegistryError> {
        let row = sqlx::query("SELECT doc FROM experiments WHERE model = $1 AND state = 'running'")
            .bind(model)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| parse_experiment(&r.get::<String, _>(0))).transpose()
    }

    /// Records outcomes `(request, version, value)` of an experiment in one transaction; an outcome
    /// for a request that already has one is ignored. Returns which were recorded.
    pub async fn record_outcomes(
        &self,
        experiment: u64,
        outcomes: &[(String, u64, f64)],
    ) -> Result<Vec<bool>, RegistryError> {
        let mut tx = self.pool.begin().await?;
        let mut fresh = Vec::with_capacity(outcomes.len());
        let at = now_ms() as i64;
        for (request, version, value) in outcomes {
            let done = sqlx::query(
                "INSERT INTO outcomes (experiment, request, version, value, at_ms) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (experiment, request) DO NOTHING",
            )
            .bind(experiment as i64)
            .bind(request)
            .bind(*version as i64)
            .bind(*value)
            .bind(at)
            .execute(&mut *tx)
            .await?;
            fresh.push(done.rows_affected() == 1);
        }
        tx.commit().await?;
        Ok(fresh)
    }

    /// Outcome moments per version of an experiment.
    pub async fn outcome_totals(&self, experiment: u64) -> Result<BTreeMap<u64, Moments>, RegistryError> {
        let rows = sqlx::query(
            "SELECT version, COUNT(*), SUM(value), SUM(value * value) FROM outcomes WHERE experiment = $1 GROUP BY version",
        )
        .bind(experiment as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let m = Moments { n: r.get::<i64, _>(1) as u64, sum: r.get(2), sum_sq: r.get(3) };
                (r.get::<i64, _>(0) as u64, m)
            })
            .collect())
    }

    pub async fn webhook_cursor(&self, url: &str) -> Result<Option<u64>, RegistryError> {
        let row = sqlx::query("SELECT last_event FROM webhook_cursors WHERE url = $1")
            .bind(url)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.get::<i64, _>(0) as u64))
    }

    pub async fn set_webhook_cursor(&self, url: &str, last_event: u64) -> Result<(), RegistryError> {
        sqlx::query(
            "INSERT INTO webhook_cursors (url, last_event) VALUES ($1, $2) \
             ON CONFLICT (url) DO UPDATE SET last_event = excluded.last_event",
        )
        .bind(url)
        .bind(last_event as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The id of the newest event (0 when the log is empty).
    pub async fn last_event_id(&self) -> Result<u64, RegistryError> {
        let id: Option<i64> = sqlx::query("SELECT MAX(id) FROM events").fetch_one(&self.pool).await?.get(0);
        Ok(id.unwrap_or(0) as u64)
    }

    /// Marks a version rejected or retired, with why.
    pub async fn take_out_of_service(
        &self,
        model: &str,
        version: u64,
        state: VersionState,
        reason: &str,
    ) -> Result<(), RegistryError> {
        debug_assert!(matches!(state, VersionState::Rejected | VersionState::Retired));
        let mut tx = self.begin_decision().await?;
        write_state(&mut *tx, model, version, state, Some(reason)).await?;
        sqlx::query("DELETE FROM aliases WHERE model = $1 AND version = $2")
            .bind(model)
            .bind(version as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}

fn parse_experiment(doc: &str) -> Result<Experiment, RegistryError> {
    serde_json::from_str(doc).map_err(|e| RegistryError::InvalidPolicy(format!("stored experiment is unreadable: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Format;
    use crate::lifecycle::stats::SequentialConfig;
    use crate::lifecycle::{Goal, route::RouteSpec};

    async fn registry_with(versions: usize) -> (crate::testing::Scratch, Registry) {
        let dir = crate::testing::Scratch::new().await.unwrap();
        let reg = dir.open().await.unwrap();
        for i in 0..versions {
            let s = reg.blobs().stage(format!("v{i}").as_bytes(), 1 << 20).await.unwrap();
            reg.add_version("m", s, Format::Onnx, VersionState::Ready, None).await.unwrap();
        }
        (dir, reg)
    }

    #[tokio::test]
    async fn aliases_tags_expiry_and_policies_persist() {
        let (dir, reg) = registry_with(3).await;
        assert_eq!(reg.set_alias("m", "champion", 2).await.unwrap(), None);
        assert_eq!(reg.set_alias("m", "champion", 3).await.unwrap(), Some(2));
        assert!(matches!(reg.set_alias("m", "x", 9).await, Err(RegistryError::VersionNotFound { .. })));
        assert!(matches!(reg.set_alias("m", "7", 1).await, Err(RegistryError::InvalidPolicy(_))));
        reg.set_tags("m", 3, &["prod".into(), "gbm".into()]).await.unwrap();
        reg.set_expiry("m", 3, Some(1234)).await.unwrap();
        let mut policy = ModelPolicy {
            route: Some(serde_json::from_str(r#"{"variants":[{"target":"champion","weight":100}]}"#).unwrap()),
            ..Default::default()
        };
        reg.set_policy("m", &policy).await.unwrap();
        policy.route = Some(RouteSpec { variants: vec![], ..policy.route.clone().unwrap() });
        assert!(reg.set_policy("m", &policy).await.is_err(), "an invalid route is refused");
        drop(reg);
        let reg = dir.open().await.unwrap();
        let m = reg.model("m").await.unwrap();
        assert_eq!(m.aliases.get("champion"), Some(&3));
        assert_eq!(m.versions[2].tags, vec!["gbm".to_string(), "prod".to_string()]);
        assert_eq!(m.versions[2].expires_at_ms, Some(1234));
        assert!(m.versions[0].tags.is_empty());
        assert_eq!(reg.policy("m").await.unwrap().route.unwrap().variants.len(), 1);
        let all = reg.models().await.unwrap();
        assert_eq!((all.len(), all[0].aliases.get("champion"), all[0].versions.len()), (1, Some(&3), 3));
        reg.take_out_of_service("m", 3, VersionState::Retired, "ttl").await.unwrap();
        assert!(reg.aliases("m").await.unwrap().is_empty(), "retiring drops the aliases pointing at it");
        assert!(matches!(reg.set_alias("m", "champion", 3).await, Err(RegistryError::Conflict(_))));
        reg.set_alias("m", "old", 1).await.unwrap();
        reg.delete_version("m", 1).await.unwrap();
        assert!(matches!(reg.delete_alias("m", "old").await, Err(RegistryError::AliasNotFound { .. })));
    }

    #[tokio::test]
    async fn events_experiments_and_outcomes() {
        let (_dir, reg) = registry_with(2).await;
        for i in 0..5 {
            reg.append_event(
                "m",
                Some(i),
                if i % 2 == 0 { "ready" } else { "retired" },
                "x",
                serde_json::json!({ "i": i }),
            )
            .await
            .unwrap();
        }
        reg.append_event("other", None, "ready", "y", serde_json::Value::Null).await.unwrap();
        let all = reg.events(&EventFilter { limit: 100, ..Default::default() }).await.unwrap();
        assert_eq!(all.len(), 6);
        let page = reg
            .events(&EventFilter { model: Some("m".into()), after: Some(2), limit: 2, ..Default::default() })
            .await
            .unwrap();
        assert_eq!(page.iter().map(|e| e.id).collect::<Vec<_>>(), vec![3, 4]);
        let retired =
            reg.events(&EventFilter { kind: Some("retired".into()), limit: 100, ..Default::default() }).await.unwrap();
        assert_eq!(retired.len(), 2);
        assert_eq!(retired[0].detail["i"], 1);
        let newest = EventFilter { model: Some("m".into()), newest_first: true, limit: 2, ..Default::default() };
        let page = reg.events(&newest).await.unwrap();
        assert_eq!(page.iter().map(|e| e.id).collect::<Vec<_>>(), vec![5, 4]);
        let page = reg.events(&EventFilter { before: Some(4), ..newest }).await.unwrap();
        assert_eq!(page.iter().map(|e| e.id).collect::<Vec<_>>(), vec![3, 2]);
        assert_eq!(reg.last_event_id().await.unwrap(), 6);

        let e = Experiment {
            id: 0,
            model: "m".into(),
            goal: Goal::Conversion,
            test: SequentialConfig::default(),
            control: 1,
            versions: vec![1, 2],
            state: ExperimentState::Running,
            started_ms: 1,
            ended_ms: None,
            conclusion: None,
            decisions: Default::default(),
        };
        let mut e = reg.create_experiment(e).await.unwrap();
        assert!(matches!(reg.create_experiment(e.clone()).await, Err(RegistryError::Conflict(_))));
        let fresh = reg
            .record_outcomes(
                e.id,
                &[("a".into(), 1, 1.0), ("b".into(), 2, 0.0), ("a".into(), 2, 1.0), ("c".into(), 2, 1.0)],
            )
            .await
            .unwrap();
        assert_eq!(fresh, vec![true, true, false, true], "a second outcome for a request is ignored");
        let totals = reg.outcome_totals(e.id).await.unwrap();
        assert_eq!(totals[&1], Moments { n: 1, sum: 1.0, sum_sq: 1.0 });
        assert_eq!(totals[&2], Moments { n: 2, sum: 1.0, sum_sq: 1.0 });
        e.state = ExperimentState::Stopped;
        reg.update_experiment(&e).await.unwrap();
        assert!(reg.running_experiment("m").await.unwrap().is_none());
        assert_eq!(reg.experiment(e.id).await.unwrap().state, ExperimentState::Stopped);
        assert_eq!(reg.experiments(Some("m")).await.unwrap().len(), 1);
        assert_eq!(reg.webhook_cursor("http://x").await.unwrap(), None);
        reg.set_webhook_cursor("http://x", 4).await.unwrap();
        assert_eq!(reg.webhook_cursor("http://x").await.unwrap(), Some(4));
    }
}
