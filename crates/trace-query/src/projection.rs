//! The feed consumer: [`mes_common::feed`] follows scan-ingest's event feed from the cursor
//! stored in trace-query's database (resubscribing with backoff when the stream breaks, so no
//! event is lost or applied twice); [`Projection`] applies each batch of events with the cursor
//! in one transaction ([`crate::store::apply`]), then updates the cache. Its metrics and its
//! stall alarm are the shared consumer's (`event_feed_*{consumer}`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mes_common::Shutdown;
use mes_common::feed::{self, Batch, Failure, Outcome};
use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};

use crate::cache::QueryCache;
use crate::config::Settings;
use crate::store::apply;

#[derive(Clone)]
pub struct Projection {
    pool: PgPool,
    cache: QueryCache,
    feed: feed::EventFeed,
    consumer: feed::Consumer,
    lease_retry: Duration,
    /// Whether this replica holds the projection lease now.
    leading: Arc<AtomicBool>,
}

/// The projection lease: a session advisory lock in trace-query's database (its key is the
/// consumer's name), held on a connection of its own while this replica projects. Replicas of
/// one read model scale reads without repeating the projection's work; a stopped or killed
/// leader's connection ends and another replica takes over within `projection_lease_retry_ms`.
/// Two replicas projecting at once (a lease lost with its connection while the batch still
/// runs) stays correct: the cursor row serialises their batches.
const LEASE: &str = "SELECT pg_try_advisory_lock(hashtext('mes-projection:' || $1))";

impl Projection {
    /// A lazy channel: building never blocks on scan-ingest.
    pub fn new(pool: PgPool, cache: QueryCache, settings: Arc<Settings>) -> anyhow::Result<Self> {
        let feed = feed::EventFeed::new(
            &settings.scan_ingest_url,
            settings.service.caller_key(),
            &settings.feed_consumer,
        )?;
        let consumer = feed::Consumer::new(feed::Settings {
            consumer: settings.feed_consumer.clone(),
            batch: settings.feed_batch,
            retry_initial: Duration::from_millis(settings.feed_retry_initial_ms),
            retry_max: Duration::from_millis(settings.feed_retry_max_ms),
        });
        Ok(Self {
            pool,
            cache,
            feed,
            consumer,
            lease_retry: Duration::from_millis(settings.projection_lease_retry_ms.max(1)),
            leading: Arc::default(),
        })
    }

    /// The event the consumer cannot apply and waits in front of, if any.
    pub fn stalled(&self) -> Option<feed::Stop> {
        self.consumer.stalled()
    }

    /// The stored cursor.
    pub async fn position(&self) -> Result<i64, sqlx::Error> {
        apply::cursor(&self.pool, self.consumer.name()).await
    }

    /// Rebuilds the read model from position 0: empties it and resets the cursor in one
    /// transaction, purges the cached answers, and makes the consumer replay the feed.
    pub async fn rebuild(&self) -> anyhow::Result<()> {
        apply::reset(&self.pool, self.consumer.name()).await?;
        if !self.cache.purge_answers().await {
            tracing::warn!(
                "cached answers not purged now (redis unavailable); purged when it is back"
            );
        }
        self.consumer.resubscribe();
        tracing::info!("read model reset; replaying the feed from position 0");
        Ok(())
    }

    /// Whether this replica holds the projection lease (and so projects the feed).
    pub fn leading(&self) -> bool {
        self.leading.load(Ordering::SeqCst)
    }

    /// Follows the feed until `stop`, while this replica holds the projection lease; waits for
    /// the lease otherwise.
    pub async fn follow(self, stop: Shutdown) {
        metrics::gauge!("trace_projection_leader").set(0.0);
        while !stop.is_triggered() {
            let Some(lease) = self.take_lease().await else {
                tokio::select! {
                    _ = tokio::time::sleep(self.lease_retry) => {}
                    _ = stop.wait() => {}
                }
                continue;
            };
            tracing::info!("projection lease taken: this replica projects the feed");
            self.leading.store(true, Ordering::SeqCst);
            metrics::gauge!("trace_projection_leader").set(1.0);
            // The consumer runs until `stop`, or until the lease's connection fails.
            let until = Shutdown::new();
            let watch = tokio::spawn(hold(lease, self.lease_retry, stop.clone(), until.clone()));
            self.consumer.follow(&self, &self.feed, &until).await;
            // However the consumer ended, the lease's connection is closed (never pooled with
            // the lock still on it).
            until.trigger();
            let _ = watch.await;
            self.leading.store(false, Ordering::SeqCst);
            metrics::gauge!("trace_projection_leader").set(0.0);
            if !stop.is_triggered() {
                tracing::warn!("projection lease lost (its connection failed); taking it again");
            }
        }
    }

    /// The lease's connection if this replica got the lease.
    async fn take_lease(&self) -> Option<PoolConnection<Postgres>> {
        let mut conn = match self.pool.acquire().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot try the projection lease");
                return None;
            }
        };
        match sqlx::query_scalar::<_, bool>(LEASE)
            .bind(self.consumer.name())
            .fetch_one(&mut *conn)
            .await
        {
            // Taken: the connection leaves the pool, so the lock lives and dies with it.
            Ok(true) => Some(conn),
            Ok(false) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot try the projection lease");
                None
            }
        }
    }
}

/// Holds the lease: checks its connection every `every`; triggers `until` when `stop` fires or
/// the connection fails (the lock went with it). The connection is closed, not returned to
/// the pool, so the lock is released with it.
async fn hold(
    mut lease: PoolConnection<Postgres>,
    every: Duration,
    stop: Shutdown,
    until: Shutdown,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait() => break,
            _ = until.wait() => break,
        }
        if sqlx::query("SELECT 1").execute(&mut *lease).await.is_err() {
            break;
        }
    }
    until.trigger();
    let _ = lease.close().await;
}

impl feed::Apply for Projection {
    async fn position(&self) -> anyhow::Result<i64> {
        Ok(apply::cursor(&self.pool, self.consumer.name()).await?)
    }

    /// The batch in one transaction with the cursor, then the cache deletions it owes (and the
    /// pre-warming, once caught up); the cache counts the batch as in progress meanwhile.
    async fn apply(&self, batch: &Batch) -> Result<Outcome, Failure> {
        let in_progress = self.cache.batch_in_progress();
        let applied = apply::apply(&self.pool, self.consumer.name(), &batch.events)
            .await
            .map_err(Failure::retry)?;
        if applied.events > 0 {
            self.cache
                .applied(&applied.invalidation, batch.caught_up, applied.pending)
                .await;
        }
        drop(in_progress);
        Ok(Outcome {
            position: applied.position,
            stopped: applied.stopped.map(|s| feed::Stop {
                position: s.position,
                kind: s.kind,
                reason: s.reason,
            }),
        })
    }
}
