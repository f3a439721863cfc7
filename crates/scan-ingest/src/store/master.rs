//! Idempotent master-data upserts (from erp-sync). A record identical to the stored one is
//! `unchanged` and publishes no event; others publish one event each, in the same transaction.

use mes_proto::v1 as pb;
use rust_decimal::Decimal;
use sqlx::{PgPool, Row};

use crate::domain::parse_quantity;
use crate::error::{Error, FieldViolation};
use crate::store::events;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub created: u32,
    pub updated: u32,
    pub unchanged: u32,
}

impl Counts {
    fn add(&mut self, outcome: Option<bool>) {
        match outcome {
            Some(true) => self.created += 1,
            Some(false) => self.updated += 1,
            None => self.unchanged += 1,
        }
    }
}

impl From<Counts> for pb::UpsertResponse {
    fn from(c: Counts) -> Self {
        Self {
            created: c.created,
            updated: c.updated,
            unchanged: c.unchanged,
        }
    }
}

/// A required plant identifier (the one rule, `mes_domain::ident`).
fn required(v: &mut Vec<FieldViolation>, field: String, value: &str) {
    if value.is_empty() {
        v.push(FieldViolation::new(field, "is required"));
    } else if let Err(rule) = mes_domain::ident::check_ident(value) {
        v.push(FieldViolation::new(field, rule));
    }
}

fn ok_or_invalid(v: Vec<FieldViolation>) -> Result<(), Error> {
    if v.is_empty() {
        Ok(())
    } else {
        Err(Error::Invalid(v))
    }
}

pub async fn upsert_materials(pool: &PgPool, items: &[pb::Material]) -> Result<Counts, Error> {
    let mut v = Vec::new();
    for (i, m) in items.iter().enumerate() {
        required(&mut v, format!("items[{i}].number"), &m.number);
        if m.tracking != "lot" && m.tracking != "serial" {
            v.push(FieldViolation::new(
                format!("items[{i}].tracking"),
                "must be lot or serial",
            ));
        }
    }
    ok_or_invalid(v)?;
    let mut tx = pool.begin().await?;
    let mut counts = Counts::default();
    let mut evs = Vec::new();
    for m in items {
        let unit = if m.unit.is_empty() {
            "pcs"
        } else {
            m.unit.as_str()
        };
        let row = sqlx::query(
            "INSERT INTO materials (number, description, tracking, unit) VALUES ($1, $2, $3, $4)
             ON CONFLICT (number) DO UPDATE SET description = EXCLUDED.description, tracking = EXCLUDED.tracking,
                 unit = EXCLUDED.unit, updated_at = now()
             WHERE (materials.description, materials.tracking, materials.unit)
                   IS DISTINCT FROM (EXCLUDED.description, EXCLUDED.tracking, EXCLUDED.unit)
             RETURNING (xmax = 0) AS created",
        )
        .bind(&m.number)
        .bind(&m.description)
        .bind(&m.tracking)
        .bind(unit)
        .fetch_optional(&mut *tx)
        .await?;
        let outcome = row.map(|r| r.get::<bool, _>("created"));
        if outcome.is_some() {
            evs.push(events::event(
                "material.upserted",
                pb::event::Payload::Material(m.clone()),
            ));
        }
        counts.add(outcome);
    }
    events::append(&mut tx, &evs).await?;
    tx.commit().await?;
    Ok(counts)
}

pub async fn upsert_stations(pool: &PgPool, items: &[pb::Station]) -> Result<Counts, Error> {
    let mut v = Vec::new();
    for (i, s) in items.iter().enumerate() {
        required(&mut v, format!("items[{i}].id"), &s.id);
    }
    ok_or_invalid(v)?;
    let mut tx = pool.begin().await?;
    let mut counts = Counts::default();
    let mut evs = Vec::new();
    for s in items {
        let row = sqlx::query(
            "INSERT INTO stations (id, name) VALUES ($1, $2)
             ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, updated_at = now()
             WHERE stations.name IS DISTINCT FROM EXCLUDED.name
             RETURNING (xmax = 0) AS created",
        )
        .bind(&s.id)
        .bind(&s.name)
        .fetch_optional(&mut *tx)
        .await?;
        let outcome = row.map(|r| r.get::<bool, _>("created"));
        if outcome.is_some() {
            evs.push(events::event(
                "station.upserted",
                pb::event::Payload::Station(s.clone()),
            ));
        }
        counts.add(outcome);
    }
    events::append(&mut tx, &evs).await?;
    tx.commit().await?;
    Ok(counts)
}

/// Received lots: the ERP's quantity is the received quantity; a change adjusts on-hand by the
/// difference (refused if it would make on-hand negative).
pub async fn upsert_received_lots(
    pool: &PgPool,
    items: &[pb::ReceivedLot],
) -> Result<Counts, Error> {
    let mut v = Vec::new();
    let mut quantities = Vec::new();
    for (i, l) in items.iter().enumerate() {
        required(&mut v, format!("items[{i}].lot"), &l.lot);
        required(&mut v, format!("items[{i}].material"), &l.material);
        match parse_quantity(&l.quantity) {
            Ok(q) => quantities.push(q),
            Err(m) => {
                v.push(FieldViolation::new(format!("items[{i}].quantity"), m));
                quantities.push(Decimal::ZERO);
            }
        }
    }
    ok_or_invalid(v)?;
    let mut tx = pool.begin().await?;
    let mut counts = Counts::default();
    let mut evs = Vec::new();
    for (i, (l, q)) in items.iter().zip(quantities).enumerate() {
        let material_exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM materials WHERE number = $1)")
                .bind(&l.material)
                .fetch_one(&mut *tx)
                .await?;
        if !material_exists {
            return Err(Error::invalid(
                format!("items[{i}].material"),
                format!("material {} does not exist", l.material),
            ));
        }
        let current = sqlx::query(
            "SELECT material, initial_quantity, quantity_on_hand, origin_kind, supplier, supplier_lot
             FROM lots WHERE lot = $1 FOR UPDATE",
        )
        .bind(&l.lot)
        .fetch_optional(&mut *tx)
        .await?;
        let outcome = match current {
            None => {
                sqlx::query(
                    "INSERT INTO lots (lot, material, quantity_on_hand, initial_quantity, origin_kind, supplier, supplier_lot, location)
                     VALUES ($1, $2, $3, $3, 'received', $4, $5, 'receiving')",
                )
                .bind(&l.lot)
                .bind(&l.material)
                .bind(q)
                .bind(&l.supplier)
                .bind(&l.supplier_lot)
                .execute(&mut *tx)
                .await?;
                Some(true)
            }
            Some(r) => {
                let origin: String = r.get("origin_kind");
                let material: String = r.get("material");
                if origin != "received" || material != l.material {
                    return Err(Error::FailedPrecondition(format!(
                        "lot {} exists as a {origin} lot of {material}",
                        l.lot
                    )));
                }
                let initial: Decimal = r.get("initial_quantity");
                let on_hand: Decimal = r.get("quantity_on_hand");
                let same = initial == q
                    && r.get::<String, _>("supplier") == l.supplier
                    && r.get::<String, _>("supplier_lot") == l.supplier_lot;
                if same {
                    None
                } else {
                    let new_on_hand = on_hand + (q - initial);
                    if new_on_hand < Decimal::ZERO {
                        return Err(Error::FailedPrecondition(format!(
                            "lot {}: received quantity {q} is less than what was already used",
                            l.lot
                        )));
                    }
                    sqlx::query(
                        "UPDATE lots SET initial_quantity = $2, quantity_on_hand = $3, supplier = $4, supplier_lot = $5,
                             status = CASE WHEN status = 'consumed' AND $3 > 0 THEN 'active' ELSE status END, updated_at = now()
                         WHERE lot = $1",
                    )
                    .bind(&l.lot)
                    .bind(q)
                    .bind(new_on_hand)
                    .bind(&l.supplier)
                    .bind(&l.supplier_lot)
                    .execute(&mut *tx)
                    .await?;
                    Some(false)
                }
            }
        };
        if outcome.is_some() {
            evs.push(events::event(
                "lot.received",
                pb::event::Payload::LotReceived(l.clone()),
            ));
        }
        counts.add(outcome);
    }
    events::append(&mut tx, &evs).await?;
    tx.commit().await?;
    Ok(counts)
}

/// Work orders with routing and BOM. The ERP owns released/closed/cancelled; progress states
/// (in_progress, completed) and counters belong to the MES and are kept.
pub async fn upsert_work_orders(
    pool: &PgPool,
    items: &[pb::WorkOrderSpec],
) -> Result<Counts, Error> {
    let mut v = Vec::new();
    let mut planned = Vec::new();
    for (i, w) in items.iter().enumerate() {
        required(&mut v, format!("items[{i}].number"), &w.number);
        required(&mut v, format!("items[{i}].material"), &w.material);
        match parse_quantity(&w.planned_quantity) {
            Ok(q) => planned.push(q),
            Err(m) => {
                v.push(FieldViolation::new(
                    format!("items[{i}].planned_quantity"),
                    m,
                ));
                planned.push(Decimal::ZERO);
            }
        }
        if !matches!(w.status.as_str(), "released" | "closed" | "cancelled") {
            v.push(FieldViolation::new(
                format!("items[{i}].status"),
                "must be released, closed or cancelled",
            ));
        }
        if w.operations.is_empty() {
            v.push(FieldViolation::new(
                format!("items[{i}].operations"),
                "must have at least one operation",
            ));
        }
        for (j, op) in w.operations.iter().enumerate() {
            if op.step == 0 || op.step > 1_000_000 {
                v.push(FieldViolation::new(
                    format!("items[{i}].operations[{j}].step"),
                    "must be a positive step number",
                ));
            }
            required(
                &mut v,
                format!("items[{i}].operations[{j}].station"),
                &op.station,
            );
        }
        for (j, c) in w.components.iter().enumerate() {
            required(
                &mut v,
                format!("items[{i}].components[{j}].material"),
                &c.material,
            );
            if let Err(m) = parse_quantity(&c.quantity_per_unit) {
                v.push(FieldViolation::new(
                    format!("items[{i}].components[{j}].quantity_per_unit"),
                    m,
                ));
            }
        }
    }
    ok_or_invalid(v)?;
    let mut tx = pool.begin().await?;
    let mut counts = Counts::default();
    let mut evs = Vec::new();
    for (i, (w, q)) in items.iter().zip(planned).enumerate() {
        let mut refs: Vec<String> = w.components.iter().map(|c| c.material.clone()).collect();
        refs.push(w.material.clone());
        let known: Vec<String> =
            sqlx::query_scalar("SELECT number FROM materials WHERE number = ANY($1)")
                .bind(&refs)
                .fetch_all(&mut *tx)
                .await?;
        if let Some(missing) = refs.iter().find(|m| !known.contains(m)) {
            return Err(Error::invalid(
                format!("items[{i}]"),
                format!("material {missing} does not exist"),
            ));
        }
        let stations: Vec<String> = w.operations.iter().map(|o| o.station.clone()).collect();
        let known: Vec<String> = sqlx::query_scalar("SELECT id FROM stations WHERE id = ANY($1)")
            .bind(&stations)
            .fetch_all(&mut *tx)
            .await?;
        if let Some(missing) = stations.iter().find(|s| !known.contains(s)) {
            return Err(Error::invalid(
                format!("items[{i}]"),
                format!("station {missing} does not exist"),
            ));
        }

        let current = sqlx::query("SELECT material, planned_quantity, status FROM work_orders WHERE number = $1 FOR UPDATE")
            .bind(&w.number)
            .fetch_optional(&mut *tx)
            .await?;
        let outcome = match current {
            None => {
                sqlx::query("INSERT INTO work_orders (number, material, planned_quantity, status) VALUES ($1, $2, $3, $4)")
                    .bind(&w.number)
                    .bind(&w.material)
                    .bind(q)
                    .bind(&w.status)
                    .execute(&mut *tx)
                    .await?;
                write_routing(&mut tx, w).await?;
                Some(true)
            }
            Some(r) => {
                let status: String = r.get("status");
                // The MES's progress states win over the ERP's "released".
                let new_status = if w.status == "released"
                    && matches!(status.as_str(), "in_progress" | "completed")
                {
                    status.clone()
                } else {
                    w.status.clone()
                };
                let ops_now: Vec<(i32, String, String)> = sqlx::query_as(
                    "SELECT step, station, description FROM work_order_operations WHERE work_order = $1 ORDER BY step",
                )
                .bind(&w.number)
                .fetch_all(&mut *tx)
                .await?;
                let mut ops_new: Vec<(i32, String, String)> = w
                    .operations
                    .iter()
                    .map(|o| (o.step as i32, o.station.clone(), o.description.clone()))
                    .collect();
                ops_new.sort();
                let comps_now: Vec<(String, Decimal)> = sqlx::query_as(
                    "SELECT material, quantity_per_unit FROM work_order_components WHERE work_order = $1 ORDER BY material",
                )
                .bind(&w.number)
                .fetch_all(&mut *tx)
                .await?;
                let mut comps_new: Vec<(String, Decimal)> = w
                    .components
                    .iter()
                    .map(|c| {
                        (
                            c.material.clone(),
                            parse_quantity(&c.quantity_per_unit).unwrap_or_default(),
                        )
                    })
                    .collect();
                comps_new.sort();
                let same = r.get::<String, _>("material") == w.material
                    && r.get::<Decimal, _>("planned_quantity") == q
                    && new_status == status
                    && ops_now == ops_new
                    && comps_now
                        .iter()
                        .map(|(m, d)| (m.clone(), d.normalize()))
                        .collect::<Vec<_>>()
                        == comps_new
                            .iter()
                            .map(|(m, d)| (m.clone(), d.normalize()))
                            .collect::<Vec<_>>();
                if same {
                    None
                } else {
                    sqlx::query(
                        "UPDATE work_orders SET material = $2, planned_quantity = $3, status = $4, updated_at = now() WHERE number = $1",
                    )
                    .bind(&w.number)
                    .bind(&w.material)
                    .bind(q)
                    .bind(&new_status)
                    .execute(&mut *tx)
                    .await?;
                    write_routing(&mut tx, w).await?;
                    Some(false)
                }
            }
        };
        if outcome.is_some() {
            evs.push(events::event(
                "work_order.upserted",
                pb::event::Payload::WorkOrder(w.clone()),
            ));
        }
        counts.add(outcome);
    }
    events::append(&mut tx, &evs).await?;
    tx.commit().await?;
    Ok(counts)
}

/// Replaces routing and BOM, keeping the progress of operations that still exist.
async fn write_routing(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    w: &pb::WorkOrderSpec,
) -> Result<(), sqlx::Error> {
    let steps: Vec<i32> = w.operations.iter().map(|o| o.step as i32).collect();
    sqlx::query("DELETE FROM work_order_operations WHERE work_order = $1 AND NOT (step = ANY($2))")
        .bind(&w.number)
        .bind(&steps)
        .execute(&mut **tx)
        .await?;
    sqlx::query(
        "INSERT INTO work_order_operations (work_order, step, station, description)
         SELECT $1, * FROM UNNEST($2::int[], $3::text[], $4::text[])
         ON CONFLICT (work_order, step) DO UPDATE SET station = EXCLUDED.station, description = EXCLUDED.description",
    )
    .bind(&w.number)
    .bind(&steps)
    .bind(w.operations.iter().map(|o| o.station.clone()).collect::<Vec<_>>())
    .bind(w.operations.iter().map(|o| o.description.clone()).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    sqlx::query("DELETE FROM work_order_components WHERE work_order = $1")
        .bind(&w.number)
        .execute(&mut **tx)
        .await?;
    sqlx::query(
        "INSERT INTO work_order_components (work_order, material, quantity_per_unit)
         SELECT $1, * FROM UNNEST($2::text[], $3::numeric[])",
    )
    .bind(&w.number)
    .bind(
        w.components
            .iter()
            .map(|c| c.material.clone())
            .collect::<Vec<_>>(),
    )
    .bind(
        w.components
            .iter()
            .map(|c| parse_quantity(&c.quantity_per_unit).unwrap_or_default())
            .collect::<Vec<_>>(),
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}
