//! Reads of the system of record (work orders, lots, scans).

use chrono::{DateTime, Utc};
use mes_proto::v1 as pb;
use rust_decimal::Decimal;
use sqlx::{PgPool, Row, postgres::PgRow};
use uuid::Uuid;

use crate::domain::Kind;
use crate::error::Error;
use crate::store::timestamp;

fn dec(d: Decimal) -> String {
    d.normalize().to_string()
}

pub async fn get_scan(pool: &PgPool, scan_id: &str) -> Result<pb::StoredScan, Error> {
    let id = Uuid::parse_str(scan_id).map_err(|_| Error::invalid("scan_id", "must be a UUID"))?;
    let row = sqlx::query(
        "SELECT s.*, v.scan_id AS voided_by FROM scans s LEFT JOIN scans v ON v.voids = s.scan_id WHERE s.scan_id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| Error::NotFound(format!("scan {scan_id}")))?;
    Ok(stored_from_row(&row))
}

pub fn stored_from_row(r: &PgRow) -> pb::StoredScan {
    let kind = Kind::parse(r.get::<&str, _>("kind"))
        .map(|k| k.to_proto() as i32)
        .unwrap_or(0);
    let quantity: Option<Decimal> = r.get("quantity");
    let voided_by: Option<Uuid> = r.try_get("voided_by").ok().flatten();
    let voids: Option<Uuid> = r.get("voids");
    let result = match r.get::<&str, _>("result") {
        "pass" => pb::InspectResult::Pass as i32,
        "fail" => pb::InspectResult::Fail as i32,
        _ => 0,
    };
    pb::StoredScan {
        scan: Some(pb::Scan {
            scan_id: r.get::<Uuid, _>("scan_id").to_string(),
            kind,
            work_order: r.get("work_order"),
            operation: r.get::<i32, _>("operation") as u32,
            station: r.get("station"),
            lot: r.get("lot"),
            material: r.get("material"),
            quantity: quantity.map(dec).unwrap_or_default(),
            into_lot: r.get("into_lot"),
            location: r.get("location"),
            result,
            defect_code: r.get("defect_code"),
            scanned_at: Some(timestamp(r.get("scanned_at"))),
            attributes_json: r.get("attributes"),
        }),
        operator: r.get("operator"),
        device: r.get("device"),
        received_at: Some(timestamp(r.get("received_at"))),
        status: if voided_by.is_some() {
            "voided".into()
        } else {
            "active".into()
        },
        voided_by: voided_by.map(|v| v.to_string()).unwrap_or_default(),
        voids: voids.map(|v| v.to_string()).unwrap_or_default(),
        reason: r.get("reason"),
        material: r.get("material"),
        traceparent: r.get("traceparent"),
    }
}

async fn work_order_details(pool: &PgPool, rows: Vec<PgRow>) -> Result<Vec<pb::WorkOrder>, Error> {
    let numbers: Vec<String> = rows.iter().map(|r| r.get("number")).collect();
    let ops = sqlx::query(
        "SELECT work_order, step, station, description, status, good_quantity, scrap_quantity
         FROM work_order_operations WHERE work_order = ANY($1) ORDER BY work_order, step",
    )
    .bind(&numbers)
    .fetch_all(pool)
    .await?;
    let comps = sqlx::query(
        "SELECT work_order, material, quantity_per_unit FROM work_order_components WHERE work_order = ANY($1) ORDER BY work_order, material",
    )
    .bind(&numbers)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let number: String = r.get("number");
            let updated: DateTime<Utc> = r.get("updated_at");
            pb::WorkOrder {
                operations: ops
                    .iter()
                    .filter(|o| o.get::<&str, _>("work_order") == number)
                    .map(|o| pb::Operation {
                        step: o.get::<i32, _>("step") as u32,
                        station: o.get("station"),
                        description: o.get("description"),
                        status: o.get("status"),
                        good_quantity: dec(o.get("good_quantity")),
                        scrap_quantity: dec(o.get("scrap_quantity")),
                    })
                    .collect(),
                components: comps
                    .iter()
                    .filter(|c| c.get::<&str, _>("work_order") == number)
                    .map(|c| pb::Component {
                        material: c.get("material"),
                        quantity_per_unit: dec(c.get("quantity_per_unit")),
                    })
                    .collect(),
                material: r.get("material"),
                planned_quantity: dec(r.get("planned_quantity")),
                status: r.get("status"),
                produced_quantity: dec(r.get("produced_quantity")),
                scrap_quantity: dec(r.get("scrap_quantity")),
                updated_at: Some(timestamp(updated)),
                number,
            }
        })
        .collect())
}

pub async fn get_work_order(pool: &PgPool, number: &str) -> Result<pb::WorkOrder, Error> {
    let rows = sqlx::query("SELECT * FROM work_orders WHERE number = $1")
        .bind(number)
        .fetch_all(pool)
        .await?;
    work_order_details(pool, rows)
        .await?
        .pop()
        .ok_or_else(|| Error::NotFound(format!("work order {number}")))
}

/// Keyset pagination by number; the cursor is the last number of the previous page.
pub async fn list_work_orders(
    pool: &PgPool,
    req: &pb::ListWorkOrdersRequest,
) -> Result<pb::ListWorkOrdersResponse, Error> {
    let limit = match req.limit {
        0 => 50,
        n if n > 500 => return Err(Error::invalid("limit", "must be at most 500")),
        n => n as i64,
    };
    if !req.status.is_empty()
        && !matches!(
            req.status.as_str(),
            "released" | "in_progress" | "completed" | "closed" | "cancelled"
        )
    {
        return Err(Error::invalid(
            "status",
            "must be released, in_progress, completed, closed or cancelled",
        ));
    }
    let rows = sqlx::query(
        "SELECT w.* FROM work_orders w
         WHERE ($1 = '' OR w.status = $1)
           AND ($2 = '' OR EXISTS (SELECT 1 FROM work_order_operations o WHERE o.work_order = w.number AND o.station = $2))
           AND w.number > $3
         ORDER BY w.number LIMIT $4",
    )
    .bind(&req.status)
    .bind(&req.station)
    .bind(&req.cursor)
    .bind(limit + 1)
    .fetch_all(pool)
    .await?;
    let more = rows.len() as i64 > limit;
    let rows: Vec<PgRow> = rows.into_iter().take(limit as usize).collect();
    let items = work_order_details(pool, rows).await?;
    let next_cursor = if more {
        items.last().map(|w| w.number.clone()).unwrap_or_default()
    } else {
        String::new()
    };
    Ok(pb::ListWorkOrdersResponse { items, next_cursor })
}

pub async fn get_lot(pool: &PgPool, lot: &str) -> Result<pb::Lot, Error> {
    let r = sqlx::query("SELECT * FROM lots WHERE lot = $1")
        .bind(lot)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| Error::NotFound(format!("lot {lot}")))?;
    Ok(lot_from_row(&r))
}

pub fn lot_from_row(r: &PgRow) -> pb::Lot {
    pb::Lot {
        lot: r.get("lot"),
        material: r.get("material"),
        quantity_on_hand: dec(r.get("quantity_on_hand")),
        status: r.get("status"),
        location: r.get("location"),
        origin: Some(pb::LotOrigin {
            kind: r.get("origin_kind"),
            supplier: r.get("supplier"),
            supplier_lot: r.get("supplier_lot"),
            work_order: r.get("work_order"),
        }),
        created_at: Some(timestamp(r.get("created_at"))),
    }
}
