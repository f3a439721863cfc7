//! The feed consumer: [`mes_common::feed`] follows scan-ingest's event feed from the cursor
//! stored in trace-query's database (resubscribing with backoff when the stream breaks, so no
//! event is lost or applied twice); [`Projection`] applies each batch of events with the cursor
//! in one transaction ([`crate::store::apply`]), then updates the cache. Its metrics and its
//! stall alarm are the shared consumer's (`event_feed_*{consumer}`).

use std::sync::Arc;
use std::time::Duration;

use mes_common::Shutdown;
use mes_common::feed::{self, Batch, Failure, Outcome};
use sqlx::PgPool;

use crate::cache::QueryCache;
use crate::config::Settings;
use crate::store::apply;

#[derive(Clone)]
pub struct Projection {
    pool: PgPool,
    cache: QueryCache,
    feed: feed::EventFeed,
    consumer: feed::Consumer,
}

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

    /// Follows the feed until `stop`.
    pub async fn follow(self, stop: Shutdown) {
        self.consumer.follow(&self, &self.feed, &stop).await;
    }
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
