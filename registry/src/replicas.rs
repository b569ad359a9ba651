//! What replicas sharing one registry tell each other: each replica's traffic counters per
//! version (summed, they are what the lifecycle judges), the event log's high-water mark (how a
//! replica learns that something changed), and the lease that lets exactly one replica at a time
//! take lifecycle decisions, fenced by an epoch so that one that lost it cannot write a decision.

use std::collections::BTreeMap;
use std::sync::Arc;

use sqlx::Row;

use crate::lifecycle::stats::{LatencySnapshot, TrafficTotals};
use crate::store::now_ms;
use crate::{Dialect, Registry, RegistryError};

/// The advisory-lock key of the leader lease ("algolead" in ASCII).
const LEADER_LOCK: i64 = 0x616c_676f_6c65_6164;

/// Tries the lease's lock on its own session; taken, it starts a new epoch (committed before
/// the first decision under it).
async fn acquire(conn: &mut sqlx::AnyConnection) -> Result<Option<i64>, sqlx::Error> {
    let row = sqlx::query("SELECT pg_try_advisory_lock($1)").bind(LEADER_LOCK).fetch_one(&mut *conn).await?;
    if !row.try_get::<bool, _>(0)? {
        return Ok(None);
    }
    let row = sqlx::query("UPDATE leader_epoch SET epoch = epoch + 1 WHERE id = 1 RETURNING epoch")
        .fetch_one(&mut *conn)
        .await?;
    Ok(Some(row.try_get(0)?))
}

/// The leader lease: a PostgreSQL session-level advisory lock, held on a connection of its own
/// for as long as that session lives. A replica that dies (or whose connection breaks) loses it
/// with its session, and the next replica to ask takes it over. Held, it carries the epoch its
/// holder took on acquiring it.
#[derive(Clone, Default)]
pub(crate) struct Lease(Arc<tokio::sync::Mutex<Option<LeaseSession>>>);

/// The lease's own database session, and the epoch while it holds the lock.
struct LeaseSession {
    conn: sqlx::AnyConnection,
    epoch: Option<i64>,
}

tokio::task_local! {
    /// The leader epoch the current task's decisions are taken under (see [`as_leader`]).
    static FENCE: i64;
}

/// Runs `decisions` as the leader of `epoch` (what [`Registry::hold_lease`] returned): every
/// decision the registry writes in it (aliases, policies, experiments, versions taken out of
/// service, events) first checks, in its own transaction, that no replica took the lease since.
///
/// The lease alone cannot stop a replica that lost its session between its check and its write
/// (the database dropped the connection, the replica paused): its pool still works. The epoch is
/// the fencing token. The new leader bumps it on acquisition, and a fenced write reads it `FOR
/// SHARE`, so the bump waits for a decision in flight to commit (the new leader then sees it) and
/// every later write of the old leader finds a newer epoch and is refused with
/// [`RegistryError::Fenced`]. A decision of several writes can be cut between two of them, as a
/// crash cuts it; the new leader goes on from what was written.
pub async fn as_leader<F: std::future::Future>(epoch: i64, decisions: F) -> F::Output {
    FENCE.scope(epoch, decisions).await
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lease")
    }
}

impl Registry {
    /// The epoch of the leader lease if this process holds it, taking it (and a new epoch) when
    /// it is free. Asked before every round of decisions, which then run under [`as_leader`];
    /// the session is checked each time, so a lease lost with its connection is noticed before
    /// the next round. On SQLite (one process) always held, at epoch 0.
    pub async fn hold_lease(&self) -> Option<i64> {
        if self.dialect() == Dialect::Sqlite {
            return Some(0);
        }
        let mut slot = self.lease.0.lock().await;
        if slot.is_none() {
            match self.pool.acquire().await {
                // Detached: the pool must never hand this session to anyone else.
                Ok(conn) => *slot = Some(LeaseSession { conn: conn.detach(), epoch: None }),
                Err(e) => {
                    tracing::warn!("leader lease: no database connection: {e}");
                    return None;
                }
            }
        }
        let LeaseSession { conn, epoch: held } = slot.as_mut()?;
        let asked = match *held {
            Some(epoch) => sqlx::query("SELECT TRUE").fetch_one(&mut *conn).await.map(|_| Some(epoch)),
            None => acquire(conn).await,
        };
        match asked {
            Ok(now) => {
                if let (Some(epoch), None) = (now, *held) {
                    tracing::info!(epoch, "this replica now takes the lifecycle decisions (leader lease acquired)");
                }
                *held = now;
                now
            }
            Err(e) => {
                if held.is_some() {
                    tracing::warn!("leader lease lost with its database session: {e}");
                }
                // Dropped, the connection closes: a lock it may still hold goes with its session.
                *slot = None;
                None
            }
        }
    }

    /// A transaction for a write that is a lifecycle decision: under [`as_leader`] on
    /// PostgreSQL, it first checks (and holds, until it ends) the leader epoch.
    pub(crate) async fn begin_decision(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, RegistryError> {
        let mut tx = self.pool.begin().await?;
        if let (Ok(epoch), Dialect::Postgres) = (FENCE.try_with(|e| *e), self.dialect()) {
            let row = sqlx::query("SELECT epoch FROM leader_epoch WHERE id = 1 FOR SHARE").fetch_one(&mut *tx).await?;
            let now: i64 = row.try_get(0)?;
            if now != epoch {
                return Err(RegistryError::Fenced { epoch, now });
            }
        }
        Ok(tx)
    }

    /// Records this replica's cumulative traffic counters, per (model, version).
    pub async fn save_traffic(
        &self,
        replica: &str,
        rows: &[((String, u64), TrafficTotals)],
    ) -> Result<(), RegistryError> {
        let mut tx = self.pool.begin().await?;
        for ((model, version), t) in rows {
            sqlx::query(
                "INSERT INTO replica_traffic (replica, model, version, requests, errors, latency, last_request_ms, updated_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (replica, model, version) DO UPDATE SET \
                 requests = excluded.requests, errors = excluded.errors, latency = excluded.latency, \
                 last_request_ms = excluded.last_request_ms, updated_ms = excluded.updated_ms",
            )
            .bind(replica)
            .bind(model.as_str())
            .bind(*version as i64)
            .bind(t.requests as i64)
            .bind(t.errors as i64)
            .bind(t.latency.encode())
            .bind(t.last_request_ms.map(|ms| ms as i64))
            .bind(now_ms() as i64)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The traffic counters of every replica but `replica`, summed per (model, version).
    pub async fn traffic_elsewhere(
        &self,
        replica: &str,
    ) -> Result<BTreeMap<(String, u64), TrafficTotals>, RegistryError> {
        let rows = sqlx::query(
            "SELECT model, version, requests, errors, latency, last_request_ms FROM replica_traffic WHERE replica <> $1",
        )
        .bind(replica)
        .fetch_all(&self.pool)
        .await?;
        let mut out: BTreeMap<(String, u64), TrafficTotals> = BTreeMap::new();
        for r in rows {
            let latency: String = r.get(4);
            let t = TrafficTotals {
                requests: r.get::<i64, _>(2).max(0) as u64,
                errors: r.get::<i64, _>(3).max(0) as u64,
                latency: LatencySnapshot::decode(&latency).unwrap_or_default(),
                last_request_ms: r.get::<Option<i64>, _>(5).map(|ms| ms.max(0) as u64),
            };
            out.entry((r.get(0), r.get::<i64, _>(1) as u64)).or_default().add(&t);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::as_leader;
    use crate::lifecycle::stats::{LatencyHistogram, TrafficTotals};
    use crate::testing::Scratch;
    use crate::{Format, Registry, RegistryError, VersionState};

    fn totals(requests: u64, errors: u64, latencies_ms: &[f64], last: u64) -> TrafficTotals {
        let h = LatencyHistogram::default();
        for ms in latencies_ms {
            h.record(ms / 1e3);
        }
        TrafficTotals { requests, errors, latency: h.snapshot(), last_request_ms: Some(last) }
    }

    #[tokio::test]
    async fn traffic_of_other_replicas_is_summed_and_a_replica_overwrites_its_own() {
        let scratch = Scratch::new().await.unwrap();
        let registry = scratch.open().await.unwrap();
        let key = ("iris".to_string(), 1);
        registry.save_traffic("a", &[(key.clone(), totals(10, 1, &[1.0, 2.0], 100))]).await.unwrap();
        registry.save_traffic("a", &[(key.clone(), totals(20, 2, &[1.0, 2.0, 3.0], 200))]).await.unwrap();
        registry.save_traffic("b", &[(key.clone(), totals(5, 0, &[40.0], 300))]).await.unwrap();
        registry.save_traffic("c", &[(("iris".into(), 2), totals(7, 7, &[], 50))]).await.unwrap();

        let seen_by_c = registry.traffic_elsewhere("c").await.unwrap();
        assert_eq!(seen_by_c.len(), 1);
        let merged = &seen_by_c[&key];
        assert_eq!((merged.requests, merged.errors, merged.last_request_ms), (25, 2, Some(300)));
        assert_eq!(merged.latency, totals(0, 0, &[1.0, 2.0, 3.0, 40.0], 0).latency);
        let seen_by_a = registry.traffic_elsewhere("a").await.unwrap();
        assert_eq!(seen_by_a[&key].requests, 5);
        assert_eq!(seen_by_a[&("iris".to_string(), 2)].errors, 7);
    }

    #[tokio::test]
    async fn exactly_one_registry_holds_the_lease_and_it_passes_on_when_the_holder_goes() {
        let scratch = Scratch::new().await.unwrap();
        let first = scratch.open().await.unwrap();
        if first.dialect() == crate::Dialect::Sqlite {
            // One process per SQLite file: it always leads.
            assert_eq!(first.hold_lease().await, Some(0));
            return;
        }
        let second = scratch.open().await.unwrap();
        let epoch = first.hold_lease().await.expect("a free lease is taken");
        assert_eq!(second.hold_lease().await, None);
        assert_eq!(first.hold_lease().await, Some(epoch), "the holder keeps it, at its epoch");
        assert_eq!(second.hold_lease().await, None);
        drop(first); // the session ends with its connection, as when a replica dies
        let next = take_over(&second).await;
        assert!(next > epoch, "a new holder starts a new epoch ({next} after {epoch})");
    }

    #[tokio::test]
    async fn a_replica_whose_lease_was_taken_over_writes_no_decision() {
        let scratch = Scratch::new().await.unwrap();
        let old = scratch.open().await.unwrap();
        let staged = old.blobs().stage(&b"v1"[..], 1 << 20).await.unwrap();
        old.add_version("m", staged, Format::Onnx, VersionState::Ready, None).await.unwrap();
        let Some(epoch) = old.hold_lease().await else { panic!("a free lease is taken") };
        as_leader(epoch, old.set_alias("m", "champion", 1)).await.unwrap();
        if old.dialect() == crate::Dialect::Sqlite {
            return; // one process: nobody else can take the lease
        }
        let new = scratch.open().await.unwrap();
        // The database ends the old leader's lease session (an idle timeout, a broken
        // connection, an operator) while the replica runs on with its pool.
        let ended = sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_all(&new.pool)
        .await
        .unwrap();
        assert_eq!(ended.len(), 1, "one session holds the lease");
        let next = take_over(&new).await;
        assert!(next > epoch);

        // The old leader still believes it leads (it has not asked since): its decisions are
        // refused, and its event with them.
        let refused = as_leader(epoch, old.set_alias("m", "champion", 1)).await;
        assert!(
            matches!(refused, Err(RegistryError::Fenced { epoch: e, now }) if e == epoch && now == next),
            "{refused:?}"
        );
        let refused = as_leader(epoch, old.append_event("m", Some(1), "retired", "stale", serde_json::json!({}))).await;
        assert!(matches!(refused, Err(RegistryError::Fenced { .. })), "{refused:?}");
        let refused = as_leader(epoch, old.take_out_of_service("m", 1, VersionState::Retired, "stale")).await;
        assert!(matches!(refused, Err(RegistryError::Fenced { .. })), "{refused:?}");
        assert!(old.version("m", 1).await.unwrap().state.servable(), "nothing of a refused decision is written");
        assert_eq!(old.last_event_id().await.unwrap(), 0);
        // Asked again, it learns it lost the lease; what its users ask it still happens.
        assert_eq!(old.hold_lease().await, None);
        old.set_alias("m", "challenger", 1).await.unwrap();
        // The new leader decides.
        as_leader(next, new.delete_alias("m", "champion")).await.unwrap();
        assert_eq!(new.aliases("m").await.unwrap().keys().collect::<Vec<_>>(), ["challenger"]);
    }

    /// Asks for the lease until it is taken (a closed session's lock goes within moments).
    async fn take_over(registry: &Registry) -> i64 {
        for _ in 0..50 {
            if let Some(epoch) = registry.hold_lease().await {
                return epoch;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("the lease did not pass on once its holder's session was gone");
    }
}
