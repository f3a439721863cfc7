//! The feed consumer: follows scan-ingest's event feed from the cursor stored in trace-query's
//! database, applies each batch of events with the cursor in one transaction
//! ([`crate::store::apply`]), then updates the cache. When the stream breaks (scan-ingest
//! restarted, network) it resubscribes from the stored cursor with backoff, so no event is
//! lost or applied twice.
//!
//! Feed lag metrics (`consumer` label): `event_feed_position` (last applied position),
//! `event_feed_lag_events` (events the feed has sequenced and this consumer has not applied:
//! each event carries the feed's head position), `event_feed_lag_seconds` (age of the last
//! applied event while more are waiting; 0 when caught up).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use mes_common::Shutdown;
use mes_common::grpc::{self, Signed};
use mes_common::identity::Caller;
use mes_proto::v1 as pb;
use mes_proto::v1::event_feed_client::EventFeedClient;
use rand::Rng;
use sqlx::PgPool;
use tokio::sync::Notify;
use tonic::transport::Channel;
use tracing::Instrument;

use crate::cache::QueryCache;
use crate::config::Settings;
use crate::store::apply::{self, Stop};

type Feed = EventFeedClient<Signed<Channel>>;

#[derive(Clone)]
pub struct Projection {
    pool: PgPool,
    cache: QueryCache,
    settings: Arc<Settings>,
    feed: Feed,
    /// Makes the consumer resubscribe from the stored cursor (after a rebuild).
    resubscribe: Arc<Notify>,
    /// The event the consumer is stopped in front of, if any.
    stalled: Arc<Mutex<Option<Stop>>>,
}

impl Projection {
    /// A lazy channel: building never blocks on scan-ingest.
    pub fn new(pool: PgPool, cache: QueryCache, settings: Arc<Settings>) -> anyhow::Result<Self> {
        // The feed is a long-lived stream: no per-request timeout.
        let channel = grpc::channel(
            &settings.scan_ingest_url,
            Duration::from_secs(3),
            Duration::from_secs(365 * 86_400),
        )?;
        let feed = EventFeedClient::new(grpc::signed(channel, settings.service.caller_key()));
        Ok(Self {
            pool,
            cache,
            settings,
            feed,
            resubscribe: Arc::new(Notify::new()),
            stalled: Arc::new(Mutex::new(None)),
        })
    }

    fn consumer(&self) -> &str {
        &self.settings.feed_consumer
    }

    /// The event the consumer cannot apply and waits in front of, if any.
    pub fn stalled(&self) -> Option<Stop> {
        self.stalled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_stalled(&self, stop: Option<Stop>) {
        let consumer = self.consumer().to_owned();
        metrics::gauge!("event_feed_stalled", "consumer" => consumer.clone())
            .set(if stop.is_some() { 1.0 } else { 0.0 });
        if let Some(stop) = &stop {
            metrics::gauge!("event_feed_stalled_position", "consumer" => consumer)
                .set(stop.position as f64);
        }
        *self.stalled.lock().unwrap_or_else(|p| p.into_inner()) = stop;
    }

    /// The stored cursor.
    pub async fn position(&self) -> Result<i64, sqlx::Error> {
        apply::cursor(&self.pool, self.consumer()).await
    }

    /// Rebuilds the read model from position 0: empties it and resets the cursor in one
    /// transaction, purges the cached answers, and makes the consumer replay the feed.
    pub async fn rebuild(&self) -> anyhow::Result<()> {
        apply::reset(&self.pool, self.consumer()).await?;
        if !self.cache.purge_answers().await {
            tracing::warn!(
                "cached answers not purged now (redis unavailable); purged when it is back"
            );
        }
        self.resubscribe.notify_one();
        tracing::info!("read model reset; replaying the feed from position 0");
        Ok(())
    }

    /// Follows the feed until `stop`, resubscribing with backoff when the stream breaks.
    pub async fn follow(self, stop: Shutdown) {
        let mut failures = 0u32;
        loop {
            match self.follow_once(&stop).await {
                Ok(()) if stop.is_triggered() => return,
                Ok(()) => {
                    tracing::info!("event feed ended; resubscribing");
                    failures = 0;
                }
                Err(e) => {
                    failures += 1;
                    // Every failure while scan-ingest is down would flood the log: the first
                    // ones, then one a minute or so.
                    if failures <= 3 || failures.is_multiple_of(12) {
                        tracing::warn!(error = %format!("{e:#}"), failures, "event feed consumer failed");
                    } else {
                        tracing::debug!(error = %format!("{e:#}"), failures, "event feed consumer failed");
                    }
                    metrics::counter!("event_feed_failures_total").increment(1);
                }
            }
            let delay = backoff(
                failures.max(1),
                Duration::from_millis(self.settings.feed_retry_initial_ms),
                Duration::from_millis(self.settings.feed_retry_max_ms),
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.resubscribe.notified() => {}
                _ = stop.wait() => return,
            }
        }
    }

    async fn follow_once(&self, stop: &Shutdown) -> anyhow::Result<()> {
        let consumer = self.consumer().to_owned();
        let mut position = self.position().await?;
        let mut req = tonic::Request::new(pb::SubscribeRequest {
            after_position: u64::try_from(position).unwrap_or(0),
            consumer: consumer.clone(),
        });
        Caller::system(&consumer).write_to(req.metadata_mut());
        let mut stream = self.feed.clone().subscribe(req).await?.into_inner();
        tracing::info!(after = position, "following the event feed");
        let batch_max = self.settings.feed_batch.max(1);
        loop {
            let first = tokio::select! {
                m = stream.message() => m?,
                _ = stop.wait() => return Ok(()),
                _ = self.resubscribe.notified() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_secs(5)) => {
                    // Idle: a rebuild by another process resets the stored cursor.
                    if self.position().await? < position {
                        return Ok(());
                    }
                    continue;
                }
            };
            let Some(first) = first else { return Ok(()) };
            let mut batch = vec![first];
            let mut broken = None;
            let mut more = false;
            while batch.len() < batch_max {
                match stream.message().now_or_never() {
                    Some(Ok(Some(e))) => batch.push(e),
                    Some(Err(status)) => {
                        broken = Some(status);
                        break;
                    }
                    Some(Ok(None)) | None => break,
                }
            }
            if batch.len() == batch_max {
                more = true;
            }
            let head = batch.iter().map(|e| e.head_position).max().unwrap_or(0);
            let span = tracing::info_span!("feed.apply", events = batch.len());
            if let Some(tp) = batch
                .iter()
                .rev()
                .map(|e| &e.traceparent)
                .find(|t| !t.is_empty())
            {
                mes_common::propagation::set_parent(
                    &span,
                    mes_common::propagation::context_from_traceparent(tp),
                );
            }
            let in_progress = self.cache.batch_in_progress();
            let applied = apply::apply(&self.pool, &consumer, &batch)
                .instrument(span.clone())
                .await?;
            position = applied.position;
            metrics::gauge!("event_feed_position", "consumer" => consumer.clone())
                .set(applied.position as f64);
            metrics::counter!("event_feed_events_applied_total", "consumer" => consumer.clone())
                .increment(applied.events as u64);
            let lag_seconds = match (more, applied.last_occurred_at) {
                (true, Some(t)) => (chrono::Utc::now() - t).num_milliseconds().max(0) as f64 / 1e3,
                _ => 0.0,
            };
            metrics::gauge!("event_feed_lag_seconds", "consumer" => consumer.clone())
                .set(lag_seconds);
            // Behind by what the feed had sequenced when it sent this batch (never negative).
            let behind = head.saturating_sub(u64::try_from(applied.position).unwrap_or(0));
            metrics::gauge!("event_feed_lag_events", "consumer" => consumer.clone())
                .set(behind as f64);
            if applied.events > 0 {
                self.cache
                    .applied(&applied.invalidation, !more, applied.pending)
                    .instrument(span)
                    .await;
            }
            drop(in_progress);
            if let Some(stop) = applied.stopped {
                tracing::error!(
                    position = stop.position,
                    kind = %stop.kind,
                    reason = %stop.reason,
                    "event feed stalled: this trace-query cannot apply the event; upgrade it, or record the position in feed_skips to pass it"
                );
                self.set_stalled(Some(stop.clone()));
                anyhow::bail!("{stop}");
            }
            if applied.events > 0 && self.stalled().is_some() {
                self.set_stalled(None);
                tracing::info!(position, "event feed no longer stalled");
            }
            if let Some(status) = broken {
                return Err(status.into());
            }
        }
    }
}

/// Exponential backoff with ±20 % jitter: `initial · 2^(failures−1)`, at most `max`.
pub fn backoff(failures: u32, initial: Duration, max: Duration) -> Duration {
    let exp = initial.saturating_mul(2u32.saturating_pow(failures.saturating_sub(1).min(16)));
    let base = exp.min(max).as_millis() as u64;
    let spread = base / 5;
    let ms = if spread == 0 {
        base
    } else {
        rand::rng().random_range(base - spread..=base + spread)
    };
    Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let i = Duration::from_millis(100);
        let m = Duration::from_secs(2);
        let b1 = backoff(1, i, m);
        assert!(b1 >= Duration::from_millis(80) && b1 <= Duration::from_millis(120));
        let b3 = backoff(3, i, m);
        assert!(b3 >= Duration::from_millis(320) && b3 <= Duration::from_millis(480));
        assert!(backoff(30, i, m) <= Duration::from_millis(2400));
    }
}
