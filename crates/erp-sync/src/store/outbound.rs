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

pub use mes_common::feed::stored_position as feed_position;

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
///
/// Set-based: the production scans of the batch are written with one statement
/// ([`PendingScans`]) — before anything that reads them (a completion, a void) and at the end
/// of the batch — so the outcome is that of applying the events one by one in feed order.
pub async fn apply(
    pool: &PgPool,
    consumer: &str,
    token: i64,
    events: &[FeedEvent],
) -> Result<Applied, ApplyError> {
    let mut tx = pool.begin().await?;
    crate::store::lease::check(&mut tx, token).await?;
    custom_plans(&mut tx).await?;
    // Creates the consumer's cursor on its first batch and locks it (no other batch of this
    // consumer runs beside this one).
    let start = mes_common::feed::lock_cursor(&mut tx, consumer).await?;
    let mut applied = Applied {
        position: start,
        ..Default::default()
    };
    // Production events of this batch not yet looked at as late production, by position.
    let mut flushed = start;
    let mut traceparents: BTreeMap<i64, &str> = BTreeMap::new();
    let mut pending = PendingScans::default();
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
                pending.push(PendingScan {
                    scan_id: *scan_id,
                    position: e.position,
                    work_order,
                    operation: *operation,
                    station,
                    line,
                    operator,
                    scanned_at: *scanned_at,
                });
                traceparents.insert(e.position, e.traceparent.as_str());
            }
            Fact::Completed(completion) => {
                pending.write(&mut tx).await?;
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
                // The voided scan may be one of this batch.
                pending.write(&mut tx).await?;
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
    pending.write(&mut tx).await?;
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

/// Makes every statement of the transaction `tx` get a plan for its own parameters. sqlx keeps
/// statements prepared per connection, and PostgreSQL switches a prepared statement to a
/// generic plan after five executions: built while production_scans or outbox was empty (a
/// fresh database, just vacuumed), that plan seq-scans the table as it grows, until the next
/// ANALYZE replans it. Planning the few statements of a batch each time costs far less.
async fn custom_plans(tx: &mut Transaction<'_, Postgres>) -> Result<(), sqlx::Error> {
    // SET LOCAL, as a query (pg_stat_statements counts a prepared SET once only).
    sqlx::query("SELECT set_config('plan_cache_mode', 'force_custom_plan', true)")
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// A production scan of the batch, as [`Fact::Production`] carries it.
struct PendingScan<'a> {
    scan_id: Uuid,
    position: i64,
    work_order: &'a str,
    operation: i32,
    station: &'a str,
    line: &'a ProductionLine,
    operator: &'a str,
    scanned_at: DateTime<Utc>,
}

/// Production scans of a batch not written yet. [`PendingScans::write`] stores them with one
/// statement, in feed order, each scan once: a scan stored before, or twice in the batch, keeps
/// its first row (`ON CONFLICT DO NOTHING`, as row by row). Written before anything reads
/// production_scans (a completion, a void) and at the end of the batch, so the outcome is that
/// of writing them one by one.
#[derive(Default)]
struct PendingScans<'a> {
    scans: Vec<PendingScan<'a>>,
}

impl<'a> PendingScans<'a> {
    fn push(&mut self, scan: PendingScan<'a>) {
        self.scans.push(scan);
    }

    async fn write(&mut self, tx: &mut Transaction<'_, Postgres>) -> Result<(), sqlx::Error> {
        if self.scans.is_empty() {
            return Ok(());
        }
        let scans = std::mem::take(&mut self.scans);
        let column = |f: fn(&PendingScan<'a>) -> &'a str| scans.iter().map(f).collect::<Vec<_>>();
        sqlx::query(
            "INSERT INTO production_scans (scan_id, position, work_order, operation, station, kind,
                 lot, material, quantity, operator, scanned_at)
             SELECT scan_id, position, work_order, operation, station, kind, lot, material,
                    quantity, operator, scanned_at
             FROM UNNEST($1::uuid[], $2::int8[], $3::text[], $4::int4[], $5::text[], $6::text[],
                         $7::text[], $8::text[], $9::numeric[], $10::text[], $11::timestamptz[])
                  AS s (scan_id, position, work_order, operation, station, kind, lot, material,
                        quantity, operator, scanned_at)
             ORDER BY position
             ON CONFLICT (scan_id) DO NOTHING",
        )
        .bind(scans.iter().map(|s| s.scan_id).collect::<Vec<_>>())
        .bind(scans.iter().map(|s| s.position).collect::<Vec<_>>())
        .bind(column(|s| s.work_order))
        .bind(scans.iter().map(|s| s.operation).collect::<Vec<_>>())
        .bind(column(|s| s.station))
        .bind(
            scans
                .iter()
                .map(|s| s.line.kind.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(column(|s| &s.line.lot))
        .bind(column(|s| &s.line.material))
        .bind(scans.iter().map(|s| s.line.quantity).collect::<Vec<_>>())
        .bind(column(|s| s.operator))
        .bind(scans.iter().map(|s| s.scanned_at).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
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
    custom_plans(&mut tx).await?;
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
    // Each unreported scan with the operation's own (latest) confirmation, if any (a scan
    // that named no operation, from older feeds, belongs to the one at its station); a scan
    // without one is not late: the operation's completion will confirm it.
    let rows = sqlx::query(
        "SELECT s.scan_id, s.position, s.work_order, s.kind, s.lot, s.material, s.quantity,
                s.operator, s.scanned_at,
                c.idempotency_key AS follows, c.operation AS confirmed_operation,
                c.station AS confirmed_station
         FROM production_scans s
         CROSS JOIN LATERAL (
             SELECT o.idempotency_key, o.operation,
                    COALESCE(o.payload->>'station', '') AS station
             FROM outbox o
             WHERE o.kind = 'confirmation' AND o.follows IS NULL AND o.work_order = s.work_order
               AND (o.operation = s.operation
                    OR (s.operation = 0 AND o.payload->>'station' = s.station))
             ORDER BY o.id DESC LIMIT 1) c
         WHERE s.position > $1 AND s.position <= $2 AND s.confirmation_key IS NULL
           AND NOT s.voided
         ORDER BY s.position",
    )
    .bind(after)
    .bind(upto)
    .fetch_all(&mut **tx)
    .await?;
    // Confirmation key → (operation, station, late scans in feed order), in the order of the
    // first late scan of each: the follow-ups are queued in feed order.
    struct Late {
        work_order: String,
        operation: i32,
        station: String,
        scans: Vec<sqlx::postgres::PgRow>,
    }
    let mut groups: Vec<(String, Late)> = Vec::new();
    for row in rows {
        let key: String = row.get("follows");
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, late)) => late.scans.push(row),
            None => groups.push((
                key,
                Late {
                    work_order: row.get("work_order"),
                    operation: row.get("confirmed_operation"),
                    station: row.get("confirmed_station"),
                    scans: vec![row],
                },
            )),
        }
    }
    if groups.is_empty() {
        return Ok(0);
    }
    // One follow-up per group, written with one statement each for the scans and the outbox.
    let mut marked: (Vec<Uuid>, Vec<String>) = (Vec::new(), Vec::new());
    let mut rows: Vec<FollowUpRow> = Vec::with_capacity(groups.len());
    for (follows, late) in groups {
        let (Some(first), Some(last)) = (late.scans.first(), late.scans.last()) else {
            continue;
        };
        let first_scan: Uuid = first.get("scan_id");
        let first_position: i64 = first.get("position");
        let operation = u32::try_from(late.operation).unwrap_or(0);
        let key = domain::follow_up_key(&late.work_order, operation, &first_scan.to_string());
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
            serde_json::to_string(&follow_up).map_err(|e| sqlx::Error::Encode(e.into()))?;
        for scan in &late.scans {
            marked.0.push(scan.get("scan_id"));
            marked.1.push(key.clone());
        }
        rows.push(FollowUpRow {
            traceparent: traceparents
                .get(&first_position)
                .copied()
                .unwrap_or_default()
                .to_owned(),
            scans: late.scans.len(),
            key,
            follows,
            work_order: late.work_order,
            operation: late.operation,
            payload,
            follow_up,
        });
    }
    sqlx::query(
        "UPDATE production_scans p SET confirmation_key = m.key
         FROM UNNEST($1::uuid[], $2::text[]) AS m (scan_id, key)
         WHERE p.scan_id = m.scan_id",
    )
    .bind(&marked.0)
    .bind(&marked.1)
    .execute(&mut **tx)
    .await?;
    // In group order: per work order, the outbox is delivered in id order.
    let inserted: Vec<String> = sqlx::query_scalar(
        "INSERT INTO outbox (idempotency_key, work_order, operation, payload, traceparent, follows)
         SELECT key, work_order, operation, payload::jsonb, traceparent, follows
         FROM UNNEST($1::text[], $2::text[], $3::int4[], $4::text[], $5::text[], $6::text[])
              WITH ORDINALITY AS f (key, work_order, operation, payload, traceparent, follows, n)
         ORDER BY n
         ON CONFLICT (idempotency_key) DO NOTHING
         RETURNING idempotency_key",
    )
    .bind(rows.iter().map(|r| r.key.as_str()).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|r| r.work_order.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|r| r.operation).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.payload.as_str()).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|r| r.traceparent.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|r| r.follows.as_str()).collect::<Vec<_>>())
    .fetch_all(&mut **tx)
    .await?;
    let mut queued = 0;
    for r in rows.iter().filter(|r| inserted.contains(&r.key)) {
        queued += 1;
        tracing::info!(work_order = %r.work_order, operation = r.operation,
            idempotency_key = %r.key, follows = %r.follows, scans = r.scans,
            good = %r.follow_up.good_quantity, scrap = %r.follow_up.scrap_quantity,
            "late production: follow-up queued");
    }
    Ok(queued)
}

/// A follow-up [`queue_follow_ups`] queues.
struct FollowUpRow {
    key: String,
    follows: String,
    work_order: String,
    operation: i32,
    payload: String,
    traceparent: String,
    scans: usize,
    follow_up: domain::Confirmation,
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
