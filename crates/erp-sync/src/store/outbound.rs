//! Outbound state: the feed cursor, the production scans of open operations and the outbox.
//!
//! Events are applied in one transaction together with the cursor that covers them, so each
//! event takes effect exactly once however often the feed is replayed.
//!
//! An event this build cannot read (a kind added by a newer scan-ingest during a rolling
//! upgrade, or a payload that may carry production but does not decode) is never skipped
//! silently — that would under-report production to the ERP for good: the batch is applied up
//! to it, the cursor stops in front of it (the stall is recorded with the cursor) and the
//! consumer reports it until erp-sync is upgraded — or an operator records the position in
//! `feed_skips`, which lets the consumer pass it with an audit trail (as in trace-query).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::Value;
use sqlx::{PgConnection, PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::domain::{self, Completion, ProductionKind, ProductionLine, VoidOf};

/// What an event of the feed means for erp-sync.
#[derive(Debug, Clone, PartialEq)]
pub enum Fact {
    /// A produce, consume or scrap scan of a work order.
    Production {
        scan_id: Uuid,
        work_order: String,
        /// 0 when the scan did not name it (then its station decides).
        operation: i32,
        station: String,
        line: ProductionLine,
        operator: String,
        scanned_at: DateTime<Utc>,
    },
    /// An operation was completed: its confirmation is due.
    Completed(Completion),
    /// A scan was voided (by the void scan `void_scan`, when the event names it).
    Voided {
        original: Uuid,
        void_scan: String,
        voided_by: String,
        reason: String,
        voided_at: DateTime<Utc>,
    },
    /// Nothing for erp-sync (a known event without effect here: holds, master data, other
    /// scan kinds).
    Other,
    /// An event this build cannot read, which may carry production: the consumer stops in
    /// front of it unless its position is recorded in `feed_skips`.
    Unreadable { reason: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct FeedEvent {
    pub position: i64,
    /// The event's kind as the feed names it (`scan.accepted`, ...).
    pub kind: String,
    pub traceparent: String,
    pub fact: Fact,
}

/// An event the consumer cannot apply: the cursor stays in front of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stop {
    pub position: i64,
    pub kind: String,
    pub reason: String,
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "event {} ({}) cannot be applied: {}",
            self.position, self.kind, self.reason
        )
    }
}

impl std::error::Error for Stop {}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("feed gap: expected position {expected}, got {got}")]
    Gap { expected: i64, got: i64 },
    /// Another replica took the scheduler's lease: this one must stop.
    #[error(transparent)]
    Fenced(crate::store::lease::FenceError),
    #[error("database error")]
    Db(#[from] sqlx::Error),
}

impl From<crate::store::lease::FenceError> for ApplyError {
    fn from(e: crate::store::lease::FenceError) -> Self {
        match e {
            crate::store::lease::FenceError::Db(e) => ApplyError::Db(e),
            fenced => ApplyError::Fenced(fenced),
        }
    }
}

/// The result of applying a batch of events.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The cursor after the batch.
    pub position: i64,
    /// Confirmations queued.
    pub confirmations: usize,
    /// Reversals queued (voids of scans already confirmed to the ERP).
    pub reversals: usize,
    /// Follow-ups queued (production booked after its operation's confirmation).
    pub follow_ups: usize,
    /// The event the batch stopped in front of (this build cannot read it), if any.
    pub stopped: Option<Stop>,
}

pub async fn feed_position(pool: &PgPool, consumer: &str) -> Result<i64, sqlx::Error> {
    Ok(
        sqlx::query_scalar("SELECT position FROM feed_cursor WHERE consumer = $1")
            .bind(consumer)
            .fetch_optional(pool)
            .await?
            .unwrap_or(0),
    )
}

/// The event `consumer` is stopped in front of, as recorded with its cursor (any replica can
/// read it), if any.
pub async fn stall(pool: &PgPool, consumer: &str) -> Result<Option<Stop>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT position, stalled_kind, stalled_reason FROM feed_cursor
         WHERE consumer = $1 AND stalled_kind IS NOT NULL",
    )
    .bind(consumer)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| Stop {
        position: r.get::<i64, _>("position") + 1,
        kind: r.get("stalled_kind"),
        reason: r
            .get::<Option<String>, _>("stalled_reason")
            .unwrap_or_default(),
    }))
}

/// Applies `events` (in position order) and moves the cursor, in one transaction, while the
/// scheduler's lease `token` is current. Events at or before the stored cursor are skipped (a
/// replay); a hole in the positions is refused. An unreadable event ([`Fact::Unreadable`])
/// ends the batch in front of it ([`Applied::stopped`]) unless `feed_skips` names it.
pub async fn apply(
    pool: &PgPool,
    consumer: &str,
    token: i64,
    events: &[FeedEvent],
) -> Result<Applied, ApplyError> {
    let mut tx = pool.begin().await?;
    crate::store::lease::check(&mut tx, token).await?;
    sqlx::query(
        "INSERT INTO feed_cursor (consumer, position) VALUES ($1, 0) ON CONFLICT DO NOTHING",
    )
    .bind(consumer)
    .execute(&mut *tx)
    .await?;
    let start: i64 =
        sqlx::query_scalar("SELECT position FROM feed_cursor WHERE consumer = $1 FOR UPDATE")
            .bind(consumer)
            .fetch_one(&mut *tx)
            .await?;
    let mut applied = Applied {
        position: start,
        ..Default::default()
    };
    // Production events of this batch not yet looked at as late production, by position.
    let mut flushed = start;
    let mut traceparents: BTreeMap<i64, &str> = BTreeMap::new();
    for e in events {
        if e.position <= applied.position {
            continue;
        }
        if e.position != applied.position + 1 {
            return Err(ApplyError::Gap {
                expected: applied.position + 1,
                got: e.position,
            });
        }
        match &e.fact {
            Fact::Unreadable { reason } => {
                if !skip_allowed(&mut tx, consumer, e.position).await? {
                    applied.stopped = Some(Stop {
                        position: e.position,
                        kind: e.kind.clone(),
                        reason: reason.clone(),
                    });
                    break;
                }
                tracing::warn!(position = e.position, kind = %e.kind, reason = %reason,
                    "unreadable event skipped as recorded in feed_skips");
            }
            Fact::Production {
                scan_id,
                work_order,
                operation,
                station,
                line,
                operator,
                scanned_at,
            } => {
                sqlx::query(
                    "INSERT INTO production_scans (scan_id, position, work_order, operation, station, kind,
                         lot, material, quantity, operator, scanned_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (scan_id) DO NOTHING",
                )
                .bind(scan_id)
                .bind(e.position)
                .bind(work_order)
                .bind(operation)
                .bind(station)
                .bind(line.kind.as_str())
                .bind(&line.lot)
                .bind(&line.material)
                .bind(line.quantity)
                .bind(operator)
                .bind(scanned_at)
                .execute(&mut *tx)
                .await?;
                traceparents.insert(e.position, e.traceparent.as_str());
            }
            Fact::Completed(completion) => {
                // Late production before this completion follows the confirmation it came
                // after (feed order), before this completion confirms anything.
                applied.follow_ups +=
                    queue_follow_ups(&mut tx, flushed, applied.position, &traceparents).await?;
                flushed = applied.position;
                if queue_confirmation(&mut tx, completion, e.position, &e.traceparent).await? {
                    applied.confirmations += 1;
                }
            }
            Fact::Voided {
                original,
                void_scan,
                voided_by,
                reason,
                voided_at,
            } => {
                let row = sqlx::query(
                    "UPDATE production_scans SET voided = true WHERE scan_id = $1
                     RETURNING confirmation_key, work_order, operation, station, kind, lot,
                               material, quantity",
                )
                .bind(original)
                .fetch_optional(&mut *tx)
                .await?;
                // Not reported yet: the flag keeps it out of the coming confirmation.
                if let Some(row) = row
                    && let Some(key) = row.get::<Option<String>, _>("confirmation_key")
                {
                    let void_scan = if void_scan.is_empty() {
                        // A scan is voided once: its own id keys the reversal as well.
                        original.to_string()
                    } else {
                        void_scan.clone()
                    };
                    let void = VoidOf {
                        work_order: row.get("work_order"),
                        operation: 0,
                        station: row.get("station"),
                        reverses: key,
                        voided_scan: original.to_string(),
                        void_scan,
                        voided_at: *voided_at,
                        voided_by: voided_by.clone(),
                        reason: reason.clone(),
                    };
                    let line = ProductionKind::parse(row.get::<&str, _>("kind")).map(|kind| {
                        ProductionLine {
                            kind,
                            lot: row.get("lot"),
                            material: row.get("material"),
                            quantity: row.get::<Decimal, _>("quantity"),
                        }
                    });
                    let operation: i32 = row.get("operation");
                    if let Some(line) = line
                        && queue_reversal(&mut tx, void, operation, &line, &e.traceparent).await?
                    {
                        applied.reversals += 1;
                    }
                }
            }
            Fact::Other => {}
        }
        applied.position = e.position;
    }
    applied.follow_ups +=
        queue_follow_ups(&mut tx, flushed, applied.position, &traceparents).await?;
    if let Some(stop) = &applied.stopped {
        // The stall is recorded with the cursor (in front of the event): stalled_since is kept
        // while the consumer retries the same event.
        sqlx::query(
            "UPDATE feed_cursor SET position = $2,
                 updated_at = CASE WHEN position <> $2 THEN now() ELSE updated_at END,
                 stalled_since = CASE WHEN position <> $2 OR stalled_kind IS NULL THEN now()
                                      ELSE stalled_since END,
                 stalled_kind = $3, stalled_reason = $4
             WHERE consumer = $1",
        )
        .bind(consumer)
        .bind(applied.position)
        .bind(&stop.kind)
        .bind(&stop.reason)
        .execute(&mut *tx)
        .await?;
    } else if applied.position != start {
        sqlx::query(
            "UPDATE feed_cursor SET position = $2, updated_at = now(),
                 stalled_kind = NULL, stalled_reason = NULL, stalled_since = NULL
             WHERE consumer = $1",
        )
        .bind(consumer)
        .bind(applied.position)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(applied)
}

/// Late production a build before follow-ups left unreported: production scans below
/// `consumer`'s cursor that nothing reported (`confirmation_key` NULL) although their
/// operation was confirmed already (that build confirmed an operation once and never looked
/// at scans after it). Queued as follow-ups like any late production ([`queue_follow_ups`]
/// over the whole stored feed), once: the scans are marked with the follow-up's key, so a
/// second run finds nothing. Runs in one transaction fenced by the lease `token`, with the
/// cursor row locked (no batch of the feed runs beside it). Returns the follow-ups queued.
pub async fn queue_stranded_follow_ups(
    pool: &PgPool,
    consumer: &str,
    token: i64,
) -> Result<usize, ApplyError> {
    let mut tx = pool.begin().await?;
    crate::store::lease::check(&mut tx, token).await?;
    let cursor: Option<i64> =
        sqlx::query_scalar("SELECT position FROM feed_cursor WHERE consumer = $1 FOR UPDATE")
            .bind(consumer)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(cursor) = cursor else {
        return Ok(0);
    };
    let queued = queue_follow_ups(&mut tx, 0, cursor, &BTreeMap::new()).await?;
    tx.commit().await?;
    Ok(queued)
}

/// Whether an operator recorded `position` in `feed_skips` for `consumer` (then stamped as
/// used, in the batch's transaction).
async fn skip_allowed(
    tx: &mut Transaction<'_, Postgres>,
    consumer: &str,
    position: i64,
) -> Result<bool, sqlx::Error> {
    let found = sqlx::query(
        "UPDATE feed_skips SET skipped_at = COALESCE(skipped_at, now())
         WHERE consumer = $1 AND position = $2",
    )
    .bind(consumer)
    .bind(position)
    .execute(&mut **tx)
    .await?;
    Ok(found.rows_affected() > 0)
}

/// Marks the operation's unconfirmed scans (those before the completion in the feed) as
/// confirmed and queues their confirmation. Returns false when it was queued before (a feed
/// replayed from an older cursor): then nothing changes.
async fn queue_confirmation(
    tx: &mut Transaction<'_, Postgres>,
    completion: &Completion,
    position: i64,
    traceparent: &str,
) -> Result<bool, sqlx::Error> {
    let key = completion.idempotency_key();
    let queued: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM outbox WHERE idempotency_key = $1)")
            .bind(&key)
            .fetch_one(&mut **tx)
            .await?;
    if queued {
        return Ok(false);
    }
    // Scans that named the operation, and those that named none at the operation's station.
    let rows = sqlx::query(
        "UPDATE production_scans SET confirmation_key = $4
         WHERE work_order = $1 AND confirmation_key IS NULL AND NOT voided AND position < $5
           AND (operation = $2 OR (operation = 0 AND station = $3))
         RETURNING kind, lot, material, quantity",
    )
    .bind(&completion.work_order)
    .bind(completion.operation as i32)
    .bind(&completion.station)
    .bind(&key)
    .bind(position)
    .fetch_all(&mut **tx)
    .await?;
    let lines: Vec<ProductionLine> = rows
        .iter()
        .filter_map(|r| {
            Some(ProductionLine {
                kind: ProductionKind::parse(r.get::<&str, _>("kind"))?,
                lot: r.get("lot"),
                material: r.get("material"),
                quantity: r.get::<Decimal, _>("quantity"),
            })
        })
        .collect();
    let confirmation = domain::build_confirmation(completion, &lines);
    let payload = serde_json::to_value(&confirmation).map_err(|e| sqlx::Error::Encode(e.into()))?;
    sqlx::query(
        "INSERT INTO outbox (idempotency_key, work_order, operation, payload, traceparent)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&key)
    .bind(&completion.work_order)
    .bind(completion.operation as i32)
    .bind(payload)
    .bind(traceparent)
    .execute(&mut **tx)
    .await?;
    tracing::info!(work_order = %completion.work_order, operation = completion.operation,
        idempotency_key = %key, good = %confirmation.good_quantity,
        scrap = %confirmation.scrap_quantity, "confirmation queued");
    Ok(true)
}

/// Production scans at positions `after < position <= upto` that nothing reported yet and whose
/// operation was confirmed already (late production: the MES accepts scans on a completed
/// operation, e.g. from a tablet that was offline) become follow-ups: one per confirmation
/// they follow and per call (i.e. per batch of the feed, split at completions), keyed by the
/// first late scan, carrying only their own quantities. The scans are marked with the
/// follow-up's key in the same transaction as the cursor, so a replayed feed finds them
/// reported and queues nothing (and the key is derived from the scans, not from the batch).
/// A scan voided before it was reported is left out; voided after, it is reversed against
/// the follow-up like any confirmed scan. Returns the number of follow-ups queued.
async fn queue_follow_ups(
    tx: &mut Transaction<'_, Postgres>,
    after: i64,
    upto: i64,
    traceparents: &BTreeMap<i64, &str>,
) -> Result<usize, sqlx::Error> {
    if upto <= after {
        return Ok(0);
    }
    let rows = sqlx::query(
        "SELECT scan_id, position, work_order, operation, station, kind, lot, material, quantity,
                operator, scanned_at
         FROM production_scans
         WHERE position > $1 AND position <= $2 AND confirmation_key IS NULL AND NOT voided
         ORDER BY position",
    )
    .bind(after)
    .bind(upto)
    .fetch_all(&mut **tx)
    .await?;
    // Confirmation key → (operation, station, late scans in feed order).
    struct Late {
        work_order: String,
        operation: i32,
        station: String,
        scans: Vec<sqlx::postgres::PgRow>,
    }
    let mut groups: Vec<(String, Late)> = Vec::new();
    for row in rows {
        let work_order: String = row.get("work_order");
        let operation: i32 = row.get("operation");
        let station: String = row.get("station");
        // The operation's own (latest) confirmation; a scan that named no operation (older
        // feeds) belongs to the one at its station.
        let confirmed = sqlx::query(
            "SELECT idempotency_key, operation, COALESCE(payload->>'station', '') AS station
             FROM outbox
             WHERE kind = 'confirmation' AND follows IS NULL AND work_order = $1
               AND (operation = $2 OR ($2 = 0 AND payload->>'station' = $3))
             ORDER BY id DESC LIMIT 1",
        )
        .bind(&work_order)
        .bind(operation)
        .bind(&station)
        .fetch_optional(&mut **tx)
        .await?;
        let Some(confirmed) = confirmed else {
            // Not late: the operation's completion will confirm it.
            continue;
        };
        let key: String = confirmed.get("idempotency_key");
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, late)) => late.scans.push(row),
            None => groups.push((
                key,
                Late {
                    work_order,
                    operation: confirmed.get("operation"),
                    station: confirmed.get("station"),
                    scans: vec![row],
                },
            )),
        }
    }
    let mut queued = 0;
    for (follows, late) in groups {
        let (Some(first), Some(last)) = (late.scans.first(), late.scans.last()) else {
            continue;
        };
        let first_scan: Uuid = first.get("scan_id");
        let first_position: i64 = first.get("position");
        let operation = u32::try_from(late.operation).unwrap_or(0);
        let key = domain::follow_up_key(&late.work_order, operation, &first_scan.to_string());
        let ids: Vec<Uuid> = late.scans.iter().map(|r| r.get("scan_id")).collect();
        let lines: Vec<ProductionLine> = late
            .scans
            .iter()
            .filter_map(|r| {
                Some(ProductionLine {
                    kind: ProductionKind::parse(r.get::<&str, _>("kind"))?,
                    lot: r.get("lot"),
                    material: r.get("material"),
                    quantity: r.get::<Decimal, _>("quantity"),
                })
            })
            .collect();
        let last_at: DateTime<Utc> = last.get("scanned_at");
        let last_by: String = last.get("operator");
        let follow_up = domain::build_follow_up(
            &follows,
            &late.work_order,
            operation,
            &late.station,
            &first_scan.to_string(),
            (last_at, &last_by),
            &lines,
        );
        let payload =
            serde_json::to_value(&follow_up).map_err(|e| sqlx::Error::Encode(e.into()))?;
        sqlx::query("UPDATE production_scans SET confirmation_key = $2 WHERE scan_id = ANY($1)")
            .bind(&ids)
            .bind(&key)
            .execute(&mut **tx)
            .await?;
        let inserted = sqlx::query(
            "INSERT INTO outbox (idempotency_key, work_order, operation, payload, traceparent, follows)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (idempotency_key) DO NOTHING",
        )
        .bind(&key)
        .bind(&late.work_order)
        .bind(late.operation)
        .bind(payload)
        .bind(traceparents.get(&first_position).copied().unwrap_or_default())
        .bind(&follows)
        .execute(&mut **tx)
        .await?
        .rows_affected()
            > 0;
        if inserted {
            queued += 1;
            tracing::info!(work_order = %late.work_order, operation, idempotency_key = %key,
                follows = %follows, scans = ids.len(), good = %follow_up.good_quantity,
                scrap = %follow_up.scrap_quantity, "late production: follow-up queued");
        }
    }
    Ok(queued)
}

/// Queues the reversal of a voided scan that `void.reverses` reported, once per void scan
/// (a replayed feed finds it queued). The operation is the confirmation's (the scan may have
/// named none). Returns whether it was queued now.
async fn queue_reversal(
    tx: &mut Transaction<'_, Postgres>,
    mut void: VoidOf,
    scan_operation: i32,
    line: &ProductionLine,
    traceparent: &str,
) -> Result<bool, sqlx::Error> {
    let confirmed_operation: Option<i32> =
        sqlx::query_scalar("SELECT operation FROM outbox WHERE idempotency_key = $1")
            .bind(&void.reverses)
            .fetch_optional(&mut **tx)
            .await?;
    void.operation = u32::try_from(confirmed_operation.unwrap_or(scan_operation)).unwrap_or(0);
    let reversal = domain::build_reversal(&void, line);
    let key = reversal.idempotency_key();
    let payload = serde_json::to_value(&reversal).map_err(|e| sqlx::Error::Encode(e.into()))?;
    let queued = sqlx::query(
        "INSERT INTO outbox (idempotency_key, kind, work_order, operation, payload, traceparent)
         VALUES ($1, 'reversal', $2, $3, $4, $5) ON CONFLICT (idempotency_key) DO NOTHING",
    )
    .bind(&key)
    .bind(&reversal.work_order)
    .bind(reversal.operation as i32)
    .bind(payload)
    .bind(traceparent)
    .execute(&mut **tx)
    .await?
    .rows_affected()
        > 0;
    if queued {
        tracing::info!(work_order = %reversal.work_order, operation = reversal.operation,
            idempotency_key = %key, reverses = %reversal.reverses,
            voided_scan = %reversal.voided_scan, "reversal queued");
    }
    Ok(queued)
}

/// What an outbox row carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxKind {
    Confirmation,
    Reversal,
}

impl OutboxKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxKind::Confirmation => "confirmation",
            OutboxKind::Reversal => "reversal",
        }
    }
}

/// A queued confirmation or reversal.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub kind: OutboxKind,
    pub idempotency_key: String,
    pub payload: Value,
    pub traceparent: String,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
}

/// The next row to deliver: among the heads of the work orders' queues (per work order,
/// delivery is in queue order), the one due first. A row waits while an earlier row of its
/// work order is still pending, or is a confirmation set aside as a dead letter (a follow-up
/// or a reversal must not reach the ERP before the confirmation it amends, nor a later
/// confirmation overtake it): that work order is held, the others go on. A dead-lettered
/// reversal holds nothing (no later row depends on it).
pub async fn next_pending(pool: &PgPool) -> Result<Option<OutboxRow>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT id, kind, idempotency_key, payload, traceparent, attempts, next_attempt_at
         FROM outbox o WHERE status = 'pending' AND NOT EXISTS (
             SELECT 1 FROM outbox e WHERE e.work_order = o.work_order AND e.id < o.id
               AND (e.status = 'pending' OR (e.status = 'failed' AND e.kind = 'confirmation')))
         ORDER BY next_attempt_at, id LIMIT 1",
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| OutboxRow {
        id: r.get("id"),
        kind: match r.get::<&str, _>("kind") {
            "reversal" => OutboxKind::Reversal,
            _ => OutboxKind::Confirmation,
        },
        idempotency_key: r.get("idempotency_key"),
        payload: r.get("payload"),
        traceparent: r.get("traceparent"),
        attempts: r.get("attempts"),
        next_attempt_at: r.get("next_attempt_at"),
    }))
}

/// Pending rows held behind a dead-lettered confirmation of their work order.
pub async fn held(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM outbox o WHERE status = 'pending' AND EXISTS (
             SELECT 1 FROM outbox e WHERE e.work_order = o.work_order AND e.id < o.id
               AND e.status = 'failed' AND e.kind = 'confirmation')",
    )
    .fetch_one(pool)
    .await
}

/// The changes below run in the delivery's fenced transaction (see [`crate::store::lease`]).
pub async fn mark_delivered(conn: &mut PgConnection, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE outbox SET status = 'delivered', delivered_at = now(), attempts = attempts + 1,
             last_error = '' WHERE id = $1",
    )
    .bind(id)
    .execute(conn)
    .await?;
    Ok(())
}

/// The ERP refused the row for good, or it exhausted its attempts: it leaves the queue (kept
/// for inspection and replay).
pub async fn mark_failed(
    conn: &mut PgConnection,
    id: i64,
    error: &str,
    attempted: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE outbox SET status = 'failed', attempts = attempts + $3, last_error = $2 WHERE id = $1",
    )
    .bind(id)
    .bind(error)
    .bind(i32::from(attempted))
    .execute(conn)
    .await?;
    Ok(())
}

/// Puts a refused or exhausted (`failed`) outbox row back into the queue, to be tried at once
/// with a fresh count of attempts. Returns false when there is no such failed row (delivered
/// or pending already).
pub async fn requeue_failed(pool: &PgPool, idempotency_key: &str) -> Result<bool, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE outbox SET status = 'pending', next_attempt_at = now(), attempts = 0
         WHERE idempotency_key = $1 AND status = 'failed'",
    )
    .bind(idempotency_key)
    .execute(pool)
    .await?
    .rows_affected()
        > 0)
}

/// The status of the outbox row with this key (`None`: there is none).
pub async fn status_of(
    pool: &PgPool,
    idempotency_key: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT status FROM outbox WHERE idempotency_key = $1")
        .bind(idempotency_key)
        .fetch_optional(pool)
        .await
}

/// A transient failure: try again at `next_attempt_at`; `attempted`: count it as an attempt
/// toward `erp.max_attempts` (refused credentials, and failures while the ERP is down as a
/// whole, are not the row's fault and count none: see [`crate::delivery`]).
pub async fn reschedule(
    conn: &mut PgConnection,
    id: i64,
    next_attempt_at: DateTime<Utc>,
    error: &str,
    attempted: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE outbox SET attempts = attempts + $4, next_attempt_at = $2, last_error = $3 WHERE id = $1",
    )
    .bind(id)
    .bind(next_attempt_at)
    .bind(error)
    .bind(i32::from(attempted))
    .execute(conn)
    .await?;
    Ok(())
}

/// Pending confirmations and the age of the oldest, in seconds.
pub async fn depth(pool: &PgPool) -> Result<(i64, f64), sqlx::Error> {
    let row = sqlx::query(
        "SELECT count(*) AS n,
                COALESCE(EXTRACT(EPOCH FROM now() - min(created_at))::float8, 0) AS oldest
         FROM outbox WHERE status = 'pending'",
    )
    .fetch_one(pool)
    .await?;
    Ok((row.get("n"), row.get("oldest")))
}
