//! Holds, releases and voids: the supervisor's and quality's corrections. Each is one
//! transaction with its event; a void is a new `void` scan, never an update of the original.

use mes_common::identity::Caller;
use mes_proto::v1 as pb;
use rust_decimal::Decimal;
use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::domain::Kind;
use crate::error::Error;
use crate::store::{events, queries, scans::stored_scan};

fn require_reason(reason: &str) -> Result<(), Error> {
    if reason.trim().is_empty() {
        return Err(Error::invalid("reason", "is required"));
    }
    if reason.len() > 1000 {
        return Err(Error::invalid("reason", "must be at most 1000 characters"));
    }
    Ok(())
}

/// Puts a lot on hold (`hold = true`) or releases it (who may is the API's business:
/// [`crate::api`]).
pub async fn set_hold(
    pool: &PgPool,
    lot: &str,
    reason: &str,
    hold: bool,
    caller: &Caller,
) -> Result<pb::Lot, Error> {
    require_reason(reason)?;
    let mut tx = pool.begin().await?;
    let row = sqlx::query("SELECT status, quantity_on_hand FROM lots WHERE lot = $1 FOR UPDATE")
        .bind(lot)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| Error::NotFound(format!("lot {lot}")))?;
    let status: String = row.get("status");
    let on_hand: Decimal = row.get("quantity_on_hand");
    let new_status = match (hold, status.as_str()) {
        (true, "on_hold") | (false, "active") => None,
        (true, "active") => Some("on_hold"),
        (false, "on_hold") => Some(if on_hand.is_zero() {
            "consumed"
        } else {
            "active"
        }),
        (_, other) => return Err(Error::FailedPrecondition(format!("lot {lot} is {other}"))),
    };
    if let Some(new_status) = new_status {
        sqlx::query("UPDATE lots SET status = $2, updated_at = now() WHERE lot = $1")
            .bind(lot)
            .bind(new_status)
            .execute(&mut *tx)
            .await?;
        let ev = events::event(
            "lot.status_changed",
            pb::event::Payload::LotStatusChanged(pb::LotStatusChanged {
                lot: lot.to_owned(),
                status: new_status.to_owned(),
                reason: reason.to_owned(),
                user: caller.user.clone(),
            }),
        );
        events::append(&mut tx, &[ev]).await?;
        tracing::info!(lot, status = new_status, user = %caller.user, "lot status changed");
    }
    tx.commit().await?;
    queries::get_lot(pool, lot).await
}

/// The reversal a void would apply, or why it cannot.
struct Plan {
    effects: Vec<pb::Effect>,
    refusal: Option<String>,
    original: pb::StoredScan,
}

fn effect(kind: &str, target: &str, delta: Option<Decimal>, description: String) -> pb::Effect {
    pb::Effect {
        kind: kind.to_owned(),
        target: target.to_owned(),
        delta: delta.map(|d| d.normalize().to_string()).unwrap_or_default(),
        description,
    }
}

async fn plan(tx: &mut Transaction<'_, Postgres>, id: Uuid) -> Result<Plan, Error> {
    // Lock the original first, then read whether it is voided in a later statement (a new
    // snapshot): of two concurrent voids the second waits here and then sees the first's void
    // (a conflict), instead of both passing the check and the second failing on the unique index.
    sqlx::query("SELECT 1 FROM scans WHERE scan_id = $1 FOR UPDATE")
        .bind(id)
        .execute(&mut **tx)
        .await?;
    let row = sqlx::query(
        "SELECT s.*, v.scan_id AS voided_by FROM scans s LEFT JOIN scans v ON v.voids = s.scan_id WHERE s.scan_id = $1",
    )
    .bind(id)
    .fetch_optional(&mut **tx)
    .await?
    .ok_or_else(|| Error::NotFound(format!("scan {id}")))?;
    let original = queries::stored_from_row(&row);
    let kind = Kind::parse(row.get::<&str, _>("kind")).unwrap_or(Kind::Inspect);
    let wo: String = row.get("work_order");
    let op: i32 = row.get("operation");
    let lot: String = row.get("lot");
    let q: Option<Decimal> = row.get("quantity");
    let q = q.unwrap_or_default();
    let mut effects = Vec::new();
    let mut refusal = None;
    if !original.voided_by.is_empty() {
        return Err(Error::Conflict(format!(
            "scan {id} was already voided by {}",
            original.voided_by
        )));
    }
    if kind == Kind::Void {
        return Err(Error::FailedPrecondition("a void cannot be voided".into()));
    }
    let wo_status: Option<String> = if wo.is_empty() {
        None
    } else {
        sqlx::query_scalar("SELECT status FROM work_orders WHERE number = $1 FOR UPDATE")
            .bind(&wo)
            .fetch_optional(&mut **tx)
            .await?
    };
    if matches!(wo_status.as_deref(), Some("closed" | "cancelled")) {
        refusal = Some(format!(
            "work order {wo} is {}",
            wo_status.unwrap_or_default()
        ));
    }
    let lot_row = if lot.is_empty() {
        None
    } else {
        sqlx::query("SELECT quantity_on_hand, status FROM lots WHERE lot = $1 FOR UPDATE")
            .bind(&lot)
            .fetch_optional(&mut **tx)
            .await?
    };
    let on_hand: Decimal = lot_row
        .as_ref()
        .map(|r| r.get("quantity_on_hand"))
        .unwrap_or_default();
    match kind {
        Kind::Consume => {
            effects.push(effect(
                "inventory",
                &lot,
                Some(q),
                format!("return {q} to lot {lot}"),
            ));
        }
        Kind::Produce => {
            if on_hand < q {
                refusal.get_or_insert(format!(
                    "lot {lot} was already used downstream: {on_hand} on hand, the void would remove {q}"
                ));
            }
            effects.push(effect(
                "inventory",
                &lot,
                Some(-q),
                format!("remove {q} from lot {lot}"),
            ));
            effects.push(effect(
                "work_order",
                &wo,
                Some(-q),
                format!("reduce produced quantity of {wo} operation {op}"),
            ));
        }
        Kind::Scrap => {
            effects.push(effect(
                "inventory",
                &lot,
                Some(q),
                format!("return {q} to lot {lot}"),
            ));
            effects.push(effect(
                "work_order",
                &wo,
                Some(-q),
                format!("reduce scrap quantity of {wo} operation {op}"),
            ));
        }
        Kind::StartOperation => {
            let later: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM scans s WHERE s.work_order = $1 AND s.operation = $2 AND s.scan_id <> $3
                   AND s.kind <> 'void' AND NOT EXISTS (SELECT 1 FROM scans v WHERE v.voids = s.scan_id)",
            )
            .bind(&wo)
            .bind(op)
            .bind(id)
            .fetch_one(&mut **tx)
            .await?;
            if later > 0 {
                refusal.get_or_insert(format!(
                    "operation {op} of {wo} already has {later} later scans; void those first"
                ));
            }
            effects.push(effect(
                "operation_status",
                &format!("{wo}/{op}"),
                None,
                "operation back to pending".into(),
            ));
        }
        Kind::CompleteOperation => {
            effects.push(effect(
                "operation_status",
                &format!("{wo}/{op}"),
                None,
                "operation back to in_progress".into(),
            ));
        }
        Kind::Move => {
            refusal.get_or_insert(
                "a move is undone by scanning a move back to the previous location".into(),
            );
        }
        Kind::Inspect => {
            effects.push(effect(
                "inspection",
                &lot,
                None,
                "the inspection result no longer counts".into(),
            ));
        }
        Kind::Void => {}
    }
    Ok(Plan {
        effects,
        refusal,
        original,
    })
}

/// Previews (`confirm = false`, changes nothing) or applies a void (who may is the API's
/// business: [`crate::api`]).
pub async fn void(
    pool: &PgPool,
    scan_id: &str,
    reason: &str,
    confirm: bool,
    caller: &Caller,
) -> Result<pb::VoidScanResponse, Error> {
    let id = Uuid::parse_str(scan_id).map_err(|_| Error::invalid("scan_id", "must be a UUID"))?;
    require_reason(reason)?;
    let mut tx = pool.begin().await?;
    let plan = plan(&mut tx, id).await?;
    if !confirm {
        tx.rollback().await?;
        return Ok(pb::VoidScanResponse {
            allowed: plan.refusal.is_none(),
            why: plan.refusal.unwrap_or_default(),
            effects: plan.effects,
            void_scan_id: String::new(),
        });
    }
    if let Some(why) = plan.refusal {
        return Err(Error::Conflict(why));
    }
    let original = plan.original.clone();
    let s = original.scan.clone().unwrap_or_default();
    let q: Decimal = s.quantity.parse().unwrap_or_default();
    let kind = Kind::from_proto(s.kind).unwrap_or(Kind::Inspect);
    let op = s.operation as i32;
    match kind {
        Kind::Consume | Kind::Scrap => {
            sqlx::query(
                "UPDATE lots SET quantity_on_hand = quantity_on_hand + $2,
                     status = CASE WHEN status IN ('consumed', 'scrapped') THEN 'active' ELSE status END, updated_at = now()
                 WHERE lot = $1",
            )
            .bind(&s.lot)
            .bind(q)
            .execute(&mut *tx)
            .await?;
            if kind == Kind::Scrap {
                adjust_counters(&mut tx, &s.work_order, op, Decimal::ZERO, -q).await?;
            }
        }
        Kind::Produce => {
            sqlx::query(
                "UPDATE lots SET quantity_on_hand = quantity_on_hand - $2,
                     status = CASE WHEN quantity_on_hand - $2 = 0 AND status = 'active' THEN 'consumed' ELSE status END, updated_at = now()
                 WHERE lot = $1",
            )
            .bind(&s.lot)
            .bind(q)
            .execute(&mut *tx)
            .await?;
            adjust_counters(&mut tx, &s.work_order, op, -q, Decimal::ZERO).await?;
        }
        Kind::StartOperation => {
            sqlx::query("UPDATE work_order_operations SET status = 'pending' WHERE work_order = $1 AND step = $2")
                .bind(&s.work_order)
                .bind(op)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "UPDATE work_orders SET status = 'released', updated_at = now() WHERE number = $1 AND status = 'in_progress'
                   AND NOT EXISTS (SELECT 1 FROM work_order_operations WHERE work_order = $1 AND status <> 'pending')",
            )
            .bind(&s.work_order)
            .execute(&mut *tx)
            .await?;
        }
        Kind::CompleteOperation => {
            sqlx::query("UPDATE work_order_operations SET status = 'in_progress' WHERE work_order = $1 AND step = $2")
                .bind(&s.work_order)
                .bind(op)
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE work_orders SET status = 'in_progress', updated_at = now() WHERE number = $1 AND status = 'completed'")
                .bind(&s.work_order)
                .execute(&mut *tx)
                .await?;
        }
        Kind::Move | Kind::Inspect | Kind::Void => {}
    }
    let void_id = Uuid::new_v4();
    let now = chrono::Utc::now();
    let traceparent = mes_common::propagation::current_traceparent();
    sqlx::query(
        "INSERT INTO scans (scan_id, kind, work_order, operation, station, lot, material, quantity, scanned_at,
                            operator, device, received_at, content_hash, voids, reason, traceparent)
         VALUES ($1, 'void', $2, $3, $4, $5, $6, $7, $8, $9, $10, $8, $11, $12, $13, $14)",
    )
    .bind(void_id)
    .bind(&s.work_order)
    .bind(op)
    .bind(&s.station)
    .bind(&s.lot)
    .bind(&original.material)
    .bind(if q.is_zero() { None } else { Some(q) })
    .bind(now)
    .bind(&caller.user)
    .bind(caller.device.clone().unwrap_or_default())
    .bind(format!("void:{id}"))
    .bind(id)
    .bind(reason)
    .bind(&traceparent)
    .execute(&mut *tx)
    .await?;
    let mut void_scan = stored_scan(
        &crate::domain::ScanInput {
            scan_id: void_id,
            kind: Kind::Void,
            work_order: s.work_order.clone(),
            operation: op,
            station: s.station.clone(),
            lot: s.lot.clone(),
            material: original.material.clone(),
            quantity: if q.is_zero() { None } else { Some(q) },
            into_lot: String::new(),
            location: String::new(),
            result: None,
            defect_code: String::new(),
            scanned_at: now,
            attributes: String::new(),
        },
        &original.material,
        caller,
        now,
        &traceparent,
    );
    void_scan.voids = id.to_string();
    void_scan.reason = reason.to_owned();
    let mut voided = original;
    voided.status = "voided".into();
    voided.voided_by = void_id.to_string();
    let ev = events::event(
        "scan.voided",
        pb::event::Payload::ScanVoided(pb::ScanVoided {
            void_scan: Some(void_scan),
            original: Some(voided),
        }),
    );
    events::append(&mut tx, &[ev]).await?;
    tx.commit().await?;
    tracing::info!(scan_id = %id, void_scan_id = %void_id, user = %caller.user, "scan voided");
    Ok(pb::VoidScanResponse {
        allowed: true,
        why: String::new(),
        effects: plan.effects,
        void_scan_id: void_id.to_string(),
    })
}

async fn adjust_counters(
    tx: &mut Transaction<'_, Postgres>,
    wo: &str,
    op: i32,
    good: Decimal,
    scrap: Decimal,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE work_orders SET produced_quantity = produced_quantity + $2, scrap_quantity = scrap_quantity + $3, updated_at = now()
         WHERE number = $1",
    )
    .bind(wo)
    .bind(good)
    .bind(scrap)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "UPDATE work_order_operations SET good_quantity = good_quantity + $3, scrap_quantity = scrap_quantity + $4
         WHERE work_order = $1 AND step = $2",
    )
    .bind(wo)
    .bind(op)
    .bind(good)
    .bind(scrap)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
