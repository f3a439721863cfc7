//! `mes-datagen`: realistic data volumes for trace-query's tests and the benchmark (and the
//! `mes-datagen` binary), kept out of the service's own library.
//!
//! A [`Plan`] describes a plant with `depth` + 1 levels of material: level 0 are received lots
//! (with supplier and supplier lot); each lot of level L ≥ 1 is produced by a work order of its
//! own that consumes `fan_in` lots of level L − 1 (spread evenly, so every lower lot is used
//! about `fan_in` times). The backward genealogy of a top-level lot is therefore `depth` deep
//! with fan-in `fan_in`. Each work order has start, `fan_in` consumes, produce, complete and
//! `extra_scans` inspections of its lot; scan times spread over the last 30 days.
//!
//! The plan is one deterministic sequence of [`Item`]s (the same seed gives the same ids, so a
//! load through scan-ingest can be repeated safely: the scans come back `duplicate`). Three
//! ways to load it:
//! - [`load_bulk`]: straight into a trace-query database with large `UNNEST` inserts — the
//!   rows the projection would write (a test checks they are identical) — for big volumes;
//! - [`load_events`]: as the feed's events through the projection itself
//!   ([`trace_query::store::apply`]);
//! - [`load_grpc`]: through the real write path, scan-ingest's `MasterData` and `SubmitScans`
//!   over gRPC with a caller in the metadata (trace-query then builds its read model from the
//!   feed).
//!
//! [`bench`] then measures genealogy latency against a running trace-query.

use std::time::Duration;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use mes_common::identity::{Caller, CallerKey};
use mes_proto::v1 as pb;
use rust_decimal::Decimal;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use mes_domain::time::to_proto as timestamp;

type Traced = mes_common::grpc::Signed<tonic::transport::Channel>;

/// The shape of the generated plant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Lots in total (all levels).
    pub lots: u64,
    /// Genealogy depth (levels above the received lots).
    pub depth: u32,
    /// Input lots per work order.
    pub fan_in: u32,
    /// Inspections per produced lot (to reach a scan volume).
    pub extra_scans: u32,
    pub seed: u64,
    /// When the first work order starts; default: midnight (UTC) 30 days ago, so the same plan
    /// loaded twice on one day gives identical scans.
    pub start: Option<DateTime<Utc>>,
}

impl Default for Plan {
    fn default() -> Self {
        Self {
            lots: 1_000,
            depth: 5,
            fan_in: 4,
            extra_scans: 0,
            seed: 1,
            start: None,
        }
    }
}

/// One step of the plan, in feed order.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Material(pb::Material),
    Station(pb::Station),
    Lot(pb::ReceivedLot),
    WorkOrder(pb::WorkOrderSpec),
    /// A scan with the material scan-ingest resolves for it.
    Scan {
        scan: pb::Scan,
        material: String,
    },
}

pub const OPERATOR: &str = "datagen";

impl Plan {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.depth >= 1 && self.depth <= 50, "depth must be 1..=50");
        anyhow::ensure!(
            self.fan_in >= 1 && self.fan_in <= 64,
            "fan-in must be 1..=64"
        );
        anyhow::ensure!(
            self.lots > u64::from(self.depth),
            "at least one lot per level is needed ({} lots)",
            self.depth + 1
        );
        anyhow::ensure!(self.extra_scans <= 100, "extra scans must be at most 100");
        Ok(())
    }

    /// Lots of level `l` (level 0 takes the remainder).
    pub fn level_size(&self, l: u32) -> u64 {
        let levels = u64::from(self.depth) + 1;
        let each = self.lots / levels;
        if l == 0 {
            each + self.lots % levels
        } else {
            each
        }
    }

    pub fn lot_name(&self, l: u32, i: u64) -> String {
        if l == 0 {
            format!("RAW-{i:07}")
        } else {
            format!("L{l}-{i:07}")
        }
    }

    pub fn material(l: u32) -> String {
        format!("MAT-{l}")
    }

    pub fn work_order(l: u32, i: u64) -> String {
        format!("WO-L{l}-{i:07}")
    }

    /// The inputs (level `l − 1`) of work order `i` of level `l`.
    pub fn inputs(&self, l: u32, i: u64) -> Vec<u64> {
        let below = self.level_size(l - 1);
        (0..u64::from(self.fan_in))
            .map(|j| (i * u64::from(self.fan_in) + j) % below)
            .collect()
    }

    /// How much a lot of level `l` holds: enough for every consume of level `l + 1`.
    fn lot_quantity(&self, l: u32) -> u64 {
        if l == self.depth {
            return 1;
        }
        let uses = (self.level_size(l + 1) * u64::from(self.fan_in)).div_ceil(self.level_size(l));
        uses + 1
    }

    /// Scans of one work order.
    pub fn scans_per_order(&self) -> u64 {
        u64::from(self.fan_in) + 3 + u64::from(self.extra_scans)
    }

    /// Every item of the plan, in order.
    pub fn items(&self) -> Items {
        let orders: u64 = (1..=self.depth).map(|l| self.level_size(l)).sum();
        let start = self.start.unwrap_or_else(|| {
            Utc::now()
                .duration_trunc(TimeDelta::days(1))
                .unwrap_or_else(|_| Utc::now())
                - TimeDelta::days(30)
        });
        let step_ms = (TimeDelta::days(29).num_milliseconds() / orders.max(1) as i64).max(1);
        Items {
            plan: *self,
            stage: Stage::Materials(0),
            start,
            step_ms,
            order_index: 0,
            pending: Vec::new(),
        }
    }

    /// A deterministic UUID (v4 layout) for the `n`-th scan.
    pub fn scan_id(&self, n: u64) -> Uuid {
        let mut h = Sha256::new();
        h.update(self.seed.to_le_bytes());
        h.update(n.to_le_bytes());
        let d = h.finalize();
        let mut b = [0u8; 16];
        b.copy_from_slice(&d[..16]);
        uuid::Builder::from_random_bytes(b).into_uuid()
    }
}

#[derive(Debug, Clone, Copy)]
enum Stage {
    Materials(u32),
    Stations(u32),
    Lots(u64),
    Orders { level: u32, i: u64 },
    Scans { level: u32, i: u64 },
    Done,
}

/// The plan's items, generated lazily (memory stays flat for any volume).
pub struct Items {
    plan: Plan,
    stage: Stage,
    start: DateTime<Utc>,
    step_ms: i64,
    order_index: u64,
    pending: Vec<Item>,
}

impl Items {
    fn scan(&self, kind: pb::ScanKind, l: u32, i: u64, at: DateTime<Utc>, n: u64) -> pb::Scan {
        pb::Scan {
            scan_id: self.plan.scan_id(n).to_string(),
            kind: kind as i32,
            work_order: Plan::work_order(l, i),
            operation: 10,
            station: format!("ST-{l}"),
            scanned_at: Some(timestamp(at)),
            ..Default::default()
        }
    }

    /// The scans of work order `i` of level `l`, in order.
    fn order_scans(&mut self, l: u32, i: u64) -> Vec<Item> {
        let p = self.plan;
        let base = self.start + TimeDelta::milliseconds(self.step_ms * self.order_index as i64);
        let first = self.order_index * p.scans_per_order();
        self.order_index += 1;
        let mut out = Vec::with_capacity(p.scans_per_order() as usize);
        let mut k = 0u64;
        let mut next = |this: &Self, kind: pb::ScanKind| {
            let at = base + TimeDelta::seconds(k as i64);
            let s = this.scan(kind, l, i, at, first + k);
            k += 1;
            s
        };
        let output = Plan::material(l);
        out.push(Item::Scan {
            scan: next(self, pb::ScanKind::StartOperation),
            material: output.clone(),
        });
        for input in p.inputs(l, i) {
            let mut s = next(self, pb::ScanKind::Consume);
            s.lot = p.lot_name(l - 1, input);
            s.quantity = "1".into();
            out.push(Item::Scan {
                scan: s,
                material: Plan::material(l - 1),
            });
        }
        let lot = p.lot_name(l, i);
        let mut s = next(self, pb::ScanKind::Produce);
        s.lot = lot.clone();
        s.material = output.clone();
        s.quantity = p.lot_quantity(l).to_string();
        out.push(Item::Scan {
            scan: s,
            material: output.clone(),
        });
        out.push(Item::Scan {
            scan: next(self, pb::ScanKind::CompleteOperation),
            material: output.clone(),
        });
        for _ in 0..p.extra_scans {
            let mut s = next(self, pb::ScanKind::Inspect);
            s.lot = lot.clone();
            s.operation = 0;
            s.result = pb::InspectResult::Pass as i32;
            out.push(Item::Scan {
                scan: s,
                material: output.clone(),
            });
        }
        out.reverse();
        out
    }
}

impl Iterator for Items {
    type Item = Item;

    fn next(&mut self) -> Option<Item> {
        if let Some(item) = self.pending.pop() {
            return Some(item);
        }
        let p = self.plan;
        loop {
            match self.stage {
                Stage::Materials(l) if l <= p.depth => {
                    self.stage = Stage::Materials(l + 1);
                    return Some(Item::Material(pb::Material {
                        number: Plan::material(l),
                        description: format!("Level {l} material"),
                        tracking: "lot".into(),
                        unit: "pcs".into(),
                    }));
                }
                Stage::Materials(_) => self.stage = Stage::Stations(1),
                Stage::Stations(l) if l <= p.depth => {
                    self.stage = Stage::Stations(l + 1);
                    return Some(Item::Station(pb::Station {
                        id: format!("ST-{l}"),
                        name: format!("Level {l} line"),
                    }));
                }
                Stage::Stations(_) => self.stage = Stage::Lots(0),
                Stage::Lots(i) if i < p.level_size(0) => {
                    self.stage = Stage::Lots(i + 1);
                    return Some(Item::Lot(pb::ReceivedLot {
                        lot: p.lot_name(0, i),
                        material: Plan::material(0),
                        quantity: p.lot_quantity(0).to_string(),
                        supplier: format!("Supplier {}", i % 17),
                        supplier_lot: format!("SL-{i:07}"),
                        received_at: Some(timestamp(self.start)),
                    }));
                }
                Stage::Lots(_) => self.stage = Stage::Orders { level: 1, i: 0 },
                Stage::Orders { level, i } if i < p.level_size(level) => {
                    self.stage = Stage::Orders { level, i: i + 1 };
                    return Some(Item::WorkOrder(pb::WorkOrderSpec {
                        number: Plan::work_order(level, i),
                        material: Plan::material(level),
                        planned_quantity: p.lot_quantity(level).to_string(),
                        status: "released".into(),
                        operations: vec![pb::OperationSpec {
                            step: 10,
                            station: format!("ST-{level}"),
                            description: format!("Level {level}"),
                        }],
                        components: vec![pb::Component {
                            material: Plan::material(level - 1),
                            quantity_per_unit: "1".into(),
                        }],
                    }));
                }
                Stage::Orders { level, .. } => self.stage = Stage::Scans { level, i: 0 },
                Stage::Scans { level, i } if i < p.level_size(level) => {
                    self.stage = Stage::Scans { level, i: i + 1 };
                    self.pending = self.order_scans(level, i);
                    return self.pending.pop();
                }
                Stage::Scans { level, .. } if level < p.depth => {
                    self.stage = Stage::Orders {
                        level: level + 1,
                        i: 0,
                    }
                }
                Stage::Scans { .. } | Stage::Done => {
                    self.stage = Stage::Done;
                    return None;
                }
            }
        }
    }
}

/// The feed event scan-ingest would emit for `item` (position `position`).
pub fn event_of(item: Item, position: u64) -> pb::Event {
    use pb::event::Payload;
    let (kind, payload, at) = match item {
        Item::Material(m) => ("material.upserted", Payload::Material(m), None),
        Item::Station(s) => ("station.upserted", Payload::Station(s), None),
        Item::Lot(l) => {
            let at = l.received_at;
            ("lot.received", Payload::LotReceived(l), at)
        }
        Item::WorkOrder(w) => ("work_order.upserted", Payload::WorkOrder(w), None),
        Item::Scan { scan, material } => {
            let at = received_at(&scan);
            (
                "scan.accepted",
                Payload::ScanAccepted(pb::ScanAccepted {
                    scan: Some(pb::StoredScan {
                        scan: Some(scan),
                        operator: OPERATOR.into(),
                        device: String::new(),
                        received_at: at,
                        status: "active".into(),
                        material,
                        ..Default::default()
                    }),
                }),
                at,
            )
        }
    };
    pb::Event {
        position,
        kind: kind.into(),
        occurred_at: at.or_else(|| Some(timestamp(Utc::now()))),
        traceparent: String::new(),
        // A generated history is read all at once: it is its own head.
        head_position: position,
        payload: Some(payload),
    }
}

/// Scans are "received" one second after they were scanned.
fn received_at(scan: &pb::Scan) -> Option<prost_types::Timestamp> {
    scan.scanned_at.as_ref().map(|t| prost_types::Timestamp {
        seconds: t.seconds + 1,
        nanos: t.nanos,
    })
}

/// Progress of a load: `(items done, items in total)`.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// Items in the plan (for progress reports).
pub fn total_items(plan: &Plan) -> u64 {
    let orders: u64 = (1..=plan.depth).map(|l| plan.level_size(l)).sum();
    u64::from(plan.depth) * 2 + 1 + plan.level_size(0) + orders * (1 + plan.scans_per_order())
}

/// Loads the plan through the projection (events applied in batches, as from the feed), under
/// the cursor of `consumer`.
pub async fn load_events(
    pool: &PgPool,
    plan: &Plan,
    consumer: &str,
    progress: Progress<'_>,
) -> anyhow::Result<u64> {
    plan.validate()?;
    let total = total_items(plan);
    let mut batch = Vec::with_capacity(2000);
    let mut n = 0u64;
    for item in plan.items() {
        n += 1;
        batch.push(event_of(item, n));
        if batch.len() == 2000 {
            trace_query::store::apply::apply(pool, consumer, &batch).await?;
            batch.clear();
            progress(n, total);
        }
    }
    if !batch.is_empty() {
        trace_query::store::apply::apply(pool, consumer, &batch).await?;
    }
    progress(n, total);
    Ok(n)
}

#[derive(Default)]
struct Rows {
    scan_id: Vec<Uuid>,
    position: Vec<i64>,
    kind: Vec<String>,
    work_order: Vec<String>,
    operation: Vec<i32>,
    station: Vec<String>,
    lot: Vec<String>,
    material: Vec<String>,
    quantity: Vec<Option<Decimal>>,
    result: Vec<String>,
    scanned_at: Vec<DateTime<Utc>>,
    received_at: Vec<DateTime<Utc>>,
    // genealogy edges (consume → the order's output)
    e_scan: Vec<Uuid>,
    e_from: Vec<String>,
    e_to: Vec<String>,
    e_wo: Vec<String>,
    e_station: Vec<String>,
    e_at: Vec<DateTime<Utc>>,
    // produced lots
    l_lot: Vec<String>,
    l_material: Vec<String>,
    l_wo: Vec<String>,
    l_quantity: Vec<Decimal>,
    l_at: Vec<DateTime<Utc>>,
    // work orders
    w_number: Vec<String>,
    w_material: Vec<String>,
    w_planned: Vec<Decimal>,
    w_station: Vec<String>,
    w_description: Vec<String>,
    // received lots
    r_lot: Vec<String>,
    r_material: Vec<String>,
    r_supplier: Vec<String>,
    r_supplier_lot: Vec<String>,
    r_quantity: Vec<Decimal>,
    r_at: Vec<DateTime<Utc>>,
}

impl Rows {
    fn len(&self) -> usize {
        self.scan_id.len() + self.w_number.len() + self.r_lot.len()
    }
}

fn time(ts: Option<&prost_types::Timestamp>) -> DateTime<Utc> {
    ts.and_then(mes_domain::time::from_proto)
        .unwrap_or_else(Utc::now)
}

async fn flush(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>, r: &mut Rows) -> anyhow::Result<()> {
    if !r.r_lot.is_empty() {
        sqlx::query(
            "INSERT INTO lots (lot, material, origin, supplier, supplier_lot, quantity, produced_at)
             SELECT l, m, 'received', s, sl, q, at
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::numeric[], $6::timestamptz[])
                  AS u(l, m, s, sl, q, at)",
        )
        .bind(&r.r_lot)
        .bind(&r.r_material)
        .bind(&r.r_supplier)
        .bind(&r.r_supplier_lot)
        .bind(&r.r_quantity)
        .bind(&r.r_at)
        .execute(&mut **tx)
        .await?;
    }
    if !r.w_number.is_empty() {
        sqlx::query(
            "INSERT INTO work_orders (number, material, planned_quantity, status)
             SELECT n, m, q, 'released' FROM UNNEST($1::text[], $2::text[], $3::numeric[]) AS u(n, m, q)",
        )
        .bind(&r.w_number)
        .bind(&r.w_material)
        .bind(&r.w_planned)
        .execute(&mut **tx)
        .await?;
        sqlx::query(
            "INSERT INTO work_order_operations (work_order, step, station, description, completed)
             SELECT n, 10, s, d, true FROM UNNEST($1::text[], $2::text[], $3::text[]) AS u(n, s, d)",
        )
        .bind(&r.w_number)
        .bind(&r.w_station)
        .bind(&r.w_description)
        .execute(&mut **tx)
        .await?;
    }
    if !r.scan_id.is_empty() {
        sqlx::query(
            "INSERT INTO scans (scan_id, position, kind, work_order, operation, station, lot, material,
                                quantity, result, operator, scanned_at, received_at)
             SELECT a, b, c, d, e, f, g, h, i, j, $13, k, l
             FROM UNNEST($1::uuid[], $2::bigint[], $3::text[], $4::text[], $5::int[], $6::text[],
                  $7::text[], $8::text[], $9::numeric[], $10::text[], $11::timestamptz[],
                  $12::timestamptz[]) AS u(a, b, c, d, e, f, g, h, i, j, k, l)",
        )
        .bind(&r.scan_id)
        .bind(&r.position)
        .bind(&r.kind)
        .bind(&r.work_order)
        .bind(&r.operation)
        .bind(&r.station)
        .bind(&r.lot)
        .bind(&r.material)
        .bind(&r.quantity)
        .bind(&r.result)
        .bind(&r.scanned_at)
        .bind(&r.received_at)
        .bind(OPERATOR)
        .execute(&mut **tx)
        .await?;
    }
    if !r.e_scan.is_empty() {
        sqlx::query(
            "INSERT INTO genealogy_edges (consume_scan, from_lot, to_lot, exact, work_order, quantity,
                                          station, operator, at)
             SELECT s, f, t, false, w, 1, st, $6, at
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $7::timestamptz[])
                  AS u(s, f, t, w, st, at)",
        )
        .bind(&r.e_scan)
        .bind(&r.e_from)
        .bind(&r.e_to)
        .bind(&r.e_wo)
        .bind(&r.e_station)
        .bind(OPERATOR)
        .bind(&r.e_at)
        .execute(&mut **tx)
        .await?;
    }
    if !r.l_lot.is_empty() {
        sqlx::query(
            "INSERT INTO lots (lot, material, origin, work_order, quantity, produced_at)
             SELECT l, m, 'produced', w, q, at
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::numeric[], $5::timestamptz[])
                  AS u(l, m, w, q, at)",
        )
        .bind(&r.l_lot)
        .bind(&r.l_material)
        .bind(&r.l_wo)
        .bind(&r.l_quantity)
        .bind(&r.l_at)
        .execute(&mut **tx)
        .await?;
    }
    *r = Rows::default();
    Ok(())
}

/// Loads the plan straight into an empty read model (the rows the projection would write, in
/// large batches), under the cursor of `consumer`. For volumes the event path would take hours
/// to apply.
pub async fn load_bulk(
    pool: &PgPool,
    plan: &Plan,
    consumer: &str,
    progress: Progress<'_>,
) -> anyhow::Result<u64> {
    plan.validate()?;
    let lots: i64 = sqlx::query_scalar("SELECT count(*) FROM lots")
        .fetch_one(pool)
        .await?;
    anyhow::ensure!(lots == 0, "the read model is not empty ({lots} lots)");
    let total = total_items(plan);
    let mut rows = Rows::default();
    let mut n = 0u64;
    let mut tx = pool.begin().await?;
    for item in plan.items() {
        n += 1;
        match item {
            Item::Material(m) => {
                sqlx::query(
                    "INSERT INTO materials (number, description, tracking, unit) VALUES ($1, $2, $3, $4)",
                )
                .bind(&m.number)
                .bind(&m.description)
                .bind(&m.tracking)
                .bind(&m.unit)
                .execute(&mut *tx)
                .await?;
            }
            Item::Station(s) => {
                sqlx::query("INSERT INTO stations (id, name) VALUES ($1, $2)")
                    .bind(&s.id)
                    .bind(&s.name)
                    .execute(&mut *tx)
                    .await?;
            }
            Item::Lot(l) => {
                rows.r_lot.push(l.lot);
                rows.r_material.push(l.material);
                rows.r_supplier.push(l.supplier);
                rows.r_supplier_lot.push(l.supplier_lot);
                rows.r_quantity.push(l.quantity.parse().unwrap_or_default());
                rows.r_at.push(time(l.received_at.as_ref()));
            }
            Item::WorkOrder(w) => {
                rows.w_number.push(w.number);
                rows.w_material.push(w.material);
                rows.w_planned
                    .push(w.planned_quantity.parse().unwrap_or_default());
                let op = w.operations.first().cloned().unwrap_or_default();
                rows.w_station.push(op.station);
                rows.w_description.push(op.description);
            }
            Item::Scan { scan, material } => {
                let scan_id = Uuid::parse_str(&scan.scan_id)?;
                let at = time(scan.scanned_at.as_ref());
                // The generated plant makes starts, consumes, produces, completions and
                // inspections only.
                let kind = match mes_domain::ScanKind::from_proto(scan.kind) {
                    Some(
                        k @ (mes_domain::ScanKind::StartOperation
                        | mes_domain::ScanKind::Consume
                        | mes_domain::ScanKind::Produce
                        | mes_domain::ScanKind::CompleteOperation),
                    ) => k.as_str(),
                    _ => "inspect",
                };
                let quantity: Option<Decimal> = scan.quantity.parse().ok();
                match kind {
                    "consume" => {
                        rows.e_scan.push(scan_id);
                        rows.e_from.push(scan.lot.clone());
                        rows.e_to.push(String::new()); // filled at the produce
                        rows.e_wo.push(scan.work_order.clone());
                        rows.e_station.push(scan.station.clone());
                        rows.e_at.push(at);
                    }
                    "produce" => {
                        // The order's consumes (buffered since its start) went into this lot.
                        for to in rows.e_to.iter_mut().filter(|t| t.is_empty()) {
                            to.clone_from(&scan.lot);
                        }
                        rows.l_lot.push(scan.lot.clone());
                        rows.l_material.push(material.clone());
                        rows.l_wo.push(scan.work_order.clone());
                        rows.l_quantity.push(quantity.unwrap_or_default());
                        rows.l_at.push(at);
                    }
                    _ => {}
                }
                rows.scan_id.push(scan_id);
                rows.position.push(i64::try_from(n)?);
                rows.kind.push(kind.into());
                rows.work_order.push(scan.work_order);
                // A scan without a step resolves to the order's only operation.
                rows.operation.push(match scan.operation {
                    0 => 10,
                    op => i32::try_from(op).unwrap_or(0),
                });
                rows.station.push(scan.station);
                rows.lot.push(scan.lot);
                rows.material.push(material);
                rows.quantity.push(quantity);
                rows.result.push(if kind == "inspect" {
                    "pass".into()
                } else {
                    String::new()
                });
                rows.scanned_at.push(at);
                rows.received_at.push(at + TimeDelta::seconds(1));
            }
        }
        // Flush between work orders only (edges need their order's produce).
        let between_orders = rows.e_to.iter().all(|t| !t.is_empty());
        if rows.len() >= 20_000 && between_orders {
            flush(&mut tx, &mut rows).await?;
            tx.commit().await?;
            tx = pool.begin().await?;
            progress(n, total);
        }
    }
    flush(&mut tx, &mut rows).await?;
    sqlx::query(
        "INSERT INTO production_hourly (hour, station, material, work_order, good, scrap, scans)
         SELECT date_trunc('hour', scanned_at, 'UTC'), station, material, work_order,
                COALESCE(sum(quantity) FILTER (WHERE kind = 'produce'), 0),
                COALESCE(sum(quantity) FILTER (WHERE kind = 'scrap'), 0), count(*)
         FROM scans GROUP BY 1, 2, 3, 4",
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO feed_cursor (consumer, position) VALUES ($1, $2)
         ON CONFLICT (consumer) DO UPDATE SET position = EXCLUDED.position, updated_at = now()",
    )
    .bind(consumer)
    .bind(i64::try_from(n)?)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    sqlx::query("ANALYZE").execute(pool).await?;
    progress(n, total);
    Ok(n)
}

fn request<T>(caller: &Caller, message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    caller.write_to(r.metadata_mut());
    r
}

/// Buffers of the gRPC load, sent in the plan's order.
struct GrpcLoad<'a> {
    caller: &'a Caller,
    master: mes_proto::v1::master_data_client::MasterDataClient<Traced>,
    ingest: mes_proto::v1::scan_ingest_client::ScanIngestClient<Traced>,
    materials: Vec<pb::Material>,
    stations: Vec<pb::Station>,
    lots: Vec<pb::ReceivedLot>,
    orders: Vec<pb::WorkOrderSpec>,
    scans: Vec<pb::Scan>,
    rejected: u64,
}

impl GrpcLoad<'_> {
    async fn flush(&mut self) -> anyhow::Result<()> {
        let c = self.caller;
        if !self.materials.is_empty() {
            let items = std::mem::take(&mut self.materials);
            self.master
                .upsert_materials(request(c, pb::UpsertMaterialsRequest { items }))
                .await?;
        }
        if !self.stations.is_empty() {
            let items = std::mem::take(&mut self.stations);
            self.master
                .upsert_stations(request(c, pb::UpsertStationsRequest { items }))
                .await?;
        }
        if !self.lots.is_empty() {
            let items = std::mem::take(&mut self.lots);
            self.master
                .upsert_received_lots(request(c, pb::UpsertReceivedLotsRequest { items }))
                .await?;
        }
        if !self.orders.is_empty() {
            let items = std::mem::take(&mut self.orders);
            self.master
                .upsert_work_orders(request(c, pb::UpsertWorkOrdersRequest { items }))
                .await?;
        }
        if !self.scans.is_empty() {
            let scans = std::mem::take(&mut self.scans);
            let results = self
                .ingest
                .submit_scans(request(c, pb::SubmitScansRequest { scans }))
                .await?
                .into_inner()
                .results;
            for r in results {
                if r.status == pb::ScanStatus::Rejected as i32 {
                    self.rejected += 1;
                    tracing::warn!(scan_id = %r.scan_id, error = ?r.error, "generated scan rejected");
                }
            }
        }
        Ok(())
    }
}

/// Loads the plan through scan-ingest's real write path: master data through `MasterData`,
/// scans through `SubmitScans` (batches of at most 500), as `caller`.
pub async fn load_grpc(
    scan_ingest_url: &str,
    plan: &Plan,
    caller: &Caller,
    key: Option<CallerKey>,
    progress: Progress<'_>,
) -> anyhow::Result<u64> {
    use mes_proto::v1::{
        master_data_client::MasterDataClient, scan_ingest_client::ScanIngestClient,
    };
    plan.validate()?;
    let channel = mes_common::grpc::channel(
        scan_ingest_url,
        Duration::from_secs(5),
        Duration::from_secs(60),
    )?;
    let mut load = GrpcLoad {
        caller,
        master: MasterDataClient::new(mes_common::grpc::signed(channel.clone(), key.clone())),
        ingest: ScanIngestClient::new(mes_common::grpc::signed(channel, key)),
        materials: Vec::new(),
        stations: Vec::new(),
        lots: Vec::new(),
        orders: Vec::new(),
        scans: Vec::new(),
        rejected: 0,
    };
    let total = total_items(plan);
    let mut n = 0u64;
    for item in plan.items() {
        n += 1;
        // Keep the plan's order: send what is buffered before another kind of item.
        let other_kind_buffered = match &item {
            Item::Material(_) => false,
            Item::Station(_) => !load.materials.is_empty(),
            Item::Lot(_) => !load.stations.is_empty() || !load.materials.is_empty(),
            Item::WorkOrder(_) => !load.scans.is_empty() || !load.lots.is_empty(),
            Item::Scan { .. } => !load.orders.is_empty(),
        };
        if other_kind_buffered {
            load.flush().await?;
            progress(n, total);
        }
        let full = match item {
            Item::Material(m) => {
                load.materials.push(m);
                false
            }
            Item::Station(s) => {
                load.stations.push(s);
                false
            }
            Item::Lot(l) => {
                load.lots.push(l);
                load.lots.len() == 500
            }
            Item::WorkOrder(w) => {
                load.orders.push(w);
                load.orders.len() == 200
            }
            Item::Scan { scan, .. } => {
                load.scans.push(scan);
                load.scans.len() == 500
            }
        };
        if full {
            load.flush().await?;
            progress(n, total);
        }
    }
    load.flush().await?;
    progress(n, total);
    anyhow::ensure!(
        load.rejected == 0,
        "{} scans were rejected by scan-ingest",
        load.rejected
    );
    Ok(n)
}

/// Latencies of a benchmark run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BenchReport {
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} requests ({} errors) in {:.2} s = {:.0}/s; p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.requests,
            self.errors,
            self.seconds,
            self.requests as f64 / self.seconds.max(1e-9),
            self.p50_ms,
            self.p95_ms,
            self.p99_ms,
            self.max_ms
        )
    }
}

/// Fires `requests` genealogy queries (`concurrency` at a time) at trace-query for lots of the
/// plan: backward from top-level lots and forward from received lots, picked at random from
/// the first `spread` lots of each level (a small spread measures the cache, a large one the
/// database).
pub async fn bench(
    trace_query_url: &str,
    key: Option<CallerKey>,
    plan: &Plan,
    requests: u64,
    concurrency: usize,
    spread: u64,
) -> anyhow::Result<BenchReport> {
    use futures::StreamExt;
    use mes_proto::v1::trace_query_client::TraceQueryClient;
    use rand::Rng;
    plan.validate()?;
    let channel = mes_common::grpc::channel(
        trace_query_url,
        Duration::from_secs(5),
        Duration::from_secs(30),
    )?;
    let client = TraceQueryClient::new(mes_common::grpc::signed(channel, key));
    let top = plan.level_size(plan.depth).min(spread.max(1));
    let raw = plan.level_size(0).min(spread.max(1));
    let started = std::time::Instant::now();
    let results: Vec<Option<f64>> = futures::stream::iter(0..requests)
        .map(|i| {
            let mut client = client.clone();
            let (lot, direction) = if i % 2 == 0 {
                (
                    plan.lot_name(plan.depth, rand::rng().random_range(0..top)),
                    pb::Direction::Backward,
                )
            } else {
                (
                    plan.lot_name(0, rand::rng().random_range(0..raw)),
                    pb::Direction::Forward,
                )
            };
            async move {
                let t = std::time::Instant::now();
                let r = client
                    .get_genealogy(pb::GenealogyRequest {
                        lot,
                        direction: direction as i32,
                        max_depth: 0,
                    })
                    .await;
                r.ok().map(|_| t.elapsed().as_secs_f64() * 1000.0)
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let seconds = started.elapsed().as_secs_f64();
    let mut ok: Vec<f64> = results.iter().flatten().copied().collect();
    ok.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if ok.is_empty() {
            0.0
        } else {
            ok[((ok.len() - 1) as f64 * p).round() as usize]
        }
    };
    Ok(BenchReport {
        requests,
        errors: results.iter().filter(|r| r.is_none()).count() as u64,
        seconds,
        p50_ms: pct(0.50),
        p95_ms: pct(0.95),
        p99_ms: pct(0.99),
        max_ms: ok.last().copied().unwrap_or(0.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_split_the_lots_and_inputs_cover_the_level_below() {
        let p = Plan {
            lots: 62,
            depth: 5,
            fan_in: 4,
            ..Default::default()
        };
        p.validate().unwrap();
        assert_eq!(p.level_size(0), 12);
        assert_eq!((1..=5).map(|l| p.level_size(l)).sum::<u64>(), 50);
        assert_eq!(p.inputs(1, 0), vec![0, 1, 2, 3]);
        assert_eq!(p.inputs(1, 3), vec![0, 1, 2, 3]);
        let items: Vec<Item> = p.items().collect();
        assert_eq!(items.len() as u64, total_items(&p));
        let scans = items
            .iter()
            .filter(|i| matches!(i, Item::Scan { .. }))
            .count() as u64;
        assert_eq!(scans, 50 * p.scans_per_order());
        // Deterministic ids.
        let again: Vec<Item> = p.items().collect();
        let ids = |v: &[Item]| {
            v.iter()
                .filter_map(|i| match i {
                    Item::Scan { scan, .. } => Some(scan.scan_id.clone()),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&items), ids(&again));
        assert!(Plan { depth: 0, ..p }.validate().is_err());
        assert!(Plan { lots: 3, ..p }.validate().is_err());
    }

    #[test]
    fn every_lot_holds_enough_for_its_consumers() {
        let p = Plan {
            lots: 1000,
            depth: 3,
            fan_in: 7,
            ..Default::default()
        };
        for l in 0..p.depth {
            let mut uses = vec![0u64; p.level_size(l) as usize];
            for i in 0..p.level_size(l + 1) {
                for input in p.inputs(l + 1, i) {
                    uses[input as usize] += 1;
                }
            }
            let max = uses.into_iter().max().unwrap();
            assert!(
                max <= p.lot_quantity(l),
                "level {l}: {max} > {}",
                p.lot_quantity(l)
            );
        }
    }
}
