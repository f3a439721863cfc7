//! The event feed.
//!
//! Writers insert events with `position = NULL` in their own transaction. The sequencer (one
//! at a time, serialised by the `feed_sequencer` row lock, so safe with several replicas)
//! gives every *committed* unsequenced event the next gap-free position, in id order, and
//! NOTIFYs `mes_feed` on commit. An event that commits late is simply sequenced later, so a
//! reader of `position > cursor` never skips one. Subscribers wake on the notification (or a
//! short poll, should a notification be missed).

use std::sync::Arc;
use std::time::Duration;

use mes_proto::v1 as pb;
use prost::Message;
use sqlx::{PgPool, Row};
use tokio::sync::{Notify, watch};

use mes_common::Shutdown;

const CHANNEL: &str = "mes_feed";
const SEQUENCE_BATCH: i64 = 5000;
const READ_BATCH: i64 = 500;
/// The sequencer's pause after a round that sequenced events (see [`FeedHub::run_sequencer`]).
const PACE: Duration = Duration::from_millis(5);

#[derive(Clone)]
pub struct FeedHub {
    pool: PgPool,
    /// Wakes the sequencer after a local commit.
    wake: Arc<Notify>,
    /// Highest sequenced position known to this replica.
    head_tx: Arc<watch::Sender<i64>>,
    head_rx: watch::Receiver<i64>,
}

impl FeedHub {
    pub fn new(pool: PgPool) -> Self {
        let (tx, rx) = watch::channel(0);
        Self {
            pool,
            wake: Arc::new(Notify::new()),
            head_tx: Arc::new(tx),
            head_rx: rx,
        }
    }

    /// Called after a transaction that appended events committed.
    pub fn committed(&self) {
        self.wake.notify_one();
    }

    /// Sequences the committed events; returns the new head position and how many events
    /// this round sequenced.
    pub async fn sequence_once(&self) -> Result<(i64, i64), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let last: i64 =
            sqlx::query_scalar("SELECT last_position FROM feed_sequencer WHERE id = 1 FOR UPDATE")
                .fetch_one(&mut *tx)
                .await?;
        // The lock is held: this statement's snapshot sees every event committed before it.
        // An index scan of `event_log_unsequenced`, never a bitmap scan: an index scan marks
        // the entries of events sequenced by earlier rounds dead as it passes them, so a round
        // costs what arrived since the last one; a bitmap scan would revisit every event
        // sequenced since the last VACUUM.
        sqlx::query("SET LOCAL enable_bitmapscan = off")
            .execute(&mut *tx)
            .await?;
        let assigned: i64 = sqlx::query_scalar(
            "WITH todo AS (
                 SELECT id, row_number() OVER (ORDER BY id) AS rn
                 FROM event_log WHERE position IS NULL ORDER BY id LIMIT $2),
             done AS (
                 UPDATE event_log e SET position = $1 + todo.rn FROM todo WHERE e.id = todo.id RETURNING 1)
             SELECT count(*) FROM done",
        )
        .bind(last)
        .bind(SEQUENCE_BATCH)
        .fetch_one(&mut *tx)
        .await?;
        let head = last + assigned;
        if assigned > 0 {
            sqlx::query("UPDATE feed_sequencer SET last_position = $1 WHERE id = 1")
                .bind(head)
                .execute(&mut *tx)
                .await?;
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(head.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        if assigned > 0 {
            metrics::counter!("feed_events_sequenced_total").increment(assigned as u64);
        }
        self.head_tx.send_if_modified(|h| {
            if head > *h {
                *h = head;
                true
            } else {
                false
            }
        });
        metrics::gauge!("feed_head_position").set(head as f64);
        Ok((head, assigned))
    }

    /// The sequencer loop: runs when woken by a local commit, and every `interval` for commits
    /// of other replicas. A commit that lands while a round runs leaves a wake-up behind
    /// ([`Self::committed`]), so the next round starts at once; after a round that sequenced
    /// something it pauses [`PACE`] first, so that under load one round sequences the commits
    /// of many transactions (each round is a transaction of its own, with a WAL flush).
    pub async fn run_sequencer(self, interval: Duration, shutdown: Shutdown) {
        loop {
            let assigned = match self.sequence_once().await {
                Ok((_, assigned)) => assigned,
                Err(e) => {
                    tracing::warn!(error = %e, "feed sequencer failed");
                    0
                }
            };
            if shutdown.is_triggered() {
                return;
            }
            if assigned >= SEQUENCE_BATCH {
                continue; // a backlog: the next round at once
            }
            if assigned > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(PACE) => {}
                    _ = shutdown.wait() => return,
                }
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.wait() => return,
            }
        }
    }

    /// Follows `mes_feed` notifications (from any replica's sequencer) to wake subscribers.
    pub async fn run_listener(self, shutdown: Shutdown) {
        loop {
            let mut listener = match sqlx::postgres::PgListener::connect_with(&self.pool).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "feed listener cannot connect");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = shutdown.wait() => return,
                    }
                }
            };
            if let Err(e) = listener.listen(CHANNEL).await {
                tracing::warn!(error = %e, "feed listener cannot listen");
                continue;
            }
            loop {
                tokio::select! {
                    n = listener.recv() => match n {
                        Ok(n) => {
                            if let Ok(head) = n.payload().parse::<i64>() {
                                self.head_tx.send_if_modified(|h| if head > *h { *h = head; true } else { false });
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "feed listener lost its connection");
                            break;
                        }
                    },
                    _ = shutdown.wait() => return,
                }
            }
        }
    }

    /// Reads up to `READ_BATCH` sequenced events after `after`.
    pub async fn read_after(&self, after: i64) -> Result<Vec<pb::Event>, sqlx::Error> {
        let rows = sqlx::query("SELECT position, payload FROM event_log WHERE position > $1 ORDER BY position LIMIT $2")
            .bind(after)
            .bind(READ_BATCH)
            .fetch_all(&self.pool)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let position: i64 = r.get("position");
            let payload: Vec<u8> = r.get("payload");
            match pb::Event::decode(payload.as_slice()) {
                Ok(mut e) => {
                    e.position = position as u64;
                    out.push(e);
                }
                Err(err) => {
                    // Never silently skip: surface it, the consumer retries from its cursor.
                    tracing::error!(position, error = %err, "undecodable event");
                    return Err(sqlx::Error::Decode(Box::new(err)));
                }
            }
        }
        Ok(out)
    }

    /// Streams every event after `after` in order, then follows new ones, until the receiver
    /// goes away or shutdown.
    pub async fn stream(
        self,
        mut after: i64,
        consumer: String,
        tx: tokio::sync::mpsc::Sender<Result<pb::Event, tonic::Status>>,
        shutdown: Shutdown,
    ) {
        let mut head = self.head_rx.clone();
        tracing::info!(consumer = %consumer, after, "feed subscriber connected");
        loop {
            head.borrow_and_update();
            match self.read_after(after).await {
                Ok(events) if !events.is_empty() => {
                    let n = events.len();
                    for mut e in events {
                        after = e.position as i64;
                        // What the subscriber still has to receive after this one.
                        e.head_position = (*head.borrow() as u64).max(e.position);
                        if tx.send(Ok(e)).await.is_err() {
                            tracing::info!(consumer = %consumer, "feed subscriber went away");
                            return;
                        }
                    }
                    metrics::gauge!("feed_subscriber_position", "consumer" => consumer.clone())
                        .set(after as f64);
                    if n as i64 == READ_BATCH {
                        continue;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(consumer = %consumer, error = %e, "feed read failed");
                    let _ = tx
                        .send(Err(tonic::Status::unavailable(
                            "event feed temporarily unavailable",
                        )))
                        .await;
                    return;
                }
            }
            tokio::select! {
                _ = head.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = tx.closed() => return,
                _ = shutdown.wait() => return,
            }
        }
    }
}
