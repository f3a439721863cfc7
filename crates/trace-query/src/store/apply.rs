//! The projection: applies events of scan-ingest's feed to the read model.
//!
//! A batch of events is applied in one transaction together with the cursor that covers it, so
//! each event takes effect exactly once however often the feed is replayed: events at or before
//! the stored cursor are skipped, a hole in the positions is refused (the consumer then
//! resubscribes from the stored cursor).
//!
//! Consecutive `scan.accepted` events (nearly all of the feed) are applied as a run, set-based:
//! one statement for their scans, one for the lots they produce, one for their genealogy
//! edges, one for the operations they complete (see [`Run`]). Any other event ends the run and
//! is applied on its own, so every event sees the effects of the ones before it, as if the
//! events were applied one by one.
//!
//! An event this build cannot read (a kind added by a newer scan-ingest during a rolling
//! upgrade, or a payload that does not decode) is never skipped silently: the batch is applied
//! up to it, the cursor stops in front of it and the consumer reports the stall (log, metrics,
//! health) until trace-query is upgraded — or an operator records the position in `feed_skips`,
//! which lets the projection pass it with an audit trail.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use mes_proto::v1 as pb;
use mes_proto::v1::event::Payload;
use rust_decimal::Decimal;
use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::domain::{self, Changes, Invalidation, MAX_DEPTH};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("feed gap: expected position {expected}, got {got}")]
    Gap { expected: i64, got: i64 },
    #[error("event {position} ({kind}) cannot be applied: {reason}")]
    Unreadable {
        position: i64,
        kind: String,
        reason: String,
    },
    #[error("database error")]
    Db(#[from] sqlx::Error),
}

/// The result of applying a batch.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Applied {
    /// The cursor after the batch.
    pub position: i64,
    /// Events applied (not counting replays skipped).
    pub events: usize,
    /// Occurrence time of the last applied event.
    pub last_occurred_at: Option<DateTime<Utc>>,
    /// The cached answers the batch made stale.
    pub invalidation: Invalidation,
    /// The event the batch stopped in front of (it cannot be applied by this build), if any.
    pub stopped: Option<Stop>,
    /// The `cache_invalidations` row committed with the batch (its cache deletions, done once
    /// the cache has removed them), if the batch made anything stale.
    pub pending: Option<i64>,
}

/// An event the projection cannot apply: the cursor stays in front of it.
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

/// The stored cursor of `consumer` (0: nothing applied yet).
pub use mes_common::feed::stored_position as cursor;

/// Empties the read model and sets the cursor of `consumer` back to 0, in one transaction: the
/// consumer then replays the feed from the start.
pub async fn reset(pool: &PgPool, consumer: &str) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "TRUNCATE materials, stations, work_orders, work_order_operations, lots, scans,
                  genealogy_edges, production_hourly",
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO feed_cursor (consumer, position) VALUES ($1, 0)
         ON CONFLICT (consumer) DO UPDATE SET position = 0, updated_at = now()",
    )
    .bind(consumer)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Applies `events` (in position order) and moves the cursor, in one transaction.
pub async fn apply(
    pool: &PgPool,
    consumer: &str,
    events: &[pb::Event],
) -> Result<Applied, ApplyError> {
    let mut tx = pool.begin().await?;
    let start = mes_common::feed::lock_cursor(&mut tx, consumer).await?;
    let mut applied = Applied {
        position: start,
        ..Default::default()
    };
    let mut st = BatchState::default();
    let mut run = Run::default();
    for e in events {
        let position = i64::try_from(e.position).unwrap_or(i64::MAX);
        if position <= applied.position {
            continue;
        }
        if position != applied.position + 1 {
            return Err(ApplyError::Gap {
                expected: applied.position + 1,
                got: position,
            });
        }
        match decode(e) {
            Err(reason) => {
                // (It has no effect: the run goes on across it.)
                if !skip_allowed(&mut tx, consumer, position).await? {
                    applied.stopped = Some(Stop {
                        position,
                        kind: e.kind.clone(),
                        reason: reason.into(),
                    });
                    break;
                }
                tracing::warn!(position, kind = %e.kind, reason, "unreadable event skipped as recorded in feed_skips");
            }
            Ok(Some(row)) => run.push(&mut tx, &mut st, row, position).await?,
            Ok(None) => {
                run.flush(&mut tx, &mut st).await?;
                apply_event(&mut tx, e, position, &mut st).await?;
            }
        }
        applied.position = position;
        applied.events += 1;
        applied.last_occurred_at = domain::time_of(e.occurred_at.as_ref());
    }
    run.flush(&mut tx, &mut st).await?;
    if applied.events == 0 {
        tx.rollback().await?;
        return Ok(applied);
    }
    applied.invalidation = expand(&mut tx, st.changes).await?;
    // The deletions this batch owes the cache, committed with it: a crash between the commit
    // and the deletions leaves them here for any replica to replay (see `crate::cache`).
    let keys = applied.invalidation.keys();
    let lots: Vec<String> = applied
        .invalidation
        .changes
        .new_lots
        .iter()
        .cloned()
        .collect();
    applied.pending = finish(
        &mut tx,
        consumer,
        applied.position,
        &st.rollup,
        &keys,
        &lots,
    )
    .await?;
    tx.commit().await?;
    Ok(applied)
}

/// Whether this build can apply `e` (a payload it knows, with the fields the projection
/// needs), and the scan row of a `scan.accepted` event.
fn decode(e: &pb::Event) -> Result<Option<ScanRow>, &'static str> {
    let occurred_at = domain::time_of(e.occurred_at.as_ref()).unwrap_or_else(Utc::now);
    match &e.payload {
        None => Err("unknown event kind (is scan-ingest newer than this trace-query?)"),
        Some(Payload::ScanAccepted(a)) => a
            .scan
            .as_ref()
            .and_then(|stored| ScanRow::from_stored(stored, occurred_at))
            .map(Some)
            .ok_or("the accepted scan does not decode"),
        Some(Payload::ScanVoided(v)) => match &v.void_scan {
            Some(stored) if ScanRow::from_stored(stored, occurred_at).is_some() => Ok(None),
            _ => Err("the void scan does not decode"),
        },
        Some(_) => Ok(None),
    }
}

/// Whether an operator recorded `position` in `feed_skips` (marked as used).
async fn skip_allowed(
    tx: &mut Transaction<'_, Postgres>,
    consumer: &str,
    position: i64,
) -> Result<bool, sqlx::Error> {
    let found = sqlx::query(
        "UPDATE feed_skips SET skipped_at = now() WHERE consumer = $1 AND position = $2",
    )
    .bind(consumer)
    .bind(position)
    .execute(&mut **tx)
    .await?;
    Ok(found.rows_affected() > 0)
}

/// A scan kind's wire name (the contract's table; "" when unknown).
fn kind_name(kind: i32) -> &'static str {
    mes_domain::ScanKind::name_of(kind)
}

/// The stored kind name as a `'static` one ("" when unknown).
fn static_kind(kind: &str) -> &'static str {
    mes_domain::ScanKind::parse(kind).map_or("", mes_domain::ScanKind::as_str)
}

fn quantity(s: &str) -> Option<Decimal> {
    if s.is_empty() { None } else { s.parse().ok() }
}

/// A scan of the feed, as stored in the read model.
struct ScanRow {
    scan_id: Uuid,
    kind: &'static str,
    work_order: String,
    operation: i32,
    station: String,
    lot: String,
    into_lot: String,
    material: String,
    quantity: Option<Decimal>,
    result: String,
    defect_code: String,
    operator: String,
    scanned_at: DateTime<Utc>,
    received_at: DateTime<Utc>,
    trace_id: String,
    voids: Option<Uuid>,
}

impl ScanRow {
    fn from_stored(stored: &pb::StoredScan, occurred_at: DateTime<Utc>) -> Option<Self> {
        let s = stored.scan.as_ref()?;
        let scan_id = Uuid::parse_str(&s.scan_id).ok()?;
        let kind = kind_name(s.kind);
        if kind.is_empty() {
            return None;
        }
        let received_at = domain::time_of(stored.received_at.as_ref()).unwrap_or(occurred_at);
        Some(Self {
            scan_id,
            kind,
            work_order: s.work_order.clone(),
            operation: i32::try_from(s.operation).unwrap_or(0),
            station: s.station.clone(),
            lot: s.lot.clone(),
            into_lot: s.into_lot.clone(),
            material: if stored.material.is_empty() {
                s.material.clone()
            } else {
                stored.material.clone()
            },
            quantity: quantity(&s.quantity),
            result: match pb::InspectResult::try_from(s.result) {
                Ok(pb::InspectResult::Pass) => "pass".into(),
                Ok(pb::InspectResult::Fail) => "fail".into(),
                _ => String::new(),
            },
            defect_code: s.defect_code.clone(),
            operator: stored.operator.clone(),
            scanned_at: domain::time_of(s.scanned_at.as_ref()).unwrap_or(received_at),
            received_at,
            trace_id: domain::trace_id_of(&stored.traceparent),
            voids: Uuid::parse_str(&stored.voids).ok(),
        })
    }
}

async fn apply_event(
    tx: &mut Transaction<'_, Postgres>,
    e: &pb::Event,
    position: i64,
    st: &mut BatchState,
) -> Result<(), sqlx::Error> {
    let occurred_at = domain::time_of(e.occurred_at.as_ref()).unwrap_or_else(Utc::now);
    match &e.payload {
        // Applied in runs (see `Run`).
        Some(Payload::ScanAccepted(_)) => {}
        Some(Payload::ScanVoided(v)) => {
            let void = v
                .void_scan
                .as_ref()
                .and_then(|s| ScanRow::from_stored(s, occurred_at));
            let original = v
                .original
                .as_ref()
                .and_then(|s| ScanRow::from_stored(s, occurred_at));
            // `decode` checked the void scan.
            if let Some(void) = void {
                scan_voided(tx, void, original, position, st).await?;
            }
        }
        Some(Payload::LotReceived(l)) => lot_received(tx, l, occurred_at, st).await?,
        Some(Payload::WorkOrder(w)) => work_order_upserted(tx, w, st).await?,
        Some(Payload::Material(m)) => {
            sqlx::query(
                "INSERT INTO materials (number, description, tracking, unit) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (number) DO UPDATE SET description = EXCLUDED.description,
                     tracking = EXCLUDED.tracking, unit = EXCLUDED.unit",
            )
            .bind(&m.number)
            .bind(&m.description)
            .bind(&m.tracking)
            .bind(&m.unit)
            .execute(&mut **tx)
            .await?;
        }
        Some(Payload::Station(s)) => {
            sqlx::query(
                "INSERT INTO stations (id, name) VALUES ($1, $2)
                 ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name",
            )
            .bind(&s.id)
            .bind(&s.name)
            .execute(&mut **tx)
            .await?;
        }
        // Holds and releases do not change any answer of trace-query.
        Some(Payload::LotStatusChanged(_)) => {}
        _ => tracing::debug!(position, kind = %e.kind, "event without effect on the read model"),
    }
    Ok(())
}

/// The routing step of a scan: the one scan-ingest published (it resolves a scan that named
/// none); for events without it, resolved here the same way — the first unfinished operation
/// at the scan's station, else the last one there.
async fn resolve_step(
    tx: &mut Transaction<'_, Postgres>,
    row: &ScanRow,
) -> Result<i32, sqlx::Error> {
    if row.operation != 0 || row.work_order.is_empty() {
        return Ok(row.operation);
    }
    Ok(sqlx::query_scalar(
        "SELECT step FROM work_order_operations WHERE work_order = $1 AND station = $2
         ORDER BY completed, CASE WHEN completed THEN -step ELSE step END LIMIT 1",
    )
    .bind(&row.work_order)
    .bind(&row.station)
    .fetch_optional(&mut **tx)
    .await?
    .unwrap_or(0))
}

async fn insert_scan(
    tx: &mut Transaction<'_, Postgres>,
    row: &ScanRow,
    position: i64,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "INSERT INTO scans (scan_id, position, kind, work_order, operation, station, lot, into_lot,
                            material, quantity, result, defect_code, operator, scanned_at,
                            received_at, trace_id, voids)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
         ON CONFLICT (scan_id) DO NOTHING",
    )
    .bind(row.scan_id)
    .bind(position)
    .bind(row.kind)
    .bind(&row.work_order)
    .bind(row.operation)
    .bind(&row.station)
    .bind(&row.lot)
    .bind(&row.into_lot)
    .bind(&row.material)
    .bind(row.quantity)
    .bind(&row.result)
    .bind(&row.defect_code)
    .bind(&row.operator)
    .bind(row.scanned_at)
    .bind(row.received_at)
    .bind(&row.trace_id)
    .bind(row.voids)
    .execute(&mut **tx)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// The hourly rollup of a batch: (hour, station, material, work order) → (good, scrap, scans).
type Rollup = BTreeMap<(DateTime<Utc>, String, String, String), (Decimal, Decimal, i64)>;

/// What a batch changed: for the cache, and the production rollup (summed in memory, written
/// once per batch).
#[derive(Default)]
struct BatchState {
    changes: Changes,
    rollup: Rollup,
}

impl BatchState {
    /// Adds (`sign` = 1) or removes (`sign` = -1) a scan's share of the hourly production rollup.
    fn rollup(&mut self, row: &ScanRow, sign: i64) {
        let q = row.quantity.unwrap_or_default() * Decimal::from(sign);
        let (good, scrap) = match row.kind {
            "produce" => (q, Decimal::ZERO),
            "scrap" => (Decimal::ZERO, q),
            _ => (Decimal::ZERO, Decimal::ZERO),
        };
        let hour = row
            .scanned_at
            .duration_trunc(TimeDelta::hours(1))
            .unwrap_or(row.scanned_at);
        let e = self
            .rollup
            .entry((
                hour,
                row.station.clone(),
                row.material.clone(),
                row.work_order.clone(),
            ))
            .or_default();
        e.0 += good;
        e.1 += scrap;
        e.2 += sign;
    }
}

/// Writes the batch's hourly rollup, the cache deletions it owes (if any) and its cursor, in
/// one statement; returns the `cache_invalidations` row.
async fn finish(
    tx: &mut Transaction<'_, Postgres>,
    consumer: &str,
    position: i64,
    rollup: &Rollup,
    keys: &[String],
    lots: &[String],
) -> Result<Option<i64>, sqlx::Error> {
    let n = rollup.len();
    let (mut hours, mut stations, mut materials, mut wos) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut goods, mut scraps, mut counts) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for ((hour, station, material, wo), (good, scrap, scans)) in rollup {
        hours.push(*hour);
        stations.push(station.as_str());
        materials.push(material.as_str());
        wos.push(wo.as_str());
        goods.push(*good);
        scraps.push(*scrap);
        counts.push(*scans);
    }
    sqlx::query_scalar(
        "WITH rollup AS (
             INSERT INTO production_hourly (hour, station, material, work_order, good, scrap,
                                            scans)
             SELECT * FROM UNNEST($5::timestamptz[], $6::text[], $7::text[], $8::text[],
                                  $9::numeric[], $10::numeric[], $11::bigint[])
             ON CONFLICT (hour, station, material, work_order) DO UPDATE SET
                 good = production_hourly.good + EXCLUDED.good,
                 scrap = production_hourly.scrap + EXCLUDED.scrap,
                 scans = production_hourly.scans + EXCLUDED.scans
         ),
         cursor AS (
             UPDATE feed_cursor SET position = $2, updated_at = now() WHERE consumer = $1
         )
         INSERT INTO cache_invalidations (keys, lots)
         SELECT $3, $4 WHERE cardinality($3::text[]) > 0 OR cardinality($4::text[]) > 0
         RETURNING id",
    )
    .bind(consumer)
    .bind(position)
    .bind(keys)
    .bind(lots)
    .bind(&hours)
    .bind(&stations)
    .bind(&materials)
    .bind(&wos)
    .bind(&goods)
    .bind(&scraps)
    .bind(&counts)
    .fetch_optional(&mut **tx)
    .await
}

fn touched(changes: &mut Changes, row: &ScanRow) {
    for lot in [&row.lot, &row.into_lot] {
        if !lot.is_empty() {
            changes.history.insert(lot.clone());
        }
    }
    if !row.work_order.is_empty() {
        changes.work_orders.insert(row.work_order.clone());
    }
    changes.reports = true;
}

/// Consecutive `scan.accepted` events of a batch, written set-based when the run ends.
///
/// Applied one by one, each accepted scan is inserted unless the read model has it already (a
/// replay), and only an inserted one takes effect: a produce adds to its lot and links every
/// standing consume (without `into_lot`) of its work order to the lot; such a consume links
/// its lot to every lot its work order produced so far; a consume naming `into_lot` links
/// exactly that lot; a complete marks its operation. Within a run nothing is voided and no
/// work order changes, so these effects do not depend on the order of the run's scans: the
/// edges are every (consume, lot) pair of a work order in which the consume or the produce is
/// new, whichever came first; a lot's quantity is the sum, its time the earliest, its material
/// the first non-empty one. [`Run::flush`] writes exactly that, with the same conflict rules,
/// and reports the same [`Changes`].
#[derive(Default)]
struct Run {
    rows: Vec<(ScanRow, i64)>,
}

impl Run {
    async fn push(
        &mut self,
        tx: &mut Transaction<'_, Postgres>,
        st: &mut BatchState,
        mut row: ScanRow,
        position: i64,
    ) -> Result<(), sqlx::Error> {
        if row.operation == 0 && !row.work_order.is_empty() {
            // The step depends on which operations are completed: those this run completes
            // first.
            if self
                .rows
                .iter()
                .any(|(r, _)| r.kind == "complete_operation" && r.work_order == row.work_order)
            {
                self.flush(tx, st).await?;
            }
            row.operation = resolve_step(tx, &row).await?;
        }
        self.rows.push((row, position));
        Ok(())
    }

    async fn flush(
        &mut self,
        tx: &mut Transaction<'_, Postgres>,
        st: &mut BatchState,
    ) -> Result<(), sqlx::Error> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let mut rows = std::mem::take(&mut self.rows);
        // A scan sent twice takes effect the first time only.
        let mut seen = HashSet::with_capacity(rows.len());
        rows.retain(|(r, _)| seen.insert(r.scan_id));
        let inserted: HashSet<Uuid> = insert_scans(tx, &rows).await?.into_iter().collect();
        let mut produced = Produced::default();
        let (mut consumes, mut exact) = (Vec::new(), Vec::new());
        let mut completed = BTreeSet::new();
        for (row, _) in rows.iter().filter(|(r, _)| inserted.contains(&r.scan_id)) {
            touched(&mut st.changes, row);
            st.rollup(row, 1);
            match row.kind {
                "produce" => {
                    produced.push(row);
                    st.changes.node_changed(&row.lot);
                    st.changes.produced.insert(row.lot.clone());
                }
                "consume" if !row.into_lot.is_empty() => {
                    exact.push(row.scan_id);
                    st.changes.edge_added(&row.lot, &row.into_lot);
                }
                "consume" => consumes.push(row.scan_id),
                "complete_operation" => {
                    completed.insert((row.work_order.clone(), row.operation));
                }
                _ => {}
            }
        }
        if !produced.lots.is_empty() {
            for lot in produce_lots(tx, &produced).await? {
                st.changes.new_lots.insert(lot);
            }
        }
        if !consumes.is_empty() || !exact.is_empty() || !produced.lots.is_empty() {
            for (from, to) in link(tx, &consumes, &produced, &exact).await? {
                st.changes.edge_added(&from, &to);
            }
        }
        if !completed.is_empty() {
            let (wos, steps): (Vec<String>, Vec<i32>) = completed.into_iter().unzip();
            sqlx::query(
                "UPDATE work_order_operations o SET completed = true
                 FROM UNNEST($1::text[], $2::int[]) AS u(work_order, step)
                 WHERE o.work_order = u.work_order AND o.step = u.step",
            )
            .bind(&wos)
            .bind(&steps)
            // Planned with its keys each time: a generic plan made on a small table scans it.
            .persistent(false)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }
}

/// Inserts the scans that the read model does not have yet; returns their ids.
async fn insert_scans(
    tx: &mut Transaction<'_, Postgres>,
    rows: &[(ScanRow, i64)],
) -> Result<Vec<Uuid>, sqlx::Error> {
    let n = rows.len();
    let mut ids = Vec::with_capacity(n);
    let mut positions = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    let mut wos = Vec::with_capacity(n);
    let mut operations = Vec::with_capacity(n);
    let mut stations = Vec::with_capacity(n);
    let mut lots = Vec::with_capacity(n);
    let mut into_lots = Vec::with_capacity(n);
    let mut materials = Vec::with_capacity(n);
    let mut quantities = Vec::with_capacity(n);
    let mut results = Vec::with_capacity(n);
    let mut defects = Vec::with_capacity(n);
    let mut operators = Vec::with_capacity(n);
    let mut scanned = Vec::with_capacity(n);
    let mut received = Vec::with_capacity(n);
    let mut traces = Vec::with_capacity(n);
    let mut voids = Vec::with_capacity(n);
    for (r, position) in rows {
        ids.push(r.scan_id);
        positions.push(*position);
        kinds.push(r.kind);
        wos.push(r.work_order.as_str());
        operations.push(r.operation);
        stations.push(r.station.as_str());
        lots.push(r.lot.as_str());
        into_lots.push(r.into_lot.as_str());
        materials.push(r.material.as_str());
        quantities.push(r.quantity);
        results.push(r.result.as_str());
        defects.push(r.defect_code.as_str());
        operators.push(r.operator.as_str());
        scanned.push(r.scanned_at);
        received.push(r.received_at);
        traces.push(r.trace_id.as_str());
        voids.push(r.voids);
    }
    sqlx::query_scalar(
        "INSERT INTO scans (scan_id, position, kind, work_order, operation, station, lot, into_lot,
                            material, quantity, result, defect_code, operator, scanned_at,
                            received_at, trace_id, voids)
         SELECT * FROM UNNEST($1::uuid[], $2::bigint[], $3::text[], $4::text[], $5::int[],
                              $6::text[], $7::text[], $8::text[], $9::text[], $10::numeric[],
                              $11::text[], $12::text[], $13::text[], $14::timestamptz[],
                              $15::timestamptz[], $16::text[], $17::uuid[])
         ON CONFLICT (scan_id) DO NOTHING
         RETURNING scan_id",
    )
    .bind(&ids)
    .bind(&positions)
    .bind(&kinds)
    .bind(&wos)
    .bind(&operations)
    .bind(&stations)
    .bind(&lots)
    .bind(&into_lots)
    .bind(&materials)
    .bind(&quantities)
    .bind(&results)
    .bind(&defects)
    .bind(&operators)
    .bind(&scanned)
    .bind(&received)
    .bind(&traces)
    .bind(&voids)
    .fetch_all(&mut **tx)
    .await
}

/// The new produce scans of a run, in feed order.
#[derive(Default)]
struct Produced {
    lots: Vec<String>,
    materials: Vec<String>,
    work_orders: Vec<String>,
    quantities: Vec<Decimal>,
    at: Vec<DateTime<Utc>>,
}

impl Produced {
    fn push(&mut self, row: &ScanRow) {
        self.lots.push(row.lot.clone());
        self.materials.push(row.material.clone());
        self.work_orders.push(row.work_order.clone());
        self.quantities.push(row.quantity.unwrap_or_default());
        self.at.push(row.scanned_at);
    }
}

/// Creates or adds to the produced lots (as their produce scans would one by one: the first
/// one creates the lot with its work order, each adds its quantity, the earliest time wins, a
/// lot without material takes the first one given); returns the lots created.
async fn produce_lots(
    tx: &mut Transaction<'_, Postgres>,
    p: &Produced,
) -> Result<Vec<String>, sqlx::Error> {
    let rows: Vec<(String, bool)> = sqlx::query_as(
        "INSERT INTO lots (lot, material, origin, work_order, quantity, produced_at)
         SELECT lot,
                COALESCE((array_agg(material ORDER BY i) FILTER (WHERE material <> ''))[1], ''),
                'produced', (array_agg(work_order ORDER BY i))[1], sum(quantity), min(at)
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::numeric[], $5::timestamptz[])
              WITH ORDINALITY AS u(lot, material, work_order, quantity, at, i)
         GROUP BY lot
         ON CONFLICT (lot) DO UPDATE SET
             quantity = lots.quantity + EXCLUDED.quantity,
             produced_at = LEAST(lots.produced_at, EXCLUDED.produced_at),
             material = CASE WHEN lots.material = '' THEN EXCLUDED.material ELSE lots.material END
         RETURNING lot, (xmax = 0)",
    )
    .bind(&p.lots)
    .bind(&p.materials)
    .bind(&p.work_orders)
    .bind(&p.quantities)
    .bind(&p.at)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(lot, created)| created.then_some(lot))
        .collect())
}

/// The genealogy edges of a run's new scans: each new consume without `into_lot` into every
/// lot its work order produced (in this run or before); every standing consume without
/// `into_lot` of a work order into each lot the run produced for it; each new consume naming
/// `into_lot` into that lot. Returns the edges added.
async fn link(
    tx: &mut Transaction<'_, Postgres>,
    consumes: &[Uuid],
    produced: &Produced,
    exact: &[Uuid],
) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "WITH new_consumes AS MATERIALIZED (
             SELECT scan_id, lot, work_order, quantity, station, operator, scanned_at
             FROM scans WHERE scan_id = ANY($1::uuid[])
         ),
         new_lots AS MATERIALIZED (
             SELECT DISTINCT work_order, lot FROM UNNEST($2::text[], $3::text[]) AS u(work_order, lot)
         ),
         edges AS (
             SELECT c.scan_id, c.lot AS from_lot, p.lot AS to_lot, c.work_order, c.quantity,
                    c.station, c.operator, c.scanned_at
             FROM new_consumes c
             JOIN (SELECT DISTINCT s.work_order, s.lot FROM scans s
                   WHERE s.work_order IN (SELECT work_order FROM new_consumes)
                     AND s.kind = 'produce' AND s.voided_by IS NULL) p
               ON p.work_order = c.work_order
           UNION
             SELECT c.scan_id, c.lot, p.lot, c.work_order, c.quantity, c.station, c.operator,
                    c.scanned_at
             FROM new_lots p
             JOIN scans c ON c.work_order = p.work_order AND c.kind = 'consume'
                         AND c.into_lot = '' AND c.voided_by IS NULL
         )
         INSERT INTO genealogy_edges (consume_scan, from_lot, to_lot, exact, work_order,
                                      quantity, station, operator, at)
         SELECT scan_id, from_lot, to_lot, false, work_order, COALESCE(quantity, 0), station,
                operator, scanned_at
         FROM edges
         UNION ALL
         SELECT scan_id, lot, into_lot, true, work_order, COALESCE(quantity, 0), station,
                operator, scanned_at
         FROM scans WHERE scan_id = ANY($4::uuid[])
         ON CONFLICT DO NOTHING
         RETURNING from_lot, to_lot",
    )
    .bind(consumes)
    .bind(&produced.work_orders)
    .bind(&produced.lots)
    .bind(exact)
    // Planned with its keys each time: a generic plan made on a small table scans it.
    .persistent(false)
    .fetch_all(&mut **tx)
    .await
}

async fn scan_voided(
    tx: &mut Transaction<'_, Postgres>,
    void: ScanRow,
    original: Option<ScanRow>,
    position: i64,
    st: &mut BatchState,
) -> Result<(), sqlx::Error> {
    let Some(original_id) = void.voids.or(original.as_ref().map(|o| o.scan_id)) else {
        tracing::warn!(position, "scan.voided event without the voided scan's id");
        return Ok(());
    };
    let mut void = void;
    void.voids = Some(original_id);
    void.kind = "void";
    if !insert_scan(tx, &void, position).await? {
        return Ok(());
    }
    touched(&mut st.changes, &void);
    let row = sqlx::query(
        "UPDATE scans SET voided_by = $2 WHERE scan_id = $1 AND voided_by IS NULL
         RETURNING kind, work_order, operation, station, lot, into_lot, material, quantity, scanned_at",
    )
    .bind(original_id)
    .bind(void.scan_id)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(r) = row else {
        tracing::warn!(position, scan_id = %original_id, "void of a scan the read model does not know");
        return Ok(());
    };
    let kind: String = r.get("kind");
    let original = ScanRow {
        scan_id: original_id,
        kind: static_kind(&kind),
        work_order: r.get("work_order"),
        operation: r.get("operation"),
        station: r.get("station"),
        lot: r.get("lot"),
        into_lot: r.get("into_lot"),
        material: r.get("material"),
        quantity: r.get("quantity"),
        result: String::new(),
        defect_code: String::new(),
        operator: String::new(),
        scanned_at: r.get("scanned_at"),
        received_at: void.received_at,
        trace_id: String::new(),
        voids: None,
    };
    touched(&mut st.changes, &original);
    st.rollup(&original, -1);
    match original.kind {
        "consume" => {
            let removed: Vec<(String, String)> = sqlx::query_as(
                "DELETE FROM genealogy_edges WHERE consume_scan = $1 RETURNING from_lot, to_lot",
            )
            .bind(original_id)
            .fetch_all(&mut **tx)
            .await?;
            for (from, to) in removed {
                st.changes.edge_removed(&from, &to);
            }
        }
        "produce" => {
            sqlx::query(
                "UPDATE lots SET quantity = quantity - $2,
                     produced_at = COALESCE((SELECT min(scanned_at) FROM scans
                                             WHERE lot = $1 AND kind = 'produce' AND voided_by IS NULL),
                                            produced_at)
                 WHERE lot = $1",
            )
            .bind(&original.lot)
            .bind(original.quantity.unwrap_or_default())
            .execute(&mut **tx)
            .await?;
            st.changes.node_changed(&original.lot);
            // The work order's inputs went into this lot only while one of its produce scans stands.
            let removed: Vec<String> = sqlx::query_scalar(
                "DELETE FROM genealogy_edges e
                 WHERE e.to_lot = $1 AND e.work_order = $2 AND NOT e.exact
                   AND NOT EXISTS (SELECT 1 FROM scans p WHERE p.work_order = $2 AND p.kind = 'produce'
                                     AND p.lot = $1 AND p.voided_by IS NULL)
                 RETURNING e.from_lot",
            )
            .bind(&original.lot)
            .bind(&original.work_order)
            .fetch_all(&mut **tx)
            .await?;
            for from in removed {
                st.changes.edge_removed(&from, &original.lot);
            }
        }
        "complete_operation" => {
            sqlx::query(
                "UPDATE work_order_operations SET completed = false WHERE work_order = $1 AND step = $2",
            )
            .bind(&original.work_order)
            .bind(original.operation)
            .execute(&mut **tx)
            .await?;
        }
        _ => {}
    }
    Ok(())
}

async fn lot_received(
    tx: &mut Transaction<'_, Postgres>,
    l: &pb::ReceivedLot,
    occurred_at: DateTime<Utc>,
    st: &mut BatchState,
) -> Result<(), sqlx::Error> {
    if l.lot.is_empty() {
        return Ok(());
    }
    let received_at = domain::time_of(l.received_at.as_ref()).unwrap_or(occurred_at);
    let created: Option<bool> = sqlx::query_scalar(
        "INSERT INTO lots (lot, material, origin, supplier, supplier_lot, quantity, produced_at)
         VALUES ($1, $2, 'received', $3, $4, $5, $6)
         ON CONFLICT (lot) DO UPDATE SET material = EXCLUDED.material, supplier = EXCLUDED.supplier,
             supplier_lot = EXCLUDED.supplier_lot, quantity = EXCLUDED.quantity,
             produced_at = COALESCE(lots.produced_at, EXCLUDED.produced_at)
         WHERE lots.origin = 'received'
         RETURNING (xmax = 0)",
    )
    .bind(&l.lot)
    .bind(&l.material)
    .bind(&l.supplier)
    .bind(&l.supplier_lot)
    .bind(quantity(&l.quantity).unwrap_or_default())
    .bind(received_at)
    .fetch_optional(&mut **tx)
    .await?;
    match created {
        Some(created) => {
            if created {
                st.changes.new_lots.insert(l.lot.clone());
            }
            st.changes.node_changed(&l.lot);
        }
        None => tracing::warn!(lot = %l.lot, "received lot already known as produced; kept"),
    }
    Ok(())
}

async fn work_order_upserted(
    tx: &mut Transaction<'_, Postgres>,
    w: &pb::WorkOrderSpec,
    st: &mut BatchState,
) -> Result<(), sqlx::Error> {
    if w.number.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO work_orders (number, material, planned_quantity, status) VALUES ($1, $2, $3, $4)
         ON CONFLICT (number) DO UPDATE SET material = EXCLUDED.material,
             planned_quantity = EXCLUDED.planned_quantity, status = EXCLUDED.status",
    )
    .bind(&w.number)
    .bind(&w.material)
    .bind(quantity(&w.planned_quantity).unwrap_or_default())
    .bind(&w.status)
    .execute(&mut **tx)
    .await?;
    let steps: Vec<i32> = w
        .operations
        .iter()
        .map(|o| i32::try_from(o.step).unwrap_or(0))
        .collect();
    sqlx::query("DELETE FROM work_order_operations WHERE work_order = $1 AND NOT (step = ANY($2))")
        .bind(&w.number)
        .bind(&steps)
        .execute(&mut **tx)
        .await?;
    sqlx::query(
        "INSERT INTO work_order_operations (work_order, step, station, description)
         SELECT $1, * FROM UNNEST($2::int[], $3::text[], $4::text[])
         ON CONFLICT (work_order, step) DO UPDATE SET station = EXCLUDED.station,
             description = EXCLUDED.description",
    )
    .bind(&w.number)
    .bind(&steps)
    .bind(
        w.operations
            .iter()
            .map(|o| o.station.clone())
            .collect::<Vec<_>>(),
    )
    .bind(
        w.operations
            .iter()
            .map(|o| o.description.clone())
            .collect::<Vec<_>>(),
    )
    .execute(&mut **tx)
    .await?;
    st.changes.work_orders.insert(w.number.clone());
    Ok(())
}

/// The lots whose cached answers a batch made stale, in one statement: `true` rows are the
/// descendants of the backward roots ($1), `false` rows the ancestors of the forward roots
/// ($2), roots included, over the current edges and the ones removed in this batch ($3 → $4),
/// to the deepest depth any answer shows ($5).
const STALE: &str = "
WITH RECURSIVE removed(from_lot, to_lot) AS MATERIALIZED (
    SELECT * FROM UNNEST($3::text[], $4::text[])
),
down(lot, depth) AS (
    SELECT DISTINCT r, 0 FROM UNNEST($1::text[]) AS r
  UNION
    SELECT n.lot, w.depth + 1
    FROM down w
    CROSS JOIN LATERAL (
        SELECT e.to_lot AS lot FROM genealogy_edges e WHERE e.from_lot = w.lot
        UNION ALL
        SELECT r.to_lot FROM removed r WHERE r.from_lot = w.lot
    ) n
    WHERE w.depth < $5
),
up(lot, depth) AS (
    SELECT DISTINCT r, 0 FROM UNNEST($2::text[]) AS r
  UNION
    SELECT n.lot, w.depth + 1
    FROM up w
    CROSS JOIN LATERAL (
        SELECT e.from_lot AS lot FROM genealogy_edges e WHERE e.to_lot = w.lot
        UNION ALL
        SELECT r.from_lot FROM removed r WHERE r.to_lot = w.lot
    ) n
    WHERE w.depth < $5
)
SELECT DISTINCT true AS backward, lot FROM down
UNION ALL
SELECT DISTINCT false, lot FROM up";

/// Expands a batch's [`Changes`] into the lots whose cached genealogy answers are stale.
async fn expand(
    tx: &mut Transaction<'_, Postgres>,
    changes: Changes,
) -> Result<Invalidation, sqlx::Error> {
    let (removed_from, removed_to): (Vec<String>, Vec<String>) =
        changes.removed_edges.iter().cloned().unzip();
    let (mut backward, mut forward) = (Vec::new(), Vec::new());
    if changes.touches_genealogy() {
        let rows: Vec<(bool, String)> = sqlx::query_as(STALE)
            .bind(
                changes
                    .back_roots
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>(),
            )
            .bind(
                changes
                    .fwd_roots
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>(),
            )
            .bind(&removed_from)
            .bind(&removed_to)
            .bind(MAX_DEPTH as i32)
            .fetch_all(&mut **tx)
            .await?;
        for (back, lot) in rows {
            if back {
                backward.push(lot);
            } else {
                forward.push(lot);
            }
        }
    }
    Ok(Invalidation {
        backward,
        forward,
        changes,
    })
}
