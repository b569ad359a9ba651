//! What replicas sharing one registry tell each other: each replica's traffic counters per
//! version (summed, they are what the lifecycle judges), the event log's high-water mark (how a
//! replica learns that something changed), and the lease that lets exactly one replica at a time
//! take lifecycle decisions.

use std::collections::BTreeMap;
use std::sync::Arc;

use sqlx::Row;

use crate::lifecycle::stats::{LatencySnapshot, TrafficTotals};
use crate::store::now_ms;
use crate::{Dialect, Registry, RegistryError};

/// The advisory-lock key of the leader lease ("algolead" in ASCII).
const LEADER_LOCK: i64 = 0x616c_676f_6c65_6164;

/// The leader lease: a PostgreSQL session-level advisory lock, held on a connection of its own
/// for as long as that session lives. A replica that dies (or whose connection breaks) loses it
/// with its session, and the next replica to ask takes it over.
#[derive(Clone, Default)]
pub(crate) struct Lease(Arc<tokio::sync::Mutex<Option<(sqlx::AnyConnection, bool)>>>);

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lease")
    }
}

impl Registry {
    /// Whether this process holds the leader lease, taking it when it is free. Asked before
    /// every round of decisions; the session is checked each time, so a lease lost with its
    /// connection is noticed before the next decision. On SQLite (one process) always true.
    pub async fn hold_lease(&self) -> bool {
        if self.dialect() == Dialect::Sqlite {
            return true;
        }
        let mut slot = self.lease.0.lock().await;
        if slot.is_none() {
            match self.pool.acquire().await {
                // Detached: the pool must never hand this session to anyone else.
                Ok(conn) => *slot = Some((conn.detach(), false)),
                Err(e) => {
                    tracing::warn!("leader lease: no database connection: {e}");
                    return false;
                }
            }
        }
        let Some((conn, held)) = slot.as_mut() else { return false };
        let asked = if *held {
            sqlx::query("SELECT TRUE").fetch_one(&mut *conn).await
        } else {
            sqlx::query("SELECT pg_try_advisory_lock($1)").bind(LEADER_LOCK).fetch_one(&mut *conn).await
        };
        match asked.and_then(|row| row.try_get::<bool, _>(0)) {
            Ok(now) => {
                if now && !*held {
                    tracing::info!("this replica now takes the lifecycle decisions (leader lease acquired)");
                }
                *held = now;
                now
            }
            Err(e) => {
                if *held {
                    tracing::warn!("leader lease lost with its database session: {e}");
                }
                *slot = None;
                false
            }
        }
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
    use crate::lifecycle::stats::{LatencyHistogram, TrafficTotals};
    use crate::testing::Scratch;

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
            assert!(first.hold_lease().await);
            return;
        }
        let second = scratch.open().await.unwrap();
        assert!(first.hold_lease().await);
        assert!(!second.hold_lease().await);
        assert!(first.hold_lease().await, "the holder keeps it");
        assert!(!second.hold_lease().await);
        drop(first); // the session ends with its connection, as when a replica dies
        let mut took_over = false;
        for _ in 0..50 {
            if second.hold_lease().await {
                took_over = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(took_over, "the lease passes on once its holder's session is gone");
    }
}
